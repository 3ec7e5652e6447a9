"""``edgekit serve``'s token limit against its context: a server-wide --max-tokens above --ctx could never be
reached, so it is refused when the config is built (the CLI exits 2 with it: tests/edgekit/test_serve_s55_cli.py);
a request whose prompt leaves less room than its max_tokens is answered up to the context's end with
finish_reason "length", as README's serve section and the backends' context cut have it (llama-server does
the same; OpenAI's 400 would refuse the large max_tokens that chat UIs send by default)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekit.errors import InputError
from edgekit.runtime.serve.config import ServeConfig


def test_a_max_tokens_above_the_context_is_refused_with_the_fix(tmp_path):
    with pytest.raises(InputError) as info:
        ServeConfig(models={"m": tmp_path}, max_tokens=4096, backend_options={"n_ctx": 1024})
    message = str(info.value)
    assert "\n" not in message
    assert "--max-tokens 4096 can never be reached with --ctx 1024" in message
    assert "give --max-tokens 1024 or less" in message and "--kv-window" in message


def test_a_model_whose_own_context_is_smaller_is_refused_too(tmp_path):
    with pytest.raises(InputError, match="--ctx 256"):
        ServeConfig(models={"a": tmp_path, "b": tmp_path}, max_tokens=512, backend_options={"n_ctx": 1024},
                    model_options={"b": {"n_ctx": 256}})


@pytest.mark.parametrize("options", [{"n_ctx": 2048}, {"n_ctx": 256, "kv_window": 128}, {}])
def test_what_can_be_reached_is_accepted(tmp_path, options):
    """Equal to the context (the defaults), past it with a KV window, and no context named (the backend's)."""
    assert ServeConfig(models={"m": tmp_path}, max_tokens=2048, backend_options=options).max_tokens == 2048


@pytest.mark.llamacpp
def test_a_request_past_the_context_is_answered_to_its_end_with_length(endless: Path):
    """The model never ends by itself (conftest's ``endless``): the context's end is what stops it."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from edgekit import api
    from edgekit.runtime.serve.app import create_app

    ctx = 64
    config = ServeConfig(models={"m": endless}, max_tokens=ctx, backend_options={"n_ctx": ctx, "n_threads": 1},
                         idle_unload=0)
    body = {"model": "m", "prompt": "Once upon a time", "max_tokens": ctx, "temperature": 0}
    with TestClient(create_app(config, api.open_backend)) as c:
        r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert usage["total_tokens"] == ctx and 0 < usage["completion_tokens"] < ctx, usage
