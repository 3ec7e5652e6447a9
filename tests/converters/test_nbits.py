"""MatMulNBits grids: the kernel's verbs, and the tensor layout checked against onnxruntime itself."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.converters.quantize import gptq_kernel, nbits
from edgekit.converters.quantize.nbits import NBitsType
from edgekit.errors import InputError, UnsupportedError

GRIDS = [NBitsType(b, bs, s) for b in (4, 8) for bs in (16, 32, 128) for s in (True, False)]


def _weights(n: int = 24, k: int = 384, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, k)) * rng.uniform(0.01, 1.0, (n, 1))).astype(np.float32)


@pytest.mark.parametrize("t", GRIDS, ids=lambda t: t.name)
def test_roundtrip_and_decode_agree(t):
    w = _weights()
    raw, values = t.quantize_roundtrip(w)
    assert raw.shape == (w.shape[0], w.shape[1] // t.block * t.record)
    assert np.array_equal(t.dequantize(raw), values)
    codes, params = nbits.unpack(t, raw)
    assert codes.max() < t.levels
    if t.symmetric:
        assert np.all(params.zp == t.default_zp)
    # the error is what a grid of this resolution gives: well under one step per weight on average
    step = np.abs(w).reshape(-1, t.block).max(axis=1) / (t.levels / 2 - 1)
    err = np.abs(w - values).reshape(-1, t.block).mean(axis=1)
    assert np.all(err <= step)


@pytest.mark.parametrize("t", [NBitsType(4, 32, False), NBitsType(4, 128, True)], ids=lambda t: t.name)
def test_scale_search_beats_plain_minmax(t):
    w = _weights(64, 512, seed=1)
    _, values = t.quantize_roundtrip(w)
    blocks = w.reshape(-1, t.block)
    if t.symmetric:
        idx = np.argmax(np.abs(blocks), axis=1)
        d = blocks[np.arange(len(blocks)), idx] / -t.default_zp
        zp = np.full(len(blocks), t.default_zp)
    else:
        lo, hi = np.minimum(blocks.min(1), 0), np.maximum(blocks.max(1), 0)
        d = (hi - lo) / (t.levels - 1)
        zp = np.clip(np.rint(-lo / d), 0, t.levels - 1)
    q = np.clip(np.rint(blocks / d[:, None]) + zp[:, None], 0, t.levels - 1)
    plain = (d[:, None] * (q - zp[:, None])).reshape(w.shape)
    assert np.sum((w - values) ** 2) < 0.95 * np.sum((w - plain) ** 2)


def test_gptq_onto_nbits_grid_lowers_the_output_error():
    rng = np.random.default_rng(2)
    w = _weights(48, 256, seed=3)
    mix = rng.standard_normal((256, 256)).astype(np.float32)
    x = rng.standard_normal((4096, 256)).astype(np.float32) @ mix  # correlated inputs: GPTQ has room
    H = x.T @ x
    for t in (NBitsType(4, 32, False), NBitsType(4, 128, True), NBitsType(8, 32, True)):
        g = gptq_kernel.gptq(w, H, t)
        r = gptq_kernel.rtn(w, t)
        assert np.array_equal(t.dequantize(g.data), g.weight)  # bytes == the weights it reports
        assert gptq_kernel.hessian_error(w, g.weight, H) < 0.8 * gptq_kernel.hessian_error(w, r.weight, H)


def test_bad_grids_and_rows():
    with pytest.raises(UnsupportedError):
        NBitsType(3, 32, True)
    with pytest.raises(UnsupportedError):
        NBitsType(4, 48, True)
    with pytest.raises(InputError):
        NBitsType.parse("Q4_0")
    with pytest.raises(InputError, match="multiple of 32"):
        NBitsType(4, 32, True).quantize(np.ones((2, 40), np.float32))
    with pytest.raises(InputError, match="NaN"):
        NBitsType(4, 32, True).quantize(np.full((2, 32), np.nan, np.float32))
    assert NBitsType.parse("uint4_b128") == NBitsType(4, 128, False)


# --- the layout, as onnxruntime reads it -----------------------------------------------------------

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _run_single(node, inits: dict[str, np.ndarray], feeds: dict[str, np.ndarray], out_shape) -> np.ndarray:
    from onnx import TensorProto, helper, numpy_helper

    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
              for k, v in feeds.items()]
    graph = helper.make_graph([node], "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["y"], feeds)[0]


@pytest.mark.parametrize("t", GRIDS + [NBitsType(4, 32, False)], ids=lambda t: t.name)
@pytest.mark.parametrize("k", [96, 384])  # 96 with block 32: an odd number of blocks (zero-point padding)
def test_matmulnbits_computes_with_exactly_our_weights(t, k):
    from onnx import helper

    if k % t.block:
        pytest.skip("row length not a multiple of the block")
    w = _weights(40, k, seed=k)
    raw, values = t.quantize_roundtrip(w)
    s = nbits.split(t, raw, w.shape[0])
    inits = {"B": s.B, "scales": s.scales.astype(np.float32)}
    ins = ["x", "B", "scales"]
    if s.zero_points is not None:
        inits["zp"] = s.zero_points
        ins.append("zp")
    node = helper.make_node("MatMulNBits", ins, ["y"], domain="com.microsoft", K=k, N=w.shape[0], bits=t.bits,
                            block_size=t.block, accuracy_level=0)
    x = np.random.default_rng(5).standard_normal((3, k)).astype(np.float32)
    y = _run_single(node, inits, {"x": x}, [3, w.shape[0]])
    np.testing.assert_allclose(y, x @ values.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("block", [32, 128])
def test_gather_block_quantized_reads_our_int8_table(block):
    from onnx import helper

    t = NBitsType(8, block, True)
    w = _weights(50, 256, seed=9)
    raw, values = t.quantize_roundtrip(w)
    s = nbits.split(t, raw, w.shape[0])
    zp = np.full(s.scales.shape, t.default_zp, np.uint8)
    node = helper.make_node("GatherBlockQuantized", ["data", "ids", "scales", "zp"], ["y"], domain="com.microsoft",
                            bits=8, block_size=block, gather_axis=0, quantize_axis=1)
    ids = np.array([[0, 7, 49, 7]], dtype=np.int64)
    y = _run_single(node, {"data": s.B.reshape(50, 256), "scales": s.scales.astype(np.float32), "zp": zp},
                    {"ids": ids}, [1, 4, 256])
    np.testing.assert_array_equal(y[0], values[ids[0]])
