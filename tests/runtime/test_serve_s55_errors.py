"""``edgekit serve``'s answers to failures it did not foresee, in process (Starlette's test client, a fake
backend): an exception no handler takes is OpenAI's JSON 500, with a one-line message and the CORS headers of
an allowed origin (a browser page otherwise sees an opaque network error), and its traceback is logged once;
one in the middle of a stream ends it with an error event. The server-wide --max-tokens against --ctx is in
test_serve_s55_limits.py."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

from edgekit.runtime.serve.app import create_app  # noqa: E402
from edgekit.runtime.serve.config import ServeConfig  # noqa: E402

ORIGIN = "http://ui.example:3000"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class _Backend:
    """Generates ``pieces``, then raises ``fail`` (if any), as a backend hit by a bug would."""

    def __init__(self, pieces: list[str], fail: Exception | None) -> None:
        self.pieces, self.fail = pieces, fail

    def generate(self, prompt: object, sampling: object, stats: object) -> Iterator[str]:
        yield from self.pieces
        if self.fail is not None:
            raise self.fail

    def close(self) -> None:
        pass


@pytest.fixture
def logged() -> Iterator[list[logging.LogRecord]]:
    """What the server logs (on uvicorn's error logger, which `edgekit serve` writes to stderr)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("uvicorn.error")
    log.addHandler(handler)
    try:
        yield records
    finally:
        log.removeHandler(handler)


def _client(tmp_path: Path, opener: object) -> TestClient:
    app = create_app(ServeConfig(models={"m": tmp_path}, cors=(ORIGIN,), idle_unload=0), opener)  # type: ignore[arg-type]
    return TestClient(app, raise_server_exceptions=False)


def _check_500(r: object, logged: list[logging.LogRecord], needle: str) -> None:
    assert r.status_code == 500, r.text  # type: ignore[attr-defined]
    assert r.headers["access-control-allow-origin"] == ORIGIN  # type: ignore[attr-defined]
    error = r.json()["error"]  # type: ignore[attr-defined]
    assert error["type"] == "server_error" and needle in error["message"], error
    assert "\n" not in error["message"] and "Traceback" not in r.text  # type: ignore[attr-defined]
    assert len([rec for rec in logged if rec.exc_info]) == 1, logged  # the traceback, server-side, once


def test_a_model_that_fails_to_load_unexpectedly_is_a_json_500_the_page_can_read(tmp_path, logged):
    def opener(path: Path, **options: object) -> object:
        raise RuntimeError("llama_model_load: boom\n  at some internal frame")

    with _client(tmp_path, opener) as c:
        r = c.post("/v1/chat/completions", json=CHAT, headers={"Origin": ORIGIN})
    _check_500(r, logged, "RuntimeError: llama_model_load: boom")


@pytest.mark.parametrize("stream", [False, True])
def test_a_generation_that_fails_before_its_first_token_is_a_json_500_with_cors(tmp_path, logged, stream):
    with _client(tmp_path, lambda path, **o: _Backend([], ZeroDivisionError("division by zero"))) as c:
        r = c.post("/v1/chat/completions", json={**CHAT, "stream": stream}, headers={"Origin": ORIGIN})
        _check_500(r, logged, "ZeroDivisionError: division by zero")
        assert c.get("/health").json()["models"]["m"]["busy"] == 0  # its instance came back


def test_a_stream_that_fails_midway_ends_with_an_error_event(tmp_path, logged):
    """The status line has gone out: the error travels as an event (which clients raise), not as a dropped
    connection that a browser reports as a network error."""
    with _client(tmp_path, lambda path, **o: _Backend(["Hel", "lo"], KeyError("slot"))) as c:
        r = c.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers={"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if "choices" in e) == "Hello"
    error = events[-1]["error"]
    assert error["type"] == "server_error" and "KeyError: 'slot'" in error["message"], error
    assert len([rec for rec in logged if rec.exc_info]) == 1, logged
