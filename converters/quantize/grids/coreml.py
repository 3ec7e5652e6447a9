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
MAX_OUTLIERS = 0.1  # dense-and-sparse: at most a tenth of the weights kept in fp16


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
    output rows. Rows go through :func:`quantize_roundtrip` a whole matrix at a time (a table spans rows).

    ``outliers`` (a fraction, 0 to 0.1): SqueezeLLM's dense-and-sparse split. That share of the weights
    (:func:`..palette.outlier_mask`) is left out of the tables' fit and kept in fp16 as corrections that a
    ``constexpr_sparse_to_dense`` adds to the palette's values: the file pays a one-bit mask per weight plus
    two bytes per outlier."""

    bits: int
    group: int
    outliers: float = 0.0
    is_float = False
    block = 1  # a palette has no blocks along a row: any row length works

    def __post_init__(self) -> None:
        if self.bits not in LUT_BITS:
            raise UnsupportedError(f"Core ML palettes have {', '.join(map(str, LUT_BITS))} bits; got {self.bits}")
        if self.group not in LUT_GROUPS:
            raise UnsupportedError(f"palette group {self.group} is not supported; use one of "
                                   f"{', '.join(map(str, LUT_GROUPS))}")
        if not 0 <= self.outliers <= MAX_OUTLIERS:
            raise UnsupportedError(f"outliers are a share of the weights between 0 and {MAX_OUTLIERS * 100:g}%; "
                                   f"got {self.outliers * 100:g}%")

    @property
    def name(self) -> str:
        sparse = f"_S{self.outliers * 100:g}" if self.outliers else ""
        return f"COREML_LUT{self.bits}_G{self.group}{sparse}"

    @property
    def levels(self) -> int:
        return 1 << self.bits

    @property
    def bits_per_weight(self) -> float:
        # plus 16 * levels / (group * row length) for the tables; a mask bit per weight and fp16 per outlier
        return float(self.bits) + ((1.0 + 16.0 * self.outliers) if self.outliers else 0.0)

    def row_bytes(self, n: int) -> int:
        return n + 2 * self.levels + (2 * n if self.outliers else 0)

    def quantize_roundtrip(self, x: np.ndarray, imatrix: np.ndarray | None = None, *,
                           want_values: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        a = np.asarray(x, dtype=np.float32)
        w = a.reshape(-1, a.shape[-1])
        if not np.all(np.isfinite(w)):
            raise InputError(f"cannot palettize to {self.name}: the weights contain NaN or infinite values")
        mask = palette.outlier_mask(w, self.group, self.outliers, imatrix) if self.outliers else None
        luts, idx = palette.fit(w, self.bits, self.group, imatrix, exclude=mask)
        delta = None
        values = palette.decode(luts, idx, self.group) if want_values else None
        if mask is not None:
            delta, values = palette.sparse_deltas(w, luts, idx, self.group, mask)
        raw = palette.pack_rows(luts, idx, self.group, delta).reshape(*a.shape[:-1], -1)
        return raw, None if values is None else values.reshape(a.shape)

    def dequantize(self, raw: np.ndarray) -> np.ndarray:
        r = np.asarray(raw, dtype=np.uint8)
        luts, idx, delta = self.unpack(r.reshape(-1, r.shape[-1]))
        values = palette.decode(luts, idx, self.group)
        if delta is not None:
            values = palette.add_fp16(values.astype(np.float16), delta)
        return values.reshape(*r.shape[:-1], -1)

    def unpack(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Tables ``(out/group, 2**bits)``, indices ``(out, in)`` and fp16 outlier corrections ``(out, in)``
        (None without outliers) of a matrix's records."""
        return palette.unpack_rows(raw, self.bits, self.group, sparse=bool(self.outliers))

    def sweep(self, w: np.ndarray, imatrix: np.ndarray | None) -> GridSweep:
        return _PaletteSweep(self, w, imatrix)


class _PaletteSweep(GridSweep):
    """GPTQ onto palettes: the tables are fitted once, to the original matrix (weighted by ``imatrix``),
    and GPTQ then picks each column's entries, later columns absorbing earlier columns' errors. The tables
    cannot follow the sweep as a block's scale does: one table spans every column of its rows. Outliers
    (chosen once, from the original matrix) take the nearest entry plus an fp16 correction to their current
    value: they pass no error on."""

    def __init__(self, grid: CoreMLPalette, w: np.ndarray, im: np.ndarray | None) -> None:
        self.grid, self.rows = grid, w.shape[0]
        self.mask = palette.outlier_mask(w, grid.group, grid.outliers, im) if grid.outliers else None
        self.luts, _ = palette.fit(w, grid.bits, grid.group, im, exclude=self.mask)
        self.table = np.repeat(self.luts.astype(F32), grid.group, axis=0)[: self.rows]
        self.delta = None if self.mask is None else np.zeros(w.shape, np.float16)

    def block(self, cols: np.ndarray, c0: int) -> tuple:
        rows = np.arange(self.rows)

        def rnd(j: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            idx = palette.nearest_rows(self.table, x)
            value = self.table[rows, idx]
            if self.mask is not None:
                m = self.mask[:, c0 + j]
                if m.any():
                    dense = value[m].astype(np.float16)
                    d = (x[m].astype(np.float16).astype(F32) - dense.astype(F32)).astype(np.float16)
                    self.delta[m, c0 + j] = d
                    value = value.copy()
                    value[m] = palette.add_fp16(dense, d)
            return idx, value

        return rnd, None

    def stack(self, params: list) -> np.ndarray:
        return self.luts

    def pack(self, codes: np.ndarray, params: np.ndarray) -> np.ndarray:
        return palette.pack_rows(params, codes.reshape(self.rows, -1), self.grid.group, self.delta)

    def dequantize(self, codes: np.ndarray, params: np.ndarray) -> np.ndarray:
        values = palette.decode(params, codes.reshape(self.rows, -1), self.grid.group)
        if self.delta is not None:
            values = palette.add_fp16(values.astype(np.float16), self.delta)
        return values


for _bits in BLOCKWISE_BITS:
    for _block in (16, 32, 64, 128, 256):
        for _sym in (True, False):
            register_grid(CoreMLBlockwise(_bits, _block, _sym))
for _bits in LUT_BITS:
    for _group in LUT_GROUPS:
        register_grid(CoreMLPalette(_bits, _group))
