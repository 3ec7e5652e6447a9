"""``edgekit inspect``: what is inside an artifact, read from the model file itself.

For GGUF: architecture and hyperparameters, parameter count, per-tensor types (with the fallbacks
the converter applied, from the manifest), file size, bits per weight, and the memory it needs at a
context length (weights + KV cache; compute buffers are the profiler's business).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from edgekit.artifact import Artifact
from edgekit.errors import UnsupportedError
from edgekit.importer import read_gguf_header


def _kv(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def describe(art: Artifact, ctx: int = 4096) -> dict[str, Any]:
    if art.format == "onnx":
        return describe_onnx(art, ctx)
    if art.format != "gguf":
        raise UnsupportedError(f"inspect reads GGUF and ONNX artifacts; this one is {art.format!r}")
    reader = read_gguf_header(art.model_file)
    arch = _kv(reader, "general.architecture")
    hp = {k: _kv(reader, f"{arch}.{k}") for k in (
        "block_count", "embedding_length", "feed_forward_length", "attention.head_count",
        "attention.head_count_kv", "context_length", "rope.freq_base", "vocab_size")}
    manifest_tensors = art.manifest.get("tensors", {})
    tensors = []
    for t in reader.tensors:
        entry = {"name": t.name, "type": t.tensor_type.name, "shape": [int(x) for x in t.shape],
                 "n_elements": int(t.n_elements), "bytes": int(t.n_bytes)}
        m = manifest_tensors.get(t.name, {})
        if "wanted" in m:
            entry["wanted"] = m["wanted"]
            entry["fallback_reason"] = m.get("fallback_reason")
        tensors.append(entry)
    n_params = sum(t["n_elements"] for t in tensors)
    weight_bytes = sum(t["bytes"] for t in tensors)
    n_layer = int(hp["block_count"] or 0)
    n_head = int(hp["attention.head_count"] or 1)
    n_head_kv = int(hp["attention.head_count_kv"] or n_head)
    head_dim = int(_kv(reader, f"{arch}.attention.key_length", 0) or (hp["embedding_length"] or 0) // n_head)
    kv_bytes = 2 * n_layer * ctx * n_head_kv * head_dim * 2  # K and V, f16 cache (llama.cpp's default)
    counts = Counter(t["type"] for t in tensors)
    fallbacks = [t for t in tensors if "wanted" in t]
    return {
        "path": str(art.model_file),
        "format": art.format,
        "architecture": arch,
        "name": _kv(reader, "general.name"),
        "hparams": hp,
        "n_params": n_params,
        "file_bytes": art.model_file.stat().st_size,
        "weight_bytes": weight_bytes,
        "bpw": round(8 * weight_bytes / n_params, 4) if n_params else 0.0,
        "type_counts": dict(counts.most_common()),
        "type_bytes": {k: int(np.sum([t["bytes"] for t in tensors if t["type"] == k])) for k in counts},
        "fallbacks": len(fallbacks),
        "fallback_summary": dict(Counter(f"{t['wanted']}->{t['type']}" for t in fallbacks)),
        "memory": {"ctx": ctx, "weights": weight_bytes, "kv_cache_f16": kv_bytes, "total": weight_bytes + kv_bytes},
        "preset": art.manifest.get("preset"),
        "recipe": art.manifest.get("recipe"),
        "eval": art.manifest.get("eval", []),
        "tensors": tensors,
    }


def describe_onnx(art: Artifact, ctx: int = 4096) -> dict[str, Any]:
    """The same report for an ONNX artifact: graph facts from the model file (opset, operators, I/O),
    tensor types from the manifest, memory = weight bytes + the KV cache in the graph's dtype."""
    import json

    from edgekit.errors import MissingDependencyError

    try:
        import onnx
    except ImportError as exc:
        raise MissingDependencyError("inspecting ONNX artifacts needs onnx: pip install 'edgekit[onnx]'") from exc
    from edgekit.converters.formats.onnx_graph import ops_used

    model = onnx.load(str(art.model_file), load_external_data=False)
    files = [art.model_file, *[art.path / f for k, f in art.manifest.get("files", {}).items() if k != "model"]]
    weight_bytes = sum(f.stat().st_size for f in files if f.exists())
    cfg_file = art.path / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    past = next((i for i in model.graph.input if i.name.startswith("past_key_values.")), None)
    elem = onnx.helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type).itemsize if past else 4
    n_layer = int(cfg.get("num_hidden_layers", 0))
    n_head = int(cfg.get("num_attention_heads", 1))
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    head_dim = int(cfg.get("head_dim") or cfg.get("hidden_size", 0) // n_head)
    kv_bytes = 2 * n_layer * ctx * n_head_kv * head_dim * elem
    from edgekit.converters.quantize.nbits import NBitsType

    def nbytes(t: dict[str, Any]) -> int:
        n = int(np.prod(t["shape"]))
        if t["type"] in ("FP32", "F32"):
            return 4 * n
        if t["type"] in ("FP16", "F16"):
            return 2 * n
        return int(n * NBitsType.parse(t["type"]).bits_per_weight / 8)

    tensors = [{"name": n, **t, "bytes": nbytes(t)} for n, t in art.manifest.get("tensors", {}).items()]
    counts = Counter(t["type"] for t in tensors)
    n_params = sum(int(np.prod(t["shape"])) for t in tensors)
    return {
        "path": str(art.model_file),
        "format": art.format,
        "architecture": (cfg.get("architectures") or ["?"])[0],
        "name": art.name,
        "hparams": {"block_count": n_layer, "embedding_length": cfg.get("hidden_size"),
                    "feed_forward_length": cfg.get("intermediate_size"), "attention.head_count": n_head,
                    "attention.head_count_kv": n_head_kv, "vocab_size": cfg.get("vocab_size"),
                    "context_length": cfg.get("max_position_embeddings")},
        "n_params": n_params,
        "file_bytes": weight_bytes,
        "weight_bytes": weight_bytes,
        "bpw": round(8 * weight_bytes / n_params, 4) if n_params else 0.0,
        "type_counts": dict(counts.most_common()),
        "type_bytes": {k: sum(t["bytes"] for t in tensors if t["type"] == k) for k in counts},
        "fallbacks": 0,
        "fallback_summary": {},
        "memory": {"ctx": ctx, "weights": weight_bytes, "kv_cache": kv_bytes, "kv_type": "f16" if elem == 2 else "f32",
                   "total": weight_bytes + kv_bytes},
        "onnx": {"opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
                 "ir_version": model.ir_version, "ops": ops_used(model),
                 "inputs": len(model.graph.input), "outputs": len(model.graph.output)},
        "preset": art.manifest.get("preset"),
        "recipe": art.manifest.get("recipe"),
        "eval": art.manifest.get("eval", []),
        "tensors": tensors,
    }
