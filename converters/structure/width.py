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

``width:auto`` with ``params=N`` (``--params 100M``) gives every block its own FFN width so the whole
model holds at most N parameters (``heads=N`` may narrow the attention uniformly as well). FFN neurons
are removed in chunks of 32, the least important first, across all blocks at once: a neuron's score is
the size of what it adds to the residual stream, which every later block and the final norm read on one
scale, so scores compare across blocks; a chunk's cost is the sum of its neurons' squared scores. Every
block keeps at least 32 neurons: llama.cpp skips a block with no FFN and its attention output with it.

A checkpoint with per-block widths stays a plain Llama checkpoint of the source's FFN width, so
transformers (calibration, healing, evaluation) runs it unchanged: each block's kept neurons come first
and the rest are zero rows of gate/up and zero columns of down (they add exactly nothing), with the widths
in ``config.json`` as ``edgekit_ffn_widths``. The GGUF writer drops the zero padding and writes llama.cpp's
``deci`` architecture (per-block ``feed_forward_length``), so the file holds and runs only the kept neurons.
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


WIDTHS_KEY = "edgekit_ffn_widths"  # config.json: each block's FFN width, when they differ
CHUNK = 32  # auto widths move in whole quantization blocks


def parse_count(text: str) -> int:
    """``"100M"``, ``"1.5B"``, ``"90000000"`` -> a whole number of parameters."""
    t = str(text).strip().upper().replace("_", "")
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}
    try:
        n = float(t[:-1]) * scale[t[-1]] if t and t[-1] in scale else float(t)
    except (ValueError, KeyError):
        raise InputError(f"--params {text!r}: give a parameter count like 100M, 1.5B or 90000000") from None
    if n <= 0:
        raise InputError(f"--params {text!r} must be positive")
    return int(n)


@dataclass(frozen=True)
class WidthSpec:
    """Target widths per block (None: unchanged); ``auto``: per-block FFN widths for at most ``params``."""

    ffn: int | None = None
    heads: int | None = None
    auto: bool = False
    params: int | None = None

    @classmethod
    def parse(cls, text: str) -> WidthSpec:
        """``"ffn=1024,heads=6"`` or ``"auto,params=100M[,heads=6]"`` (the part after ``width:``)."""
        vals: dict[str, Any] = {}
        for part in text.split(","):
            key, sep, value = part.strip().partition("=")
            if key == "auto" and not sep:
                vals["auto"] = True
                continue
            if not sep or key not in ("ffn", "heads", "params"):
                raise InputError(f"width:{text}: give ffn=N and/or heads=N (width:ffn=1024,heads=6), or auto with "
                                 "--params N (width:auto --params 100M)")
            if key == "params":
                vals[key] = parse_count(value)
                continue
            try:
                vals[key] = int(value)
            except ValueError:
                raise InputError(f"width:{text}: {key} must be a whole number") from None
        if not vals:
            raise InputError("width pruning needs ffn=N and/or heads=N, or auto with --params N")
        spec = cls(**vals)
        if spec.auto and spec.params is None:
            raise InputError("width:auto needs a parameter budget: add --params N (e.g. --params 100M)")
        if spec.params is not None and not spec.auto:
            raise InputError("--params sets the budget of width:auto; use --prune width:auto --params N")
        if spec.auto and spec.ffn is not None:
            raise InputError("width:auto chooses every block's FFN width; drop ffn=N (heads=N may stay)")
        return spec


def check(spec: WidthSpec, ckpt: HFCheckpoint) -> None:
    hp = ckpt.hparams
    if hp.ffn_widths is not None:
        raise InputError("this checkpoint already has per-block FFN widths; width-prune its unpruned source")
    if spec.auto and hp.n_ff % CHUNK:
        raise InputError(f"width:auto moves FFN widths in blocks of {CHUNK}; this model's FFN width {hp.n_ff} is "
                         "not a multiple of it")
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


def n_params(ckpt: HFCheckpoint) -> int:
    """Parameters the model holds (a tied head counted once; zero padding of per-block widths not at all)."""
    hp = ckpt.hparams
    total = sum(int(np.prod(ref.shape)) for name, ref in ckpt.tensors.items()
                if not (name == "lm_head.weight" and hp.tie_embeddings))
    if hp.ffn_widths is not None:
        total -= 3 * hp.n_embd * sum(hp.n_ff - w for w in hp.ffn_widths)
    return total


def choose_auto(spec: WidthSpec, ckpt: HFCheckpoint, scores: dict[int, dict[str, np.ndarray]],
                ) -> tuple[dict[int, dict[str, list[int]]], dict[str, Any]]:
    """Per-block FFN neurons kept so the model holds at most ``spec.params`` parameters (see the module's
    docstring), with ``spec.heads`` applied uniformly first; returns the kept units and what was decided."""
    import heapq

    hp = ckpt.hparams
    assert spec.params is not None
    keep = choose(WidthSpec(heads=spec.heads), ckpt, scores) if spec.heads else {i: {} for i in scores}
    source = n_params(ckpt)
    after_heads = source - (2 * hp.n_embd * hp.head_dim * (hp.n_head - spec.heads) * hp.n_layer if spec.heads else 0)
    per_neuron = 3 * hp.n_embd
    if spec.params >= after_heads:
        raise InputError(f"--params {spec.params / 1e6:.1f}M is not below the model's {after_heads / 1e6:.1f}M "
                         "parameters: nothing to prune; give a smaller budget")
    need = -(-(after_heads - spec.params) // per_neuron)  # neurons to remove
    room = hp.n_layer * (hp.n_ff - CHUNK)
    if need > room:
        smallest = after_heads - room * per_neuron
        raise InputError(f"--params {spec.params / 1e6:.1f}M is below what width pruning reaches on this model "
                         f"({smallest / 1e6:.1f}M with {CHUNK} FFN neurons per block); raise it, or prune depth too")
    order = {i: np.argsort(s["ffn"], kind="stable") for i, s in scores.items()}  # least important first
    energy = {i: np.add.reduceat(scores[i]["ffn"][o] ** 2, np.arange(0, hp.n_ff, CHUNK)) for i, o in order.items()}
    removed = dict.fromkeys(scores, 0)  # chunks removed per block
    heap = [(float(energy[i][0]), i) for i in scores]
    heapq.heapify(heap)
    taken = 0
    while taken < max(need, 0):
        _, i = heapq.heappop(heap)
        removed[i] += 1
        taken += CHUNK
        if removed[i] < hp.n_ff // CHUNK - 1:  # at least one chunk stays
            heapq.heappush(heap, (float(energy[i][removed[i]]), i))
    for i in scores:
        keep[i]["ffn"] = sorted(int(j) for j in order[i][removed[i] * CHUNK:])
    widths = [len(keep[i]["ffn"]) for i in sorted(scores)]
    kept = after_heads - per_neuron * (hp.n_layer * hp.n_ff - sum(widths))
    return keep, {"ffn_widths": widths, "n_params": kept, "n_params_source": source, "params_target": spec.params}


_FFN_IN = re.compile(r"^blk\.(\d+)\.ffn_(gate|up)\.weight$")  # HF rows (out) are FFN neurons
_FFN_OUT = re.compile(r"^blk\.(\d+)\.ffn_down\.weight$")  # HF columns (in) are FFN neurons


def own_shape(hp: Any, gguf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF-layout shape tensor ``gguf_name`` has without the zero padding of per-block FFN widths
    (``hp.ffn_widths``; ``shape`` itself for every other tensor and model)."""
    if hp.ffn_widths is None:
        return tuple(shape)
    if m := _FFN_IN.match(gguf_name):
        return (hp.ffn_widths[int(m.group(1))], *shape[1:])
    if m := _FFN_OUT.match(gguf_name):
        return (*shape[:-1], hp.ffn_widths[int(m.group(1))])
    return tuple(shape)


def cut_padding(data: np.ndarray, rows: int, row_len: int) -> np.ndarray:
    """Encoded (or float) rows of a zero-padded FFN tensor cut to ``rows`` rows of ``row_len`` leading
    elements each: the kept neurons come first, and the widths are whole quantization blocks, so no block
    straddles the cut. Data already that size passes unchanged."""
    flat = data.reshape(data.shape[0], -1) if data.ndim > 1 else data.reshape(1, -1)
    if flat.shape == (rows, row_len):
        return data
    return np.ascontiguousarray(flat[:rows, :row_len])


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def prune_width(ckpt: HFCheckpoint, spec: WidthSpec, keep: dict[int, dict[str, list[int]]], out: Path) -> Path:
    """Write ``ckpt`` narrowed to ``keep`` into the (new, empty) folder ``out`` (per-block FFN widths for
    ``width:auto``: kept neurons first, then zero padding to the source's width; see the module's docstring)."""
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
                pad = hp.n_ff - len(idx) if spec.auto else 0
                if rest.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
                    w = np.concatenate([w[idx], np.zeros((pad, *w.shape[1:]), w.dtype)])
                elif rest == "mlp.down_proj.weight":
                    w = np.concatenate([w[:, idx], np.zeros((w.shape[0], pad), w.dtype)], axis=1)
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
    if spec.auto:
        config[WIDTHS_KEY] = [len(keep[i]["ffn"]) for i in range(hp.n_layer)]
    if spec.heads is not None:
        config["num_attention_heads"] = spec.heads
    config["head_dim"] = hd
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in _SIDE:
        if (ckpt.path / name).exists():
            shutil.copy2(ckpt.path / name, out / name)
    return out
