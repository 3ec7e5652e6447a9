"""Seeded mutations of model files for fuzzing ``inspect`` / ``import`` / ``convert`` (tests/edgekit/test_fuzz.py
and bench/fuzz.py): GGUF headers, JSON files (config.json, edgekit.json) and opaque files (ONNX graphs).

Each mutator takes the original bytes and a :class:`random.Random` and returns the mutated bytes and a short
description of what it did, so a failing case can be named and replayed from its seed.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

# Values that hit bounds: zero, one, sign bits, all ones, and the 2-byte change of issue 13 (block_count
# 30 -> 2,155,872,286).
INTERESTING_INTS = [0, 1, 2, 3, 7, 8, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
                    0xFFFFFFFF, 2155872286, 1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
INTERESTING_JSON: list[Any] = [0, -1, 1, 2 ** 31, 2 ** 64, 1e308, -0.0, 0.5, float("nan"), True, False, None,
                               "", "LlamaForCausalLM", "x" * 300, "\udcff", [], ["LlamaForCausalLM"], [1, 2], {},
                               {"a": 1}]


def gguf_layout(path: Path) -> tuple[list[tuple[int, int]], int]:
    """(value spans of every metadata field and tensor-info dimension, offset where tensor data starts)."""
    import gguf

    reader = gguf.GGUFReader(path)
    spans = []
    for f in reader.fields.values():
        off = f.offset
        for i, part in enumerate(f.parts):
            if i in f.data or i == 0:  # the values, and the key's length
                spans.append((off, part.nbytes))
            off += part.nbytes
    for t in reader.tensors:
        off = t.field.offset
        for part in t.field.parts:
            spans.append((off, part.nbytes))
            off += part.nbytes
    return spans, int(reader.data_offset)


def mutate_gguf(data: bytes, spans: list[tuple[int, int]], header_end: int, rng: random.Random) -> tuple[bytes, str]:
    buf = bytearray(data)
    kind = rng.choice(["field", "field", "field", "flip", "byte", "int", "truncate"])
    if kind == "field":
        off, n = rng.choice(spans)
        n = min(n, 8)
        value = rng.choice(INTERESTING_INTS) if rng.random() < 0.8 else rng.getrandbits(8 * n)
        buf[off:off + n] = (value & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
        return bytes(buf), f"field@{off}[{n}]={value}"
    if kind == "flip":
        off = rng.randrange(header_end)
        buf[off] ^= 1 << rng.randrange(8)
        return bytes(buf), f"flip@{off}"
    if kind == "byte":
        off = rng.randrange(header_end)
        buf[off] = rng.randrange(256)
        return bytes(buf), f"byte@{off}={buf[off]}"
    if kind == "int":
        off = rng.randrange(max(header_end - 8, 1))
        value = rng.choice(INTERESTING_INTS)
        buf[off:off + 8] = struct.pack("<Q", value & ((1 << 64) - 1))
        return bytes(buf), f"u64@{off}={value}"
    cut = rng.randrange(len(buf))
    return bytes(buf[:cut]), f"truncate@{cut}"


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            out += _paths(v, (*prefix, i))
    return out


# The manifest keys Artifact.open reads to find the model file: bench/fuzz.py --past-open keeps them intact to
# aim its mutations at what inspect reads after that.
ARTIFACT_KEYS = ("schema", "format", "files")


def mutate_json(data: bytes, rng: random.Random, keep: tuple[str, ...] = ()) -> tuple[bytes, str]:
    """Replace or delete one value anywhere in the document, or break the JSON text itself. ``keep``: top-level
    keys left alone (and the document stays an object)."""
    if rng.random() < 0.1 and not keep:
        cut = rng.randrange(len(data))
        return data[:cut], f"truncate@{cut}"
    obj = json.loads(data)
    path = rng.choice([p for p in _paths(obj) if not keep or (p and p[0] not in keep)])
    value = rng.choice(INTERESTING_JSON)
    if not path:
        return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"), f"root={value!r:.30}"
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and rng.random() < 0.25:
        del parent[path[-1]]
        return json.dumps(obj).encode(), f"del {'/'.join(map(str, path))}"
    parent[path[-1]] = value
    text = json.dumps(obj, ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass"), f"{'/'.join(map(str, path))}={value!r:.30}"


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Opaque files (an ONNX protobuf): flip bits, overwrite a run of bytes, or truncate."""
    buf = bytearray(data)
    kind = rng.choice(["flip", "run", "truncate"])
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            off = rng.randrange(len(buf))
            buf[off] ^= 1 << rng.randrange(8)
        return bytes(buf), "flip"
    if kind == "run":
        off = rng.randrange(len(buf))
        n = rng.randint(1, 16)
        buf[off:off + n] = bytes(rng.randrange(256) for _ in range(n))
        return bytes(buf[:len(data)]), f"run@{off}[{n}]"
    cut = rng.randrange(len(buf))
    return bytes(buf[:cut]), f"truncate@{cut}"


def classify(code: int | None, output: str) -> str:
    """'accepted', 'refused' (a clean one-line EdgekitError, exit 2-6), 'crash' or 'hang' (code None)."""
    if code is None:
        return "hang"
    if "Traceback" in output or "internal error" in output:
        return "crash"
    if code == 0:
        return "accepted"
    errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
    if 2 <= code <= 6 and len(errors) == 1:
        return "refused"
    return "crash"
