"""Rounding step: importance-weighted round-to-nearest onto each tensor's grid.

With ``imatrix`` on, every block's scale (and min) search is weighted by the diagonal of the layer's
Hessian proxy, i.e. the second moments of the activations the weights meet (llama.cpp's importance
matrix, computed here from the calibration data as the quantized model runs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import gguf
import numpy as np

from edgekit.converters.quantize import gptq_kernel
from edgekit.converters.quantize.steps.base import (
    ROUND,
    HeadState,
    LayerState,
    Step,
    StepConfig,
    register_step,
)

FLOAT = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
#: (weights, hessian, qtype, imatrix[, mask]) -> the rounded result; what a rounding step does to one matrix.
RoundFn = Callable[..., Any]


@dataclass(frozen=True)
class RTNRoundConfig(StepConfig):
    """imatrix: weight the scale/min searches by activation second moments."""

    step: ClassVar[str] = "rtn"
    stage: ClassVar[int] = ROUND
    imatrix: bool = True


def round_layer(st: LayerState, imatrix_on: bool, round_fn: RoundFn, masked: bool = False) -> dict[str, float]:
    """Put every linear of the layer onto its grid with ``round_fn`` (float types are only cast); the
    model keeps exactly the weights the file gets. ``masked``: ``round_fn`` takes a pruning mask (a
    pruned weight's target stays 0). Returns each linear's Hessian-weighted error."""
    report = {}
    for name, lin in st.linears.items():
        st.tick(f"rounding {name}")
        qtype = st.qtype(name)
        W = lin.weight.detach().float().numpy()
        H = st.H[name].numpy()
        imatrix = np.diag(H).astype(np.float32) if imatrix_on else None
        mask = st.masks.get(name) if masked else None
        if qtype in FLOAT:
            res = gptq_kernel.rtn(W, qtype)
        elif mask is not None:
            res = round_fn(W, H, qtype, imatrix, mask)
        else:
            res = round_fn(W, H, qtype, imatrix)
        report[name] = round(gptq_kernel.hessian_error(W, res.weight, H), 4)
        if (pruned := st.masks.get(name)) is not None and pruned.any():
            st.zeros_kept[name] = round(float((res.weight[pruned] == 0).mean()), 4)
        lin.weight.data = st.torch.from_numpy(np.ascontiguousarray(res.weight))
        st.out[st.names[name]] = res.data
    return report


def round_head(st: HeadState, imatrix_on: bool, round_output: RoundFn | None, tied_too: bool = False) -> None:
    """The output head by ``round_output`` when it is its own tensor; a tied embedding (also a lookup
    table, which an output-only objective would neglect) by importance-weighted RTN, or by
    ``round_output`` too with ``tied_too``; an untied embedding (a lookup table alone) by plain RTN."""
    imatrix = np.diag(st.H).astype(np.float32) if imatrix_on else None
    heads = [("output.weight", st.model.lm_head), ("token_embd.weight", st.model.model.embed_tokens)]
    for name, module in heads:
        if name not in st.plan:
            continue
        W = module.weight.detach().float().numpy()
        qtype = st.plan[name]
        if qtype in FLOAT:
            res = gptq_kernel.rtn(W, qtype)
        elif round_output is not None and (name == "output.weight" or (tied_too and "output.weight" not in st.plan)):
            res = round_output(W, st.H, qtype, imatrix)
        else:
            tied = "output.weight" not in st.plan
            res = gptq_kernel.rtn(W, qtype, imatrix=imatrix if (tied or name == "output.weight") else None)
        module.weight.data = st.torch.from_numpy(np.ascontiguousarray(res.weight))
        st.out[name] = res.data


class RoundStep(Step):
    """A rounding step: ``_round(W, H, qtype, imatrix[, mask])`` onto one tensor's grid; ``tied_head``
    sends a head tied to the embedding through ``_round`` too (else importance-weighted RTN)."""

    report_key = "hessian_error"
    masked = False  # ``_round`` takes a pruning mask

    def _round(self, W, H, qtype, imatrix, mask=None):  # noqa: ANN001, ANN202 - a RoundFn
        raise NotImplementedError

    def layer(self, st: LayerState) -> dict[str, float]:
        return round_layer(st, self.config.imatrix, self._round, masked=self.masked)  # type: ignore[attr-defined]

    def head(self, st: HeadState) -> None:
        own = None if type(self)._round is RoundStep._round else self._round
        round_head(st, self.config.imatrix, own, tied_too=getattr(self.config, "tied_head", False))  # type: ignore[attr-defined]


@register_step("rtn")
class RTNRound(RoundStep):
    config_class = RTNRoundConfig

    def layer(self, st: LayerState) -> dict[str, float]:
        return round_layer(st, self.config.imatrix,  # type: ignore[attr-defined]
                           lambda W, H, t, im: gptq_kernel.rtn(W, t, imatrix=im))
