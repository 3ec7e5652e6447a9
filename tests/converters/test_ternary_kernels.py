"""TQ1_0 / TQ2_0: bytes identical with ggml's own quantiser (absmax), decoded by ggml's own
dequantiser identically to what the kernels report, and the least-squares scale exact on ternary
weights and never worse than absmax or absmean."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from edgekit.converters.quantize import ggml
from edgekit.converters.quantize.ggml import ternary
from edgekit.converters.quantize.grids import as_grid

TYPES = [T.TQ1_0, T.TQ2_0]


def _rows(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((12, 512)).astype(np.float32) * 0.02
    x[1] = 0.0
    x[2] = np.round(x[2] / 0.02) * 0.02  # integers times a scale, some beyond +-1
    x[3, 7] = 3.0  # one spike
    x[4] = rng.choice([-0.5, 0.0, 0.5], 512)  # exactly ternary, fp16 scale
    x[5] = rng.choice([-1, 0, 1], 512) * 0.5 + rng.standard_normal(512) * 0.01  # near-ternary
    x[6, ::2] = 0.0
    return x


def _libggml():
    llama_cpp = pytest.importorskip("llama_cpp")
    path = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    if not path.exists():
        pytest.skip("llama-cpp-python ships no libggml-base.so here")
    return ctypes.CDLL(str(path))


def _ggml_quantize(lib, x: np.ndarray, qt: T) -> np.ndarray:
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    bs, ts = GGML_QUANT_SIZES[qt]
    rows = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((rows.shape[0], rows.shape[1] // bs * ts), dtype=np.uint8)
    fn(int(qt), rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], None)
    return out


def _ggml_dequantize(lib, raw: np.ndarray, type_name: str, n: int) -> np.ndarray:
    fn = getattr(lib, f"dequantize_row_{type_name.lower()}")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    raw = np.ascontiguousarray(raw)
    out = np.empty((raw.shape[0], n), dtype=np.float32)
    fn(raw.ctypes.data, out.ctypes.data, out.size)
    return out


@pytest.mark.llamacpp
@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_absmax_bytes_identical_with_ggml(qt: T) -> None:
    lib = _libggml()
    x = _rows()
    raw, values = ggml.quantize_roundtrip(x, qt)
    assert np.array_equal(raw, _ggml_quantize(lib, x, qt))
    assert np.array_equal(values, _ggml_dequantize(lib, raw, qt.name, x.shape[1]))
    assert np.array_equal(values, gq.dequantize(raw, qt))


@pytest.mark.llamacpp
@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_best_scale_decodes_in_ggml_as_reported(qt: T) -> None:
    lib = _libggml()
    x = _rows(1)
    raw, values = as_grid(qt).quantize_roundtrip(x)
    assert np.array_equal(values, _ggml_dequantize(lib, raw, qt.name, x.shape[1]))
    # round trip: the bytes re-encode to themselves (every value is already on the grid)
    assert np.array_equal(as_grid(qt).quantize(values), raw)


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_ternary_weights_are_exact_and_best_beats_the_other_rules(qt: T) -> None:
    rng = np.random.default_rng(3)
    fp16_scales = rng.uniform(0.01, 0.1, (8, 1)).astype(np.float16).astype(np.float32)
    tern = rng.choice([-1, 0, 1], (8, 256), p=[0.3, 0.4, 0.3]).astype(np.float32) * fp16_scales
    raw, values = as_grid(qt).quantize_roundtrip(tern)
    assert np.array_equal(values, tern)
    assert np.array_equal(raw, ggml.quantize(tern, qt))  # llama.cpp's absmax gives the same bytes here
    x = _rows(2).reshape(-1, 256)
    errs = {}
    for rule in ternary.SCALES:
        codes, p = ternary.encode(qt, x, rule)
        errs[rule] = ((ternary.dequantize_codes(codes, p) - x) ** 2).sum(axis=1)
    # per block, up to fp16 rounding of the scale
    assert np.all(errs["best"] <= np.minimum(errs["absmax"], errs["absmean"]) * 1.001 + 1e-12)
    assert errs["best"].sum() < 0.7 * errs["absmax"].sum()


def test_best_scale_is_the_least_squares_optimum() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_t(3, (64, 256)).astype(np.float32)
    d = ternary.best_scale(x).astype(np.float64)
    x = x.astype(np.float64)
    for i in range(0, 64, 8):  # brute force over a fine grid of scales
        grid = np.linspace(0.01, np.abs(x[i]).max(), 4000)
        t = np.clip(np.rint(x[i][None, :] / grid[:, None]), -1, 1)
        err = ((t * grid[:, None] - x[i]) ** 2).sum(axis=1)
        t_best = np.clip(np.rint(x[i] / d[i]), -1, 1)
        assert ((t_best * d[i] - x[i]) ** 2).sum() <= err.min() * (1 + 1e-6)


def test_pack_roundtrips_codes() -> None:
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 3, (16, 256)).astype(np.uint8)
    p = ternary.TernaryParams(rng.uniform(0.1, 1, 16).astype(np.float16))
    for qt in TYPES:
        raw = ternary.pack(qt, codes, p)
        assert raw.shape == (16, GGML_QUANT_SIZES[qt][1])
        assert np.array_equal(gq.dequantize(raw, qt), ternary.dequantize_codes(codes, p))


@pytest.mark.llamacpp
def test_llamacpp_q2_0_holds_ternary_groups_exactly() -> None:
    """The answer for rows that are not multiples of 256: ggml's Q2_0 (64-weight blocks, d = block amax, levels
    -1/0/1/2) re-encodes edgekit's ternary groups of 64 (and 256) without loss, so llama-quantize can store them
    at 2.25 bpw; the gguf library 0.19 has no Q2_0, so edgekit itself writes Q4_0 (4.5 bpw, also exact)."""
    from edgekit.converters.quantize.ternary import encode

    lib = _libggml()
    q2_0 = 42  # GGML_TYPE_Q2_0 in llama.cpp 0.3.36's ggml.h
    assert not hasattr(T, "Q2_0")
    rng = np.random.default_rng(6)
    w = rng.standard_normal((8, 576)).astype(np.float32) * 0.03
    for group, qt in ((64, T.Q4_0), (192, T.Q4_0)):
        values = encode(w, qt, group, "best")[1]
        fn = lib.ggml_quantize_chunk
        fn.restype = ctypes.c_size_t
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_void_p]
        raw = np.zeros((8, 576 // 64 * 18), dtype=np.uint8)
        fn(q2_0, values.ctypes.data, raw.ctypes.data, 0, 8, 576, None)
        back = _ggml_dequantize(lib, raw, "Q2_0", 576)
        assert np.array_equal(back, values), group
