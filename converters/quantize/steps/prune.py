"""Pruning steps: magnitude, Wanda and SparseGPT, unstructured or N:M (:mod:`..prune` holds the maths).

Each prunes every linear of the layer to the same sparsity, zeroes the pruned weights in the model and
records the masks, so the rounding step after it aims them at zero (GPTQ then treats a pruned weight's
whole value as error to compensate: SparseGPT's joint sparsify-and-quantize) and reports how many it stores
as exact zeros (all on a grid without a minimum; on Q4_1 or most K-quants, the nearest value the block has). The Hessians stay valid:
pruning changes weights, not the layer's inputs. None of llama.cpp's or onnxruntime's CPU kernels skip
zeros, so these steps buy quality-per-parameter, not speed; structured pruning (fewer layers, narrower
layers) is what makes a model faster on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from edgekit.converters.quantize import prune
from edgekit.converters.quantize.steps.base import PRUNE, LayerState, Step, StepConfig, register_step
from edgekit.errors import InputError


@dataclass(frozen=True)
class PruneConfig(StepConfig):
    """sparsity: a fraction (``"0.5"``) or an N:M pattern (``"2:4"``: 2 zeros in every 4 inputs)."""

    stage: ClassVar[int] = PRUNE
    sparsity: str = "0.5"

    def __post_init__(self) -> None:
        prune.Sparsity.parse(self.sparsity)

    @property
    def pattern(self) -> prune.Sparsity:
        return prune.Sparsity.parse(self.sparsity)


@dataclass(frozen=True)
class MagnitudeConfig(PruneConfig):
    step: ClassVar[str] = "magnitude"


@dataclass(frozen=True)
class WandaConfig(PruneConfig):
    step: ClassVar[str] = "wanda"


@dataclass(frozen=True)
class SparseGPTConfig(PruneConfig):
    """damp: dampening of H (fraction of its mean diagonal); block_cols: columns per mask decision."""

    step: ClassVar[str] = "sparsegpt"
    damp: float = 0.01
    block_cols: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.damp < 1 or self.block_cols < 1:
            raise InputError("SparseGPT needs 0 <= damp < 1 and block_cols >= 1")


class _Prune(Step):
    report_key = "sparsity"
    #: score by the inputs' plain second moments (every position alike) instead of the pipeline's H, whose
    #: first position is weighted for rounding error (see :mod:`..pipeline`)
    plain_norms = False

    def _prune(self, W: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def layer(self, st: LayerState) -> dict[str, Any]:
        report = {}
        for name, lin in st.linears.items():
            st.tick(f"pruning {name}")
            W = lin.weight.detach().float().numpy()
            H = st.H[name].numpy()
            if self.plain_norms and name in st.diag:
                H = st.diag[name].numpy()  # the diagonal alone is all such a score reads
            new, mask = self._prune(W, H)
            if name in st.masks:  # a second pruning step adds to the first
                mask = mask | st.masks[name]
                new = np.where(mask, np.float32(0), new)
            st.masks[name] = mask
            lin.weight.data = st.torch.from_numpy(np.ascontiguousarray(new, dtype=np.float32))
            report[name] = round(float(mask.mean()), 4)
        return report


@register_step("magnitude")
class MagnitudePrune(_Prune):
    config_class = MagnitudeConfig

    def _prune(self, W: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mask = prune.magnitude_mask(W, self.config.pattern)  # type: ignore[attr-defined]
        return np.where(mask, np.float32(0), W), mask


@register_step("wanda")
class WandaPrune(_Prune):
    """Wanda's |W_ij| * ||x_j|| with the paper's plain input norms: the attention-sink weighting that helps
    GPTQ's rounding makes Wanda worse (SmolLM2 2:4, 128 x 512 WikiText-2 tokens: ppl 84.9 plain, 93.9 with
    the first position weighted 10x; llm-compressor 89.2)."""

    config_class = WandaConfig
    plain_norms = True

    def _prune(self, W: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mask = prune.wanda_mask(W, H, self.config.pattern)  # type: ignore[attr-defined]
        return np.where(mask, np.float32(0), W), mask


@register_step("sparsegpt")
class SparseGPTPrune(_Prune):
    config_class = SparseGPTConfig

    def _prune(self, W: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        assert isinstance(c, SparseGPTConfig)
        return prune.sparsegpt(W, H, c.pattern, damp=c.damp, block_cols=c.block_cols)


_BY_NAME: dict[str, type[PruneConfig]] = {"magnitude": MagnitudeConfig, "wanda": WandaConfig,
                                          "sparsegpt": SparseGPTConfig}


def from_spec(spec: str) -> PruneConfig:
    """``--prune wanda:0.5`` / ``sparsegpt:2:4`` / ``magnitude:50%`` as a step config."""
    method, _, rest = spec.strip().partition(":")
    cls = _BY_NAME.get(method.lower())
    if cls is None:
        raise InputError(f"--prune {spec!r}: unstructured pruning is magnitude:S, wanda:S or sparsegpt:S "
                         "(S a fraction like 0.5 or a pattern like 2:4)")
    return cls(sparsity=rest or "0.5")
