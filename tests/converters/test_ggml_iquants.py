"""The i-quant encoders (IQ4_XS and the lattice types): byte identity with llama.cpp's
``ggml_quantize_chunk`` with and without an importance matrix, the neighbour tables, and the
imatrix requirement llama.cpp enforces."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from edgekit.converters.quantize import ggml
from edgekit.converters.quantize.ggml import iq1, lattice
from edgekit.errors import InputError

from .test_ggml_kernels import _ggml_quantize_chunk, _pathological

IQUANTS = [T.IQ4_XS, T.IQ3_XXS, T.IQ3_S, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_S, T.IQ1_M]


def _imatrices(n: int, rng: np.random.Generator) -> list[np.ndarray | None]:
    sparse = (rng.random(n) ** 8 * 100).astype(np.float32)
    sparse[rng.random(n) < 0.3] = 0.0
    return [None, rng.random(n).astype(np.float32), sparse]


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", IQUANTS, ids=lambda t: t.name)
def test_byte_identical_with_ggml_quantize_chunk(qtype: T) -> None:
    """Gaussian, heavy-tailed and pathological rows (all-zero, constant, spiked, subnormal, fp16-edge
    sub-blocks), each with no importance (where llama.cpp allows it), a dense and a sparse one."""
    ref = _ggml_quantize_chunk()
    rng = np.random.default_rng(7)
    data = [
        rng.standard_normal((8, 1024)).astype(np.float32) * 0.02,
        rng.standard_t(3, (8, 1024)).astype(np.float32),
        np.concatenate([_pathological(512, 1), _pathological(512, 2)], axis=1),
    ]
    checked = 0
    for x in data:
        for im in _imatrices(1024, rng):
            if im is None and qtype in ggml.REQUIRES_IMATRIX:
                continue
            ours = ggml.quantize(x, qtype, im).reshape(x.shape[0], -1)
            theirs = ref(x, qtype, im)
            same = float(np.mean(ours == theirs))
            assert same == 1.0, f"{qtype.name} imatrix={im is not None}: {same:.6f} of bytes identical"
            checked += 1
    assert checked == (6 if qtype in ggml.REQUIRES_IMATRIX else 9)


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", IQUANTS[1:], ids=lambda t: t.name)
def test_numpy_fallback_is_byte_identical_with_ggml_too(qtype: T, monkeypatch: pytest.MonkeyPatch) -> None:
    """The neighbour search (and IQ1's scale scan) run compiled by numba when it is installed (the default
    extras) and in numpy without it: with numba hidden, the same rows give ggml's bytes as well (pathological sub-blocks
    included, whose NaN/inf distances C's strict ``<`` never picks)."""
    ref = _ggml_quantize_chunk()
    rng = np.random.default_rng(11)
    odd = _pathological(512, 3)
    x = np.concatenate([rng.standard_t(3, odd.shape).astype(np.float32), odd], axis=1)
    im = _imatrices(1024, rng)[2]
    compiled = ggml.quantize(x, qtype, im)
    monkeypatch.setattr(lattice, "_compiled_search", lambda: None)
    monkeypatch.setattr(iq1, "_compiled_scan", lambda: None)
    fallback = ggml.quantize(x, qtype, im)
    assert np.array_equal(compiled, fallback)
    assert np.array_equal(fallback.reshape(x.shape[0], -1), ref(x, qtype, im))


@pytest.mark.parametrize("qtype", IQUANTS, ids=lambda t: t.name)
def test_bytes_decode_to_kernel_values_and_error_is_sane(qtype: T) -> None:
    x = np.random.default_rng(3).standard_normal((4, 512)).astype(np.float32)
    im = np.random.default_rng(4).random(512).astype(np.float32) + 0.1
    raw, values = ggml.quantize_roundtrip(x, qtype, im)
    assert raw.shape == (4, 2 * GGML_QUANT_SIZES[qtype][1])
    assert np.array_equal(gq.dequantize(raw, qtype), values)
    rel = float(np.sqrt(np.mean((values - x) ** 2)))
    # a Gaussian's RMS rounding error at 2-4.25 bits per weight
    assert 0.05 < rel < {T.IQ4_XS: 0.12, T.IQ3_S: 0.25, T.IQ3_XXS: 0.27, T.IQ1_S: 0.7, T.IQ1_M: 0.65}.get(qtype, 0.5), rel


def test_bits_order_the_error() -> None:
    x = np.random.default_rng(5).standard_normal((16, 1024)).astype(np.float32)
    im = np.ones(1024, np.float32)
    order = [T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_XS]
    err = [float(np.mean((ggml.quantize_roundtrip(x, t, im)[1] - x) ** 2)) for t in order]
    assert err == sorted(err, reverse=True), dict(zip([t.name for t in order], err, strict=True))


@pytest.mark.parametrize("qtype", [*lattice.TYPES, T.IQ1_S], ids=lambda t: t.name)
def test_neighbour_tables(qtype: T) -> None:
    """Every codebook point maps to itself; every off-codebook rounding point lists codebook points only,
    nearest first, and the nearest codebook point is among them."""
    tab = lattice.tables(qtype)
    dim, kmax, _ = lattice.GEOMETRY[qtype]
    bits = 2 if dim == 8 else 3
    n = tab.points.shape[0]
    assert n == {T.IQ2_XXS: 256, T.IQ2_XS: 512, T.IQ2_S: 1024, T.IQ3_XXS: 256, T.IQ3_S: 512, T.IQ1_S: 2048}[qtype]
    on = np.nonzero(tab.kmap >= 0)[0]
    assert np.array_equal(np.sort(tab.kmap[on]), np.arange(n))
    rng = np.random.default_rng(0)
    digits = rng.integers(0, kmax, (200, dim))
    u = (digits << (bits * np.arange(dim))).sum(axis=1)
    for d, i in zip(digits, u, strict=True):
        if tab.kmap[i] >= 0:
            assert np.array_equal(tab.points[tab.kmap[i]], 2 * d + 1)
            continue
        cand = tab.neighbours[i][tab.neighbours[i] >= 0]
        d2 = ((tab.points[cand] - (2 * d + 1)) ** 2).sum(axis=1)
        assert np.all(np.diff(d2) >= 0)
        assert d2[0] == ((tab.points - (2 * d + 1)) ** 2).sum(axis=1).min()


@pytest.mark.parametrize("qtype", ggml.REQUIRES_IMATRIX, ids=lambda t: t.name)
def test_types_that_need_an_imatrix_say_so(qtype: T) -> None:
    with pytest.raises(InputError, match="--method imatrix"):
        ggml.quantize(np.ones((1, 256), np.float32), qtype)
