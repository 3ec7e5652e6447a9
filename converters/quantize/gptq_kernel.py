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
* the lattice i-quants (IQ2_XXS..IQ3_S, IQ1_S, IQ1_M) store a codeword per 8 (or 4) columns of a row,
  so their sweeps round a group of 8 columns jointly (``group = 8``, one sign byte): the codeword(s) and
  signs nearest under the fixed scales, weighted by ``diag((U_SS^T U_SS)^-1)``, and the group's error
  carried forward in GPTQ's block form ``E = (W_S - Q_S) U_SS^-1``, ``W_rest -= E U_{S,rest}`` (GPTVQ's
  scheme on llama.cpp's fixed codebooks);
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
from gguf import GGMLQuantizationType as T

from edgekit.converters.quantize.grids import Grid, as_grid
from edgekit.errors import InputError, require

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


def _qtype(qtype: Grid | T | int | str) -> Grid:
    if isinstance(qtype, int) and not isinstance(qtype, T):
        qtype = T(qtype)
    return as_grid(qtype)  # raises UnsupportedError with the list of registered grids


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


def rtn(W: np.ndarray, qtype: Grid | T | int | str, imatrix: np.ndarray | None = None) -> GridResult:
    """The baseline: the grid's own round-to-nearest choice (llama.cpp's, for ggml types)."""
    grid = _qtype(qtype)
    w = _matrix(W)
    im = _importance(imatrix, w.shape[1])
    data, weight = grid.quantize_roundtrip(w, im)
    return GridResult(_spec(qtype, grid), data, weight)


def hessian_error(W: np.ndarray, Wq: np.ndarray, H: np.ndarray) -> float:
    """``trace((W - Wq) H (W - Wq)^T)``: the layer's summed squared output error over the calibration
    inputs whose ``sum x x^T`` is ``H`` (computed in float64)."""
    return float(hessian_row_errors(W, Wq, H).sum())


def hessian_row_errors(W: np.ndarray, Wq: np.ndarray, H: np.ndarray) -> np.ndarray:
    """:func:`hessian_error` per output row (float64)."""
    torch = require("torch", "torch")
    d = torch.from_numpy(np.asarray(W, dtype=np.float64) - np.asarray(Wq, dtype=np.float64))
    h = torch.from_numpy(np.asarray(H, dtype=np.float64))
    return ((d @ h) * d).sum(1).numpy()


def gptq(
    W: np.ndarray,
    H: np.ndarray | InverseHessian,
    qtype: Grid | T | int | str,
    *,
    damp: float = 0.01,
    block_cols: int = 128,
    imatrix: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    act_order: bool = False,
) -> GridResult:
    """GPTQ of ``W`` ``(out, in)`` against ``H`` ``(in, in)`` onto the grid of ``qtype``.

    ``mask`` (bool ``(out, in)``, True = pruned) keeps a pruning's zeros: a masked weight's target is 0
    (the grid's nearest value to 0 is stored: exactly 0 on symmetric grids), its whole current value is
    the error passed on to the later columns (SparseGPT's joint sparsify-and-quantize with a given mask),
    and masked weights take no part in their block's scale choice.

    ``block_cols`` is the lazy-batch width; it is rounded up to a whole number of ggml blocks, so a block
    never straddles two batches. ``imatrix`` ``(in,)`` weights the per-block scale/min searches (callers
    normally pass ``diag(H)``). ``H`` may be an :class:`InverseHessian` (then ``damp`` is its own). Raises
    InputError for bad shapes, non-finite values, an H that no dampening up to its mean diagonal makes
    positive definite, or a row length that is not a multiple of the type's block size.

    ``act_order``: GPTQ's activation order at the grain a block grid allows, whole blocks (a block's scale is
    chosen when the sweep enters it, so its columns stay together): the blocks are swept in decreasing order
    of their share of ``diag(H)``, so the columns whose inputs are largest are rounded while the most
    columns are left to absorb their errors. The stored bytes are in the file's own column order. Needs
    ``H`` itself (its permutation is factored here), and a grid whose parameters belong to one block each
    (:func:`permutes_blocks`: ggml's, ONNX's MatMulNBits and Core ML's blockwise, MLC's groups).
    """
    grid = _qtype(qtype)
    w = _matrix(W)
    n_out, n_in = w.shape
    if grid.is_float:
        return rtn(w, qtype)
    bs = grid.block
    if n_in % bs and grid.pads_last_block:
        return _gptq_padded(w, H, qtype, grid, damp, block_cols, imatrix, mask, act_order)
    if act_order and n_in // bs > 1:
        return _gptq_act_order(w, H, qtype, grid, damp, block_cols, imatrix, mask)
    if n_in % bs:
        raise InputError(
            f"rows of {n_in} weights cannot be stored as {grid.name}: the row length must be a multiple of {bs}"
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
    if mask is not None and np.shape(mask) != (n_out, n_in):
        raise InputError(f"the pruning mask has shape {np.shape(mask)}; expected ({n_out}, {n_in})")
    mask_t = None if mask is None else np.ascontiguousarray(np.asarray(mask, dtype=bool).T)
    U = np.ascontiguousarray(ih.U, dtype=F32)
    sweep = grid.sweep(w, im)
    batch = -(-block_cols // bs) * bs

    # (in, out): column i of W is the contiguous row Wt[i]. Always a copy: the sweep updates it in place, and
    # the transpose of a one-row matrix is already contiguous (it would be the caller's own array)
    Wt = np.array(w.T, dtype=F32, order="C", copy=True)
    codes_t = np.empty((n_in, n_out), dtype=np.int16)
    group = getattr(sweep, "group", 1)  # columns rounded jointly
    with np.errstate(divide="ignore", invalid="ignore"):
        block_params = (_sweep_groups if group > 1 else _sweep_columns)(sweep, group, Wt, U, codes_t, mask_t, bs, batch)

    codes = sweep.codes(np.ascontiguousarray(codes_t.T).reshape(-1, bs))
    params = sweep.stack(block_params)
    data = sweep.pack(codes, params).reshape(n_out, -1)
    weight = sweep.dequantize(codes, params).reshape(n_out, n_in)
    return GridResult(_spec(qtype, grid), data, weight, codes.reshape(n_out, n_in), params, ih.damp)


def permutes_blocks(qtype: Grid | T | int | str) -> bool:
    """Whether act-order can reorder ``qtype``'s blocks: a grid whose parameters belong to one block of a row
    each and whose sweep reads nothing but the block it is given (ggml's, ONNX's MatMulNBits and Core ML's
    blockwise, MLC's groups); Core ML's palettes (a table spans rows and columns) sweep in the file's order."""
    from edgekit.converters.quantize.grids.ggml import GGMLGrid
    from edgekit.converters.quantize.mlcgroup import MLCGroup
    from edgekit.converters.quantize.nbits import NBitsType

    return isinstance(_qtype(qtype), (GGMLGrid, NBitsType, MLCGroup))


def _gptq_act_order(w: np.ndarray, H: Any, qtype: Any, grid: Grid, damp: float, block_cols: int,
                    imatrix: np.ndarray | None, mask: np.ndarray | None,
                    mass: np.ndarray | None = None) -> GridResult:
    """:func:`gptq` with ``act_order``: sweep the blocks by decreasing ``diag(H)`` mass (or ``mass``, one
    value per column, where given), then put the codes, the per-block parameters and so the stored bytes back
    in the file's column order."""
    n_out, n_in = w.shape
    bs = grid.block
    if not permutes_blocks(grid):
        raise InputError(f"GPTQ's act-order permutes whole blocks of a row; the {grid.name} grid has none")
    if isinstance(H, InverseHessian):
        raise InputError("act-order permutes H before factoring it: pass H, not an InverseHessian")
    if n_in % bs:
        raise InputError(f"rows of {n_in} weights cannot be stored as {grid.name}: the row length must be a multiple "
                         f"of {bs}")
    if np.shape(H) != (n_in, n_in):
        raise InputError(f"H has shape {np.shape(H)}; expected ({n_in}, {n_in})")
    h = np.asarray(H, dtype=np.float64)
    nb = n_in // bs
    order = np.argsort(-(np.diag(h) if mass is None else mass).reshape(nb, bs).sum(1), kind="stable")
    perm = (order[:, None] * bs + np.arange(bs)).ravel()
    im = _importance(imatrix, n_in)
    if mask is not None and np.shape(mask) != (n_out, n_in):
        raise InputError(f"the pruning mask has shape {np.shape(mask)}; expected ({n_out}, {n_in})")
    res = gptq(w[:, perm], h[np.ix_(perm, perm)], qtype, damp=damp, block_cols=block_cols,
               imatrix=None if im is None else im[perm], mask=None if mask is None else np.asarray(mask, bool)[:, perm])
    back, back_blocks = np.argsort(perm), np.argsort(order)
    codes = np.ascontiguousarray(res.codes[:, back])
    params = _reorder_blocks(res.params, n_out, nb, back_blocks)
    data = grid.sweep(w, im).pack(codes.reshape(-1, bs), params).reshape(n_out, -1)
    return GridResult(res.qtype, data, np.ascontiguousarray(res.weight[:, back]), codes, params, res.damp)


def _reorder_blocks(params: Any, n_out: int, nb: int, order: np.ndarray) -> Any:
    """A sweep's stacked per-block parameters (a dataclass of arrays, first axis the ``n_out * nb`` blocks in
    row-major order) with each row's blocks taken in ``order``."""
    import dataclasses

    def take(v: Any) -> Any:
        if isinstance(v, np.ndarray) and v.ndim and v.shape[0] == n_out * nb:
            return np.ascontiguousarray(v.reshape(n_out, nb, *v.shape[1:])[:, order].reshape(v.shape))
        return v

    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        return dataclasses.replace(params, **{f.name: take(getattr(params, f.name)) for f in dataclasses.fields(params)})
    return take(params)


def _gptq_padded(w: np.ndarray, H: Any, qtype: Any, grid: Grid, damp: float, block_cols: int,
                 imatrix: np.ndarray | None, mask: np.ndarray | None, act_order: bool = False) -> GridResult:
    """GPTQ onto a grid that pads a row's last partial block (MLC's groups): the matrix is widened with zero
    columns that are masked (no say in their block's scale) and decoupled from the real ones in ``H`` (no
    error passes to or from them), so the real columns get exactly what GPTQ gives them; the padding is
    stored as the format stores it (code 0) and cut from ``weight`` and ``codes``. With ``act_order`` the
    blocks are ordered by the real columns' ``diag(H)`` alone."""
    n_out, n_in = w.shape
    pad = -n_in % grid.block
    wide = n_in + pad
    wp = np.zeros((n_out, wide), dtype=F32)
    wp[:, :n_in] = w
    if isinstance(H, InverseHessian):
        if H.U.shape != (n_in, n_in):
            raise InputError(f"the inverse Hessian has shape {H.U.shape}; expected ({n_in}, {n_in})")
        U = np.zeros((wide, wide), dtype=F32)
        U[:n_in, :n_in] = H.U
        U[n_in:, n_in:] = np.eye(pad, dtype=F32)
        hp: Any = InverseHessian(U, H.damp)
    else:
        if np.shape(H) != (n_in, n_in):
            raise InputError(f"H has shape {np.shape(H)}; expected ({n_in}, {n_in})")
        hm = np.asarray(H, dtype=np.float64)
        hp = np.zeros((wide, wide), dtype=np.float64)
        hp[:n_in, :n_in] = hm
        hp[np.arange(n_in, wide), np.arange(n_in, wide)] = max(float(np.mean(np.diag(hm))), 1e-8) \
            if np.all(np.isfinite(np.diag(hm))) else 1.0
    im = None if imatrix is None else np.concatenate([_importance(imatrix, n_in), np.zeros(pad, dtype=F32)])
    mk = np.zeros((n_out, wide), dtype=bool)
    mk[:, n_in:] = True
    if mask is not None:
        if np.shape(mask) != (n_out, n_in):
            raise InputError(f"the pruning mask has shape {np.shape(mask)}; expected ({n_out}, {n_in})")
        mk[:, :n_in] = np.asarray(mask, dtype=bool)
    if act_order and wide // grid.block > 1:
        if isinstance(H, InverseHessian):
            raise InputError("act-order permutes H before factoring it: pass H, not an InverseHessian")
        mass = np.concatenate([np.diag(np.asarray(H, dtype=np.float64)), np.zeros(pad)])
        res = _gptq_act_order(wp, hp, qtype, grid, damp, block_cols, im, mk, mass)
    else:
        res = gptq(wp, hp, qtype, damp=damp, block_cols=block_cols, imatrix=im, mask=mk)
    codes = np.array(res.codes, copy=True)
    codes[:, n_in:] = 0
    data = grid.sweep(wp, None).pack(codes.reshape(-1, grid.block), res.params).reshape(n_out, -1)
    return GridResult(res.qtype, data, np.ascontiguousarray(res.weight[:, :n_in]),
                      np.ascontiguousarray(codes[:, :n_in]), res.params, res.damp)


def _sweep_columns(sweep: Any, g: int, Wt: np.ndarray, U: np.ndarray, codes_t: np.ndarray,
                   mask_t: np.ndarray | None, bs: int, batch: int) -> list:
    """The column-by-column sweep (``Wt`` ``(in, out)`` updated in place, codes into ``codes_t``); returns
    the per-block parameters."""
    torch = require("torch", "torch")
    n_in, n_out = Wt.shape
    tWt, tU = torch.from_numpy(Wt), torch.from_numpy(U)
    block_params = []
    for b0 in range(0, n_in, batch):
        b1 = min(b0 + batch, n_in)
        err = np.empty((b1 - b0, n_out), dtype=F32)
        for k0 in range(b0, b1, bs):
            k1 = k0 + bs
            # every earlier column's error is already in Wt[k0:k1]: choose the block's parameters now
            cols = Wt[k0:k1] if mask_t is None else np.where(mask_t[k0:k1], F32(0), Wt[k0:k1])
            rounder, params = sweep.block(cols, k0)
            block_params.append(params)
            for i in range(k0, k1):
                x = Wt[i]
                codes_t[i], value = rounder(i - k0, x if mask_t is None else np.where(mask_t[i], F32(0), x))
                e = (x - value) / U[i, i]
                err[i - b0] = e
                # rank-1 update of the rest of the batch: elementwise numpy on one thread; a matrix
                # product per ggml block was slower, multithreaded BLAS on small operands thrashing
                # the cores the Python loop needs
                if i + 1 < b1:
                    Wt[i + 1 : b1] -= np.multiply.outer(U[i, i + 1 : b1], e)
        if b1 < n_in:
            tWt[b1:].addmm_(tU[b0:b1, b1:].T, torch.from_numpy(err), alpha=-1.0)
    return block_params


def _sweep_groups(sweep: Any, g: int, Wt: np.ndarray, U: np.ndarray, codes_t: np.ndarray, mask_t: np.ndarray | None,
                  bs: int, batch: int) -> list:
    """The sweep for grids that round ``g`` columns jointly (the lattice i-quants: a codeword per group).

    GPTQ's block form: for the group ``S``, ``E = (W_S - Q_S) U_SS^-1`` and ``W_rest -= E U_{S,rest}``, the
    optimal (OBS) update for fixing ``S`` jointly; with ``g = 1`` it is the column update above. The group's
    values are chosen under the weights ``diag((U_SS^T U_SS)^-1)``: the diagonal of the exact cost
    ``e^T (U_SS^T U_SS)^-1 e`` of fixing ``S`` while the later columns stay free to compensate (the full
    form picked no better codewords in trials). The sweep's rounder takes ``(j, columns (g, out), weights
    (g,))`` for the group starting at column ``j`` of its block.
    """
    torch = require("torch", "torch")
    n_in, n_out = Wt.shape
    tWt, tU = torch.from_numpy(Wt), torch.from_numpy(U)
    block_params = []
    for b0 in range(0, n_in, batch):
        b1 = min(b0 + batch, n_in)
        err = np.empty((b1 - b0, n_out), dtype=F32)
        for k0 in range(b0, b1, bs):
            cols = Wt[k0 : k0 + bs] if mask_t is None else np.where(mask_t[k0 : k0 + bs], F32(0), Wt[k0 : k0 + bs])
            rounder, params = sweep.block(cols, k0)
            block_params.append(params)
            for i0 in range(k0, k0 + bs, g):
                i1 = i0 + g
                x = Wt[i0:i1]
                Uss = U[i0:i1, i0:i1].astype(np.float64)
                uinv = np.linalg.inv(Uss)  # upper triangular, g x g
                wts = np.einsum("ij,ij->i", uinv, uinv).astype(F32)  # diag(uinv uinv^T) = diag((U^T U)^-1)
                codes_t[i0:i1], value = rounder(i0 - k0, x if mask_t is None else np.where(mask_t[i0:i1], F32(0), x), wts)
                e = (uinv.T @ (x - value)).astype(F32)  # (g, out): rows of E^T
                err[i0 - b0 : i1 - b0] = e
                if i1 < b1:
                    Wt[i1:b1] -= U[i0:i1, i1:b1].T @ e
        if b1 < n_in:
            tWt[b1:].addmm_(tU[b0:b1, b1:].T, torch.from_numpy(err), alpha=-1.0)
    return block_params


def _spec(qtype: Grid | T | int | str, grid: Grid) -> Any:
    """What ``GridResult.qtype`` reports: the ggml type for ggml grids (as callers name them), else the grid."""
    return getattr(grid, "qtype", grid)


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
    torch = require("torch", "torch")
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
