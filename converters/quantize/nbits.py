"""Block-wise integer grids for onnxruntime's ``MatMulNBits`` (and ``GatherBlockQuantized``).

A weight row is cut into blocks of ``block`` weights along the input dimension; each block stores one
scale ``d`` and a zero point ``zp`` and one unsigned ``bits``-wide code per weight, decoding to
``d * (code - zp)``. Symmetric grids fix ``zp = 2**(bits-1)`` (what ``MatMulNBits`` assumes when no
zero points are given); asymmetric ones choose an integer ``zp`` per block. Scales are rounded to fp16,
so an fp32 and an fp16 ONNX graph decode the same values.

The verbs mirror the ggml kernels (:mod:`edgekit.converters.quantize.ggml`), so GPTQ and AWQ quantize
onto these grids unchanged: :func:`choose_params`, :func:`encode`, :func:`dequantize_codes` and
:func:`pack`. The packed form is one record per block -- ``[codes (block*bits/8 bytes, low nibble
first)][fp16 scale][zero point byte, asymmetric only]`` -- which :func:`split` turns into the
``B``/``scales``/``zero_points`` tensors of the ONNX operators.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from edgekit.converters.quantize._nbits_kernel import compiled_search
from edgekit.converters.quantize.grids.base import Grid, GridSweep, importance_block, scale_rounder
from edgekit.errors import InputError, UnsupportedError

F32 = np.float32

# Candidate shrink factors of the block's range: the search keeps whichever (after a least-squares
# refit of the scale) gives the smallest weighted error. 1.0 is plain min/max rounding. 8-bit grids are
# fine enough that clipping rarely pays: a short search keeps big tables (embeddings) fast.
_SHRINK = {4: np.linspace(1.0, 0.70, 16, dtype=F32), 8: np.linspace(1.0, 0.94, 4, dtype=F32)}

# The search runs compiled by numba (:mod:`._nbits_kernel`, the same bytes, about 12x faster) once this many
# blocks have gone through it in numpy in this process: compiling costs seconds once (later processes on
# the same CPU load it from numba's cache), which only a model of some size repays.
COMPILE_AFTER = 1 << 17
_searched = [0]


def _compiled_search(n_blocks: int, block: int) -> object | None:
    # the kernel sums a block as numpy does for the widths the grids register (multiples of 8 up to 128, and
    # 256 as two halves of 128); a per-row grid's other widths (rows of 9, 144, 288 ...) stay in numpy, whose
    # pairwise summation splits them otherwise
    if block % 8 or (block > 128 and block != 256):
        return None
    if _searched[0] < COMPILE_AFTER:
        _searched[0] += n_blocks
        return None
    return compiled_search()


@dataclass(frozen=True, repr=False)
class NBitsType(Grid):
    """One grid: ``bits`` (4 or 8), ``block`` weights per block (a power of two, 16..256),
    ``symmetric`` (zero point fixed at ``2**(bits-1)``) or asymmetric (a zero point per block)."""

    bits: int
    block: int
    symmetric: bool
    is_float = False

    def row_bytes(self, n: int) -> int:
        return n // self.block * self.record

    def quantize_roundtrip(self, x: np.ndarray, imatrix: np.ndarray | None = None, *,
                           want_values: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        a = np.asarray(x, dtype=F32)
        raw, values = quantize_rows(self, a.reshape(-1, a.shape[-1]), imatrix, want_values)
        return raw.reshape(*a.shape[:-1], -1), None if values is None else values.reshape(a.shape)

    def dequantize(self, raw: np.ndarray) -> np.ndarray:
        return dequantize(self, raw)

    def sweep(self, w: np.ndarray, imatrix: np.ndarray | None) -> GridSweep:
        return _NBitsSweep(self, imatrix)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise UnsupportedError(f"MatMulNBits weights are 4 or 8 bits here; got {self.bits}")
        if self.block < 16 or self.block > 256 or self.block & (self.block - 1):
            raise UnsupportedError(f"block size {self.block} is not supported; use 16, 32, 64, 128 or 256")

    @property
    def name(self) -> str:
        return f"{'INT' if self.symmetric else 'UINT'}{self.bits}_B{self.block}"

    @property
    def levels(self) -> int:
        return 1 << self.bits

    @property
    def default_zp(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def blob(self) -> int:
        """Bytes of packed codes per block (an odd 4-bit block, only a per-row grid's, ends in half a byte)."""
        return (self.block * self.bits + 7) // 8

    @property
    def record(self) -> int:
        """Bytes per block in :func:`pack`'s layout."""
        return self.blob + 2 + (0 if self.symmetric else 1)

    @property
    def bits_per_weight(self) -> float:
        return 8 * (self.blob + 2 + (0 if self.symmetric else self.bits / 8)) / self.block

    @classmethod
    def parse(cls, name: str) -> NBitsType:
        m = re.fullmatch(r"(U?INT)(4|8)_B(\d+)", name.upper())
        if not m:
            raise InputError(f"{name!r} is not a MatMulNBits grid name (e.g. UINT4_B32, INT4_B128, INT8_B32)")
        return cls(int(m.group(2)), int(m.group(3)), m.group(1) == "INT")


@dataclass(frozen=True)
class NBitsParams:
    """Per-block parameters: ``d`` float16 ``(n_blocks,)`` and ``zp`` uint8 ``(n_blocks,)``."""

    d: np.ndarray
    zp: np.ndarray


def _fp16(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(v, dtype=F32).astype(np.float16)


def _codes(x: np.ndarray, d: np.ndarray, zp: np.ndarray, levels: int) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)
    q = np.rint(x * inv[..., None]) + zp[..., None]
    return np.clip(q, 0, levels - 1)


def choose_params(t: NBitsType, blocks: np.ndarray, qw: np.ndarray | None = None) -> NBitsParams:
    """Scale and zero point of each block (``blocks`` float32 ``(n, block)``) minimising the
    ``qw``-weighted squared error over a small search of range shrinks, each refit by least squares."""
    x = np.ascontiguousarray(blocks, dtype=F32)
    n = x.shape[0]
    kernel = _compiled_search(n, x.shape[1])
    if kernel is not None:
        d, zp = np.empty(n, F32), np.empty(n, F32)
        w = x if qw is None else np.ascontiguousarray(np.broadcast_to(np.asarray(qw, dtype=F32), x.shape))
        kernel(x, w, qw is not None, t.symmetric, t.levels, _SHRINK[t.bits], d, zp)  # same shapes: numba checks no bounds
        return NBitsParams(d.astype(np.float16), zp.astype(np.uint8))
    w = np.ones_like(x) if qw is None else np.asarray(qw, dtype=F32)
    best_err = np.full(n, np.inf, dtype=np.float64)
    best_d = np.zeros(n, dtype=F32)
    best_zp = np.full(n, t.default_zp, dtype=F32)
    levels = t.levels
    if t.symmetric:
        # the extreme weight (with its sign) maps to the most negative code, using the whole range
        idx = np.argmax(np.abs(x), axis=1)
        extreme = x[np.arange(n), idx]
    else:
        lo = np.minimum(x.min(axis=1), 0)
        hi = np.maximum(x.max(axis=1), 0)
    for f in _SHRINK[t.bits]:
        if t.symmetric:
            d = (extreme * f) / F32(-t.default_zp)
            zp = np.full(n, t.default_zp, dtype=F32)
        else:
            d = (hi - lo) * f / F32(levels - 1)
            with np.errstate(divide="ignore", invalid="ignore"):
                zp = np.clip(np.rint(np.where(d != 0, -lo * f / d, 0)), 0, levels - 1).astype(F32)
        q = _codes(x, d.astype(F32), zp, levels) - zp[:, None]
        # least-squares scale for these codes: d = sum w x q / sum w q^2
        num = (w * x * q).sum(axis=1)
        den = (w * q * q).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            d_fit = np.where(den > 0, num / den, d).astype(F32)
        d_fit = _fp16(d_fit).astype(F32)
        q2 = _codes(x, d_fit, zp, levels) - zp[:, None]
        err = (w * (x - d_fit[:, None] * q2) ** 2).sum(axis=1, dtype=np.float64)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_d = np.where(better, d_fit, best_d)
        best_zp = np.where(better, zp, best_zp)
    return NBitsParams(_fp16(best_d), best_zp.astype(np.uint8))


def round_to_grid(t: NBitsType, blocks: np.ndarray, params: NBitsParams) -> tuple[np.ndarray, np.ndarray]:
    """Nearest codes under fixed parameters and the values they decode to."""
    d = params.d.astype(F32)
    zp = params.zp.astype(F32)
    codes = _codes(np.asarray(blocks, dtype=F32), d, zp, t.levels).astype(np.uint8)
    return codes, dequantize_codes(t, codes, params)


def encode(t: NBitsType, blocks: np.ndarray, qw: np.ndarray | None = None) -> tuple[np.ndarray, NBitsParams]:
    params = choose_params(t, blocks, qw)
    return round_to_grid(t, blocks, params)[0], params


def dequantize_codes(t: NBitsType, codes: np.ndarray, params: NBitsParams) -> np.ndarray:
    d = params.d.astype(F32)[:, None]
    return (d * (codes.astype(F32) - params.zp.astype(F32)[:, None])).astype(F32)


def _pack_codes(t: NBitsType, codes: np.ndarray) -> np.ndarray:
    c = codes.astype(np.uint8)
    if t.bits == 8:
        return c
    if c.shape[1] % 2:
        c = np.concatenate([c, np.zeros((c.shape[0], 1), np.uint8)], axis=1)
    return (c[:, 0::2] & 0x0F) | ((c[:, 1::2] & 0x0F) << 4)


def pack(t: NBitsType, codes: np.ndarray, params: NBitsParams) -> np.ndarray:
    """Records ``(n_blocks, t.record)``: packed codes, fp16 scale, then (asymmetric) the zero point."""
    parts = [_pack_codes(t, codes), params.d.astype(np.float16).view(np.uint8).reshape(-1, 2)]
    if not t.symmetric:
        parts.append(params.zp.reshape(-1, 1).astype(np.uint8))
    return np.concatenate(parts, axis=1)


def unpack(t: NBitsType, records: np.ndarray) -> tuple[np.ndarray, NBitsParams]:
    """Inverse of :func:`pack` for ``(n_blocks, t.record)`` records."""
    r = np.asarray(records, dtype=np.uint8).reshape(-1, t.record)
    blob = r[:, : t.blob]
    if t.bits == 8:
        codes = blob.copy()
    else:
        codes = np.empty((r.shape[0], t.block), dtype=np.uint8)
        codes[:, 0::2] = blob & 0x0F
        codes[:, 1::2] = (blob >> 4)[:, : t.block // 2]
    d = np.ascontiguousarray(r[:, t.blob : t.blob + 2]).view(np.float16).reshape(-1)
    zp = r[:, t.blob + 2] if not t.symmetric else np.full(r.shape[0], t.default_zp, dtype=np.uint8)
    return codes, NBitsParams(d, zp.astype(np.uint8))


@dataclass(frozen=True)
class SplitTensors:
    """The ONNX-side tensors of one ``(N, K)`` weight: ``B`` uint8 ``(N, K/block, blob)``, ``scales``
    float16 ``(N, K/block)``, ``zero_points`` uint8 ``(N, ceil(K/block * bits / 8))`` packed as
    MatMulNBits reads them (None for symmetric grids)."""

    B: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None


def split(t: NBitsType, records: np.ndarray, n_rows: int) -> SplitTensors:
    """Turn a matrix's records (``(N, K/block * t.record)`` bytes) into MatMulNBits tensors."""
    r = np.asarray(records, dtype=np.uint8).reshape(n_rows, -1, t.record)
    nb = r.shape[1]
    B = np.ascontiguousarray(r[:, :, : t.blob])
    scales = np.ascontiguousarray(r[:, :, t.blob : t.blob + 2]).view(np.float16).reshape(n_rows, nb)
    zps = None
    if not t.symmetric:
        z = r[:, :, t.blob + 2]
        if t.bits == 4:
            if nb % 2:
                z = np.concatenate([z, np.full((n_rows, 1), t.default_zp, dtype=np.uint8)], axis=1)
            z = (z[:, 0::2] & 0x0F) | ((z[:, 1::2] & 0x0F) << 4)
        zps = np.ascontiguousarray(z)
    return SplitTensors(B, scales, zps)


def quantize_rows(t: NBitsType, rows: np.ndarray, imatrix: np.ndarray | None,
                  want_values: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Records ``(rows, n/block * record)`` of float32 ``rows`` ``(r, n)`` (and their decoded values)."""
    x = np.ascontiguousarray(rows, dtype=F32)
    r, n = x.shape
    if n % t.block:
        raise InputError(f"rows of {n} weights cannot use {t.name}: the row length must be a multiple of {t.block}")
    blocks = x.reshape(-1, t.block)
    qw = None
    if imatrix is not None:
        im = np.asarray(imatrix, dtype=F32)
        if im.shape != (n,):
            raise InputError(f"imatrix has shape {im.shape}; expected ({n},), one importance per column")
        qw = np.broadcast_to(im, x.shape).reshape(-1, t.block)
    out = np.empty((r, n // t.block * t.record), dtype=np.uint8)
    values = np.empty_like(x) if want_values else None
    step = max(1, (1 << 16) // n)
    for r0 in range(0, r, step):
        r1 = min(r0 + step, r)
        if not np.all(np.isfinite(x[r0:r1])):  # a chunk at a time: a whole-matrix mask is 1 byte a weight
            raise InputError(f"cannot quantize to {t.name}: the weights contain NaN or infinite values")
        sl = slice(r0 * n // t.block, r1 * n // t.block)
        codes, params = encode(t, blocks[sl], None if qw is None else qw[sl])
        out[r0:r1] = pack(t, codes, params).reshape(r1 - r0, -1)
        if values is not None:
            values[r0:r1] = dequantize_codes(t, codes, params).reshape(r1 - r0, n)
    return out, values


def dequantize(t: NBitsType, records: np.ndarray) -> np.ndarray:
    """Decode records ``(..., n/block * record)`` to float32 ``(..., n)``."""
    r = np.asarray(records, dtype=np.uint8)
    codes, params = unpack(t, r.reshape(-1, t.record))
    return dequantize_codes(t, codes, params).reshape(*r.shape[:-1], -1)


class _NBitsSweep(GridSweep):
    """GPTQ onto a MatMulNBits grid: per-block fp16 scale and integer zero point."""

    def __init__(self, t: NBitsType, im: np.ndarray | None) -> None:
        self.t, self.im = t, im

    def block(self, cols: np.ndarray, c0: int) -> tuple:
        blocks = np.ascontiguousarray(cols.T)
        p = choose_params(self.t, blocks, importance_block(self.im, c0, blocks.shape))
        d0 = p.d.astype(F32)
        rnd = scale_rounder(d0, d0 * p.zp.astype(F32), 0, self.t.levels - 1, 0)  # d*(q - zp) = d*q - d*zp
        return (lambda j, x: rnd(x)), p

    def stack(self, ps: list) -> NBitsParams:
        return NBitsParams(np.stack([p.d for p in ps], axis=1).reshape(-1),
                           np.stack([p.zp for p in ps], axis=1).reshape(-1))

    def pack(self, codes: np.ndarray, params: NBitsParams) -> np.ndarray:
        return pack(self.t, codes, params)

    def dequantize(self, codes: np.ndarray, params: NBitsParams) -> np.ndarray:
        return dequantize_codes(self.t, codes, params)
