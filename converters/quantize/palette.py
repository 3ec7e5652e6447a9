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
sorted values each iteration is ``O(K log m)`` and the whole fit costs one sort per group. Centroids start
at weighted quantiles (no random restarts: the result is deterministic). After the fit the table is
rounded to fp16 and every weight takes the nearest *stored* entry, so decoding the indices gives exactly
the values the quantizer reports.
"""

from __future__ import annotations

import numpy as np

from edgekit.errors import InputError

F32 = np.float32
_ITERS = 30


def _kmeans_sorted(xs: np.ndarray, ws: np.ndarray, k: int) -> np.ndarray:
    """Centroids (float64, ascending) of sorted values ``xs`` with weights ``ws``."""
    cw = np.concatenate([[0.0], np.cumsum(ws)])
    cwx = np.concatenate([[0.0], np.cumsum(ws * xs)])
    total = cw[-1]
    qs = (np.arange(k) + 0.5) / k * total
    c = xs[np.minimum(np.searchsorted(cw[1:], qs), xs.size - 1)].astype(np.float64)
    for _ in range(_ITERS):
        c = np.unique(c) if np.any(np.diff(c) <= 0) else c
        edges = np.concatenate([[0], np.searchsorted(xs, (c[1:] + c[:-1]) / 2), [xs.size]])
        sw = cw[edges[1:]] - cw[edges[:-1]]
        new = np.where(sw > 0, (cwx[edges[1:]] - cwx[edges[:-1]]) / np.where(sw > 0, sw, 1.0), c)
        if np.allclose(new, c, rtol=0, atol=1e-9 * (abs(xs[-1] - xs[0]) + 1e-30)):
            c = new
            break
        c = new
    if c.size < k:  # fewer distinct values than entries: pad with copies (never chosen twice)
        c = np.concatenate([c, np.full(k - c.size, c[-1])])
    return np.sort(c)


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
    for g in range(n_groups):
        block = x[g * group:(g + 1) * group]
        flat = block.reshape(-1)
        order = np.argsort(flat, kind="stable")
        wrow = np.broadcast_to(col_w, block.shape).reshape(-1)
        c = _kmeans_sorted(flat[order].astype(np.float64), wrow[order], k)
        with np.errstate(over="ignore"):
            lut = c.astype(np.float16)
        luts[g] = lut
        idx[g * group:(g + 1) * group] = nearest(lut, block)
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
