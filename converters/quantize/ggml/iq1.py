"""IQ1_S and IQ1_M: ternary groups of 8 from a 2048-point codebook, with a shifted grid.

A group of 8 weights is one of 2048 patterns of ``{-1, 0, 1}`` (the codebook in ``gguf.quants``), all
shifted by ``+-delta`` (1/8): ``q = l - 1 + delta*shift``. IQ1_S has one 3-bit scale and one shift per
32 weights; IQ1_M a 3-bit scale per 16 and a shift per 8, with the fp16 super-block scale spread over the
scale bytes' top nibbles. llama.cpp's search (``quantize_row_iq1_s_impl`` / ``_m_impl``) is exhaustive:
with only three levels the best split points of the sorted weights are enumerated, the least-squares
scale of each split computed from prefix sums, and the best kept (a strictly sequential "is this better"
scan, reproduced step by step across sub-blocks). Off-codebook patterns go to the nearest listed
neighbour (:func:`.lattice.best_neighbour`), and the scale is refitted.

:func:`encode` returns the ggml bytes directly (``(n_blocks, 50)`` or ``(n_blocks, 56)``), bit-exact with
``ggml_quantize_chunk``; the importance matrix is required for IQ1_S, as in llama.cpp.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

from edgekit.jit import numba_kernel

from ._common import F32, fp16, nearest_int, seqsum
from .lattice import best_neighbour, tables

QK_K = 256
TYPES: tuple[T, ...] = (T.IQ1_S, T.IQ1_M)
_DELTA = F32(0.125)
_XP = np.array([F32(-1) + _DELTA, _DELTA, F32(1) + _DELTA], dtype=F32)
_XM = np.array([F32(-1) - _DELTA, -_DELTA, F32(1) - _DELTA], dtype=F32)


def _prefix(t: np.ndarray) -> np.ndarray:
    """``s[0] = 0; s[j+1] = s[j] + t[j]`` along axis 1, sequential float32."""
    out = np.zeros((t.shape[0], t.shape[1] + 1), dtype=F32)
    for j in range(t.shape[1]):
        out[:, j + 1] = out[:, j] + t[:, j]
    return out


def _scan(sumqx: np.ndarray, sumq2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C's ``if (sumq2 > 0 && sumqx*sumqx > best*sumq2) {scale = sumqx/sumq2; best = scale*sumqx;}`` over
    the candidates (axis 1, in C's order) from ``best = -FLT_MAX``: the chosen candidate (-1: none) and scale."""
    nb, nc = sumqx.shape
    kernel = _compiled_scan()
    if kernel is not None:
        pick, scale = np.empty(nb, dtype=np.int64), np.empty(nb, dtype=F32)
        kernel(np.ascontiguousarray(sumqx, dtype=F32), np.ascontiguousarray(sumq2, dtype=F32), pick, scale)
        return pick, scale
    best = np.full(nb, -np.finfo(F32).max, dtype=F32)
    scale = np.zeros(nb, dtype=F32)
    pick = np.full(nb, -1, dtype=np.int64)
    with np.errstate(all="ignore"):
        for c in range(nc):
            qx, q2 = sumqx[:, c], sumq2[:, c]
            acc = (q2 > 0) & (qx * qx > best * q2)
            if acc.any():
                s = qx / q2
                scale = np.where(acc, s, scale)
                best = np.where(acc, s * qx, best)
                pick = np.where(acc, c, pick)
    return pick, scale


@numba_kernel
def _compiled_scan(numba: Any) -> Any:
    """:func:`_scan` compiled by numba (default extras), or None without it: the same float32 products
    and comparisons per candidate, in C's order, one block at a time (the tests hold both paths to ggml's
    bytes)."""

    @numba.njit(cache=False, fastmath=False)
    def scan(sumqx: Any, sumq2: Any, pick: Any, scale: Any) -> None:  # pragma: no cover - compiled
        nb, nc = sumqx.shape
        for b in range(nb):
            best = np.float32(-3.4028234663852886e38)  # -FLT_MAX, float32 throughout as in C
            s = np.float32(0.0)
            p = -1
            for c in range(nc):
                qx, q2 = sumqx[b, c], sumq2[b, c]
                if q2 > 0 and qx * qx > best * q2:
                    s = qx / q2
                    best = s * qx
                    p = c
            pick[b] = p
            scale[b] = s

    return scan


def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    i1, i2 = np.triu_indices(n + 1)
    return i1, i2  # row-major: i1 outer, i2 = i1..n inner, as C loops


def _weights(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    xx = x * x
    if qw is None:
        return xx
    sigma2 = F32(2) * seqsum(np.ascontiguousarray(xx.T)) / F32(QK_K)
    return np.asarray(qw, dtype=F32) * np.sqrt(sigma2[:, None] + xx)


def _levels_l(x: np.ndarray, order: np.ndarray, i1: np.ndarray, i2: np.ndarray) -> np.ndarray:
    """Codes 0/1/2 for the sorted positions below ``i1``, below ``i2``, and the rest, in original order."""
    n = x.shape[1]
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(n)[None, :], axis=1)
    return (rank >= i1[:, None]).astype(np.int64) + (rank >= i2[:, None])


def _snap(qtype: T, x: np.ndarray, w: np.ndarray, L: np.ndarray, scale: np.ndarray, xx: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """Codebook index per group of 8 ``(B, K)`` (neighbour search for off-codebook patterns) and the
    refitted scale; ``xx`` ``(B, K, 3)`` are each group's level values."""
    tab = tables(qtype)
    nb, n = x.shape
    k = n // 8
    u = (L.reshape(nb, k, 8) << (2 * np.arange(8))).sum(axis=2)
    gi = tab.kmap[u]
    off = gi < 0
    if off.any():
        b, g = np.nonzero(off)
        gi[b, g] = best_neighbour(tab, u[b, g], x.reshape(nb, k, 8)[b, g], w.reshape(nb, k, 8)[b, g], scale[b],
                                  xx[b, g])
        redo = off.any(axis=1)
        lv = np.take_along_axis(xx, tab.flat_levels[gi] % 3, axis=2).reshape(nb, n)  # q per weight
        wq = w * lv
        with np.errstate(all="ignore"):
            sqx = seqsum(np.ascontiguousarray((wq * x).T))
            sq2 = seqsum(np.ascontiguousarray((wq * lv).T))
            scale = np.where(redo & (sqx > 0) & (sq2 > 0), sqx / sq2, scale)
    return gi, scale


def _search(qtype: T, x: np.ndarray, w: np.ndarray, eps: float, nhalves: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per sub-block ``(B, n)``: codebook indices, scale, shift code, and the skip mask."""
    nb, n = x.shape
    order = np.argsort(x, axis=1, kind="stable")  # glibc's qsort (a merge sort here) keeps ties in order
    xs, ws = np.take_along_axis(x, order, axis=1), np.take_along_axis(w, order, axis=1)
    i1, i2 = _pairs(n)
    with np.errstate(all="ignore"):
        if nhalves == 1:
            sx, sw = _prefix(ws * xs), _prefix(ws)
            a, bx, c = sx[:, i1] - sx[:, :1], sx[:, i2] - sx[:, i1], sx[:, n:] - sx[:, i2]
            aw, bw, cw = sw[:, i1] - sw[:, :1], sw[:, i2] - sw[:, i1], sw[:, n:] - sw[:, i2]
            cands = []
            for v in (_XP, _XM):  # C tries +delta then -delta at each split
                cands.append(((a * v[0] + bx * v[1]) + c * v[2],
                              ((aw * v[0]) * v[0] + (bw * v[1]) * v[1]) + (cw * v[2]) * v[2]))
            qx = np.stack([cands[0][0], cands[1][0]], axis=2).reshape(nb, -1)
            q2 = np.stack([cands[0][1], cands[1][1]], axis=2).reshape(nb, -1)
        else:
            half = order >= n // 2
            px = [_prefix(np.where(half == h, ws * xs, F32(0))) for h in (0, 1)]
            pw = [_prefix(np.where(half == h, ws, F32(0))) for h in (0, 1)]
            p2, m2 = _XP[2], _XM[2]
            cp1, cp2 = _XP[0] * _XP[0] - _XP[1] * _XP[1], _XP[1] * _XP[1] - _XP[2] * _XP[2]
            cm1, cm2 = _XM[0] * _XM[0] - _XM[1] * _XM[1], _XM[1] * _XM[1] - _XM[2] * _XM[2]
            qxp, qxm, q2p, q2m = [], [], [], []
            for h in (0, 1):
                s = px[h][:, i1] + px[h][:, i2]
                tx, tw = px[h][:, n:], pw[h][:, n:]
                qxp.append(tx * p2 - s)
                qxm.append(tx * m2 - s)
                q2p.append((tw * p2 * p2 + pw[h][:, i1] * cp1) + pw[h][:, i2] * cp2)
                q2m.append((tw * m2 * m2 + pw[h][:, i1] * cm1) + pw[h][:, i2] * cm2)
            qx = np.stack([qxp[0] + qxp[1], qxp[0] + qxm[1], qxm[0] + qxp[1], qxm[0] + qxm[1]], axis=2).reshape(nb, -1)
            q2 = np.stack([q2p[0] + q2p[1], q2p[0] + q2m[1], q2m[0] + q2p[1], q2m[0] + q2m[1]], axis=2).reshape(nb, -1)
    mx = np.abs(x).max(axis=1)
    pick, scale = _scan(qx, q2)
    skip = (mx < F32(eps)) | (pick < 0)
    per = 2 if nhalves == 1 else 4
    pair, kind = np.maximum(pick, 0) // per, np.maximum(pick, 0) % per
    L = _levels_l(x, order, i1[pair], i2[pair])
    neg = scale < 0
    L = np.where(neg[:, None], 2 - L, L)
    scale = np.where(neg, -scale, scale)
    if nhalves == 1:
        shift = np.where(kind == 0, 1, -1)
        shift = np.where(neg, -shift, shift)
        minus = np.repeat((shift == -1)[:, None], n // 8, axis=1)  # per group of 8
    else:
        kind = np.where(neg, 3 - kind, kind)
        shift = kind
        minus = np.stack([kind >= 2, kind % 2 == 1], axis=1)
    xx = np.where(minus[:, :, None], _XM, _XP)
    gi, scale = _snap(qtype, x, w, L, scale, xx)
    return gi, scale, shift, skip


def encode(qtype: T, blocks: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """ggml bytes of float32 ``blocks`` ``(n_blocks, 256)`` as IQ1_S (``qw`` required) or IQ1_M."""
    x = np.asarray(blocks, dtype=F32)
    w = _weights(x, qw)
    if qtype == T.IQ1_S:
        if qw is None:
            raise ValueError("IQ1_S needs an importance matrix")
        return _encode_s(x, w)
    return _encode_m(x, w)


def _super_scale_codes(scales: np.ndarray, d: np.ndarray, top: int) -> np.ndarray:
    with np.errstate(all="ignore"):
        inv = F32(1.0) / d
        return np.clip(nearest_int(F32(0.5) * (inv[:, None] * scales - F32(1.0))), 0, top)


def _encode_s(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    gi, scale, shift, skip = _search(T.IQ1_S, x.reshape(-1, 32), w.reshape(-1, 32), 1e-12, 1)
    gi = np.where(skip[:, None], 0, gi).reshape(nb, 8, 4)
    scales = np.where(skip, F32(0), scale).reshape(nb, 8)
    shift = np.where(skip, 1, shift).reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    d = max_scale / F32(15)
    empty = max_scale == 0
    ls = np.where(empty[:, None], 0, _super_scale_codes(scales, d, 7) | np.where(shift == -1, 8, 0))
    qh = sum((gi[:, :, k] >> 8) << (3 * k) for k in range(4)) | (ls << 12)
    d16 = np.where(empty, np.float16(0), fp16(d * F32(1.125)))
    return np.concatenate([d16.astype(np.float16).view(np.uint8).reshape(nb, 2),
                           (gi & 0xFF).astype(np.uint8).reshape(nb, 32),
                           qh.astype("<u2").view(np.uint8).reshape(nb, 16)], axis=1)


def _encode_m(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    gi, scale, kind, skip = _search(T.IQ1_M, x.reshape(-1, 16), w.reshape(-1, 16), 1e-7, 2)
    gi = np.where(skip[:, None], 0, gi).reshape(nb, 16, 2)
    scales = np.where(skip, F32(0), scale).reshape(nb, 16)
    kind = np.where(skip, 0, kind).reshape(nb, 16)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    empty = max_scale == 0
    d = max_scale / F32(15)
    ls = _super_scale_codes(scales, d, 7)
    # the super-block scale is refitted to the stored codes over all 256 weights, in order
    tab = tables(T.IQ1_M)
    minus = np.stack([kind >= 2, kind % 2 == 1], axis=2)  # (nb, 16, 2)
    xx = np.where(minus[..., None], _XM, _XP)  # (nb, 16, 2, 3)
    lv = np.take_along_axis(xx, tab.flat_levels[gi] % 3, axis=3)  # (nb, 16, 2, 8)
    q = (lv * (F32(2) * ls.astype(F32) + F32(1))[:, :, None, None]).reshape(nb, QK_K)
    wq = w * q
    with np.errstate(all="ignore"):
        sqx = seqsum(np.ascontiguousarray((wq * x).T))
        sq2 = seqsum(np.ascontiguousarray((wq * q).T))
        d = np.where(sq2 > 0, sqx / sq2, d)
    u16 = fp16(d * F32(1.1125)).view(np.uint16).astype(np.uint32)
    masks = np.array([0x00, 0x80, 0x08, 0x88])
    qh = (gi[:, :, 0] >> 8) | ((gi[:, :, 1] >> 8) << 4) | np.where(empty[:, None], 0, masks[kind])
    sc = sum((np.where(empty[:, None], 0, ls)[:, j::4] << (3 * j)) for j in range(4))  # (nb, 4)
    top = np.stack([(u16 & 0x000F) << 12, (u16 & 0x00F0) << 8, (u16 & 0x0F00) << 4, u16 & 0xF000], axis=1)
    sc = sc | np.where(empty[:, None], 0, top)
    return np.concatenate([(gi & 0xFF).astype(np.uint8).reshape(nb, 32), qh.astype(np.uint8),
                           sc.astype("<u2").view(np.uint8).reshape(nb, 8)], axis=1)


# ----------------------------------------------------------------------------------------------------
# GPTQ onto IQ1: llama.cpp's scales (and IQ1_S's shifts) fixed, one group of 8 weights at a time
# ----------------------------------------------------------------------------------------------------

SUB: dict[T, int] = {T.IQ1_S: 32, T.IQ1_M: 16}  # weights per sub-block scale


def sub_block_scales(qtype: T, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Each sub-block's scale ``(n_blocks, 256/SUB)`` exactly as ggml decodes it (a weight is
    ``scale * (grid value + shift)``) from the bytes :func:`encode` wrote, and for IQ1_S whether each
    sub-block's shift is negative (IQ1_M's shift is per group of 8, chosen with its codeword)."""
    nb = raw.shape[0]
    if qtype == T.IQ1_S:
        d = raw[:, :2].copy().view(np.float16).astype(F32)
        qh = raw[:, 34:].copy().view("<u2").astype(np.int64)
        return d * (F32(2) * ((qh >> 12) & 7).astype(F32) + F32(1)), (qh & 0x8000) != 0
    sc = raw[:, 48:].copy().view("<u2").astype(np.int64)  # (nb, 4)
    d16 = sum(((sc[:, j] & 0xF000) >> (12 - 4 * j)) for j in range(4)).astype(np.uint16)
    d = d16.view(np.float16).astype(F32).reshape(nb, 1)
    ls = ((sc[:, :, None] >> np.array([0, 3, 6, 9])) & 7).reshape(nb, 16)
    return d * (F32(2) * ls.astype(F32) + F32(1)), None


def round_group(qtype: T, x: np.ndarray, scale: np.ndarray, w: np.ndarray, minus: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray]:
    """The codeword nearest (``w``-weighted) to one group of 8 weights per row, ``x`` ``(R, 8)``, under
    the fixed ``scale`` ``(R,)``: with IQ1_S's sub-block shift ``minus`` ``(R,)``, or (IQ1_M, ``minus``
    None) the group's own shift chosen jointly with it. Returns per-weight codes ``(R, 8)`` uint8 (level
    ``| 4`` when the shift is negative; :func:`patch_codes` reads them) and the values they decode to."""
    from .lattice_round import codebook

    vals, lev = codebook(qtype)
    x = np.asarray(x, dtype=F32)
    s = np.asarray(scale, dtype=F32)[:, None]
    w = np.asarray(w, dtype=F32)
    costs = []
    for delta in (_DELTA, -_DELTA):
        v = vals + delta
        costs.append((s * s) * ((v * v) @ w)[None, :] - F32(2.0) * s * ((x * w) @ v.T))  # (R, n)
    if minus is None:
        neg = costs[1].min(axis=1) < costs[0].min(axis=1)
    else:
        neg = np.asarray(minus, dtype=bool)
    idx = np.argmin(np.where(neg[:, None], costs[1], costs[0]), axis=1)
    delta = np.where(neg, -_DELTA, _DELTA).astype(F32)[:, None]
    values = s * (vals[idx] + delta)
    codes = lev[idx] | (neg.astype(np.uint8) << 2)[:, None]
    return codes.astype(np.uint8), values.astype(F32)


def patch_codes(qtype: T, raw: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The bytes :func:`encode` wrote (``(n_blocks, type_size)``: scales kept) with the codebook indices
    (and IQ1_M's per-group shifts) of the per-weight ``codes`` ``(n_blocks, 256)`` from :func:`round_group`."""
    tab = tables(qtype)
    nb = raw.shape[0]
    c = codes.astype(np.int64).reshape(nb, 32, 8)
    gi = tab.kmap[((c & 3) << (2 * np.arange(8))).sum(axis=2)]
    if (gi < 0).any():
        raise ValueError(f"{qtype.name}: codes off the codebook")
    out = np.array(raw, dtype=np.uint8, copy=True)
    if qtype == T.IQ1_S:
        out[:, 2:34] = gi & 0xFF
        qh = raw[:, 34:].copy().view("<u2").astype(np.int64) & 0xF000
        g = gi.reshape(nb, 8, 4)
        qh |= sum((g[:, :, k] >> 8) << (3 * k) for k in range(4))
        out[:, 34:] = qh.astype("<u2").view(np.uint8).reshape(nb, 16)
        return out
    neg = (c[:, :, 0] >> 2) & 1  # (nb, 32)
    nib = (gi >> 8) | (neg << 3)
    out[:, :32] = gi & 0xFF
    out[:, 32:48] = nib[:, 0::2] | (nib[:, 1::2] << 4)
    return out
