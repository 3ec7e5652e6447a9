"""The range-shrink search of :func:`.nbits.choose_params` compiled by numba (edgekit's default extras).

It keeps NumPy's float32 arithmetic exactly, so either path writes the same bytes: every elementwise
expression in NumPy's association, ``np.rint``'s round-half-even, the fp16 rounding of scales done on
the float32 bits (round to nearest even, overflow to inf, fp16 subnormals as multiples of 2**-24), and
every sum in the order of NumPy's pairwise summation along a row (eight interleaved partial sums over
runs of at most 128 values, combined as ``((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7))``, a 256-weight block as
two such halves), the error's in float64 as ``sum(..., dtype=np.float64)`` adds it. What makes it fast
is the layout: blocks side by side in the innermost loops (the input transposed a batch at a time), so
the loops vectorise across blocks while each block's arithmetic stays NumPy's.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from edgekit.jit import compile_kernels, numba_kernel

_BATCH = 256  # blocks per transposed batch: a 256-weight block's batch is 256 KiB of float32, cache-sized

_round_fp16_c: Any = None
_codes_c: Any = None
_inverse_c: Any = None
_search_batch_c: Any = None


def _round_fp16(v: Any, fb: Any, ib: Any) -> None:  # pragma: no cover - compiled
    """``v[g] = float32(float16(v[g]))`` in place (``fb``/``ib`` a float32 scratch and its int32 view)."""
    for g in range(v.shape[0]):
        a = abs(v[g])
        if a < np.float32(6.103515625e-05):  # below fp16's smallest normal: a multiple of 2**-24
            r = np.rint(a * np.float32(16777216.0)) * np.float32(5.9604644775390625e-08)
        elif a < np.float32(65520.0):  # 10 mantissa bits, round half to even on the float32 bits
            fb[g] = a
            ib[g] = (ib[g] + 0xFFF + ((ib[g] >> 13) & 1)) & ~0x1FFF
            r = fb[g]
        elif a == a:
            r = np.float32(np.inf)
        else:
            r = a
        v[g] = np.copysign(r, v[g])


def _codes(x: Any, inv: Any, zp: Any, top: Any, i: int, q: Any) -> None:  # pragma: no cover - compiled
    """``q[g] = clip(rint(x[i, g] * inv[g]) + zp[g], 0, top) - zp[g]`` (a NaN stays NaN, as np.clip)."""
    for g in range(x.shape[1]):
        c = np.rint(x[i, g] * inv[g]) + zp[g]
        if c < np.float32(0.0):
            c = np.float32(0.0)
        elif c > top:
            c = top
        q[g] = c - zp[g]


def _inverse(d: Any, inv: Any) -> None:  # pragma: no cover - compiled
    for g in range(d.shape[0]):
        inv[g] = np.float32(1.0) / d[g] if d[g] != np.float32(0.0) else np.float32(0.0)


def _search_batch(x: Any, w: Any, weighted: bool, symmetric: bool, levels: int, shrinks: Any,
                  out_d: Any, out_zp: Any) -> None:  # pragma: no cover - compiled
    """The search for the blocks of ``x`` float32 ``(block, G)`` (``w`` alike, read when ``weighted``):
    writes each block's fp16-rounded scale (as float32) and zero point (as float32). ``block`` is a multiple
    of 8 up to 128, or 256: the widths whose pairwise sums these loops reproduce."""
    n, G = x.shape
    seg = n if n <= 128 else 128
    top = np.float32(levels - 1)
    half = np.float32(levels // 2)
    ext, lo, hi = np.zeros(G, np.float32), np.zeros(G, np.float32), np.zeros(G, np.float32)
    d, zp, inv, dfit = np.empty(G, np.float32), np.empty(G, np.float32), np.empty(G, np.float32), np.empty(G, np.float32)
    q = np.empty(G, np.float32)
    num, den = np.empty(G, np.float32), np.empty(G, np.float32)
    an, ad = np.empty((8, G), np.float32), np.empty((8, G), np.float32)
    ae = np.empty((8, G), np.float64)
    err = np.empty(G, np.float64)
    best_err = np.full(G, np.inf)
    best_d, best_zp = np.zeros(G, np.float32), np.full(G, half)
    fb = np.empty(G, np.float32)
    ib = fb.view(np.int32)
    if symmetric:  # the weight of largest magnitude, the first on ties (np.argmax)
        amax = np.full(G, np.float32(-1.0))
        for i in range(n):
            for g in range(G):
                a = abs(x[i, g])
                if a > amax[g]:
                    amax[g] = a
                    ext[g] = x[i, g]
    else:
        for g in range(G):
            lo[g] = x[0, g]
            hi[g] = x[0, g]
        for i in range(1, n):
            for g in range(G):
                lo[g] = min(lo[g], x[i, g])
                hi[g] = max(hi[g], x[i, g])
        for g in range(G):
            lo[g] = min(lo[g], np.float32(0.0))
            hi[g] = max(hi[g], np.float32(0.0))
    for f in shrinks:
        if symmetric:
            for g in range(G):
                d[g] = (ext[g] * f) / -half
                zp[g] = half
        else:
            for g in range(G):
                d[g] = (hi[g] - lo[g]) * f / top
                z = np.rint((-lo[g] * f) / d[g]) if d[g] != np.float32(0.0) else np.float32(0.0)
                zp[g] = np.float32(0.0) if z < np.float32(0.0) else (top if z > top else z)
        _inverse_c(d, inv)
        # least-squares scale for these codes: d = sum w x q / sum w q^2, both summed pairwise
        for s in range(0, n, seg):
            for i in range(s, s + seg):
                _codes_c(x, inv, zp, top, i, q)
                k = (i - s) % 8
                first = i - s < 8
                for g in range(G):
                    wx = w[i, g] * x[i, g] if weighted else x[i, g]
                    wq = w[i, g] * q[g] if weighted else q[g]
                    vn = wx * q[g]
                    vd = wq * q[g]
                    an[k, g] = vn if first else an[k, g] + vn
                    ad[k, g] = vd if first else ad[k, g] + vd
            for g in range(G):
                pn = ((an[0, g] + an[1, g]) + (an[2, g] + an[3, g])) + ((an[4, g] + an[5, g]) + (an[6, g] + an[7, g]))
                pd = ((ad[0, g] + ad[1, g]) + (ad[2, g] + ad[3, g])) + ((ad[4, g] + ad[5, g]) + (ad[6, g] + ad[7, g]))
                num[g] = pn if s == 0 else num[g] + pn
                den[g] = pd if s == 0 else den[g] + pd
        for g in range(G):
            dfit[g] = num[g] / den[g] if den[g] > np.float32(0.0) else d[g]
        _round_fp16_c(dfit, fb, ib)
        _inverse_c(dfit, inv)
        for s in range(0, n, seg):
            for i in range(s, s + seg):
                _codes_c(x, inv, zp, top, i, q)
                k = (i - s) % 8
                first = i - s < 8
                for g in range(G):
                    t = x[i, g] - dfit[g] * q[g]
                    t = t * t
                    v = np.float64(w[i, g] * t if weighted else t)
                    ae[k, g] = v if first else ae[k, g] + v
            for g in range(G):
                pe = ((ae[0, g] + ae[1, g]) + (ae[2, g] + ae[3, g])) + ((ae[4, g] + ae[5, g]) + (ae[6, g] + ae[7, g]))
                err[g] = pe if s == 0 else err[g] + pe
        for g in range(G):
            if err[g] < best_err[g]:
                best_err[g] = err[g]
                best_d[g] = dfit[g]
                best_zp[g] = zp[g]
    for g in range(G):
        out_d[g] = best_d[g]
        out_zp[g] = best_zp[g]


def _search(x: Any, w: Any, weighted: bool, symmetric: bool, levels: int, shrinks: Any, out_d: Any,
            out_zp: Any) -> None:  # pragma: no cover - compiled
    """:func:`_search_batch` over ``x`` float32 ``(n_blocks, block)`` a transposed batch at a time."""
    nb = x.shape[0]
    for b0 in range(0, nb, _BATCH):
        b1 = min(b0 + _BATCH, nb)
        xt = np.ascontiguousarray(x[b0:b1].T)
        wt = np.ascontiguousarray(w[b0:b1].T) if weighted else xt
        _search_batch_c(xt, wt, weighted, symmetric, levels, shrinks, out_d[b0:b1], out_zp[b0:b1])


def _compile(numba: Any) -> Any:
    global _round_fp16_c, _codes_c, _inverse_c, _search_batch_c
    _round_fp16_c, _codes_c, _inverse_c, _search_batch_c, search = compile_kernels(
        numba, _round_fp16, _codes, _inverse, _search_batch, _search)
    return search


@numba_kernel
def compiled_search(numba: Any) -> Any:
    """The compiled search ``(x, w, weighted, symmetric, levels, shrinks, out_d, out_zp)``, or None without
    numba."""
    return _compiled(numba)


@functools.cache
def _compiled(numba: Any) -> Any:
    return _compile(numba)
