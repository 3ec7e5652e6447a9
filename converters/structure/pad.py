"""Widen a Llama-style checkpoint's hidden size with zeros, leaving every output unchanged.

Rows whose width is not a multiple of 256 (SmolLM2's 576) make llama.cpp's 256-weight super-block
types (K-quants, i-quants) fall back to 32-weight types, so the encoders for those types are never
exercised on such a model. ``pad_hidden`` writes a function-identical copy whose hidden size is ``to``
(768 for SmolLM2, 3 x 256): a fair test vehicle for them, at the price of more bytes.

Why the function is unchanged:

* the residual stream gets ``to - hidden`` extra coordinates that start at zero (embedding columns)
  and stay zero: every matrix writing to the stream (``o_proj``, ``down_proj``) gets zero rows;
* the attention gets extra heads (the stream width over ``head_dim``) whose query, key and value rows
  are zero and whose ``o_proj`` columns are zero: they attend uniformly to zero values and add nothing.
  Key/value heads grow in proportion so the grouping of query heads is kept;
* RMSNorm divides by the root mean square over the *wider* vector: with ``k = hidden / to`` the mean
  square of a padded vector is ``k`` times the original one, so ``eps`` becomes ``k * eps`` and the
  norm weights are scaled by ``sqrt(k)`` (zero on the padding): ``x / sqrt(k*ms + k*eps) * sqrt(k)*w``
  is ``x / sqrt(ms + eps) * w``.

Equal up to float32 rounding of the rescaled norm weights and the longer sums.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgekit.errors import InputError, UnsupportedError

if TYPE_CHECKING:
    from edgekit.model import HFCheckpoint

_SIDE = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
         "generation_config.json", "chat_template.jinja")
_LAYER = re.compile(r"^model\.layers\.\d+\.(.+)$")
# tensor suffix -> (pad rows to the stream width, pad columns to the stream width); q/k/v rows grow by
# whole heads, o_proj columns by the query heads
_ROLE = {
    "self_attn.q_proj.weight": ("q", "hidden"),
    "self_attn.k_proj.weight": ("kv", "hidden"),
    "self_attn.v_proj.weight": ("kv", "hidden"),
    "self_attn.o_proj.weight": ("hidden", "q"),
    "mlp.gate_proj.weight": (None, "hidden"),
    "mlp.up_proj.weight": (None, "hidden"),
    "mlp.down_proj.weight": ("hidden", None),
    "input_layernorm.weight": ("norm", None),
    "post_attention_layernorm.weight": ("norm", None),
}
_TOP = {"model.embed_tokens.weight": (None, "hidden"), "lm_head.weight": (None, "hidden"),
        "model.norm.weight": ("norm", None)}


def _pad(a: np.ndarray, rows: int | None, cols: int | None) -> np.ndarray:
    out_shape = (rows or a.shape[0], *(() if a.ndim == 1 else (cols or a.shape[1],)))
    out = np.zeros(out_shape, dtype=a.dtype)
    out[tuple(slice(0, n) for n in a.shape)] = a
    return out


def pad_hidden(ckpt: HFCheckpoint, to: int, out: Path) -> Path:
    """Write ``ckpt`` with hidden size ``to`` (and ``to / head_dim`` attention heads) into the new folder
    ``out``; see the module docstring. Only Llama-style decoders without biases are supported."""
    from safetensors.numpy import save_file

    cfg = dict(ckpt.config)
    if cfg.get("model_type") not in ("llama", "mistral", "qwen2", "qwen3") or cfg.get("attention_bias"):
        raise UnsupportedError("pad_hidden supports Llama-style decoders without attention biases")
    hidden, n_head, n_kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or hidden // n_head
    group = n_head // n_kv
    if to <= hidden or to % head_dim or (to // head_dim) % group:
        raise InputError(f"cannot pad hidden size {hidden} to {to}: it must be larger and a multiple of "
                         f"head_dim x query heads per key/value head ({head_dim} x {group})")
    new_head = to // head_dim
    width = {"hidden": to, "q": new_head * head_dim, "kv": new_head // group * head_dim, None: None}
    k = np.float64(hidden) / np.float64(to)
    tensors = {}
    for name in ckpt.tensors:
        m = _LAYER.match(name)
        role = _ROLE.get(m.group(1)) if m else _TOP.get(name)
        if role is None:
            raise UnsupportedError(f"pad_hidden does not know how to widen {name}")
        a = ckpt.load(name)
        if role[0] == "norm":
            tensors[name] = _pad((a.astype(np.float64) * np.sqrt(k)).astype(a.dtype), to, None)
        else:
            tensors[name] = _pad(a, width[role[0]], width[role[1]])
    out.mkdir(parents=True, exist_ok=False)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.update(hidden_size=to, num_attention_heads=new_head, num_key_value_heads=new_head // group,
               head_dim=head_dim, rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6) * k))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for side in _SIDE:
        if (ckpt.path / side).exists():
            shutil.copy2(ckpt.path / side, out / side)
    return out
