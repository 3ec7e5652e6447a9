"""GPTQ onto the lattice i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S): the rounding a GPTQ sweep
does under scales already fixed by llama.cpp's own search (:func:`.lattice.encode`), one group of 8
weights at a time, and the bytes of the codes it chose.

:func:`sub_block_scales` reads the decoded scales out of the search's parameters, :func:`round_group`
picks the nearest signed codeword(s) of a group in the weighted sense, and :func:`codes_to_blocks` turns
the per-weight codes into codebook indices and sign bytes for :func:`.lattice.pack`. :func:`codebook` (the
grid as ggml decodes it) also serves IQ1's rounding.
"""

from __future__ import annotations

import functools

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from ._common import F32
from .lattice import SPECS, LatticeParams, tables


@functools.cache
def codebook(qtype: T) -> tuple[np.ndarray, np.ndarray]:
    """The codebook as ggml decodes it: values ``(n, dim)`` float32 (``gguf.quants``' grid, e.g. 8/25/43
    for IQ2, not the encoder's ``2l+1``) and each coordinate's level ``(n, dim)`` (index into its values)."""
    tab = tables(qtype)
    cls = getattr(gq, qtype.name)
    values = np.asarray(cls.grid, dtype=F32).reshape(cls.grid_shape)
    return np.ascontiguousarray(values), ((tab.points.astype(np.int64) - 1) // 2).astype(np.uint8)


def sub_block_scales(qtype: T, params: LatticeParams) -> np.ndarray:
    """Each sub-block's scale ``(n_blocks, 256/sub)``, float32, exactly as ggml decodes it (a weight is
    ``(scale * grid value) * sign``)."""
    d, ls = params.d.astype(F32)[:, None], params.ls.astype(F32)
    if qtype == T.IQ3_S:
        return d * (F32(1.0) + F32(2.0) * ls)
    quarter = F32(0.5) if qtype == T.IQ3_XXS else F32(0.25)
    return d * (F32(0.5) + ls) * quarter


def round_group(qtype: T, x: np.ndarray, scale: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The codeword(s) and signs nearest to one group of 8 weights per row under a fixed scale, in the
    ``w``-weighted sense: ``x`` ``(R, 8)``, ``scale`` ``(R,)``, ``w`` ``(8,)`` non-negative. Returns the
    per-weight codes ``(R, 8)`` uint8 (level ``| 8`` when negative; :func:`codes_to_blocks` reads them) and
    the float32 values they decode to.

    The codebook's coordinates are positive, so each weight's best sign is its own; the cost of a codeword
    ``c`` is then ``s^2 sum(w c^2) - 2 s sum(w |x| c)`` (one matrix product over the codebook). With the
    parity rule (an even count of minus signs per 8 weights) a row whose count is odd flips exactly one
    sign -- more flips only add cost -- and the best flip is searched jointly with the codeword(s): with
    two 4-dim codewords per 8 weights (IQ3), the flip goes in whichever half costs less.
    """
    spec = SPECS[qtype]
    vals, lev = codebook(qtype)
    dim = spec.dim
    x = np.asarray(x, dtype=F32)
    ax, neg = np.abs(x), x < 0
    s = np.asarray(scale, dtype=F32)[:, None]
    w = np.asarray(w, dtype=F32)
    odd = np.nonzero(neg.sum(axis=1) % 2 == 1)[0] if spec.parity else np.zeros(0, np.intp)
    choice, flip = [], np.full(x.shape, False)
    plain_cost, flip_cost, flip_pick = [], [], []
    for h in range(8 // dim):
        cs = slice(h * dim, (h + 1) * dim)
        wx = ax[:, cs] * w[cs]
        cost = (s * s) * ((vals * vals) @ w[cs])[None, :] - F32(2.0) * s * (wx @ vals.T)  # (R, n)
        best = np.argmin(cost, axis=1)
        choice.append(best)
        plain_cost.append(cost[np.arange(x.shape[0]), best])
        if odd.size:
            co, so, wo = cost[odd], s[odd], wx[odd]
            fbest = np.full(co.shape, np.inf, F32)
            fi = np.zeros(co.shape, np.int8)
            for i in range(dim):  # flipping coordinate i costs 4 s w_i |x_i| c_i more
                ci = co + F32(4.0) * (so * wo[:, i : i + 1]) * vals[:, i][None, :]
                better = ci < fbest
                fbest = np.where(better, ci, fbest)
                fi = np.where(better, np.int8(i), fi)
            fc = np.argmin(fbest, axis=1)
            r = np.arange(odd.size)
            flip_cost.append(fbest[r, fc])
            flip_pick.append((fc, fi[r, fc].astype(np.intp) + h * dim))
    if odd.size:
        halves = len(choice)
        total = sum(plain_cost)[odd]
        # the flip goes in half h: its flipped cost replaces its plain one
        alt = np.stack([total - plain_cost[h][odd] + flip_cost[h] for h in range(halves)], axis=1)
        hbest = np.argmin(alt, axis=1)
        for h in range(halves):
            sel = hbest == h
            rows = odd[sel]
            choice[h][rows] = flip_pick[h][0][sel]
            flip[rows, flip_pick[h][1][sel]] = True
    idx = np.stack(choice, axis=1)  # (R, 8 // dim)
    levels = lev[idx].reshape(x.shape)
    minus = neg ^ flip
    values = (s * vals[idx].reshape(x.shape)) * np.where(minus, F32(-1.0), F32(1.0))
    return (levels | (minus.astype(np.uint8) << 3)).astype(np.uint8), values.astype(F32)


def codes_to_blocks(qtype: T, codes: np.ndarray, d: np.ndarray, ls: np.ndarray) -> tuple[np.ndarray, LatticeParams]:
    """Codebook indices ``(n_blocks, 256/dim)`` and parameters (sign masks included) of per-weight codes
    ``(n_blocks, 256)`` from :func:`round_group`, under super-block scales ``d`` and scale codes ``ls``."""
    spec = SPECS[qtype]
    tab = tables(qtype)
    nb = codes.shape[0]
    c = codes.astype(np.int64)
    lv = (c & 7).reshape(nb, -1, spec.dim)
    gi = tab.kmap[(lv << (spec.bits * np.arange(spec.dim))).sum(axis=2)]
    if (gi < 0).any():
        raise ValueError(f"{qtype.name}: codes off the codebook")
    signs = (((c >> 3) & 1).reshape(nb, -1, 8) << np.arange(8)).sum(axis=2)
    if spec.parity:
        signs &= 0x7F  # the eighth sign is implied by the even count
    return gi.astype(np.uint16), LatticeParams(d, ls, signs.astype(np.uint8))
