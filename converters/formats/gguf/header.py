"""A GGUF header read without decoding its vocabulary: the key/value metadata and the tensor table, with
string arrays (the tokenizer's tokens and merges) left as counts that decode only when asked.

gguf-py's ``GGUFReader`` turns every token and merge into numpy views as it opens a file: 3.9 s for
SmolLM2-135M's 49k tokens and 49k merges on a 2-core machine, paid by every ``plan``, ``inspect``,
``push`` fit check and ``run --offload auto``, which need a few numbers and the tensor sizes. This scan
walks the same layout (GGUF v2/v3, little-endian) and offers the subset of the reader's interface that
:mod:`.check`, :func:`edgekit.runtime.memory.read_shape` and ``describe_gguf`` use (``fields[key]``
with ``contents()`` and ``len(data)``, ``tensors`` with name, type, shape, sizes and offset); sizes come
from gguf-py's own tables. Files it does not cover (v1, big-endian) go to gguf-py.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# GGUF value types (gguf.GGUFValueType): scalar struct codes, and numpy dtypes for arrays of them.
_STRING, _ARRAY = 8, 9
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
_MAX_DIMS = 8  # GGML_MAX_DIMS is 4; anything far past it is not a tensor table


class NotCovered(Exception):
    """A GGUF this scan leaves to gguf-py (v1, big-endian)."""


class _Strings:
    """A string array's items, decoded on first use; ``len`` without decoding."""

    def __init__(self, buf: Any, start: int, count: int) -> None:
        self._buf, self._start, self._count = buf, start, count
        self._items: list[str] | None = None

    def __len__(self) -> int:
        return self._count

    def items(self) -> list[str]:
        if self._items is None:
            out, pos, buf = [], self._start, self._buf
            for _ in range(self._count):
                (n,) = struct.unpack_from("<Q", buf, pos)
                out.append(bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8"))
                pos += 8 + n
            self._items = out
        return self._items


@dataclass
class HeaderField:
    """One metadata entry: ``contents()`` as gguf-py's ``ReaderField`` gives it; ``data`` has its length."""

    name: str
    value: Any  # a Python scalar, a str, a numpy array, or _Strings

    @property
    def data(self) -> Any:
        return self.value if isinstance(self.value, (_Strings, np.ndarray)) else [self.value]

    def contents(self) -> Any:
        if isinstance(self.value, _Strings):
            return self.value.items()
        if isinstance(self.value, np.ndarray):
            return self.value.tolist()
        return self.value


@dataclass
class _Span:
    nbytes: int


@dataclass
class HeaderTensor:
    """A tensor's entry: ``shape`` in GGML order (ne0 first), ``data_offset`` absolute in the file, and
    ``data.nbytes``: the bytes the file really holds for it (fewer when it is truncated)."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: np.ndarray
    n_elements: int
    n_bytes: int
    data_offset: int
    data: _Span


class GGUFHeader:
    """The header of ``path``: ``fields`` (name -> :class:`HeaderField`) and ``tensors``."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                raise ValueError("the file is empty")
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.fields: dict[str, HeaderField] = {}
        self.tensors: list[HeaderTensor] = []
        self._parse(size)

    def _parse(self, size: int) -> None:
        import gguf

        buf = self._buf
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("GGUF magic invalid")
        version = struct.unpack_from("<I", buf, 4)[0]
        if version not in (2, 3):
            raise NotCovered(f"GGUF version {version}")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        if n_tensors > size or n_kv > size:
            raise ValueError("tensor or field count larger than the file")
        self.pos = 24
        for name, value in (("GGUF.version", version), ("GGUF.tensor_count", n_tensors), ("GGUF.kv_count", n_kv)):
            self.fields[name] = HeaderField(name, value)  # as gguf-py lists them
        for _ in range(n_kv):
            name = self._string()
            (vtype,) = self._unpack("<I")
            self.fields[name] = HeaderField(name, self._value(vtype))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            if n_dims > _MAX_DIMS:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
            dims = self._unpack(f"<{n_dims}Q")
            ttype, offset = self._unpack("<IQ")
            infos.append((name, dims, ttype, offset))
        align_field = self.fields.get("general.alignment")
        align = int(align_field.value) if align_field is not None else gguf.GGUF_DEFAULT_ALIGNMENT
        if align <= 0:
            raise ValueError(f"general.alignment is {align}")
        start = -(-self.pos // align) * align
        for name, dims, ttype, offset in infos:
            qtype = gguf.GGMLQuantizationType(ttype)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n_el = int(np.prod(dims, dtype=np.uint64)) if dims else 1
            n_bytes = n_el * type_size // block
            at = start + offset
            self.tensors.append(HeaderTensor(name, qtype, np.array(dims, dtype=np.uint64), n_el, n_bytes, at,
                                             _Span(max(0, min(n_bytes, size - at)))))

    def _unpack(self, fmt: str) -> tuple:
        vals = struct.unpack_from(fmt, self._buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return vals

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        if self.pos + n > len(self._buf):
            raise ValueError("a string runs past the end of the file")
        s = bytes(self._buf[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype in _SCALAR:
            return self._unpack("<" + _SCALAR[vtype])[0]
        if vtype != _ARRAY:
            raise ValueError(f"unknown GGUF value type {vtype}")
        itype, count = self._unpack("<IQ")
        if count > len(self._buf):
            raise ValueError("an array longer than the file")
        if itype == _STRING:
            strings = _Strings(self._buf, self.pos, count)
            for _ in range(count):  # skip: each item is a length and its bytes
                (n,) = struct.unpack_from("<Q", self._buf, self.pos)
                self.pos += 8 + n
            if self.pos > len(self._buf):
                raise ValueError("a string array runs past the end of the file")
            return strings
        if itype not in _NUMPY:
            raise ValueError(f"array of unsupported GGUF type {itype}")  # nested arrays: none in real files
        arr = np.frombuffer(self._buf, dtype=_NUMPY[itype], count=count, offset=self.pos).copy()
        self.pos += arr.nbytes
        return arr
