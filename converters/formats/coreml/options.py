"""Typed options of the Core ML format: what ``--bits``, ``--palettize``, ``--block-size``, ``--sym/--asym``
and ``-O key=value`` set."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from edgekit.converters.formats.base import ConvertRecipe
from edgekit.errors import InputError


@dataclass(frozen=True)
class CoreMLOptions:
    """How the Core ML program is built.

    bits: 16 (fp16 weights), 8 or 4 (``constexpr_blockwise_shift_scale``); ignored with ``palettize``.
    palettize: 2, 3, 4, 6 or 8: ``constexpr_lut_to_dense`` palettes instead of blockwise integers.
    block_size: weights per scale along the input dimension (16..256, a power of two).
    symmetric: signed data without offsets (default: unsigned data with an offset per block).
    lut_group: output rows sharing one palette (Core ML's per-grouped-channel tables).
    outliers: percent of the weights kept exactly in fp16 beside the palettes (SqueezeLLM's dense-and-sparse,
        e.g. 0.45); costs a one-bit mask per weight plus two bytes per outlier.
    context: tokens the KV-cache state holds (the longest prompt plus generation).
    """

    bits: int = 16
    palettize: int | None = None
    block_size: int = 32
    symmetric: bool = False
    lut_group: int = 16
    outliers: float = 0.0
    context: int = 2048

    def __post_init__(self) -> None:
        if self.palettize is None and self.bits not in (4, 8, 16):
            raise InputError(f"--bits {self.bits} is not available for Core ML; use 4 or 8 (blockwise), 16 (fp16), "
                             "or --palettize 2|3|4|6|8")
        if self.palettize is not None and self.palettize not in (2, 3, 4, 6, 8):
            raise InputError(f"--palettize {self.palettize}: Core ML palettes have 2, 3, 4, 6 or 8 bits")
        if self.outliers and self.palettize is None:
            raise InputError("-O outliers keeps a share of the weights beside palettes: give --palettize N with it")
        if self.context < 16 or self.context > 32768:
            raise InputError("-O context must be between 16 and 32768 tokens")
        self.grid  # validates block size and group  # noqa: B018

    @property
    def quantized(self) -> bool:
        return self.palettize is not None or self.bits in (4, 8)

    @property
    def grid(self) -> Any:
        """The registered grid every quantized matrix uses (None for fp16)."""
        from edgekit.converters.quantize.grids.coreml import CoreMLBlockwise, CoreMLPalette
        from edgekit.errors import UnsupportedError

        try:
            if self.palettize is not None:
                return CoreMLPalette(self.palettize, self.lut_group, self.outliers / 100.0)
            if self.bits in (4, 8):
                return CoreMLBlockwise(self.bits, self.block_size, self.symmetric)
        except UnsupportedError as exc:
            raise InputError(str(exc)) from exc
        return None

    @property
    def label(self) -> str:
        g = self.grid
        return "fp16" if g is None else g.name.removeprefix("COREML_").lower()

    @classmethod
    def from_recipe(cls, recipe: ConvertRecipe) -> CoreMLOptions:
        if recipe.budgeted or recipe.tensor_types or recipe.preset:
            raise InputError("Core ML artifacts use one grid for every matrix: give --bits 4|8|16 or --palettize N "
                             "(not --bpw, --size, --fit, --type or --tensor-type)")
        known = {f.name for f in fields(cls)} - {"bits"}
        extra: dict[str, Any] = dict(recipe.extra)
        unknown = sorted(set(extra) - known)
        if unknown:
            raise InputError(f"unknown Core ML option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for key in ("palettize", "block_size", "lut_group", "context"):
            if isinstance(extra.get(key), str):
                try:
                    extra[key] = int(extra[key])
                except ValueError:
                    raise InputError(f"-O {key}={extra[key]!r}: give a whole number") from None
        if isinstance(extra.get("outliers"), str):
            text = extra["outliers"].strip().removesuffix("%")
            try:
                extra["outliers"] = float(text)
            except ValueError:
                raise InputError(f"-O outliers={extra['outliers']!r}: give a percent of the weights, e.g. 0.45") from None
        return cls(bits=int(recipe.bits or 16), **extra)
