"""Unstructured and N:M pruning of one weight matrix: magnitude, Wanda and SparseGPT (pure arrays).

``W`` is ``(out, in)`` in the checkpoint's layout; ``H = sum_x x x^T`` the Hessian proxy of its inputs
(what the calibrated pipeline captures). A mask is boolean ``(out, in)``, True where a weight is pruned.

* magnitude: the smallest ``|W|`` of each row (the baseline);
* Wanda (Sun et al., 2023): score ``|W_ij| * ||x_j||``, with ``||x_j||^2 = H_jj``, compared within each
  output row; no weight update;
* SparseGPT (Frantar & Alistarh, 2023): the OBS saliency ``W_ij^2 / [H^-1]_jj`` picks the mask in lazy
  blocks of columns (within each block, the lowest-saliency share of all its weights; for N:M, the ``n``
  lowest of every ``m`` consecutive inputs of each row), and the error of each pruned column is
  propagated to the later columns through the Cholesky factor of ``H^-1`` so the layer's output moves
  as little as possible.

``Sparsity`` is either a fraction (``0.5``) or an N:M pattern (``2:4``: 2 zeros in every 4 consecutive
inputs, the pattern sparse tensor cores accelerate). Masks hit the ratio exactly: ``round(ratio * in)``
weights per row (magnitude, Wanda) or per block (SparseGPT), ``n`` of every ``m`` for patterns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekit.errors import InputError, require


@dataclass(frozen=True)
class Sparsity:
    """``ratio`` of weights pruned (unstructured), or ``n`` of every ``m`` consecutive inputs."""

    ratio: float = 0.0
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.m:
            if not 0 < self.n < self.m:
                raise InputError(f"an N:M pattern needs 0 < N < M; got {self.n}:{self.m}")
        elif not 0.0 < self.ratio < 1.0:
            raise InputError(f"sparsity {self.ratio} must be between 0 and 1 (e.g. 0.5), or N:M like 2:4")

    @classmethod
    def parse(cls, text: str) -> Sparsity:
        """``"0.5"``, ``"50%"`` or ``"2:4"``."""
        t = str(text).strip()
        try:
            if ":" in t:
                n, m = (int(v) for v in t.split(":"))
                return cls(n=n, m=m)
            return cls(ratio=float(t[:-1]) / 100 if t.endswith("%") else float(t))
        except ValueError:
            raise InputError(f"sparsity {text!r}: give a fraction (0.5), a percentage (50%) or N:M (2:4)") from None

    @property
    def fraction(self) -> float:
        return self.n / self.m if self.m else self.ratio

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m else f"{self.ratio:g}"


def _check(W: np.ndarray, sp: Sparsity) -> np.ndarray:
    w = np.asarray(W, dtype=np.float32)
    if w.ndim != 2:
        raise InputError(f"expected a 2-D weight matrix; got shape {w.shape}")
    if sp.m and w.shape[1] % sp.m:
        raise InputError(f"rows of {w.shape[1]} weights do not split into groups of {sp.m}")
    return w


def select(score: np.ndarray, sp: Sparsity) -> np.ndarray:
    """Mask of the lowest scores: ``round(ratio * in)`` per row, or ``n`` per group of ``m`` columns."""
    out, n_in = score.shape
    mask = np.zeros(score.shape, dtype=bool)
    if sp.m:
        g = score.reshape(out, n_in // sp.m, sp.m)
        idx = np.argpartition(g, sp.n - 1, axis=2)[:, :, : sp.n]
        np.put_along_axis(mask.reshape(out, n_in // sp.m, sp.m), idx, True, axis=2)
        return mask
    k = int(round(sp.ratio * n_in))
    if k:
        idx = np.argpartition(score, k - 1, axis=1)[:, :k]
        np.put_along_axis(mask, idx, True, axis=1)
    return mask


def magnitude_mask(W: np.ndarray, sp: Sparsity) -> np.ndarray:
    return select(np.abs(_check(W, sp)), sp)


def wanda_mask(W: np.ndarray, H: np.ndarray, sp: Sparsity) -> np.ndarray:
    """Wanda's mask from ``|W_ij| * ||x_j||``; ``H``: the inputs' Hessian proxy, or just its diagonal
    (the per-column sums of squared inputs)."""
    w = _check(W, sp)
    H = np.asarray(H, dtype=np.float64)
    norms = np.sqrt(np.maximum(H if H.ndim == 1 else np.diag(H), 0.0)).astype(np.float32)
    return select(np.abs(w) * norms[None, :], sp)


def sparsegpt(W: np.ndarray, H: np.ndarray, sp: Sparsity, *, damp: float = 0.01,
              block_cols: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """SparseGPT: ``(pruned and updated weights, mask)``."""
    torch = require("torch", "torch")
    from edgekit.converters.quantize.gptq_kernel import inverse_hessian

    w = _check(W, sp).copy()
    n_out, n_in = w.shape
    if np.shape(H) != (n_in, n_in):
        raise InputError(f"H has shape {np.shape(H)}; expected ({n_in}, {n_in})")
    if sp.m:
        block_cols = max(sp.m, block_cols // sp.m * sp.m)
    U = torch.from_numpy(np.ascontiguousarray(inverse_hessian(H, damp).U, dtype=np.float32))
    Wt = torch.from_numpy(w)
    mask = torch.zeros((n_out, n_in), dtype=torch.bool)
    for b0 in range(0, n_in, block_cols):
        b1 = min(b0 + block_cols, n_in)
        W1 = Wt[:, b0:b1].clone()
        U1 = U[b0:b1, b0:b1]
        d = torch.diagonal(U1)
        err = torch.zeros_like(W1)
        if not sp.m:
            sal = (W1 ** 2 / d[None, :] ** 2).numpy()
            k = int(round(sp.ratio * sal.size))
            m1 = np.zeros(sal.size, dtype=bool)
            if k:
                m1[np.argpartition(sal.reshape(-1), k - 1)[:k]] = True
            mask[:, b0:b1] = torch.from_numpy(m1.reshape(sal.shape))
        for i in range(b1 - b0):
            if sp.m and i % sp.m == 0:
                sal = W1[:, i:i + sp.m] ** 2 / d[i:i + sp.m][None, :] ** 2
                idx = torch.topk(sal, sp.n, dim=1, largest=False).indices
                mask[:, b0 + i:b0 + i + sp.m].scatter_(1, idx, True)
            col = W1[:, i]
            q = torch.where(mask[:, b0 + i], torch.zeros_like(col), col)
            e = (col - q) / d[i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            err[:, i] = e
        Wt[:, b0:b1] = W1
        if b1 < n_in:
            Wt[:, b1:] -= err @ U[b0:b1, b1:]
    out = Wt.numpy()
    out[mask.numpy()] = 0.0
    return out, mask.numpy()
