"""OpenAI request bodies to edgekit jobs, and results to response bodies (no server, no model)."""

from __future__ import annotations

import json

import pytest

from edgekit.errors import InputError
from edgekit.runtime.base import GenerationStats
from edgekit.runtime.serve import protocol as oai
from edgekit.runtime.serve.protocol import RequestError

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_defaults_follow_openai_not_edgekit_run():
    job = oai.parse_job("chat", CHAT, max_tokens_cap=100)
    s = job.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.max_tokens, s.stop) == (1.0, 1.0, 0, 0.0, 100, ())
    assert not job.stream and not job.include_usage and job.prompt == [{"role": "user", "content": "hi"}]


def test_fields_map_onto_sampling():
    body = {**CHAT, "temperature": 0, "top_p": 0.5, "max_completion_tokens": 7, "max_tokens": 99, "stop": "x",
            "seed": -1, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                         {"role": "user", "content": "q"}]}
    job = oai.parse_job("chat", body, max_tokens_cap=100)
    assert job.sampling.max_tokens == 7 and job.sampling.stop == ("x",) and job.sampling.temperature == 0
    assert job.sampling.seed == 0x7FFFFFFF and job.stream and job.include_usage
    assert job.prompt[0] == {"role": "system", "content": "ab"}
    assert oai.parse_job("text", {"model": "m", "prompt": ["once"]}, 10).prompt == "once"


@pytest.mark.parametrize("change, param", [
    ({"model": None}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
    ({"max_tokens": 101}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": -0.1}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"n": 2}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": "usage"}, "stream_options"),
])
def test_bad_fields_name_the_field(change, param):
    with pytest.raises(RequestError) as info:
        oai.parse_job("chat", {**CHAT, **change}, max_tokens_cap=100)
    assert info.value.status == 400 and info.value.param == param
    assert info.value.body()["error"]["param"] == param


def test_top_p_0_is_greedy():
    """OpenAI takes top_p 0 (only the most probable token is left in the limit); SamplingConfig refuses 0, so
    it is sent as greedy decoding, whatever the temperature. Above 0 it passes as it is."""
    s = oai.parse_job("chat", {**CHAT, "top_p": 0, "temperature": 1.5, "top_k": 40}, 100).sampling
    assert (s.temperature, s.top_p) == (0.0, 1.0)
    assert oai.parse_job("chat", {**CHAT, "top_p": 0.01, "temperature": 1.5}, 100).sampling.top_p == 0.01
    with pytest.raises(RequestError, match="temperature"):  # a bad temperature is still refused
        oai.parse_job("chat", {**CHAT, "top_p": 0, "temperature": 3}, 100)


def test_a_401_is_an_invalid_request_error_with_openais_code():
    exc = RequestError("wrong key", status=401, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    assert exc.body() == {"error": {"message": "wrong key", "type": "invalid_request_error", "param": None,
                                    "code": "invalid_api_key"}}
    assert exc.headers == {"WWW-Authenticate": "Bearer"}


def test_prompt_must_be_one_string():
    for bad in ([1, 2, 3], ["a", "b"], "", None):
        with pytest.raises(RequestError, match="one prompt per request"):
            oai.parse_job("text", {"model": "m", "prompt": bad}, 10)


def test_bodies_that_are_not_objects():
    with pytest.raises(RequestError, match="not valid JSON"):
        oai.parse_body(b"{")
    with pytest.raises(RequestError, match="JSON object"):
        oai.parse_body(b"[1]")


@pytest.mark.parametrize("reason, finish", [("eos", "stop"), ("stop", "stop"), ("length", "length")])
def test_responses_carry_usage_and_finish_reason(reason, finish):
    st = GenerationStats(prompt_tokens=5, generated_tokens=3, stop_reason=reason)
    job = oai.parse_job("chat", {**CHAT, "stream_options": {"include_usage": True}}, 10)
    body = oai.completion(job, "chatcmpl-1", "abc", st)
    assert body["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": "abc"}, "logprobs": None,
                                  "finish_reason": finish}
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    last = oai.chunk(job, "chatcmpl-1", None, reason=oai.finish_reason(st))
    assert last["choices"][0]["delta"] == {} and last["usage"] is None
    event = oai.sse(oai.usage_chunk(job, "chatcmpl-1", st))
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[6:])["usage"]["total_tokens"] == 8


def test_drafted_tokens_are_counted_as_predictions():
    st = GenerationStats(prompt_tokens=5, generated_tokens=9, stop_reason="eos",
                         extra={"speculative": {"mode": "ngram", "drafted": 7, "accepted": 5}})
    usage = oai.usage(st)
    assert usage["completion_tokens_details"] == {"accepted_prediction_tokens": 5, "rejected_prediction_tokens": 2}
    assert "completion_tokens_details" not in oai.usage(GenerationStats(prompt_tokens=1, generated_tokens=1))


def test_a_prediction_is_openais_content_object():
    job = oai.parse_job("chat", {**CHAT, "prediction": {"type": "content", "content": "abc"}}, 10)
    assert job.sampling.prediction == "abc"
    parts = {"type": "content", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    assert oai.parse_job("chat", {**CHAT, "prediction": parts}, 10).sampling.prediction == "ab"
    assert oai.parse_job("chat", CHAT, 10).sampling.prediction == ""
    for bad in ("abc", {"type": "text", "content": "abc"}, {"type": "content", "content": 5},
                {"type": "content", "content": [{"type": "image_url"}]}):
        with pytest.raises(RequestError, match="prediction") as info:
            oai.parse_job("chat", {**CHAT, "prediction": bad}, 10)
        assert info.value.body()["error"]["param"] == "prediction"


def test_deeply_nested_json_is_a_400_not_a_recursion_error():
    with pytest.raises(RequestError, match="nests JSON too deeply"):
        oai.parse_body(b"[" * 100000 + b"]" * 100000)


@pytest.mark.parametrize("ctx", [0, -5, "512", True])
def test_serve_refuses_a_context_no_request_could_use(ctx, tmp_path):
    from edgekit.runtime.serve.config import ServeConfig

    with pytest.raises(InputError, match="--ctx must be a whole number of tokens >= 1"):
        ServeConfig(models={"m": tmp_path}, backend_options={"n_ctx": ctx})


def test_a_model_that_is_not_a_string_says_so():
    with pytest.raises(RequestError, match="'model' must be a string, got int"):
        oai.parse_job("text", {"model": 5, "prompt": "hi"}, 10)


TEXT = {"model": "m", "prompt": "once"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("kind, change, needle", [
    ("chat", {"tools": TOOLS}, "no tool (function) calling"),
    ("chat", {"tool_choice": "required"}, "no tool (function) calling"),
    ("chat", {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool"),
    ("chat", {"functions": [{"name": "get_weather"}]}, "no tool (function) calling"),
    ("chat", {"function_call": "auto"}, "no tool (function) calling"),
    ("chat", {"response_format": {"type": "json_object"}}, "no constrained (JSON) decoding"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "JSON"),
    ("chat", {"logprobs": True}, "no log-probabilities"),
    ("chat", {"top_logprobs": 3}, "no log-probabilities"),
    ("text", {"logprobs": 1}, "no log-probabilities"),
    ("text", {"logprobs": 0}, "no log-probabilities"),  # 0 still asks for the chosen token's
    ("text", {"echo": True}, "prepend the prompt yourself"),
    ("text", {"suffix": " today."}, "no fill-in-the-middle"),
    ("text", {"best_of": 3}, "one answer is generated per request"),
    ("chat", {"presence_penalty": 2.0}, "'repeat_penalty'"),
    ("chat", {"frequency_penalty": -0.5}, "'repeat_penalty'"),
    ("text", {"presence_penalty": 5.0}, "'repeat_penalty'"),  # out of OpenAI's range: refused all the same
    ("chat", {"logit_bias": {"198": -100}}, "token biases are not applied"),
])
def test_a_field_the_server_cannot_honour_is_refused_not_ignored(kind, change, needle):
    """QA 54: these were accepted and ignored with a 200 (prose where a tool call or JSON was asked for,
    no log-probabilities where a scorer wanted them); each is a 400 that names the field and the way out."""
    [(param, _)] = change.items()
    with pytest.raises(RequestError) as info:
        oai.parse_job(kind, {**(CHAT if kind == "chat" else TEXT), **change}, 10)
    error = info.value.body()["error"]
    assert info.value.status == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == "unsupported_parameter"
    assert f"'{param}'" in error["message"] and needle in error["message"]


@pytest.mark.parametrize("kind, neutral", [
    ("chat", {"tool_choice": "none", "tools": [], "response_format": {"type": "text"}, "logprobs": False,
              "top_logprobs": None, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
              "n": None, "parallel_tool_calls": False}),
    ("text", {"logprobs": None, "echo": False, "best_of": 1, "suffix": None, "presence_penalty": 0.0,
              "logit_bias": None, "n": None}),
])
def test_the_neutral_values_of_those_fields_are_accepted(kind, neutral):
    job = oai.parse_job(kind, {**(CHAT if kind == "chat" else TEXT), **neutral}, 10)
    assert job.sampling.repeat_penalty == 1.0 and job.sampling.max_tokens == 10


def test_n_null_means_the_default():
    assert oai.parse_job("chat", {**CHAT, "n": None}, 10).kind == "chat"
    for bad in (0, 2, True, "1"):
        with pytest.raises(RequestError, match="'n' must be 1"):
            oai.parse_job("chat", {**CHAT, "n": bad}, 10)


@pytest.mark.parametrize("message, what", [
    ({"role": "tool", "tool_call_id": "c1", "content": "sunny"}, "a tool result (role 'tool')"),
    ({"role": "function", "name": "get_weather", "content": "sunny"}, "a tool result (role 'function')"),
    ({"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
      "function": {"name": "get_weather", "arguments": "{}"}}]}, "a message with tool calls"),
])
def test_a_tool_round_trip_says_tools_are_unsupported(message, what):
    """Not the generic 'role must be ...' / 'content must be a string' errors: the client learns why."""
    body = {**CHAT, "messages": [{"role": "user", "content": "Weather?"}, message]}
    with pytest.raises(RequestError) as info:
        oai.parse_job("chat", body, 10)
    assert str(info.value).startswith(f"messages[1] is {what}, which is not supported")
    assert "no tool (function) calling" in str(info.value) and info.value.param == "messages"


def test_repeat_penalty_is_read_and_checked_as_the_cli_checks_it():
    """llama-server's extension, like top_k and min_p: what a client sends instead of OpenAI's penalties."""
    assert oai.parse_job("chat", {**CHAT, "repeat_penalty": 1.3}, 10).sampling.repeat_penalty == 1.3
    assert oai.parse_job("text", {**TEXT, "repeat_penalty": 1}, 10).sampling.repeat_penalty == 1.0
    for bad, needle in ((0, "repeat_penalty must be a finite number > 0"), (-1.1, "> 0"),
                        ("1.1", "'repeat_penalty' must be a number"), (True, "must be a number")):
        with pytest.raises(RequestError, match=needle) as info:
            oai.parse_job("chat", {**CHAT, "repeat_penalty": bad}, 10)
        assert info.value.param == "repeat_penalty" and "--" not in str(info.value)
