"""Which GGUF type each tensor gets under llama.cpp's quantization presets ("mixes").

``llama-quantize model.gguf out.gguf Q4_K_M`` does not write every tensor as Q4_K: it keeps
norms and biases in F32, gives the output head (or the token embedding when it doubles as the
output head) Q6_K or Q8_0, spends more bits on some ``attn_v`` / ``ffn_down`` layers, and falls
back to a 32-wide block type when a row is not a multiple of the 256-wide K-quant block. The
rules are tables in :mod:`.mix_rules`; this module holds the presets, names and sizes, and the one
pure function, :func:`assign_types`, so that ``edgekit convert --type Q4_K_M`` (or ``--bits 4``)
writes the same mix that llama.cpp would.

The rules follow llama.cpp's ``src/llama-quant.cpp`` (``tensor_allows_quantization``,
``llama_tensor_get_type``, ``llama_tensor_get_type_impl``, ``tensor_type_fallback``) and the
``llama_ftype`` values of ``include/llama.h``. They cover the presets in :data:`PRESETS`, for
dense models, Falcon, 70B-class GQA models and 8-expert MoE models, with or without an importance
matrix (``has_imatrix``; some i-quant and Q4_0/Q5_0 rules depend on it), and the TQ1_0/TQ2_0 presets.
Not covered: the Q2_K_S and MXFP4 presets, and llama.cpp's per-architecture exceptions for GLM-5-next.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from math import prod
from typing import TypeVar

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from edgekit.converters.formats.gguf.mix_rules import (
    ArchInfo,
    Assignment,
    MixState,
    Preset,
    TensorInfo,
    fallback,
    llama_order,
    tensor_category,
)
from edgekit.errors import InputError, UnsupportedError

T = GGMLQuantizationType
_V = TypeVar("_V")

# --------------------------------------------------------------------------------------------
# Presets (include/llama.h llama_ftype values; tools/quantize's names)
# --------------------------------------------------------------------------------------------

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("F32", T.F32, 0, "32-bit floats, no quantization"),
        Preset("F16", T.F16, 1, "16-bit floats"),
        Preset("BF16", T.BF16, 32, "bfloat16"),
        Preset("Q8_0", T.Q8_0, 7, "8.5 bpw, near lossless"),
        Preset("Q4_0", T.Q4_0, 2, "4.5 bpw legacy type, output head Q6_K"),
        Preset("Q4_1", T.Q4_1, 3, "5.0 bpw legacy type, output head Q6_K"),
        Preset("Q5_0", T.Q5_0, 8, "5.5 bpw legacy type, output head Q6_K"),
        Preset("Q5_1", T.Q5_1, 9, "6.0 bpw legacy type, output head Q6_K"),
        Preset("Q2_K", T.Q2_K, 10, "Q2_K mix: attn_v, attn_output and ffn_down Q3_K or better"),
        Preset("Q3_K_S", T.Q3_K, 11, "Q3_K everywhere but the output head"),
        Preset("Q3_K_M", T.Q3_K, 12, "Q3_K mix: attn_v, attn_output and ffn_down Q4_K/Q5_K"),
        Preset("Q3_K_L", T.Q3_K, 13, "Q3_K mix: attn_v, attn_output and ffn_down Q5_K"),
        Preset("Q4_K_S", T.Q4_K, 14, "Q4_K, first attn_v and ffn_down layers Q5_K"),
        Preset("Q4_K_M", T.Q4_K, 15, "Q4_K, about half of attn_v and ffn_down Q6_K"),
        Preset("Q5_K_S", T.Q5_K, 16, "Q5_K everywhere but the output head"),
        Preset("Q5_K_M", T.Q5_K, 17, "Q5_K, about half of attn_v and ffn_down Q6_K"),
        Preset("Q6_K", T.Q6_K, 18, "Q6_K everywhere"),
        Preset("TQ1_0", T.TQ1_0, 36, "1.69 bpw ternary (BitNet b1.58), token embedding Q4_K"),
        Preset("TQ2_0", T.TQ2_0, 37, "2.06 bpw ternary (BitNet b1.58), token embedding Q4_K"),
        Preset("IQ2_XXS", T.IQ2_XXS, 19, "2.06 bpw lattice type; needs an importance matrix"),
        Preset("IQ2_XS", T.IQ2_XS, 20, "2.31 bpw lattice type; needs an importance matrix"),
        Preset("IQ3_XS", T.IQ3_S, 22, "IQ3_S mix with IQ3_XXS attn_q/attn_k and middle ffn_gate/ffn_up"),
        Preset("IQ3_XXS", T.IQ3_XXS, 23, "3.06 bpw lattice type, attn_q/attn_k IQ2_S; needs an importance matrix"),
        Preset("IQ4_NL", T.IQ4_NL, 25, "4.5 bpw non-linear 32-blocks"),
        Preset("IQ3_S", T.IQ3_S, 26, "3.44 bpw lattice type"),
        Preset("IQ3_M", T.IQ3_S, 27, "IQ3_S mix: attn_v, attn_output Q4_K, first ffn_down Q4_K"),
        Preset("IQ2_S", T.IQ2_XS, 28, "IQ2_XS mix with IQ3_S attn_v/attn_output; needs an importance matrix"),
        Preset("IQ2_M", T.IQ2_S, 29, "IQ2_S mix with IQ3_S attn_v/attn_output; needs an importance matrix"),
        Preset("IQ4_XS", T.IQ4_XS, 30, "4.25 bpw non-linear super-blocks"),
        Preset("IQ1_S", T.IQ1_S, 24, "1.56 bpw ternary codebook; needs an importance matrix"),
        Preset("IQ1_M", T.IQ1_M, 31, "1.75 bpw ternary codebook; needs an importance matrix"),
    )
}

# llama-quantize accepts these short names for the _M mixes.
PRESET_ALIASES: dict[str, str] = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# `edgekit convert --bits N`
BITS_TO_PRESET: dict[int, str] = {2: "Q2_K", 3: "Q3_K_M", 4: "Q4_K_M", 5: "Q5_K_M", 6: "Q6_K", 8: "Q8_0"}

# Types a tensor can be written as (and named in --tensor-type). The integer types, F64 and the
# Q8_1/Q8_K intermediates are not storage types for weights; MXFP4, NVFP4 and Q1_0, which the gguf
# library names, have no encoder in edgekit (no grid in converters/quantize/grids/ggml.py).
_NOT_WRITABLE = {T.I8, T.I16, T.I32, T.I64, T.F64, T.Q8_1, T.Q8_K,
                 *(getattr(T, n) for n in ("MXFP4", "NVFP4", "Q1_0") if hasattr(T, n))}
WRITABLE_TYPES: dict[str, GGMLQuantizationType] = {t.name: t for t in T if t not in _NOT_WRITABLE}

_FLOAT_TYPES = {T.F32, T.F16, T.BF16}

# llama.cpp refuses to write these types without an importance matrix (tensor_requires_imatrix),
# except for the token embedding and the output head
NEEDS_IMATRIX = frozenset({T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS})

# --------------------------------------------------------------------------------------------
# Which tensors llama.cpp quantizes at all (tensor_allows_quantization)
# --------------------------------------------------------------------------------------------

# Only names ending in "weight" with 2+ dims are quantized; these are kept even so: small or
# precision-critical tensors of various architectures.
_KEEP_SUBSTRINGS = (
    "_norm.weight",
    "ffn_gate_inp.weight",  # MoE router
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "attn_rel_b.weight",  # T5 relative position bias
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
) + tuple(
    f"time_mix_{part}.weight"  # RWKV's small 2-D weights
    for part in "first w0 w1 w2 v0 v1 v2 a0 a1 a2 g1 g2 decay_w1 decay_w2 lerp_fused".split()
)
_KEEP_NAMES = ("position_embd.weight", "token_types.weight")  # learned positions, BERT token types


def is_quantizable(info: TensorInfo) -> bool:
    """Whether llama.cpp would quantize this tensor; the rest keep their source type."""
    name = info.name
    if info.n_dims < 2 or not name.endswith("weight") or name in _KEEP_NAMES:
        return False
    return not any(part in name for part in _KEEP_SUBSTRINGS)

# --------------------------------------------------------------------------------------------
# The assignment
# --------------------------------------------------------------------------------------------


def _compile_overrides(
    overrides: Iterable[tuple[str, str | GGMLQuantizationType]],
) -> list[tuple[str, re.Pattern[str], GGMLQuantizationType]]:
    compiled = []
    for pattern, qtype in overrides:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise InputError(f"--tensor-type pattern {pattern!r} is not a valid regex: {exc}") from exc
        compiled.append((pattern, regex, qtype if isinstance(qtype, T) else type_from_name(qtype)))
    return compiled


def assign_types(
    tensors: Sequence[TensorInfo],
    preset: str | Preset,
    arch: ArchInfo,
    overrides: Iterable[tuple[str, str | GGMLQuantizationType]] = (),
    has_imatrix: bool = False,
) -> dict[str, Assignment]:
    """Choose each tensor's GGUF type as ``llama-quantize`` would for ``preset``.

    ``overrides`` are ``--tensor-type`` pairs (regex, type): the first regex that
    ``re.search``-matches a quantizable tensor's name sets its type in place of the preset's
    rules, and the row-width fallback still applies. As in llama.cpp, overrides only act when
    the preset's base type is quantized (not for F32/F16/BF16), and an overridden ``attn_v`` /
    ``ffn_down`` does not advance the layer counters the preset rules use.

    ``has_imatrix``: the weights will be quantized with an importance matrix (llama.cpp's rules for
    IQ3_XXS, IQ4_NL/IQ4_XS and Q4_0/Q5_0 differ with one); without one, a tensor assigned a type
    llama.cpp refuses to write unweighted (:data:`NEEDS_IMATRIX`) raises InputError.

    Returns a dict keyed by tensor name, in the order of ``tensors``.
    """
    preset = preset if isinstance(preset, Preset) else preset_from_name(preset)
    if len({t.name for t in tensors}) != len(tensors):
        raise InputError("tensor names must be unique")
    patterns = _compile_overrides(overrides)
    for pattern, regex, _ in patterns:  # a typo would otherwise change nothing, silently
        if not any(regex.search(t.name) for t in tensors):
            warnings.warn(f"--tensor-type {pattern!r} matches no tensor of this model, so it changes nothing; the "
                          "names are GGUF's (blk.0.ffn_down.weight...): 'edgekit inspect ARTIFACT --tensors' lists them",
                          stacklevel=2)
    state = MixState(preset, arch, tensors, has_imatrix)
    chosen = {t.name: _assign_one(t, preset, state, patterns) for t in llama_order(tensors)}
    if not has_imatrix:
        _require_imatrix(chosen, preset)
    return {t.name: chosen[t.name] for t in tensors}


def _require_imatrix(chosen: Mapping[str, Assignment], preset: Preset) -> None:
    """Types llama.cpp will not write without an importance matrix (IQ1/IQ2 lattices, and what IQ3_XXS and IQ2 mixes
    put on some tensors): refused, naming what the user asked for (``--type`` or a ``--tensor-type``) and both
    ways to give importances."""
    needy = [n for n, a in chosen.items()
             if a.type in NEEDS_IMATRIX and tensor_category(n) not in ("token_embd", "output")]
    if not needy:
        return
    name, a = needy[0], chosen[needy[0]]
    asked = f"--tensor-type {a.pattern}={a.type.name}" if a.origin == "override" else f"--type {preset.name}"
    what = f"{a.type.name} ({name}, ...)" if asked.endswith(a.type.name) else f"the {a.type.name} its mix puts on {name}"
    raise InputError(f"{asked} needs an importance matrix: llama.cpp will not write {what} without one; give one "
                     "with --imatrix FILE (llama-imatrix's output), or have convert compute one from calibration "
                     "data with --method imatrix (or gptq/awq)")


def _assign_one(
    info: TensorInfo,
    preset: Preset,
    state: MixState,
    patterns: list[tuple[str, re.Pattern[str], GGMLQuantizationType]],
) -> Assignment:
    if not is_quantizable(info):
        return Assignment(info.source_type, "kept")
    if preset.base in _FLOAT_TYPES:
        return Assignment(preset.base, "preset")
    hit = next((p for p in patterns if p[1].search(info.name)), None)
    if hit is not None:
        origin, pattern, wanted = "override", hit[0], hit[2]
    else:
        origin, pattern, wanted = "preset", None, state.mix_type(info)
    qtype, reason = fallback(info, wanted)
    if reason is None:
        return Assignment(qtype, origin, pattern=pattern)
    return Assignment(qtype, origin, wanted=wanted, reason=reason, pattern=pattern)

# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def _lookup(name: str, table: Mapping[str, _V], what: str) -> _V:
    key = name.strip().upper()
    if key not in table:
        raise UnsupportedError(f"unknown {what} {name!r}; valid: {', '.join(table)}")
    return table[key]


def type_from_name(name: str) -> GGMLQuantizationType:
    """The GGML type called ``name`` (case-insensitive), e.g. ``"q6_k"`` -> ``Q6_K``."""
    return _lookup(name, WRITABLE_TYPES, "tensor type")


def preset_from_name(name: str) -> Preset:
    """The preset called ``name`` (case-insensitive; ``Q4_K`` is ``Q4_K_M`` as in llama-quantize)."""
    key = name.strip().upper()
    return _lookup(PRESET_ALIASES.get(key, key), PRESETS, "quantization preset")


def preset_for_bits(bits: int) -> Preset:
    """The preset ``--bits N`` stands for (see :data:`BITS_TO_PRESET`)."""
    if bits not in BITS_TO_PRESET:
        raise UnsupportedError(
            f"--bits {bits} is not supported; valid: {', '.join(map(str, BITS_TO_PRESET))}"
        )
    return PRESETS[BITS_TO_PRESET[bits]]


def parse_override(text: str) -> tuple[str, GGMLQuantizationType]:
    """Split a ``--tensor-type REGEX=TYPE`` argument (at the first ``=``, as llama-quantize does).

    The regex is lower-cased, as llama-quantize does, since GGUF tensor names are lower case.
    """
    pattern, sep, type_name = text.partition("=")
    if not sep or not pattern or not type_name:
        raise InputError(f"--tensor-type {text!r} must look like REGEX=TYPE, e.g. 'attn_v=Q8_0'")
    return pattern.lower(), type_from_name(type_name)

# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------


def tensor_nbytes(info: TensorInfo, qtype: GGMLQuantizationType) -> int:
    """Bytes of ``info``'s data stored as ``qtype`` (rows of whole blocks, like ``ggml_row_size``)."""
    block, size = GGML_QUANT_SIZES[qtype]
    if info.shape[0] % block:
        raise InputError(
            f"{info.name}: row width {info.shape[0]} does not fit {qtype.name} blocks of {block}"
        )
    return info.shape[0] // block * size * prod(info.shape[1:])


def nominal_bpw(tensors: Sequence[TensorInfo], assignments: Mapping[str, Assignment]) -> float:
    """Bits per weight of the tensor data over all tensors (what llama-quantize prints as BPW)."""
    n_bits = sum(8 * tensor_nbytes(t, assignments[t.name].type) for t in tensors)
    n_elements = sum(t.n_elements for t in tensors)
    return n_bits / n_elements if n_elements else 0.0
