"""Legacy 32-weight ggml blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Each block of 32 weights stores an fp16 scale ``d`` (plus an fp16 offset ``m`` for the ``_1`` types) and
one integer code per weight. The stages are separate so a calibrated method (GPTQ) can reuse them:

* :func:`encode` -- llama.cpp's own choice of codes and parameters, bit-exact with ``ggml_quantize_chunk``:
  ``quantize_row_*_ref`` without an importance matrix, ``quantize_row_*_impl`` (weighted scale search)
  with one. Q8_0 ignores the importance matrix, as llama.cpp does.
* :func:`choose_params` -- just the parameters of that choice.
* :func:`round_to_grid` -- given fixed parameters, the nearest code for each weight and the value it
  decodes to. (The reference encoders round against the unrounded float32 scale, so their codes can
  differ from this for weights sitting on a rounding boundary; GPTQ needs the stored-scale rounding.)
* :func:`dequantize_codes` / :func:`pack` -- decode, or lay codes and parameters out as ggml's bytes.

Arrays are block-major at this interface: ``blocks`` is float32 ``(n_blocks, 32)``. Codes are the
unsigned stored values (the signed value is ``code - 8`` for Q4_0 and ``code - 16`` for Q5_0), except for
Q8_0 whose codes are the stored int8 values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from ._common import (
    F32,
    first_absmax,
    first_max,
    first_min,
    fp16,
    make_qkx_quants,
    make_qx_quants,
    nearest_int,
)

QK = 32
TYPES: tuple[T, ...] = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)

# qtype -> (code offset of the symmetric types, number of code levels, has an fp16 min)
_SPEC: dict[T, tuple[int, int, bool]] = {
    T.Q4_0: (8, 16, False),
    T.Q4_1: (0, 16, True),
    T.Q5_0: (16, 32, False),
    T.Q5_1: (0, 32, True),
    T.Q8_0: (0, 256, False),
}


@dataclass(frozen=True)
class LegacyParams:
    """Per-block parameters exactly as stored: ``d`` and (Q4_1/Q5_1) ``m``, float16 ``(n_blocks,)``."""

    d: np.ndarray
    m: np.ndarray | None = None


def _trunc_code(v: np.ndarray) -> np.ndarray:
    # C converts with a truncating cast to a small integer type; the inputs here are in [0, 33)
    return np.trunc(v).astype(np.int32)


def _roundf(v: np.ndarray) -> np.ndarray:
    # C roundf (half away from zero); float64 holds a float32 plus 0.5 exactly, so no double rounding
    v64 = v.astype(np.float64)
    return np.trunc(v64 + np.copysign(0.5, v64)).astype(np.int32)


def _encode_ref(qtype: T, x: np.ndarray) -> tuple[np.ndarray, LegacyParams]:
    """``quantize_row_*_ref``: scale from the extreme value(s), codes against the float32 scale."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if qtype == T.Q8_0:
            d = np.abs(x).max(axis=-1) / F32(127)
            inv = np.where(d != 0, F32(1.0) / d, F32(0.0))
            codes = _roundf(x * inv[:, None]).astype(np.int8)
            return codes, LegacyParams(fp16(d))
        off, levels, affine = _SPEC[qtype]
        if affine:
            mn = first_min(x.T)
            d = (first_max(x.T) - mn) / F32(levels - 1)
            inv = np.where(d != 0, F32(1.0) / d, F32(0.0))
            q = _trunc_code((x - mn[:, None]) * inv[:, None] + F32(0.5))
            # Q4_1 clamps with MIN(15, ..), Q5_1 just truncates to uint8 (both no-ops for finite input)
            q = np.minimum(q, 15) if levels == 16 else q & 0xFF
            return q.astype(np.uint8), LegacyParams(fp16(d), fp16(mn))
        mx, _ = first_absmax(x.T)
        d = mx / F32(-off)
        inv = np.where(d != 0, F32(1.0) / d, F32(0.0))
        q = np.minimum(levels - 1, _trunc_code(x * inv[:, None] + F32(off + 0.5)))
        return q.astype(np.uint8), LegacyParams(fp16(d))


def _encode_weighted(
    qtype: T, x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray
) -> tuple[np.ndarray, LegacyParams]:
    """``quantize_row_*_impl`` with quant_weights: importance-weighted search on each block."""
    off, levels, affine = _SPEC[qtype]
    xt = np.ascontiguousarray(x.T)
    wt = np.ascontiguousarray(qw.T) * np.sqrt(sigma2[None, :] + xt * xt)
    if affine:
        scale, the_min, L = make_qkx_quants(xt, wt, levels - 1, -0.9, 0.05, 36, False)
        return L.T.astype(np.uint8), LegacyParams(fp16(scale), fp16(-the_min))
    scale, L = make_qx_quants(xt, off, wt)
    return L.T.astype(np.uint8), LegacyParams(fp16(scale))


def row_sigma2(rows: np.ndarray) -> np.ndarray:
    """``sum_x2/n_per_row`` of each row, summed sequentially as C does: the weighted paths' prior."""
    sq = rows * rows
    return (np.cumsum(sq, axis=-1, dtype=F32)[:, -1] + F32(0.0)) / F32(rows.shape[-1])


def encode(
    qtype: T, blocks: np.ndarray, qw: np.ndarray | None = None, sigma2: np.ndarray | None = None
) -> tuple[np.ndarray, LegacyParams]:
    """llama.cpp's codes and parameters for ``blocks`` ``(n_blocks, 32)``.

    With ``qw`` (importance, same shape as ``blocks``) ``sigma2`` must give, per block, the
    :func:`row_sigma2` of the row the block came from.
    """
    x = np.asarray(blocks, dtype=F32)
    if qw is None or qtype == T.Q8_0:
        return _encode_ref(qtype, x)
    if sigma2 is None:
        raise ValueError("sigma2 (mean square of each block's row) is required with importance weights")
    return _encode_weighted(qtype, x, np.asarray(qw, dtype=F32), np.asarray(sigma2, dtype=F32))


def choose_params(
    qtype: T, blocks: np.ndarray, qw: np.ndarray | None = None, sigma2: np.ndarray | None = None
) -> LegacyParams:
    return encode(qtype, blocks, qw, sigma2)[1]


def dequantize_codes(qtype: T, codes: np.ndarray, params: LegacyParams) -> np.ndarray:
    """What ggml (and gguf-py) decode the block to, with the same float32 operations."""
    d = params.d.astype(F32)[:, None]
    if qtype == T.Q8_0:
        return codes.astype(np.int8).astype(F32) * d
    off, _, affine = _SPEC[qtype]
    q = (codes.astype(np.int32) - off).astype(F32)
    if affine:
        assert params.m is not None
        return d * q + params.m.astype(F32)[:, None]
    return d * q


def round_to_grid(qtype: T, blocks: np.ndarray, params: LegacyParams) -> tuple[np.ndarray, np.ndarray]:
    """Nearest code under the stored parameters, and its decoded value: ``(codes, dequantized)``."""
    x = np.asarray(blocks, dtype=F32)
    d = params.d.astype(F32)[:, None]
    off, levels, affine = _SPEC[qtype]
    with np.errstate(divide="ignore", invalid="ignore"):
        if affine:
            assert params.m is not None
            q = np.clip(nearest_int((x - params.m.astype(F32)[:, None]) / d), 0, levels - 1)
            codes = np.where(d != 0, q, 0).astype(np.uint8)
        elif qtype == T.Q8_0:
            codes = np.where(d != 0, np.clip(nearest_int(x / d), -128, 127), 0).astype(np.int8)
        else:
            q = np.clip(nearest_int(x / d), -off, off - 1) + off
            codes = np.where(d != 0, q, off).astype(np.uint8)
    return codes, dequantize_codes(qtype, codes, params)


def pack(qtype: T, codes: np.ndarray, params: LegacyParams) -> np.ndarray:
    """ggml block bytes ``(n_blocks, type_size)``: d[, m][, qh], qs."""
    nb = codes.shape[0]
    parts = [params.d.astype(np.float16).view(np.uint8).reshape(nb, 2)]
    if qtype == T.Q8_0:
        parts.append(codes.astype(np.int8).view(np.uint8))
        return np.concatenate(parts, axis=1)
    _, levels, affine = _SPEC[qtype]
    if affine:
        assert params.m is not None
        parts.append(params.m.astype(np.float16).view(np.uint8).reshape(nb, 2))
    q = codes.astype(np.uint8)
    if levels == 32:
        # bit 4 of code j goes to bit j of the little-endian uint32 qh
        parts.append(np.packbits((q >> 4) & 1, axis=-1, bitorder="little"))
    parts.append((q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4))
    return np.concatenate(parts, axis=1)
