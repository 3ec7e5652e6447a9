"""Width pruning: fewer FFN neurons and fewer query heads in every block, chosen by measured importance.

``width:ffn=1024,heads=6`` keeps, in every decoder block, the 1024 FFN neurons and the 6 query heads that
contribute most to the block's output on calibration data, and writes a checkpoint of the same
architecture with ``intermediate_size`` and ``num_attention_heads`` lowered (``head_dim`` written out, so
the head size stays). Importance is the norm of what a unit adds to the residual stream:

* FFN neuron ``i``: ``sqrt(E[a_i^2]) * ||W_down[:, i]||`` with ``a`` the down projection's input;
* query head ``h``: ``sqrt(sum_j E[o_j^2] * ||W_o[:, j]||^2)`` over the head's columns ``j`` of the
  output projection's input.

Query heads are removed in equal numbers from every key/value group (grouped-query attention keeps
``heads / kv_heads`` query heads per KV head), so the KV cache is unchanged and the result loads
anywhere a Llama-family model does. Widths stay whole multiples of 32 where the source's were, so the
quantization blocks still fit; pick multiples of 256 to keep K-quants.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Callable

    from edgekit.calibration import CalibConfig
    from edgekit.model import HFCheckpoint

_SIDE = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
         "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")


@dataclass(frozen=True)
class WidthSpec:
    """Target widths per block (None: unchanged)."""

    ffn: int | None = None
    heads: int | None = None

    @classmethod
    def parse(cls, text: str) -> WidthSpec:
        """``"ffn=1024,heads=6"`` (the part after ``width:``)."""
        vals: dict[str, int] = {}
        for part in text.split(","):
            key, sep, value = part.strip().partition("=")
            if not sep or key not in ("ffn", "heads"):
                raise InputError(f"width:{text}: give ffn=N and/or heads=N, e.g. width:ffn=1024,heads=6")
            try:
                vals[key] = int(value)
            except ValueError:
                raise InputError(f"width:{text}: {key} must be a whole number") from None
        if not vals:
            raise InputError("width pruning needs ffn=N and/or heads=N")
        return cls(**vals)


def check(spec: WidthSpec, ckpt: HFCheckpoint) -> None:
    hp = ckpt.hparams
    if spec.ffn is not None and not 0 < spec.ffn < hp.n_ff:
        raise InputError(f"ffn={spec.ffn}: the model's FFN width is {hp.n_ff}; give a smaller positive width")
    if spec.ffn is not None and spec.ffn % 32:
        raise InputError(f"ffn={spec.ffn} is not a multiple of 32, which every quantization block needs")
    if spec.heads is not None:
        if not 0 < spec.heads < hp.n_head:
            raise InputError(f"heads={spec.heads}: the model has {hp.n_head} query heads; give fewer")
        if spec.heads % hp.n_head_kv:
            raise InputError(f"heads={spec.heads} must be a multiple of the {hp.n_head_kv} key/value heads (each "
                             "KV head keeps the same number of query heads)")


def importance(ckpt: HFCheckpoint, calib: CalibConfig, progress: Callable[[str, int, int], None] | None = None,
               ) -> dict[int, dict[str, np.ndarray]]:
    """Per block: ``{"ffn": (n_ff,), "heads": (n_head,)}`` importance scores (see the module docstring)."""
    from edgekit.converters.quantize.pipeline import LayerPipeline

    hp = ckpt.hparams
    H = LayerPipeline(calib).float_hessians(ckpt, progress)
    out: dict[int, dict[str, np.ndarray]] = {}
    for i in range(hp.n_layer):
        down = ckpt.load(f"model.layers.{i}.mlp.down_proj.weight")
        o = ckpt.load(f"model.layers.{i}.self_attn.o_proj.weight")
        a2 = np.maximum(np.diag(H[f"blk.{i}.ffn_down.weight"]), 0.0)
        o2 = np.maximum(np.diag(H[f"blk.{i}.attn_output.weight"]), 0.0)
        ffn = np.sqrt(a2) * np.linalg.norm(down, axis=0)
        per_col = o2 * (o ** 2).sum(axis=0)
        heads = np.sqrt(per_col.reshape(hp.n_head, hp.head_dim).sum(axis=1))
        out[i] = {"ffn": ffn, "heads": heads}
    return out


def choose(spec: WidthSpec, ckpt: HFCheckpoint, scores: dict[int, dict[str, np.ndarray]]) -> dict[int, dict[str, list[int]]]:
    """The units kept in every block (sorted indices)."""
    hp = ckpt.hparams
    keep: dict[int, dict[str, list[int]]] = {}
    for i, s in scores.items():
        k: dict[str, list[int]] = {}
        if spec.ffn is not None:
            k["ffn"] = sorted(int(j) for j in np.argsort(-s["ffn"], kind="stable")[: spec.ffn])
        if spec.heads is not None:
            group, per = hp.n_head // hp.n_head_kv, spec.heads // hp.n_head_kv
            heads: list[int] = []
            for g in range(hp.n_head_kv):
                members = np.arange(g * group, (g + 1) * group)
                heads += sorted(int(h) for h in members[np.argsort(-s["heads"][members], kind="stable")[:per]])
            k["heads"] = heads
        keep[i] = k
    return keep


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def prune_width(ckpt: HFCheckpoint, spec: WidthSpec, keep: dict[int, dict[str, list[int]]], out: Path) -> Path:
    """Write ``ckpt`` narrowed to ``keep`` into the (new, empty) folder ``out``."""
    from safetensors.numpy import save_file

    hp = ckpt.hparams
    hd = hp.head_dim
    tensors: dict[str, np.ndarray] = {}
    for name in ckpt.tensors:
        w = ckpt.load(name)
        m = _LAYER.match(name)
        if m:
            k, rest = keep[int(m.group(1))], m.group(2)
            if "ffn" in k:
                idx = np.asarray(k["ffn"])
                if rest.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
                    w = w[idx]
                elif rest == "mlp.down_proj.weight":
                    w = w[:, idx]
            if "heads" in k:
                rows = np.concatenate([np.arange(h * hd, (h + 1) * hd) for h in k["heads"]])
                if rest.startswith("self_attn.q_proj."):
                    w = w[rows]
                elif rest == "self_attn.o_proj.weight":
                    w = w[:, rows]
        tensors[name] = np.ascontiguousarray(w)
    out.mkdir(parents=True, exist_ok=False)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config: dict[str, Any] = dict(ckpt.config)
    if spec.ffn is not None:
        config["intermediate_size"] = spec.ffn
    if spec.heads is not None:
        config["num_attention_heads"] = spec.heads
    config["head_dim"] = hd
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in _SIDE:
        if (ckpt.path / name).exists():
            shutil.copy2(ckpt.path / name, out / name)
    return out
