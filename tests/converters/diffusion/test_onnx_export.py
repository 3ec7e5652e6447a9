"""The diffusion ONNX exporter and pipeline conversion, on tiny UNets built in the test."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("diffusers")
ort = pytest.importorskip("onnxruntime")

from edgekit.converters.diffusion.convert import convert_pipeline  # noqa: E402
from edgekit.converters.diffusion.export import EXPORTERS  # noqa: E402
from edgekit.converters.diffusion.pipeline import open_pipeline  # noqa: E402
from edgekit.errors import InputError, OutputExistsError, UnsupportedError  # noqa: E402
from tests.converters.diffusion.qtiny import (  # noqa: E402
    dequantized_unet,
    install_rtn_quantizer,
    pipeline16,
    rtn_weights,
)

X = np.random.default_rng(1).standard_normal((3, 1, 16, 16)).astype(np.float32)
T = np.array([3, 999, 40], np.int64)
C = np.array([0, 9, 4], np.int64)


def _export(tmp_path, conditional=True, weights_fn=None, options=None, name="out"):
    pipe = open_pipeline(pipeline16(tmp_path / f"pipe{int(conditional)}", conditional))
    unet = pipe.load_unet()
    weights = weights_fn(unet) if weights_fn else None
    out = tmp_path / name
    out.mkdir()
    fields = EXPORTERS.get("onnx")().export(pipe, unet, weights, out, options or {}, lambda *a: None)
    return unet, weights, out, fields


def _run(path, conditional=True, fold=False, **extra):
    so = ort.SessionOptions()
    if fold:  # DequantizeLinear folded into float weights at load (the runtime's default)
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    else:  # per step: int8 DQ+MatMul stays float (onnxruntime otherwise quantizes activations in MatMulNBits)
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    feed = {"sample": X, "timestep": T, **({"class_labels": C} if conditional else {}), **extra}
    return ort.InferenceSession(str(path), so).run(None, feed)


def _torch(unet, conditional=True):
    import torch

    with torch.no_grad():
        return unet(torch.from_numpy(X), torch.from_numpy(T),
                    class_labels=torch.from_numpy(C) if conditional else None).sample.numpy()


@pytest.mark.parametrize("conditional", [True, False])
def test_float_graph_equals_pytorch_and_shallow_with_fresh_cache_equals_full(tmp_path, conditional):
    unet, _, out, fields = _export(tmp_path, conditional)
    full, cache = _run(out / "unet.onnx", conditional)
    np.testing.assert_allclose(full, _torch(unet, conditional), atol=2e-5)
    shallow = _run(out / "unet_shallow.onnx", conditional, cache=cache)[0]
    np.testing.assert_allclose(shallow, full, atol=1e-6)
    # a stale cache changes the output: the shallow graph really reads it
    assert np.abs(_run(out / "unet_shallow.onnx", conditional, cache=cache * 0.5)[0] - full).max() > 1e-3
    assert fields["files"] == {"model": "unet.onnx", "shallow": "unet_shallow.onnx", "data": "unet.onnx.data"}
    assert fields["graphs"]["shallow"]["shared_tensors"] > 0  # its weights are the main graph's bytes
    assert fields["deepcache"]["cache_shape"] == list(cache.shape[1:])
    names = [i.name for i in ort.InferenceSession(str(out / "unet.onnx")).get_inputs()]
    assert names == ["sample", "timestep"] + (["class_labels"] if conditional else [])


@pytest.mark.parametrize("bits,block,signed,lowrank,graph,fp16", [
    (8, None, True, 0, "merged", True), (8, None, True, 0, "merged", False), (4, 8, True, 0, "merged", True),
    (4, 8, False, 0, "merged", True), (4, None, True, 0, "merged", True), (4, 8, True, 2, "merged", True),
    (4, 8, True, 2, "branch", True)])
def test_quantized_graph_equals_dequantized_pytorch(tmp_path, bits, block, signed, lowrank, graph, fp16):
    unet, weights, out, fields = _export(tmp_path, options={"lowrank_graph": graph},
                                         weights_fn=lambda u: rtn_weights(u, bits, block, signed, lowrank, fp16))
    want = _torch(dequantized_unet(unet, weights))
    full, cache = _run(out / "unet.onnx")
    np.testing.assert_allclose(full, want, atol=2e-4)
    np.testing.assert_allclose(_run(out / "unet.onnx", fold=True)[0], want, atol=2e-4)
    np.testing.assert_allclose(_run(out / "unet_shallow.onnx", cache=cache)[0], full, atol=1e-6)
    kind = ("INT" if signed else "UINT") + str(bits)
    assert fields["weight_storage"][kind] >= len(weights)
    # float16: the scales when float16 holds them, two low-rank factors per weight (per consumer as a branch)
    assert fields["weight_storage"].get("FLOAT16", 0) >= (len(weights) if fp16 else 0) + 2 * len(weights) * bool(lowrank)


def test_files_shrink_with_bits(tmp_path):
    sizes, n_quantized = {}, 0
    for bits in (32, 8, 4):
        fn = None if bits == 32 else (lambda u, b=bits: rtn_weights(u, b))
        _, weights, out, fields = _export(tmp_path, weights_fn=fn, options={"deepcache": False}, name=f"b{bits}")
        sizes[bits] = os.path.getsize(out / "unet.onnx")
        assert fields["size_bytes"] == sizes[bits] and "shallow" not in fields["files"]
        n_quantized = sum(qw.q.size for qw in (weights or {}).values()) or n_quantized
    # a tiny UNet's graph (its nodes) outweighs its weights, so the bytes saved are what is checked:
    # 3 of 4 bytes per weight at 8 bits, half of the rest at 4 bits (minus the scales)
    assert sizes[32] - sizes[8] > 0.7 * 3 * n_quantized
    assert sizes[8] - sizes[4] > 0.45 * n_quantized


def test_convert_pipeline_writes_a_checked_artifact(tmp_path, monkeypatch):
    from edgekit.artifact import Artifact

    install_rtn_quantizer(monkeypatch)
    src = pipeline16(tmp_path / "pipe")
    art = convert_pipeline(src, "onnx", output=tmp_path / "art", bits=8)
    m = art.manifest
    assert m["task"] == "diffusion" and m["bits"] == 8 and m["preset"] == "w8"
    assert m["sampler"] == {"sampler": "ddim", "steps": 4, "origin_steps": 50}
    assert set(m["sha256"]) == {"unet.onnx", "unet.onnx.data", "unet_shallow.onnx", "scheduler_config.json",
                                "edgekit_diffusion.json"}
    assert json.loads((art.path / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    Artifact.open(art.path, verify=True)
    with pytest.raises(OutputExistsError):
        convert_pipeline(src, "onnx", output=tmp_path / "art", bits=8)
    again = convert_pipeline(src, "onnx", output=tmp_path / "art", bits=16, force=True)
    assert again.manifest["bits"] == 32 and set(again.manifest["weight_storage"]) == {"FLOAT"}
    (tmp_path / "mine").mkdir()
    with pytest.raises(OutputExistsError):  # a folder that is not an artifact is never replaced
        convert_pipeline(src, "onnx", output=tmp_path / "mine", bits=16, force=True)


def test_convert_refuses_what_it_cannot_do(tmp_path, monkeypatch):
    src = pipeline16(tmp_path / "pipe")
    monkeypatch.setitem(__import__("sys").modules, "edgekit.converters.diffusion.quantize", None)
    with pytest.raises(UnsupportedError, match="--bits 16"):
        convert_pipeline(src, "onnx", output=tmp_path / "a", bits=4)
    with pytest.raises(InputError, match="--bits 3|diffusion weight width"):
        convert_pipeline(src, "onnx", output=tmp_path / "a", bits=12)
    with pytest.raises(InputError, match="deepcache"):
        convert_pipeline(src, "onnx", output=tmp_path / "a", bits=16, options={"nonsense": 1})
    with pytest.raises(UnsupportedError, match="unknown diffusion format"):
        convert_pipeline(src, "gguf", output=tmp_path / "a", bits=16)
    assert not (tmp_path / "a").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".a")]
