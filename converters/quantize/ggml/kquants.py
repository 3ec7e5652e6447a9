"""K-quant super-blocks of 256 weights: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

A super-block holds an fp16 ``d`` (and ``dmin`` for the types with offsets) and small integer per
sub-block scales (and mins); sub-block ``j``'s effective scale is ``d * sc[j]`` and a weight decodes to
``d*sc[j]*q - dmin*m[j]``. The stages are separate so a calibrated method (GPTQ) can reuse them:

* :func:`encode` -- llama.cpp's choice of codes and parameters, bit-exact with ``ggml_quantize_chunk``:
  ``quantize_row_*_ref`` without an importance matrix (this is what ``quantize_q*_K`` runs for a NULL
  imatrix) and ``quantize_row_*_impl`` with one.
* :func:`choose_params` -- just the parameters (the sub-block scale search and its quantisation).
* :func:`round_to_grid` -- given fixed parameters, ``nearest_int((x + m_eff) / d_eff)`` clamped, plus the
  decoded values. This *is* llama.cpp's final pass, so ``encode`` ends with it; C skips sub-blocks whose
  effective scale is 0 and keeps the search's codes there, which ``fallback`` reproduces.
* :func:`sub_block_scales`, :func:`dequantize_codes`, :func:`pack` -- effective scales, decoding, bytes.

``blocks`` is float32 ``(n_blocks, 256)``; codes are ``uint8 (n_blocks, 256)`` holding llama.cpp's ``L``
(unsigned: value ``q - 4`` for Q3_K, ``q - 32`` for Q6_K). ``KParams.scales``/``mins`` are the integer
sub-block codes as C computed them (before the 8-bit packing, which :func:`pack` applies).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from ._common import (
    EPS,
    F32,
    first_absmax,
    fp16,
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    seqsum,
)

QK_K = 256
TYPES: tuple[T, ...] = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)

# qtype -> (sub-block size, lowest code value, highest code value, code offset, has mins)
_SPEC: dict[T, tuple[int, int, int, int, bool]] = {
    T.Q2_K: (16, 0, 3, 0, True),
    T.Q3_K: (16, -4, 3, 4, False),
    T.Q4_K: (32, 0, 15, 0, True),
    T.Q5_K: (32, 0, 31, 0, True),
    T.Q6_K: (16, -32, 31, 32, False),
}
# ref-path make_qkx2_quants arguments: (rmin, rdelta, nstep, use_mad)
_QKX2_ARGS = {T.Q2_K: (-0.5, 0.1, 15, True), T.Q4_K: (-1.0, 0.1, 20, False), T.Q5_K: (-0.5, 0.1, 15, False)}


@dataclass(frozen=True)
class KParams:
    """Super-block parameters: fp16 ``d``/``dmin`` ``(n_blocks,)``, integer ``scales``/``mins`` ``(n_blocks, n_sub)``.

    Scale codes: Q2_K 4-bit, Q3_K 6-bit biased by 32, Q4_K/Q5_K 6-bit, Q6_K int8.
    """

    d: np.ndarray
    scales: np.ndarray
    dmin: np.ndarray | None = None
    mins: np.ndarray | None = None


def _elem_major(blocks: np.ndarray, g: int) -> np.ndarray:
    nb = blocks.shape[0]
    return np.ascontiguousarray(blocks.reshape(nb, QK_K // g, g).transpose(2, 0, 1))


def _block_major(L: np.ndarray) -> np.ndarray:
    return L.transpose(1, 2, 0).reshape(L.shape[1], QK_K)


def _pos_max(v: np.ndarray) -> np.ndarray:
    # C: "float m = 0; if (v > m) m = v;" over sub-blocks -- +0 unless something is positive
    mx = v.max(axis=-1)
    return np.where(mx > 0, mx, F32(0.0))


# ----- scale packing, with C's 8-bit wraparound so even degenerate codes give C's bytes -----


def _k4_pack_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    s0 = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    s1 = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    s2 = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return (np.concatenate([s0, s1, s2], axis=1) & 0xFF).astype(np.uint8)


def _k4_unpack_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = s.astype(np.int32)
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def _q3_pack_scales(l6: np.ndarray) -> np.ndarray:
    lo = (l6[:, :8] & 0xF) | ((l6[:, 8:] & 0xF) << 4)
    hi = sum(((l6[:, 4 * k : 4 * k + 4] >> 4) & 3) << (2 * k) for k in range(4))
    return np.concatenate([lo, hi], axis=1).astype(np.uint8)


def _scale_bytes(qtype: T, p: KParams) -> np.ndarray:
    if qtype == T.Q2_K:
        assert p.mins is not None
        return (((p.scales & 0xFF) | (p.mins << 4)) & 0xFF).astype(np.uint8)
    if qtype == T.Q3_K:
        return _q3_pack_scales(p.scales)
    if qtype == T.Q6_K:
        return p.scales.astype(np.int8).view(np.uint8)
    assert p.mins is not None
    return _k4_pack_scales(p.scales, p.mins)


def sub_block_scales(qtype: T, params: KParams) -> tuple[np.ndarray, np.ndarray | None]:
    """Effective per-sub-block ``(d*sc, dmin*m)`` as float32 ``(n_blocks, n_sub)``, read back from the
    packed scale bytes exactly as llama.cpp's final pass and ggml's dequantiser read them."""
    d = params.d.astype(F32)[:, None]
    s = _scale_bytes(qtype, params)
    if qtype == T.Q2_K:
        assert params.dmin is not None
        return d * (s & 0xF).astype(F32), params.dmin.astype(F32)[:, None] * (s >> 4).astype(F32)
    if qtype == T.Q3_K:
        return d * ((params.scales & 63) - 32).astype(F32), None
    if qtype == T.Q6_K:
        return d * s.view(np.int8).astype(F32), None
    assert params.dmin is not None
    sc, m = _k4_unpack_scales(s)
    return d * sc.astype(F32), params.dmin.astype(F32)[:, None] * m.astype(F32)


def round_to_grid(
    qtype: T, blocks: np.ndarray, params: KParams, fallback: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest codes under fixed parameters and their decoded values: ``(codes, dequantized)``.

    Sub-blocks whose effective scale is 0 take ``fallback``'s codes (default: the code of value 0).
    """
    g, lo, hi, off, _ = _SPEC[qtype]
    nb = blocks.shape[0]
    x = np.asarray(blocks, dtype=F32).reshape(nb, -1, g)
    d_eff, m_eff = sub_block_scales(qtype, params)
    d3 = d_eff[:, :, None]
    with np.errstate(all="ignore"):
        v = x if m_eff is None else x + m_eff[:, :, None]
        q = np.clip(nearest_int(v / d3), lo, hi) + off
    fb = np.full_like(q, off) if fallback is None else fallback.reshape(q.shape).astype(q.dtype)
    codes = np.where(d3 != 0, q, fb).astype(np.uint8).reshape(nb, QK_K)
    return codes, dequantize_codes(qtype, codes, params)


def dequantize_codes(qtype: T, codes: np.ndarray, params: KParams) -> np.ndarray:
    """ggml's decoding (same float32 operations as ``dequantize_row_q*_K`` and gguf-py)."""
    g, _, _, off, _ = _SPEC[qtype]
    nb = codes.shape[0]
    d_eff, m_eff = sub_block_scales(qtype, params)
    q = (codes.astype(np.int32) - off).astype(F32).reshape(nb, -1, g)
    out = d_eff[:, :, None] * q
    if m_eff is not None:
        out = out - m_eff[:, :, None]
    return out.reshape(nb, QK_K)


# ----- parameter choice -----


def _importance(qtype: T, x: np.ndarray, X: np.ndarray, W: np.ndarray) -> np.ndarray:
    """The imatrix paths' per-weight weights ``qw * sqrt(sigma2 + x*x)``, element-major like ``X``."""
    xt = np.ascontiguousarray(x.T)
    sumx2 = seqsum(xt * xt)  # over the whole super-block, in C's order
    # Q2_K uses the plain mean square as its prior; the others double it
    sigma2 = (sumx2 if qtype == T.Q2_K else F32(2) * sumx2) / F32(QK_K)
    return W * np.sqrt(sigma2[None, :, None] + X * X)


def _search_q6(X: np.ndarray, W: np.ndarray | None) -> tuple[KParams, np.ndarray]:
    # Q6_K's imatrix path hands the raw importance to the search (no sigma2 prior)
    scale, L = make_qx_quants(X, 32, X * X if W is None else W)
    max_scale, max_abs = first_absmax(scale.T)
    zero = max_abs < EPS  # C zeroes the whole block
    with np.errstate(all="ignore"):
        iscale = np.where(zero, F32(1.0), F32(-128.0) / max_scale)
        sc = np.minimum(127, nearest_int(iscale[:, None] * scale))
    sc = np.where(zero[:, None], 0, ((sc + 128) & 0xFF) - 128)  # stored in an int8_t
    L = np.where(zero[None, :, None], 0, L)
    return KParams(fp16(np.where(zero, F32(0.0), F32(1.0) / iscale)), sc), L


def _search_q3(X: np.ndarray, weight: np.ndarray | None) -> tuple[KParams, np.ndarray]:
    if weight is not None:
        scale, L = make_qx_quants(X, 4, weight)
        d_block, Ls = make_qx_quants(np.ascontiguousarray(scale.T), 32, seqsum(weight).T)
        return KParams(fp16(d_block), Ls.T), L
    scale, L = make_q3_quants(X, 4)
    max_scale, _ = first_absmax(scale.T)
    nz = max_scale != 0  # otherwise C leaves the scale bytes zeroed and d = 0
    with np.errstate(all="ignore"):
        iscale = np.where(nz, F32(-32.0) / max_scale, F32(1.0))
        l8 = ((nearest_int(iscale[:, None] * scale) + 128) & 0xFF) - 128  # stored in an int8_t
    l6 = np.where(nz[:, None], np.clip(l8, -32, 31) + 32, 0)
    return KParams(fp16(np.where(nz, F32(1.0) / iscale, F32(0.0))), l6), L


def _search_affine(qtype: T, X: np.ndarray, weight: np.ndarray | None) -> tuple[KParams, np.ndarray]:
    """Q2_K / Q4_K / Q5_K: per-sub-block scale and min, then their 4- or 6-bit codes."""
    nmax = _SPEC[qtype][2]
    if weight is not None:
        scale, mins, L = make_qkx_quants(X, weight, nmax, -0.9, 0.05, 36, False)
        sw = seqsum(weight).T
        qmax = 15 if qtype == T.Q2_K else 63
        d_block, Ls = make_qp_quants(np.ascontiguousarray(scale.T), qmax, sw)
        m_block, Lm = make_qp_quants(np.ascontiguousarray(mins.T), qmax, sw)
        Ls, Lm = Ls.T, Lm.T
        if qtype == T.Q5_K:  # only the Q5_K impl clamps; Q4_K stores the raw uint8 codes
            Ls, Lm = np.minimum(63, Ls), np.minimum(63, Lm)
        return KParams(fp16(d_block), Ls, fp16(m_block), Lm), L
    if qtype == T.Q2_K:
        w = np.abs(X)
    else:
        av_x = np.sqrt(seqsum(X * X) / F32(32))
        w = av_x[None] + np.abs(X)
    scale, mins, L = make_qkx_quants(X, w, nmax, *_QKX2_ARGS[qtype])
    max_scale, max_min = _pos_max(scale), _pos_max(mins)
    smax = F32(15.0) if qtype == T.Q2_K else F32(63.0)
    with np.errstate(all="ignore"):
        inv_s = np.where(max_scale > 0, smax / max_scale, F32(0.0))[:, None]
        inv_m = np.where(max_min > 0, smax / max_min, F32(0.0))[:, None]
        ls, lm = nearest_int(inv_s * scale), nearest_int(inv_m * mins)
    if qtype != T.Q2_K:  # stored through uint8_t, then MIN(63, .)
        ls, lm = np.minimum(63, ls & 0xFF), np.minimum(63, lm & 0xFF)
    return KParams(fp16(max_scale / smax), ls, fp16(max_min / smax), lm), L


def _search(qtype: T, x: np.ndarray, qw: np.ndarray | None) -> tuple[KParams, np.ndarray]:
    """Sub-block search and scale quantisation; returns the parameters and the search's codes
    (element-major), which C keeps for sub-blocks whose quantised scale comes out 0."""
    g = _SPEC[qtype][0]
    X = _elem_major(x, g)
    W = None if qw is None else _elem_major(qw, g)
    if qtype == T.Q6_K:
        return _search_q6(X, W)
    weight = None if W is None else _importance(qtype, x, X, W)
    if qtype == T.Q3_K:
        return _search_q3(X, weight)
    return _search_affine(qtype, X, weight)


def encode(qtype: T, blocks: np.ndarray, qw: np.ndarray | None = None) -> tuple[np.ndarray, KParams]:
    """llama.cpp's codes and parameters for ``blocks`` ``(n_blocks, 256)``; ``qw`` is the importance
    matrix broadcast to the same shape (or None)."""
    x = np.asarray(blocks, dtype=F32)
    w = None if qw is None else np.asarray(qw, dtype=F32)
    params, L = _search(qtype, x, w)
    codes, _ = round_to_grid(qtype, x, params, fallback=_block_major(L))
    return codes, params


def choose_params(qtype: T, blocks: np.ndarray, qw: np.ndarray | None = None) -> KParams:
    x = np.asarray(blocks, dtype=F32)
    return _search(qtype, x, None if qw is None else np.asarray(qw, dtype=F32))[0]


# ----- byte layout -----


def _crumbs(L: np.ndarray) -> np.ndarray:
    # four 2-bit codes per byte: byte l of each 128-weight half holds weights l, l+32, l+64, l+96
    r = L.reshape(L.shape[0], -1, 4, 32)
    return (r[:, :, 0] | (r[:, :, 1] << 2) | (r[:, :, 2] << 4) | (r[:, :, 3] << 6)).reshape(L.shape[0], -1)


def _bitplane(bits: np.ndarray) -> np.ndarray:
    # byte j, bit k <- weight 32*k + j
    r = bits.reshape(bits.shape[0], 8, 32)
    return sum(r[:, k] << k for k in range(8)).astype(np.uint8)


def _nibbles(L: np.ndarray) -> np.ndarray:
    # each 64-weight chunk: byte l holds weights l (low nibble) and l+32 (high nibble)
    r = L.reshape(L.shape[0], -1, 2, 32)
    return ((r[:, :, 0] & 0xF) | ((r[:, :, 1] & 0xF) << 4)).reshape(L.shape[0], -1)


def pack(qtype: T, codes: np.ndarray, params: KParams) -> np.ndarray:
    """ggml block bytes ``(n_blocks, type_size)`` in ``block_q*_K`` field order."""
    nb = codes.shape[0]
    L = codes.astype(np.uint8)
    d = params.d.astype(np.float16).view(np.uint8).reshape(nb, 2)
    sb = _scale_bytes(qtype, params)
    if qtype == T.Q2_K:
        assert params.dmin is not None
        dmin = params.dmin.astype(np.float16).view(np.uint8).reshape(nb, 2)
        return np.concatenate([sb, _crumbs(L), d, dmin], axis=1)
    if qtype == T.Q3_K:
        return np.concatenate([_bitplane(L >> 2 & 1), _crumbs(L & 3), sb, d], axis=1)
    if qtype == T.Q6_K:
        r = L.reshape(nb, 2, 4, 32)
        ql = np.stack(
            [(r[:, :, 0] & 0xF) | ((r[:, :, 2] & 0xF) << 4), (r[:, :, 1] & 0xF) | ((r[:, :, 3] & 0xF) << 4)],
            axis=2,
        )
        qh = sum((r[:, :, k] >> 4) << (2 * k) for k in range(4))
        return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64).astype(np.uint8), sb, d], axis=1)
    assert params.dmin is not None
    dmin = params.dmin.astype(np.float16).view(np.uint8).reshape(nb, 2)
    parts = [d, dmin, sb]
    if qtype == T.Q5_K:
        parts.append(_bitplane(L >> 4 & 1))
    parts.append(_nibbles(L))
    return np.concatenate(parts, axis=1)
