"""OpenAI's request and response shapes, mapped onto edgekit's generation (pure: no I/O, no web stack).

A request body becomes a :class:`Job` (prompt, :class:`SamplingConfig`, streaming options), or raises
:class:`RequestError` with the HTTP status and a message that names the field and what it accepts.
Results become ``chat.completion`` / ``text_completion`` bodies and their streamed chunks. Sampling
follows OpenAI's defaults (temperature 1, top_p 1, no top-k or min-p), not ``edgekit run``'s. A field
that asks for what the server cannot do (tools, JSON mode, log-probabilities, OpenAI's penalties) is a 400
that says what works instead, never ignored; its neutral value (``tool_choice: "none"``, ``logprobs:
false``, a penalty of 0) is accepted.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from edgekit.errors import InputError
from edgekit.runtime.base import GenerationStats, SamplingConfig

MAX_STOP = 4  # OpenAI's limit on stop strings

# The backends' stop reasons as OpenAI's finish_reason: end of sequence and a stop string are both "stop".
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class RequestError(InputError):
    """A request the server refuses: ``status`` is the HTTP status, ``param`` the offending field, ``headers``
    what the response carries besides (a 401's ``WWW-Authenticate``)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        # a 401 is an invalid_request_error with code invalid_api_key, as OpenAI's own is
        kind = {404: "not_found_error", 504: "timeout_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return error_body(str(self), kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class Job:
    """One request, validated: ``prompt`` is a message list (chat) or raw text (completions)."""

    kind: str  # "chat" or "text"
    model: str
    prompt: str | list[dict[str, str]]
    sampling: SamplingConfig
    stream: bool
    include_usage: bool


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise RequestError("the request body nests JSON too deeply; send a flat JSON object") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON ({exc}); send a JSON object with "
                           "Content-Type: application/json") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object, e.g. {\"model\": ..., \"messages\": [...]}")
    return body


def parse_job(kind: str, body: dict[str, Any], max_tokens_cap: int) -> Job:
    """Validate a ``/v1/chat/completions`` (kind ``chat``) or ``/v1/completions`` (``text``) body."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"'model' must be a string, got {type(model).__name__}: one of the ids GET /v1/models "
                           "lists", param="model")
    if not model:
        raise RequestError("'model' is required: one of the ids GET /v1/models lists", param="model")
    prompt = _messages(body.get("messages")) if kind == "chat" else _prompt(body.get("prompt"))
    _refuse_unsupported(kind, body)
    n = body.get("n")
    if n is not None and (n != 1 or isinstance(n, bool)):
        raise RequestError("'n' must be 1: this server returns one choice per request", param="n")
    stream = _typed(body, "stream", bool, False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object such as {\"include_usage\": true}",
                           param="stream_options")
    include_usage = bool(options.get("include_usage", False))
    return Job(kind, model, prompt, _sampling(body, max_tokens_cap), stream, include_usage)


_NO_TOOLS = ("edgekit serve has no tool (function) calling; leave it out, or describe the tools in a system "
             "message and parse the reply yourself")
_NO_JSON = ("edgekit serve has no constrained (JSON) decoding; leave it out or send {\"type\": \"text\"}, and ask "
            "for JSON in the prompt (the reply may then not parse)")
_NO_LOGPROBS = ("this server returns no log-probabilities; leave it out, or score text with `edgekit eval` "
                "(perplexity)")
_PENALTY = ("this server has llama.cpp's repeat penalty instead, so send 'repeat_penalty' (e.g. 1.1; 1.0 is "
            "off) as llama-server takes it, and leave this out (or 0)")

# Fields that ask for something this server cannot do, per endpoint: (is this value the neutral default,
# what works instead). They are refused rather than ignored, since a client would take the answer for what
# it asked (an agent reads prose as its final answer, a scorer reads no log-probabilities as a score).
_UNSUPPORTED: dict[str, dict[str, tuple[Any, str]]] = {
    "chat": {
        "tools": (lambda v: v == [], _NO_TOOLS),
        "tool_choice": (lambda v: v == "none", _NO_TOOLS),
        "functions": (lambda v: v == [], _NO_TOOLS),
        "function_call": (lambda v: v == "none", _NO_TOOLS),
        "response_format": (lambda v: isinstance(v, dict) and v.get("type") == "text", _NO_JSON),
        "logprobs": (lambda v: v is False, _NO_LOGPROBS),
        "top_logprobs": (lambda v: v == 0 and not isinstance(v, bool), _NO_LOGPROBS),
    },
    "text": {
        "logprobs": (lambda v: v is False, _NO_LOGPROBS),
        "echo": (lambda v: v is False, "the reply is the generated text only; leave it out (or false) and "
                                       "prepend the prompt yourself; to score text use `edgekit eval`"),
        "suffix": (lambda v: v == "", "there is no fill-in-the-middle; leave it out and put all the text before "
                                      "the gap in 'prompt'"),
        "best_of": (lambda v: v == 1 and not isinstance(v, bool), "one answer is generated per request; leave it "
                                                                  "out (or 1), or send several requests with "
                                                                  "different seeds and choose yourself"),
    },
}
for _fields in _UNSUPPORTED.values():
    _fields.update({
        "presence_penalty": (lambda v: v == 0 and not isinstance(v, bool), _PENALTY),
        "frequency_penalty": (lambda v: v == 0 and not isinstance(v, bool), _PENALTY),
        "logit_bias": (lambda v: v == {}, "token biases are not applied; leave it out (or send {})"),
    })


def _refuse_unsupported(kind: str, body: dict[str, Any]) -> None:
    """A 400 for the first field that asks for something this server cannot do (null is always the default)."""
    for name, (neutral, instead) in _UNSUPPORTED[kind].items():
        value = body.get(name)
        if value is not None and not neutral(value):
            shown = json.dumps(value)
            shown = f" {shown}" if len(shown) <= 50 else ""  # a tool list would drown the message
            raise RequestError(f"'{name}'{shown} is not supported: {instead}", param=name,
                               code="unsupported_parameter")


def _typed(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python; a JSON true is not a number here
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        want = {bool: "true or false", int: "an integer", (int, float): "a number"}.get(kind, str(kind))
        raise RequestError(f"'{name}' must be {want}, got {json.dumps(value)}", param=name)
    return value


def _sampling(body: dict[str, Any], cap: int) -> SamplingConfig:
    limit = body.get("max_completion_tokens")
    name = "max_completion_tokens"
    if limit is None:
        limit, name = body.get("max_tokens"), "max_tokens"
    limit = _typed({name: limit}, name, int, cap)
    if limit <= 0:
        raise RequestError(f"'{name}' must be > 0, got {limit}", param=name)
    if limit > cap:
        raise RequestError(f"'{name}' is {limit}, above this server's limit of {cap} tokens; ask for fewer, or "
                           "restart the server with a larger --max-tokens", param=name)
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise RequestError(f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them", param="stop")
    temperature = _typed(body, "temperature", (int, float), 1.0)
    top_p = _typed(body, "top_p", (int, float), 1.0)
    if not 0 <= temperature <= 2:
        raise RequestError(f"'temperature' must be in [0, 2] (0 is greedy), got {temperature}", param="temperature")
    if not 0 <= top_p <= 1:
        raise RequestError(f"'top_p' must be in [0, 1] (0 keeps only the most probable token), got {top_p}",
                           param="top_p")
    if top_p == 0:
        # OpenAI takes 0, the limit in which only the most probable token is left; SamplingConfig refuses it
        # (0 would keep nothing), so it is sent as its equivalent, greedy decoding. Temperature 0 rather than
        # top_k 1: every backend honours it, MLC's engine included, which takes no top_k.
        temperature, top_p = 0.0, 1.0
    seed = _typed(body, "seed", int, None)
    # llama-server's extensions, for clients that send them: off unless given
    top_k = _typed(body, "top_k", int, 0)
    min_p = _typed(body, "min_p", (int, float), 0.0)
    repeat_penalty = _typed(body, "repeat_penalty", (int, float), 1.0)
    prediction = _prediction(body.get("prediction"))
    try:
        return SamplingConfig(temperature=float(temperature), top_p=float(top_p), top_k=top_k, min_p=float(min_p),
                              repeat_penalty=float(repeat_penalty),
                              seed=secrets.randbelow(1 << 31) if seed is None else seed & 0x7FFFFFFF, max_tokens=limit,
                              stop=tuple(stops), prediction=prediction)
    except InputError as exc:
        # the CLI's --flag-name is the request's field_name; a negative value keeps its minus sign
        flag = re.search(r"--([a-z][a-z-]*)", str(exc))
        raise RequestError(re.sub(r"--([a-z][a-z-]*)", lambda m: m[1].replace("-", "_"), str(exc)),
                           param=flag[1].replace("-", "_") if flag else None) from None


def _prediction(value: Any) -> str:
    """OpenAI's Predicted Outputs: ``{"type": "content", "content": TEXT or text parts}`` (drafted from)."""
    if value is None:
        return ""
    if not isinstance(value, dict) or value.get("type") != "content":
        raise RequestError("'prediction' must be {\"type\": \"content\", \"content\": \"the expected answer\"}",
                           param="prediction")
    return _content(value.get("content"), "prediction", param="prediction")


def _content(value: Any, where: str, param: str = "messages") -> str:
    """A message's content: a string, or OpenAI's list of parts of which only text parts are taken."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in value):
            raise RequestError(f"{where}: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported",
                               param=param)
        return "".join(p["text"] for p in value)
    raise RequestError(f"{where}: 'content' must be a string or a list of text parts", param=param)


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RequestError("'messages' must be a non-empty list of {\"role\", \"content\"} objects", param="messages")
    out = []
    for i, m in enumerate(value):
        if isinstance(m, dict) and (m.get("role") in ("tool", "function") or m.get("tool_calls")
                                    or m.get("function_call")):
            what = f"a tool result (role '{m['role']}')" if m.get("role") in ("tool", "function") else \
                "a message with tool calls"
            raise RequestError(f"messages[{i}] is {what}, which is not supported: {_NO_TOOLS}", param="messages",
                               code="unsupported_parameter")
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise RequestError(f"messages[{i}]: 'role' must be system, developer, user or assistant",
                               param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _content(m.get("content"), f"messages[{i}]")})
    return out


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str) or not value:
        raise RequestError("'prompt' must be a non-empty string (one prompt per request; token arrays are not "
                           "supported)", param="prompt")
    return value


# -- responses ---------------------------------------------------------------------------------------------

def new_id(job: Job) -> str:
    return ("chatcmpl-" if job.kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(stats: GenerationStats) -> dict[str, Any]:
    """The token counts; with speculative decoding also OpenAI's prediction counts (drafted tokens the model
    accepted, and those it rejected), as its Predicted Outputs report them."""
    out: dict[str, Any] = {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
                           "total_tokens": stats.prompt_tokens + stats.generated_tokens}
    spec = stats.extra.get("speculative")
    if spec:
        accepted = int(spec.get("accepted", 0))
        out["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                            "rejected_prediction_tokens": int(spec.get("drafted", 0)) - accepted}
    return out


def finish_reason(stats: GenerationStats) -> str:
    return FINISH.get(stats.stop_reason, "stop")


def completion(job: Job, rid: str, text: str, stats: GenerationStats) -> dict[str, Any]:
    """The whole (non-streamed) response body."""
    reason = finish_reason(stats)
    if job.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "logprobs": None, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    return {"id": rid, "object": "chat.completion" if job.kind == "chat" else "text_completion",
            "created": int(time.time()), "model": job.model, "choices": [choice], "usage": usage(stats)}


def chunk(job: Job, rid: str, text: str | None, reason: str | None = None, first: bool = False) -> dict[str, Any]:
    """One streamed chunk: a piece of text, or (``reason``) the last one, which carries the finish reason."""
    if job.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
    body = {"id": rid, "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
            "created": int(time.time()), "model": job.model, "choices": [choice]}
    if job.include_usage:
        body["usage"] = None
    return body


def usage_chunk(job: Job, rid: str, stats: GenerationStats) -> dict[str, Any]:
    """With ``stream_options.include_usage``: the chunk after the last, with no choices and the counts."""
    return {"id": rid, "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
            "created": int(time.time()), "model": job.model, "choices": [], "usage": usage(stats)}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()
