"""`edgekit serve` as a client sees it: the real server in a subprocess on a free loopback port, tiny GGUF
and ONNX artifacts built here, the real `openai` client (and httpx where the client hides the status)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

pytestmark = pytest.mark.llamacpp

EDGEKIT = str(Path(sys.executable).with_name("edgekit"))  # the installed command, as users run it
KEY = "test-key"
MAX_TOKENS = 48
MAX_BODY = 8192


class Served:
    """A running `edgekit serve`: its process, base URL and the lines it wrote on stderr."""

    def __init__(self, args: list[str], timeout: float = 120) -> None:
        self.proc = subprocess.Popen([EDGEKIT, "serve", *args, "--port", "0"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "EDGEKIT_API_KEY": ""})
        self.lines: list[str] = []
        self.url = ""
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                if line.startswith("serving http://"):
                    self.url = line.split()[1].removesuffix("/v1")
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout) or not self.url:
            self.stop()
            raise AssertionError("the server did not start:\n" + "".join(self.lines))

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture(scope="module")
def artifacts(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    import shutil

    from edgekit import api
    from edgekit.converters.formats.base import ConvertRecipe

    root = tmp_path_factory.mktemp("serve")
    gguf = api.convert(tiny_llama, "gguf", output=root / "tiny-gguf", recipe=ConvertRecipe(preset="Q8_0")).path
    broken = shutil.copytree(gguf, root / "tiny-broken")
    with open(broken / "model.gguf", "r+b") as fh:  # one byte of a weight changed after convert
        fh.seek(-100, 2)
        byte = fh.read(1)
        fh.seek(-100, 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    return {"gguf": gguf, "broken": broken,
            "onnx": api.convert(tiny_llama, "onnx", output=root / "tiny-onnx", recipe=ConvertRecipe(bits=32)).path}


@pytest.fixture(scope="module")
def endless(tiny_llama, tmp_path_factory) -> Path:
    """The tiny model with its special tokens' output rows zeroed: their logits are exactly 0 where some other
    token's is positive, so it never ends by itself and a stream runs as long as a test needs."""
    import shutil

    from safetensors.torch import load_file, save_file

    from edgekit import api
    from edgekit.converters.formats.base import ConvertRecipe

    root = tmp_path_factory.mktemp("endless")
    ckpt = shutil.copytree(tiny_llama, root / "ckpt")
    weights = next(ckpt.glob("*.safetensors"))
    tensors = load_file(weights)
    tensors["lm_head.weight"][:3] = 0  # <|endoftext|>, <|im_start|>, <|im_end|>
    save_file(tensors, weights, metadata={"format": "pt"})
    return api.convert(ckpt, "gguf", output=root / "endless", recipe=ConvertRecipe(preset="Q8_0")).path


@pytest.fixture(scope="module")
def server(artifacts) -> Iterator[Served]:
    # --exact-batch: batched answers must equal the answers alone (test_concurrent_streams_each_get_their_own_answer)
    s = Served([str(artifacts["gguf"]), str(artifacts["onnx"]), str(artifacts["broken"]), "--api-key", KEY, "--parallel", "2",
                "--max-tokens", str(MAX_TOKENS), "--max-body", str(MAX_BODY), "--idle-unload", "3", "--threads", "2",
                "--ctx", "512", "--exact-batch"])
    yield s
    assert s.stop() == 0 and "error:" not in "".join(s.lines), "".join(s.lines)  # Ctrl-C is a normal stop


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(artifacts) -> Iterator[object]:
    """The same GGUF loaded directly: what the server's answers and counts must equal."""
    from edgekit import api

    with api.open_backend(artifacts["gguf"], n_ctx=512) as backend:
        yield backend


def _direct(backend, prompt, max_tokens: int, stop: tuple[str, ...] = ()) -> tuple[str, object]:
    from edgekit.runtime.base import GenerationStats, SamplingConfig

    st = GenerationStats()
    sampling = SamplingConfig(temperature=0, top_k=0, top_p=1, min_p=0, max_tokens=max_tokens, stop=stop)
    return "".join(backend.generate(prompt, sampling, st)), st


def _chat(client, content: str, **kw) -> object:
    return client.chat.completions.create(model="tiny-gguf", messages=[{"role": "user", "content": content}],
                                          temperature=0, **kw)


def _stream_text(client, content: str, **kw) -> tuple[str, list]:
    chunks = list(_chat(client, content, stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_models_lists_every_artifact_and_needs_the_key(server, client):
    assert sorted(m.id for m in client.models.list()) == ["tiny-broken", "tiny-gguf", "tiny-onnx"]
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="--api-key"):
        wrong.models.list()
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny-gguf"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_chat_matches_the_sdk_with_usage_and_length(client, local):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    want, st = _direct(local, messages, 12)
    r = _chat(client, messages[0]["content"], max_tokens=12)
    assert r.choices[0].message.content == want and want
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(local.chat_tokens(messages)) == st.prompt_tokens
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_stream_equals_the_whole_answer_and_reports_usage(client):
    whole = _chat(client, "Tell me about the sea.", max_tokens=12)
    text, chunks = _stream_text(client, "Tell me about the sea.", max_tokens=12,
                                stream_options={"include_usage": True})
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_stop_string_ends_the_answer_before_it(client, local):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    full, _ = _direct(local, messages, 24)
    stop = full[len(full) // 2:][:3]
    assert stop.strip(), full
    want, st = _direct(local, messages, 24, stop=(stop,))
    r = _chat(client, messages[0]["content"], max_tokens=24, stop=[stop])
    assert r.choices[0].message.content == want == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == st.generated_tokens < 24
    text, chunks = _stream_text(client, messages[0]["content"], max_tokens=24, stop=stop)
    assert text == want and [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_text_completion_streamed_and_not(client, local):
    want, st = _direct(local, "The weather today", 10)
    r = client.completions.create(model="tiny-gguf", prompt="The weather today", max_tokens=10, temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(local.tokenize("The weather today")) == st.prompt_tokens
    streamed = list(client.completions.create(model="tiny-gguf", prompt="The weather today", max_tokens=10,
                                              temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "length"


def test_seeded_sampling_repeats(client):
    a = client.chat.completions.create(model="tiny-gguf", messages=[{"role": "user", "content": "Hello"}],
                                       max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    b = client.chat.completions.create(model="tiny-gguf", messages=[{"role": "user", "content": "Hello"}],
                                       max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    assert a.choices[0].message.content == b.choices[0].message.content


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b'["a list"]', 400, "JSON object"),
    (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404, "GET /v1/models"),
    (json.dumps({"model": "tiny-gguf", "messages": [{"role": "user", "content": "hi"}],
                 "max_tokens": MAX_TOKENS + 1}).encode(), 400, "--max-tokens"),
    (json.dumps({"model": "tiny-gguf", "messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, "role"),
    (json.dumps({"model": "tiny-gguf", "messages": [{"role": "user", "content": "x" * MAX_BODY}]}).encode(), 413,
     "--max-body"),
])
def test_bad_requests_get_json_errors(server, body, status, needle):
    r = httpx.post(server.url + "/v1/chat/completions", content=body,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status
    assert needle in r.json()["error"]["message"]


def test_a_prompt_over_the_context_is_a_400_that_names_the_window(server):
    body = {"model": "tiny-gguf", "messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 4}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    assert "context holds 512" in r.json()["error"]["message"] and "--kv-window" in r.json()["error"]["message"]


def test_routes_and_methods_answer_in_json(server, client):
    assert client.models.retrieve("tiny-onnx").id == "tiny-onnx"
    auth = {"Authorization": f"Bearer {KEY}"}
    for method, path, status in (("GET", "/v2/chat", 404), ("DELETE", "/v1/models", 405),
                                 ("GET", "/v1/models/nope", 404)):
        r = httpx.request(method, server.url + path, headers=auth)
        assert r.status_code == status and r.json()["error"]["message"], (path, r.text)


def test_a_model_that_fails_its_checksum_is_a_500_that_says_so(server, client):
    with pytest.raises(openai.InternalServerError, match="changed since it was converted"):
        client.chat.completions.create(model="tiny-broken", messages=[{"role": "user", "content": "hi"}])
    assert _health(server)["models"]["tiny-broken"] == {"loaded": 0, "busy": 0, "loading": 0, "waiting": 0}
    assert _chat(client, "Hello", max_tokens=3).usage.completion_tokens == 3  # the others still answer


def test_unknown_model_through_the_client(client):
    with pytest.raises(openai.NotFoundError, match="tiny-gguf"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def _health(server, key: str = KEY) -> dict:
    return httpx.get(server.url + "/health", headers={"Authorization": f"Bearer {key}"} if key else {}).json()


def _wait_idle(server, model: str = "tiny-gguf", key: str = KEY, timeout: float = 30) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        h = _health(server, key)
        if h["models"][model]["busy"] == 0 and h["generations"] == 0:
            return h
        time.sleep(0.1)
    raise AssertionError(f"still busy: {h}")


LONG = ["--max-tokens", "30000", "--ctx", "32768", "--threads", "1", "--grace", "1"]


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
            assert _health(s, "")["models"]["endless"]["busy"] == 1
        t0 = time.monotonic()
        h = _wait_idle(s, "endless", "")
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
    assert _wait_idle(s, "endless", "")["models"]["endless"]["loaded"] == 1


def test_concurrent_streams_each_get_their_own_answer(client):
    prompts = ["Tell me about the sea.", "Hello", "What is a cat?", "Count to ten.", "Say something.", "Why?"]
    # --parallel 2 batches the streams in one llama.cpp context: each must get the answer its prompt gets alone
    alone = {p: _stream_text(client, p, max_tokens=20)[0] for p in prompts}
    assert len(set(alone.values())) > 1  # distinct answers, or mixing streams would go unseen
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = dict(zip(prompts, pool.map(lambda p: _stream_text(client, p, max_tokens=20)[0], prompts), strict=True))
    assert together == alone


def test_the_shared_cache_serves_concurrent_streams(artifacts):
    """The default batching (one KV pool for the sequences): six concurrent streams on two slots each end
    with their own length and usage, then a repeat of one prompt alone gives the same answer again."""
    s = Served([str(artifacts["gguf"]), "--parallel", "2", "--threads", "2", "--ctx", "512"])
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        prompts = ["Tell me about the sea.", "Hello", "What is a cat?", "Count to ten.", "Say something.", "Why?"]

        def ask(p: str) -> tuple[str, int, str]:
            r = c.chat.completions.create(model="tiny-gguf", messages=[{"role": "user", "content": p}], max_tokens=12,
                                          temperature=0)
            return r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason

        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(ask, prompts))
        assert all(n == 12 and reason == "length" and text for text, n, reason in answers), answers
        assert ask(prompts[0]) == ask(prompts[0])  # alone, with the cached prefix: the same answer twice
    finally:
        assert s.stop() == 0


def test_onnx_backend_answers_like_its_sdk(client, artifacts):
    from edgekit import api

    messages = [{"role": "user", "content": "Tell me about the sea."}]
    with api.open_backend(artifacts["onnx"], n_ctx=512) as backend:
        want, st = _direct(backend, messages, 10)
    r = client.chat.completions.create(model="tiny-onnx", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == st.prompt_tokens and r.usage.completion_tokens == st.generated_tokens


def test_idle_models_unload(server, client):
    _chat(client, "Hello", max_tokens=2)
    assert _health(server)["models"]["tiny-gguf"]["loaded"] >= 1
    end = time.monotonic() + 30
    while _health(server)["models"]["tiny-gguf"]["loaded"] and time.monotonic() < end:
        time.sleep(0.2)
    assert _health(server)["models"]["tiny-gguf"]["loaded"] == 0
    assert _chat(client, "Hello", max_tokens=2).usage.completion_tokens == 2  # loads again on demand


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


def test_port_in_use_is_one_line(artifacts):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        r = subprocess.run([EDGEKIT, "serve", str(artifacts["gguf"]), "--port",
                            str(port)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr and "--port" in r.stderr


def test_drafting_serves_the_plain_answers_and_counts_the_predictions(artifacts):
    """--draft (the model as its own draft: every draft is right), --speculative ngram, and a request's
    own predicted output (OpenAI's Predicted Outputs) on a plain server: the greedy answers are plain
    decoding's, and usage says how many drafted tokens were accepted and rejected."""
    from edgekit import api

    prompts = ["Hello there", "numbers: one two three one two three one two"]
    with api.open_backend(artifacts["gguf"], n_ctx=512, flash_attn=True) as local:  # drafting runs flash attention
        want = [_direct(local, [{"role": "user", "content": p}], 24)[0] for p in prompts]
    for extra in (["--draft", str(artifacts["gguf"]), "--n-draft", "4"], ["--speculative", "ngram", "--n-draft", "3"],
                  []):  # a plain server: each request carries its predicted output (the answer itself)
        s = Served([str(artifacts["gguf"]), *extra, "--ctx", "512", "--threads", "2"])
        try:
            assert ("loading tiny-gguf" in "".join(s.lines)) == bool(extra)  # loaded (and checked) before it listened
            c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
            got, accepted = [], 0
            for p, w in zip(prompts, want, strict=True):
                r = _chat(c, p, max_tokens=24, **({} if extra else {"prediction": {"type": "content", "content": w}}))
                details = r.usage.completion_tokens_details
                accepted += details.accepted_prediction_tokens
                assert details.rejected_prediction_tokens >= 0
                got.append(r.choices[0].message.content)
            chunks = list(_chat(c, prompts[0], max_tokens=24, stream=True, stream_options={"include_usage": True},
                                **({} if extra else {"prediction": {"type": "content", "content": want[0]}})))
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want[0]
            assert chunks[-1].usage.completion_tokens_details is not None
        finally:
            assert s.stop() == 0, "".join(s.lines)
        assert got == want, extra
        if "--draft" in extra or not extra:
            assert accepted > 0


def test_a_kv_window_answers_a_conversation_longer_than_the_context(artifacts):
    from edgekit import api

    messages = [{"role": "user", "content": "word " * 400}]  # about 400 tokens: over --ctx 256
    with api.open_backend(artifacts["gguf"], n_ctx=256, kv_window=128, flash_attn=True) as local:  # as serve loads it
        want, st = _direct(local, messages, 16)
    s = Served([str(artifacts["gguf"]), "--ctx", "256", "--kv-window", "128", "--threads", "2"])
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="tiny-gguf", messages=messages, temperature=0, max_tokens=16)
    finally:
        assert s.stop() == 0, "".join(s.lines)
    assert r.usage.prompt_tokens == st.prompt_tokens > 256
    assert r.choices[0].message.content == want and r.usage.completion_tokens == st.generated_tokens > 0


def test_drafting_and_window_refusals_are_one_line(artifacts, tiny_llama):
    gguf, onnx = str(artifacts["gguf"]), str(artifacts["onnx"])
    for args, needle in (([gguf, onnx, "--draft", gguf], "serve that artifact alone"),
                         ([gguf, "--speculative", "ngram", "--parallel", "2"], "add --no-batch"),
                         ([str(tiny_llama), "--kv-window", "128"], "torch backend, which has no --kv-window"),
                         ([gguf, "--speculative", "lookup"], "use 'ngram'"),
                         ([onnx, "--draft", gguf], "an ONNX target drafts with an ONNX model"),
                         ([gguf, "--kv-sinks", "4"], "--kv-sinks needs --kv-window")):
        r = subprocess.run([EDGEKIT, "serve", *args, "--port", "0"], capture_output=True, text=True, timeout=120)
        lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("loading ")]
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, r.stderr)


@pytest.mark.real
def test_real_model_end_to_end(real_gguf):
    s = Served([str(real_gguf), "--max-tokens", "64"])
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        model = real_gguf.stem
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        r = c.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=32)
        chunks = list(c.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=32,
                                                stream=True, stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        from edgekit import api

        with api.open_backend(real_gguf, flash_attn=True) as backend:  # serve's one-sequence instances use it
            want, st = _direct(backend, messages, 32)  # what `edgekit run --temp 0 -n 32 -O flash_attn=true` prints
            assert r.usage.prompt_tokens == len(backend.chat_tokens(messages)) == chunks[-1].usage.prompt_tokens
        assert r.choices[0].message.content == text == want and want.strip()
        assert r.usage.completion_tokens == chunks[-1].usage.completion_tokens
        assert r.choices[0].finish_reason in ("stop", "length")
        assert (r.choices[0].finish_reason == "length") == (r.usage.completion_tokens == 32)
    finally:
        s.stop()


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
