"""What a layer step is: one unit of work the calibrated pipeline runs on every decoder layer.

The pipeline (:mod:`edgekit.converters.quantize.pipeline`) captures a layer's inputs once (the Hessian
proxy ``H`` of every linear's inputs, and token samples when a step asks for them), then runs the
recipe's steps on that layer in stage order: reshaping steps first (AWQ scales, later pruning), one
rounding step last (GPTQ or round-to-nearest onto each tensor's grid), and the quantized layer then
produces the next layer's inputs. A step is one file: a frozen config dataclass naming the step, and a
:class:`Step` class registered under that name. It works on a :class:`LayerState` in place.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edgekit.registry import Registry

if TYPE_CHECKING:
    import gguf

    from edgekit.model import HFCheckpoint

STEPS: Registry[type[Step]] = Registry(
    "layer step",
    ["edgekit.converters.quantize.steps.awq_scale", "edgekit.converters.quantize.steps.prune",
     "edgekit.converters.quantize.steps.gptq_round", "edgekit.converters.quantize.steps.rtn_round",
     "edgekit.converters.quantize.steps.neuron_stats", "edgekit.converters.quantize.steps.aqlm_round"],
)
register_step = STEPS.register

#: Stages, in the order the pipeline runs them on each layer.
RESHAPE, PRUNE, ROUND = 10, 20, 30


@dataclass(frozen=True)
class StepConfig:
    """Base of every step's config: ``step`` names the registered step, ``stage`` orders it."""

    step: ClassVar[str] = ""
    stage: ClassVar[int] = RESHAPE

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, **asdict(self)}


@dataclass
class LayerState:
    """One decoder layer as the steps see it.

    linears: module name inside the layer (``"mlp.down_proj"``) -> its ``torch.nn.Linear``.
    names: the same module names -> GGUF tensor names (``"blk.3.ffn_down.weight"``), the plan's keys.
    H: module name -> float64 Hessian proxy of its inputs (steps that change a linear's inputs rescale it).
    samples: module name -> a row subset of its inputs (only when a step asked for samples).
    out: GGUF name -> encoded rows (the file's bytes, in the checkpoint's layout), shared by all layers.
    masks: pruned weights per linear (see the field).
    """

    torch: Any
    ckpt: HFCheckpoint
    plan: dict[str, gguf.GGMLQuantizationType]
    index: int
    layer: Any
    linears: dict[str, Any]
    names: dict[str, str]
    H: dict[str, Any]
    samples: dict[str, Any] = field(default_factory=dict)
    out: dict[str, np.ndarray] = field(default_factory=dict)
    #: module name -> bool ``(out, in)``, True where a pruning step zeroed the weight (GPTQ aims it at 0; a
    #: grid with a minimum, Q4_1 or the K-quants but Q3_K/Q6_K, stores the nearest value it has, rarely 0).
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    #: module name -> the fraction of its pruned weights the file stores as exactly 0 (the rounding step's).
    zeros_kept: dict[str, float] = field(default_factory=dict)
    #: module name -> float64 per-column sum of squared inputs with every position weighted alike (H's
    #: diagonal without the attention-sink weighting: Wanda's ||x_j||^2); steps that rescale inputs rescale it.
    diag: dict[str, Any] = field(default_factory=dict)
    #: called with what comes next ("rounding mlp.down_proj") between the slow parts of a layer: the
    #: pipeline reports it as progress, where a cancel (Ctrl-C in the TUI, Esc) takes effect.
    tick: Callable[[str], None] = field(default=lambda what: None)

    def qtype(self, module: str) -> gguf.GGMLQuantizationType:
        return self.plan[self.names[module]]

    def keep_small_tensors(self) -> None:
        """Encode the layer's non-linear tensors (norms, biases) as the model now has them: a step that
        folded something into them (AWQ's 1/s) must see the file carry the changed values."""
        from edgekit.converters.quantize import gptq_kernel

        weights = {f"{n}.weight" for n in self.linears}
        for pname, param in self.layer.named_parameters():
            gname = None if pname in weights else self.ckpt.spec.gguf_name(f"model.layers.{self.index}.{pname}")
            if gname in self.plan:
                w = param.detach().float().numpy()
                self.out[gname] = gptq_kernel.rtn(w.reshape(1, -1), self.plan[gname]).data.reshape(-1)


#: A plan's entry for a float tensor that the format stores as float8 e4m3 (AQLM's ``-O embedding=fp8``): the
#: pipeline's model holds those values from the start (:func:`..pipeline.round_stored_floats`); no step rounds it.
F8_E4M3 = "F8_E4M3"


@dataclass
class HeadState:
    """The output head after the last layer: ``H`` of the final norm's outputs (numpy float64)."""

    torch: Any
    ckpt: HFCheckpoint
    plan: dict[str, gguf.GGMLQuantizationType]
    model: Any
    H: np.ndarray | None  # None when no step needs Hessians
    out: dict[str, np.ndarray] = field(default_factory=dict)


class Step(abc.ABC):
    """One registered step. ``needs_samples``: the pipeline keeps input samples for it; ``needs_hessians``:
    it reads ``LayerState.H``."""

    config_class: ClassVar[type[StepConfig]] = StepConfig
    needs_samples: ClassVar[bool] = False
    #: The pipeline accumulates the Hessian proxies H (most of calibration's cost) only if a step needs them.
    needs_hessians: ClassVar[bool] = True
    #: Key of this step's per-layer reports in the quantizer's report.
    report_key: ClassVar[str] = ""

    def __init__(self, config: StepConfig | None = None) -> None:
        self.config = config or self.config_class()

    @abc.abstractmethod
    def layer(self, st: LayerState) -> Any:
        """Work on one layer in place; returns a JSON-able report for it (or None)."""

    def head(self, st: HeadState) -> None:  # noqa: B027 - optional
        """Work on the output head (rounding steps encode it)."""


def make_step(config: StepConfig) -> Step:
    """The registered step a config names."""
    return STEPS.get(config.step)(config)


def order_steps(configs: tuple[StepConfig, ...] | list[StepConfig]) -> list[StepConfig]:
    """The recipe's steps in stage order (stable within a stage); exactly one rounding step, last."""
    from edgekit.errors import InputError

    ordered = sorted(configs, key=lambda c: c.stage)
    rounds = [c.step for c in ordered if c.stage == ROUND]
    if len(rounds) != 1:
        raise InputError(f"a recipe needs exactly one rounding step (gptq or rtn); it has {rounds or 'none'}")
    return ordered
