"""The quantizer interface and its registry.

A quantizer turns one float32 weight matrix into the exact bytes of a ggml block type. Round-to-
nearest needs nothing else; calibrated methods (GPTQ, AWQ) also get the model and calibration data
through :meth:`Quantizer.prepare` before tensors are encoded, and keep whatever they learn there.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit.registry import Registry

if TYPE_CHECKING:
    import gguf

    from edgekit.model import HFCheckpoint

QUANTIZERS: Registry[type[Quantizer]] = Registry(
    "quantization method",
    ["edgekit.converters.quantize.rtn", "edgekit.converters.quantize.gptq", "edgekit.converters.quantize.awq_methods",
     "edgekit.converters.quantize.squeezellm", "edgekit.converters.quantize.ternary",
     "edgekit.converters.quantize.aqlm", "edgekit.converters.quantize.imatrix_file"],
)
register_quantizer = QUANTIZERS.register


@dataclass(frozen=True)
class QuantizeConfig:
    """Base config shared by every method.

    method: registered quantizer name ("rtn", later "gptq", "awq", ...).
    """

    method: str = "rtn"

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


class Quantizer(abc.ABC):
    """Encodes weights onto ggml grids. One instance serves one conversion."""

    config_class: type[QuantizeConfig] = QuantizeConfig
    #: ``quantize`` may run on several tensors at once from worker threads.
    parallel_safe: bool = True

    def __init__(self, config: QuantizeConfig | None = None) -> None:
        self.config = config or self.config_class()

    @property
    def uses_imatrix(self) -> bool:
        """Whether the weights are rounded with an importance matrix (some formats' rules depend on it)."""
        return False

    def prepare(  # noqa: B027 - optional hook
        self,
        checkpoint: HFCheckpoint,
        plan: dict[str, gguf.GGMLQuantizationType],
        progress: Callable[[str, int, int], None] | None = None,
    ) -> None:
        """Hook for calibrated methods: see the model and the per-tensor type plan (GGUF names) before
        encoding, reporting long work through ``progress(description, done, total)``."""

    @abc.abstractmethod
    def quantize(self, name: str, weight: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
        """Bytes (uint8, shape (rows, bytes per row)) of ``weight`` (float32, (rows, cols), in the
        checkpoint's own layout: a format's writer applies its own row order to the encoded rows) as
        ``qtype``. ``name`` is the GGUF tensor name, for methods that keep per-tensor state.
        """


def method_flag(method: str) -> str:
    """How the user asked for ``method`` on the command line: ``--imatrix FILE`` for the importances of a file
    (its method's name, ``imatrix-file``, is internal), ``--method NAME`` otherwise."""
    return "--imatrix FILE" if method == "imatrix-file" else f"--method {method}"
