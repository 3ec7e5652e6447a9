"""`edgekit serve` as a client sees it: what it answers (chat, text, streams, stop strings, seeds, errors,
concurrent and drafted answers, the ONNX backend, a KV window), from the real server in a subprocess on a
free loopback port, tiny GGUF and ONNX artifacts built here (conftest.py), the real `openai` client (and
httpx where the client hides the status). Its lifecycle (disconnects, timeouts, signals) is in
test_serve_lifecycle.py."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.runtime.served import EDGEKIT, KEY, MAX_BODY, MAX_TOKENS, Served, health

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

pytestmark = pytest.mark.llamacpp

ORIGIN = "http://ui.example:3000"  # the one page origin the server lets call it (--cors)


@pytest.fixture(scope="module")
def server(artifacts) -> Iterator[Served]:
    # --exact-batch: batched answers must equal the answers alone (test_concurrent_streams_each_get_their_own_answer)
    s = Served([str(artifacts["gguf"]), str(artifacts["onnx"]), str(artifacts["broken"]), "--api-key", KEY, "--parallel", "2",
                "--max-tokens", str(MAX_TOKENS), "--max-body", str(MAX_BODY), "--idle-unload", "3", "--threads", "2",
                "--ctx", "512", "--exact-batch", "--cors", ORIGIN])
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


def test_a_401_is_openais_with_a_bearer_challenge(server):
    """QA 54: the 401 said type authentication_error, where OpenAI's says invalid_request_error (code
    invalid_api_key), and carried no WWW-Authenticate (RFC 6750)."""
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        _chat(wrong, "Hi", max_tokens=2)
    assert info.value.body == {"message": info.value.body["message"], "type": "invalid_request_error", "param": None,
                               "code": "invalid_api_key"}
    assert info.value.response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    r = httpx.get(server.url + "/v1/models")  # no key at all: the bare challenge
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "invalid_request_error"


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


def test_top_p_0_keeps_only_the_most_probable_token(client, local):
    """QA 54: top_p 0 was a 400, where OpenAI takes 0..1; it is now the limit it stands for, greedy decoding,
    whatever the temperature and seed."""
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    want, _ = _direct(local, messages, 12)
    for seed in (1, 2):
        r = client.chat.completions.create(model="tiny-gguf", messages=messages, max_tokens=12, temperature=1.5,
                                           top_p=0, seed=seed)
        assert r.choices[0].message.content == want
    r = client.completions.create(model="tiny-gguf", prompt="The weather today", max_tokens=10, top_p=0, seed=3)
    assert r.choices[0].text == _direct(local, "The weather today", 10)[0]


def _preflight(server, origin: str, headers: str = "authorization, content-type") -> httpx.Response:
    return httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": headers})


def test_cors_preflight_needs_no_key_and_answers_only_the_named_origin(server):
    """QA 54: OPTIONS was a 405 with no CORS headers, so a browser chat UI from another origin could not call
    the server. With --cors ORIGIN its preflight is answered (browsers send it without the key)."""
    asked = "authorization, content-type, x-stainless-arch, x-stainless-lang, x-stainless-retry-count"
    r = _preflight(server, ORIGIN, asked)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert {m.strip() for m in r.headers["access-control-allow-methods"].split(",")} == {"GET", "POST", "OPTIONS"}
    assert r.headers["access-control-allow-headers"] == asked and int(r.headers["access-control-max-age"]) > 0
    # another page (a site the user happens to visit) gets no CORS header, so its browser refuses
    for other in ("http://evil.example", "http://ui.example:3001", "https://ui.example:3000"):
        r = _preflight(server, other)
        assert r.status_code == 400 and r.json()["error"]["code"] == "cors_refused", other
        assert not [h for h in r.headers if h.startswith("access-control-")], (other, r.headers)


def test_cors_answers_to_the_named_origin_carry_its_header(server):
    """Every answer to an allowed origin carries Access-Control-Allow-Origin and Vary: Origin: a stream, an
    answer, a 401 (its page can show why), an error; a request still needs the key."""
    body = {"model": "tiny-gguf", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
    auth = {"Authorization": f"Bearer {KEY}", "Origin": ORIGIN}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, headers=auth,
                      timeout=60) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and events[-1] == "data: [DONE]"
        assert r.headers["access-control-allow-origin"] == ORIGIN and "Origin" in r.headers["vary"]
    answers = [httpx.post(server.url + "/v1/chat/completions", json=body, headers=auth, timeout=60),
               httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Origin": ORIGIN}),
               httpx.post(server.url + "/v1/chat/completions", json={**body, "model": "nope"}, headers=auth),
               httpx.get(server.url + "/v1/models", headers=auth)]
    assert [r.status_code for r in answers] == [200, 401, 404, 200]
    for r in answers:
        assert r.headers["access-control-allow-origin"] == ORIGIN and "Origin" in r.headers["vary"], r.request
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}", "Origin": "http://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})  # no Origin: not a browser
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


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


def test_a_streamed_prompt_over_the_context_is_a_400_too(server, client):
    """QA 54: a stream used to start (200, a role chunk) and then carry the overflow as an error event,
    which the client raises as a generic APIError; the status line now waits for the backend's verdict."""
    long = "word " * 600
    with pytest.raises(openai.BadRequestError, match="context holds 512") as info:
        _chat(client, long, max_tokens=4, stream=True)
    assert info.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match="context holds 512"):
        client.completions.create(model="tiny-gguf", prompt=long, max_tokens=4, stream=True)
    body = {"model": "tiny-gguf", "messages": [{"role": "user", "content": long}], "max_tokens": 4, "stream": True}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.headers["content-type"] == "application/json", r.text
    text, chunks = _stream_text(client, "Hello", max_tokens=3)  # a prompt that fits streams as before
    assert chunks[0].choices[0].delta.role == "assistant" and text


def test_what_the_server_cannot_do_is_a_400_the_client_raises(server, client):
    """QA 54: tools, JSON mode and log-probabilities were ignored with a 200, so an agent took prose for its
    final answer and `parse` failed on it; now the client raises BadRequestError naming the field."""
    import pydantic

    class Person(pydantic.BaseModel):
        name: str

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    refused = [
        ("tools", lambda: _chat(client, "Weather in Paris?", tools=tools, max_tokens=2)),
        ("tools", lambda: _chat(client, "Weather in Paris?", tools=tools, max_tokens=2, stream=True)),
        ("response_format", lambda: client.chat.completions.parse(
            model="tiny-gguf", messages=[{"role": "user", "content": "Alice"}], response_format=Person, max_tokens=2)),
        ("logprobs", lambda: _chat(client, "Hi", logprobs=True, top_logprobs=2, max_tokens=2)),
        ("presence_penalty", lambda: _chat(client, "Hi", presence_penalty=2.0, max_tokens=2)),
        ("logit_bias", lambda: _chat(client, "Hi", logit_bias={"198": -100}, max_tokens=2)),
        ("echo", lambda: client.completions.create(model="tiny-gguf", prompt="The sky is", echo=True, max_tokens=1)),
        ("best_of", lambda: client.completions.create(model="tiny-gguf", prompt="The sky is", best_of=3,
                                                      max_tokens=1)),
        ("messages", lambda: client.chat.completions.create(model="tiny-gguf", max_tokens=2, messages=[
            {"role": "user", "content": "Weather?"}, {"role": "tool", "tool_call_id": "c1", "content": "sunny"}])),
    ]
    for param, call in refused:
        with pytest.raises(openai.BadRequestError, match="not supported") as info:
            call()
        assert info.value.body["param"] == param and info.value.body["code"] == "unsupported_parameter", param
    # their neutral values, n null and llama-server's repeat_penalty are answered
    r = _chat(client, "Hi", max_tokens=2, tool_choice="none", response_format={"type": "text"}, logprobs=False,
              presence_penalty=0, frequency_penalty=0, logit_bias={}, extra_body={"repeat_penalty": 1.1, "n": None})
    assert r.usage.completion_tokens == 2


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
    assert health(server)["models"]["tiny-broken"] == {"loaded": 0, "busy": 0, "loading": 0, "waiting": 0}
    assert _chat(client, "Hello", max_tokens=3).usage.completion_tokens == 3  # the others still answer


def test_unknown_model_through_the_client(client):
    with pytest.raises(openai.NotFoundError, match="tiny-gguf"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


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
    assert health(server)["models"]["tiny-gguf"]["loaded"] >= 1
    end = time.monotonic() + 30
    while health(server)["models"]["tiny-gguf"]["loaded"] and time.monotonic() < end:
        time.sleep(0.2)
    assert health(server)["models"]["tiny-gguf"]["loaded"] == 0
    assert _chat(client, "Hello", max_tokens=2).usage.completion_tokens == 2  # loads again on demand


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
                         ([onnx, "--draft", gguf], "a draft must be ONNX like the target"),
                         ([gguf, "--kv-sinks", "4"], "--kv-sinks needs --kv-window")):
        r = subprocess.run([EDGEKIT, "serve", *args, "--port", "0"], capture_output=True, text=True, timeout=120)
        lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("loading ")
                 and "CPUs are busy with other programs" not in ln]  # a loaded host says so too
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

