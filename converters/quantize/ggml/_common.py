"""Float32 primitives and scale searches shared by the ggml block kernels.

Everything here reproduces the scalar C in llama.cpp's ``ggml-quants.c`` bit for bit. ggml-base is built
without ``-ffast-math`` or FMA, so each C expression is a chain of correctly rounded float32 operations
evaluated left to right, and every accumulation is a strictly sequential sum. The helpers below keep that:

* every array is float32 and every constant is an ``np.float32`` (a float64 anywhere changes rounding);
* sums go through :func:`seqsum`, never ``np.sum`` (pairwise summation rounds differently);
* products are written in C's association order, e.g. ``w*x*l`` is ``(w*x)*l``.

Layout: the searches take groups *element-major*, shape ``(n, *groups)``: axis 0 runs over the ``n``
weights that share one scale and the remaining axes enumerate the groups. A sequential sum is then a short
Python loop of vectorised adds over all groups at once, which is exact and fast (``np.cumsum`` along a
short trailing axis is exact too but an order of magnitude slower).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ._search_kernels import compiled_q3 as _compiled_q3
from ._search_kernels import compiled_qkx as _compiled_qkx
from ._search_kernels import compiled_qx as _compiled_qx

# The numba kernels take over once this many groups have gone through a search in numpy in this process:
# compiling one costs seconds, once, which a model this size (seconds of numpy) starts to repay, so small
# models never compile them. Either path gives the same bytes, so when the switch happens does not matter.
COMPILE_AFTER = 1 << 17
_searched = {"qx": 0, "qkx": 0, "q3": 0}


def _kernel(name: str, compiled: Callable[[], Any], groups: int) -> Any:
    """The compiled search ``name`` once :data:`COMPILE_AFTER` groups have been searched in numpy (None until
    then, and without numba)."""
    if _searched[name] < COMPILE_AFTER:
        _searched[name] += groups
        return None
    return compiled()

F32 = np.float32
EPS = F32(1e-15)  # GROUP_MAX_EPS: below this a group counts as all zero
_ZERO = F32(0.0)
_MAGIC = F32(12582912.0)  # 1.5 * 2**23


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: round half to even through the float32 mantissa.

    Emulated through the same bit trick rather than ``np.rint`` because C never checks the range: for
    ``|v| > 2**22`` (or inf, from a near-zero divisor) it returns wrapped garbage that later clamps land
    on, and matching that keeps the bytes identical even on degenerate blocks.
    """
    with np.errstate(all="ignore"):
        bits = (np.asarray(v, dtype=F32) + _MAGIC).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def round_codes(v: np.ndarray, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
    """``MAX(lo, MIN(hi, nearest_int(v)))`` written into the float32 buffer ``out``; ``v`` is clobbered.

    The hot loops keep codes as exact small floats, which skips integer temporaries and conversions.
    """
    with np.errstate(all="ignore"):
        v += _MAGIC
    bits = v.view(np.int32)
    bits &= 0x007FFFFF
    bits -= 0x00400000
    np.copyto(out, bits, casting="unsafe")
    return np.clip(out, F32(lo), F32(hi), out=out)


def seqsum(terms: np.ndarray) -> np.ndarray:
    """``float s = 0; for (i...) s += terms[i];`` over axis 0."""
    acc = terms[0] + _ZERO  # 0.0f + t keeps C's sign of zero (+0 for an all-(-0) sum)
    for i in range(1, terms.shape[0]):
        acc += terms[i]
    return acc


def seqsum_from_first(terms: np.ndarray) -> np.ndarray:
    """``float s = terms[0]; for (i = 1...) s += terms[i];`` over axis 0."""
    acc = terms[0].copy()
    for i in range(1, terms.shape[0]):
        acc += terms[i]
    return acc


def take0(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``x[idx[g], g]`` for every group ``g`` (gather along axis 0)."""
    return np.take_along_axis(x, idx[None], axis=0)[0]


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The signed value of largest magnitude along axis 0, first one on ties, and its magnitude.

    C scans with ``if (fabsf(v) > amax)`` from ``amax = 0, max = 0``, so an all-zero group yields +0.
    """
    mx = take0(x, np.argmax(np.abs(x), axis=0))
    amax = np.abs(mx)
    return np.where(amax > 0, mx, _ZERO), amax


def first_min(x: np.ndarray) -> np.ndarray:
    """``min = x[0]; if (x[i] < min) min = x[i];`` (first of equal minima, which matters for -0)."""
    return take0(x, np.argmin(x, axis=0))


def first_max(x: np.ndarray) -> np.ndarray:
    return take0(x, np.argmax(x, axis=0))


def fp16(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even, like numpy's cast), kept as float16."""
    with np.errstate(over="ignore"):
        return np.asarray(v, dtype=F32).astype(np.float16)


def best_index(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``best_index_int8``: index of the nearest entry of the sorted table ``values``, upper one on ties.

    The table entries are integers, so ``values[i] <= x`` iff ``values[i] <= floor(x)``: the bracketing
    pair comes from a lookup on ``floor(x)`` (far faster than ``searchsorted``). Clamping ``x`` into the
    table's range first reproduces C's two early returns, and the tie-break compares the same two float32
    distances C does.
    """
    v0, vn = F32(values[0]), F32(values[-1])
    grid = np.arange(int(v0), int(vn) + 1)
    mu_of = np.clip(np.searchsorted(values, grid, side="right"), 1, values.shape[0] - 1)
    xc = np.clip(x, v0, vn)
    with np.errstate(invalid="ignore"):
        k = np.floor(xc).astype(np.intp) - int(v0)
    mu = np.take(mu_of, k, mode="clip")
    lower = (xc - np.take(values, mu - 1)) < (np.take(values, mu) - xc)
    return mu - lower


# ---------------------------------------------------------------------------------------------------------
# Scale searches. Each returns float32 per-group results plus integer codes shaped like x.
# C's early exits ("if (!n_changed) break") are dropped: a pass that changes nothing leaves the state as it
# was, so the remaining passes change nothing either and running them all gives the same result.
# ---------------------------------------------------------------------------------------------------------


def _symmetric(kernel: Any, x: np.ndarray, nmax: int, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, L)`` of a compiled symmetric search over element-major ``x`` (and weights ``w`` if it takes
    them), shaped as the numpy path returns them."""
    n = x.shape[0]
    flat = [np.ascontiguousarray(np.broadcast_to(a, x.shape), dtype=F32).reshape(n, -1)
            for a in ((x,) if w is None else (x, w))]
    scale = np.empty(flat[0].shape[1], dtype=F32)
    L = np.empty(flat[0].shape, dtype=np.int32)
    kernel(*flat, nmax, scale, L)
    return scale.reshape(x.shape[1:]), L.reshape(x.shape)


def make_qx_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale search (``make_qx_quants`` with ``rmse_type == 1``): returns ``(scale, L)``.

    ``L`` holds ``l + nmax`` in ``[0, 2*nmax)``; ``w`` is the per-weight importance (``x*x`` when C gets
    ``qw == NULL``). The scale is the weighted least-squares fit for the best of 19 candidate grids. Runs
    compiled by numba where it is installed, once the process has searched :data:`COMPILE_AFTER` groups
    (:func:`._search_kernels.compiled_qx`), in numpy below otherwise.
    """
    kernel = _kernel("qx", _compiled_qx, x.size // max(x.shape[0], 1))
    if kernel is not None:
        return _symmetric(kernel, x, nmax, w)
    mx, amax = first_absmax(x)
    zero = amax < EPS
    div = np.where(zero, F32(1.0), mx)
    wx = w * x
    fnmax = F32(nmax)
    lf = np.empty_like(x)
    best_l = np.empty_like(x)
    terms = np.empty((2, *x.shape), dtype=F32)  # both sums of a trial in one sequential pass

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        np.multiply(iscale, x, out=lf)
        round_codes(lf, -nmax, nmax - 1, lf)
        np.multiply(wx, lf, out=terms[0])
        np.multiply(w, lf, out=terms[1])
        terms[1] *= lf
        sumlx, suml2 = seqsum(terms.swapaxes(0, 1))
        return sumlx, suml2

    with np.errstate(all="ignore"):
        sumlx, suml2 = trial(-fnmax / div)
        best_l[...] = lf
        scale = np.where(suml2 != 0, sumlx / suml2, _ZERO)
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            sumlx, suml2 = trial(-(fnmax + F32(0.1) * F32(step)) / div)
            upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            np.copyto(best_l, lf, where=upd)
            scale = np.where(upd, sumlx / suml2, scale)
            best = np.where(upd, scale * sumlx, best)
    L = best_l.astype(np.int32) + nmax
    return np.where(zero, _ZERO, scale), np.where(zero, 0, L)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_q3_quants(do_rmse=true)``: x*x-weighted fit refined one weight at a time.

    The refinement is sequential within a group (each accepted change updates the running sums the next
    weight sees), so it loops over the group's weights and vectorises across groups. Compiled by numba once
    the process has searched :data:`COMPILE_AFTER` groups (:func:`._search_kernels.compiled_q3`).
    """
    kernel = _kernel("q3", _compiled_q3, x.size // max(x.shape[0], 1))
    if kernel is not None:
        return _symmetric(kernel, x, nmax)
    mx, amax = first_absmax(x)
    zero = amax < EPS
    div = np.where(zero, F32(1.0), mx)
    w = x * x
    wx = w * x
    with np.errstate(all="ignore"):
        L = np.clip(nearest_int((F32(-nmax) / div) * x), -nmax, nmax - 1)
        lf = L.astype(F32)
        sumlx = seqsum(wx * lf)
        suml2 = seqsum((w * lf) * lf)
        for _ in range(5):
            for i in range(x.shape[0]):
                li = L[i].astype(F32)
                slx = sumlx - wx[i] * li
                sl2 = suml2 - (w[i] * li) * li
                ok = slx > 0
                new_l = np.clip(nearest_int((x[i] * sl2) / slx), -nmax, nmax - 1)
                nf = new_l.astype(F32)
                slx = slx + wx[i] * nf
                sl2 = sl2 + (w[i] * nf) * nf
                ok &= (new_l != L[i]) & (sl2 > 0)
                ok &= (slx * slx) * suml2 > (sumlx * sumlx) * sl2
                L[i] = np.where(ok, new_l, L[i])
                sumlx = np.where(ok, slx, sumlx)
                suml2 = np.where(ok, sl2, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, _ZERO)
    return np.where(zero, _ZERO, scale), np.where(zero, 0, L + nmax)


def make_qkx_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric scale+min search (``make_qkx2_quants`` / ``make_qkx3_quants`` with weights given).

    Returns ``(scale, the_min, L)`` with ``x ~ scale*L - the_min`` and ``L`` in ``[0, nmax]``. The two C
    functions differ only in the ``max == min`` vs ``max <= min`` guard, equivalent once ``min <= 0``.
    Runs compiled by numba where it is installed, once the process has searched :data:`COMPILE_AFTER` groups
    (:func:`._search_kernels.compiled_qkx`), in numpy below otherwise.
    """
    kernel = _kernel("qkx", _compiled_qkx, x.size // max(x.shape[0], 1))
    if kernel is not None:
        n = x.shape[0]
        x2 = np.ascontiguousarray(x, dtype=F32).reshape(n, -1)
        w2 = np.ascontiguousarray(np.broadcast_to(w, x.shape), dtype=F32).reshape(n, -1)
        scale = np.empty(x2.shape[1], dtype=F32)
        mn = np.empty_like(scale)
        L = np.empty(x2.shape, dtype=np.int32)
        kernel(x2, w2, nmax, F32(rmin), F32(rdelta), nstep, use_mad, scale, mn, L)
        return scale.reshape(x.shape[1:]), (-mn).reshape(x.shape[1:]), L.reshape(x.shape)
    mn = first_min(x)
    mx = first_max(x)
    sum_w = seqsum_from_first(w)
    sum_x = seqsum_from_first(w * x)
    mn = np.where(mn > 0, _ZERO, mn)
    flat = mx <= mn
    lf = np.empty_like(x)
    best_l = np.empty_like(x)
    err = np.empty_like(x)
    terms = np.empty((3, *x.shape), dtype=F32)  # the three sums of a trial in one sequential pass

    def weighted_error(scale: np.ndarray, mn: np.ndarray) -> np.ndarray:
        np.multiply(scale, lf, out=err)  # C: scale*L + min - x, then |.| or squared, times w
        np.add(err, mn, out=err)
        np.subtract(err, x, out=err)
        if use_mad:
            np.abs(err, out=err)
        else:
            np.multiply(err, err, out=err)
        np.multiply(err, w, out=err)
        return seqsum(err)

    with np.errstate(all="ignore"):
        rng = np.where(flat, F32(1.0), mx - mn)
        iscale = F32(nmax) / rng
        scale = F32(1.0) / iscale
        np.subtract(x, mn, out=lf)
        lf *= iscale
        round_codes(lf, 0, nmax, lf)
        best_l[...] = lf
        best = weighted_error(scale, mn)
        for step in range(nstep + 1):
            # an accepted trial moves `min`, and C keeps using the moved value for the later trials
            rng = np.where(flat, F32(1.0), mx - mn)
            iscale = ((F32(rmin) + F32(rdelta) * F32(step)) + F32(nmax)) / rng
            np.subtract(x, mn, out=lf)
            lf *= iscale
            round_codes(lf, 0, nmax, lf)
            wl = np.multiply(w, lf, out=terms[0])
            np.multiply(wl, lf, out=terms[1])
            np.multiply(wl, x, out=terms[2])
            sum_l, sum_l2, sum_xl = seqsum(terms.swapaxes(0, 1))
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            pos = this_min > 0
            this_min = np.where(pos, _ZERO, this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            cur = weighted_error(this_scale, this_min)
            upd = (det > 0) & (cur < best) & ~flat
            np.copyto(best_l, lf, where=upd)
            best = np.where(upd, cur, best)
            scale = np.where(upd, this_scale, scale)
            mn = np.where(upd, this_min, mn)
    L = best_l.astype(np.int32)
    return np.where(flat, _ZERO, scale), -mn, np.where(flat, 0, L)


def make_qp_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale search for non-negative values (``make_qp_quants``): quantises sub-block scales/mins.

    Returns ``(scale, L)``. C stores ``L`` in a ``uint8_t`` array, so a negative code wraps to 256+l and
    the refinement then reads the wrapped value back; that is emulated so even a (practically
    impossible) negative sub-block scale produces C's bytes.
    """
    mx = np.maximum(x.max(axis=0), _ZERO)  # C starts from max = 0
    zero = mx < EPS
    div = np.where(zero, F32(1.0), mx)
    wx = w * x
    fnmax = F32(nmax)
    with np.errstate(all="ignore"):
        iscale = fnmax / div
        lw = (nearest_int(iscale * x) & 0xFF).astype(F32)
        diff = x - (F32(1.0) / iscale) * lw
        best = seqsum((w * diff) * diff)
        for step in range(-4, 5):
            if step == 0:
                continue
            iscale_is = (F32(0.1) * F32(step) + fnmax) / div
            scale_is = F32(1.0) / iscale_is
            diff = x - scale_is * np.minimum(nearest_int(iscale_is * x), nmax).astype(F32)
            mse = seqsum((w * diff) * diff)
            upd = mse < best
            best = np.where(upd, mse, best)
            iscale = np.where(upd, iscale_is, iscale)
        codes = np.minimum(nearest_int(iscale * x), nmax)
        lf = codes.astype(F32)
        sumlx = seqsum(wx * lf)
        suml2 = seqsum((w * lf) * lf)
        L = codes & 0xFF
        for _ in range(5):
            for i in range(x.shape[0]):
                li = L[i].astype(F32)
                slx = sumlx - wx[i] * li
                sl2 = suml2 - (w[i] * li) * li
                ok = (slx > 0) & (sl2 > 0)
                new_l = np.minimum(nearest_int((x[i] * sl2) / slx), nmax)
                nf = new_l.astype(F32)
                slx = slx + wx[i] * nf
                sl2 = sl2 + (w[i] * nf) * nf
                ok &= (new_l != L[i]) & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
                L[i] = np.where(ok, new_l & 0xFF, L[i])
                sumlx = np.where(ok, slx, sumlx)
                suml2 = np.where(ok, sl2, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, _ZERO)
    return np.where(zero, _ZERO, scale), np.where(zero, 0, L)
