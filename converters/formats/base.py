"""The artifact-format interface and its registry: one file per format, ``@register_format``."""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekit.calibration import CalibConfig
from edgekit.errors import InputError
from edgekit.progress import ProgressFn, no_progress
from edgekit.registry import Registry

if TYPE_CHECKING:
    from edgekit.artifact import Artifact
    from edgekit.converters.quantize.base import Quantizer
    from edgekit.model import HFCheckpoint

FORMATS: Registry[type[Format]] = Registry(
    "format", ["edgekit.converters.formats.gguf", "edgekit.converters.formats.onnx", "edgekit.converters.formats.coreml",
               "edgekit.converters.formats.mlc", "edgekit.converters.formats.aqlm"])
register_format = FORMATS.register

__all__ = ["FORMATS", "ConvertRecipe", "Format", "ProgressFn", "no_progress", "register_format"]


@dataclass(frozen=True)
class ConvertRecipe:
    """What to produce.

    bits: nominal bits per weight (2, 3, 4, 5, 6, 8) selecting a preset mix; ignored when ``preset`` is set.
    preset: a named type mix (for GGUF: llama.cpp's names, e.g. "Q4_K_M", "Q4_0", "F16").
    bpw: a size budget in bits per weight (whole file): types chosen per tensor by measured
        sensitivity instead of a preset's rules.
    size: the same budget as the size of the model files in bytes (``--size 90MB``); each format with a
        budget turns it into bits per weight, counting what its files hold besides the weights.
    bpw_types: the types a ``bpw`` budget may choose from (empty: every type a tensor's rows can hold).
    tensor_types: ``(regex, type)`` overrides applied after the preset, matched against tensor names.
    method: the quantization method (a registered quantizer name).
    calib: calibration data for calibrated methods and for ``bpw`` (None: sampled from the model).
    prune: structural pruning before conversion, ``"depth:6"`` or ``"width:ffn=1024,heads=6"`` (see
        :mod:`edgekit.converters.structure`); heal: a ``HealConfig`` to distil the pruned model afterwards.
    """

    bits: int | None = 4
    preset: str | None = None
    bpw: float | None = None
    size: int | None = None
    bpw_types: tuple[str, ...] = ()
    tensor_types: tuple[tuple[str, str], ...] = ()
    method: str = "rtn"
    calib: CalibConfig | None = None
    prune: str | None = None
    heal: Any = None  # a structure.heal.HealConfig: distil the pruned model from the unpruned one
    draft_for: dict[str, Any] | None = None  # a speculative-decoding draft: its target (converters.draft)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preset is None and self.bits is None and self.bpw is None and self.size is None:
            raise InputError("give --bits, --type, --bpw or --size")
        from numbers import Integral, Real

        for name, value, kind in (("bits", self.bits, Integral), ("bpw", self.bpw, Real), ("size", self.size, Real)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
                raise InputError(f"--{name} ({name}=) must be a {'whole ' if kind is Integral else ''}number, "
                                 f"got {value!r}, a {type(value).__name__}")
        if self.size is not None and (self.bpw is not None or self.preset is not None):
            given = " and ".join(f for f, v in (("--bpw", self.bpw), ("--type", self.preset)) if v is not None)
            raise InputError(f"--size is a budget of its own: drop {given}")
        if self.size is not None and self.size <= 0:
            raise InputError("--size must be more than 0 bytes, e.g. --size 90MB")
        if self.bpw is not None and not 1.5 <= self.bpw <= 16:
            raise InputError("--bpw must be between 1.5 and 16")
        if self.prune is not None:
            from edgekit.converters.structure import validate

            validate(self.prune)
        if self.heal is not None and self.prune is None:
            raise InputError("--heal distils a pruned model: give --prune depth:K or width:... with it")
        for pattern, _ in self.tensor_types:
            import re

            try:
                re.compile(pattern)
            except re.error as exc:
                raise InputError(f"--tensor-type pattern {pattern!r} is not a valid regex ({exc})") from exc

    @property
    def budgeted(self) -> bool:
        """Types are chosen per tensor to a size budget (``bpw`` or ``size``), not by a preset's rules."""
        return self.bpw is not None or self.size is not None

    def budget_label(self) -> str | None:
        """The budget as an artifact name part: ``90mb``, ``1.5gb``, ``512mib``, ``3.5bpw``; None without one.
        A size names the unit it was most likely given in (``--size 1GB`` is ``1gb``, not ``1000mb``)."""
        if self.size is not None:
            decimal = f"{self.size / 1e9:.4g}gb" if self.size >= 1e9 else f"{self.size / 1e6:.4g}mb"
            if self.size % 100_000 == 0:  # 90MB, 72.5MB, 1GB
                return decimal
            for unit, scale in (("gib", 1 << 30), ("mib", 1 << 20)):
                if self.size >= scale and self.size % (scale >> 10) == 0:  # 512MiB, 1.5GiB
                    return f"{self.size / scale:.4g}{unit}"
            return decimal
        return None if self.bpw is None else f"{self.bpw:g}bpw"

    def to_json(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "preset": self.preset,
            "bpw": self.bpw,
            **({"size": self.size} if self.size is not None else {}),
            **({"bpw_types": list(self.bpw_types)} if self.bpw_types else {}),
            "tensor_types": [list(t) for t in self.tensor_types],
            "method": self.method,
            **({"calib": self.calib.describe()} if self.calib else {}),
            **({"prune": self.prune} if self.prune else {}),
            **({"heal": asdict(self.heal)} if self.heal is not None else {}),
            **({"draft_for": self.draft_for} if self.draft_for else {}),
            **self.extra,
        }


class Format(abc.ABC):
    """Writes artifacts of one format from a checkpoint. ``options_class``: the frozen dataclass of its
    typed options (the SDK passes an instance to ``api.convert(options=...)``, the CLI builds it from
    ``-O key=value``), or None when it has none. ``archs``: the Hugging Face classes whose layers the format's own
    graphs compute, or None where the runtime builds the model from its config (every family edgekit reads)."""

    name: str = ""
    model_filename: str = ""
    options_class: type | None = None
    archs: tuple[str, ...] | None = None

    @abc.abstractmethod
    def convert(
        self,
        checkpoint: HFCheckpoint,
        out_dir: Path,
        recipe: ConvertRecipe,
        quantizer: Quantizer,
        progress: ProgressFn = no_progress,
    ) -> dict[str, Any]:
        """Write the model file into ``out_dir`` (a fresh temporary folder); return manifest fields. A
        ``"recipe"`` field holds corrections merged into the recipe the core records (MLC's ``--quant``
        decides the bits), ``"notes"`` the warnings convert prints."""

    @abc.abstractmethod
    def describe(self, art: Artifact, ctx: int = 4096) -> dict[str, Any]:
        """What ``edgekit inspect`` shows, read from the artifact's files: architecture, hparams,
        tensors (name, type, shape, bytes), size, bits per weight, memory at ``ctx``."""

    def push_dest(self, platform: str) -> str | None:
        """Where an app of this format reads models on a device of ``platform`` (``push`` sends the artifact
        folder there unless ``--dest`` is given); None: the device's default folder."""
        return None

    def default_output_suffix(self, recipe: ConvertRecipe) -> str:
        """``<format>-<quantization>`` of the default artifact name (see :mod:`edgekit.library`), e.g.
        ``gguf-q4_k_m``, ``onnx-uint4_b32``, ``gguf-90mb``; formats name their own storage types."""
        label = recipe.budget_label() or (recipe.preset.lower() if recipe.preset else f"q{recipe.bits}")
        return f"{self.name}-{label}"


def tensor_summary(tensors: list[dict[str, Any]], n_params: int, file_bytes: int, weight_bytes: int) -> dict[str, Any]:
    """The size fields every format's ``describe`` shares, from its tensor list (each with "type" and
    "bytes"): parameters, bytes, bits per weight, counts and bytes per stored type (no fallbacks: only GGUF
    has those)."""
    from collections import Counter

    counts = Counter(t["type"] for t in tensors)
    return {"n_params": n_params, "file_bytes": file_bytes, "weight_bytes": weight_bytes,
            "bpw": round(8 * file_bytes / n_params, 4) if n_params else 0.0,
            "type_counts": dict(counts.most_common()),
            "type_bytes": {k: sum(t["bytes"] for t in tensors if t["type"] == k) for k in counts},
            "fallbacks": 0, "fallback_summary": {}}


def quantizer_timings(quantizer: Any) -> dict[str, Any]:
    """``{"quantizer_report": {...}}``: the seconds the quantizer reported (its ``*_s`` entries), or nothing."""
    report = getattr(quantizer, "report", None)
    return {"quantizer_report": {k: v for k, v in report.items() if k.endswith("_s")}} if report else {}


def size_fields(n_params: int, size: int, tensors: list[dict[str, Any]], quantizer: Any) -> dict[str, Any]:
    """The manifest fields every format's writer returns about what it wrote: parameters, bytes, bits per
    weight, the tensor list and the quantizer's timings."""
    return {"n_params": n_params, "size_bytes": size, "bpw": round(8 * size / n_params, 4) if n_params else 0.0,
            "tensors": tensors, **quantizer_timings(quantizer)}
