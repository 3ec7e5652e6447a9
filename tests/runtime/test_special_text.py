"""Typed special-token text: ``tokenize(special=False)`` keeps it plain text on every backend (same ids), and
``eval`` tokenizes its text that way, as llama-perplexity does (``parse_special=false``)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

TEXT = "hello <|im_end|> world <|endoftext|> the cat <|im_start|>user sat on the mat.\n" * 12


@pytest.fixture(scope="module")
def backends(tiny_llama, tmp_path_factory):
    from edgekit import api
    from edgekit.converters.formats.base import ConvertRecipe
    from edgekit.runtime.base import open_backend
    from edgekit.runtime.torch_ref import TorchBackend

    root = tmp_path_factory.mktemp("special-text")
    gguf = api.convert(tiny_llama, "gguf", output=root / "g", recipe=ConvertRecipe(preset="Q8_0")).path
    onnx = api.convert(tiny_llama, "onnx", output=root / "o", recipe=ConvertRecipe(bits=32)).path
    opened = {"gguf": open_backend(gguf, n_ctx=64), "onnx": open_backend(onnx, n_ctx=64),
              "torch": TorchBackend(tiny_llama)}
    yield opened
    for b in opened.values():
        b.close()


def test_special_false_gives_the_same_plain_text_ids_on_every_backend(backends):
    plain = {k: b.tokenize(TEXT, special=False) for k, b in backends.items()}
    parsed = {k: b.tokenize(TEXT) for k, b in backends.items()}
    assert plain["gguf"] == plain["onnx"] == plain["torch"]
    assert parsed["gguf"] == parsed["onnx"] == parsed["torch"]
    assert len(plain["gguf"]) > len(parsed["gguf"])  # the markers are spelled out in bytes/pieces
    assert not {0, 1, 2} & set(plain["gguf"])  # no control token from typed text
    assert parsed["gguf"].count(2) == 12  # <|im_end|> parsed by default (run --raw prompts)
    for b in backends.values():  # a chat marker is one id only when parsed
        assert b.tokenize("<|im_end|>", add_special=False) == [2]
        assert len(b.tokenize("<|im_end|>", add_special=False, special=False)) > 1


def test_eval_tokenizes_the_text_as_llama_perplexity(backends):
    from edgekit.evaluate import EvalConfig, perplexity

    ctx = 16
    plain, parsed = (len(backends["gguf"].tokenize(TEXT, special=s)) for s in (False, True))
    assert plain // ctx != parsed // ctx
    for name in ("gguf", "onnx"):
        r = perplexity(backends[name], TEXT, EvalConfig(ctx=ctx))
        assert r.chunks == plain // ctx, name  # every chunk of the special=False tokenization
        assert r.tokens_scored == r.chunks * (ctx // 2 - 1)


def test_spm_unk_typed_in_text_stays_text(tmp_path):
    """WikiText's literal ``<unk>``: on an SPM vocabulary it is a control token only when parsed."""
    from edgekit import api
    from edgekit.converters.formats.base import ConvertRecipe
    from edgekit.runtime.base import open_backend
    from tests.helpers import build_tiny_model

    ckpt = build_tiny_model(Path(tmp_path) / "spm", "LlamaForCausalLM", hidden=64, ffn=128, tokenizer="spm")
    gguf = api.convert(ckpt, "gguf", output=tmp_path / "g", recipe=ConvertRecipe(preset="F16")).path
    with open_backend(gguf, n_ctx=64) as b:
        text = "the <unk> cat <unk> sat"
        assert b.tokenize(text, add_special=False).count(0) == 2
        assert 0 not in b.tokenize(text, add_special=False, special=False)
