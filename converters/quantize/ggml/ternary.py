"""Ternary 256-weight ggml blocks: TQ1_0 (1.69 bpw) and TQ2_0 (2.06 bpw).

Each block of 256 weights stores one fp16 scale ``d`` and one trit per weight (value ``d * t``, ``t`` in
{-1, 0, +1}). TQ2_0 keeps each trit in two bits; TQ1_0 packs five trits per byte (3^5 = 243 < 256) as a
fixed-point fraction, so a byte decodes with a multiply and a shift.

Scales, three ways (``scale=``):

* ``"absmax"`` -- llama.cpp's own ``quantize_row_tq*_0_ref``: ``d = max|x|``, bit-exact with
  ``ggml_quantize_chunk``. Only weights above half the block maximum become non-zero, which suits weights
  already ternary and wastes most of a Gaussian block.
* ``"best"`` (default) -- the scale and trits that minimise the block's squared error. For a fixed set of
  non-zero positions the best scale is the mean magnitude over them, and the error is then
  ``sum(x^2) - S_k^2 / k`` with ``S_k`` the sum of the ``k`` magnitudes kept; the best set is the ``k``
  largest magnitudes, so a sort and a running sum find the optimum exactly. Genuinely ternary blocks
  (values in {-a, 0, a}) come back exact whenever ``a`` is an fp16 number.
* ``"absmean"`` -- BitNet b1.58's rule: ``d = mean|x|``, trits ``clip(round(x / d), -1, 1)``; what the
  ternary distillation trains against, so its weights are stored as trained.

Codes at this interface are the stored trits plus one (0, 1, 2), ``(n_blocks, 256)`` uint8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from ._common import F32, fp16

QK = 256
TYPES: tuple[T, ...] = (T.TQ1_0, T.TQ2_0)
SCALES = ("best", "absmax", "absmean")
_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.uint16)


@dataclass(frozen=True)
class TernaryParams:
    """The stored scale of each block, float16 ``(n_blocks,)``."""

    d: np.ndarray


def lround(v: np.ndarray) -> np.ndarray:
    """C's ``lroundf`` (half away from zero) on float32, exactly: ``|v| - floor(|v|)`` is exact in float32."""
    a = np.abs(v)
    fl = np.floor(a)
    r = np.where(a - fl >= F32(0.5), fl + F32(1.0), fl)
    return np.copysign(r, v)


def best_scale(x: np.ndarray) -> np.ndarray:
    """The least-squares ternary scale of each group of ``x`` ``(n_groups, g)`` (0 for an all-zero group)."""
    mag = -np.sort(-np.abs(x.astype(np.float64)), axis=1)  # descending
    s = np.cumsum(mag, axis=1)
    k = np.arange(1, x.shape[1] + 1, dtype=np.float64)
    best = np.argmax(s * s / k, axis=1)
    rows = np.arange(x.shape[0])
    return (s[rows, best] / k[best]).astype(F32)


def group_scale(x: np.ndarray, scale: str) -> np.ndarray:
    """The float32 scale of each group (row of ``x``) under rule ``scale`` (before fp16 rounding)."""
    if scale == "best":
        return best_scale(x)
    if scale == "absmax":
        return np.max(np.abs(x), axis=1).astype(F32)
    if scale == "absmean":
        # float32 like the training's torch mean; its rounding can still differ in the last bit
        return np.maximum(np.mean(np.abs(x), axis=1, dtype=F32), F32(1e-5)).astype(F32)
    raise ValueError(f"unknown ternary scale rule {scale!r}; use one of {', '.join(SCALES)}")


def ternarize(x: np.ndarray, scale: str = "best") -> tuple[np.ndarray, np.ndarray]:
    """Trits ``(n_groups, g)`` int8 and fp16 scales ``(n_groups,)`` of float32 groups ``x`` under ``scale``.

    ``absmax`` rounds as llama.cpp does (``lroundf(x * (1/d))`` against the float32 ``d``); the others
    round against the stored fp16 scale, so the trits are the nearest under what is decoded.
    """
    x = np.asarray(x, dtype=F32)
    d = group_scale(x, scale)
    stored = fp16(d)
    if scale == "absmax":
        with np.errstate(divide="ignore"):
            inv = np.where(d != 0, F32(1.0) / d, F32(0.0)).astype(F32)
        t = lround(x * inv[:, None])
    else:
        ds = stored.astype(F32)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(ds[:, None] != 0, np.rint(x / ds[:, None]), F32(0.0))
    return np.clip(t, -1, 1).astype(np.int8), stored


def encode(qtype: T, blocks: np.ndarray, scale: str = "best") -> tuple[np.ndarray, TernaryParams]:
    """Codes (trit + 1) and scales of float32 ``blocks`` ``(n_blocks, 256)``."""
    t, d = ternarize(blocks, scale)
    return (t + 1).astype(np.uint8), TernaryParams(d)


def round_to_grid(blocks: np.ndarray, params: TernaryParams) -> tuple[np.ndarray, np.ndarray]:
    """Nearest codes under fixed scales, and the values they decode to."""
    ds = params.d.astype(F32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.clip(np.where(ds != 0, np.rint(blocks / ds), F32(0.0)), -1, 1)
    return (t + 1).astype(np.uint8), (t * ds).astype(F32)


def dequantize_codes(codes: np.ndarray, params: TernaryParams) -> np.ndarray:
    return ((codes.astype(F32) - F32(1.0)) * params.d.astype(F32)[:, None]).astype(F32)


def pack(qtype: T, codes: np.ndarray, params: TernaryParams) -> np.ndarray:
    """ggml's bytes for ``codes`` ``(n_blocks, 256)`` in {0, 1, 2} and their scales."""
    c = np.asarray(codes, dtype=np.uint8)
    nb = c.shape[0]
    d = params.d.astype(np.float16).view(np.uint8).reshape(nb, 2)
    if qtype == T.TQ2_0:
        # two halves of 128; byte m of a half holds elements m, m+32, m+64, m+96 in bits 0-1, 2-3, 4-5, 6-7
        q = c.reshape(nb, 2, 4, 32)
        qs = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
        return np.concatenate([qs.reshape(nb, 64), d], axis=1)
    if qtype != T.TQ1_0:
        raise ValueError(f"{qtype.name} is not a ternary type")
    # 32 bytes of 5 trits (elements m + 32n), 16 of 5 (160 + m + 16n), then 4 of 4 (240 + j + 4m), the first
    # trit most significant; each byte is the base-3 number as a fraction of 243, rounded up to 256ths
    c16 = c.astype(np.uint16)
    qs0 = (c16[:, :160].reshape(nb, 5, 32) * _POW3[None, :, None]).sum(axis=1)
    qs1 = (c16[:, 160:240].reshape(nb, 5, 16) * _POW3[None, :, None]).sum(axis=1)
    qh = (c16[:, 240:].reshape(nb, 4, 4) * _POW3[None, :4, None]).sum(axis=1)
    qs = np.concatenate([qs0, qs1, qh], axis=1)
    qs = ((qs * 256 + 242) // 243).astype(np.uint8)
    return np.concatenate([qs, d], axis=1)
