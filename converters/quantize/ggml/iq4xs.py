"""IQ4_XS: IQ4_NL's non-linear 4-bit table in 256-weight super-blocks with 6-bit sub-block scales.

Each 32-weight sub-block gets IQ4_NL's own scale search (15 trial scales); the eight scales are then
quantised against one fp16 super-block scale ``d = -max/32`` to signed 6-bit codes, and the weights are
rounded again to the table under the quantised sub-block scale. Unlike IQ4_NL the weighting prior
``sigma2`` is taken over the whole super-block. Without an importance matrix the weights are ``x*x``.

Stages as in the other kernels: :func:`encode` (bit-exact with ``quantize_iq4_xs``), :func:`choose_params`,
:func:`round_to_grid`, :func:`dequantize_codes`, :func:`pack`. ``blocks`` is float32 ``(n_blocks, 256)``;
codes are table indices ``uint8 (n_blocks, 256)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._common import F32, best_index, first_absmax, fp16, nearest_int, seqsum
from .iq4nl import KVALUES, _search_scale

QK_K = 256
_SUB = 32


@dataclass(frozen=True)
class IQ4XSParams:
    """fp16 super-block scale ``d`` ``(n_blocks,)`` and the sub-block scale codes ``ls`` in ``[0, 64)``
    ``(n_blocks, 8)``; a sub-block's scale is ``d * (ls - 32)``."""

    d: np.ndarray
    ls: np.ndarray


def _weights(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    if qw is None:
        return x * x
    sigma2 = seqsum(np.ascontiguousarray(x.T * x.T)) * (F32(2.0) / F32(QK_K))
    return np.asarray(qw, dtype=F32) * np.sqrt(sigma2[:, None] + x * x)


def encode(blocks: np.ndarray, qw: np.ndarray | None = None) -> tuple[np.ndarray, IQ4XSParams]:
    """llama.cpp's codes and parameters (``quantize_iq4_xs``); ``qw`` is the importance, shaped like ``blocks``."""
    x = np.asarray(blocks, dtype=F32)
    nb = x.shape[0]
    w = _weights(x, qw)
    sub_x = np.ascontiguousarray(x.reshape(-1, _SUB).T)  # (32, nb*8) element-major
    sub_w = np.ascontiguousarray(w.reshape(-1, _SUB).T)
    scales = _search_scale(sub_x, sub_w).reshape(nb, 8)
    max_scale, _ = first_absmax(np.ascontiguousarray(scales.T))
    d = -max_scale / F32(32)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(d != 0, F32(1.0) / d, F32(0.0)).astype(F32)
        ls = np.clip(nearest_int(inv[:, None] * scales), -32, 31)
        dl = d[:, None] * ls.astype(F32)
        idl = np.where(dl != 0, F32(1.0) / dl, F32(0.0)).astype(F32)
    codes = best_index(KVALUES, np.repeat(idl, _SUB, axis=1) * x).astype(np.uint8)
    return codes, IQ4XSParams(fp16(d), (ls + 32).astype(np.uint8))


def choose_params(blocks: np.ndarray, qw: np.ndarray | None = None) -> IQ4XSParams:
    return encode(blocks, qw)[1]


def sub_block_scales(params: IQ4XSParams) -> np.ndarray:
    """Each sub-block's effective scale ``(n_blocks, 8)``, as ggml decodes it."""
    return params.d.astype(F32)[:, None] * (params.ls.astype(F32) - F32(32))


def dequantize_codes(codes: np.ndarray, params: IQ4XSParams) -> np.ndarray:
    return np.repeat(sub_block_scales(params), _SUB, axis=1) * KVALUES[codes]


def round_to_grid(blocks: np.ndarray, params: IQ4XSParams) -> tuple[np.ndarray, np.ndarray]:
    """Nearest table entry under the stored sub-block scales: ``(codes, dequantized)``."""
    dl = np.repeat(sub_block_scales(params), _SUB, axis=1)
    with np.errstate(divide="ignore"):
        inv = np.where(dl != 0, F32(1.0) / np.where(dl != 0, dl, F32(1.0)), F32(0.0)).astype(F32)
    codes = best_index(KVALUES, np.asarray(blocks, dtype=F32) * inv).astype(np.uint8)
    return codes, dequantize_codes(codes, params)


def pack(codes: np.ndarray, params: IQ4XSParams) -> np.ndarray:
    """``block_iq4_xs`` bytes ``(n_blocks, 136)``: fp16 d, uint16 high scale bits, low scale nibbles,
    then per 32 weights code j | code j+16 << 4."""
    nb = codes.shape[0]
    ls = params.ls.astype(np.uint16)
    scales_h = sum(((ls[:, i] >> 4) << (2 * i)) for i in range(8)).astype("<u2").view(np.uint8)
    lo = (ls & 0xF).astype(np.uint8)
    scales_l = lo[:, 0::2] | (lo[:, 1::2] << 4)
    q = codes.astype(np.uint8).reshape(nb, 8, 32)
    qs = (q[:, :, :16] | (q[:, :, 16:] << 4)).reshape(nb, 128)
    d = params.d.astype(np.float16).view(np.uint8).reshape(nb, 2)
    return np.concatenate([d, scales_h.reshape(nb, 2), scales_l, qs], axis=1)
