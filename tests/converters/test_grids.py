"""Every registered storage grid: resolves by name and by type, round-trips (the values it reports are
what its bytes decode to, and what the reference decoder gives), and takes GPTQ onto its exact grid."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from edgekit.converters.quantize import ggml, gptq_kernel
from edgekit.converters.quantize.grids import GRIDS, Grid, as_grid, register_grid
from edgekit.converters.quantize.mlcgroup import MLCGroup
from edgekit.errors import UnsupportedError

NAMES = GRIDS.names()
WIDTH = 512  # a multiple of every block (ggml's 256-weight super-blocks included)


def _weights(rows: int = 8, seed: int = 0, width: int = WIDTH) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, width)) * np.exp(rng.standard_normal((1, width)) * 0.5)).astype(np.float32)


def _width(grid: Grid) -> int:
    """WIDTH, or the most of it whole blocks fill (MLC's int3 groups hold 40 weights)."""
    return WIDTH - WIDTH % grid.block


def test_registry_holds_every_ggml_type_and_matmulnbits_grid():
    assert {"q4_0", "q8_0", "q4_k", "q6_k", "iq4_nl", "f16", "bf16"} <= set(NAMES)
    assert {"uint4_b32", "int4_b128", "int8_b32"} <= set(NAMES)
    assert as_grid("Q4_K") is as_grid(gguf.GGMLQuantizationType.Q4_K) is GRIDS.get("q4_k")
    with pytest.raises(UnsupportedError, match="unknown storage grid 'Q9_Z'"):
        as_grid("Q9_Z")
    with pytest.raises(ValueError, match="already registered"):
        register_grid(as_grid("UINT4_B32").__class__(4, 32, False))  # a second object under the same name


@pytest.mark.parametrize("name", NAMES)
def test_grid_roundtrips(name: str):
    grid = as_grid(name)
    assert isinstance(grid, Grid) and grid.name.lower() == name
    w = _weights(width=_width(grid))
    # llama.cpp's IQ2_XXS, IQ2_XS and IQ1_S quantizers need an importance matrix
    im = np.ones(w.shape[1], np.float32) if getattr(grid, "qtype", None) in ggml.REQUIRES_IMATRIX else None
    raw, values = grid.quantize_roundtrip(w, im)
    assert raw.dtype == np.uint8 and raw.shape == (w.shape[0], grid.row_bytes(w.shape[1]))
    assert np.array_equal(grid.dequantize(raw), values)
    assert np.array_equal(grid.quantize(w, im), raw)
    # bits_per_weight is what the format stores; MatMulNBits records hold a whole byte per zero point,
    # which onnxruntime packs to 4 bits in the file
    assert grid.bits_per_weight <= 8 * raw.nbytes / w.size <= grid.bits_per_weight + 8 / grid.block
    err = np.abs(values - w).mean() / np.abs(w).mean()
    # error shrinks about 2x per bit; bf16 keeps 8 bits of mantissa. MLC's grids: the codes set the error
    # (a float32 scale costs bits without adding precision), counted with an fp16 scale per group
    bpw = grid.bits + 16 / grid.block if isinstance(grid, MLCGroup) else grid.bits_per_weight
    assert err == 0.0 if name == "f32" else err < (2**-8 if grid.is_float else 3 * 2 ** -(bpw - 0.5))
    if hasattr(grid, "qtype"):  # ggml grids: gguf-py's own decoder agrees bit for bit
        assert np.array_equal(gguf.quants.dequantize(raw, grid.qtype), values)


@pytest.mark.parametrize("name", [n for n in NAMES if not as_grid(n).is_float])
def test_gptq_lands_on_the_grid(name: str):
    grid = as_grid(name)
    w = _weights(rows=16, seed=1, width=_width(grid))
    x = np.random.default_rng(2).standard_normal((256, w.shape[1])).astype(np.float32)
    H = (x.T @ x).astype(np.float64)
    res = gptq_kernel.gptq(w, H, grid, imatrix=np.diag(H).astype(np.float32))
    assert np.array_equal(grid.dequantize(res.data), res.weight)  # the bytes are exactly what it reports
    # llama.cpp's IQ2_XXS, IQ2_XS and IQ1_S quantizers need an importance matrix
    im = np.diag(H).astype(np.float32) if getattr(grid, "qtype", None) in ggml.REQUIRES_IMATRIX else None
    rtn = gptq_kernel.rtn(w, grid, imatrix=im)
    assert gptq_kernel.hessian_error(w, res.weight, H) <= gptq_kernel.hessian_error(w, rtn.weight, H) * 1.001
