"""Typed options of the MLC format and its quantization modes (``--quant`` / ``--type``, ``--bits``, ``-O``)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from edgekit.converters.formats.base import ConvertRecipe
from edgekit.errors import InputError, UnsupportedError


@dataclass(frozen=True)
class MLCQuant:
    """One of MLC's quantization modes: ``grid`` (a registered grid name, None for unquantized),
    ``dtype`` (the model's), ``layout`` of quantized linears ("NK": ``q_weight (N, K/8)``; "KN": its
    transpose, the ``_0`` modes). Embeddings and an untied head are quantized too (MLC's defaults)."""

    name: str
    grid: str | None
    dtype: str
    layout: str = "NK"

    @property
    def bits(self) -> int:
        """Bits per stored weight of the quantized matrices: the grid's (4, 3), else the dtype's (16, 32)."""
        return int(self.name[1]) if self.grid is not None else (16 if self.dtype == "float16" else 32)


# mlc-llm's python/mlc_llm/quantization/quantization.py (the group-quant and no-quant modes).
QUANTS = {q.name: q for q in (
    MLCQuant("q4f16_1", "MLC_INT4_G32_F16", "float16"),
    MLCQuant("q4f16_0", "MLC_INT4_G32_F16", "float16", "KN"),
    MLCQuant("q4f32_1", "MLC_INT4_G32_F32", "float32"),
    MLCQuant("q3f16_1", "MLC_INT3_G40_F16", "float16"),
    MLCQuant("q3f16_0", "MLC_INT3_G40_F16", "float16", "KN"),
    MLCQuant("q0f16", None, "float16"),
    MLCQuant("q0f32", None, "float32"),
)}
_BITS = {4: "q4f16_1", 3: "q3f16_1", 16: "q0f16", 32: "q0f32"}
MLC_INSTALL = ("mlc_llm is not installed here (its PyPI names mlc-llm-cpu / mlc-ai-cpu are empty placeholders): "
               "install it from MLC's wheels (pip install --pre -f https://mlc.ai/wheels mlc-llm-nightly-cpu "
               "mlc-ai-nightly-cpu) or build it from source, then re-run with --compile, or run "
               "'mlc_llm compile DIR/mlc-chat-config.json --device TARGET -o DIR/lib' yourself")


def mlc_llm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("mlc_llm") is not None


COMPILE_TARGETS = ("android", "iphone", "metal", "webgpu", "vulkan", "opencl", "cuda", "llvm")


@dataclass(frozen=True)
class MLCOptions:
    """How the MLC artifact is written.

    quant: MLC's quantization mode (q4f16_1, q4f16_0, q4f32_1, q3f16_1, q3f16_0, q0f16, q0f32).
    context_window_size: tokens the KV cache holds (default: the checkpoint's max_position_embeddings).
    prefill_chunk_size: prompt tokens per prefill step (default: min(context, 8192), as mlc_llm does).
    shard_mb: shard cap in MiB (32: what ``mlc_llm convert_weight`` writes).
    compile: a device for ``mlc_llm compile`` (android, iphone, metal, webgpu, vulkan, opencl, cuda, llvm);
        needs mlc_llm installed.
    """

    quant: str = "q4f16_1"
    context_window_size: int | None = None
    prefill_chunk_size: int | None = None
    shard_mb: int = 32
    compile: str | None = None

    def __post_init__(self) -> None:
        if self.quant not in QUANTS:
            raise InputError(f"--quant {self.quant!r} is not an MLC mode; use one of {', '.join(QUANTS)}")
        for key in ("context_window_size", "prefill_chunk_size"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 16 <= v <= 1 << 20):
                raise InputError(f"-O {key}={v!r}: give a whole number of tokens between 16 and 1048576")
        if isinstance(self.shard_mb, bool) or not isinstance(self.shard_mb, int) or not 1 <= self.shard_mb <= 4096:
            raise InputError(f"-O shard_mb={self.shard_mb!r}: give a whole number of MiB between 1 and 4096")
        if self.compile is not None and self.compile not in COMPILE_TARGETS:
            raise InputError(f"--compile {self.compile!r}: give one of {', '.join(COMPILE_TARGETS)}")
        if self.compile is not None:  # refused before any work (a GGUF import, a calibration)
            if not mlc_llm_available():
                raise UnsupportedError(f"--compile {self.compile}: {MLC_INSTALL}")

    @property
    def mode(self) -> MLCQuant:
        return QUANTS[self.quant]

    @property
    def grid(self) -> Any:
        """The registered grid of the quantized matrices (None for q0 modes)."""
        from edgekit.converters.quantize.grids import as_grid

        return None if self.mode.grid is None else as_grid(self.mode.grid)

    @classmethod
    def from_recipe(cls, recipe: ConvertRecipe) -> MLCOptions:
        if recipe.bpw is not None or recipe.tensor_types:
            raise InputError("MLC artifacts use one quantization mode for every matrix: give --quant q4f16_1 "
                             "(or --bits 4|3|16|32), not --bpw or --tensor-type")
        extra: dict[str, Any] = dict(recipe.extra)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise InputError(f"unknown MLC option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if recipe.size is not None:
            raise InputError("MLC artifacts use one quantization mode for every matrix, so there is no size to "
                             "fit: give --quant q4f16_1 (or --bits 4|3|16|32), not --size or --fit")
        if recipe.preset is not None:
            if recipe.preset.lower() not in QUANTS and "quant" not in extra:
                raise InputError(f"--type {recipe.preset} is not an MLC mode; MLC takes --quant "
                                 f"{'|'.join(sorted(QUANTS))} (or --bits 4|3|16|32)")
            extra.setdefault("quant", recipe.preset.lower())
        elif "quant" not in extra:
            if recipe.bits not in _BITS:
                raise InputError(f"--bits {recipe.bits} has no MLC mode; use 4 (q4f16_1), 3 (q3f16_1), 16 (q0f16), "
                                 "32 (q0f32) or --quant NAME")
            extra["quant"] = _BITS[recipe.bits]
        for key in ("context_window_size", "prefill_chunk_size", "shard_mb"):
            if isinstance(extra.get(key), str):
                try:
                    extra[key] = int(extra[key])
                except ValueError:
                    raise InputError(f"-O {key}={extra[key]!r}: give a whole number") from None
        return cls(**extra)
