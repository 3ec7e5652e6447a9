"""``edgekit serve --max-tokens`` against ``--ctx``: a limit above the context is refused before anything
listens, one line that says the fix, exit 2 as other flag errors; the default (2048) shrinks to a smaller
--ctx instead, since the user never asked for it. The server itself is replaced by a stand-in that records
the config it was given."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekit.errors import InputError
from tests.edgekit.test_bad_input import assert_clean_error, run_cli

pytestmark = pytest.mark.usefixtures("private_home")


@pytest.fixture
def started(monkeypatch) -> list[object]:
    """The configs `edgekit serve` would have listened with."""
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from edgekit.runtime.serve import app

    configs: list[object] = []
    monkeypatch.setattr(app, "serve", lambda config, opener, **kw: configs.append(config))
    return configs


def test_a_max_tokens_above_the_context_is_refused_at_start(tiny_gguf: Path, started):
    code, out = run_cli("serve", tiny_gguf, "--max-tokens", "4096", "--ctx", "1024", "--port", "0")
    assert code == InputError.exit_code == 2, out
    assert_clean_error(code, out, "--max-tokens 4096 can never be reached with --ctx 1024",
                       "give --max-tokens 1024 or less")
    assert not started


@pytest.mark.parametrize("args, limit", [(["--ctx", "512"], 512), (["--ctx", "4096"], 2048),
                                         (["--ctx", "512", "-n", "512"], 512)])
def test_the_default_fits_a_smaller_context(tiny_gguf: Path, started, args, limit):
    code, out = run_cli("serve", tiny_gguf, *args, "--port", "0")
    assert code == 0, out
    assert [c.max_tokens for c in started] == [limit]  # type: ignore[attr-defined]
