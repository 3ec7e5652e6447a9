"""MLC-LLM's parameter names and model configs, per architecture, as data.

Facts from mlc-llm's model definitions (``model/llama``, ``model/qwen2``, ``model/qwen3``) and its standard
Hugging Face loaders: Q, K and V are one fused projection (rows concatenated in that order; ``qkv_proj`` for
Llama, ``c_attn`` with a fused bias for Qwen2, ``c_attn`` without one for Qwen3, whose ``attention_bias``
is false), gate and up are one ``gate_up_proj`` (gate rows first), every other tensor keeps its Hugging
Face name (Qwen3's per-head RMSNorms ``self_attn.q_norm`` / ``self_attn.k_norm``, weights of ``head_dim``,
declared after ``o_proj``); rotary rows are not permuted (MLC's KV cache rotates halves as transformers
does). A quantized tensor ``X.weight`` becomes ``X.q_weight`` and ``X.q_scale``. The order is the model's
own parameter order (embedding, then per layer attention, MLP, norms; final norm, head).

Qwen3's ``Qwen3Config`` has no default for ``attention_bias`` and, unlike Qwen2's, does not derive
``head_dim`` from hidden / heads (its heads may be wider: Qwen3-0.6B has 16 of 128 over 1024): both are
written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgekit.arch import HParams
from edgekit.errors import UnsupportedError


@dataclass(frozen=True)
class MLCArch:
    """One architecture: ``model_type`` (MLC's model name), ``qkv`` (its fused attention projection),
    ``qkv_bias`` (Q/K/V carry biases), ``theta_key`` (the config field MLC reads rope theta from),
    ``qk_norm`` (an RMSNorm over each head of the queries and of the keys, Qwen3's)."""

    model_type: str
    qkv: str
    qkv_bias: bool
    theta_key: str
    qk_norm: bool = False


ARCHS = {
    "LlamaForCausalLM": MLCArch("llama", "qkv_proj", False, "position_embedding_base"),
    "Qwen2ForCausalLM": MLCArch("qwen2", "c_attn", True, "rope_theta"),
    "Qwen3ForCausalLM": MLCArch("qwen3", "c_attn", False, "rope_theta", qk_norm=True),
}
BY_MODEL_TYPE = {a.model_type: (hf, a) for hf, a in ARCHS.items()}


@dataclass(frozen=True)
class Param:
    """One MLC parameter: its name, the Hugging Face tensors it is made of (rows concatenated) and its kind:
    "linear", "embedding" (both quantized in group modes) or "float" (norms and biases)."""

    name: str
    sources: tuple[str, ...]
    kind: str


def arch_for(config: dict[str, Any]) -> tuple[str, MLCArch]:
    archs = config.get("architectures") or []
    for a in archs:
        if a in ARCHS:
            return a, ARCHS[a]
    raise UnsupportedError(f"MLC artifacts are written for {', '.join(ARCHS)}; this checkpoint is "
                           f"{', '.join(archs) or 'unnamed'}")


def params(arch: MLCArch, hp: HParams) -> list[Param]:
    """Every MLC parameter of the model in MLC's order (Hugging Face sources for each)."""
    out = [Param("model.embed_tokens.weight", ("model.embed_tokens.weight",), "embedding")]
    for i in range(hp.n_layer):
        hf, mlc = f"model.layers.{i}", f"model.layers.{i}"
        qkv = tuple(f"{hf}.self_attn.{p}_proj" for p in "qkv")
        out.append(Param(f"{mlc}.self_attn.{arch.qkv}.weight", tuple(f"{s}.weight" for s in qkv), "linear"))
        if arch.qkv_bias:
            out.append(Param(f"{mlc}.self_attn.{arch.qkv}.bias", tuple(f"{s}.bias" for s in qkv), "float"))
        out.append(Param(f"{mlc}.self_attn.o_proj.weight", (f"{hf}.self_attn.o_proj.weight",), "linear"))
        if arch.qk_norm:
            out += [Param(f"{mlc}.self_attn.{n}.weight", (f"{hf}.self_attn.{n}.weight",), "float")
                    for n in ("q_norm", "k_norm")]
        out += [
            Param(f"{mlc}.mlp.gate_up_proj.weight", (f"{hf}.mlp.gate_proj.weight", f"{hf}.mlp.up_proj.weight"), "linear"),
            Param(f"{mlc}.mlp.down_proj.weight", (f"{hf}.mlp.down_proj.weight",), "linear"),
            Param(f"{mlc}.input_layernorm.weight", (f"{hf}.input_layernorm.weight",), "float"),
            Param(f"{mlc}.post_attention_layernorm.weight", (f"{hf}.post_attention_layernorm.weight",), "float"),
        ]
    out.append(Param("model.norm.weight", ("model.norm.weight",), "float"))
    if not hp.tie_embeddings:
        out.append(Param("lm_head.weight", ("lm_head.weight",), "linear"))
    return out


def quantized_names(name: str) -> tuple[str, str]:
    base = name.removesuffix(".weight")
    return f"{base}.q_weight", f"{base}.q_scale"


def model_config(arch: MLCArch, config: dict[str, Any], hp: HParams, context: int, prefill: int) -> dict[str, Any]:
    """``model_config`` of mlc-chat-config.json: MLC's config dataclass for the model as ``asdict`` writes
    it (the remaining config.json keys under ``kwargs``)."""
    mine = {
        "hidden_size": hp.n_embd, "intermediate_size": hp.n_ff, "num_attention_heads": hp.n_head,
        "num_hidden_layers": hp.n_layer, "rms_norm_eps": hp.rms_eps, "vocab_size": hp.n_vocab,
        "tie_word_embeddings": hp.tie_embeddings, arch.theta_key: hp.rope_theta,
        "context_window_size": context, "prefill_chunk_size": prefill, "num_key_value_heads": hp.n_head_kv,
        "head_dim": hp.head_dim, "tensor_parallel_shards": 1, "max_batch_size": 1,
    }
    if arch.model_type == "llama":
        scaling = hp.rope_scaling if hp.rope_scaling and hp.rope_scaling.get("rope_type") == "llama3" else None
        if hp.rope_scaling and scaling is None and hp.rope_scaling.get("rope_type", "default") != "default":
            raise UnsupportedError(f"MLC's Llama supports llama3 rope scaling only; this checkpoint has "
                                   f"{hp.rope_scaling.get('rope_type')!r}")
        mine.update(rope_scaling=scaling, pipeline_parallel_stages=1, disaggregation=False)
    else:
        mine.update(hidden_act=config.get("hidden_act", "silu"), dtype="float32")
    if arch.model_type == "qwen3":  # Qwen3Config: attention_bias has no default; weight_block_size is fp8's
        mine.update(attention_bias=False, weight_block_size=None)
    used = {"max_position_embeddings", "rope_theta", "rope_parameters", "architectures"} | set(mine)
    mine["kwargs"] = {k: v for k, v in config.items() if k not in used}
    return mine


def hf_config(model_type: str, mc: dict[str, Any]) -> dict[str, Any]:
    """A transformers config.json of an MLC ``model_config`` (what the reference backend builds)."""
    if model_type not in BY_MODEL_TYPE:
        raise UnsupportedError(f"the MLC reference backend runs {', '.join(BY_MODEL_TYPE)} models; this one is "
                               f"{model_type!r}")
    hf, arch = BY_MODEL_TYPE[model_type]
    kw = dict(mc.get("kwargs") or {})
    cfg = {k: v for k, v in kw.items() if k not in ("auto_map",)}
    cfg.update({
        "architectures": [hf], "model_type": model_type, "hidden_size": mc["hidden_size"],
        "intermediate_size": mc["intermediate_size"], "num_attention_heads": mc["num_attention_heads"],
        "num_hidden_layers": mc["num_hidden_layers"], "rms_norm_eps": mc["rms_norm_eps"],
        "vocab_size": mc["vocab_size"], "tie_word_embeddings": bool(mc.get("tie_word_embeddings", False)),
        "num_key_value_heads": mc.get("num_key_value_heads") or mc["num_attention_heads"],
        "head_dim": mc.get("head_dim") or mc["hidden_size"] // mc["num_attention_heads"],
        "max_position_embeddings": mc["context_window_size"], "rope_theta": mc.get(arch.theta_key, 10000.0),
    })
    if mc.get("rope_scaling"):
        cfg["rope_scaling"] = mc["rope_scaling"]
    if arch.model_type != "llama":
        cfg.setdefault("hidden_act", mc.get("hidden_act", "silu"))
    if arch.model_type == "qwen3":
        if mc.get("attention_bias"):
            raise UnsupportedError("this MLC Qwen3 model has attention biases (attention_bias: true); the MLC "
                                   "reference backend runs Qwen3 without them, as edgekit writes it")
        cfg["attention_bias"] = False
    return cfg


def in_features(p: Param, hp: HParams) -> int:
    """Row length (K) of a matrix parameter: what its q_weight packs."""
    if p.name.endswith("o_proj.weight"):
        return hp.n_head * hp.head_dim
    if p.name.endswith("down_proj.weight"):
        return hp.n_ff
    return hp.n_embd


def split_sizes(p: Param, hp: HParams) -> list[int]:
    """Rows each Hugging Face source contributes to a fused parameter (Q, K, V or gate, up)."""
    if len(p.sources) == 3:
        return [hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim, hp.n_head_kv * hp.head_dim]
    if len(p.sources) == 2:
        return [hp.n_ff, hp.n_ff]
    return []
