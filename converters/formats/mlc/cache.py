"""MLC's tensor cache: ``params_shard_*.bin`` files and the ``tensor-cache.json`` that lists them.

Facts of the format (from apache/tvm's ``python/tvm/contrib/tvmjs.py``, which ``mlc_llm convert_weight``
calls with ``encode_format="f32-to-bf16"`` and a 32 MiB cap):

* records are appended to the current shard in order; when the shard's bytes plus the next record would
  reach the cap, a record of at least half the cap goes alone into a shard of its own (the pending shard
  stays open), a smaller one first closes the pending shard;
* each shard ``{"dataPath", "format": "raw-shard", "nbytes", "records", "md5sum"}`` (the hex md5 of the
  shard file), each record ``{"name", "shape", "dtype", "format", "nbytes", "byteOffset"}``;
* with the ``f32-to-bf16`` encoding a float32 array is stored as bfloat16 (round to nearest even) and its
  record keeps ``dtype: "float32"``; a ``tensor-cache-b16.json`` then lists the same shards with those
  records as ``bfloat16`` / ``raw``;
* the file's ``metadata`` holds ``ParamSize`` (tensors), ``ParamBytes`` and ``BitsPerParam``.

Older MLC runtimes read ``ndarray-cache.json`` (the same content): both names are written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import CorruptFileError

CACHE_NAME = "tensor-cache.json"
OLD_CACHE_NAME = "ndarray-cache.json"
B16_CACHE_NAME = "tensor-cache-b16.json"
ENCODING = "f32-to-bf16"
_DTYPE_NAMES = {np.dtype(np.float16): "float16", np.dtype(np.float32): "float32", np.dtype(np.uint32): "uint32",
                np.dtype(np.int32): "int32", np.dtype(np.uint8): "uint8", np.dtype(np.int8): "int8"}
_NUMPY = {v: k for k, v in _DTYPE_NAMES.items()}


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits of float32 ``x``: round to nearest even inside the bfloat16 range, truncated
    beyond it (so huge values clip to the largest finite bfloat16), as TVM encodes them."""
    v = np.ascontiguousarray(x, dtype=np.float32)
    bits = v.view(np.uint32)
    limit = np.array([(np.finfo(np.float32).max.view(np.uint32) >> 16) << 16], np.uint32).view(np.float32)[0]
    inside = (v < limit) & (v > -limit)
    bias = np.where(inside, ((bits >> 16) & 1) + np.uint32(0x7FFF), np.uint32(0)).astype(np.uint32)
    return ((bits + bias) >> 16).astype(np.uint16)


def bf16_to_f32(x: np.ndarray) -> np.ndarray:
    return (np.asarray(x, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class TensorCacheWriter:
    """Writes shards into ``folder`` as records are added; :meth:`finish` writes the JSON files. A second
    ``finish`` or an ``add`` after it raises (the writer is done)."""

    def __init__(self, folder: Path, shard_cap_bytes: int = 32 << 20) -> None:
        self.folder, self.cap = Path(folder), shard_cap_bytes
        self.shards: list[dict[str, Any]] = []
        self.pending: list[dict[str, Any]] = []
        self.data = bytearray()
        self.names: set[str] = set()
        self.param_bytes = 0
        self.done = False

    def add(self, name: str, array: np.ndarray) -> None:
        if self.done:
            raise RuntimeError("the tensor cache is already finished")
        if name in self.names:
            raise ValueError(f"duplicate tensor {name} in the tensor cache")
        self.names.add(name)
        a = np.ascontiguousarray(array)
        dtype = _DTYPE_NAMES[a.dtype]
        self.param_bytes += a.nbytes
        le = f32_to_bf16(a) if dtype == "float32" else np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        raw = memoryview(le.reshape(-1)).cast("B")  # the array's own bytes: no copy of a large tensor
        rec = {"name": name, "shape": list(a.shape), "dtype": dtype, "format": ENCODING, "nbytes": len(raw)}
        if len(self.data) + len(raw) >= self.cap:
            if 2 * len(raw) >= self.cap:
                self._commit(raw, [{**rec, "byteOffset": 0}])
                return
            self._flush()
        rec["byteOffset"] = len(self.data)
        self.pending.append(rec)
        self.data += raw

    def _flush(self) -> None:
        if self.data:
            self._commit(bytes(self.data), self.pending)
            self.data, self.pending = bytearray(), []

    def _commit(self, data: bytes, records: list[dict[str, Any]]) -> None:
        path = self.folder / f"params_shard_{len(self.shards)}.bin"
        path.write_bytes(data)
        self.shards.append({"dataPath": path.name, "format": "raw-shard", "nbytes": len(data), "records": records,
                            "md5sum": md5_file(path)})

    def finish(self, n_params: int) -> dict[str, Any]:
        """Close the last shard and write ``tensor-cache.json`` (and ``ndarray-cache.json``, and the bf16
        listing when float32 tensors were encoded); returns the cache's JSON."""
        if self.done:
            raise RuntimeError("the tensor cache is already finished")
        self._flush()
        self.done = True
        meta = {"ParamSize": len(self.names), "ParamBytes": float(self.param_bytes),
                "BitsPerParam": self.param_bytes * 8.0 / max(n_params, 1)}
        cache = {"metadata": meta, "records": self.shards}
        text = json.dumps(cache, indent=4)
        for name in (CACHE_NAME, OLD_CACHE_NAME):
            (self.folder / name).write_text(text)
        if any(r["dtype"] == "float32" for s in self.shards for r in s["records"]):
            b16 = json.loads(text)
            for s in b16["records"]:
                for r in s["records"]:
                    if r["dtype"] == "float32":
                        r.update(dtype="bfloat16", format="raw")
            (self.folder / B16_CACHE_NAME).write_text(json.dumps(b16, indent=4))
        return cache


def read_cache_json(folder: Path) -> dict[str, Any]:
    """The tensor cache listing of ``folder`` (``tensor-cache.json``, else the older ``ndarray-cache.json``)."""
    for name in (CACHE_NAME, OLD_CACHE_NAME):
        p = Path(folder) / name
        if p.exists():
            try:
                cache = json.loads(p.read_text())
                if not isinstance(cache.get("records"), list):
                    raise ValueError("no records list")
            except (ValueError, UnicodeDecodeError, AttributeError) as exc:
                raise CorruptFileError(f"{p} is not a valid MLC tensor cache ({exc}); re-run 'edgekit convert'") from exc
            return cache
    raise CorruptFileError(f"{folder} has no {CACHE_NAME}; re-run 'edgekit convert --to mlc'")


def load_cache(folder: Path, check_md5: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of the cache in ``folder`` as numpy (float32 records decoded from bfloat16). Names,
    offsets and sizes are checked against the shards; with ``check_md5`` each shard's md5 too."""
    folder = Path(folder)
    cache = read_cache_json(folder)
    out: dict[str, np.ndarray] = {}
    for shard in cache["records"]:
        try:
            path = folder / shard["dataPath"]
            if path.resolve().parent != folder.resolve():
                raise ValueError(f"shard {shard['dataPath']!r} lies outside the folder")
            data = path.read_bytes()
            if len(data) != shard["nbytes"]:
                raise ValueError(f"{path.name} has {len(data)} bytes, the listing says {shard['nbytes']}")
            if check_md5 and hashlib.md5(data).hexdigest() != shard["md5sum"]:
                raise ValueError(f"{path.name} does not match its md5sum")
            for rec in shard["records"]:
                off, nb, shape, dtype = rec["byteOffset"], rec["nbytes"], tuple(rec["shape"]), rec["dtype"]
                if off < 0 or off + nb > len(data):
                    raise ValueError(f"record {rec['name']} runs past the end of {path.name}")
                buf = data[off: off + nb]
                if dtype == "float32" and rec.get("format") == ENCODING:
                    arr = bf16_to_f32(np.frombuffer(buf, "<u2")).reshape(shape)
                elif dtype == "bfloat16":
                    arr = bf16_to_f32(np.frombuffer(buf, "<u2")).reshape(shape)
                else:
                    arr = np.frombuffer(buf, _NUMPY[dtype].newbyteorder("<")).astype(_NUMPY[dtype]).reshape(shape)
                out[rec["name"]] = arr
        except FileNotFoundError as exc:
            raise CorruptFileError(f"{folder}: shard {exc.filename} is missing; re-run 'edgekit convert'") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"{folder}: the tensor cache is damaged ({exc}); re-run 'edgekit convert'") from exc
    return out


def load_cache_tvm(folder: Path) -> dict[str, np.ndarray]:
    """The same through TVM's own reader (``tvm.contrib.tvmjs.load_tensor_cache``) when apache-tvm is
    installed; raises ImportError otherwise."""
    import tvm
    from tvm.contrib import tvmjs

    arrays, _ = tvmjs.load_tensor_cache(str(Path(folder) / CACHE_NAME), tvm.cpu())
    return {k: v.numpy() for k, v in arrays.items()}
