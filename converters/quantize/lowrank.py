"""The low-rank float branch of SVDQuant-style quantization, as pure array maths.

``W ≈ Q + a @ b``: ``a`` ``(out, r)`` and ``b`` ``(r, in)`` stay in float and carry what the integers ``Q``
hold worst (the few large singular directions, where outliers live); the integers hold the residual.
:func:`fit` is the best rank-``r`` approximation of a matrix under the output error its inputs see:
with ``H = sum x x^T = C C^T`` (Cholesky, dampened like GPTQ's), ``||(E - a b) C||_F`` is minimised by the
truncated SVD of ``E C`` mapped back through ``C^-1`` (Eckart-Young in the whitened space). Without ``H``
it is the plain truncated SVD (the error of the weights themselves).
"""

from __future__ import annotations

import numpy as np
import torch

from edgekit.errors import InputError

__all__ = ["fit", "whitener"]


def fit(E: np.ndarray, rank: int, H: np.ndarray | torch.Tensor | None = None,
        damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` float32, ``a @ b`` the rank-``rank`` matrix closest to ``E`` ``(out, in)`` in
    ``trace((E - ab) H (E - ab)^T)`` (``H`` None: in Frobenius norm). ``rank`` is capped at ``min(out, in)``.
    ``H`` may be :func:`whitener`'s factor (a tensor) to share one factorisation between fits."""
    e = torch.from_numpy(np.asarray(E, dtype=np.float64))
    if e.ndim != 2:
        raise InputError(f"expected a 2-D matrix; got shape {tuple(e.shape)}")
    if rank < 1:
        raise InputError(f"the low-rank branch needs rank >= 1; got {rank}")
    r = min(rank, *e.shape)
    if H is None:
        US, Vt = _top(e, r)
        return US.float().numpy(), Vt.float().numpy()
    C = H if isinstance(H, torch.Tensor) else whitener(H, damp)
    US, Vt = _top(e @ C, r)
    # b C = Vt_r  <=>  C^T b^T = Vt_r^T (C^T upper triangular)
    b = torch.linalg.solve_triangular(C.T, Vt.T, upper=True).T
    return US.float().numpy(), b.float().numpy()


def _top(m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_r S_r, V_r^T)`` of the top ``r`` singular triplets of ``m``, from the eigenvectors of the smaller
    Gram matrix (float64): a full SVD of every layer cost ten times more and only ``r`` directions are kept."""
    if m.shape[0] > m.shape[1]:
        US, Vt = _top(m.T, r)
        s = US.norm(dim=0)
        return Vt.T * s, (US / torch.where(s > 0, s, 1.0)).T
    evals, evecs = torch.linalg.eigh(m @ m.T)
    U = evecs[:, -r:].flip(1)
    S = evals[-r:].flip(0).clamp_min(0).sqrt()
    Vt = (U.T @ m) / torch.where(S > 0, S, 1.0)[:, None]
    return U * S, Vt


def whitener(H: np.ndarray, damp: float = 0.01) -> torch.Tensor:
    """Lower float64 ``C`` with ``C C^T = H + damp * mean(diag H) * I`` (raised 10x until it factors)."""
    h = torch.from_numpy(np.asarray(H, dtype=np.float64))
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise InputError(f"H must be a square matrix; got shape {tuple(h.shape)}")
    mean = float(h.diagonal().mean()) or 1.0
    eye = torch.eye(h.shape[0], dtype=torch.float64)
    factor = max(damp, 1e-6)
    while True:
        L, info = torch.linalg.cholesky_ex(h + factor * mean * eye)
        if int(info) == 0:
            return L
        if factor >= 1.0:
            raise InputError("H is not positive semi-definite; expected sum x x^T over the calibration inputs")
        factor *= 10
