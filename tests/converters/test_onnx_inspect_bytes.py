"""inspect on ONNX: each type's bytes are what the file stores for it (scales in the graph's float type, zero
points where the graph has them), the weights are those bytes and the bits per weight are them over every
parameter, norms included, as GGUF's are (tensor bytes over parameters); the file size stays the file size."""

from __future__ import annotations

import math

import pytest

from edgekit import api
from edgekit.converters.formats.base import ConvertRecipe

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

CASES = [
    ("LlamaForCausalLM", dict(bits=4)),                                  # fp32 graph: fp32 scales, int8 table
    ("LlamaForCausalLM", dict(bits=4, dtype="fp16", symmetric=True, lm_head="int4")),
    ("Qwen2ForCausalLM", dict(bits=4)),                                  # tied: one shared table, qkv biases
    ("Qwen2ForCausalLM", dict(bits=8, embed="int8", lm_head="float")),
]


def stored_weight_bytes(model_file) -> tuple[dict[str, int], int]:
    """Bytes of the initializers that hold parameters, read from the file: by quantized op (codes, scales,
    zero points) and the float ones (norms, biases, float matrices); rotary tables and constants left out."""
    from onnx import numpy_helper

    m = onnx.load(str(model_file), load_external_data=True)
    arrays = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    init = {k: a.nbytes for k, a in arrays.items()}
    quant, seen = {}, set()
    for n in m.graph.node:
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            names = [i for i in n.input if i in init and i not in seen]
            seen.update(names)
            quant[n.name] = sum(init[i] for i in names)
    floats = sum(a.nbytes for k, a in arrays.items() if k not in seen and not k.startswith("rotary.")
                 and a.dtype.kind == "f" and a.size > 1)  # scalar constants of the norms left out
    return quant, floats


@pytest.mark.parametrize("arch,opts", CASES, ids=lambda c: str(c))
def test_onnx_type_bytes_and_bpw_are_the_stored_weights(tiny_models, tmp_path, arch, opts):
    src = tiny_models[arch]
    opts = dict(opts)
    bits = opts.pop("bits")
    art = api.convert(src, "onnx", output=tmp_path / "o", recipe=ConvertRecipe(bits=bits, extra=opts))
    info = api.inspect(art.path)
    quant, floats = stored_weight_bytes(art.model_file)
    stored = sum(quant.values()) + floats
    assert info["weight_bytes"] == stored == sum(info["type_bytes"].values())
    assert sum(v for k, v in info["type_bytes"].items() if not k.startswith("FP")) == sum(quant.values())
    assert info["n_params"] == art.manifest["source"]["n_params"]  # norms (and biases) counted, as GGUF's
    assert info["bpw"] == round(8 * stored / info["n_params"], 4)
    files = sum(f.stat().st_size for f in art.path.glob("model.onnx*"))
    assert info["file_bytes"] == files > info["weight_bytes"]  # the graph and its rotary tables besides
    assert info["memory"]["weights"] == info["weight_bytes"]


def test_default_4bit_graph_stores_fp32_scales(tiny_llama, tmp_path):
    """The report's case: UINT4_B32 in an fp32 graph is 4 + 32/32 + 4/32 = 5.125 bits a weight (not 4.625, fp16
    scales), the int8 table 8 + 1 + 0.25 = 9.25 (fp32 scales and its zero points)."""
    art = api.convert(tiny_llama, "onnx", output=tmp_path / "o", recipe=ConvertRecipe(bits=4))
    info = api.inspect(art.path)
    n = {k: sum(math.prod(t["shape"]) for t in info["tensors"] if t["type"] == k) for k in info["type_bytes"]}
    assert 8 * info["type_bytes"]["UINT4_B32"] / n["UINT4_B32"] == 5.125
    assert 8 * info["type_bytes"]["INT8_B32"] / n["INT8_B32"] == 9.25
