"""Pure numpy ggml block quantisation, byte-identical with llama.cpp's quantisers.

:func:`quantize` turns float32 weights into the bytes ggml stores for a tensor -- what
``GGUFWriter.add_tensor(name, arr, raw_dtype=qtype)`` expects -- choosing scales exactly as llama.cpp's
``ggml_quantize_chunk`` does: the ``quantize_row_*_ref`` paths without an importance matrix and the
weighted ``quantize_row_*_impl`` searches with one. :func:`dequantize` decodes through gguf-py.

The per-type stages live in :mod:`.legacy` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), :mod:`.kquants` (Q2_K..Q6_K),
:mod:`.iq4nl` (IQ4_NL) and :mod:`.ternary` (TQ1_0, TQ2_0; llama.cpp's absmax scale here, the least-squares
scale through their registered grids). Each module exposes the same verbs so a calibrated method such as GPTQ can
fix parameters and round against them:

* ``encode(...) -> (codes, params)``: llama.cpp's own choice;
* ``choose_params(...)``: the parameter search alone;
* ``round_to_grid(..., params) -> (codes, dequantized)``: nearest codes under fixed parameters;
* ``dequantize_codes`` and ``pack``: decoding and byte layout.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants as _gguf_quants

from edgekit.errors import InputError, UnsupportedError

from . import iq1, iq4nl, iq4xs, kquants, lattice, legacy, ternary
from ._common import F32, fp16

__all__ = [
    "SUPPORTED_TYPES",
    "bits_per_weight",
    "block_size",
    "dequantize",
    "quantize",
    "quantize_roundtrip",
    "type_size",
]

SUPPORTED_TYPES: tuple[T, ...] = (
    T.F32, T.F16, T.BF16, *legacy.TYPES, *kquants.TYPES, T.IQ4_NL, T.IQ4_XS, *lattice.TYPES, *iq1.TYPES, *ternary.TYPES
)
# llama.cpp asserts an importance matrix for these (ggml_quantize_requires_imatrix)
REQUIRES_IMATRIX: tuple[T, ...] = (*lattice.REQUIRES_IMATRIX, T.IQ1_S)

# Blocks are processed in chunks of about this many weights: big enough that numpy's per-call overhead
# is amortised, small enough that the search temporaries stay in cache and memory stays flat.
_CHUNK_WEIGHTS = 1 << 17


def _check(qtype: T | int | str) -> T:
    try:
        qt = T[qtype.upper()] if isinstance(qtype, str) else T(qtype)
    except (KeyError, ValueError):
        qt = None
    if qt not in SUPPORTED_TYPES:
        names = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise UnsupportedError(
            f"ggml type {getattr(qtype, 'name', qtype)} is not supported; use one of: {names}"
        )
    return qt


def block_size(qtype: T | int | str) -> int:
    """Weights per block (1 for the float types)."""
    return GGML_QUANT_SIZES[_check(qtype)][0]


def type_size(qtype: T | int | str) -> int:
    """Bytes per block."""
    return GGML_QUANT_SIZES[_check(qtype)][1]


def bits_per_weight(qtype: T | int | str) -> float:
    bs, ts = GGML_QUANT_SIZES[_check(qtype)]
    return ts * 8 / bs


def _bf16_bytes(x: np.ndarray) -> np.ndarray:
    # ggml_compute_fp32_to_bf16: NaN forced quiet, everything else rounded to nearest even
    u = x.view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = ((u.astype(np.uint64) + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    return np.where(nan, ((u >> 16) | 64).astype(np.uint16), rounded).view(np.uint8)


def _encode_blocks(
    qt: T, blocks: np.ndarray, qw: np.ndarray | None, sigma2: np.ndarray | None, want_values: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    if qt in kquants.TYPES:
        codes, kp = kquants.encode(qt, blocks, qw)
        values = kquants.dequantize_codes(qt, codes, kp) if want_values else None
        return kquants.pack(qt, codes, kp), values
    if qt in ternary.TYPES:  # llama.cpp ignores an importance matrix for these
        codes, tp = ternary.encode(qt, blocks, "absmax")
        values = ternary.dequantize_codes(codes, tp) if want_values else None
        return ternary.pack(qt, codes, tp), values
    if qt == T.IQ4_NL:
        codes, ip = iq4nl.encode(blocks, qw)
        values = iq4nl.dequantize_codes(codes, ip) if want_values else None
        return iq4nl.pack(codes, ip), values
    if qt == T.IQ4_XS:
        codes, xp = iq4xs.encode(blocks, qw)
        values = iq4xs.dequantize_codes(codes, xp) if want_values else None
        return iq4xs.pack(codes, xp), values
    if qt in iq1.TYPES:
        raw = iq1.encode(qt, blocks, qw)
        return raw, np.asarray(_gguf_quants.dequantize(raw, qt), dtype=F32) if want_values else None
    if qt in lattice.TYPES:
        codes, gp = lattice.encode(qt, blocks, qw)
        return lattice.pack(qt, codes, gp), lattice.dequantize_codes(qt, codes, gp) if want_values else None
    codes, lp = legacy.encode(qt, blocks, qw, sigma2)
    values = legacy.dequantize_codes(qt, codes, lp) if want_values else None
    return legacy.pack(qt, codes, lp), values


def _run(
    data: np.ndarray, qtype: T | int | str, imatrix: np.ndarray | None, want_values: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    qt = _check(qtype)
    x = np.ascontiguousarray(np.asarray(data, dtype=F32))
    if x.ndim == 0:
        raise InputError("quantize needs an array with at least one dimension (rows of weights)")
    if imatrix is None and qt in REQUIRES_IMATRIX:
        raise InputError(
            f"{qt.name} needs an importance matrix (llama.cpp refuses it without one): "
            "quantize with --method imatrix or give calibration data"
        )
    n = x.shape[-1]
    bs, ts = GGML_QUANT_SIZES[qt]
    if n % bs:
        raise InputError(
            f"rows of {n} weights cannot be stored as {qt.name}: the row length must be a multiple of {bs}"
        )
    out_shape = (*x.shape[:-1], n // bs * ts)
    if qt == T.F32:
        # copied so the bytes never alias the caller's array
        return x.view(np.uint8).reshape(out_shape).copy(), x.copy() if want_values else None
    if qt == T.F16:
        h = fp16(x)
        return h.view(np.uint8).reshape(out_shape), h.astype(F32) if want_values else None
    if qt == T.BF16:
        raw = _bf16_bytes(x)
        values = (raw.view(np.uint16).astype(np.uint32) << 16).view(F32) if want_values else None
        return raw.reshape(out_shape), values

    if not np.all(np.isfinite(x)):
        # llama.cpp also refuses these (its row validation rejects the NaN scales they produce)
        raise InputError(f"cannot quantize to {qt.name}: the weights contain NaN or infinite values")
    rows = x.reshape(-1, n)
    qw_rows = None
    sigma2 = None
    if imatrix is not None and qt != T.Q8_0:
        im = np.asarray(imatrix, dtype=F32)
        if im.shape[-1:] != (n,):
            raise InputError(f"imatrix has shape {im.shape}; expected ({n},), one importance per column")
        if not np.all(np.isfinite(im)) or np.any(im < 0):
            raise InputError("imatrix values must be finite and non-negative")
        try:
            qw_rows = np.broadcast_to(im, x.shape).reshape(-1, n)
        except ValueError as err:
            raise InputError(
                f"imatrix of shape {im.shape} does not broadcast to the data shape {x.shape}"
            ) from err
        if qt in legacy.TYPES:
            sigma2 = legacy.row_sigma2(rows)  # a prior taken over the whole row, before chunking

    out = np.empty((rows.shape[0], n // bs * ts), dtype=np.uint8)
    values = np.empty_like(rows) if want_values else None
    step = max(1, _CHUNK_WEIGHTS // n)
    bpr = n // bs
    for r0 in range(0, rows.shape[0], step):
        r1 = min(r0 + step, rows.shape[0])
        blocks = rows[r0:r1].reshape(-1, bs)
        qw = None if qw_rows is None else np.ascontiguousarray(qw_rows[r0:r1]).reshape(-1, bs)
        s2 = None if sigma2 is None else np.repeat(sigma2[r0:r1], bpr)
        raw, vals = _encode_blocks(qt, blocks, qw, s2, want_values)
        out[r0:r1] = raw.reshape(r1 - r0, -1)
        if values is not None and vals is not None:
            values[r0:r1] = vals.reshape(r1 - r0, n)
    return out.reshape(out_shape), None if values is None else values.reshape(x.shape)


def quantize(data: np.ndarray, qtype: T | int | str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantise float32 ``data`` of shape ``(..., n)`` to ggml bytes ``(..., n // block_size * type_size)``.

    ``imatrix`` is the optional per-column importance (shape ``(n,)``, or broadcastable to ``data`` for
    per-expert matrices); it steers the scale searches the way llama.cpp's ``--imatrix`` does and is
    ignored by F32/F16/BF16/Q8_0. Raises UnsupportedError for other types, and InputError for a row length
    that is not a multiple of the block size or (quantised types) non-finite weights.
    """
    return _run(data, qtype, imatrix, want_values=False)[0]


def quantize_roundtrip(
    data: np.ndarray, qtype: T | int | str, imatrix: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`quantize` plus the float32 values the bytes decode to, taken from the kernel's own codes and
    parameters (no second decode pass) -- what a caller measuring quantisation error needs."""
    raw, values = _run(data, qtype, imatrix, want_values=True)
    assert values is not None
    return raw, values


def dequantize(raw: np.ndarray, qtype: T | int | str) -> np.ndarray:
    """Decode ggml bytes ``(..., n_bytes)`` to float32 ``(..., n)`` (through gguf-py)."""
    qt = _check(qtype)
    return np.asarray(_gguf_quants.dequantize(np.asarray(raw).view(np.uint8), qt), dtype=F32)
