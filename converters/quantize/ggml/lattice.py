"""The lattice i-quants: IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S.

These types store each group of 8 (IQ2) or 4 (IQ3) magnitudes as an index into a fixed codebook of
points whose coordinates are odd integers ``2l+1`` (``l`` in ``[0, 3)`` or ``[0, 8)``), the signs
separately (IQ2_XXS/IQ2_XS/IQ3_XXS with an even number of minus signs, so 7 bits hold 8 signs), a
4-bit scale per 16 or 32 weights and one fp16 scale per 256-weight super-block. The codebooks ship as
data in ``gguf.quants``; llama.cpp's encoder also needs, for every rounding point that is not in the
codebook, the list of codebook points at the ``nwant`` smallest squared distances
(``iq2xs_init_impl``/``iq3xs_init_impl``), which :func:`tables` rebuilds.

The encoder is one search with per-type knobs (:class:`Spec`), reproducing llama.cpp's
``quantize_row_iq*_impl`` bit for bit: per sub-block, fold the signs into the magnitudes, try a range of
scales (round each group to the nearest lattice point, fall back to the best of the listed neighbours
when off the codebook, and keep the trial whose least-squares fit is best), refine, then quantise the
sub-block scales against the super-block scale. It is vectorised over sub-blocks; sums stay sequential
float32 as in C (see :mod:`._common`).

Stages as in the other kernels: :func:`encode` -> ``(codes, params)``, :func:`dequantize_codes`,
:func:`pack`; GPTQ's rounding under fixed scales is in :mod:`.lattice_round`. Codes are codebook indices ``(n_blocks, n_groups)`` (``uint16``); ``LatticeParams`` holds
the fp16 super-block scale, the 4-bit sub-block scale codes and the sign bytes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from edgekit.jit import numba_kernel

from ._common import F32, fp16, make_qp_quants, nearest_int, seqsum

QK_K = 256


@dataclass(frozen=True)
class Spec:
    """One lattice type. ``sub``: weights per sub-block scale; ``dim``: weights per codebook point;
    ``kmax``: levels per coordinate; ``nwant``: distinct neighbour distances kept for off-codebook points;
    ``parity``: signs stored as 7 bits with even parity; ``trials``/``step``: the scale grid
    ``(2*kmax-1 + is*step)/max`` for ``is`` in ``[-trials, trials]``; ``sigma2_mul``: the super-block
    prior is ``sigma2_mul * sum(x*x) / 256``; ``eps``: sub-blocks whose max magnitude is below it (or
    exactly zero when None) are skipped; ``fudge``: the stored super-block scale is ``max/31 * fudge``;
    ``refine``: which groups the final re-rounding touches ("off": the off-codebook ones, "all_if_off":
    all when any is off, "all": always all); ``plain_weight``: weighting without an importance matrix
    ("xx": ``x*x``, "sigma": ``sigma2/4 + x*x``, None: an importance matrix is required); ``qp_start``:
    the trial scales are relative to ``make_qp_quants``' fit (IQ2_XXS) rather than the max."""

    qtype: T
    sub: int
    dim: int
    kmax: int
    nwant: int
    parity: bool
    trials: int
    step: float
    sigma2_mul: int
    eps: float | None
    fudge: float | None
    refine: str
    plain_weight: str | None
    qp_start: bool = False

    @property
    def bits(self) -> int:  # bits per coordinate in the lookup index
        return 2 if self.dim == 8 else 3


SPECS: dict[T, Spec] = {
    T.IQ2_XXS: Spec(T.IQ2_XXS, 32, 8, 3, 2, True, 6, 0.1, 1, 1e-15, None, "all", None, qp_start=True),
    T.IQ2_XS: Spec(T.IQ2_XS, 16, 8, 3, 2, True, 9, 0.1, 1, 1e-15, None, "off", None),
    T.IQ2_S: Spec(T.IQ2_S, 16, 8, 3, 1, False, 9, 0.1, 2, 1e-8, 0.9875, "off", "sigma"),
    T.IQ3_XXS: Spec(T.IQ3_XXS, 32, 4, 8, 2, True, 15, 0.2, 2, 1e-8, 1.0125, "off", "xx"),
    T.IQ3_S: Spec(T.IQ3_S, 32, 4, 8, 3, False, 9, 0.2, 2, None, 1.033, "all_if_off", "xx"),
}
TYPES: tuple[T, ...] = tuple(SPECS)
# qtype -> (weights per codebook point, levels per coordinate, distinct neighbour distances kept): the
# codebook geometry llama.cpp's init builds its neighbour lists from (IQ1_S/IQ1_M share one codebook)
GEOMETRY: dict[T, tuple[int, int, int]] = {
    **{t: (s.dim, s.kmax, s.nwant) for t, s in SPECS.items()}, T.IQ1_S: (8, 3, 3), T.IQ1_M: (8, 3, 3)}
REQUIRES_IMATRIX: tuple[T, ...] = tuple(t for t, s in SPECS.items() if s.plain_weight is None)


@dataclass(frozen=True)
class Tables:
    """``points``: codebook coordinates as odd integers ``2l+1`` ``(n, dim)`` float32; ``kmap``: codebook
    index of each rounding point (``-1`` when off the codebook); ``neighbours`` ``(n_index, width)``: for
    off-codebook points, the candidate indices in llama.cpp's order (``-1`` pads)."""

    points: np.ndarray
    kmap: np.ndarray
    neighbours: np.ndarray
    lookup_row: np.ndarray  # rounding-point index -> row of ``neighbours_c``
    neighbours_c: np.ndarray  # (n_off, width): the lists of the off-codebook points only
    count: np.ndarray  # (n_off,) list lengths
    buckets: tuple[int, ...]  # list-length bucket bounds for the search
    levels: np.ndarray  # the coordinate values 2l+1, float32
    flat_levels: np.ndarray  # (n_points, dim): i*kmax + level of coordinate i


@functools.cache
def tables(qtype: T) -> Tables:
    """The codebook of ``qtype`` from ``gguf.quants`` and the neighbour lists llama.cpp builds at init:
    for every point off the codebook, the codebook points at its ``nwant`` smallest distinct squared
    distances, ordered by (distance, index) -- the order its strict ``<`` search breaks ties in."""
    dim, kmax, nwant = GEOMETRY[qtype]
    bits = 2 if dim == 8 else 3
    cls = getattr(gq, qtype.name)
    cls.init_grid()
    values = np.asarray(cls.grid, dtype=np.float64).reshape(cls.grid_shape)
    levels = np.searchsorted(np.asarray(cls.grid_map, dtype=np.float64), values)  # l per coordinate
    n_index = 1 << (bits * dim)
    shifts = bits * np.arange(dim)
    index = (levels << shifts).sum(axis=1)
    kmap = np.full(n_index, -1, dtype=np.int32)
    kmap[index] = np.arange(values.shape[0], dtype=np.int32)
    points = (2 * levels + 1).astype(np.int32)

    # only indices whose coordinates are all < kmax are ever looked up (the rounding clamps to them)
    digits = np.stack(np.meshgrid(*[np.arange(kmax)] * dim, indexing="ij"), -1).reshape(-1, dim)
    lookup = (digits << shifts).sum(axis=1)
    off = kmap[lookup] < 0
    pos = 2 * digits[off] + 1
    d2 = ((pos[:, None, :] - points[None]) ** 2).sum(axis=2)  # (n_off, n_points)
    order = np.argsort(d2, axis=1, kind="stable")
    sd2 = np.take_along_axis(d2, order, axis=1)
    distinct = np.concatenate([np.ones((sd2.shape[0], 1), bool), sd2[:, 1:] > sd2[:, :-1]], axis=1)
    keep = np.cumsum(distinct, axis=1) <= nwant
    width = int(keep.sum(axis=1).max())
    nbr = np.where(keep[:, :width], order[:, :width], -1).astype(np.int32)
    neighbours = np.full((n_index, width), -1, dtype=np.int32)
    neighbours[lookup[off]] = nbr
    lookup_row = np.zeros(n_index, dtype=np.int32)
    lookup_row[lookup[off]] = np.arange(nbr.shape[0], dtype=np.int32)
    count = (nbr >= 0).sum(axis=1)
    buckets = tuple(sorted({min(width, 1 << k) for k in range(2, 12)}))
    flat_levels = (np.arange(dim) * kmax + levels).astype(np.intp)
    return Tables(points.astype(F32), kmap, neighbours, lookup_row, nbr, count, buckets,
                  (2.0 * np.arange(kmax) + 1.0).astype(F32), flat_levels)


@dataclass(frozen=True)
class LatticeParams:
    """fp16 super-block scale ``d`` ``(n_blocks,)``, 4-bit sub-block scale codes ``ls``
    ``(n_blocks, 256/sub)`` (a sub-block's scale is ``d * (2*ls + 1)``, times 1/4 for IQ2 and 1/2 for IQ3
    as ggml decodes it) and sign masks ``signs`` ``(n_blocks, 256/8)`` (bit i set: weight i negative)."""

    d: np.ndarray
    ls: np.ndarray
    signs: np.ndarray


def _nearest_points(tab: Tables, spec: Spec, xval: np.ndarray, waux: np.ndarray, scale: np.ndarray,
                    inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codebook index per group ``(B, K)`` under ``scale`` (rounding with ``inv``, llama.cpp's ``id``) and
    whether the rounding point was on the codebook."""
    with np.errstate(all="ignore"):
        lf = nearest_int(F32(0.5) * (inv[:, None, None] * xval - F32(1.0)))
    lv = np.clip(lf, 0, spec.kmax - 1)
    u = (lv << (spec.bits * np.arange(spec.dim))).sum(axis=2)
    gi = tab.kmap[u]
    on = gi >= 0
    if not on.all():
        b, k = np.nonzero(~on)
        for c0 in range(0, b.shape[0], _NEIGHBOUR_CHUNK):
            sl = slice(c0, c0 + _NEIGHBOUR_CHUNK)
            gi[b[sl], k[sl]] = best_neighbour(tab, u[b[sl], k[sl]], xval[b[sl], k[sl]],
                                              waux[b[sl], k[sl]], scale[b[sl]])
    return gi, on


_NEIGHBOUR_CHUNK = 4096


def best_neighbour(tab: Tables, u: np.ndarray, xs: np.ndarray, ws: np.ndarray, sc: np.ndarray,
                   levels: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's ``iq*_find_best_neighbour`` for ``M`` groups: the listed neighbour with the least
    ``sum(w*(scale*q - x)^2)`` (float32, summed in coordinate order), the first listed on ties. ``q`` is
    the level's value: ``2l+1``, or ``levels[m, l]`` per group (IQ1's shifted levels).

    A term ``(w_i*diff)*diff`` depends only on the coordinate and its level, so the ``dim x kmax`` terms
    are computed once per group, exactly as C computes them, and each listed neighbour's distance is the
    sequential sum of its gathered terms: C's float32 value. Queries are bucketed by list length so the
    work follows the lists (a few points on average) rather than the longest one.
    """
    m, dim = xs.shape
    rows = tab.lookup_row[u]
    kernel = _compiled_search()
    if kernel is not None:
        choice = np.empty(m, dtype=np.int32)
        lv2 = np.ascontiguousarray(tab.levels[None, :] if levels is None else levels, dtype=F32)
        kernel(np.ascontiguousarray(xs, dtype=F32), np.ascontiguousarray(ws, dtype=F32),
               np.ascontiguousarray(sc, dtype=F32), lv2, rows, tab.neighbours_c, tab.count, tab.flat_levels, choice)
        return choice
    lv = np.broadcast_to(tab.levels if levels is None else levels, (m, tab.levels.shape[0]))
    kmax = lv.shape[1]
    with np.errstate(all="ignore"):
        diff = sc[:, None, None] * lv[:, None, :] - xs[:, :, None]  # (M, dim, kmax)
        terms = (ws[:, :, None] * diff * diff).reshape(m, -1)
    terms = np.where(np.isnan(terms), F32(np.inf), terms)  # C's strict < never picks a NaN
    count = tab.count[rows]
    choice = np.empty(m, dtype=np.int32)
    lo = 0
    for width in tab.buckets:
        sel = np.nonzero((count > lo) & (count <= width))[0]
        lo = width
        if sel.size == 0:
            continue
        cand = tab.neighbours_c[rows[sel], :width]  # (S, width), -1 pads
        flat = tab.flat_levels[np.maximum(cand, 0)]  # (S, width, dim): i*kmax + level
        base = (sel * (dim * kmax))[:, None]
        tf = terms.reshape(-1)
        d2 = tf[base + flat[:, :, 0]]
        for i in range(1, dim):
            d2 = d2 + tf[base + flat[:, :, i]]
        d2[cand < 0] = np.inf
        choice[sel] = cand[np.arange(sel.size), np.argmin(d2, axis=1)]
    return choice


@numba_kernel
def _compiled_search(numba: Any) -> Any:
    """:func:`best_neighbour` compiled by numba (installed with edgekit's default extras), or None without
    it: per group the ``dim x kmax`` terms in float32 as C computes them, each listed neighbour's distance
    summed term by term in coordinate order (C's order, so C's value) and the first least one kept by a
    strict ``<``, as C does. The numpy path computes the same terms in the same order; the tests hold the
    two equal."""

    @numba.njit(cache=False, fastmath=False)
    def search(xs: Any, ws: Any, sc: Any, lv: Any, rows: Any, lists: Any, count: Any, flat: Any,
               out: Any) -> None:  # pragma: no cover - compiled
        m, dim = xs.shape
        kmax = lv.shape[1]
        inf = np.float32(np.inf)
        terms = np.empty(dim * kmax, np.float32)
        for j in range(m):
            lj = j if lv.shape[0] > 1 else 0
            for i in range(dim):
                for k in range(kmax):
                    diff = sc[j] * lv[lj, k] - xs[j, i]
                    t = ws[j, i] * diff * diff
                    terms[i * kmax + k] = inf if np.isnan(t) else t
            r = rows[j]
            pick = lists[r, 0]
            best = inf
            for c in range(count[r]):
                cand = lists[r, c]
                d = terms[flat[cand, 0]]
                for i in range(1, dim):
                    d = d + terms[flat[cand, i]]
                if d < best:
                    best = d
                    pick = cand
            out[j] = pick

    return search


def _fit(tab: Tables, gi: np.ndarray, xval: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``sumqx, sumq2`` of a sub-block's least-squares scale fit, sequential over its weights."""
    q = tab.points[gi].reshape(gi.shape[0], -1)  # (B, sub)
    x = xval.reshape(q.shape)
    wq = weight * q
    return seqsum(np.ascontiguousarray((weight * x * q).T)), seqsum(np.ascontiguousarray((wq * q).T))


def _fold_signs(spec: Spec, x: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Magnitudes ``xval`` ``(B, sub)`` and sign masks ``(B, sub/8)``; with parity, an odd count of
    negatives flips the least important weight of the 8 (its magnitude goes negative instead)."""
    neg = x < 0
    xval = np.where(neg, -x, x)
    g = neg.reshape(x.shape[0], -1, 8)
    bit = 1 << np.arange(8)
    s = (g * bit).sum(axis=2)
    if spec.parity:
        odd = g.sum(axis=2) % 2 == 1
        imp = (weight * x * x).reshape(g.shape)
        imin = np.argmin(imp, axis=2)
        xv = xval.reshape(g.shape)
        b, k = np.nonzero(odd)
        xv[b, k, imin[b, k]] = -xv[b, k, imin[b, k]]
        s = np.where(odd, s ^ (1 << imin), s) & 0x7F  # the eighth sign is implied by the parity
    return xval, s.astype(np.int64)


def _search(spec: Spec, x: np.ndarray, weight: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per sub-block ``x`` ``(B, sub)``: codebook indices ``(B, K)``, scale, sign masks, and the skip mask."""
    tab = tables(spec.qtype)
    nb, kk = x.shape[0], spec.sub // spec.dim
    xval, signs = _fold_signs(spec, x, weight)
    waux = np.sqrt(weight)
    mx = xval.max(axis=1)
    skip = mx == 0 if spec.eps is None else mx < F32(spec.eps)
    x3, w3 = xval.reshape(nb, kk, spec.dim), waux.reshape(nb, kk, spec.dim)
    fk = F32(2 * spec.kmax - 1)
    with np.errstate(all="ignore"):
        if spec.qp_start:
            qp_scale, _ = make_qp_quants(np.ascontiguousarray(xval.T), spec.kmax + 1, np.ascontiguousarray(weight.T))
            ref = qp_scale * F32(spec.kmax)
            skip |= ref <= 0
            scale = qp_scale
        else:
            ref = mx
            scale = mx / fk
        best = np.zeros(nb, F32)
        gi = np.broadcast_to(tab.kmap[0], (nb, kk)).copy()
        on = np.ones((nb, kk), bool) if spec.refine != "all_if_off" else np.zeros((nb, kk), bool)
        for i in range(-spec.trials, spec.trials + 1):
            inv = (fk + F32(i) * F32(spec.step)) / ref
            g, o = _nearest_points(tab, spec, x3, w3, F32(1.0) / inv, inv)
            sumqx, sumq2 = _fit(tab, g, xval, weight)
            acc = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            scale = np.where(acc, sumqx / sumq2, scale)
            best = np.where(acc, scale * sumqx, best)
            gi = np.where(acc[:, None], g, gi)
            on = np.where(acc[:, None], o, on)
        redo = scale > 0
        if spec.refine != "all":
            redo &= ~on.all(axis=1)
        if redo.any():
            g, _ = _nearest_points(tab, spec, x3, w3, scale, F32(1.0) / scale)
            touch = redo[:, None] if spec.refine != "off" else redo[:, None] & ~on
            gi = np.where(touch, g, gi)
            sumqx, sumq2 = _fit(tab, gi, xval, weight)
            scale = np.where(redo & (sumq2 > 0), sumqx / sumq2, scale)
    negative = scale < 0
    scale = np.where(negative, -scale, scale)
    signs = np.where(negative[:, None], ~signs & (0x7F if spec.parity else 0xFF), signs)
    scale = np.where(skip, F32(0.0), scale)
    return gi, scale.astype(F32), signs, skip


def _weights(spec: Spec, x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    xx = x * x
    if qw is None and spec.plain_weight == "xx":
        return xx
    sumx2 = seqsum(np.ascontiguousarray(xx.T))
    sigma2 = (F32(spec.sigma2_mul) * sumx2 / F32(QK_K))[:, None]
    if qw is None:
        if spec.plain_weight is None:
            raise ValueError(f"{spec.qtype.name} needs an importance matrix")
        return F32(0.25) * sigma2 + xx
    return np.asarray(qw, dtype=F32) * np.sqrt(sigma2 + xx)


def encode(qtype: T, blocks: np.ndarray, qw: np.ndarray | None = None) -> tuple[np.ndarray, LatticeParams]:
    """llama.cpp's codebook indices and parameters for float32 ``blocks`` ``(n_blocks, 256)``; ``qw`` is
    the importance shaped like ``blocks`` (required for IQ2_XXS and IQ2_XS, as in llama.cpp)."""
    spec = SPECS[qtype]
    x = np.asarray(blocks, dtype=F32)
    nb = x.shape[0]
    nsub = QK_K // spec.sub
    w = _weights(spec, x, qw)
    gi, scale, signs, skip = _search(spec, x.reshape(-1, spec.sub), w.reshape(-1, spec.sub))
    gi = np.where(skip[:, None], 0, gi).reshape(nb, -1)
    signs = np.where(skip[:, None], 0, signs).reshape(nb, -1)
    scales = scale.reshape(nb, nsub)
    max_scale = np.maximum(scales.max(axis=1), F32(0.0))
    d = max_scale / F32(31)
    stored = d if spec.fudge is None else d * F32(spec.fudge)
    with np.errstate(all="ignore"):
        inv = F32(1.0) / d
        ls = np.clip(nearest_int(F32(0.5) * (inv[:, None] * scales - F32(1.0))), 0, 15)
    empty = max_scale == 0
    ls = np.where(empty[:, None], 0, ls)
    if spec.qtype in (T.IQ2_XXS, T.IQ2_XS, T.IQ3_XXS):  # these zero the codes of an all-zero super-block
        gi = np.where(empty[:, None], 0, gi)
        signs = np.where(empty[:, None], 0, signs)
    d16 = np.where(empty, np.float16(0.0), fp16(stored))
    params = LatticeParams(d16, ls.astype(np.uint8), signs.astype(np.uint8))
    if spec.qtype == T.IQ3_S:
        params = _iq3s_skipped_shift(params, gi, skip.reshape(nb, nsub))
        return params[0], params[1]
    return gi.astype(np.uint16), params


def _iq3s_skipped_shift(params: LatticeParams, gi: np.ndarray, skip: np.ndarray
                        ) -> tuple[np.ndarray, LatticeParams]:
    # quantize_row_iq3_s_impl advances its qs/signs pointers only past sub-blocks it did not skip, so a
    # skipped (all-zero) sub-block's slot holds the next one's data and the tail stays zero; llama.cpp
    # decodes those bytes as they are, and so must the codes that describe them
    nb, nsub = skip.shape
    keep = ~skip
    dest = np.cumsum(keep, axis=1) - 1  # slot each kept sub-block is written to
    g = gi.reshape(nb, nsub, -1)
    s = params.signs.reshape(nb, nsub, -1)
    g_out, s_out = np.zeros_like(g), np.zeros_like(s)
    b, i = np.nonzero(keep)
    g_out[b, dest[b, i]] = g[b, i] & 0xFF
    s_out[b, dest[b, i]] = s[b, i]
    # the high index bit is written at the sub-block's own position
    hi = np.where(keep[:, :, None], g >> 8, 0)
    codes = (g_out | (hi << 8)).reshape(nb, -1).astype(np.uint16)
    return codes, LatticeParams(params.d, params.ls, s_out.reshape(nb, -1))


def pack(qtype: T, codes: np.ndarray, params: LatticeParams) -> np.ndarray:
    """``block_iq*`` bytes ``(n_blocks, type_size)`` in ggml's field order."""
    nb = codes.shape[0]
    gi = codes.astype(np.uint32)
    d = params.d.astype(np.float16).view(np.uint8).reshape(nb, 2)
    ls = params.ls.astype(np.uint32)
    sg = params.signs.astype(np.uint32)

    def u32(a: np.ndarray) -> np.ndarray:
        return a.astype("<u4").view(np.uint8).reshape(nb, -1)

    def nibbles(a: np.ndarray) -> np.ndarray:
        return (a[:, 0::2] | (a[:, 1::2] << 4)).astype(np.uint8)

    if qtype == T.IQ2_XXS:
        g = gi.reshape(nb, 8, 4)
        s = sg.reshape(nb, 8, 4)
        lo = sum(g[:, :, k] << (8 * k) for k in range(4))
        hi = sum(s[:, :, k] << (7 * k) for k in range(4)) | (ls << 28)
        return np.concatenate([d, u32(np.stack([lo, hi], axis=2).reshape(nb, 16))], axis=1)
    if qtype == T.IQ2_XS:
        qs = (gi | (sg << 9)).astype("<u2").view(np.uint8).reshape(nb, 64)
        return np.concatenate([d, qs, nibbles(ls)], axis=1)
    if qtype == T.IQ2_S:
        qh = sum(((gi >> 8) & 3)[:, k::4] << (2 * k) for k in range(4)).astype(np.uint8)
        return np.concatenate([d, (gi & 0xFF).astype(np.uint8), sg.astype(np.uint8), qh, nibbles(ls)], axis=1)
    if qtype == T.IQ3_XXS:
        s = sg.reshape(nb, 8, 4)
        sas = sum(s[:, :, k] << (7 * k) for k in range(4)) | (ls << 28)
        return np.concatenate([d, gi.astype(np.uint8), u32(sas)], axis=1)
    assert qtype == T.IQ3_S
    qh = sum(((gi >> 8) & 1)[:, k::8] << k for k in range(8)).astype(np.uint8)
    return np.concatenate([d, (gi & 0xFF).astype(np.uint8), qh, sg.astype(np.uint8), nibbles(ls)], axis=1)


def dequantize_codes(qtype: T, codes: np.ndarray, params: LatticeParams) -> np.ndarray:
    """The float32 values ``codes`` decode to (through the packed bytes: ggml's decoders are the
    definition, and IQ3_S's packing shifts fields)."""
    raw = pack(qtype, codes, params)
    return np.asarray(gq.dequantize(raw, qtype), dtype=F32)
