"""`edgekit serve`'s lifecycle as a client sees it: a client that hangs up mid-stream, a request past its
timeout, SIGTERM with answers running and waiting, a port in use, a forced exit's log."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from tests.runtime.served import EDGEKIT, LONG, Served, health, wait_idle

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

pytestmark = pytest.mark.llamacpp


@pytest.fixture(scope="module")
def long_server(endless) -> Iterator[Served]:
    s = Served([str(endless), *LONG, "--timeout", "3"])
    yield s
    s.stop(signal.SIGKILL)


def test_disconnect_mid_stream_cancels_and_the_server_goes_on(long_server):
    s = long_server
    body = {"model": "endless", "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 30000,
            "temperature": 0, "stream": True}
    for _ in range(2):  # twice: the instance given back after a cancel serves the next stream as well
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = (line for line in r.iter_lines() if line)
            assert all(next(lines).startswith("data: {") for _ in range(20))
            assert health(s, "")["models"]["endless"]["busy"] == 1
        t0 = time.monotonic()
        h = wait_idle(s, "endless", "")
        assert time.monotonic() - t0 < 2.5 and h["models"]["endless"]["loaded"] == 1  # cancelled, not timed out
        assert len(psutil.Process(s.proc.pid).children()) == 1  # one llama.cpp worker, the same as before
    c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    # greedy: the endless model's special tokens only have logit 0, which sampling could still pick
    r = c.chat.completions.create(model="endless", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                  temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_request_timeout_is_a_504_or_an_error_event(long_server):
    s = long_server
    body = {"model": "endless", "prompt": "a", "max_tokens": 30000, "temperature": 0}
    r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 504 and "--timeout" in r.json()["error"]["message"]
    with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        last = [line for line in r.iter_lines() if line][-1]
    assert json.loads(last.removeprefix("data: "))["error"]["code"] == "timeout"
    assert wait_idle(s, "endless", "")["models"]["endless"]["loaded"] == 1


def test_sigterm_ends_a_running_stream_with_an_error_event(endless):
    s = Served([str(endless), *LONG])
    try:
        body = {"model": "endless", "prompt": "a", "max_tokens": 30000, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            lines = (line for line in r.iter_lines() if line)
            assert next(lines).startswith("data: {")
            s.proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        event = json.loads(rest[-1].removeprefix("data: "))
        assert event["error"]["code"] == "server_shutting_down", rest[-3:]
        assert s.proc.wait(30) in (143, -signal.SIGTERM)
        assert "stopped; every model unloaded" in "".join(s.lines)
    finally:
        s.stop(signal.SIGKILL)


def test_a_request_waiting_for_an_instance_at_sigterm_gets_the_shutdown_error(endless):
    """--parallel 1: the second stream waits for the first's instance; at SIGTERM the waiting one gets the
    JSON 503 (or an error event), never uvicorn's plain-text 500 or a stream cut without an event."""
    s = Served([str(endless), *LONG, "--grace", "2"])
    results: dict[str, object] = {}

    def waiting() -> None:
        body = {"model": "endless", "prompt": "b", "max_tokens": 30000, "temperature": 0, "stream": True}
        try:
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
                results["status"] = r.status_code
                results["lines"] = [line for line in r.iter_lines() if line]
        except httpx.HTTPError as exc:
            results["error"] = repr(exc)

    try:
        body = {"model": "endless", "prompt": "a", "max_tokens": 30000, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            lines = (line for line in r.iter_lines() if line)
            assert next(lines).startswith("data: {")
            second = threading.Thread(target=waiting)
            second.start()
            time.sleep(0.5)  # queued behind the first
            s.proc.send_signal(signal.SIGTERM)
            list(lines)
        second.join(60)
        assert "error" not in results, results
        last = results["lines"][-1]  # type: ignore[index]
        if results["status"] == 200:
            last = last.removeprefix("data: ")
        assert json.loads(last)["error"]["code"] == "server_shutting_down", results
        assert s.proc.wait(30) in (143, -signal.SIGTERM)
    finally:
        s.stop(signal.SIGKILL)


def test_port_in_use_is_one_line(artifacts):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        r = subprocess.run([EDGEKIT, "serve", str(artifacts["gguf"]), "--port",
                            str(port)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr and "--port" in r.stderr


def test_a_forced_exit_logs_no_traceback():
    """A second Ctrl-C makes uvicorn skip the lifespan's shutdown; the cancelled lifespan reaches its log as
    a failed shutdown carrying the CancelledError's traceback, which the server drops; other errors pass."""
    import asyncio
    import logging

    from edgekit.runtime.serve.app import _ForcedExitFilter

    def record(msg: str, exc: BaseException | None = None) -> logging.LogRecord:
        info = (type(exc), exc, None) if exc else None
        return logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, msg, None, info)

    f = _ForcedExitFilter()
    cancelled = ("Traceback (most recent call last):\n  File \"starlette/routing.py\", line 668, in lifespan\n"
                 "    await receive()\nasyncio.exceptions.CancelledError\n")
    assert not f.filter(record(cancelled))
    assert not f.filter(record("Exception in 'lifespan' protocol\n", asyncio.CancelledError()))
    assert f.filter(record("Traceback (most recent call last):\nValueError: boom\n"))
    assert f.filter(record("Exception in 'lifespan' protocol\n", ValueError("boom")))

