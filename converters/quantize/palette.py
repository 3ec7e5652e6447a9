"""Palettes (look-up tables) for Core ML's ``constexpr_lut_to_dense``: sensitivity-weighted k-means.

Pure arrays in, arrays out. A matrix ``(out, in)`` is cut into groups of ``group`` consecutive output
rows (Core ML's per-grouped-channel palettes); each group shares one table of ``2**bits`` fp16 values
and every weight stores the index of its entry.

The table of a group is fitted by weighted 1-D k-means (SqueezeLLM, Kim et al. 2023): each weight's
squared error counts in proportion to its sensitivity. SqueezeLLM takes the diagonal Fisher information;
here, as for llama.cpp's importance matrix, it is the diagonal of the layer's Hessian proxy -- the second
moment of the activations the weight's input column meets -- so a column that sees large inputs pulls the
centroids toward its values. Without an importance every weight counts the same (plain k-means, what
coremltools' ``palettize_weights(mode="kmeans")`` does).

Why 1-D Lloyd on sorted values: in one dimension the clusters are intervals, so with prefix sums of the
sorted values each iteration is ``O(K log m)`` and the whole fit costs one sort per group. Lloyd starts from
the weighted quantiles, and from them with the extremes pinned, and runs to convergence (deterministic). After the fit the table is
rounded to fp16 and every weight takes the nearest *stored* entry, so decoding the indices gives exactly
the values the quantizer reports.
"""

from __future__ import annotations

import numpy as np

from edgekit.errors import InputError

F32 = np.float32
_ITERS = 300  # Lloyd converges slowly in 1-D; 30 iterations left ~15% more error than scikit-learn's
_CHUNK = 512


def _cluster_sums(edges: np.ndarray, pre: np.ndarray) -> np.ndarray:
    """Per group and cluster, the sum of a prefix-summed quantity between consecutive ``edges``."""
    v = np.take_along_axis(pre, edges, axis=1)
    return v[:, 1:] - v[:, :-1]


def _edges(flat: np.ndarray, c: np.ndarray, offset: np.ndarray, m: int) -> np.ndarray:
    """Cluster boundaries (indices into each group's sorted values) for centroids ``c`` ``(G, k)``: every
    group's values are shifted into their own band of one sorted array, so one ``searchsorted`` serves all."""
    mids = (c[:, 1:] + c[:, :-1]) / 2 + offset
    inner = np.searchsorted(flat, mids) - (np.arange(c.shape[0]) * m)[:, None]
    g = c.shape[0]
    return np.concatenate([np.zeros((g, 1), np.intp), inner, np.full((g, 1), m, np.intp)], axis=1)


def _kmeans_groups(xs: np.ndarray, ws: np.ndarray, k: int) -> np.ndarray:
    """Centroids ``(G, k)`` (float64, ascending) of each group's sorted values ``xs`` ``(G, m)`` under
    weights ``ws``: Lloyd run to convergence from the weighted quantiles, and again with the outer two
    pinned to the group's extremes; the lower weighted squared error is kept. From quantiles alone Lloyd
    often settles with a group's few largest weights (an outlier row) folded into the bulk's outer entry,
    several units off, which scikit-learn's k-means++ start avoids."""
    g, m = xs.shape
    zero = np.zeros((g, 1))
    cw = np.concatenate([zero, np.cumsum(ws, axis=1)], axis=1)
    cwx = np.concatenate([zero, np.cumsum(ws * xs, axis=1)], axis=1)
    cwxx = np.concatenate([zero, np.cumsum(ws * xs * xs, axis=1)], axis=1)
    lo, hi = xs[:, :1], xs[:, -1:]
    band = float(np.max(hi - lo)) + 1.0
    offset = (np.arange(g) * band)[:, None] - lo
    flat = (xs + offset).reshape(-1)
    q = (np.arange(k) + 0.5) / k * cw[:, -1:]
    qi = np.minimum(np.stack([np.searchsorted(cw[i, 1:], q[i]) for i in range(g)]), m - 1)
    quantiles = np.take_along_axis(xs, qi, axis=1)
    pinned = quantiles.copy()
    pinned[:, 0], pinned[:, -1] = xs[:, 0], xs[:, -1]
    best, best_err = None, None
    for c in (quantiles, pinned):
        c = _lloyd(flat, offset, m, cw, cwx, c)
        e = _edges(flat, c, offset, m)
        err = (_cluster_sums(e, cwxx) - 2 * c * _cluster_sums(e, cwx) + c * c * _cluster_sums(e, cw)).sum(axis=1)
        if best is None:
            best, best_err = c, err
        else:
            better = err < best_err * (1 - 1e-9)
            best = np.where(better[:, None], c, best)
    return best


def _lloyd(flat: np.ndarray, offset: np.ndarray, m: int, cw: np.ndarray, cwx: np.ndarray, c: np.ndarray) -> np.ndarray:
    for _ in range(_ITERS):
        e = _edges(flat, c, offset, m)
        sw = _cluster_sums(e, cw)
        new = np.sort(np.where(sw > 0, _cluster_sums(e, cwx) / np.where(sw > 0, sw, 1.0), c), axis=1)
        if np.array_equal(new, c):
            break
        c = new
    return c


def nearest(lut: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Index of the entry of ``lut`` (``(k,)``, any order) nearest each value of ``x`` (ties: lower index)."""
    order = np.argsort(lut, kind="stable")
    s = lut[order].astype(F32)
    pos = np.clip(np.searchsorted(s, x), 1, s.size - 1)
    left = s[pos - 1]
    right = s[pos]
    pick = np.where(np.abs(x - left) <= np.abs(right - x), pos - 1, pos)
    return order[pick].astype(np.uint8)


def fit(w: np.ndarray, bits: int, group: int, importance: np.ndarray | None = None
        ) -> tuple[np.ndarray, np.ndarray]:
    """Tables ``(out/group, 2**bits)`` float16 and indices ``(out, in)`` uint8 of ``w`` ``(out, in)``;
    ``importance`` ``(in,)`` weights each column's squared error (None: all equal)."""
    x = np.ascontiguousarray(w, dtype=F32)
    rows, n = x.shape
    if x.ndim != 2 or rows == 0:
        raise InputError(f"palettes are fitted to a matrix (out, in); got shape {x.shape}")
    k = 1 << bits
    if importance is None:
        col_w = np.ones(n, np.float64)
    else:
        col_w = np.asarray(importance, np.float64)
        # a column calibration never exercised still holds weights real inputs may meet
        col_w = col_w + 1e-3 * (col_w.mean() if col_w.mean() > 0 else 1.0)
    # a last, shorter group when ``group`` does not divide ``rows``: the kernel fits any matrix; Core ML's
    # writer refuses such a matrix itself (its groups must be equal)
    n_groups = -(-rows // group)
    luts = np.empty((n_groups, k), np.float16)
    idx = np.empty((rows, n), np.uint8)
    full = rows // group
    for g0, g1, size in ((0, full, group), (full, n_groups, rows - full * group)):
        if g1 <= g0:
            continue
        for c0 in range(g0, g1, _CHUNK):  # bounded memory: a few hundred groups at a time
            c1 = min(c0 + _CHUNK, g1)
            block = x[c0 * group: c0 * group + (c1 - c0) * size].reshape(c1 - c0, -1)
            order = np.argsort(block, axis=1, kind="stable")
            xs = np.take_along_axis(block, order, axis=1).astype(np.float64)
            ws = np.broadcast_to(col_w, (c1 - c0, size, n)).reshape(c1 - c0, -1)
            ws = np.take_along_axis(ws, order, axis=1)
            with np.errstate(over="ignore"):
                lut = _kmeans_groups(xs, ws, k).astype(np.float16)
            luts[c0:c1] = lut
            for j in range(c1 - c0):
                r0 = (c0 + j) * group
                idx[r0: r0 + size] = nearest(lut[j], x[r0: r0 + size])
    return luts, idx


def nearest_rows(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per row ``r``, the index of the entry of ``table[r]`` (``(rows, k)``) nearest ``x[r]`` (lowest on ties)."""
    return np.abs(x[:, None] - table).argmin(axis=1).astype(np.uint8)


def decode(luts: np.ndarray, idx: np.ndarray, group: int) -> np.ndarray:
    """Float32 values of indices ``(out, in)`` under tables ``(out/group, k)``."""
    rows = idx.shape[0]
    table = np.repeat(luts.astype(F32), group, axis=0)[:rows]
    return np.take_along_axis(table, idx.astype(np.intp), axis=1)


def pack_rows(luts: np.ndarray, idx: np.ndarray, group: int) -> np.ndarray:
    """Records ``(out, in + 2*k)``: each row's indices (one byte each), then its group's fp16 table (edgekit's
    transport form between quantizer and writer; the Core ML writer stores the real sub-byte indices)."""
    table = np.repeat(luts.astype(np.float16), group, axis=0)[: idx.shape[0]].view(np.uint8)
    return np.concatenate([idx.astype(np.uint8), table], axis=1)


def unpack_rows(raw: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_rows`: tables ``(out/group, k)`` and indices ``(out, in)``."""
    k = 1 << bits
    r = np.ascontiguousarray(raw, dtype=np.uint8)
    idx = r[:, : r.shape[1] - 2 * k]
    tables = np.ascontiguousarray(r[:, r.shape[1] - 2 * k:]).view(np.float16)
    luts = tables[::group]
    if np.any(np.repeat(luts, group, axis=0)[: r.shape[0]].view(np.uint16) != tables.view(np.uint16)):
        raise InputError("palette records disagree within a group: the tensor was not encoded for this group size")
    return luts, idx
