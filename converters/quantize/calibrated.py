"""Calibrated methods: a recipe of layer steps run by the layer-sequential pipeline.

A method is a config whose :meth:`CalibratedConfig.method_steps` names its steps (GPTQ: one GPTQ
rounding step; AWQ: AWQ scales, then importance-weighted rounding; ...); ``extra_steps`` inserts more
(pruning before the rounding, say), and the pipeline runs them in stage order on each layer
(:mod:`edgekit.converters.quantize.pipeline`). The quantizer hands the resulting bytes to the writer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from edgekit.calibration import CalibConfig
from edgekit.converters.quantize import gptq_kernel
from edgekit.converters.quantize.base import QuantizeConfig, Quantizer
from edgekit.converters.quantize.grids import as_grid
from edgekit.converters.quantize.pipeline import LayerPipeline
from edgekit.converters.quantize.steps import StepConfig, make_step, order_steps
from edgekit.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Callable

    from edgekit.model import HFCheckpoint

_FLOAT = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}


@dataclass(frozen=True)
class CalibratedConfig(QuantizeConfig):
    """Settings every calibrated method shares.

    calib: where calibration activations come from (default: sampled from the model itself).
    sink_weight: weight of each sequence's first position in H (see :mod:`..pipeline`).
    batch: sequences per forward pass (memory vs. speed).
    extra_steps: more layer steps for the recipe (their configs), run in stage order with the method's.
    """

    method: str = "gptq"
    calib: CalibConfig = field(default_factory=CalibConfig)
    sink_weight: float = 10.0
    batch: int = 8
    extra_steps: tuple[StepConfig, ...] = ()

    def __post_init__(self) -> None:
        if self.sink_weight < 0 or self.batch < 1:
            raise InputError("sink_weight must be >= 0 and batch >= 1")

    def method_steps(self) -> tuple[StepConfig, ...]:
        """The method's own steps (a subclass names them)."""
        return ()

    def steps(self) -> list[StepConfig]:
        """The whole recipe, in the order the pipeline runs it on each layer; without a rounding step,
        importance-weighted round-to-nearest ends it."""
        from edgekit.converters.quantize.steps import ROUND
        from edgekit.converters.quantize.steps.rtn_round import RTNRoundConfig

        configs = [*self.method_steps(), *self.extra_steps]
        if not any(c.stage == ROUND for c in configs):
            configs.append(RTNRoundConfig())
        return order_steps(configs)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["calib"] = self.calib.describe()
        d["extra_steps"] = [s.to_json() for s in self.extra_steps]
        d["steps"] = [s.to_json() for s in self.steps()]
        return d


class CalibratedQuantizer(Quantizer):
    """Runs the recipe in :meth:`prepare`; :meth:`quantize` hands out its bytes."""

    config_class = CalibratedConfig

    def __init__(self, config: QuantizeConfig | None = None) -> None:
        super().__init__(config)
        self._bytes: dict[str, np.ndarray] = {}
        self.report: dict[str, Any] = {}

    @property
    def cfg(self) -> CalibratedConfig:
        assert isinstance(self.config, CalibratedConfig)
        return self.config

    @property
    def uses_imatrix(self) -> bool:
        return any(getattr(c, "imatrix", False) for c in self.cfg.steps())

    def quantize(self, name: str, weight: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
        if name in self._bytes:
            return self._bytes.pop(name)
        weight = np.ascontiguousarray(weight, dtype=np.float32)
        if weight.ndim == 1 or qtype in _FLOAT:
            return as_grid(qtype).quantize(weight)
        return gptq_kernel.rtn(weight, qtype).data

    def prepare(self, checkpoint: HFCheckpoint, plan: dict[str, gguf.GGMLQuantizationType],
                progress: Callable[[str, int, int], None] | None = None) -> None:
        steps = [make_step(c) for c in self.cfg.steps()]
        pipeline = LayerPipeline(self.cfg.calib, self.cfg.sink_weight, self.cfg.batch)
        # The PyTorch model carrying exactly the quantized weights (tests compare it with the file).
        self.model = pipeline.run(checkpoint, plan, steps, self._bytes, self.report, progress)
