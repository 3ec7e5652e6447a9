"""IQ4_NL: 32-weight blocks of 4-bit indices into a fixed non-linear table, one fp16 scale per block.

llama.cpp falls back to IQ4_NL for tensors whose rows do not fit 256-weight super-blocks (older
releases for Q2_K/Q3_K targets; current ones for the IQ* targets). Unlike most types it has no separate
"ref" quantiser on that path: ``quantize_iq4_nl`` always runs the weighted scale search (15 trial scales),
weighting by ``x*x`` without an importance matrix and by ``qw*sqrt(sigma2 + x*x)`` with one.

Same stages as the other kernels, for reuse by calibrated methods: :func:`encode` (bit-exact with
llama.cpp), :func:`choose_params`, :func:`round_to_grid` (nearest table entry under a fixed scale),
:func:`dequantize_codes`, :func:`pack`. ``blocks`` is float32 ``(n_blocks, 32)``; codes are table
indices ``uint8 (n_blocks, 32)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._common import EPS, F32, best_index, first_absmax, fp16, seqsum

QK = 32
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=F32)
_NTRY = 7


@dataclass(frozen=True)
class IQ4NLParams:
    """The stored fp16 block scale, ``(n_blocks,)``."""

    d: np.ndarray


def _search_scale(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per-group scale from ``quantize_row_iq4_nl_impl`` (element-major ``x``/``w``: ``(32, n)``)."""
    mx, amax = first_absmax(x)
    zero = amax < EPS
    div = np.where(zero, F32(1.0), mx)

    def sums(inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.take(KVALUES, best_index(KVALUES, inv * x))
        wq = w * q
        return seqsum(wq * x), seqsum(wq * q)

    with np.errstate(all="ignore"):
        sumqx, sumq2 = sums(F32(1.0) / (-div / KVALUES[0]))
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0.0))
        best = d * sumqx
        for itry in range(-_NTRY, _NTRY + 1):
            sumqx, sumq2 = sums(F32(itry + int(KVALUES[0])) / div)
            upd = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(upd, sumqx / sumq2, d)
            best = np.where(upd, d * sumqx, best)
    return np.where(zero, F32(0.0), d)


def encode(blocks: np.ndarray, qw: np.ndarray | None = None) -> tuple[np.ndarray, IQ4NLParams]:
    """llama.cpp's codes and scale (``quantize_iq4_nl``); ``qw`` is the importance, shaped like ``blocks``."""
    x = np.ascontiguousarray(np.asarray(blocks, dtype=F32).T)
    if qw is None:
        w = x * x
    else:
        sigma2 = seqsum(x * x) * (F32(2.0) / F32(QK))
        w = np.ascontiguousarray(np.asarray(qw, dtype=F32).T) * np.sqrt(sigma2[None] + x * x)
    d = _search_scale(x, w)
    # the final pass rounds against the float32 scale, not the fp16 one that gets stored
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1.0) / d, F32(0.0))
    codes = best_index(KVALUES, inv[None] * x).T.astype(np.uint8)
    return np.ascontiguousarray(codes), IQ4NLParams(fp16(d))


def choose_params(blocks: np.ndarray, qw: np.ndarray | None = None) -> IQ4NLParams:
    return encode(blocks, qw)[1]


def dequantize_codes(codes: np.ndarray, params: IQ4NLParams) -> np.ndarray:
    return params.d.astype(F32)[:, None] * KVALUES[codes]


def round_to_grid(blocks: np.ndarray, params: IQ4NLParams) -> tuple[np.ndarray, np.ndarray]:
    """Nearest table entry under the stored scale, and its decoded value: ``(codes, dequantized)``."""
    x = np.asarray(blocks, dtype=F32)
    d = params.d.astype(F32)[:, None]
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1.0) / d, F32(0.0))
    codes = best_index(KVALUES, x * inv).astype(np.uint8)
    return codes, dequantize_codes(codes, params)


def pack(codes: np.ndarray, params: IQ4NLParams) -> np.ndarray:
    """``block_iq4_nl`` bytes ``(n_blocks, 18)``: fp16 d, then code j | code j+16 << 4."""
    nb = codes.shape[0]
    q = codes.astype(np.uint8)
    d = params.d.astype(np.float16).view(np.uint8).reshape(nb, 2)
    return np.concatenate([d, q[:, :16] | (q[:, 16:] << 4)], axis=1)
