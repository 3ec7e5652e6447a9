"""Calibrated quantization (GPTQ, importance matrix) through the layer-sequential pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit import api
from edgekit.calibration import CalibConfig
from edgekit.converters.formats.gguf import GGUFFormat
from edgekit.model import HFCheckpoint
from edgekit.quickstart import sample_text_path

CALIB = CalibConfig(samples=6, seqlen=64)


def _convert_with(model, tmp_path, method, preset):
    quantizer = api.make_quantizer(method, CALIB)
    out = tmp_path / f"{method}-{preset}"
    out.mkdir()
    GGUFFormat().convert(HFCheckpoint.open(model), out, api.ConvertRecipe(bits=None, preset=preset), quantizer)
    return quantizer, out / "model.gguf"


@pytest.mark.parametrize("preset", ["Q4_0", "Q4_K_M", "Q3_K_M"])
def test_gptq_lowers_every_layers_output_error(tiny_llama, tmp_path, preset):
    """Same calibration data, same grid: GPTQ's Hessian-weighted error is below round-to-nearest's."""
    gptq, _ = _convert_with(tiny_llama, tmp_path, "gptq", preset)
    rtn, _ = _convert_with(tiny_llama, tmp_path, "imatrix", preset)
    g, r = gptq.report["hessian_error"], rtn.report["hessian_error"]
    for layer in g:
        assert sum(g[layer].values()) < 0.8 * sum(r[layer].values()), (layer, g[layer], r[layer])
    # Layer 0 sees identical inputs in both runs: every linear improves on its own.
    assert all(g["0"][n] < r["0"][n] for n in g["0"]), (g["0"], r["0"])


@pytest.mark.parametrize(("method", "preset"), [("gptq", "Q4_0"), ("gptq", "Q4_K_M"), ("awq+gptq", "Q4_K_M"),
                                                ("awq", "Q4_0")])
def test_file_holds_exactly_the_weights_the_method_chose(tiny_llama, tmp_path, method, preset):
    """Every tensor, norms rescaled by AWQ included, is exactly what the PyTorch model now carries."""
    from tests.helpers import assert_gguf_holds_model

    quantizer, path = _convert_with(tiny_llama, tmp_path, method, preset)
    assert_gguf_holds_model(tiny_llama, path, quantizer.model)


@pytest.mark.llamacpp
def test_llamacpp_runs_gptq_file_like_pytorch_with_same_weights(tiny_llama, tmp_path):
    from edgekit.runtime.llamacpp import LlamaCppBackend

    quantizer, path = _convert_with(tiny_llama, tmp_path, "gptq", "Q4_K_M")
    text = sample_text_path().read_text()[:400]
    with LlamaCppBackend(path, n_ctx=128) as b:
        tokens = b.tokenize(text)[:96]
        logits = b.logits(tokens)
    import torch

    with torch.inference_mode():
        expected = quantizer.model(torch.tensor([tokens])).logits[0].numpy()
    assert np.linalg.norm(logits - expected) / np.linalg.norm(expected) < 0.06


def test_manifest_records_method_and_calibration(tiny_llama, tmp_path):
    recipe = api.ConvertRecipe(bits=4, method="gptq", calib=CALIB)
    art = api.convert(tiny_llama, "gguf", output=tmp_path / "a", recipe=recipe)
    r = art.manifest["recipe"]
    assert r["method"] == "gptq" and r["calib"]["source"] == "self" and r["calib"]["samples"] == 6
    assert r["quantizer"]["sink_weight"] == 10.0 and r["quantizer"]["steps"] == [{"step": "gptq", "damp": 0.01, "imatrix": True, "tied_head": False, "act_order": True}]
    assert art.manifest["quantizer_report"]["total_s"] > 0


def test_calibration_from_a_text_file(tiny_llama, tmp_path):
    recipe = api.ConvertRecipe(bits=None, preset="Q4_0", method="gptq",
                               calib=CalibConfig(source=str(sample_text_path()), samples=4, seqlen=64))
    art = api.convert(tiny_llama, "gguf", output=tmp_path / "a", recipe=recipe)
    assert art.manifest["recipe"]["calib"]["source"].endswith("sample.txt")


def test_text_windows_tile_the_text_before_any_repeats(tmp_path):
    """Windows of a text file are consecutive cuts taken in a random order: as many as the text holds come
    out disjoint; asking for more adds a cut from another offset; the same seed gives the same windows."""
    from edgekit.calibration import from_text

    n_tokens, seqlen = 1000, 64
    (tmp_path / "t.txt").write_text(" ".join(map(str, range(n_tokens))))

    def tok(text, add_special_tokens):  # noqa: ARG001 - the tokenizer's signature
        return {"input_ids": [int(w) for w in text.split()]}

    def windows(samples, seed=0):
        return from_text(tok, CalibConfig(source=str(tmp_path / "t.txt"), samples=samples, seqlen=seqlen, seed=seed))

    ids = windows(14)  # a cut from any offset holds at least 14 windows of 64 of these 1000 tokens
    assert ids.shape == (14, seqlen)
    assert all((row == row[0] + np.arange(seqlen)).all() for row in ids.numpy())  # each a contiguous span
    starts = ids[:, 0].numpy()
    assert (np.diff(np.sort(starts)) >= seqlen).all() and len(set(starts % seqlen)) == 1  # one cut: none overlaps
    assert not (starts == np.sort(starts)).all()  # taken in a random order
    more = windows(40)
    assert more.shape == (40, seqlen) and len(set(more[:, 0].tolist())) >= 28  # further cuts, other offsets
    assert (windows(14) == ids).all() and not (windows(14, seed=1) == ids).all()


def test_sdk_reaches_every_method_setting(tiny_llama, tmp_path):
    """api.convert(quantize=...) takes a method's own config: its settings reach the quantizer and the
    manifest, and its method replaces the recipe's."""
    from edgekit import api
    from edgekit.calibration import CalibConfig
    from edgekit.converters.quantize.gptq import GPTQConfig

    cfg = GPTQConfig(damp=0.05, sink_weight=3.0, calib=CalibConfig(samples=2, seqlen=32))
    art = api.convert(tiny_llama, "gguf", output=tmp_path / "g", recipe=api.ConvertRecipe(bits=4, method="rtn"),
                      quantize=cfg)
    q = art.manifest["recipe"]["quantizer"]
    assert art.manifest["recipe"]["method"] == "gptq" and q["damp"] == 0.05 and q["sink_weight"] == 3.0
    assert q["calib"]["samples"] == 2
