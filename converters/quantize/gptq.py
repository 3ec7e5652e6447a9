"""GPTQ and importance-matrix round-to-nearest: calibrated methods of one rounding step each
(:mod:`.steps.gptq_round`, :mod:`.steps.rtn_round`) run by :mod:`.pipeline`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgekit.converters.quantize import gptq_kernel
from edgekit.converters.quantize.base import register_quantizer
from edgekit.converters.quantize.calibrated import CalibratedConfig, CalibratedQuantizer
from edgekit.converters.quantize.grids import as_grid
from edgekit.converters.quantize.steps import StepConfig
from edgekit.converters.quantize.steps.gptq_round import GPTQRoundConfig

if TYPE_CHECKING:
    from edgekit.model import HFCheckpoint


@dataclass(frozen=True)
class GPTQConfig(CalibratedConfig):
    """GPTQ with an importance matrix. damp: Hessian dampening (fraction of its mean diagonal);
    imatrix: weight block scales by activation second moments; tied_head: GPTQ a head tied to the
    embedding too; act_order: sweep each matrix's blocks by decreasing input second moments (see
    :class:`GPTQRoundConfig`; on by default: on SmolLM2 it cut GPTQ's perplexity cost over F16 from +11.5% to
    +7.2% at Q4_0 and from +2.5% to +1.1% at Q5_0, and moved IQ4_NL from +4.4% to +5.0%,
    ``bench/results/gptq_act_order.txt``; ONNX's, MLC's and Core ML's blockwise grids are swept by whole
    blocks the same way, Core ML's palettes in the file's order). Shared fields: :class:`CalibratedConfig`."""

    method: str = "gptq"
    damp: float = 0.01
    imatrix: bool = True
    tied_head: bool = False
    act_order: bool = True

    def method_steps(self) -> tuple[StepConfig, ...]:
        return (GPTQRoundConfig(damp=self.damp, imatrix=self.imatrix, tied_head=self.tied_head,
                                act_order=self.act_order),)


@register_quantizer("gptq")
class GPTQQuantizer(CalibratedQuantizer):
    config_class = GPTQConfig

    def prepare(self, checkpoint: HFCheckpoint, plan: dict[str, Any],
                progress: Callable[[str, int, int], None] | None = None) -> None:
        cfg = self.config
        assert isinstance(cfg, GPTQConfig)
        if cfg.act_order and not any(gptq_kernel.permutes_blocks(q) for q in plan.values()
                                     if not as_grid(q).is_float):
            # no grid here has blocks along a row to reorder (Core ML's palettes: one table spans every column),
            # so the sweep runs in the file's order: the manifest records what was done, not what was asked
            self.config = dataclasses.replace(cfg, act_order=False)
        super().prepare(checkpoint, plan, progress)


@dataclass(frozen=True)
class ImatrixConfig(CalibratedConfig):
    """Round-to-nearest whose scale/min searches are weighted by activation second moments
    (llama.cpp's importance matrix, computed here from the calibration data): the pipeline's default
    rounding alone, so ``ImatrixConfig(extra_steps=(...))`` spells any recipe out step by step."""

    method: str = "imatrix"


@register_quantizer("imatrix")
class ImatrixQuantizer(CalibratedQuantizer):
    config_class = ImatrixConfig
