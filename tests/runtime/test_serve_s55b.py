"""``edgekit serve`` says "stopped; every model unloaded" only after a server that listened (QA s55: a port in
use printed it before its error, for a server that never started)."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from edgekit.cli.main import app  # noqa: E402

STOPPED = "stopped; every model unloaded"


def test_port_in_use_says_no_stopped(tiny_gguf, private_home):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        res = CliRunner().invoke(app, ["serve", str(tiny_gguf), "--port", str(port)])
    assert res.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in res.stderr, res.output
    assert STOPPED not in res.output, res.output


def test_a_server_that_listened_says_it_stopped(tiny_gguf, private_home, monkeypatch):
    from edgekit.runtime.serve import app as serve_app

    def listened_then_ctrl_c(config, opener, on_ready=None, preloaded=None):
        on_ready(f"http://127.0.0.1:{config.port}")
        raise KeyboardInterrupt

    monkeypatch.setattr(serve_app, "serve", listened_then_ctrl_c)
    res = CliRunner().invoke(app, ["serve", str(tiny_gguf), "--port", "18999"])
    assert res.exit_code == 0, res.output
    assert res.stderr.count(STOPPED) == 1 and res.stderr.index("serving") < res.stderr.index(STOPPED), res.stderr
