"""The grid interface, its registry and the one place a grid is resolved from a name or a type."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import numpy as np

from edgekit.errors import UnsupportedError
from edgekit.registry import Registry

F32 = np.float32

GRIDS: Registry[Grid] = Registry(
    "storage grid", ["edgekit.converters.quantize.grids.ggml", "edgekit.converters.quantize.grids.nbits",
                    "edgekit.converters.quantize.grids.coreml", "edgekit.converters.quantize.grids.mlc"])


def register_grid(grid: Grid) -> Grid:
    """Register ``grid`` under its name (a duplicate name raises)."""
    return GRIDS.register(grid.name)(grid)


class GridSweep(abc.ABC):
    """GPTQ's view of a grid over one matrix ``(out, in)``: parameters are chosen a block of columns at a
    time (from the columns as GPTQ has updated them), then each column is rounded under them. Lattice grids
    (the i-quants) round a group of columns jointly instead (one codeword per 8 or 4 columns): their sweeps
    say so and GPTQ carries each group's error forward in the block form (``gptq_kernel._sweep_groups``)."""

    @abc.abstractmethod
    def block(self, cols: np.ndarray, c0: int) -> tuple[Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]], Any]:
        """Parameters of the block whose columns (``(block, out)``, transposed) start at ``c0``, and a
        rounder ``(j, column) -> (codes, values)`` for its ``j``-th column."""

    @abc.abstractmethod
    def stack(self, params: list[Any]) -> Any:
        """The per-block parameter objects of the sweep as one, for ``weight.reshape(-1, block)`` order."""

    @abc.abstractmethod
    def pack(self, codes: np.ndarray, params: Any) -> np.ndarray:
        """Bytes of ``codes`` ``(n_blocks, block)`` under ``params``."""

    @abc.abstractmethod
    def dequantize(self, codes: np.ndarray, params: Any) -> np.ndarray:
        """The float32 values ``codes`` decode to."""

    def codes(self, codes: np.ndarray) -> np.ndarray:
        return codes.astype(np.uint8)


class Grid(abc.ABC):
    """One storage grid. ``name``: its registered name. ``block``: weights per block along a row.
    ``is_float``: a plain float type (nothing to choose or optimise)."""

    name: str
    block: int
    is_float: bool = False
    # a row whose length is not a multiple of ``block`` is stored with its last block zero-padded (MLC's
    # groups); other grids need whole blocks
    pads_last_block: bool = False

    @property
    @abc.abstractmethod
    def bits_per_weight(self) -> float: ...

    @abc.abstractmethod
    def row_bytes(self, n: int) -> int:
        """Bytes of one row of ``n`` weights."""

    @abc.abstractmethod
    def quantize_roundtrip(self, x: np.ndarray, imatrix: np.ndarray | None = None, *,
                           want_values: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Bytes ``(..., row_bytes)`` of float32 ``x`` ``(..., n)`` (parameters chosen by the grid's own
        search, weighted by ``imatrix`` ``(n,)`` when given), and the values they decode to."""

    @abc.abstractmethod
    def dequantize(self, raw: np.ndarray) -> np.ndarray:
        """Float32 values of bytes ``(..., row_bytes)``."""

    def quantize(self, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        return self.quantize_roundtrip(x, imatrix, want_values=False)[0]

    def sweep(self, w: np.ndarray, imatrix: np.ndarray | None) -> GridSweep:
        """GPTQ's adapter for matrix ``w`` (``imatrix`` weights the parameter searches)."""
        raise UnsupportedError(f"GPTQ cannot round onto the {self.name} grid")

    def __repr__(self) -> str:
        return f"<grid {self.name}>"


def as_grid(spec: Grid | str | Any) -> Grid:
    """The grid for ``spec``: a grid itself, a registered name (``"Q4_K"``, ``"UINT4_B32"``), or a
    ``gguf.GGMLQuantizationType`` (its name)."""
    if isinstance(spec, Grid):
        return spec
    name = spec if isinstance(spec, str) else getattr(spec, "name", None)
    if name is None:
        raise UnsupportedError(f"{spec!r} is not a storage grid; use one of: {', '.join(GRIDS.names())}")
    return GRIDS.get(name)


def scale_rounder(d0: np.ndarray, a: np.ndarray | None, lo: int, hi: int, off: int
                  ) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Per-column rounding under per-row scales ``d0`` ``(out,)`` (float32, possibly 0) and offsets
    ``a`` (decoded value ``d0*q - a``): codes ``clip(rint((x + a) / d)) + off`` and their values."""
    d = np.where(d0 != 0, d0, F32(np.inf)).astype(F32)
    flo, fhi = F32(lo), F32(hi)

    def rnd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        v = x / d if a is None else (x + a) / d
        q = np.clip(np.rint(v), flo, fhi)
        value = d0 * q if a is None else d0 * q - a
        return q + off, value

    return rnd


def importance_block(im: np.ndarray | None, c0: int, shape: tuple[int, int]) -> np.ndarray | None:
    """The importance of the columns of one block, broadcast over its rows."""
    return None if im is None else np.broadcast_to(im[c0: c0 + shape[1]], shape)
