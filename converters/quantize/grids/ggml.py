"""The ggml block types as grids: byte-identical with llama.cpp's quantisers (the kernels are
:mod:`edgekit.converters.quantize.ggml`), with GPTQ's sweep onto each family's exact grid (the lattice
i-quants and IQ1 a group of 8 columns at a time: a codeword per group)."""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from edgekit.converters.quantize import ggml
from edgekit.converters.quantize.ggml import (
    iq1,
    iq4nl,
    iq4xs,
    kquants,
    lattice,
    lattice_round,
    legacy,
    ternary,
)
from edgekit.converters.quantize.ggml._common import best_index
from edgekit.converters.quantize.grids.base import (
    F32,
    Grid,
    GridSweep,
    importance_block,
    register_grid,
    scale_rounder,
)
from edgekit.errors import InputError

FLOAT_TYPES = (T.F32, T.F16, T.BF16)


class GGMLGrid(Grid):
    """One ggml type. ``qtype``: the ``gguf.GGMLQuantizationType`` it stores."""

    def __init__(self, qtype: T) -> None:
        self.qtype = qtype
        self.name = qtype.name
        self.block, self._type_size = GGML_QUANT_SIZES[qtype]
        self.is_float = qtype in FLOAT_TYPES

    @property
    def bits_per_weight(self) -> float:
        return self._type_size * 8 / self.block

    def row_bytes(self, n: int) -> int:
        return n // self.block * self._type_size

    def quantize_roundtrip(self, x: np.ndarray, imatrix: np.ndarray | None = None, *,
                           want_values: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        if want_values:
            return ggml.quantize_roundtrip(x, self.qtype, imatrix)
        return ggml.quantize(x, self.qtype, imatrix), None

    def dequantize(self, raw: np.ndarray) -> np.ndarray:
        return ggml.dequantize(raw, self.qtype)

    def sweep(self, w: np.ndarray, imatrix: np.ndarray | None) -> GridSweep:
        if self.qtype in kquants.TYPES:
            return _KSweep(self.qtype, imatrix)
        if self.qtype == T.IQ4_NL:
            return _IQ4NLSweep(imatrix)
        if self.qtype == T.IQ4_XS:
            return _IQ4XSSweep(imatrix)
        if self.qtype in lattice.TYPES:
            return _LatticeSweep(self.qtype, imatrix)
        if self.qtype in iq1.TYPES:
            return _IQ1Sweep(self.qtype, imatrix)
        if self.qtype in legacy.TYPES:
            return _LegacySweep(self.qtype, w, imatrix)
        return super().sweep(w, imatrix)


class _LegacySweep(GridSweep):
    def __init__(self, qt: T, w: np.ndarray, im: np.ndarray | None) -> None:
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

    def block(self, cols: np.ndarray, c0: int) -> tuple[Any, Any]:
        blocks = np.ascontiguousarray(cols.T)  # (out, 32)
        p = legacy.choose_params(self.qt, blocks, importance_block(self.im, c0, blocks.shape), self.sigma2)
        d0 = p.d.astype(F32)
        # stored as d*q + m; written as d*q - (-m), the same float32 result
        a = -p.m.astype(F32) if self.affine else None
        rnd = scale_rounder(d0, a, self.lo, self.hi, self.off)
        return (lambda j, x: rnd(x)), p

    def codes(self, codes: np.ndarray) -> np.ndarray:
        return codes.astype(np.int8) if self.qt == T.Q8_0 else codes.astype(np.uint8)

    def stack(self, ps: list) -> legacy.LegacyParams:
        d = np.stack([p.d for p in ps], axis=1).reshape(-1)
        m = np.stack([p.m for p in ps], axis=1).reshape(-1) if self.affine else None
        return legacy.LegacyParams(d, m)

    def pack(self, codes: np.ndarray, params: Any) -> np.ndarray:
        return legacy.pack(self.qt, codes, params)

    def dequantize(self, codes: np.ndarray, params: Any) -> np.ndarray:
        return legacy.dequantize_codes(self.qt, codes, params)


class _KSweep(GridSweep):
    def __init__(self, qt: T, im: np.ndarray | None) -> None:
        self.qt = qt
        self.g, self.lo, self.hi, self.off, self.affine = kquants._SPEC[qt]  # the kernel's own table
        self.im = im

    def block(self, cols: np.ndarray, c0: int) -> tuple[Any, Any]:
        blocks = np.ascontiguousarray(cols.T)  # (out, 256)
        p = kquants.choose_params(self.qt, blocks, importance_block(self.im, c0, blocks.shape))
        d_eff, m_eff = kquants.sub_block_scales(self.qt, p)  # exactly as ggml decodes them
        d_t = np.ascontiguousarray(d_eff.T)
        m_t = None if m_eff is None else np.ascontiguousarray(m_eff.T)
        rounders = [scale_rounder(d_t[s], None if m_t is None else m_t[s], self.lo, self.hi, self.off)
                    for s in range(d_t.shape[0])]
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

    def pack(self, codes: np.ndarray, params: Any) -> np.ndarray:
        return kquants.pack(self.qt, codes, params)

    def dequantize(self, codes: np.ndarray, params: Any) -> np.ndarray:
        return kquants.dequantize_codes(self.qt, codes, params)


class _IQ4NLSweep(GridSweep):
    def __init__(self, im: np.ndarray | None) -> None:
        self.im = im

    def block(self, cols: np.ndarray, c0: int) -> tuple[Any, Any]:
        blocks = np.ascontiguousarray(cols.T)
        p = iq4nl.choose_params(blocks, importance_block(self.im, c0, blocks.shape))
        d0 = p.d.astype(F32)
        inv = np.where(d0 != 0, F32(1.0) / np.where(d0 != 0, d0, F32(1.0)), F32(0.0)).astype(F32)
        table = iq4nl.KVALUES

        def rnd(j: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            idx = best_index(table, x * inv)
            return idx, d0 * table[idx]

        return rnd, p

    def stack(self, ps: list) -> iq4nl.IQ4NLParams:
        return iq4nl.IQ4NLParams(np.stack([p.d for p in ps], axis=1).reshape(-1))

    def pack(self, codes: np.ndarray, params: Any) -> np.ndarray:
        return iq4nl.pack(codes, params)

    def dequantize(self, codes: np.ndarray, params: Any) -> np.ndarray:
        return iq4nl.dequantize_codes(codes, params)


class TernaryGrid(GGMLGrid):
    """TQ1_0 / TQ2_0 with the least-squares scale per block (exact for ternary blocks with an fp16 scale);
    ``ggml.quantize`` keeps llama.cpp's own absmax rounding for byte identity with llama-quantize."""

    def __init__(self, qtype: T, scale: str = "best") -> None:
        super().__init__(qtype)
        self.scale = scale

    def quantize_roundtrip(self, x: np.ndarray, imatrix: np.ndarray | None = None, *,
                           want_values: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        x = np.ascontiguousarray(np.asarray(x, dtype=F32))
        if x.shape[-1] % self.block:
            return super().quantize_roundtrip(x, imatrix, want_values=want_values)  # its one-line error
        blocks = x.reshape(-1, self.block)
        codes, p = ternary.encode(self.qtype, blocks, self.scale)
        raw = ternary.pack(self.qtype, codes, p).reshape(*x.shape[:-1], -1)
        return raw, ternary.dequantize_codes(codes, p).reshape(x.shape) if want_values else None

    def sweep(self, w: np.ndarray, imatrix: np.ndarray | None) -> GridSweep:
        return _TernarySweep(self.qtype, self.scale)


class _TernarySweep(GridSweep):
    def __init__(self, qt: T, scale: str) -> None:
        self.qt, self.scale = qt, scale

    def block(self, cols: np.ndarray, c0: int) -> tuple[Any, Any]:
        blocks = np.ascontiguousarray(cols.T)  # (out, 256)
        _, d = ternary.ternarize(blocks, self.scale)
        p = ternary.TernaryParams(d)
        rnd = scale_rounder(d.astype(F32), None, -1, 1, 1)
        return (lambda j, x: rnd(x)), p

    def stack(self, ps: list) -> ternary.TernaryParams:
        return ternary.TernaryParams(np.stack([p.d for p in ps], axis=1).reshape(-1))

    def pack(self, codes: np.ndarray, params: Any) -> np.ndarray:
        return ternary.pack(self.qt, codes, params)

    def dequantize(self, codes: np.ndarray, params: Any) -> np.ndarray:
        return ternary.dequantize_codes(codes, params)


class _IQ4XSSweep(GridSweep):
    """IQ4_XS: the 256-column block's sub-block scales chosen from the columns as GPTQ has updated them,
    then each column rounded to the table under its sub-block's effective scale."""

    def __init__(self, im: np.ndarray | None) -> None:
        self.im = im

    def block(self, cols: np.ndarray, c0: int) -> tuple[Any, Any]:
        blocks = np.ascontiguousarray(cols.T)  # (out, 256)
        p = iq4xs.choose_params(blocks, importance_block(self.im, c0, blocks.shape))
        dl = iq4xs.sub_block_scales(p)  # (out, 8)
        with np.errstate(divide="ignore"):
            inv = np.where(dl != 0, F32(1.0) / np.where(dl != 0, dl, F32(1.0)), F32(0.0)).astype(F32)
        table = iq4nl.KVALUES

        def rnd(j: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            s = j // 32
            idx = best_index(table, x * inv[:, s])
            return idx, dl[:, s] * table[idx]

        return rnd, p

    def stack(self, ps: list) -> iq4xs.IQ4XSParams:
        return iq4xs.IQ4XSParams(np.stack([p.d for p in ps], axis=1).reshape(-1),
                                 np.stack([p.ls for p in ps], axis=1).reshape(-1, 8))

    def pack(self, codes: np.ndarray, params: Any) -> np.ndarray:
        return iq4xs.pack(codes, params)

    def dequantize(self, codes: np.ndarray, params: Any) -> np.ndarray:
        return iq4xs.dequantize_codes(codes, params)


class _LatticeSweep(GridSweep):
    """The lattice i-quants (GPTVQ-style): the super-block's scales chosen by llama.cpp's own search from
    the columns as GPTQ has updated them, then one group of 8 columns (one sign byte: a codeword of 8, or
    two of 4) at a time, the codeword(s) and signs nearest to the group under the fixed sub-block scale
    in the sense the kernel's weights give (:func:`.lattice_round.round_group`)."""

    group = 8

    def __init__(self, qt: T, im: np.ndarray | None) -> None:
        _need_imatrix(qt, im)
        self.qt, self.im, self.sub = qt, im, lattice.SPECS[qt].sub

    def block(self, cols: np.ndarray, c0: int) -> tuple[Any, Any]:
        blocks = np.ascontiguousarray(cols.T)  # (out, 256)
        _, p = lattice.encode(self.qt, blocks, importance_block(self.im, c0, blocks.shape))
        scales = np.ascontiguousarray(lattice_round.sub_block_scales(self.qt, p).T)  # (n_sub, out)

        def rnd(j: int, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            codes, values = lattice_round.round_group(self.qt, x.T, scales[j // self.sub], w)
            return codes.T, values.T

        return rnd, p

    def stack(self, ps: list) -> lattice.LatticeParams:
        d = np.stack([p.d for p in ps], axis=1).reshape(-1)
        ls = np.stack([p.ls for p in ps], axis=1).reshape(d.shape[0], -1)
        return lattice.LatticeParams(d, ls, np.zeros((d.shape[0], 0), np.uint8))  # the signs are in the codes

    def pack(self, codes: np.ndarray, params: Any) -> np.ndarray:
        return lattice.pack(self.qt, *lattice_round.codes_to_blocks(self.qt, codes, params.d, params.ls))

    def dequantize(self, codes: np.ndarray, params: Any) -> np.ndarray:
        return lattice.dequantize_codes(self.qt, *lattice_round.codes_to_blocks(self.qt, codes, params.d, params.ls))


class _IQ1Sweep(GridSweep):
    """IQ1_S / IQ1_M as the lattices: llama.cpp's scales (and IQ1_S's per-32 shifts) from the updated
    columns, then a codeword per group of 8 (IQ1_M: with its shift) under them (:func:`.iq1.round_group`)."""

    group = 8

    def __init__(self, qt: T, im: np.ndarray | None) -> None:
        _need_imatrix(qt, im)
        self.qt, self.im, self.sub = qt, im, iq1.SUB[qt]

    def block(self, cols: np.ndarray, c0: int) -> tuple[Any, Any]:
        blocks = np.ascontiguousarray(cols.T)  # (out, 256)
        raw = iq1.encode(self.qt, blocks, importance_block(self.im, c0, blocks.shape))
        scales, minus = iq1.sub_block_scales(self.qt, raw)
        scales = np.ascontiguousarray(scales.T)
        minus = None if minus is None else np.ascontiguousarray(minus.T)

        def rnd(j: int, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            k = j // self.sub
            codes, values = iq1.round_group(self.qt, x.T, scales[k], w, None if minus is None else minus[k])
            return codes.T, values.T

        return rnd, raw

    def stack(self, ps: list) -> np.ndarray:
        """The blocks' bytes as llama.cpp's search wrote them (their scales are kept; the codes replaced)."""
        return np.stack(ps, axis=1).reshape(-1, ps[0].shape[-1])

    def pack(self, codes: np.ndarray, params: Any) -> np.ndarray:
        return iq1.patch_codes(self.qt, params, codes)

    def dequantize(self, codes: np.ndarray, params: Any) -> np.ndarray:
        return ggml.dequantize(self.pack(codes, params), self.qt).reshape(codes.shape)


def _need_imatrix(qt: T, im: np.ndarray | None) -> None:
    if im is None and qt in ggml.REQUIRES_IMATRIX:
        raise InputError(f"GPTQ onto {qt.name} needs an importance matrix for its scales (llama.cpp's "
                         "search requires one): keep imatrix on")


for _t in ggml.SUPPORTED_TYPES:
    register_grid(TernaryGrid(_t) if _t in ternary.TYPES else GGMLGrid(_t))
