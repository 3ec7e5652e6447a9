"""Rounding step: AQLM additive codebooks (:mod:`edgekit.converters.quantize.aqlm_kernel`) for every linear
whose plan entry is an :class:`~edgekit.converters.quantize.aqlm_kernel.AQLMScheme`.

Each linear is encoded against the Hessian proxy of its inputs as the already-encoded earlier layers
produce them; its codebooks and row scales are rounded to the file's fp16 and the model takes the weights
the file will decode to, so later layers see exactly the quantized ones. Tensors planned as float types (the
embedding, an untied head) are cast as every rounding step casts them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from edgekit.converters.quantize import aqlm_kernel, gptq_kernel
from edgekit.converters.quantize.steps.base import (
    F8_E4M3,
    ROUND,
    HeadState,
    LayerState,
    Step,
    StepConfig,
    register_step,
)
from edgekit.converters.quantize.steps.rtn_round import round_head
from edgekit.errors import InputError


@dataclass(frozen=True)
class AQLMRoundConfig(StepConfig):
    """rounds: alternations of codes / codebooks / scales after the k-means start; beam: partial code
    choices kept per group across its codebooks (1: greedy); cg_iters: conjugate-gradient iterations of
    each codebook update; damp: Hessian dampening (fraction of its mean diagonal)."""

    step: ClassVar[str] = "aqlm"
    stage: ClassVar[int] = ROUND
    rounds: int = 3
    beam: int = 4
    cg_iters: int = 30
    damp: float = 0.01

    def __post_init__(self) -> None:
        if not 0 <= self.rounds <= 50 or not 1 <= self.beam <= 64 or not 0 <= self.cg_iters <= 500:
            raise InputError("AQLM: rounds must be 0-50, beam 1-64 and cg_iters 0-500")
        if not 0 <= self.damp <= 1:
            raise InputError("AQLM: damp must be between 0 and 1")


def to_file_precision(t: aqlm_kernel.AQLMTensor) -> aqlm_kernel.AQLMTensor:
    """``t`` with codebooks and scales as the checkpoint stores them (fp16)."""
    t.codebooks = t.codebooks.astype(np.float16).astype(np.float32)
    t.scales = t.scales.astype(np.float16).astype(np.float32)
    return t


@register_step("aqlm")
class AQLMRound(Step):
    config_class = AQLMRoundConfig
    report_key = "aqlm"

    def layer(self, st: LayerState) -> dict[str, Any]:
        cfg: AQLMRoundConfig = self.config  # type: ignore[assignment]
        report: dict[str, Any] = {}
        for name, lin in st.linears.items():
            st.tick(f"encoding {name}")
            scheme = st.qtype(name)
            W = lin.weight.detach().float().numpy()
            if not isinstance(scheme, aqlm_kernel.AQLMScheme):
                if getattr(scheme, "name", None) not in ("F32", "F16", "BF16"):
                    raise InputError(f"the aqlm step encodes codebooks, which only --to aqlm stores; {st.names[name]} "
                                     f"is planned as {getattr(scheme, 'name', scheme)}: convert with --to aqlm")
                res = gptq_kernel.rtn(W, scheme)
                lin.weight.data = st.torch.from_numpy(np.ascontiguousarray(res.weight))
                st.out[st.names[name]] = res.data
                continue
            t0 = time.perf_counter()
            H = st.H[name].numpy()
            enc = to_file_precision(aqlm_kernel.encode(W, H, scheme, rounds=cfg.rounds, beam=cfg.beam,
                                                       cg_iters=cfg.cg_iters, damp=cfg.damp, seed=st.index))
            Wq = enc.weight()
            lin.weight.data = st.torch.from_numpy(np.ascontiguousarray(Wq))
            st.out[st.names[name]] = enc  # the format's writer takes the codes, codebooks and scales
            report[name] = {"rel_error": round(enc.rel_error, 5), "s": round(time.perf_counter() - t0, 2)}
        return report

    def head(self, st: HeadState) -> None:
        for name in ("output.weight", "token_embd.weight"):
            if isinstance(st.plan.get(name), aqlm_kernel.AQLMScheme):
                raise InputError("AQLM keeps the embedding and the output head in fp16 or fp8; plan them as F16")
        # an fp8 embedding already holds its stored values (the pipeline rounded it before calibrating)
        round_head(replace(st, plan={k: v for k, v in st.plan.items() if v != F8_E4M3}), False, None)
