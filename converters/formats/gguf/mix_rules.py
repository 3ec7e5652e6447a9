"""The vocabulary of a GGUF type mix and llama.cpp's per-tensor rules behind it: the tensor, preset and
architecture facts the rules read (:class:`TensorInfo`, :class:`Preset`, :class:`ArchInfo`), the type chosen
(:class:`Assignment`), tensor categories (``tensor_get_category``), the layer-selecting rule tables of each
preset (``llama_tensor_get_type_impl``) with the per-category counters llama.cpp keeps (:class:`MixState`),
and the fallback for rows that do not fit a block (``tensor_type_fallback``).

:mod:`.mixes` puts them together (:func:`~.mixes.assign_types`) with the presets, names and sizes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from math import prod

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from edgekit.errors import InputError, UnsupportedError

T = GGMLQuantizationType

# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """One llama.cpp quantization preset.

    ``name``: as ``llama-quantize`` prints it. ``base``: the type most weights get.
    ``ftype``: the ``llama_ftype`` enum value to pass to ``llama_model_quantize`` and to store
    in ``general.file_type``. ``description``: a one-line summary for listings.
    """

    name: str
    base: GGMLQuantizationType
    ftype: int
    description: str


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as it will appear in the GGUF file.

    ``name``: the GGUF name (``blk.3.ffn_down.weight``). ``shape``: GGUF order, row width
    (ne0) first. ``source_type``: the type it has before quantizing; tensors llama.cpp never
    quantizes (norms, biases, ...) keep it.
    """

    name: str
    shape: tuple[int, ...]
    source_type: GGMLQuantizationType = T.F32

    @property
    def n_dims(self) -> int:
        """Dimensions as ggml counts them: trailing sizes of 1 do not count (``ggml_n_dims``)."""
        dims = len(self.shape)
        while dims > 1 and self.shape[dims - 1] == 1:
            dims -= 1
        return max(dims, 1)

    @property
    def n_elements(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class ArchInfo:
    """The model facts the mix rules look at.

    ``n_layer``: number of blocks (``block_count``). ``n_head`` / ``n_head_kv``: attention heads
    and key/value heads; their ratio (GQA factor) decides ``attn_v`` for Q2_K. ``n_expert``: 0
    for dense models. ``tied_embeddings``: ``token_embd`` is also the output head; ``None``
    means "decide as llama.cpp does": tied when the tensor list has no ``output.weight``.
    ``arch``: the GGUF architecture name; ``falcon`` has its own rules, and a few architectures
    at 80 layers are "70B" models whose ``attn_v`` gets more bits.
    """

    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    tied_embeddings: bool | None = None
    arch: str = "llama"

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0


@dataclass(frozen=True)
class Assignment:
    """The type chosen for one tensor.

    ``type``: what gets written. ``origin``: ``"kept"`` (llama.cpp does not quantize this
    tensor; it keeps its source type), ``"preset"`` (the preset's rules chose it) or
    ``"override"`` (a ``--tensor-type`` pattern chose it; ``pattern`` says which).
    ``wanted`` and ``reason``: set only when the row width did not fit the chosen type's block
    and a fallback type was written instead; ``wanted`` is the type that did not fit.
    """

    type: GGMLQuantizationType
    origin: str
    wanted: GGMLQuantizationType | None = None
    reason: str | None = None
    pattern: str | None = None

    @property
    def fell_back(self) -> bool:
        return self.wanted is not None

# --------------------------------------------------------------------------------------------
# Tensor categories (tensor_get_category)
# --------------------------------------------------------------------------------------------

_EXACT_CATEGORY = {
    "output.weight": "output",
    "token_embd.weight": "token_embd",
    "per_layer_token_embd.weight": "token_embd",
}
# Checked in order: the first substring found decides.
_SUBSTRING_CATEGORY = (
    ("attn_qkv.weight", "attn_qkv"),
    ("attn_kv_b.weight", "attn_kv_b"),
    ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"),
    ("attn_q.weight", "attn_q"),
    ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"),
    ("ffn_gate", "ffn_gate"),
    ("ffn_down", "ffn_down"),
)
# A fused QKV (or MLA's kv_b) carries the values, so llama.cpp gives it the attn_v treatment,
# counter included.
_RULE_GROUP = {"attn_qkv": "attn_v", "attn_kv_b": "attn_v"}


def tensor_category(name: str) -> str:
    """The rule category of a tensor name: ``attn_v``, ``ffn_down``, ``output``, ... or ``other``."""
    if name in _EXACT_CATEGORY:
        return _EXACT_CATEGORY[name]
    return next((cat for part, cat in _SUBSTRING_CATEGORY if part in name), "other")

# --------------------------------------------------------------------------------------------
# Mix rules (llama_tensor_get_type_impl, for the presets above)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Where:
    """Where a tensor sits for the layer-selecting rules: ``i`` of ``n`` (0-based)."""

    i: int
    n: int
    n_gqa: int
    n_expert: int = 0
    imatrix: bool = False


def _use_more_bits(i: int, n: int) -> bool:
    # llama.cpp's choice of "important" layers: the first and last eighth, plus every third
    # layer in between.
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


_CONDITIONS: dict[str, Callable[[_Where], bool]] = {
    "always": lambda w: True,
    "more_bits": lambda w: _use_more_bits(w.i, w.n),
    "first_8th": lambda w: w.i < w.n // 8,
    "first_16th": lambda w: w.i < w.n // 16,
    "first_2": lambda w: w.i < 2,
    "first_4": lambda w: w.i < 4,
    "gqa_4": lambda w: w.n_gqa >= 4,
    "gqa_4_or_moe_4": lambda w: w.n_gqa >= 4 or w.n_expert >= 4,
    "moe_8": lambda w: w.n_expert == 8,
    "middle": lambda w: w.n // 8 <= w.i < 7 * w.n // 8,
    "no_imatrix": lambda w: not w.imatrix,
    "first_8th_no_imatrix": lambda w: w.i < w.n // 8 and not w.imatrix,
    "first_8th_imatrix": lambda w: w.i < w.n // 8 and w.imatrix,
    "first_8th_or_moe_8_more_bits": lambda w: w.i < w.n // 8 or (w.n_expert == 8 and _use_more_bits(w.i, w.n)),
}

Rules = tuple[tuple[str, GGMLQuantizationType], ...]
"""Ordered (condition, type) pairs; the first condition that holds gives the type."""

_MORE_BITS_Q6: Rules = (("more_bits", T.Q6_K),)

# preset -> rule group -> rules, for every architecture but Falcon. Missing: the base type.
# attn_v and ffn_down count "i of n" by their own per-category counters; attn_output has no
# layer-dependent rule.
_MIX_RULES: dict[str, dict[str, Rules]] = {
    "Q2_K": {
        "attn_v": (("gqa_4", T.Q4_K), ("always", T.Q3_K)),
        "ffn_down": (("always", T.Q3_K),),
        "attn_output": (("always", T.Q3_K),),
    },
    "Q3_K_M": {
        "attn_v": (("first_2", T.Q5_K), ("always", T.Q4_K)),
        "ffn_down": (("first_16th", T.Q5_K), ("always", T.Q4_K)),
        "attn_output": (("always", T.Q4_K),),
    },
    "Q3_K_L": {
        "attn_v": (("always", T.Q5_K),),
        "ffn_down": (("always", T.Q5_K),),
        "attn_output": (("always", T.Q5_K),),
    },
    "Q4_K_S": {
        "attn_v": (("first_4", T.Q5_K),),
        "ffn_down": (("first_8th", T.Q5_K),),
    },
    "Q4_K_M": {"attn_v": _MORE_BITS_Q6, "ffn_down": _MORE_BITS_Q6},
    "Q5_K_M": {"attn_v": _MORE_BITS_Q6, "ffn_down": _MORE_BITS_Q6},
    # an untied token embedding is only looked up, never multiplied: Q4_K (llama_tensor_get_type)
    "TQ1_0": {"token_embd": (("always", T.Q4_K),)},
    "TQ2_0": {"token_embd": (("always", T.Q4_K),)},
    # with an imatrix, llama.cpp guards the first ffn_down layers of Q4_0/Q5_0 with the _1 types
    "Q4_0": {"ffn_down": (("first_8th_imatrix", T.Q4_1),)},
    "Q5_0": {"ffn_down": (("first_8th_imatrix", T.Q5_1),)},
    "IQ3_XXS": {
        "attn_v": (("gqa_4", T.Q4_K), ("no_imatrix", T.IQ3_S)),
        "attn_k": (("always", T.IQ2_S),),
        "attn_q": (("always", T.IQ2_S),),
        "ffn_down": (("first_8th_no_imatrix", T.Q4_K), ("no_imatrix", T.Q3_K)),
        "attn_output": (("always", T.IQ3_S),),
        "token_embd": (("always", T.IQ3_S),),
    },
    "IQ3_XS": {
        "attn_v": (("gqa_4", T.Q4_K),),
        "attn_k": (("always", T.IQ3_XXS),),
        "attn_q": (("always", T.IQ3_XXS),),
        "ffn_gate": (("middle", T.IQ3_XXS),),
        "ffn_up": (("middle", T.IQ3_XXS),),
    },
    "IQ3_S": {"attn_v": (("gqa_4", T.Q4_K),)},
    "IQ3_M": {
        "attn_v": (("always", T.Q4_K),),
        "ffn_down": (("first_8th_or_moe_8_more_bits", T.Q4_K),),
        "attn_output": (("always", T.Q4_K),),
    },
    "IQ4_NL": {"attn_v": (("gqa_4", T.Q5_K),), "ffn_down": (("first_8th_no_imatrix", T.Q5_K),)},
    "IQ4_XS": {"attn_v": (("gqa_4", T.Q5_K),), "ffn_down": (("first_8th_no_imatrix", T.Q5_K),)},
}

# The 2-bit i-quant presets have a branch of their own in llama.cpp: no 70B bump, no 8-expert Q8_0.
# (attn_v's "n_gqa >= 4 or >= 4 experts" rule, the first eighth of ffn_down, and attn_output.)
_LOW_IQ_RULES: dict[str, dict[str, Rules]] = {
    name: {
        "attn_v": (("gqa_4_or_moe_4", T.Q4_K), ("always", hi)),
        "attn_k": (("moe_8", T.Q4_K),),
        "ffn_down": (("first_8th", hi),),
        "attn_output": (("moe_8", T.Q5_K), *((("always", out),) if out else ())),
        "token_embd": (("always", hi),),
    }
    for name, hi, out in (("IQ2_XXS", T.Q2_K, None), ("IQ2_XS", T.Q2_K, None), ("IQ2_S", T.IQ3_S, T.IQ3_S),
                          ("IQ2_M", T.IQ3_S, T.IQ3_S), ("IQ1_S", T.Q2_K, T.IQ2_XXS), ("IQ1_M", T.Q2_K, T.IQ2_XXS))
}
# their output head (or tied embedding) gets Q5_K when its rows fit, not Q6_K
_LOW_IQ_OUTPUT = T.Q5_K

# Falcon has its own ffn_down and attn_output rules (its attn_v rules are the common ones); a
# preset missing here leaves those two groups at the base type on Falcon.
_FALCON_GROUPS = ("ffn_down", "attn_output")
_FALCON_RULES: dict[str, dict[str, Rules]] = {
    # the i-quant and imatrix Q4_0/Q5_0 ffn_down rules do not depend on the architecture
    **{p: {"ffn_down": r["ffn_down"]} for p, r in _MIX_RULES.items()
       if (p.startswith("IQ") or p in ("Q4_0", "Q5_0")) and "ffn_down" in r},
    "Q2_K": {"ffn_down": (("always", T.Q3_K),)},
    "Q3_K_M": {"ffn_down": (("first_16th", T.Q5_K), ("more_bits", T.Q4_K), ("always", T.Q3_K))},
    "Q3_K_L": {"ffn_down": (("always", T.Q4_K),), "attn_output": (("always", T.Q4_K),)},
    "Q4_K_M": {"ffn_down": (("first_16th", T.Q6_K), ("more_bits", T.Q5_K), ("always", T.Q4_K))},
    "Q5_K_M": {"ffn_down": _MORE_BITS_Q6},
}

# Models with exactly 8 experts (Mixtral-like): attn_v and attn_k are small next to the experts,
# so llama.cpp makes them Q8_0; attn_output gets Q5_K in the low-bit mixes, and the dense
# attn_output rules do not apply.
_EIGHT_EXPERT_TYPE = {"attn_v": T.Q8_0, "attn_k": T.Q8_0}
_EIGHT_EXPERT_ATTN_OUTPUT_Q5K = {"Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "IQ3_XS", "IQ3_XXS", "IQ4_NL",
                                 "IQ3_S", "IQ3_M", "IQ4_XS"}

# llama.cpp marks these (architecture, n_layer) models "70B" and bumps their attn_v from
# Q3_K/Q4_K to Q5_K: 8 query heads share each attn_v head, so it is cheap. For llama, only when
# it uses GQA (n_head != n_head_kv); otherwise it is the 65B.
_70B_LAYERS = {"llama": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}
_70B_BUMP = {T.Q3_K: T.Q5_K, T.Q4_K: T.Q5_K}


def _is_70b(arch: ArchInfo) -> bool:
    if _70B_LAYERS.get(arch.arch) != arch.n_layer:
        return False
    return arch.arch != "llama" or arch.n_head != arch.n_head_kv


def _first_match(rules: Rules, where: _Where, default: GGMLQuantizationType) -> GGMLQuantizationType:
    return next((qtype for cond, qtype in rules if _CONDITIONS[cond](where)), default)

# --------------------------------------------------------------------------------------------
# Fallback for rows that do not fit the block (tensor_type_fallback)
# --------------------------------------------------------------------------------------------

# 256-wide types -> a 32-wide type of similar or better quality.
_FALLBACK: dict[GGMLQuantizationType, GGMLQuantizationType] = {
    **dict.fromkeys((T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_XS), T.IQ4_NL),
    **dict.fromkeys((T.Q2_K, T.Q3_K, T.TQ1_0, T.TQ2_0), T.Q4_0),
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
}
# When even the fallback's block does not divide the row (width not a multiple of 32); a --bpw budget
# writes such rows in it too (budget.candidates).
LAST_RESORT = T.F16


def block_size(qtype: GGMLQuantizationType) -> int:
    """Elements per block of ``qtype`` (1 for float types)."""
    return GGML_QUANT_SIZES[qtype][0]


def fallback(info: TensorInfo, wanted: GGMLQuantizationType) -> tuple[GGMLQuantizationType, str | None]:
    """The type to write for ``wanted`` on this tensor's rows, and why it differs (or None)."""
    ncols = info.shape[0]
    block = block_size(wanted)
    if ncols % block == 0:
        return wanted, None
    reason = f"row width {ncols} is not a multiple of {block} ({wanted.name}'s block size)"
    if wanted in _FALLBACK:
        chosen = _FALLBACK[wanted]
    elif block <= 32:
        chosen = wanted  # already a 32-wide type: nothing smaller to try, so F16 below
    else:
        raise UnsupportedError(f"{info.name}: {reason}, and llama.cpp defines no fallback for {wanted.name}")
    if ncols % block_size(chosen) != 0:
        reason += f", nor of {block_size(chosen)}" if chosen != wanted else ""
        chosen = LAST_RESORT
    return chosen, reason

# --------------------------------------------------------------------------------------------
# The assignment
# --------------------------------------------------------------------------------------------


_LAYER_RE = re.compile(r"^blk\.([+-]?\d+)")


def _layer_of(name: str) -> int:
    match = _LAYER_RE.match(name)
    return int(match.group(1)) if match else -1


def llama_order(tensors: Iterable[TensorInfo]) -> list[TensorInfo]:
    # llama.cpp walks tensors sorted by block number (non-block tensors first), then by name; the
    # attn_v / ffn_down counters below depend on this order.
    return sorted(tensors, key=lambda t: (_layer_of(t.name), t.name))


class MixState:
    """Per-file state of the mix rules: the per-category counters llama.cpp keeps."""

    def __init__(self, preset: Preset, arch: ArchInfo, tensors: Sequence[TensorInfo], has_imatrix: bool = False) -> None:
        self.preset = preset
        self.arch = arch
        self.imatrix = has_imatrix
        names = {t.name for t in tensors}
        self.tied = arch.tied_embeddings if arch.tied_embeddings is not None else "output.weight" not in names
        # attn_v's "n" is the number of attn_v-like tensors; ffn_down's is the layer count.
        n_v = sum(_RULE_GROUP.get(c, c) == "attn_v" for c in map(tensor_category, names))
        self.totals = {"attn_v": n_v, "ffn_down": arch.n_layer, "ffn_gate": arch.n_layer, "ffn_up": arch.n_layer}
        self.seen = {"attn_v": 0, "ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}

    def _where(self, group: str, name: str) -> _Where:
        i = self.seen.get(group, 0)  # attn_output has no layer rule, so no counter
        if group in ("ffn_down", "ffn_gate", "ffn_up") and self.arch.n_expert > 1:
            # MoE files do not list experts layer by layer, so llama.cpp reads the block number.
            i = _layer_of(name)
            if not 0 <= i < self.arch.n_layer:
                raise InputError(f"{name}: cannot tell which of {self.arch.n_layer} layers it belongs to")
        return _Where(i, self.totals.get(group, 0), self.arch.n_gqa, self.arch.n_expert, self.imatrix)

    def mix_type(self, info: TensorInfo) -> GGMLQuantizationType:
        """The preset's type for a quantizable tensor, before any row-width fallback."""
        category = tensor_category(info.name)
        if category == "output" or (category == "token_embd" and self.tied):
            return self._output_type(info)
        group = _RULE_GROUP.get(category, category)
        qtype = self._rule_type(group, info.name)
        if group in self.seen:
            self.seen[group] += 1
        return qtype

    def _output_type(self, info: TensorInfo) -> GGMLQuantizationType:
        # The output head is the most sensitive matrix: Q6_K, unless the preset is already Q8_0,
        # or its rows do not fit the base block (then Q8_0 directly, no fallback). Falcon: Q8_0.
        base = self.preset.base
        if self.arch.arch == "falcon" or info.shape[0] % block_size(base) != 0:
            return T.Q8_0
        if self.preset.name in _LOW_IQ_RULES or self.preset.name == "IQ3_XXS":
            return _LOW_IQ_OUTPUT
        return base if base == T.Q8_0 else T.Q6_K

    def _rule_type(self, group: str, name: str) -> GGMLQuantizationType:
        base, arch = self.preset.base, self.arch
        if self.preset.name in _LOW_IQ_RULES:
            rules = _LOW_IQ_RULES[self.preset.name].get(group, ())
            return _first_match(rules, self._where(group, name), base) if rules else base
        if group == "token_embd":
            rules = _MIX_RULES.get(self.preset.name, {}).get(group, ())
            return _first_match(rules, self._where(group, name), base) if rules else base
        if arch.n_expert == 8 and group in _EIGHT_EXPERT_TYPE:
            return _EIGHT_EXPERT_TYPE[group]  # wins over the attn_v rules and the 70B bump
        if group == "attn_output" and arch.n_expert == 8 and arch.arch != "falcon":
            return T.Q5_K if self.preset.name in _EIGHT_EXPERT_ATTN_OUTPUT_Q5K else base
        table = _FALCON_RULES if arch.arch == "falcon" and group in _FALCON_GROUPS else _MIX_RULES
        rules = table.get(self.preset.name, {}).get(group, ())
        qtype = _first_match(rules, self._where(group, name), base) if rules else base
        if group == "attn_v" and _is_70b(arch):
            qtype = _70B_BUMP.get(qtype, qtype)
        return qtype
