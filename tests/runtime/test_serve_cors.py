"""``edgekit serve --cors``: which browser pages may call the server, in process (Starlette's test client, no
model loads). The served model's answers with CORS headers are in test_serve.py."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

from edgekit.errors import InputError  # noqa: E402
from edgekit.runtime.serve.app import create_app  # noqa: E402
from edgekit.runtime.serve.config import ServeConfig  # noqa: E402

PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}


def _client(tmp_path: Path, **config: object) -> TestClient:
    def opener(path: Path, **options: object) -> object:
        raise AssertionError("no model loads in these tests")

    return TestClient(create_app(ServeConfig(models={"m": tmp_path}, **config), opener))


def _cors(headers: object) -> list[str]:
    return [h for h in headers if h.lower().startswith("access-control-")]  # type: ignore[attr-defined]


def test_cors_is_off_by_default(tmp_path):
    """A server on 127.0.0.1 must not become callable from any website the user visits."""
    with _client(tmp_path) as c:
        r = c.options("/v1/chat/completions", headers={"Origin": "http://evil.example", **PREFLIGHT})
        assert r.status_code == 405 and not _cors(r.headers)
        r = c.get("/v1/models", headers={"Origin": "http://evil.example"})
        assert r.status_code == 200 and not _cors(r.headers)


def test_any_origin_with_star_and_the_key_still_needed(tmp_path):
    with _client(tmp_path, cors=("*",), api_key="k") as c:
        r = c.options("/v1/completions", headers={"Origin": "http://any.example", **PREFLIGHT})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
        r = c.get("/v1/models", headers={"Origin": "http://any.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "*"
        r = c.get("/v1/models", headers={"Origin": "http://any.example", "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


def test_a_public_page_allowed_by_name_may_reach_the_local_server(tmp_path):
    """Chrome asks a private address whether a public page may call it (Private Network Access): the --cors
    list is the gate, so a named origin is let through and another is not."""
    pna = {**PREFLIGHT, "Access-Control-Request-Private-Network": "true"}
    with _client(tmp_path, cors=("https://Chat.Example",)) as c:  # browsers send origins in lower case
        r = c.options("/v1/chat/completions", headers={"Origin": "https://chat.example", **pna})
        assert r.status_code == 200 and r.headers["access-control-allow-private-network"] == "true"
        assert r.headers["access-control-allow-origin"] == "https://chat.example"
        r = c.options("/v1/chat/completions", headers={"Origin": "https://evil.example", **pna})
        assert r.status_code == 400 and not _cors(r.headers) and "--cors https://evil.example" in r.text


@pytest.mark.parametrize("origin, fix", [
    ("http://localhost:3000/", "--cors http://localhost:3000"),
    ("http://localhost:3000/chat", "--cors http://localhost:3000"),
    ("localhost:3000", "scheme, host and port"),
    ("", "scheme, host and port"),
])
def test_an_origin_that_could_never_match_is_refused_with_the_fix(tmp_path, origin, fix):
    with pytest.raises(InputError, match="not an origin") as info:
        ServeConfig(models={"m": tmp_path}, cors=(origin,))
    assert fix in str(info.value)
