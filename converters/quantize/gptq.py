"""GPTQ onto the exact grid of each tensor's GGUF type, with importance-weighted block scales.

The calibration pipeline is :mod:`edgekit.converters.quantize.calibrated`; the per-matrix algorithm
is :mod:`edgekit.converters.quantize.gptq_kernel`.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgekit.converters.quantize.base import register_quantizer
from edgekit.converters.quantize.calibrated import CalibratedConfig, CalibratedQuantizer


@dataclass(frozen=True)
class GPTQConfig(CalibratedConfig):
    """GPTQ with an importance matrix; see :class:`CalibratedConfig` for every field."""

    method: str = "gptq"
    gptq: bool = True
    awq: bool = False


@register_quantizer("gptq")
class GPTQQuantizer(CalibratedQuantizer):
    config_class = GPTQConfig


@dataclass(frozen=True)
class ImatrixConfig(CalibratedConfig):
    """Round-to-nearest whose scale/min searches are weighted by activation second moments
    (llama.cpp's importance matrix, computed here from the calibration data)."""

    method: str = "imatrix"
    gptq: bool = False
    awq: bool = False


@register_quantizer("imatrix")
class ImatrixQuantizer(CalibratedQuantizer):
    config_class = ImatrixConfig
