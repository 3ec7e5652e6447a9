"""Reading an MLC artifact back: its config, its tensor cache as weights, and ``edgekit inspect``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

import edgekit.converters.formats.mlc.layout as layout
from edgekit.converters.formats.base import tensor_summary
from edgekit.converters.formats.mlc.cache import load_cache, read_cache_json
from edgekit.converters.formats.mlc.options import QUANTS
from edgekit.errors import CorruptFileError, UnsupportedError


def read_chat_config(folder: Path) -> dict[str, Any]:
    p = Path(folder) / "mlc-chat-config.json"
    try:
        cfg = json.loads(p.read_text())
        for key in ("model_type", "quantization", "model_config"):
            if key not in cfg:
                raise ValueError(f"no {key!r}")
    except FileNotFoundError:
        raise CorruptFileError(f"{folder} has no mlc-chat-config.json; re-run 'edgekit convert --to mlc'") from None
    except (ValueError, UnicodeDecodeError, TypeError) as exc:
        raise CorruptFileError(f"{p} is not a valid MLC chat config ({exc}); re-run 'edgekit convert --to mlc'") from exc
    if cfg["quantization"] not in QUANTS:
        raise UnsupportedError(f"MLC quantization {cfg['quantization']!r} is not read here; edgekit reads "
                               f"{', '.join(QUANTS)}")
    return cfg


def load_weights(folder: Path, use_tvm: bool | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray], str]:
    """The chat config, every Hugging Face tensor of the model (float32, dequantized exactly as MLC's
    kernels decode them, fused projections split back), and which reader read the shards ("tvm" when
    apache-tvm is installed and ``use_tvm`` is not False, else "numpy")."""
    cfg = read_chat_config(folder)
    arrays, reader = None, "numpy"
    if use_tvm is not False:
        try:
            from edgekit.converters.formats.mlc.cache import load_cache_tvm

            arrays, reader = load_cache_tvm(folder), "tvm"
        except ImportError:
            if use_tvm:
                raise
    if arrays is None:
        arrays = load_cache(folder)
    mode = QUANTS[cfg["quantization"]]
    mc = cfg["model_config"]
    hf_cfg = layout.hf_config(cfg["model_type"], mc)
    from edgekit.arch import HParams

    hp = HParams.from_config(hf_cfg, "mlc-chat-config.json")
    arch = layout.ARCHS[hf_cfg["architectures"][0]]
    grid = None
    if mode.grid is not None:
        from edgekit.converters.quantize.grids import as_grid

        grid = as_grid(mode.grid)
    out: dict[str, np.ndarray] = {}
    for p in layout.params(arch, hp):
        w = _param(arrays, p, grid, mode.layout, hp)
        sizes = layout.split_sizes(p, hp)
        parts = np.split(w, np.cumsum(sizes)[:-1], axis=0) if sizes else [w]
        if sum(x.shape[0] for x in parts) != w.shape[0] or len(parts) != len(p.sources):
            raise CorruptFileError(f"{p.name} has {w.shape[0]} rows, not those of {', '.join(p.sources)}")
        out.update(zip(p.sources, parts, strict=True))
    return cfg, out, reader


def _param(arrays: dict[str, np.ndarray], p: layout.Param, grid: Any, mlc_layout: str, hp: Any) -> np.ndarray:
    from edgekit.converters.quantize import mlcgroup

    try:
        if p.kind == "float" or grid is None:
            return np.asarray(arrays[p.name], dtype=np.float32)
        wn, sn = layout.quantized_names(p.name)
        qw, qs = arrays[wn], arrays[sn]
    except KeyError as exc:
        raise CorruptFileError(f"the MLC tensor cache lacks {exc.args[0]}; re-run 'edgekit convert --to mlc'") from None
    if mlc_layout == "KN" and p.kind == "linear":
        qw, qs = qw.T, qs.T
    k = layout.in_features(p, hp)
    if qs.shape[1] != grid.groups(k) or qw.shape[1] != grid.groups(k) * grid.words:
        raise CorruptFileError(f"{p.name}: q_weight {tuple(qw.shape)} / q_scale {tuple(qs.shape)} do not fit rows of "
                               f"{k} weights in {grid.name}; the artifact is damaged")
    return mlcgroup.dequantize_split(grid, np.ascontiguousarray(qw), np.ascontiguousarray(qs), k)


def describe_mlc(art: Any, ctx: int = 4096) -> dict[str, Any]:
    """What ``edgekit inspect`` shows, read from the artifact's own files: the chat config and each record
    of the tensor cache (name, dtype-derived type, shape, bytes), the size, and memory at ``ctx`` (weights
    plus MLC's fp16 KV cache)."""
    folder = Path(art.path)
    cfg = read_chat_config(folder)
    cache = read_cache_json(folder)
    mode = QUANTS[cfg["quantization"]]
    mc = cfg["model_config"]
    tensors = []
    for shard in cache["records"]:
        for rec in shard["records"]:
            quant = rec["name"].endswith((".q_weight", ".q_scale"))
            tensors.append({"name": rec["name"], "type": mode.grid if quant and mode.grid else rec["dtype"],
                            "shape": list(rec["shape"]), "bytes": int(rec["nbytes"]), "shard": shard["dataPath"]})
    size = sum(int(s["nbytes"]) for s in cache["records"])
    n_params = int(art.manifest.get("n_params") or 0) or _count_params(mc)
    n_kv = int(mc.get("num_key_value_heads") or mc["num_attention_heads"])
    head_dim = int(mc.get("head_dim") or mc["hidden_size"] // mc["num_attention_heads"])
    window = int(cfg.get("context_window_size") or ctx)
    used = min(ctx, window) if window > 0 else ctx
    kv = 2 * int(mc["num_hidden_layers"]) * n_kv * head_dim * used * 2
    return {
        "path": str(folder),
        "format": "mlc",
        "architecture": layout.BY_MODEL_TYPE.get(cfg["model_type"], ("?",))[0],
        "name": art.name,
        "hparams": {"block_count": mc.get("num_hidden_layers"), "embedding_length": mc.get("hidden_size"),
                    "feed_forward_length": mc.get("intermediate_size"),
                    "attention.head_count": mc.get("num_attention_heads"), "attention.head_count_kv": n_kv,
                    "vocab_size": mc.get("vocab_size"), "context_length": cfg.get("context_window_size")},
        **tensor_summary(tensors, n_params, size, size),
        "memory": {"ctx": used, "weights": size, "kv_cache": kv, "kv_type": "f16 (MLC's paged KV cache)",
                   "total": size + kv},
        "mlc": {"quantization": cfg["quantization"], "model_type": cfg["model_type"], "shards": len(cache["records"]),
                "context_window_size": cfg.get("context_window_size"),
                "prefill_chunk_size": cfg.get("prefill_chunk_size"),
                "conv_template": (cfg.get("conv_template") or {}).get("name") if isinstance(cfg.get("conv_template"), dict)
                else cfg.get("conv_template"), "tokenizer_files": cfg.get("tokenizer_files", []),
                "library": (art.manifest.get("files") or {}).get("library")},
        "preset": art.manifest.get("preset"),
        # artifacts written before the recipe recorded the mode's bits say --bits' default (4) for q0 modes too
        "recipe": {**recipe, "bits": mode.bits} if isinstance(recipe := art.manifest.get("recipe"), dict) else recipe,
        "pruned": art.manifest.get("pruned"),
        "sparsity": art.manifest.get("sparsity"),
        "eval": art.manifest.get("eval", []),
        "tensors": tensors,
    }


def _count_params(mc: dict[str, Any]) -> int:
    h, f, v, n = mc["hidden_size"], mc["intermediate_size"], mc["vocab_size"], mc["num_hidden_layers"]
    hd = mc.get("head_dim") or h // mc["num_attention_heads"]
    kv = mc.get("num_key_value_heads") or mc["num_attention_heads"]
    per = h * hd * (mc["num_attention_heads"] * 2 + 2 * kv) + 3 * h * f + 2 * h
    return int(n * per + v * h * (1 if mc.get("tie_word_embeddings") else 2) + h)
