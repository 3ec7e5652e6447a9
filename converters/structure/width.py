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
model holds at most N parameters (``heads=N`` may narrow the attention uniformly as well). The scores above
rank neurons within a block but do not compare across blocks (an early block's small contributions are
amplified by every later one: ranking all neurons of the model together cut SmolLM2's block 1 to 128 of 1536
and gave 2.9x the KL of uniform widths at the same size). So each block's cost of narrowing is measured: the
KL of the model's next-token distributions when that block alone keeps its w most important neurons, for
about a dozen widths w (multiples of 32, :func:`width_grid`), and the widths are chosen by the allocator of
the quantization budgets, minimising the summed KL within the parameter budget. Every block keeps at least
32 neurons: llama.cpp skips a block with no FFN and its attention output with it.

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


def width_grid(n_ff: int, steps: int = 12) -> list[int]:
    """The FFN widths a block may get under width:auto: multiples of :data:`CHUNK`, about ``steps`` of
    them from one chunk up to the full width."""
    step = max(CHUNK, round(n_ff / steps / CHUNK) * CHUNK)
    return sorted({*range(n_ff, 0, -step)} | {CHUNK} if n_ff > CHUNK else {n_ff})


def width_sensitivity(ckpt: HFCheckpoint, scores: dict[int, dict[str, np.ndarray]], calib: CalibConfig,
                      keep_heads: dict[int, list[int]] | None = None, seqs: int = 4, seqlen: int = 256,
                      progress: Callable[[str, int, int], None] | None = None) -> dict[int, dict[int, float]]:
    """For every block and every width of :func:`width_grid`: the KL of the model's next-token
    distributions (against the unpruned model's, on ``seqs`` calibration windows of ``seqlen`` tokens)
    when that block alone keeps only its ``width`` most important FFN neurons (the others zeroed in
    ``down_proj``, which removes them exactly). ``keep_heads``: query heads every block keeps (the rest
    zeroed in ``o_proj`` for every measurement, as uniform head pruning will remove them)."""
    import torch

    from edgekit.converters.quantize.pipeline import LayerPipeline
    from edgekit.converters.structure.heal import kl_loss

    hp = ckpt.hparams
    model, ids = LayerPipeline(calib).load(ckpt, progress)
    batch = ids[:seqs, :seqlen]
    layers = model.model.layers
    with torch.inference_mode():
        if keep_heads:
            for i, heads in keep_heads.items():
                cols = np.concatenate([np.arange(h * hp.head_dim, (h + 1) * hp.head_dim) for h in heads])
                o = layers[i].self_attn.o_proj.weight
                mask = torch.zeros(o.shape[1], dtype=torch.bool)
                mask[torch.from_numpy(cols)] = True
                o[:, ~mask] = 0
        ref = model(batch, use_cache=False).logits
        grid = width_grid(hp.n_ff)
        out: dict[int, dict[int, float]] = {}
        for i in range(hp.n_layer):
            if progress:
                progress(f"measuring the FFN widths of block {i + 1}/{hp.n_layer}", i, hp.n_layer)
            down = layers[i].mlp.down_proj.weight
            saved = down.clone()
            order = torch.from_numpy(np.argsort(-scores[i]["ffn"], kind="stable").copy())  # most important first
            out[i] = {hp.n_ff: 0.0}
            for w in grid:
                if w == hp.n_ff:
                    continue
                down.copy_(saved)
                down[:, order[w:]] = 0
                out[i][w] = float(kl_loss(torch, ref, model(batch, use_cache=False).logits))
            down.copy_(saved)
    return out


def choose_auto(spec: WidthSpec, ckpt: HFCheckpoint, scores: dict[int, dict[str, np.ndarray]],
                sensitivity: dict[int, dict[int, float]]) -> tuple[dict[int, dict[str, list[int]]], dict[str, Any]]:
    """Per-block FFN neurons kept so the model holds at most ``spec.params`` parameters, with ``spec.heads``
    applied uniformly first: each block's width is chosen from its measured curve (``sensitivity``, see
    :func:`width_sensitivity`) by the same allocator as the quantization budgets, which minimises the
    summed KL within the parameter budget; within a block the neurons kept are the most important by
    ``scores``. Returns the kept units and what was decided."""
    from edgekit.converters.quantize.allocate import Item, allocate

    hp = ckpt.hparams
    assert spec.params is not None
    keep = choose(WidthSpec(heads=spec.heads), ckpt, scores) if spec.heads else {i: {} for i in scores}
    source = n_params(ckpt)
    after_heads = source - (2 * hp.n_embd * hp.head_dim * (hp.n_head - spec.heads) * hp.n_layer if spec.heads else 0)
    per_neuron = 3 * hp.n_embd
    if spec.params >= after_heads:
        raise InputError(f"--params {spec.params / 1e6:.1f}M is not below the model's {after_heads / 1e6:.1f}M "
                         "parameters: nothing to prune; give a smaller budget")
    fixed = after_heads - per_neuron * hp.n_ff * hp.n_layer  # everything but the FFNs
    smallest = fixed + per_neuron * min(width_grid(hp.n_ff)) * hp.n_layer
    if spec.params < smallest:
        raise InputError(f"--params {spec.params / 1e6:.1f}M is below what width pruning reaches on this model "
                         f"({smallest / 1e6:.1f}M with {CHUNK} FFN neurons per block); raise it, or prune depth too")
    items = [Item(str(i), [(w, per_neuron * w, kl) for w, kl in sensitivity[i].items()]) for i in range(hp.n_layer)]
    chosen = allocate(items, spec.params - fixed)
    for i in range(hp.n_layer):
        keep[i]["ffn"] = sorted(int(j) for j in np.argsort(-scores[i]["ffn"], kind="stable")[: chosen[str(i)]])
    widths = [len(keep[i]["ffn"]) for i in range(hp.n_layer)]
    kept = fixed + per_neuron * sum(widths)
    return keep, {"ffn_widths": widths, "n_params": kept, "n_params_source": source, "params_target": spec.params,
                  "predicted_kl": round(sum(sensitivity[i][w] for i, w in enumerate(widths)), 5)}


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
