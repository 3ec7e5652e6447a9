"""AQLM: additive codebook quantization of one weight matrix against the Hessian proxy of its inputs.

Pure arrays in, arrays out (no model, no I/O). AQLM (Egiazarian et al., 2024) stores a linear ``W`` ``(out,
in)`` as, for every row ``r`` and every group ``j`` of ``g`` consecutive input columns, ``M`` codes of ``B``
bits each; the group's weights are ``s_r * sum_m C_m[code_rjm]``, with ``M`` learned codebooks of ``2^B``
vectors of length ``g`` per linear and one scale per output row. ``2x8`` (two 256-entry codebooks, groups of
8) is 2 bits per weight plus the row scales and 8 KiB of codebooks; ``1x16`` one 65536-entry codebook (1 MiB
per linear in fp16), for large matrices.

The objective is the layer's output error on calibration inputs, ``trace((W - Wq) H (W - Wq)^T)`` with
``H = sum_x x x^T`` (the same proxy GPTQ uses). :func:`encode` alternates:

* **codes** (the beam search): group by group, and within a group codebook by codebook, every row's code is
  replaced by the one that lowers the objective most, the other codes held; the change of the objective is
  exact, ``-2 g . d + d H_JJ d^T`` for a change ``d`` of the group's weights with ``g = (E H)_J`` the
  gradient of the current error ``E``, so the coupling of every group with all others through ``H`` is
  kept (``E H`` is updated by one rank-``g`` product per changed group). With ``beam > 1`` a group's
  ``M`` codes are searched jointly: the best ``beam`` partial choices are kept from one codebook to the next;
* **codebooks**: with the codes fixed the objective is quadratic in the codebooks; conjugate gradients on
  its normal equations (one ``(out, in) x (in, in)`` product per iteration) solve it;
* **scales**: with codes and codebooks fixed, each row's scale has a closed form.

Codebooks start from residual k-means on the scale-normalised groups, each coordinate weighted by its
column's ``H[i, i]`` (the importance). Every phase can only lower the objective; :func:`encode` returns the
best state seen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edgekit.errors import InputError, require

if TYPE_CHECKING:
    import torch

__all__ = ["AQLMScheme", "AQLMTensor", "decode", "encode", "hessian_error", "parse_scheme"]


@dataclass(frozen=True)
class AQLMScheme:
    """``num_codebooks`` x ``nbits`` codes per group of ``in_group`` input columns (``2x8``, ``1x16``)."""

    num_codebooks: int = 2
    nbits: int = 8
    in_group: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.num_codebooks <= 8 or not 2 <= self.nbits <= 16:
            raise InputError(f"AQLM scheme {self.num_codebooks}x{self.nbits}: use 1-8 codebooks of 2-16 bits "
                             "(2x8 or 1x16, say)")
        if self.in_group not in (4, 8, 16, 32):
            raise InputError(f"AQLM in-group size {self.in_group}: use 4, 8, 16 or 32")

    @property
    def name(self) -> str:
        return f"{self.num_codebooks}x{self.nbits}"

    @property
    def codebook_size(self) -> int:
        return 1 << self.nbits

    @property
    def code_bits_per_weight(self) -> float:
        return self.num_codebooks * self.nbits / self.in_group

    def nbytes(self, out: int, inp: int, float_bytes: int = 2) -> int:
        """Bytes of one ``(out, inp)`` linear: codes (``int8``/``int16`` as the checkpoint stores them),
        codebooks and row scales in the model's float type."""
        code_bytes = 1 if self.nbits <= 8 else 2
        codes = out * (inp // self.in_group) * self.num_codebooks * code_bytes
        return codes + (self.num_codebooks * self.codebook_size * self.in_group + out) * float_bytes


def parse_scheme(text: str, in_group: int = 8) -> AQLMScheme:
    """``"2x8"`` -> ``AQLMScheme(2, 8, in_group)``."""
    try:
        m, b = (int(p) for p in str(text).lower().split("x"))
    except ValueError:
        raise InputError(f"AQLM scheme {text!r}: write it as CODEBOOKSxBITS, e.g. 2x8 or 1x16") from None
    return AQLMScheme(m, b, in_group)


@dataclass
class AQLMTensor:
    """One encoded linear. codes: int64 ``(out, in/g, M)`` in ``[0, 2^B)``; codebooks: float32 ``(M, 2^B,
    g)``; scales: float32 ``(out,)``; ``error``/``rel_error``: the objective and its ratio to ``trace(W H
    W^T)``; ``history``: the objective after each phase."""

    scheme: AQLMScheme
    codes: np.ndarray
    codebooks: np.ndarray
    scales: np.ndarray
    error: float = 0.0
    rel_error: float = 0.0
    history: list[float] | None = None

    def weight(self) -> np.ndarray:
        return decode(self.codes, self.codebooks, self.scales)


def decode(codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The float32 ``(out, in)`` weights that codes, codebooks and row scales stand for."""
    out, groups, m = codes.shape
    g = codebooks.shape[-1]
    acc = np.zeros((out, groups, g), np.float32)
    for k in range(m):
        acc += codebooks[k][codes[..., k]]
    return (acc.reshape(out, groups * g) * scales[:, None]).astype(np.float32)


def hessian_error(W: np.ndarray, Wq: np.ndarray, H: np.ndarray) -> float:
    torch = require("torch", "torch")
    E = torch.from_numpy(np.asarray(W, np.float32) - np.asarray(Wq, np.float32))
    return float(((E @ torch.from_numpy(np.asarray(H, np.float32))) * E).sum())


class _State:
    """The matrices of one encoding run (torch float32)."""

    def __init__(self, W: torch.Tensor, H: torch.Tensor, scheme: AQLMScheme) -> None:
        self.W, self.H, self.s = W, H, scheme
        self.out, self.inp = W.shape
        self.groups = self.inp // scheme.in_group

    def weight(self, codes: torch.Tensor, books: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        acc = books[0][codes[..., 0]]
        for k in range(1, codes.shape[-1]):
            acc = acc + books[k][codes[..., k]]
        return acc.reshape(self.out, self.inp) * scales[:, None]

    def loss(self, Wq: torch.Tensor) -> float:
        E = self.W - Wq
        return float(((E @ self.H) * E).sum())


def _kmeans(X: torch.Tensor, wt: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Importance-weighted k-means of the rows of ``X`` (each coordinate weighted by ``wt``, same shape);
    starts from ``k`` rows drawn with probability by weighted norm (k-means++-lite)."""
    torch = require("torch", "torch")
    n = X.shape[0]
    p = (wt * X * X).sum(1) + 1e-12
    idx = torch.multinomial(p / p.sum(), k, replacement=n < k, generator=gen)
    C = X[idx].clone()
    for _ in range(iters):
        # sum_d w (x - c)^2 = sum w x^2 - 2 (w x) . c + w . c^2
        d = -2.0 * (wt * X) @ C.T + wt @ (C * C).T
        a = d.argmin(1)
        onehot = torch.nn.functional.one_hot(a, k).to(X.dtype)  # (n, k): sums by cluster as one product
        num, den = onehot.T @ (wt * X), onehot.T @ wt
        live = den > 0
        C = torch.where(live, num / den.clamp_min(1e-30), C)
        empty = ~live.any(1)
        if empty.any():  # empty clusters restart on the worst-served rows (as many as there are rows)
            n_new = min(int(empty.sum()), n)
            far = (wt * (X - C[a]) ** 2).sum(1).topk(n_new).indices
            C[torch.nonzero(empty).reshape(-1)[:n_new]] = X[far]
    return C


def _init(st: _State, gen: torch.Generator, kmeans_iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch = require("torch", "torch")
    s = st.s
    scales = st.W.pow(2).mean(1).sqrt().clamp_min(1e-8)
    Wn = st.W / scales[:, None]
    imp = torch.diagonal(st.H).clamp_min(0) + 1e-8
    wt = (imp.reshape(1, st.groups, s.in_group) * (scales ** 2)[:, None, None]).reshape(-1, s.in_group)
    R = Wn.reshape(-1, s.in_group).clone()
    books, codes = [], []
    # k-means on at most 64 vectors per codebook entry: enough to place the entries, and bounded time
    cap = 64 * s.codebook_size
    for _ in range(s.num_codebooks):
        sub = torch.randperm(R.shape[0], generator=gen)[:cap] if R.shape[0] > cap else slice(None)
        C = _kmeans(R[sub], wt[sub], s.codebook_size, kmeans_iters, gen)
        a = torch.empty(R.shape[0], dtype=torch.long)
        for b0 in range(0, R.shape[0], 65536):  # assign all in slices (the distance matrix is n x 2^B)
            d = -2.0 * (wt[b0:b0 + 65536] * R[b0:b0 + 65536]) @ C.T + wt[b0:b0 + 65536] @ (C * C).T
            a[b0:b0 + 65536] = d.argmin(1)
        R -= C[a]
        books.append(C)
        codes.append(a.reshape(st.out, st.groups))
    return torch.stack(codes, -1), torch.stack(books), scales


def _codes_pass(st: _State, codes: torch.Tensor, books: torch.Tensor, scales: torch.Tensor, beam: int) -> None:
    """One sweep over the groups, changing codes in place (see the module docstring)."""
    torch = require("torch", "torch")
    g, M = st.s.in_group, st.s.num_codebooks
    E = st.W - st.weight(codes, books, scales)
    G = E @ st.H
    rows = torch.arange(st.out)
    for j in range(st.groups):
        J = slice(j * g, (j + 1) * g)
        Hjj = st.H[J, J]
        A = [books[m] @ Hjj @ books[m].T for m in range(M)]  # (K, K): c H c'^T
        cur = codes[:, j, :]  # (out, M)
        # beam entries: (codes so far (out, M), delta of the group's weights so far (out, g), objective change)
        entries = [(cur.clone(), torch.zeros(st.out, g), torch.zeros(st.out))]
        for m in range(M):
            cands_codes, cands_delta, cands_gain = [], [], []
            for c_codes, c_delta, c_gain in entries:
                # the gradient with the change so far applied: g' = g - d H_JJ
                gj = G[:, J] - c_delta @ Hjj
                old = books[m][c_codes[:, m]]  # (out, g)
                # objective change of swapping code m for every k: -2 s (g'.(C_k - C_old)) + s^2 (A_kk - 2A_ok + A_oo)
                lin = -2.0 * scales[:, None] * (gj @ books[m].T - (gj * old).sum(1, keepdim=True))
                Ao = A[m][c_codes[:, m]]  # (out, K)
                quad = (scales ** 2)[:, None] * (torch.diagonal(A[m])[None, :] - 2.0 * Ao
                                                  + Ao[rows, c_codes[:, m]][:, None])
                # the cross term with the change already made: 2 d H_JJ (s (C_k - C_old))^T is in g'
                total = c_gain[:, None] + lin + quad
                cands_gain.append(total)
                cands_codes.append(c_codes)
                cands_delta.append(c_delta)
            allg = torch.cat(cands_gain, 1)  # (out, n_entries * K)
            K = st.s.codebook_size
            keep = allg.topk(min(beam, allg.shape[1]), dim=1, largest=False)
            entries = []
            for b in range(keep.indices.shape[1]):
                pick = keep.indices[:, b]
                src, k = pick // K, pick % K
                c_codes = torch.stack(cands_codes)[src, rows].clone()
                c_delta = torch.stack(cands_delta)[src, rows]
                new = books[m][k] - books[m][c_codes[:, m]]
                c_codes[:, m] = k
                entries.append((c_codes, c_delta + scales[:, None] * new, keep.values[:, b]))
        best_codes, best_delta, best_gain = entries[0]
        # never worse than the codes held (gain 0): rows whose best is not an improvement keep theirs
        worse = best_gain > 0
        best_codes[worse], best_delta[worse] = cur[worse], 0.0
        codes[:, j, :] = best_codes
        # the error loses the change: E_J -= d, and E H with it
        G -= best_delta @ st.H[J, :]


def _codebook_update(st: _State, codes: torch.Tensor, books: torch.Tensor, scales: torch.Tensor,
                     iters: int) -> torch.Tensor:
    """The codebooks minimising the objective for fixed codes and scales: conjugate gradients on the
    normal equations ``A^T (A C) H = A^T W H`` (``A``: codebooks -> weights, linear)."""
    torch = require("torch", "torch")
    M, K, g = books.shape
    flat = (codes + torch.arange(M) * K).reshape(-1, M)  # (out*groups, M) rows of the stacked books

    def forward(C: torch.Tensor) -> torch.Tensor:  # (M, K, g) -> (out, in)
        return st.weight(codes, C, scales)

    def adjoint(Z: torch.Tensor) -> torch.Tensor:  # (out, in) -> (M, K, g)
        zs = (Z * scales[:, None]).reshape(-1, g)
        acc = torch.zeros(M * K, g)
        for m in range(M):
            acc.index_add_(0, flat[:, m], zs)
        return acc.reshape(M, K, g)

    ridge = 1e-6 * float(torch.diagonal(st.H).mean())

    def normal(C: torch.Tensor) -> torch.Tensor:
        return adjoint(forward(C) @ st.H) + ridge * C

    X = books.clone()
    r = adjoint(st.W @ st.H) - normal(X)
    p = r.clone()
    rs = float((r * r).sum())
    rs0 = rs
    for _ in range(iters):
        if rs <= 1e-12 * rs0:
            break
        Ap = normal(p)
        alpha = rs / max(float((p * Ap).sum()), 1e-30)
        X += alpha * p
        r -= alpha * Ap
        rs_new = float((r * r).sum())
        p = r + (rs_new / rs) * p
        rs = rs_new
    return X


def _scale_update(st: _State, codes: torch.Tensor, books: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    torch = require("torch", "torch")
    U = st.weight(codes, books, torch.ones_like(scales))
    UH = U @ st.H
    num, den = (st.W * UH).sum(1), (U * UH).sum(1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), scales)


def encode(W: np.ndarray, H: np.ndarray, scheme: AQLMScheme, *, rounds: int = 3, beam: int = 1,
           cg_iters: int = 30, kmeans_iters: int = 12, damp: float = 0.01, seed: int = 0,
           progress: Callable[[int, int], None] | None = None) -> AQLMTensor:
    """Encode ``W`` ``(out, in)`` with ``scheme`` against ``H`` ``(in, in)``: k-means start, then ``rounds``
    of codes / codebooks / scales (see the module docstring). ``damp``: times the mean diagonal added to
    ``H``'s diagonal (and a dead column, ``H[i, i] == 0``, gets the mean), so every column counts a little.
    ``progress(done, total)`` after each phase."""
    torch = require("torch", "torch")
    W = np.asarray(W, np.float32)
    out, inp = W.shape
    if inp % scheme.in_group:
        raise InputError(f"AQLM groups of {scheme.in_group} columns need an input width that divides; {inp} does not")
    Ht = torch.from_numpy(np.asarray(H, np.float64)).clone()
    diag = torch.diagonal(Ht)
    mean = float(diag.mean()) if float(diag.mean()) > 0 else 1.0
    diag[diag <= 0] = mean
    diag += damp * mean
    Ht = (Ht / mean).float()  # the objective's scale does not matter; keep it near 1
    st = _State(torch.from_numpy(W), Ht, scheme)
    gen = torch.Generator().manual_seed(seed)
    total = 1 + 3 * rounds
    codes, books, scales = _init(st, gen, kmeans_iters)
    base = st.loss(torch.zeros_like(st.W))
    history = [st.loss(st.weight(codes, books, scales))]
    best = (history[-1], codes.clone(), books.clone(), scales.clone())
    if progress:
        progress(1, total)
    for r in range(rounds):
        for phase in range(3):
            if phase == 0:
                _codes_pass(st, codes, books, scales, beam)
            elif phase == 1:
                books = _codebook_update(st, codes, books, scales, cg_iters)
            else:
                scales = _scale_update(st, codes, books, scales)
            history.append(st.loss(st.weight(codes, books, scales)))
            if history[-1] < best[0]:
                best = (history[-1], codes.clone(), books.clone(), scales.clone())
            if progress:
                progress(2 + 3 * r + phase, total)
    loss, codes, books, scales = best
    return AQLMTensor(scheme, codes.numpy().astype(np.int64), books.numpy().astype(np.float32),
                      scales.numpy().astype(np.float32), error=loss * mean, rel_error=loss / max(base, 1e-30),
                      history=[h / max(base, 1e-30) for h in history])
