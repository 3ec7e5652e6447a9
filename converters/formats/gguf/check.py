"""Sanity checks on a GGUF header before anything is sized from it.

A GGUF's hyperparameters drive loops and allocations downstream (transformers builds ``block_count``
layers on import; the memory model multiplies them into a KV cache), so a flipped byte can mean minutes
of work and petabyte estimates. These checks bound every hyperparameter edgekit reads, tie
``block_count`` to the ``blk.N`` tensors actually present, and every tensor's data to the file's size.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from edgekit.errors import CorruptFileError

# Upper bounds far above any released model (the largest have ~200 layers, 128 heads, 1M-token contexts).
_INT_BOUNDS: dict[str, tuple[int, int]] = {
    "block_count": (1, 4096),
    "embedding_length": (1, 1 << 20),
    "feed_forward_length": (0, 1 << 22),
    "attention.head_count": (0, 16384),
    "attention.head_count_kv": (0, 16384),
    "attention.key_length": (1, 1 << 16),
    "attention.value_length": (1, 1 << 16),
    "context_length": (1, 1 << 28),
    "vocab_size": (1, 1 << 24),
    "expert_count": (0, 1 << 16),
    "expert_used_count": (0, 1 << 16),
    "rope.dimension_count": (0, 1 << 16),
}
_FLOAT_KEYS = ("rope.freq_base", "attention.layer_norm_rms_epsilon")
MAX_VOCAB = 1 << 24
_BLK_RE = re.compile(r"^blk\.(\d+)\.")


def _corrupt(path: Path, what: str) -> CorruptFileError:
    return CorruptFileError(f"{path} is a corrupt GGUF file: {what}; re-download or re-convert it")


def _ints(path: Path, key: str, value: Any) -> list[int]:
    """A scalar or per-layer array of whole numbers, as a list; anything else is corrupt."""
    values = value if isinstance(value, list) else [value]
    if not values or not all(type(v) is int for v in values):
        raise _corrupt(path, f"{key} is {value!r:.40}, not a whole number")
    return values


def check_gguf(reader: Any, path: Path) -> None:
    """Raise :class:`CorruptFileError` when ``reader``'s header cannot describe a real model."""
    arch = _contents(reader, path, "general.architecture")
    if arch is not None and not isinstance(arch, str):
        raise _corrupt(path, "general.architecture is not a string")
    hp: dict[str, list[int]] = {}
    if arch:
        for key, (lo, hi) in _INT_BOUNDS.items():
            value = _contents(reader, path, f"{arch}.{key}")
            if value is None:
                continue
            values = _ints(path, f"{arch}.{key}", value)
            bad = next((v for v in values if not lo <= v <= hi), None)
            if bad is not None:
                raise _corrupt(path, f"{arch}.{key} is {bad}, outside {lo}..{hi}")
            hp[key] = values
        for key in _FLOAT_KEYS:
            value = _contents(reader, path, f"{arch}.{key}")
            if value is not None and (isinstance(value, (bool, str, list)) or not math.isfinite(value) or value <= 0):
                raise _corrupt(path, f"{arch}.{key} is {value!r:.40}, not a positive number")
    _check_heads(path, arch, hp)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.data) > MAX_VOCAB:
        raise _corrupt(path, f"tokenizer.ggml.tokens has {len(tokens.data)} entries, over {MAX_VOCAB}")
    _check_tensors(reader, path, hp.get("block_count", [None])[0])


def _check_heads(path: Path, arch: str | None, hp: dict[str, list[int]]) -> None:
    heads, kv = hp.get("attention.head_count"), hp.get("attention.head_count_kv")
    if heads and len(heads) == 1 and heads[0] == 0:
        raise _corrupt(path, f"{arch}.attention.head_count is 0")
    if heads and kv and len(heads) == len(kv) == 1 and kv[0] and heads[0] % kv[0]:
        raise _corrupt(path, f"{arch}.attention.head_count_kv {kv[0]} does not divide head_count {heads[0]}")
    n_layer = hp.get("block_count", [0])[0]
    for key in ("attention.head_count", "attention.head_count_kv", "feed_forward_length"):
        values = hp.get(key)
        if values and len(values) > 1 and len(values) != n_layer:
            raise _corrupt(path, f"{arch}.{key} has {len(values)} per-layer entries for {n_layer} blocks")
    experts, used = hp.get("expert_count", [0])[0], hp.get("expert_used_count", [0])[0]
    if used > experts:
        raise _corrupt(path, f"{arch}.expert_used_count {used} is more than expert_count {experts}")


def _check_tensors(reader: Any, path: Path, n_layer: int | None) -> None:
    size = path.stat().st_size
    blocks: set[int] = set()
    for t in reader.tensors:
        if any(int(d) < 0 for d in t.shape):
            raise _corrupt(path, f"tensor {t.name!r} has a negative dimension")
        if int(t.data_offset) + int(t.n_bytes) > size or t.data.nbytes != int(t.n_bytes):
            raise _corrupt(path, f"tensor {t.name!r} needs bytes up to {int(t.data_offset) + int(t.n_bytes)}, "
                                 f"past the end of the {size}-byte file (truncated?)")
        m = _BLK_RE.match(t.name)
        if m:
            blocks.add(int(m.group(1)))
    if n_layer is None or not reader.tensors:
        return  # no block count to tie, or a vocabulary-only GGUF
    if blocks and max(blocks) >= n_layer:
        raise _corrupt(path, f"tensor blk.{max(blocks)}.* is beyond block_count {n_layer}")
    missing = sorted(set(range(n_layer)) - blocks)
    if missing:
        raise _corrupt(path, f"block_count is {n_layer} but the file holds {len(blocks)} blocks "
                             f"(blk.{missing[0]}.* is missing)")


def _contents(reader: Any, path: Path, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception as exc:  # noqa: BLE001 - gguf-py decodes lazily; a bad string or array fails here
        raise _corrupt(path, f"field {key} cannot be decoded ({type(exc).__name__})") from exc
