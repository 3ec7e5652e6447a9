"""Core ML's weight grids (iOS18 / macOS15 constexpr ops), one registered object each.

* ``COREML_UINT4_B32`` ... : ``constexpr_blockwise_shift_scale``, ``scale * (data - offset)`` per block of
  ``block`` weights along the input dimension, fp16 scales, uint4/uint8 data and offsets (``COREML_INT*``:
  signed data, no offset). The arithmetic is exactly MatMulNBits' (fp16 scale, integer zero point), so the
  parameter search, rounding and GPTQ sweep are :mod:`..nbits`' own; only the name (and so the writer that
  stores it) differs.
* ``COREML_LUT4_G16`` ... : ``constexpr_lut_to_dense`` palettes of ``2**bits`` fp16 entries shared by
  groups of ``group`` output rows, fitted by (sensitivity-weighted) k-means (:mod:`..palette`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from edgekit.converters.quantize import palette
from edgekit.converters.quantize.grids.base import F32, Grid, GridSweep, register_grid
from edgekit.converters.quantize.nbits import NBitsType
from edgekit.errors import InputError, UnsupportedError

BLOCKWISE_BITS = (4, 8)
LUT_BITS = (2, 3, 4, 6, 8)
LUT_GROUPS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True, repr=False)
class CoreMLBlockwise(NBitsType):
    """``constexpr_blockwise_shift_scale`` weights: ``bits`` 4 or 8, ``block`` weights per scale,
    ``symmetric`` (signed data, no offset) or not (unsigned data and an offset per block)."""

    @property
    def name(self) -> str:
        return f"COREML_{'INT' if self.symmetric else 'UINT'}{self.bits}_B{self.block}"

    @classmethod
    def parse(cls, name: str) -> CoreMLBlockwise:
        m = re.fullmatch(r"COREML_(U?INT)(4|8)_B(\d+)", name.upper())
        if not m:
            raise InputError(f"{name!r} is not a Core ML blockwise grid name (e.g. COREML_UINT4_B32)")
        return cls(int(m.group(2)), int(m.group(3)), m.group(1) == "INT")


@dataclass(frozen=True, repr=False)
class CoreMLPalette(Grid):
    """``constexpr_lut_to_dense`` weights: ``bits`` per index (2, 3, 4, 6, 8), one fp16 table per ``group``
    output rows. Rows go through :func:`quantize_roundtrip` a whole matrix at a time (a table spans rows)."""

    bits: int
    group: int
    is_float = False
    block = 1  # a palette has no blocks along a row: any row length works

    def __post_init__(self) -> None:
        if self.bits not in LUT_BITS:
            raise UnsupportedError(f"Core ML palettes have {', '.join(map(str, LUT_BITS))} bits; got {self.bits}")
        if self.group not in LUT_GROUPS:
            raise UnsupportedError(f"palette group {self.group} is not supported; use one of "
                                   f"{', '.join(map(str, LUT_GROUPS))}")

    @property
    def name(self) -> str:
        return f"COREML_LUT{self.bits}_G{self.group}"

    @property
    def levels(self) -> int:
        return 1 << self.bits

    @property
    def bits_per_weight(self) -> float:
        return float(self.bits)  # plus 16 * levels / (group * row length) for the tables

    def row_bytes(self, n: int) -> int:
        return n + 2 * self.levels

    def quantize_roundtrip(self, x: np.ndarray, imatrix: np.ndarray | None = None, *,
                           want_values: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        a = np.asarray(x, dtype=np.float32)
        w = a.reshape(-1, a.shape[-1])
        if not np.all(np.isfinite(w)):
            raise InputError(f"cannot palettize to {self.name}: the weights contain NaN or infinite values")
        luts, idx = palette.fit(w, self.bits, self.group, imatrix)
        raw = palette.pack_rows(luts, idx, self.group).reshape(*a.shape[:-1], -1)
        values = palette.decode(luts, idx, self.group).reshape(a.shape) if want_values else None
        return raw, values

    def dequantize(self, raw: np.ndarray) -> np.ndarray:
        r = np.asarray(raw, dtype=np.uint8)
        luts, idx = palette.unpack_rows(r.reshape(-1, r.shape[-1]), self.bits, self.group)
        return palette.decode(luts, idx, self.group).reshape(*r.shape[:-1], -1)

    def unpack(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tables ``(out/group, 2**bits)`` and indices ``(out, in)`` of a matrix's records."""
        return palette.unpack_rows(raw, self.bits, self.group)

    def sweep(self, w: np.ndarray, imatrix: np.ndarray | None) -> GridSweep:
        return _PaletteSweep(self, w, imatrix)


class _PaletteSweep(GridSweep):
    """GPTQ onto palettes: the tables are fitted once, to the original matrix (weighted by ``imatrix``),
    and GPTQ then picks each column's entries, later columns absorbing earlier columns' errors. The tables
    cannot follow the sweep as a block's scale does: one table spans every column of its rows."""

    def __init__(self, grid: CoreMLPalette, w: np.ndarray, im: np.ndarray | None) -> None:
        self.grid, self.rows = grid, w.shape[0]
        self.luts, _ = palette.fit(w, grid.bits, grid.group, im)
        self.table = np.repeat(self.luts.astype(F32), grid.group, axis=0)[: self.rows]

    def block(self, cols: np.ndarray, c0: int) -> tuple:
        rows = np.arange(self.rows)

        def rnd(j: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            idx = palette.nearest_rows(self.table, x)
            return idx, self.table[rows, idx]

        return rnd, None

    def stack(self, params: list) -> np.ndarray:
        return self.luts

    def pack(self, codes: np.ndarray, params: np.ndarray) -> np.ndarray:
        return palette.pack_rows(params, codes.reshape(self.rows, -1), self.grid.group)

    def dequantize(self, codes: np.ndarray, params: np.ndarray) -> np.ndarray:
        return palette.decode(params, codes.reshape(self.rows, -1), self.grid.group)


for _bits in BLOCKWISE_BITS:
    for _block in (16, 32, 64, 128, 256):
        for _sym in (True, False):
            register_grid(CoreMLBlockwise(_bits, _block, _sym))
for _bits in LUT_BITS:
    for _group in LUT_GROUPS:
        register_grid(CoreMLPalette(_bits, _group))
