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
the weighted quantiles, and from them with the 1, 2 or 3 most extreme values on each side seeding entries of
their own, runs each to convergence (deterministic) and keeps the lowest error. After the fit the table is
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
    weights ``ws``: Lloyd run to convergence from the weighted quantiles, and again with the outer one, two
    or three entries on each side seeded by the group's most extreme values; the lowest weighted squared
    error is kept. From quantiles alone Lloyd often settles with a group's few largest weights (an outlier
    row) folded into the bulk's outer entry, several units off, which scikit-learn's k-means++ start avoids;
    with the extra starts the unweighted error of SmolLM2's matrices is 0.98x scikit-learn's (one k-means++
    start) rather than 1.02x, and a group's worst weight is rarely left far off."""
    g, m = xs.shape
    zero = np.zeros((g, 1))
    cw = np.concatenate([zero, np.cumsum(ws, axis=1)], axis=1)
    cwx = np.concatenate([zero, np.cumsum(ws * xs, axis=1)], axis=1)
    cwxx = np.concatenate([zero, np.cumsum(ws * xs * xs, axis=1)], axis=1)
    lo, hi = xs[:, :1], xs[:, -1:]
    band = float(np.max(hi - lo)) + 1.0
    offset = (np.arange(g) * band)[:, None] - lo
    flat = (xs + offset).reshape(-1)
    quantiles = _quantiles(xs, cw, k)
    pinned = quantiles.copy()
    pinned[:, 0], pinned[:, -1] = xs[:, 0], xs[:, -1]
    starts = [quantiles, pinned]
    for t in (2, 3):  # the t most extreme values on each side seed their own entries, quantiles the rest
        if k > 2 * t + 1:
            starts.append(np.sort(np.concatenate([xs[:, :t], _quantiles(xs, cw, k - 2 * t), xs[:, m - t:]], axis=1),
                                  axis=1))
    best, best_err = None, None
    for c in starts:
        c = _lloyd(flat, offset, m, cw, cwx, c)
        e = _edges(flat, c, offset, m)
        err = (_cluster_sums(e, cwxx) - 2 * c * _cluster_sums(e, cwx) + c * c * _cluster_sums(e, cw)).sum(axis=1)
        if best is None:
            best, best_err = c, err
        else:
            better = err < best_err * (1 - 1e-9)
            best = np.where(better[:, None], c, best)
            best_err = np.where(better, err, best_err)
    return best


def _quantiles(xs: np.ndarray, cw: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` weighted quantiles (at ``(j + 0.5) / k``) of each group's sorted values ``xs``."""
    q = (np.arange(k) + 0.5) / k * cw[:, -1:]
    qi = np.stack([np.searchsorted(cw[i, 1:], q[i]) for i in range(xs.shape[0])])
    return np.take_along_axis(xs, np.minimum(qi, xs.shape[1] - 1), axis=1)


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


def _column_weights(importance: np.ndarray | None, n: int) -> np.ndarray:
    if importance is None:
        return np.ones(n, np.float64)
    col_w = np.asarray(importance, np.float64)
    # a column calibration never exercised still holds weights real inputs may meet
    return col_w + 1e-3 * (col_w.mean() if col_w.mean() > 0 else 1.0)


def outlier_mask(w: np.ndarray, group: int, fraction: float, importance: np.ndarray | None = None) -> np.ndarray:
    """The weights SqueezeLLM's dense-and-sparse split keeps exactly: the ``fraction`` of ``w`` ``(out, in)``
    farthest from their palette group's mean in units of the group's standard deviation (so a group of small
    weights has outliers too), the distance scaled by the square root of the column's importance when given
    (a large weight on a column that sees large inputs costs most when it is rounded). Bool ``(out, in)``."""
    x = np.asarray(w, dtype=np.float64)
    rows, n = x.shape
    count = int(round(fraction * x.size))
    if count <= 0:
        return np.zeros(x.shape, bool)
    score = np.empty_like(x)
    for r0 in range(0, rows, group):
        g = x[r0: r0 + group]
        score[r0: r0 + group] = np.abs(g - g.mean()) / max(float(g.std()), 1e-30)
    if importance is not None:
        score *= np.sqrt(_column_weights(importance, n))
    flat = score.reshape(-1)
    keep = np.argpartition(flat, flat.size - count)[flat.size - count:]
    mask = np.zeros(flat.size, bool)
    mask[keep] = True
    return mask.reshape(x.shape)


def sparse_deltas(w: np.ndarray, luts: np.ndarray, idx: np.ndarray, group: int, mask: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The sparse half of dense-and-sparse: fp16 corrections ``(out, in)`` (zero off the outliers) that, added
    to the palette's values in fp16 (as the Core ML program adds them), give each outlier its fp16 weight;
    and the float32 values the two decode to together."""
    dense = decode(luts, idx, group).astype(np.float16)
    target = np.asarray(w, F32).astype(np.float16)
    delta = np.where(mask, (target.astype(F32) - dense.astype(F32)).astype(np.float16), np.float16(0))
    return delta, add_fp16(dense, delta)


def add_fp16(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a + b`` of two fp16 tensors computed in float32 and stored in fp16 (the evaluator's arithmetic), as float32."""
    return (a.astype(F32) + b.astype(F32)).astype(np.float16).astype(F32)


def fit(w: np.ndarray, bits: int, group: int, importance: np.ndarray | None = None,
        exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tables ``(out/group, 2**bits)`` float16 and indices ``(out, in)`` uint8 of ``w`` ``(out, in)``;
    ``importance`` ``(in,)`` weights each column's squared error (None: all equal); weights where ``exclude``
    (bool ``(out, in)``: outliers kept elsewhere) is True take no part in the tables' fit."""
    x = np.ascontiguousarray(w, dtype=F32)
    rows, n = x.shape
    if x.ndim != 2 or rows == 0:
        raise InputError(f"palettes are fitted to a matrix (out, in); got shape {x.shape}")
    k = 1 << bits
    col_w = _column_weights(importance, n)
    fitted = x
    if exclude is not None and exclude.any():
        # outliers weigh nothing and sit inside their group's range, so the pinned start takes the bulk's extremes
        fitted = x.copy()
        for r0 in range(0, rows, group):
            g, m = fitted[r0: r0 + group], exclude[r0: r0 + group]
            if (~m).any():
                g[m] = np.clip(g[m], g[~m].min(), g[~m].max())
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
            block = fitted[c0 * group: c0 * group + (c1 - c0) * size].reshape(c1 - c0, -1)
            order = np.argsort(block, axis=1, kind="stable")
            xs = np.take_along_axis(block, order, axis=1).astype(np.float64)
            ws = np.broadcast_to(col_w, (c1 - c0, size, n)).reshape(c1 - c0, -1)
            if exclude is not None:
                ws = np.where(exclude[c0 * group: c0 * group + (c1 - c0) * size].reshape(c1 - c0, -1), 0.0, ws)
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


def pack_rows(luts: np.ndarray, idx: np.ndarray, group: int, delta: np.ndarray | None = None) -> np.ndarray:
    """Records ``(out, in + 2*k)``: each row's indices (one byte each), then its group's fp16 table, then (with
    ``delta``: dense-and-sparse) the row's fp16 outlier corrections, ``2*in`` bytes (edgekit's transport form
    between quantizer and writer; the Core ML writer stores sub-byte indices and only the nonzero corrections)."""
    table = np.repeat(luts.astype(np.float16), group, axis=0)[: idx.shape[0]].view(np.uint8)
    parts = [idx.astype(np.uint8), table]
    if delta is not None:
        parts.append(np.ascontiguousarray(delta, dtype=np.float16).view(np.uint8))
    return np.concatenate(parts, axis=1)


def unpack_rows(raw: np.ndarray, bits: int, group: int, sparse: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Inverse of :func:`pack_rows`: tables ``(out/group, k)``, indices ``(out, in)`` and (``sparse``) the fp16
    corrections ``(out, in)``, else None."""
    k = 1 << bits
    r = np.ascontiguousarray(raw, dtype=np.uint8)
    n = (r.shape[1] - 2 * k) // (3 if sparse else 1)
    if n <= 0 or n * (3 if sparse else 1) + 2 * k != r.shape[1]:
        raise InputError(f"palette records of {r.shape[1]} bytes do not fit {bits}-bit tables"
                         f"{' with outlier corrections' if sparse else ''}")
    idx = r[:, :n]
    tables = np.ascontiguousarray(r[:, n: n + 2 * k]).view(np.float16)
    delta = np.ascontiguousarray(r[:, n + 2 * k:]).view(np.float16) if sparse else None
    luts = tables[::group]
    if np.any(np.repeat(luts, group, axis=0)[: r.shape[0]].view(np.uint16) != tables.view(np.uint16)):
        raise InputError("palette records disagree within a group: the tensor was not encoded for this group size")
    return luts, idx, delta
