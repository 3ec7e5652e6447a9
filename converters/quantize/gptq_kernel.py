"""GPTQ onto a ggml grid: the result is exactly what a GGUF tensor of the target type stores.

Pure arrays in, arrays out (no model, no I/O). :func:`gptq` runs standard GPTQ (Frantar et al., 2022) on
one weight matrix ``W`` (Hugging Face layout ``(out, in)``: each row is a GGUF row, quantised along
``in`` in ggml blocks) against the Hessian proxy ``H = sum_x x x^T`` of its inputs, with the ggml block
structure built into the sweep:

* columns are visited left to right; when the sweep reaches the first column of a ggml block (32 columns
  for Q4_0..Q8_0 and IQ4_NL, a 256-column super-block for the K-quants) the block's parameters are chosen
  for every row at once by the ggml kernel's own ``choose_params`` -- llama.cpp's scale/min search,
  importance-weighted by ``imatrix`` when given -- from the *current* weights of the block's columns, i.e.
  after the errors of every earlier column have been propagated into them;
* each column is then rounded to the nearest grid point under those fixed parameters (the per-row
  effective scale and offset of the column's sub-block, read back from the stored fp16/6-bit scale codes
  exactly as ggml decodes them), and its error is propagated to the later columns through the upper
  Cholesky factor of ``H^-1`` -- per column to the rest of its lazy batch (``block_cols`` columns, a
  whole number of ggml blocks) and by one matrix product per batch to the rest of the matrix;
* at the end the codes and parameters are packed with the kernel's ``pack`` and decoded with its
  ``dequantize_codes``, so ``GridResult.weight`` is bit for bit what ``gguf.quants.dequantize`` gives for
  ``GridResult.data``.

:func:`rtn` is the baseline (llama.cpp's own choice), :func:`hessian_error` the comparison
(``trace((W - Wq) H (W - Wq)^T)``), and :func:`inverse_hessian` factors ``H`` once for several matrices
that read the same input.

Choices where the paper leaves room:

* dampening is ``damp * mean(diag H)`` on the diagonal, multiplied by 10 and retried (up to 1.0, i.e.
  the mean diagonal itself; from 1e-4 when ``damp`` is 0) if the Cholesky factorisation fails;
  ``GridResult.damp`` reports the factor used. The Hessian algebra runs in float64 (torch), the sweep
  in float32;
* a dead input column (``H[i, i] == 0``: the input was always zero in calibration) gets ``H[i, i] = 1``
  as in the reference implementation, but its weights are kept rather than zeroed: nothing in calibration
  constrains them, real inputs may not be zero there, and they still take part in their block's scale
  choice. Such a column is simply rounded to the grid and (its row of ``H^-1`` being zero off the
  diagonal) passes no error on;
* with ``imatrix`` the legacy types' search needs each row's mean square (llama.cpp's ``sigma2`` prior);
  it is taken from the original row, as ``ggml.quantize`` would;
* F32/F16/BF16 have nothing to optimise: :func:`gptq` returns the rounded weights, like :func:`rtn`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from edgekit.converters.quantize import ggml, nbits
from edgekit.converters.quantize.ggml import iq4nl, kquants, legacy
from edgekit.converters.quantize.ggml._common import best_index
from edgekit.errors import InputError

__all__ = ["GridResult", "InverseHessian", "gptq", "hessian_error", "inverse_hessian", "rtn"]

F32 = np.float32
FLOAT_TYPES: tuple[T, ...] = (T.F32, T.F16, T.BF16)
_MAX_DAMP = 1.0  # the dampening is raised 10x per failed factorisation, up to this


@dataclass(frozen=True)
class GridResult:
    """One quantised matrix.

    ``data``: uint8 ``(out, bytes_per_row)``, exactly the tensor bytes a GGUF stores for ``qtype``;
    ``weight``: float32 ``(out, in)``, what those bytes decode to (``gguf.quants.dequantize`` gives
    exactly this). :func:`gptq` also returns ``codes`` (``(out, in)``, the kernel's per-weight codes: uint8,
    int8 for Q8_0) and ``params`` (the kernel's parameter object for the ``out * in // block`` blocks in
    row-major order, i.e. for ``weight.reshape(-1, block)``), and the dampening factor it used.
    """

    qtype: T
    data: np.ndarray
    weight: np.ndarray
    codes: np.ndarray | None = None
    params: Any = None
    damp: float | None = None


@dataclass(frozen=True)
class InverseHessian:
    """What the sweep needs from ``H``, computed once by :func:`inverse_hessian`: float32 ``U`` ``(in, in)``,
    the upper Cholesky factor of the dampened ``H^-1`` (``U^T U = H^-1``), and the dampening factor it
    took. Pass it to :func:`gptq` in place of ``H`` to share one factorisation between the matrices that
    read the same input (q/k/v, gate/up)."""

    U: np.ndarray
    damp: float


# ----------------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------------


def _qtype(qtype: T | int | str) -> T:
    if isinstance(qtype, nbits.NBitsType):
        return qtype
    ggml.block_size(qtype)  # raises UnsupportedError with the list of supported types
    return T[qtype.upper()] if isinstance(qtype, str) else T(qtype)


def _matrix(W: np.ndarray) -> np.ndarray:
    w = np.asarray(W)
    if w.ndim != 2:
        raise InputError(f"expected a 2-D weight matrix (out, in); got shape {w.shape}")
    w = np.ascontiguousarray(w, dtype=F32)
    if not np.all(np.isfinite(w)):
        raise InputError("the weights contain NaN or infinite values")
    return w


def _importance(imatrix: np.ndarray | None, n_in: int) -> np.ndarray | None:
    if imatrix is None:
        return None
    im = np.asarray(imatrix, dtype=F32)
    if im.shape != (n_in,):
        raise InputError(f"imatrix has shape {im.shape}; expected ({n_in},), one importance per column")
    if not np.all(np.isfinite(im)) or np.any(im < 0):
        raise InputError("imatrix values must be finite and non-negative")
    return im


# ----------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------


def rtn(W: np.ndarray, qtype: T | int | str, imatrix: np.ndarray | None = None) -> GridResult:
    """The baseline: llama.cpp's own round-to-nearest choice (``ggml.quantize_roundtrip``)."""
    qt = _qtype(qtype)
    w = _matrix(W)
    im = _importance(imatrix, w.shape[1])
    data, weight = ggml.quantize_roundtrip(w, qt, im)
    return GridResult(qt, data, weight)


def hessian_error(W: np.ndarray, Wq: np.ndarray, H: np.ndarray) -> float:
    """``trace((W - Wq) H (W - Wq)^T)``: the layer's summed squared output error over the calibration
    inputs whose ``sum x x^T`` is ``H`` (computed in float64)."""
    d = torch.from_numpy(np.asarray(W, dtype=np.float64) - np.asarray(Wq, dtype=np.float64))
    h = torch.from_numpy(np.asarray(H, dtype=np.float64))
    return float(((d @ h) * d).sum())


def gptq(
    W: np.ndarray,
    H: np.ndarray | InverseHessian,
    qtype: T | int | str,
    *,
    damp: float = 0.01,
    block_cols: int = 128,
    imatrix: np.ndarray | None = None,
) -> GridResult:
    """GPTQ of ``W`` ``(out, in)`` against ``H`` ``(in, in)`` onto the grid of ``qtype``.

    ``block_cols`` is the lazy-batch width; it is rounded up to a whole number of ggml blocks, so a block
    never straddles two batches. ``imatrix`` ``(in,)`` weights the per-block scale/min searches (callers
    normally pass ``diag(H)``). ``H`` may be an :class:`InverseHessian` (then ``damp`` is its own). Raises
    InputError for bad shapes, non-finite values, an H that no dampening up to its mean diagonal makes
    positive definite, or a row length that is not a multiple of the type's block size.
    """
    qt = _qtype(qtype)
    w = _matrix(W)
    n_out, n_in = w.shape
    if qt in FLOAT_TYPES:
        return rtn(w, qt)
    bs = ggml.block_size(qt)
    if n_in % bs:
        raise InputError(
            f"rows of {n_in} weights cannot be stored as {qt.name}: the row length must be a multiple of {bs}"
        )
    if block_cols < 1:
        raise InputError(f"block_cols must be positive; got {block_cols}")
    if isinstance(H, InverseHessian):
        if H.U.shape != (n_in, n_in):
            raise InputError(f"the inverse Hessian has shape {H.U.shape}; expected ({n_in}, {n_in})")
        ih = H
    else:
        if np.shape(H) != (n_in, n_in):
            raise InputError(f"H has shape {np.shape(H)}; expected ({n_in}, {n_in})")
        ih = inverse_hessian(H, damp)
    im = _importance(imatrix, n_in)
    U = np.ascontiguousarray(ih.U, dtype=F32)
    grid = _grid(qt, w, im)
    batch = -(-block_cols // bs) * bs

    Wt = np.ascontiguousarray(w.T)  # (in, out): column i of W is the contiguous row Wt[i]
    codes_t = np.empty((n_in, n_out), dtype=np.int16)
    tWt, tU = torch.from_numpy(Wt), torch.from_numpy(U)
    block_params = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for b0 in range(0, n_in, batch):
            b1 = min(b0 + batch, n_in)
            err = np.empty((b1 - b0, n_out), dtype=F32)
            for k0 in range(b0, b1, bs):
                k1 = k0 + bs
                # every earlier column's error is already in Wt[k0:k1]: choose the block's parameters now
                rounder, params = grid.block(Wt[k0:k1], k0)
                block_params.append(params)
                for i in range(k0, k1):
                    x = Wt[i]
                    codes_t[i], value = rounder(i - k0, x)
                    e = (x - value) / U[i, i]
                    err[i - b0] = e
                    # rank-1 update of the rest of the batch: elementwise numpy on one thread; a matrix
                    # product per ggml block was slower, multithreaded BLAS on small operands thrashing
                    # the cores the Python loop needs
                    if i + 1 < b1:
                        Wt[i + 1 : b1] -= np.multiply.outer(U[i, i + 1 : b1], e)
            if b1 < n_in:
                tWt[b1:].addmm_(tU[b0:b1, b1:].T, torch.from_numpy(err), alpha=-1.0)

    codes = grid.codes(np.ascontiguousarray(codes_t.T).reshape(-1, bs))
    params = grid.stack(block_params)
    data = grid.pack(codes, params).reshape(n_out, -1)
    weight = grid.dequantize(codes, params).reshape(n_out, n_in)
    return GridResult(qt, data, weight, codes.reshape(n_out, n_in), params, ih.damp)


# ----------------------------------------------------------------------------------------------------
# the Hessian
# ----------------------------------------------------------------------------------------------------


def inverse_hessian(H: np.ndarray, damp: float = 0.01) -> InverseHessian:
    """Factor ``(H + damp * mean(diag H) * I)^-1`` for :func:`gptq` (float64 maths, float32 result), with
    dead columns given ``H[i, i] = 1``; the dampening is raised 10x per failed factorisation, up to
    ``_MAX_DAMP``.

    With ``J`` the order-reversing permutation and ``J H J = L L^T``, ``U = J L^-1 J`` is upper triangular
    with a positive diagonal and ``U^T U = J (J H J)^-1 J = H^-1``: one Cholesky and one triangular inverse
    instead of GPTQ's usual Cholesky, ``cholesky_inverse`` and second Cholesky (about half the time).
    """
    H = np.asarray(H)
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise InputError(f"H must be a square matrix; got shape {H.shape}")
    if not np.all(np.isfinite(H)):
        raise InputError("H contains NaN or infinite values")
    if not damp >= 0:
        raise InputError(f"damp must be non-negative; got {damp}")
    n = H.shape[0]
    # reversed once here; the symmetric H reads the same whether torch takes its upper or lower triangle
    h = torch.from_numpy(np.array(H[::-1, ::-1], dtype=np.float64))
    diag = h.diagonal()
    if bool((diag < 0).any()):
        raise InputError("H has negative diagonal entries; expected sum x x^T over the calibration inputs")
    dead = diag == 0
    if bool(dead.any()):
        h[dead, :] = 0.0
        h[:, dead] = 0.0
        diag[dead] = 1.0
    mean_diag = float(diag.mean())
    base = diag.clone()
    eye = torch.eye(n, dtype=torch.float64)
    factor = damp
    while True:
        diag.copy_(base + factor * mean_diag)
        L, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            Linv = torch.linalg.solve_triangular(L, eye, upper=False).to(torch.float32).numpy()
            if np.all(np.isfinite(Linv)):
                return InverseHessian(np.ascontiguousarray(Linv[::-1, ::-1]), factor)
        if factor >= _MAX_DAMP:
            raise InputError(
                f"H is not positive definite even with dampening {factor:g} x mean(diag H); "
                "expected sum x x^T over the calibration inputs"
            )
        factor = min(_MAX_DAMP, factor * 10 if factor > 0 else 1e-4)


# ----------------------------------------------------------------------------------------------------
# the grids: one adapter per kernel family, all vectorised over the rows
# ----------------------------------------------------------------------------------------------------


class _Grid:
    """Adapter interface: ``block(cols, first_col) -> (rounder, params)``, then assembly."""

    def block(self, cols: np.ndarray, c0: int):  # pragma: no cover - interface
        raise NotImplementedError

    def codes(self, codes: np.ndarray) -> np.ndarray:
        return codes.astype(np.uint8)


def _scale_rounder(d0: np.ndarray, a: np.ndarray | None, lo: int, hi: int, off: int):
    """Per-column rounding under per-row scales ``d0`` ``(out,)`` (float32, possibly 0) and offsets
    ``a`` (decoded value ``d0*q - a``)."""
    d = np.where(d0 != 0, d0, F32(np.inf)).astype(F32)
    flo, fhi = F32(lo), F32(hi)

    def rnd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        v = x / d if a is None else (x + a) / d
        q = np.clip(np.rint(v), flo, fhi)
        value = d0 * q if a is None else d0 * q - a
        return q + off, value

    return rnd


class _LegacyGrid(_Grid):
    def __init__(self, qt: T, w: np.ndarray, im: np.ndarray | None):
        self.qt = qt
        off, levels, self.affine = legacy._SPEC[qt]  # the kernel's own table: one source of truth
        if qt == T.Q8_0:  # signed int8 codes
            self.lo, self.hi, self.off = -128, 127, 0
        elif self.affine:  # d*q + m, q in [0, levels)
            self.lo, self.hi, self.off = 0, levels - 1, 0
        else:  # d*(code - off)
            self.lo, self.hi, self.off = -off, levels - 1 - off, off
        self.im = None if qt == T.Q8_0 else im
        # llama.cpp's weighted search uses each row's mean square as a prior: taken from the original row
        self.sigma2 = None if self.im is None else legacy.row_sigma2(w)

    def block(self, cols: np.ndarray, c0: int):
        blocks = np.ascontiguousarray(cols.T)  # (out, 32)
        qw = None if self.im is None else np.broadcast_to(self.im[c0 : c0 + blocks.shape[1]], blocks.shape)
        p = legacy.choose_params(self.qt, blocks, qw, self.sigma2)
        d0 = p.d.astype(F32)
        # stored as d*q + m; written as d*q - (-m), the same float32 result
        a = -p.m.astype(F32) if self.affine else None
        rnd = _scale_rounder(d0, a, self.lo, self.hi, self.off)
        return (lambda j, x: rnd(x)), p

    def codes(self, codes: np.ndarray) -> np.ndarray:
        return codes.astype(np.int8) if self.qt == T.Q8_0 else codes.astype(np.uint8)

    def stack(self, ps: list) -> legacy.LegacyParams:
        d = np.stack([p.d for p in ps], axis=1).reshape(-1)
        m = np.stack([p.m for p in ps], axis=1).reshape(-1) if self.affine else None
        return legacy.LegacyParams(d, m)

    def pack(self, codes, params):
        return legacy.pack(self.qt, codes, params)

    def dequantize(self, codes, params):
        return legacy.dequantize_codes(self.qt, codes, params)


class _KGrid(_Grid):
    def __init__(self, qt: T, w: np.ndarray, im: np.ndarray | None):
        self.qt = qt
        self.g, self.lo, self.hi, self.off, self.affine = kquants._SPEC[qt]  # the kernel's own table
        self.im = im

    def block(self, cols: np.ndarray, c0: int):
        blocks = np.ascontiguousarray(cols.T)  # (out, 256)
        qw = None if self.im is None else np.broadcast_to(self.im[c0 : c0 + blocks.shape[1]], blocks.shape)
        p = kquants.choose_params(self.qt, blocks, qw)
        d_eff, m_eff = kquants.sub_block_scales(self.qt, p)  # exactly as ggml decodes them
        d_t = np.ascontiguousarray(d_eff.T)
        m_t = None if m_eff is None else np.ascontiguousarray(m_eff.T)
        rounders = [
            _scale_rounder(d_t[s], None if m_t is None else m_t[s], self.lo, self.hi, self.off)
            for s in range(d_t.shape[0])
        ]
        g = self.g
        return (lambda j, x: rounders[j // g](x)), p

    def stack(self, ps: list) -> kquants.KParams:
        def cat(name: str) -> np.ndarray | None:
            parts = [getattr(p, name) for p in ps]
            if parts[0] is None:
                return None
            arr = np.stack(parts, axis=1)  # (out, n_blocks_per_row, ...)
            return arr.reshape(-1, *arr.shape[2:])

        return kquants.KParams(cat("d"), cat("scales"), cat("dmin"), cat("mins"))

    def pack(self, codes, params):
        return kquants.pack(self.qt, codes, params)

    def dequantize(self, codes, params):
        return kquants.dequantize_codes(self.qt, codes, params)


class _IQ4NLGrid(_Grid):
    def __init__(self, qt: T, w: np.ndarray, im: np.ndarray | None):
        self.im = im

    def block(self, cols: np.ndarray, c0: int):
        blocks = np.ascontiguousarray(cols.T)
        qw = None if self.im is None else np.broadcast_to(self.im[c0 : c0 + blocks.shape[1]], blocks.shape)
        p = iq4nl.choose_params(blocks, qw)
        d0 = p.d.astype(F32)
        inv = np.where(d0 != 0, F32(1.0) / np.where(d0 != 0, d0, F32(1.0)), F32(0.0)).astype(F32)
        table = iq4nl.KVALUES

        def rnd(j: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            idx = best_index(table, x * inv)
            return idx, d0 * table[idx]

        return rnd, p

    def stack(self, ps: list) -> iq4nl.IQ4NLParams:
        return iq4nl.IQ4NLParams(np.stack([p.d for p in ps], axis=1).reshape(-1))

    def pack(self, codes, params):
        return iq4nl.pack(codes, params)

    def dequantize(self, codes, params):
        return iq4nl.dequantize_codes(codes, params)


class _NBitsGrid(_Grid):
    """MatMulNBits grids (nbits.py): per-block fp16 scale and integer zero point."""

    def __init__(self, qt: nbits.NBitsType, w: np.ndarray, im: np.ndarray | None):
        self.t, self.im = qt, im

    def block(self, cols: np.ndarray, c0: int):
        blocks = np.ascontiguousarray(cols.T)
        qw = None if self.im is None else np.broadcast_to(self.im[c0 : c0 + blocks.shape[1]], blocks.shape)
        p = nbits.choose_params(self.t, blocks, qw)
        d0 = p.d.astype(F32)
        rnd = _scale_rounder(d0, d0 * p.zp.astype(F32), 0, self.t.levels - 1, 0)  # d*(q - zp) = d*q - d*zp
        return (lambda j, x: rnd(x)), p

    def stack(self, ps: list) -> nbits.NBitsParams:
        return nbits.NBitsParams(np.stack([p.d for p in ps], axis=1).reshape(-1),
                                 np.stack([p.zp for p in ps], axis=1).reshape(-1))

    def pack(self, codes, params):
        return nbits.pack(self.t, codes, params)

    def dequantize(self, codes, params):
        return nbits.dequantize_codes(self.t, codes, params)


def _grid(qt: T, w: np.ndarray, im: np.ndarray | None) -> _Grid:
    if isinstance(qt, nbits.NBitsType):
        return _NBitsGrid(qt, w, im)
    if qt in kquants.TYPES:
        return _KGrid(qt, w, im)
    if qt == T.IQ4_NL:
        return _IQ4NLGrid(qt, w, im)
    return _LegacyGrid(qt, w, im)
