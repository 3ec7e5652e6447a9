"""SqueezeLLM-style palettes: sensitivity-weighted k-means onto a look-up-table grid.

The calibrated pipeline runs the model layer by layer on calibration text; each linear's palette tables
are then fitted by weighted k-means (:mod:`.palette`) with every weight's squared error weighted by the
second moment of its input column (the diagonal of the Hessian proxy, the first position of each sequence
weighted ``sink_weight`` times, as for every calibrated method here) -- SqueezeLLM's diagonal-Fisher
weighting with the activation statistics standing in for gradients. Later layers see the palettized
earlier ones. It applies to palette grids only (``--palettize``); formats check that.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgekit.converters.quantize.base import register_quantizer
from edgekit.converters.quantize.calibrated import CalibratedConfig, CalibratedQuantizer
from edgekit.converters.quantize.steps import StepConfig
from edgekit.converters.quantize.steps.rtn_round import RTNRoundConfig


@dataclass(frozen=True)
class SqueezeLLMConfig(CalibratedConfig):
    """Sensitivity-weighted palettes; the shared fields are :class:`CalibratedConfig`'s."""

    method: str = "squeezellm"

    def method_steps(self) -> tuple[StepConfig, ...]:
        # nearest-entry rounding whose table search (the grid's) is weighted by the importance matrix
        return (RTNRoundConfig(imatrix=True),)


@register_quantizer("squeezellm")
class SqueezeLLMQuantizer(CalibratedQuantizer):
    config_class = SqueezeLLMConfig
    palette_only = True  # only Core ML stores palettes (api.convert refuses the other formats)
