"""The KV cache of an ONNX decoder session, in one of two layouts; :class:`.onnx.OnnxBackend` runs its
graph through one.

* :class:`FedKV`: the past key/values are fed in as arrays and the presents returned become the next
  past. Any decoder with the Optimum input names runs this way, but each step copies the whole cache
  (the graph concatenates past and new into fresh presents) and converts ~60 inputs and outputs.
* :class:`BoundKV`: for graphs whose ``GroupQueryAttention`` nodes take the past inputs directly
  (edgekit's; onnxruntime-genai's builder writes the same pattern, not checked here). One preallocated
  buffer per key/value serves as both past and present (I/O binding): the kernel appends the new rows in
  place (onnxruntime's past/present buffer sharing, chosen when both point at the same memory), so a step costs the same at any depth and rejecting
  drafts is moving the position back. Measured on SmolLM2-135M (2 threads, AMD EPYC): the 8-bit graph's
  step 10.5 -> 7.8 ms at 300 cached tokens and 17.7 -> 9.9 ms at 1,000; the float16 graph's 21.7 ->
  19.9 ms at 300. Capacity grows by doubling (from 256, up to the context), one buffer at a time, so
  the cache holds at most the context once.

Both hold ``pos`` cached positions and give the same logits (the GQA kernel computes the same sums).
:class:`KVWindow` evicts from either (an attention-sink window); :func:`kv_shape` and the rotary-table readers
give what the cache and the window need from the graph.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import InputError, UnsupportedError

#: positions a bound cache starts with (it doubles from there, up to the context)
FIRST_CAPACITY = 256


def kv_in_place(model: Any) -> bool:
    """Whether every ``past_key_values.*`` input of the ONNX graph ``model`` (a ModelProto, weights not
    needed) is the past key or value of a ``GroupQueryAttention`` node, and nothing else reads it, and
    that node's present key/value is the matching ``present.*`` output (directly or through an
    ``Identity``, which onnxruntime removes): then a buffer bound as both is appended to in place."""
    past = {i.name for i in model.graph.input if i.name.startswith("past_key_values.")}
    if not past:
        return False
    renamed = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "Identity"}
    graph_outputs = {o.name for o in model.graph.output}
    fed: set[str] = set()
    for node in model.graph.node:
        used = past.intersection(node.input)
        if not used:
            continue
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft" or len(node.output) < 3:
            return False
        for slot in (3, 4):
            name = node.input[slot] if len(node.input) > slot else ""
            present = node.output[slot - 2]
            if name not in past or renamed.get(present, present) != name.replace("past_key_values.", "present."):
                return False
        if not used <= set(node.input[3:5]):
            return False
        fed |= used
    return fed == past and all(p.replace("past_key_values.", "present.") in graph_outputs for p in past)


def capacity_for(n: int, limit: int) -> int:
    """The capacity a bound cache grows to for ``n`` positions: doubling from :data:`FIRST_CAPACITY`,
    at most ``limit`` (the context)."""
    cap = FIRST_CAPACITY
    while cap < n:
        cap *= 2
    return max(min(cap, limit), n)


class FedKV:
    """Past key/values fed in and presents read back, each step."""

    def __init__(self, session: Any, names: list[str], heads: int, dim: int, dtype: Any) -> None:
        self.session, self.names = session, names
        self.out_names = ["logits"] + [n.replace("past_key_values.", "present.") for n in names]
        self.empty = np.zeros((1, heads, 0, dim), dtype=dtype)
        self.reset()

    def reset(self) -> None:
        self.past = [self.empty] * len(self.names)
        self.pos = 0

    def run(self, tokens: list[int]) -> np.ndarray:
        n = len(tokens)
        feed = {"input_ids": np.asarray([tokens], dtype=np.int64),
                "attention_mask": np.ones((1, self.pos + n), dtype=np.int64)}
        feed.update(zip(self.names, self.past, strict=True))
        outs = self.session.run(self.out_names, feed)
        self.past = outs[1:]
        self.pos += n
        return outs[0][0]

    def truncate(self, keep: int) -> None:
        self.past = [p[:, :, :keep] for p in self.past]
        self.pos = keep

    def views(self) -> list[np.ndarray]:
        return list(self.past)

    def replace(self, arrays: list[np.ndarray]) -> None:
        self.past = arrays
        self.pos = int(arrays[0].shape[2])

    def close(self) -> None:
        self.past, self.session = [], None


class BoundKV:
    """One buffer per past key/value, bound as both the past input and the present output."""

    def __init__(self, session: Any, names: list[str], heads: int, dim: int, dtype: Any, limit: int) -> None:
        self.session, self.names, self.limit = session, names, limit
        out = session.get_outputs()[0]
        self.vocab = int(out.shape[-1])
        self.logits_dtype = np.float16 if out.type == "tensor(float16)" else np.float32
        self.heads, self.dim, self.dtype = heads, dim, dtype
        self.buffers: list[np.ndarray] = []
        self.io: Any = None
        self.pos = 0
        self._mask = np.ones((1, 0), dtype=np.int64)
        self._feed: tuple[np.ndarray, np.ndarray] | None = None

    def reset(self) -> None:
        self.pos = 0  # the buffers stay: a later request fills them again

    def _grow(self, n: int) -> None:
        from onnxruntime import OrtValue

        cap = capacity_for(n, self.limit)
        self.io = None  # its values hold the old buffers; dropped first, each buffer is freed as it is replaced
        if not self.buffers:
            self.buffers = [np.zeros((1, self.heads, cap, self.dim), dtype=self.dtype) for _ in self.names]
        for i, old in enumerate(self.buffers):
            if old.shape[2] < cap:  # one at a time: each old buffer is freed as its copy is made
                new = np.zeros((1, self.heads, cap, self.dim), dtype=self.dtype)
                new[:, :, : self.pos] = old[:, :, : self.pos]
                self.buffers[i] = new
        io = self.session.io_binding()
        for name, buf in zip(self.names, self.buffers, strict=True):
            value = OrtValue.ortvalue_from_numpy(buf)  # shares the array's memory
            io.bind_ortvalue_input(name, value)
            io.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)
        self.io = io
        self._mask = np.ones((1, cap), dtype=np.int64)

    def run(self, tokens: list[int]) -> np.ndarray:
        n = len(tokens)
        if not self.buffers or self.pos + n > self.buffers[0].shape[2]:
            self._grow(self.pos + n)
        # the bound arrays are kept referenced until the run is over
        ids, mask = self._feed = (np.asarray([tokens], dtype=np.int64), self._mask[:, : self.pos + n])
        self.io.bind_cpu_input("input_ids", ids)
        self.io.bind_cpu_input("attention_mask", mask)
        # into an array of ours, which the caller then owns: an output onnxruntime allocates stays alive in
        # the binding until the next run (a 512-token chunk's logits are 100-250 MB), and reading it copies
        logits = np.empty((1, n, self.vocab), dtype=self.logits_dtype)
        self.io.bind_output("logits", "cpu", 0, self.logits_dtype, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(self.io)
        self.pos += n
        return logits[0]

    def truncate(self, keep: int) -> None:
        self.pos = keep  # rows past it are overwritten by the next run, and never read before

    def views(self) -> list[np.ndarray]:
        return [b[:, :, : self.pos] for b in self.buffers]

    def replace(self, arrays: list[np.ndarray]) -> None:
        """Hold ``arrays`` (new arrays, e.g. a KV window's kept rows) as the cache's first positions."""
        n = int(arrays[0].shape[2])
        for buf, arr in zip(self.buffers, arrays, strict=True):
            buf[:, :, :n] = arr
        self.pos = n

    def close(self) -> None:
        self.buffers, self.io, self.session = [], None, None


class KVWindow:
    """Attention-sink eviction over ONNX past key/values (keys were stored rotated: the kept ones after the
    gap are rotated back by the gap, ``cos``/``sin`` being the graph's tables, row = position offset)."""

    def __init__(self, size: int, sinks: int, cos: np.ndarray, sin: np.ndarray, step: int | None = None) -> None:
        if size < 64:
            raise InputError("--kv-window must be at least 64 tokens")
        if not 0 <= sinks < size // 2:
            raise InputError("--kv-sinks must be >= 0 and under half the window")
        self.size, self.sinks, self.cos, self.sin = size, sinks, cos, sin
        self.step = max(1, step if step is not None else size // 32)
        self.evicted = 0

    def evict(self, past: list[np.ndarray], over: int) -> list[np.ndarray]:
        """``past`` (key, value per layer, (1, heads, len, dim)) with at least ``over`` tokens removed."""
        length = int(past[0].shape[2])
        n = min(length - self.sinks, max(over, self.step))
        if n < over:
            raise InputError(f"a batch does not fit a KV window of {self.size} with {self.sinks} sinks")
        if n >= self.cos.shape[0]:
            raise InputError("the KV window is larger than the model's rotary table")
        s = self.sinks
        cos, sin = self.cos[n].astype(np.float32), self.sin[n].astype(np.float32)
        out = []
        for j, arr in enumerate(past):
            rest = arr[:, :, s + n :]
            if j % 2 == 0:  # keys: rotate by -n (non-interleaved halves)
                half = rest.shape[-1] // 2
                x1, x2 = rest[..., :half].astype(np.float32), rest[..., half:].astype(np.float32)
                rest = np.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], axis=-1).astype(arr.dtype)
            out.append(np.concatenate([arr[:, :, :s], rest], axis=2))
        self.evicted += n
        return out


def rotary_positions(model: Any) -> int:
    """Positions the graph's rotary cos/sin tables cover (0: it has none)."""
    dims = [int(t.dims[0]) for t in model.graph.initializer if t.name.endswith("cos_cache") and t.dims]
    return dims[0] if dims else 0


def rotary_tables(path: Path, model: Any) -> tuple[np.ndarray, np.ndarray]:
    """The graph's rotary cos/sin caches ((max positions, head_dim/2), from the initializers of ``model``, the
    graph of ``path`` without its external data)."""
    from onnx import numpy_helper

    found: dict[str, np.ndarray] = {}
    for init in model.graph.initializer:
        for key in ("cos_cache", "sin_cache"):
            if init.name.endswith(key) and key not in found:
                found[key] = numpy_helper.to_array(init, base_dir=str(path.parent))
    if len(found) != 2:
        raise UnsupportedError(f"{path.name} has no rotary cos/sin tables; a KV window needs a graph that applies "
                               "rotary embeddings from tables (edgekit's or onnxruntime-genai's)")
    return found["cos_cache"].astype(np.float32), found["sin_cache"].astype(np.float32)


def kv_shape(shape: list, folder: Path) -> tuple[int, int]:
    """(kv heads, head dim) of the past inputs; symbolic dims are read from config.json."""
    heads, dim = shape[1], shape[3]
    if isinstance(heads, int) and isinstance(dim, int):
        return heads, dim
    cfg_file = folder / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    gcfg_file = folder / "genai_config.json"
    dec = json.loads(gcfg_file.read_text()).get("model", {}).get("decoder", {}) if gcfg_file.exists() else {}
    n_head = cfg.get("num_attention_heads") or dec.get("num_attention_heads")
    heads = heads if isinstance(heads, int) else cfg.get("num_key_value_heads") or dec.get("num_key_value_heads") or n_head
    if not isinstance(dim, int):
        dim = cfg.get("head_dim") or dec.get("head_size") or (cfg.get("hidden_size", 0) // (n_head or 1))
    if not heads or not dim:
        raise UnsupportedError("the past key/value inputs have symbolic shapes and no config.json says the "
                               "KV heads and head size")
    return int(heads), int(dim)

