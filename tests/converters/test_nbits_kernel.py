"""The MatMulNBits scale search compiled by numba gives the numpy path's bytes: same scales, same zero points,
on every grid, with and without an importance matrix, on rows built to catch rounding and sign slips."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.converters.quantize import _nbits_kernel, nbits
from edgekit.converters.quantize.nbits import NBitsType

GRIDS = [NBitsType(b, bs, s) for b in (4, 8) for bs in (16, 32, 64, 256) for s in (True, False)]


def _rows(block: int, seed: int) -> np.ndarray:
    """More blocks than one compiled batch holds (and a remainder), scales over many decades, and blocks
    that are all zero, negative zero, tied extremes, fp16 subnormal, near fp16's overflow, one outlier."""
    rng = np.random.default_rng(seed)
    n = 2 * _nbits_kernel._BATCH + 37
    x = (rng.standard_normal((n, block)) * rng.lognormal(-4, 2.5, (n, 1))).astype(np.float32)
    x[::5, ::3] = 0.0
    x[1] = 0.0
    x[2] = -0.0
    x[3, ::2] = 0.5
    x[3, 1::2] = -0.5  # ties for the largest magnitude: the first one counts
    x[4] = np.float32(1e-42)
    x[5] = np.float32(3e-6)  # scales in fp16's subnormal range
    x[6, 0] = np.float32(480_000.0)  # a scale past fp16's largest
    x[7, 3] = np.float32(70_000.0)
    x[8] = np.abs(x[8])
    x[9] = -np.abs(x[9])
    x[10, 5] = x[10].max() * 40  # one outlier: the shrinks clip it
    return x


def _search(t: NBitsType, x: np.ndarray, qw: np.ndarray | None, compiled: bool,
            monkeypatch: pytest.MonkeyPatch) -> nbits.NBitsParams:
    with monkeypatch.context() as m:
        if compiled:
            m.setattr(nbits, "COMPILE_AFTER", 0)  # these few blocks would otherwise stay in numpy
        else:
            m.setattr(nbits, "compiled_search", lambda: None)
        with np.errstate(all="ignore"):
            return nbits.choose_params(t, x, qw)


@pytest.mark.parametrize("t", GRIDS, ids=lambda t: t.name)
def test_compiled_search_gives_numpys_bytes(t: NBitsType, monkeypatch: pytest.MonkeyPatch) -> None:
    assert nbits.compiled_search() is not None  # numba is in the default extras
    x = _rows(t.block, seed=t.block + t.bits)
    rng = np.random.default_rng(1)
    qw = (rng.random(x.shape) ** 4 * 10).astype(np.float32)
    qw[rng.random(x.shape) < 0.2] = 0.0
    for w in (None, qw):
        ours = _search(t, x, w, True, monkeypatch)
        ref = _search(t, x, w, False, monkeypatch)
        assert ours.d.dtype == np.float16 and ours.zp.dtype == np.uint8
        assert np.array_equal(ours.d.view(np.uint16), ref.d.view(np.uint16)), "scales differ (bits, signs included)"
        assert np.array_equal(ours.zp, ref.zp)


def test_compiled_path_writes_the_same_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through :func:`nbits.quantize_rows` (what the ONNX and Core ML writers call): identical records."""
    t = NBitsType(4, 32, False)
    x = _rows(32, seed=3).reshape(-1, 96)
    with monkeypatch.context() as m:
        m.setattr(nbits, "COMPILE_AFTER", 0)
        ours = nbits.quantize_rows(t, x, None, want_values=False)[0]
    with monkeypatch.context() as m:
        m.setattr(nbits, "compiled_search", lambda: None)
        with np.errstate(all="ignore"):
            ref = nbits.quantize_rows(t, x, None, want_values=False)[0]
    assert np.array_equal(ours, ref)


def test_fp16_rounding_matches_numpy_everywhere() -> None:
    """Every float16 value, every midpoint between neighbours (ties to even) and the floats just either side of
    each midpoint, both signs, subnormals and the overflow edge, round as ``astype(np.float16)`` does."""
    assert nbits.compiled_search() is not None
    h = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)  # +0 .. 65504
    up = np.append(h[1:], np.float32(65536.0))  # the next value (65536: where fp16 overflows)
    mid = ((h.astype(np.float64) + up) / 2).astype(np.float32)  # exact in float32
    v = np.concatenate([h, mid, np.nextafter(mid, np.float32(0)), np.nextafter(mid, np.float32(np.inf)),
                        np.array([1e-45, 70000.0, 3.4e38, np.inf], np.float32)])
    v = np.concatenate([v, -v])
    out = v.copy()
    fb = np.empty_like(out)
    _nbits_kernel._round_fp16_c(out, fb, fb.view(np.int32))
    with np.errstate(over="ignore"):
        ref = v.astype(np.float16).astype(np.float32)
    assert np.array_equal(out.view(np.int32), ref.view(np.int32))


def test_kernels_compile_where_numba_cannot_cache_them() -> None:
    """A function numba finds no cache location for (here: source with no file, as in a read-only install
    with no writable home) still compiles, uncached, with the kernels' float semantics."""
    numba = pytest.importorskip("numba")
    from edgekit.jit import compile_kernels

    scope: dict = {"np": np}
    exec(compile("def half(x):\n    return x / np.float32(0.0)\n", "<kernel source>", "exec"), scope)
    with pytest.raises(RuntimeError):
        numba.njit(cache=True)(scope["half"])
    (half,) = compile_kernels(numba, scope["half"])
    with np.errstate(divide="ignore"):
        assert half(np.float32(1.0)) == np.inf  # NumPy's division semantics: no ZeroDivisionError


@pytest.mark.parametrize("width", [9, 27, 100, 144, 288, 576])
def test_per_row_grids_of_any_width_give_numpys_bytes(width, monkeypatch):
    """A per-row grid's block is the row (a conv's 9, 144, 288 weights): numpy's pairwise summation splits such
    widths otherwise than the kernel's loops, which read past a 144-weight block; those stay in numpy."""
    from edgekit.converters.quantize.grids.rowwise import rowwise

    x = _rows(8, seed=width)[:, :1].repeat(width, axis=1) * np.random.default_rng(width).standard_normal(width)
    x = x.astype(np.float32)
    for t in (rowwise(4, width, False), rowwise(8, width, True)):
        ours = _search(t, x, None, True, monkeypatch)
        ref = _search(t, x, None, False, monkeypatch)
        assert np.array_equal(ours.d.view(np.uint16), ref.d.view(np.uint16)) and np.array_equal(ours.zp, ref.zp)


def test_a_broadcast_importance_row_gives_numpys_bytes(monkeypatch):
    """numpy broadcasts an importance of one row over the blocks; the kernel, which checks no bounds, is handed it
    at the blocks' shape."""
    t = NBitsType(4, 32, False)
    x = _rows(32, seed=5)
    qw = np.random.default_rng(2).random((1, 32)).astype(np.float32)
    ours, ref = (_search(t, x, qw, c, monkeypatch) for c in (True, False))
    assert np.array_equal(ours.d.view(np.uint16), ref.d.view(np.uint16)) and np.array_equal(ours.zp, ref.zp)
