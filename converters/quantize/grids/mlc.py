"""MLC-LLM's group-quantization grids (the kernels are :mod:`edgekit.converters.quantize.mlcgroup`):
int4 in groups of 32 with fp16 or fp32 scales (``q4f16_*``, ``q4f32_1``), int3 in groups of 40 (``q3f16_*``)."""

from __future__ import annotations

from edgekit.converters.quantize.grids.base import register_grid
from edgekit.converters.quantize.mlcgroup import MLCGroup

for _grid in (MLCGroup(4, 32, "float16"), MLCGroup(4, 32, "float32"), MLCGroup(3, 40, "float16")):
    register_grid(_grid)
