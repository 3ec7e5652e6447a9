"""onnxruntime's ``MatMulNBits`` blocks as grids (the kernels are :mod:`edgekit.converters.quantize.nbits`):
4 and 8 bits, blocks of 16..256 weights, symmetric or with a zero point per block."""

from __future__ import annotations

from edgekit.converters.quantize.grids.base import register_grid
from edgekit.converters.quantize.nbits import NBitsType

for _bits in (4, 8):
    for _block in (16, 32, 64, 128, 256):
        for _sym in (True, False):
            register_grid(NBitsType(_bits, _block, _sym))
