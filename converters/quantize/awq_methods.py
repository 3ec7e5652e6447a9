"""The registered AWQ methods. AWQ runs inside the calibrated pipeline (calibrated.py calls
:func:`edgekit.converters.quantize.awq.awq_layer` before each layer's linears are put on their grids);
these configs switch it on, with or without GPTQ after it."""

from __future__ import annotations

from dataclasses import dataclass

from edgekit.converters.quantize.base import register_quantizer
from edgekit.converters.quantize.calibrated import CalibratedConfig, CalibratedQuantizer


@dataclass(frozen=True)
class AWQMethodConfig(CalibratedConfig):
    """AWQ scales and clipping, then importance-weighted round-to-nearest onto the grid."""

    method: str = "awq"
    awq: bool = True
    gptq: bool = False


@dataclass(frozen=True)
class AWQGPTQConfig(CalibratedConfig):
    """AWQ scales and clipping, then GPTQ onto the grid with the rescaled Hessians."""

    method: str = "awq+gptq"
    awq: bool = True
    gptq: bool = True


@register_quantizer("awq")
class AWQQuantizer(CalibratedQuantizer):
    config_class = AWQMethodConfig


@register_quantizer("awq+gptq")
class AWQGPTQQuantizer(CalibratedQuantizer):
    config_class = AWQGPTQConfig
