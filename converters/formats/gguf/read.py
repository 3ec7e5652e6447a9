"""Reading GGUF files: the header (metadata and tensor table) and the report ``edgekit inspect`` shows."""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.artifact import Artifact
from edgekit.converters.formats.gguf.check import check_gguf
from edgekit.errors import CorruptFileError, InputError

KV_PAD = 256  # llama.cpp rounds the KV cache size up to this many cells


def kv_cells(n_ctx: int) -> int:
    """The KV cache cells llama.cpp allocates for a context of ``n_ctx``: rounded up to :data:`KV_PAD` (its log
    at n_ctx 1000: ``n_ctx = 1024``, ``1024 cells``). ``inspect`` and the runtime's memory model both count these."""
    return -(-n_ctx // KV_PAD) * KV_PAD


def read_gguf_header(path: Path, *, check: bool = True, vocab: bool = True):
    """Open a GGUF with gguf-py and check its header (:func:`check_gguf`); a corrupt or truncated file, or
    hyperparameters no real model has, raise :class:`CorruptFileError`. ``check=False`` leaves the header
    check to the caller (who wants to refuse an unsupported architecture first). ``vocab=False``: the
    metadata and tensor table without decoding the vocabulary up front (:mod:`.header`, ~100x faster;
    string arrays decode when asked), for what only sizes a model."""
    import gguf

    from edgekit.converters.formats.gguf.header import GGUFHeader, NotCovered

    if not path.is_file():
        raise InputError(f"{path} {'is a folder' if path.is_dir() else 'does not exist'}; give a .gguf file")
    try:
        reader: Any = None
        if not vocab:
            with contextlib.suppress(NotCovered):
                reader = GGUFHeader(path)
        reader = reader or gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises ValueError/IndexError/struct errors on bad files
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise CorruptFileError(f"{path} is not a readable GGUF file ({detail}); re-download or re-convert it") from exc
    refuse_imatrix(reader, path)
    if check:
        check_gguf(reader, path)
    return reader


def is_imatrix(reader: Any) -> bool:
    """Whether a GGUF is an importance matrix (llama-imatrix's output: ``general.type`` imatrix, or no
    architecture and only ``*.in_sum2`` / ``*.counts`` tensors), not a model."""
    with contextlib.suppress(Exception):  # a field gguf-py cannot decode: check_gguf names it
        f = reader.fields.get("general.type")
        if f is not None and f.contents() == "imatrix":
            return True
        if reader.fields.get("general.architecture") is None and reader.tensors and all(
                t.name.endswith((".in_sum2", ".counts")) for t in reader.tensors):
            return True
    return False


def imatrix_given(path: Path) -> str:
    """The line for an importance matrix given where a model goes: what it is and where it goes."""
    return (f"{path} is an importance matrix (llama-imatrix's output), not a model; give it to convert with the "
            f"model it was made for: edgekit convert MODEL --imatrix {path}")


def refuse_imatrix(reader: Any, path: Path) -> None:
    if is_imatrix(reader):
        raise InputError(imatrix_given(path))


def _kv(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _largest(v: Any) -> int:
    """A hyperparameter as one number: per-layer arrays (heads that vary by layer) by their largest entry."""
    if isinstance(v, list):
        return max(v, default=0)
    return int(v or 0)


def describe_gguf(art: Artifact, ctx: int = 4096) -> dict[str, Any]:
    """What ``edgekit inspect`` shows, read from the GGUF itself (tensor table, hyperparameters) and the
    manifest (the fallbacks the converter applied); memory = weights + an f16 KV cache at ``ctx``."""
    reader = read_gguf_header(art.model_file, vocab=False)
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
    n_layer = _largest(hp["block_count"])
    n_head = _largest(hp["attention.head_count"]) or 1
    n_head_kv = _largest(hp["attention.head_count_kv"]) or n_head
    head_dim = _largest(_kv(reader, f"{arch}.attention.key_length")) or _largest(hp["embedding_length"]) // n_head
    # K and V, f16 cache (llama.cpp's default), for the cells llama.cpp allocates at ctx
    kv_bytes = 2 * n_layer * kv_cells(ctx) * n_head_kv * head_dim * 2
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
        "pruned": art.manifest.get("pruned"),
        "sparsity": art.manifest.get("sparsity"),
        "sparse_ffn": art.manifest.get("sparse_ffn"),
        "eval": art.manifest.get("eval", []),
        "tensors": tensors,
    }
