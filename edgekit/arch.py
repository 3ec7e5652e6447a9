"""Per-architecture knowledge as data: Hugging Face class -> GGUF architecture, tensor-name map,
hyperparameter keys and whether Q/K rows are permuted for llama.cpp's rotary layout.

Adding a Llama-like family is one more :class:`ArchSpec` in ``ARCHITECTURES``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from edgekit.errors import CorruptFileError, UnsupportedError
from edgekit.packing import BITNET, Packing

# Hugging Face tensor name (per-layer part after "model.layers.{i}.") -> GGUF name suffix.
_LLAMA_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_QKV_BIASES = {
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
}
# Qwen3: Llama's layout (no q/k/v biases) plus an RMSNorm over each head's dimensions of the queries and keys
# (one weight of head_dim shared by the heads), applied before rotary position (llama.cpp's qwen3 graph)
_QK_NORMS = {
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# Shape of each tensor (numpy order, outer dimension first) in the dimensions config.json implies: embd
# hidden_size, q heads x head_dim, kv KV heads x head_dim, ff intermediate_size, vocab vocab_size.
_LLAMA_SHAPES: dict[str, tuple[str, ...]] = {
    "input_layernorm.weight": ("embd",),
    "post_attention_layernorm.weight": ("embd",),
    "self_attn.q_proj.weight": ("q", "embd"),
    "self_attn.k_proj.weight": ("kv", "embd"),
    "self_attn.v_proj.weight": ("kv", "embd"),
    "self_attn.o_proj.weight": ("embd", "q"),
    "mlp.gate_proj.weight": ("ff", "embd"),
    "mlp.up_proj.weight": ("ff", "embd"),
    "mlp.down_proj.weight": ("embd", "ff"),
    "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.bias": ("kv",),
    "self_attn.v_proj.bias": ("kv",),
    "model.embed_tokens.weight": ("vocab", "embd"),
    "model.norm.weight": ("embd",),
    "lm_head.weight": ("vocab", "embd"),
}
_QWEN3_SHAPES = {**_LLAMA_SHAPES, "self_attn.q_norm.weight": ("head",), "self_attn.k_norm.weight": ("head",)}
# BitNet b1.58: Llama's layout plus an RMSNorm before o_proj and before down_proj, and per-tensor scales
# that llama.cpp's bitnet architecture multiplies after each linear ("blk.N.attn_q.scale").
_BITNET_LINEARS = {k: v for k, v in _LLAMA_LAYER_TENSORS.items() if k.endswith("_proj.weight")}
_BITNET_LAYER_TENSORS = {
    **_LLAMA_LAYER_TENSORS,
    "self_attn.attn_sub_norm.weight": "attn_sub_norm.weight",
    "mlp.ffn_sub_norm.weight": "ffn_sub_norm.weight",
    **{k.replace(".weight", ".weight_scale"): v.replace(".weight", ".scale") for k, v in _BITNET_LINEARS.items()},
}
_BITNET_SHAPES = {**_LLAMA_SHAPES, "self_attn.attn_sub_norm.weight": ("q",), "mlp.ffn_sub_norm.weight": ("ff",)}
# llama.cpp's bitnet graph reads the token embedding as its output head: no separate lm_head.
_BITNET_GLOBALS = {k: v for k, v in _GLOBAL_TENSORS.items() if k != "lm_head.weight"}

# Buffers some checkpoints carry that llama.cpp recomputes.
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class ArchSpec:
    """What edgekit needs to know about one model family.

    hf_classes: ``architectures`` entries in config.json that map here.
    gguf_arch: llama.cpp's architecture name (``general.architecture``).
    layer_tensors: per-layer HF suffix -> GGUF suffix.
    permute_qk: llama.cpp's llama arch expects Q/K rows interleaved for its rotary kernel
        (the HF layout is "rotate half"); qwen2 uses the NEOX layout and needs no permutation.
    tensor_shapes: HF name (or per-layer suffix) -> its dimensions by name (see ``_LLAMA_SHAPES``),
        checked against config.json before converting.
    optional_layer_tensors: per-layer suffixes a checkpoint may leave out.
    packing: how the checkpoint stores packed weights (BitNet's four trits per byte), or None.
    gguf_extra: constant GGUF keys (without the ``arch.`` prefix) the architecture wants.
    """

    hf_classes: tuple[str, ...]
    gguf_arch: str
    layer_tensors: dict[str, str]
    permute_qk: bool
    global_tensors: dict[str, str] = field(default_factory=lambda: dict(_GLOBAL_TENSORS))
    tensor_shapes: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(_LLAMA_SHAPES))
    optional_layer_tensors: tuple[str, ...] = tuple(_QKV_BIASES)
    packing: Packing | None = None
    gguf_extra: dict[str, object] = field(default_factory=dict)

    def check_config(self, cfg: dict, source: str) -> None:
        """What the runtimes' graphs fix whatever config.json says: a packed family checks its own
        (:mod:`edgekit.packing`); the others compute SiLU-gated FFNs (llama.cpp's llama and qwen2 graphs,
        edgekit's ONNX and Core ML graphs), so another activation would convert into a different model."""
        if self.packing is not None:
            self.packing.check_config(cfg, source)
            return
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedError(
                f"{source}: hidden_act is {act!r}, but the {self.gguf_arch} graphs edgekit writes compute SiLU "
                "in the FFN, so the converted model would give different answers; edgekit converts SiLU "
                "(SwiGLU) checkpoints of this family")

    @property
    def linear_suffixes(self) -> tuple[str, ...]:
        """Per-layer suffixes of the decoder's 2-D linear weights (what ternary and QAT methods replace)."""
        return tuple(s for s in self.layer_tensors if s.endswith("_proj.weight"))

    def gguf_name(self, hf_name: str) -> str | None:
        """GGUF tensor name for a HF tensor name; None for buffers llama.cpp does not store."""
        if _IGNORED.search(hf_name):
            return None
        if hf_name in self.global_tensors:
            return self.global_tensors[hf_name]
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
        if m and m.group(2) in self.layer_tensors:
            return f"blk.{m.group(1)}.{self.layer_tensors[m.group(2)]}"
        part = m.group(2).split(".")[0] if m and m.group(2).endswith(".bias") else ""
        if part in ("self_attn", "mlp"):  # Llama's attention_bias / mlp_bias switches
            field = "attention_bias" if part == "self_attn" else "mlp_bias"
            raise UnsupportedError(
                f"config.json sets {field}: true (tensor {hf_name!r}): edgekit converts the {self.gguf_arch} family "
                "without those biases in every format, so not this checkpoint yet; run the folder itself "
                "(edgekit run FOLDER) or use a checkpoint without them")
        raise UnsupportedError(
            f"tensor {hf_name!r} is not part of the {self.gguf_arch} layout edgekit knows; "
            "the checkpoint may be a variant edgekit does not support yet"
        )


ARCHITECTURES: dict[str, ArchSpec] = {
    cls: spec
    for spec in (
        ArchSpec(("LlamaForCausalLM",), "llama", _LLAMA_LAYER_TENSORS, permute_qk=True),
        ArchSpec(("MistralForCausalLM",), "llama", _LLAMA_LAYER_TENSORS, permute_qk=True),
        ArchSpec(("Qwen2ForCausalLM",), "qwen2", {**_LLAMA_LAYER_TENSORS, **_QKV_BIASES}, permute_qk=False),
        ArchSpec(("Qwen3ForCausalLM",), "qwen3", {**_LLAMA_LAYER_TENSORS, **_QK_NORMS}, permute_qk=False,
                 tensor_shapes=_QWEN3_SHAPES, optional_layer_tensors=()),
        # llama.cpp runs bitnet with NEOX rope (HF's rotate-half): no Q/K permutation. Its converter writes a
        # linear rope scaling of factor 1.
        ArchSpec(("BitNetForCausalLM", "BitnetForCausalLM"), "bitnet", _BITNET_LAYER_TENSORS, permute_qk=False,
                 global_tensors=_BITNET_GLOBALS, tensor_shapes=_BITNET_SHAPES, optional_layer_tensors=(),
                 packing=BITNET, gguf_extra={"rope.scaling.type": "linear", "rope.scaling.factor": 1.0}),
    )
    for cls in spec.hf_classes
}

# GGUF architecture -> Hugging Face class, for `edgekit import`.
GGUF_TO_HF = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}  # bitnet: no importer yet


def supported_list() -> str:
    return ", ".join(ARCHITECTURES)


def spec_for(hf_architectures: list[str] | None) -> ArchSpec:
    """The spec for a config.json's ``architectures`` list; unsupported ones list what is supported."""
    if hf_architectures is not None and (
            not isinstance(hf_architectures, list) or not all(isinstance(a, str) for a in hf_architectures)):
        # A bare string would otherwise be iterated letter by letter.
        raise CorruptFileError(f"config.json 'architectures' must be a list of class names like "
                               f"[\"LlamaForCausalLM\"], got {hf_architectures!r:.60}; fix config.json")
    for name in hf_architectures or []:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    got = ", ".join(hf_architectures or ["(none given)"])
    raise UnsupportedError(f"architecture {got} is not supported; edgekit converts: {supported_list()}")


def permute_for_rope(w, n_head: int):
    """Reorder Q/K projection rows from HF's rotate-half layout to llama.cpp's interleaved pairs.

    Works on numpy arrays of shape (n_head * head_dim, ...) (weights or biases).
    """
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_for_rope(w, n_head: int):
    """Inverse of :func:`permute_for_rope`."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- GGUF hyperparameter keys, filled from config.json -------------------------------------

def _sliding_window(cfg: dict) -> int | None:
    """The window of the layers that attend to recent tokens only, as transformers decides which do (see
    :func:`edgekit.attention.layer_windows`); None when no layer slides."""
    from edgekit.attention import layer_windows

    windows = [w for w in layer_windows(cfg, int(cfg.get("num_hidden_layers") or 0)) if w > 0]
    return max(windows) if windows else None


@dataclass(frozen=True)
class HParams:
    """The hyperparameters every supported family shares, read from config.json."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int
    rope_theta: float
    rms_eps: float
    tie_embeddings: bool
    rope_scaling: dict | None
    # each block's own FFN width (width:auto pruning; the weights are zero-padded to n_ff), else None
    ffn_widths: tuple[int, ...] | None = None
    # attention window in tokens when some layer attends only to that many past tokens (Mistral's
    # sliding_window, Qwen2's with use_sliding_window), else None
    sliding_window: int | None = None

    @classmethod
    def from_config(cls, cfg: dict, source: str = "config.json") -> HParams:
        """Read and check ``cfg`` (types, bounds, head layout): a bad value is a :class:`CorruptFileError`
        naming the key, a missing one an :class:`UnsupportedError` (likely not a decoder-only LLM)."""
        from edgekit.validate import check_config

        check_config(cfg, source)
        try:
            n_head = int(cfg["num_attention_heads"])
            n_embd = int(cfg["hidden_size"])
            rope = cfg.get("rope_parameters") or {}
            theta = cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0
            scaling = cfg.get("rope_scaling")
            if scaling is None and rope.get("rope_type", "default") != "default":
                scaling = rope
            return cls(
                n_layer=int(cfg["num_hidden_layers"]),
                n_embd=n_embd,
                n_ff=int(cfg["intermediate_size"]),
                n_head=n_head,
                n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
                head_dim=int(cfg.get("head_dim") or n_embd // n_head),
                n_vocab=int(cfg["vocab_size"]),
                n_ctx_train=int(cfg.get("max_position_embeddings") or 2048),
                rope_theta=float(theta),
                rms_eps=float(cfg.get("rms_norm_eps") or 1e-6),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                rope_scaling=scaling,
                ffn_widths=tuple(cfg["edgekit_ffn_widths"]) if cfg.get("edgekit_ffn_widths") else None,
                sliding_window=_sliding_window(cfg),
            )
        except KeyError as exc:
            raise UnsupportedError(f"{source} lacks {exc.args[0]!r}; is this a decoder-only LLM checkpoint?") from exc

    @property
    def usable_context(self) -> int:
        """The context a llama.cpp file of this model computes it exactly for: the trained context, or the
        sliding window when that is shorter (llama.cpp's llama and qwen2 graphs attend to every past token)."""
        if self.sliding_window is not None:
            return min(self.n_ctx_train, self.sliding_window)
        return self.n_ctx_train

    @property
    def rope_kind(self) -> str | None:
        """The rope scaling's type as config.json names it (None when there is none)."""
        if not self.rope_scaling:
            return None
        return self.rope_scaling.get("rope_type") or self.rope_scaling.get("type")

    def rope_freq_factors(self):
        """Llama 3's rope scaling as llama.cpp's ``rope_freqs.weight``: one float32 per rotary pair, the
        number each base frequency is divided by (1 for short wavelengths, ``factor`` for long ones, a smooth
        blend between), so that base / factors equals transformers' llama3 inverse frequencies. None for the
        other scalings."""
        if self.rope_kind != "llama3":
            return None
        rs = self.rope_scaling
        try:
            factor, low, high = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
            float(rs["original_max_position_embeddings"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"config.json: llama3 rope scaling lacks a numeric {exc.args[0]!r}; add it "
                                   "(Llama 3.1 uses factor 8, low_freq_factor 1, high_freq_factor 4, "
                                   "original_max_position_embeddings 8192)") from exc
        if factor <= 0 or high <= low:
            raise CorruptFileError("config.json: llama3 rope scaling needs factor > 0 and high_freq_factor > "
                                   "low_freq_factor; fix rope_scaling")
        import dataclasses

        import numpy as np

        from edgekit.attention import inv_freq

        base = inv_freq(dataclasses.replace(self, rope_scaling=None), np.float32).astype(np.float64)
        return (base / inv_freq(self, np.float32).astype(np.float64)).astype(np.float32)

    def gguf_kv(self, arch: str) -> dict[str, object]:
        """``{key: value}`` for the GGUF architecture block (keys as llama.cpp reads them)."""
        kv: dict[str, object] = {
            f"{arch}.block_count": self.n_layer,
            f"{arch}.context_length": self.usable_context,
            f"{arch}.embedding_length": self.n_embd,
            f"{arch}.feed_forward_length": list(self.ffn_widths) if self.ffn_widths else self.n_ff,
            f"{arch}.attention.head_count": self.n_head,
            f"{arch}.attention.head_count_kv": self.n_head_kv,
            f"{arch}.rope.freq_base": self.rope_theta,
            f"{arch}.attention.layer_norm_rms_epsilon": self.rms_eps,
            f"{arch}.vocab_size": self.n_vocab,
            f"{arch}.rope.dimension_count": self.head_dim,
        }
        kv[f"{arch}.attention.key_length"] = self.head_dim  # written always, as llama.cpp's converter does
        kv[f"{arch}.attention.value_length"] = self.head_dim
        kind = self.rope_kind
        if kind == "linear":
            kv[f"{arch}.rope.scaling.type"] = "linear"
            if self.rope_scaling.get("factor") is None:
                raise CorruptFileError("config.json: linear rope scaling has no 'factor'; add it or remove "
                                       "rope_scaling")
            kv[f"{arch}.rope.scaling.factor"] = float(self.rope_scaling["factor"])
        elif kind == "llama3":
            if arch not in ROPE_FREQS_ARCHS:
                raise UnsupportedError(f"rope scaling 'llama3' has no form in llama.cpp's {arch} architecture; "
                                       "convert this model with --to onnx instead")
            # no keys: the per-frequency factors go in the rope_freqs.weight tensor (rope_freq_factors)
        elif kind not in (None, "default"):
            raise UnsupportedError(
                f"rope scaling {kind!r} has no exact form in GGUF (edgekit writes none, 'linear' and 'llama3'); "
                "no edgekit format converts it yet"
            )
        return kv


# llama.cpp architectures whose graphs read a rope_freqs.weight tensor (Llama 3's rope scaling)
ROPE_FREQS_ARCHS = ("llama", "deci")


# ---- AWQ scaling groups of one decoder layer ------------------------------------------------
# Read by edgekit.converters.quantize.awq. Kept apart from ArchSpec: only the calibrated AWQ path
# needs it, and the table is keyed by GGUF architecture so Llama and Mistral share one entry.

@dataclass(frozen=True)
class ScaleGroup:
    """Linears that all read one op's output, so a per-channel scale can move between them.

    AWQ multiplies the linears' input columns by ``s`` and divides ``prev``'s output channels by ``s``;
    the float layer computes the same function before and after.

    prev: module name inside a decoder layer whose output is the linears' input: an RMSNorm (its
        weight absorbs 1/s) or a Linear (its output rows and bias do).
    linears: module names of the linears reading that output; they share one input.

    A Linear ``prev`` must feed the linears channel for channel through ops that are linear per
    channel (attention's weighted sum over positions, the MLP's ``act(gate) * up``). When its output
    width differs from the linears' input width (v_proj -> o_proj under grouped-query attention, where
    one KV head feeds several query heads) the group is skipped, as AutoAWQ does.
    """

    prev: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class AWQLayout:
    """The AWQ groups of one decoder layer, in the order they are searched and applied.

    no_clip: linears whose weights the clip search leaves alone. Q and K feed the q.k product, which
        amplifies weight errors in a way the per-linear output loss does not see (AutoAWQ skips them).
    """

    groups: tuple[ScaleGroup, ...]
    no_clip: tuple[str, ...] = ()

    @property
    def linears(self) -> tuple[str, ...]:
        """Every linear of the layer that AWQ reads, in group order."""
        return tuple(name for group in self.groups for name in group.linears)


_LLAMA_AWQ = AWQLayout(
    groups=(
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),  # skipped under GQA
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
    ),
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
)

# GGUF architecture -> AWQ layout; every ArchSpec.gguf_arch in ARCHITECTURES has an entry.
# Qwen2's q/k/v biases need no entry: input-channel scaling leaves them alone, and v_proj's bias is
# divided with v_proj's output rows when v_proj is a group's ``prev``.
# Qwen3's q/k norms act per head after q_proj/k_proj, on their outputs: input-channel scaling leaves them alone.
AWQ_LAYOUTS: dict[str, AWQLayout] = {"llama": _LLAMA_AWQ, "qwen2": _LLAMA_AWQ, "qwen3": _LLAMA_AWQ}


def awq_layout(arch: str) -> AWQLayout:
    """The AWQ layout for a GGUF architecture (``"llama"``) or a Hugging Face class name."""
    gguf_arch = ARCHITECTURES[arch].gguf_arch if arch in ARCHITECTURES else arch
    if gguf_arch not in AWQ_LAYOUTS:
        raise UnsupportedError(
            f"AWQ does not know the decoder layer of {arch!r}; it supports: {', '.join(AWQ_LAYOUTS)} "
            f"({supported_list()}); use --method rtn or gptq for this model"
        )
    return AWQ_LAYOUTS[gguf_arch]
