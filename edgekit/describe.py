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
    if art.format != "gguf":
        raise UnsupportedError(f"inspect reads GGUF artifacts; this one is {art.format!r}")
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
