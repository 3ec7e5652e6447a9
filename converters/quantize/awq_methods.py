"""The registered AWQ methods: the ``awq`` scaling step (:mod:`.steps.awq_scale`) followed by a
rounding step, importance-weighted round-to-nearest or GPTQ on the rescaled Hessians."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgekit.converters.quantize.awq import AWQConfig
from edgekit.converters.quantize.base import register_quantizer
from edgekit.converters.quantize.calibrated import CalibratedConfig, CalibratedQuantizer
from edgekit.converters.quantize.steps import StepConfig
from edgekit.converters.quantize.steps.gptq_round import GPTQRoundConfig
from edgekit.converters.quantize.steps.rtn_round import RTNRoundConfig


@dataclass(frozen=True)
class AWQMethodConfig(CalibratedConfig):
    """AWQ scales and clipping (``awq_config``), then importance-weighted round-to-nearest."""

    method: str = "awq"
    awq_config: AWQConfig = field(default_factory=AWQConfig)
    imatrix: bool = True

    def method_steps(self) -> tuple[StepConfig, ...]:
        return (self.awq_config, RTNRoundConfig(imatrix=self.imatrix))


@dataclass(frozen=True)
class AWQGPTQConfig(CalibratedConfig):
    """AWQ scales and clipping (``awq_config``), then GPTQ with the rescaled Hessians (``damp``,
    ``imatrix``, ``tied_head`` as in :class:`edgekit.converters.quantize.gptq.GPTQConfig`)."""

    method: str = "awq+gptq"
    awq_config: AWQConfig = field(default_factory=AWQConfig)
    damp: float = 0.01
    imatrix: bool = True
    tied_head: bool = False

    def method_steps(self) -> tuple[StepConfig, ...]:
        return (self.awq_config, GPTQRoundConfig(damp=self.damp, imatrix=self.imatrix, tied_head=self.tied_head))


@register_quantizer("awq")
class AWQQuantizer(CalibratedQuantizer):
    config_class = AWQMethodConfig


@register_quantizer("awq+gptq")
class AWQGPTQQuantizer(CalibratedQuantizer):
    config_class = AWQGPTQConfig
