"""Per-row integer grids: one scale (and zero point) per output row, whatever the row's width.

What ONNX's per-axis ``DequantizeLinear`` and Core ML's ``constexpr_blockwise_shift_scale`` with the block
spanning the whole row store: the classic per-output-channel int8 of convolution weights (a conv weight
``[out, cin, kh, kw]`` seen as ``[out, cin*kh*kw]``, rows of 9, 27, 288 ... weights). The arithmetic is
MatMulNBits' (:mod:`..nbits`: fp16 scale, integer zero point), so the parameter search, rounding and GPTQ
sweep are its own; only the block is the row. A grid is made for a width (:func:`rowwise`) rather than
registered: there is one per row width, and no format stores it under a name.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from edgekit.converters.quantize.nbits import NBitsType
from edgekit.errors import UnsupportedError


@dataclass(frozen=True, repr=False)
class RowwiseInt(NBitsType):
    """``bits`` 4 or 8, ``block`` the row width, ``symmetric`` (signed codes) or with a zero point per row."""

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise UnsupportedError(f"per-row integer weights are 4 or 8 bits here; got {self.bits}")
        if self.block < 1:
            raise UnsupportedError(f"a row has at least one weight; got {self.block}")

    @property
    def name(self) -> str:
        return f"{'INT' if self.symmetric else 'UINT'}{self.bits}_ROW{self.block}"


@lru_cache(maxsize=256)
def rowwise(bits: int, width: int, symmetric: bool = True) -> RowwiseInt:
    """The per-row grid for rows of ``width`` weights."""
    return RowwiseInt(bits, width, symmetric)
