"""The scale searches of :mod:`._common` that dominate K-quant encoding (``make_qx_quants``,
``make_qkx_quants``, ``make_q3_quants``), compiled by numba where it is installed (edgekit's default
extras). Each keeps C's float32 arithmetic exactly: no fast-math and no FMA contraction, every sum
sequential in C's order, every expression in C's association, ``nearest_int`` through the same bit trick.
What makes them fast is the layout: groups side by side in the innermost loops, a cache-sized block of them
at a time, so the loops vectorise across groups while each group's arithmetic stays C's. The tests hold
both paths to ggml's bytes.

The functions below are plain Python until :func:`compiled_qx`, :func:`compiled_qkx` or
:func:`compiled_q3` first compiles them (``_*_c`` are the compiled ones, which they call by name). numba
keeps the machine code in ``__pycache__``, keyed by the CPU's name and features, so a later process on the
same CPU loads it instead of spending seconds compiling, and a different CPU compiles its own. Several
threads asking at once may compile twice; the results are the same functions.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from edgekit.jit import compile_kernels, numba_kernel

# the compiled functions, set by _compile(); the functions below call them by these names
_codes_c: Any = None
_error_c: Any = None
_absmax_c: Any = None
_qx_block_c: Any = None
_qkx_block_c: Any = None
_q3_block_c: Any = None


def _codes(x: Any, isc: Any, mn: Any, lo: int, hi: int, fb: Any, ib: Any, i: int,
           out: Any) -> None:  # pragma: no cover - compiled
    """``out[g] = MAX(lo, MIN(hi, nearest_int(isc[g] * (x[i, g] - mn[g]))))`` as float32; ``mn`` zero
    gives ``isc[g] * x[i, g]`` exactly."""
    for g in range(x.shape[1]):
        fb[g] = isc[g] * (x[i, g] - mn[g]) + np.float32(12582912.0)
    for g in range(x.shape[1]):
        out[g] = np.float32(min(max((ib[g] & 0x007FFFFF) - 0x00400000, lo), hi))


def _error(x: Any, w: Any, isc: Any, mn: Any, nmax: int, scale: Any, the_min: Any, use_mad: bool, fb: Any, ib: Any,
           q: Any, out: Any) -> None:  # pragma: no cover - compiled
    """``out[g] += w * |scale*l + min - x|`` (or its square) over the group's weights in order, ``l`` the codes
    rounded with ``isc`` and ``mn``: C's error of a trial."""
    for i in range(x.shape[0]):
        _codes_c(x, isc, mn, 0, nmax, fb, ib, i, q)
        for g in range(x.shape[1]):
            d = scale[g] * q[g] + the_min[g] - x[i, g]
            d = abs(d) if use_mad else d * d
            out[g] += w[i, g] * d


def _absmax(x: Any, mx: Any, amax: Any) -> None:  # pragma: no cover - compiled
    """Per group the signed value of largest magnitude (the first on ties) and its magnitude, scanned as C
    does from ``amax = 0, max = 0`` (``mx``, ``amax`` start at zero)."""
    for i in range(x.shape[0]):
        for g in range(x.shape[1]):
            a = abs(x[i, g])
            if a > amax[g]:
                amax[g] = a
                mx[g] = x[i, g]


def _qx_block(x: Any, w: Any, nmax: int, scale: Any, L: Any) -> None:  # pragma: no cover - compiled
    n, G = x.shape
    zero, fnmax = np.float32(0.0), np.float32(nmax)
    mx, amax, div = np.zeros(G, np.float32), np.zeros(G, np.float32), np.empty(G, np.float32)
    isc, b_isc, best = np.empty(G, np.float32), np.empty(G, np.float32), np.empty(G, np.float32)
    slx, sl2, nil = np.empty(G, np.float32), np.empty(G, np.float32), np.zeros(G, np.float32)
    fb, q = np.empty(G, np.float32), np.empty(G, np.float32)
    ib = fb.view(np.int32)
    _absmax_c(x, mx, amax)
    for g in range(G):
        div[g] = np.float32(1.0) if amax[g] < np.float32(1e-15) else mx[g]
    for k in range(19):  # the plain max-based trial, then steps -9..-1 and 1..9 as C runs them
        step = k - 10 if k <= 9 else k - 9
        for g in range(G):
            isc[g] = -fnmax / div[g] if k == 0 else -(fnmax + np.float32(0.1) * np.float32(step)) / div[g]
        slx[:] = zero
        sl2[:] = zero
        for i in range(n):
            _codes_c(x, isc, nil, -nmax, nmax - 1, fb, ib, i, q)
            for g in range(G):
                slx[g] += (w[i, g] * x[i, g]) * q[g]
                sl2[g] += (w[i, g] * q[g]) * q[g]
        for g in range(G):
            if k == 0:
                b_isc[g] = isc[g]
                scale[g] = slx[g] / sl2[g] if sl2[g] != zero else zero
                best[g] = scale[g] * slx[g]
            elif sl2[g] > zero and slx[g] * slx[g] > best[g] * sl2[g]:
                b_isc[g] = isc[g]
                scale[g] = slx[g] / sl2[g]
                best[g] = scale[g] * slx[g]
    for i in range(n):
        _codes_c(x, b_isc, nil, -nmax, nmax - 1, fb, ib, i, q)
        for g in range(G):
            L[i, g] = 0 if amax[g] < np.float32(1e-15) else np.int32(q[g]) + nmax
    for g in range(G):
        if amax[g] < np.float32(1e-15):
            scale[g] = zero


def _qx(x: Any, w: Any, nmax: int, scale: Any, L: Any) -> None:  # pragma: no cover - compiled
    for g0 in range(0, x.shape[1], 512):  # as in _qkx
        g1 = min(g0 + 512, x.shape[1])
        lb = np.empty((x.shape[0], g1 - g0), np.int32)
        _qx_block_c(np.ascontiguousarray(x[:, g0:g1]), np.ascontiguousarray(w[:, g0:g1]), nmax, scale[g0:g1], lb)
        L[:, g0:g1] = lb


def _q3_block(x: Any, nmax: int, scale: Any, L: Any) -> None:  # pragma: no cover - compiled
    n, G = x.shape
    zero = np.float32(0.0)
    mx, amax = np.zeros(G, np.float32), np.zeros(G, np.float32)
    isc, sumlx, suml2 = np.empty(G, np.float32), np.zeros(G, np.float32), np.zeros(G, np.float32)
    tslx, tsl2, nil = np.empty(G, np.float32), np.empty(G, np.float32), np.zeros(G, np.float32)
    fb, q = np.empty(G, np.float32), np.empty(G, np.float32)
    ib = fb.view(np.int32)
    _absmax_c(x, mx, amax)
    for g in range(G):
        isc[g] = np.float32(-nmax) / (np.float32(1.0) if amax[g] < np.float32(1e-15) else mx[g])
    for i in range(n):
        _codes_c(x, isc, nil, -nmax, nmax - 1, fb, ib, i, q)
        for g in range(G):
            L[i, g] = np.int32(q[g])
            w = x[i, g] * x[i, g]
            sumlx[g] += (w * x[i, g]) * q[g]
            suml2[g] += (w * q[g]) * q[g]
    for _ in range(5):  # C stops early once a pass changes nothing; the passes after it would change nothing
        for i in range(n):
            for g in range(G):
                w = x[i, g] * x[i, g]
                li = np.float32(L[i, g])
                tslx[g] = sumlx[g] - (w * x[i, g]) * li
                tsl2[g] = suml2[g] - (w * li) * li
                fb[g] = (x[i, g] * tsl2[g]) / tslx[g] + np.float32(12582912.0)
            for g in range(G):
                if tslx[g] > zero:
                    nl = min(max((ib[g] & 0x007FFFFF) - 0x00400000, -nmax), nmax - 1)
                    if nl != L[i, g]:
                        w = x[i, g] * x[i, g]
                        nf = np.float32(nl)
                        slx = tslx[g] + (w * x[i, g]) * nf
                        sl2 = tsl2[g] + (w * nf) * nf
                        if sl2 > zero and (slx * slx) * suml2[g] > (sumlx[g] * sumlx[g]) * sl2:
                            L[i, g] = nl
                            sumlx[g] = slx
                            suml2[g] = sl2
    for g in range(G):
        flat = amax[g] < np.float32(1e-15)
        scale[g] = zero if flat or not suml2[g] > zero else sumlx[g] / suml2[g]
        for i in range(n):
            L[i, g] = 0 if flat else L[i, g] + nmax


def _q3(x: Any, nmax: int, scale: Any, L: Any) -> None:  # pragma: no cover - compiled
    for g0 in range(0, x.shape[1], 512):  # as in _qkx
        g1 = min(g0 + 512, x.shape[1])
        lb = np.empty((x.shape[0], g1 - g0), np.int32)
        _q3_block_c(np.ascontiguousarray(x[:, g0:g1]), nmax, scale[g0:g1], lb)
        L[:, g0:g1] = lb


def _qkx_block(x: Any, w: Any, nmax: int, rmin: Any, rdelta: Any, nstep: int, use_mad: bool, scale: Any,
               mn: Any, L: Any) -> None:  # pragma: no cover - compiled
    n, G = x.shape
    zero, one, fnmax = np.float32(0.0), np.float32(1.0), np.float32(nmax)
    mx, sum_w, sum_x = x[0].copy(), w[0].copy(), w[0] * x[0]
    isc, best, cur = np.empty(G, np.float32), np.zeros(G, np.float32), np.empty(G, np.float32)
    sl, sl2, sxl = np.empty(G, np.float32), np.empty(G, np.float32), np.empty(G, np.float32)
    t_scale, t_min, det = np.empty(G, np.float32), np.empty(G, np.float32), np.empty(G, np.float32)
    b_isc, b_mn = np.empty(G, np.float32), np.empty(G, np.float32)  # what the kept codes were rounded with
    flat = np.empty(G, np.bool_)
    fb, q = np.empty(G, np.float32), np.empty(G, np.float32)
    ib = fb.view(np.int32)
    mn[:] = x[0]
    for i in range(1, n):
        for g in range(G):
            v = x[i, g]
            if v < mn[g]:
                mn[g] = v
            if v > mx[g]:
                mx[g] = v
            sum_w[g] += w[i, g]
            sum_x[g] += w[i, g] * v
    for g in range(G):
        if mn[g] > zero:
            mn[g] = zero
        flat[g] = mx[g] <= mn[g]
        isc[g] = fnmax / (one if flat[g] else mx[g] - mn[g])
        scale[g] = one / isc[g]
    b_isc[:] = isc
    b_mn[:] = mn
    _error_c(x, w, isc, mn, nmax, scale, mn, use_mad, fb, ib, q, best)
    for step in range(nstep + 1):
        grow = (rmin + rdelta * np.float32(step)) + fnmax
        for g in range(G):
            isc[g] = grow / (one if flat[g] else mx[g] - mn[g])
        sl[:] = zero
        sl2[:] = zero
        sxl[:] = zero
        cur[:] = zero
        for i in range(n):
            _codes_c(x, isc, mn, 0, nmax, fb, ib, i, q)
            for g in range(G):
                wl = w[i, g] * q[g]
                sl[g] += wl
                sl2[g] += wl * q[g]
                sxl[g] += wl * x[i, g]
        for g in range(G):
            det[g] = sum_w[g] * sl2[g] - sl[g] * sl[g]
            ts = (sum_w[g] * sxl[g] - sum_x[g] * sl[g]) / det[g]
            tm = (sl2[g] * sum_x[g] - sl[g] * sxl[g]) / det[g]
            if tm > zero:
                tm = zero
                ts = sxl[g] / sl2[g]
            t_scale[g] = ts
            t_min[g] = tm
        _error_c(x, w, isc, mn, nmax, t_scale, t_min, use_mad, fb, ib, q, cur)
        for g in range(G):
            if det[g] > zero and cur[g] < best[g] and not flat[g]:
                best[g] = cur[g]
                scale[g] = t_scale[g]
                b_isc[g] = isc[g]
                b_mn[g] = mn[g]
                mn[g] = t_min[g]
    for i in range(n):
        _codes_c(x, b_isc, b_mn, 0, nmax, fb, ib, i, q)
        for g in range(G):
            L[i, g] = 0 if flat[g] else np.int32(q[g])
    for g in range(G):
        if flat[g]:
            scale[g] = zero


def _qkx(x: Any, w: Any, nmax: int, rmin: Any, rdelta: Any, nstep: int, use_mad: bool, scale: Any, mn: Any,
         L: Any) -> None:  # pragma: no cover - compiled
    for g0 in range(0, x.shape[1], 512):  # a block of groups whose passes stay in cache, copied
        g1 = min(g0 + 512, x.shape[1])  # contiguous so that the loops over groups vectorise
        lb = np.empty((x.shape[0], g1 - g0), np.int32)
        _qkx_block_c(np.ascontiguousarray(x[:, g0:g1]), np.ascontiguousarray(w[:, g0:g1]), nmax, rmin, rdelta, nstep,
                     use_mad, scale[g0:g1], mn[g0:g1], lb)
        L[:, g0:g1] = lb


def _compile(numba: Any) -> tuple[Any, Any, Any]:
    """Compile the kernels (:func:`edgekit.jit.compile_kernels`: IEEE float32 in C's order, the GIL released
    so tensors encode on several threads); returns ``(qx, qkx, q3)``."""
    global _codes_c, _error_c, _absmax_c, _qx_block_c, _qkx_block_c, _q3_block_c
    (_codes_c, _error_c, _absmax_c, _qx_block_c, _qkx_block_c, _q3_block_c, qx, qkx, q3) = compile_kernels(
        numba, _codes, _error, _absmax, _qx_block, _qkx_block, _q3_block, _qx, _qkx, _q3)
    return qx, qkx, q3


@numba_kernel
def compiled_qx(numba: Any) -> Any:
    """:func:`._common.make_qx_quants` compiled by numba, or None without it; laid out as :func:`compiled_qkx`:
    groups side by side a cache-sized block at a time, sums in C's order, the winning trial's codes rebuilt
    from its scale at the end."""
    return _compiled(numba)[0]


@numba_kernel
def compiled_qkx(numba: Any) -> Any:
    """:func:`._common.make_qkx_quants` compiled by numba (edgekit's default extras), or None without it.
    Groups run side by side in the innermost loops, a cache-sized block at a time; each group's sums still add
    its weights one by one in C's order, so each keeps C's float32 value, and every expression keeps C's
    association, ``nearest_int`` included (the same float32 bit trick). A trial's codes are recomputed where
    they are needed rather than stored, and the winning trial's scale and min rebuild its codes at the end."""
    return _compiled(numba)[1]


@numba_kernel
def compiled_q3(numba: Any) -> Any:
    """:func:`._common.make_q3_quants` compiled by numba, or None without it: its one-weight-at-a-time
    refinement runs per group in C's order (each accepted change moves the sums the next weight sees), groups
    side by side as in :func:`compiled_qkx`."""
    return _compiled(numba)[2]


@functools.cache
def _compiled(numba: Any) -> tuple[Any, Any, Any]:
    return _compile(numba)
