"""Grids: how numbers are stored, one registered object each.

A grid is a storage format for a row of weights: a ggml block type (Q4_0 .. Q6_K, IQ4_NL, the float
types), an onnxruntime ``MatMulNBits`` block (``UINT4_B32``, ``INT8_B128``, ...), and next Core ML LUTs,
MLC's q4f16_1, AQLM codebooks, ternary blocks. Each knows its block shape, chooses its parameters
(importance-weighted when given an importance per column), rounds to its grid, packs and dequantizes.
Quantizers (RTN, GPTQ, AWQ) see grids, never a format, and work in the checkpoint's own layout; a
format's writer does its own permutations. Adding a grid is one file that registers its objects.
"""

from edgekit.converters.quantize.grids.base import GRIDS, Grid, GridSweep, as_grid, register_grid

__all__ = ["GRIDS", "Grid", "GridSweep", "as_grid", "register_grid"]
