"""Round-to-nearest: each block's scale (and min) chosen by llama.cpp's own search for the type."""

from __future__ import annotations

import gguf
import numpy as np

from edgekit.converters.quantize.base import Quantizer, register_quantizer
from edgekit.converters.quantize.grids import as_grid


@register_quantizer("rtn")
class RTNQuantizer(Quantizer):
    """The reference method: exactly what llama-quantize stores without an importance matrix."""

    def quantize(self, name: str, weight: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
        return as_grid(qtype).quantize(np.ascontiguousarray(weight, dtype=np.float32))
