"""Rounding step: GPTQ onto each tensor's grid (column by column, or a group of 8 columns at a time for
the lattice i-quants; later columns absorb earlier columns' errors through the Hessian;
:mod:`edgekit.converters.quantize.gptq_kernel`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from edgekit.converters.quantize import gptq_kernel
from edgekit.converters.quantize.steps.base import (
    ROUND,
    StepConfig,
    register_step,
)
from edgekit.converters.quantize.steps.rtn_round import RoundStep
from edgekit.errors import InputError


@dataclass(frozen=True)
class GPTQRoundConfig(StepConfig):
    """damp: dampening added to the Hessian diagonal, as a fraction of its mean.
    imatrix: weight each block's scale/min choice by activation second moments.
    tied_head: GPTQ also for a head tied to the token embedding (fits the head's outputs at some cost to
        the table's lookups; default: importance-weighted RTN of the shared tensor).
    act_order: sweep each matrix's blocks (ggml's, MatMulNBits', Core ML's blockwise, MLC's groups) in
        decreasing order of their inputs' second moments (GPTQ's activation order, by whole blocks:
        :func:`.gptq_kernel.gptq`); Core ML's palettes are swept in the file's order."""

    step: ClassVar[str] = "gptq"
    stage: ClassVar[int] = ROUND
    damp: float = 0.01
    imatrix: bool = True
    tied_head: bool = False
    act_order: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.damp < 1:
            raise InputError("GPTQ dampening must be in [0, 1)")


@register_step("gptq")
class GPTQRound(RoundStep):
    config_class = GPTQRoundConfig
    masked = True

    def _round(self, W, H, qtype, imatrix, mask=None):  # noqa: ANN001, ANN202 - a RoundFn
        assert isinstance(self.config, GPTQRoundConfig)
        return gptq_kernel.gptq(W, H, qtype, damp=self.config.damp, imatrix=imatrix, mask=mask,
                                act_order=self.config.act_order and gptq_kernel.permutes_blocks(qtype))
