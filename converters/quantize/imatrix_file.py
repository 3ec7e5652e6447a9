"""llama.cpp's importance-matrix files, read (``--imatrix FILE``) and written.

``llama-imatrix`` collects, for every matmul weight it sees, each input column's sum of squared
activations over a calibration text; ``llama-quantize --imatrix FILE`` rounds with ``sum / count`` as the
importance of each column. Such files are made once per model and shared (model cards link them), so a user
often has one where edgekit would otherwise calibrate. Two layouts exist:

- the GGUF one (llama.cpp since mid-2025): a GGUF of ``general.type = imatrix`` whose tensors are
  ``NAME.in_sum2`` (F32, one row per expert) and ``NAME.counts`` (F32, tokens per expert), with the
  ``imatrix.datasets``, ``imatrix.chunk_count`` and ``imatrix.chunk_size`` keys;
- the legacy ``.dat``: an int32 entry count, then per entry an int32 name length, the name, an int32 call
  count ``ncall``, an int32 value count and that many float32 values (``sum / count * ncall``), then
  optionally an int32 chunk count and a length-prefixed dataset name (all little-endian).

Either way an importance is ``in_sum2 / counts`` per expert (1 where an expert saw no token), or ``values
/ ncall``: what ``llama-quantize`` computes. :class:`ImatrixFileQuantizer` rounds each tensor to nearest
with its importances, exactly as the calibrated ``imatrix`` method does with the ones it measures.
"""

from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from edgekit.converters.quantize import gptq_kernel
from edgekit.converters.quantize.base import QuantizeConfig, Quantizer, method_flag, register_quantizer
from edgekit.converters.quantize.grids import as_grid
from edgekit.errors import CorruptFileError, EdgekitError, InputError

if TYPE_CHECKING:
    from collections.abc import Callable

    from edgekit.model import HFCheckpoint

_FLOAT = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
# llama.cpp never collects these (the embedding is a row lookup, not a matmul); the output head only with
# llama-imatrix --output-tensor-name/--process-output. Rounded without an importance when absent, as there.
_NOT_COLLECTED = ("token_embd.weight",)
_MAKE_ONE = "make one with llama-imatrix (llama.cpp) for this model"


def _is_float(qtype: Any) -> bool:
    """A float type, stored as is (a format's plan may also hold its own grids: MatMulNBits, MLC's)."""
    return isinstance(qtype, gguf.GGMLQuantizationType) and qtype in _FLOAT


@dataclass(frozen=True)
class ImatrixFile:
    """An importance-matrix file: per GGUF tensor name, the importance of each input column (shape
    ``(n_expert, n_in)``; one row for a dense matrix), and what the file says it was made from."""

    path: Path
    importances: dict[str, np.ndarray]
    datasets: tuple[str, ...] = ()
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def for_tensor(self, name: str, n_in: int) -> np.ndarray | None:
        """The importances of tensor ``name`` (``n_in`` columns), or None when the file has none for it.
        A per-expert entry is for a stacked expert tensor, which a dense model's tensor of the same name
        cannot be: that and a column count that differs mean the file was made for another model."""
        im = self.importances.get(name)
        if im is None:
            return None
        if im.shape != (1, n_in):
            what = f"{im.shape[0]} experts x {im.shape[1]}" if im.shape[0] > 1 else f"{im.shape[1]}"
            raise InputError(f"{self.path}: {name} has {what} importances but this model's tensor has {n_in} input "
                             f"columns: the file was made for another model; {_MAKE_ONE}")
        return im[0]

    def describe(self) -> str:
        """``125 chunks of 512 tokens of wiki.train.raw``, or what of it the file says."""
        chunks = (f"{self.chunk_count} chunk{'s' if self.chunk_count != 1 else ''}" + (f" of {self.chunk_size} tokens" if self.chunk_size else "")
                  if self.chunk_count else "")
        data = ", ".join(self.datasets)
        return " of ".join(p for p in (chunks, data) if p) or "no calibration details recorded"


def read_imatrix(path: str | Path) -> ImatrixFile:
    """Read an importance-matrix file of either layout (the GGUF one is recognised by its magic); a file
    that is neither, or is damaged, is a one-line :class:`CorruptFileError`."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"imatrix file {p} not found{' (it is a folder)' if p.is_dir() else ''}; give the .gguf "
                         "or .dat file llama-imatrix wrote")
    try:
        st = p.stat()
        with p.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise InputError(f"cannot read {p}: {exc.strerror or exc}") from exc
    return _read_checked(p, magic, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _read_checked(p: Path, magic: bytes, size: int, mtime_ns: int) -> ImatrixFile:
    """:func:`read_imatrix` once per file version: convert checks the file before any work and its quantizer
    reads it again (a 70B model's file is hundreds of MB)."""
    out = _read_gguf(p) if magic == b"GGUF" else _read_legacy(p)
    if not out.importances:
        raise CorruptFileError(f"{p} holds no importances; {_MAKE_ONE}")
    for name, im in out.importances.items():
        if not np.all(np.isfinite(im)) or np.any(im < 0):
            raise CorruptFileError(f"{p}: the importances of {name} are negative or not finite: the file is damaged; "
                                   f"{_MAKE_ONE}")
    return out


def _read_gguf(p: Path) -> ImatrixFile:
    try:
        reader = gguf.GGUFReader(p)
    except Exception as exc:  # the gguf library raises ValueError, struct.error, IndexError... on damage
        raise CorruptFileError(f"{p} is a damaged GGUF ({type(exc).__name__}: {exc}); {_MAKE_ONE}") from exc
    sums: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    for t in reader.tensors:
        for suffix, into in ((".in_sum2", sums), (".counts", counts)):
            if t.name.endswith(suffix):
                if t.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise CorruptFileError(f"{p}: {t.name} is {t.tensor_type.name}, where llama-imatrix writes F32; "
                                           f"{_MAKE_ONE}")
                into[t.name[: -len(suffix)]] = np.asarray(t.data, dtype=np.float64).reshape(-1)
    if not sums and not counts:
        kind = _field_str(reader, "general.type") or _field_str(reader, "general.architecture") or "?"
        raise InputError(f"{p} is a GGUF {'model' if kind != 'imatrix' else 'file'} ({kind}) with no importance "
                         f"matrix in it; give the file llama-imatrix wrote ({_MAKE_ONE})")
    if set(sums) != set(counts):
        name = sorted(set(sums) ^ set(counts))[0]
        raise CorruptFileError(f"{p}: {name} has {'sums' if name in sums else 'counts'} without "
                               f"{'counts' if name in sums else 'sums'}: the file is damaged; {_MAKE_ONE}")
    importances = {}
    for name, s in sums.items():
        c = np.round(counts[name])
        if c.size == 0 or s.size % c.size:
            raise CorruptFileError(f"{p}: {name} has {s.size} sums for {c.size} experts: the file is damaged; "
                                   f"{_MAKE_ONE}")
        per = s.reshape(c.size, -1)
        with np.errstate(divide="ignore", invalid="ignore"):
            importances[name] = np.where(c[:, None] > 0, per / c[:, None], 1.0).astype(np.float32)
    datasets = reader.fields.get("imatrix.datasets")
    return ImatrixFile(
        p, importances,
        datasets=tuple(str(bytes(datasets.parts[i]), "utf-8", "replace") for i in datasets.data) if datasets else (),
        chunk_count=_field_int(reader, "imatrix.chunk_count"), chunk_size=_field_int(reader, "imatrix.chunk_size"))


def _field_int(reader: gguf.GGUFReader, key: str) -> int:
    f = reader.fields.get(key)
    return int(f.parts[f.data[0]][0]) if f is not None and f.data else 0


def _field_str(reader: gguf.GGUFReader, key: str) -> str | None:
    f = reader.fields.get(key)
    return str(bytes(f.parts[f.data[0]]), "utf-8", "replace") if f is not None and f.data else None


def _read_legacy(p: Path) -> ImatrixFile:
    buf = p.read_bytes()
    bad = CorruptFileError(f"{p} is not an importance matrix (neither llama-imatrix's GGUF nor its legacy .dat "
                           f"layout, or a damaged one); {_MAKE_ONE}")
    pos = 0

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(buf):
            raise bad
        got = struct.unpack_from(fmt, buf, pos)
        pos += size
        return got

    (n_entries,) = take("<i")
    # every entry takes at least 16 bytes: an absurd count is another kind of file, not a huge allocation
    if n_entries < 1 or n_entries * 16 > len(buf):
        raise bad
    importances: dict[str, np.ndarray] = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length <= 4096:
            raise bad
        (raw,) = take(f"<{length}s")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise bad from None
        ncall, nval = take("<ii")
        if nval < 1 or pos + 4 * nval > len(buf):
            raise bad
        values = np.frombuffer(buf, dtype="<f4", count=nval, offset=pos).astype(np.float64)
        pos += 4 * nval
        importances[name] = (values / ncall if ncall > 0 else values).astype(np.float32).reshape(1, -1)
    chunks, datasets = 0, ()
    if pos + 4 <= len(buf):  # optional: the chunk count and the dataset's name
        (chunks,) = take("<i")
        if pos + 4 <= len(buf):
            (length,) = take("<i")
            if 0 < length <= len(buf) - pos:
                datasets = (buf[pos:pos + length].decode("utf-8", "replace"),)
    return ImatrixFile(p, importances, datasets=datasets, chunk_count=max(0, chunks), legacy=True)


def write_imatrix(path: str | Path, means: dict[str, np.ndarray], count: float, chunk_size: int,
                  dataset: str) -> None:
    """Write per-column importances (one expert per tensor, keyed by GGUF name) as llama-imatrix's GGUF
    file, which ``llama-quantize --imatrix`` and :func:`read_imatrix` read: ``NAME.in_sum2`` = ``means *
    count``, ``NAME.counts`` = ``count``, and the three ``imatrix.*`` keys llama-quantize requires."""
    writer = gguf.GGUFWriter(path, arch="imatrix")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", [dataset])
    writer.add_uint32("imatrix.chunk_count", max(1, int(round(count / chunk_size))))
    writer.add_uint32("imatrix.chunk_size", chunk_size)
    for name, m in sorted(means.items()):
        writer.add_tensor(f"{name}.in_sum2", (np.asarray(m, np.float64) * count).astype(np.float32).reshape(1, -1))
        writer.add_tensor(f"{name}.counts", np.full((1, 1), count, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


_BLOCK = re.compile(r"blk\.(\d+)\.")
_LISTED = 4  # names listed before "..." (all of them when one more would be all)


def _names(names: list[str]) -> str:
    """``a, b, c``, or the first few and ``...`` (the count is said with it)."""
    return ", ".join(names) if len(names) <= _LISTED + 1 else f"{', '.join(names[:_LISTED])}, ..."


def _without(without: list[str]) -> str:
    """The summary's ``without:`` part: every rounded tensor that gets no importances, and why (the file has
    no entry for it; the embedding, which llama-imatrix never collects), each rounded to nearest as
    llama-quantize does."""
    missed = [n for n in without if n not in _NOT_COLLECTED]
    never = [n for n in without if n in _NOT_COLLECTED]
    parts = []
    if len(missed) == 1:
        parts.append(f"{missed[0]} (the file has no entry for it)")
    elif len(missed) <= _LISTED + 1 and missed:
        parts.append(f"{_names(missed)} (the file has no entries for them)")
    elif missed:
        parts.append(f"{len(missed)} tensors the file has no entries for ({_names(missed)})")
    if never:
        parts.append(f"{_names(never)} (llama-imatrix never collects the embedding, a row lookup)")
    return f"without: {' and '.join(parts)}: plain round-to-nearest, as llama-quantize does"


def _check_model(im: ImatrixFile, checkpoint: HFCheckpoint, plan: dict[str, Any]) -> None:
    """Refuse a file with entries for tensors this model does not have. Blocks beyond the model's last mean a
    deeper model's file, or this model's before ``--prune depth``: the shapes match, but block numbers shift,
    so the importances would land on other blocks than they were measured on. (Entries merely missing are
    fine: those tensors are rounded without importances, and the summary names them.)"""
    blocks = [int(m.group(1)) for n in im.importances if (m := _BLOCK.match(n))]
    hp = getattr(checkpoint, "hparams", None)
    n_layer = getattr(hp, "n_layer", None)
    if not isinstance(n_layer, int):
        n_layer = 1 + max((int(m.group(1)) for n in plan if (m := _BLOCK.match(n))), default=-1)
    if blocks and max(blocks) >= n_layer:
        n_file = max(blocks) + 1
        raise InputError(f"{im.path} was made for a model with {n_file} blocks (it has importances for "
                         f"blk.{n_file - 1}) and this one has {n_layer} (blk.0-blk.{n_layer - 1}); a file for a "
                         "deeper model, or for this one before --prune depth, puts importances on the wrong blocks: "
                         "make one for this model (llama-imatrix, or --method imatrix with calibration data)")
    known = set(plan) | set(_NOT_COLLECTED) | {"output.weight"}
    spec = getattr(checkpoint, "spec", None)
    for hf in getattr(checkpoint, "tensors", {}) if spec is not None else ():
        try:
            g = spec.gguf_name(hf)
        except EdgekitError:
            continue
        if g:
            known.add(g)
    lacks = sorted((n for n in im.importances if n not in known), key=_tensor_order)
    if lacks:
        raise InputError(f"{im.path} has importances for {len(lacks)} tensor{'s' if len(lacks) > 1 else ''} this "
                         f"model does not have ({_names(lacks)}): it was made for another model; make one for this "
                         "model (llama-imatrix, or --method imatrix with calibration data)")


def _tensor_order(name: str) -> tuple[int, str]:
    m = _BLOCK.match(name)
    return (int(m.group(1)) if m else -1, name)


@dataclass(frozen=True)
class ImatrixFileConfig(QuantizeConfig):
    """Round-to-nearest weighted by a llama.cpp importance-matrix file (``llama-imatrix`` output, GGUF or
    legacy ``.dat``): ``llama-quantize --imatrix FILE``'s rounding, with no calibration run here.
    file: the file's path."""

    method: str = "imatrix-file"
    file: str = ""

    def to_json(self) -> dict[str, Any]:
        from edgekit.hashing import sha256_file

        p = Path(self.file).expanduser()
        try:
            digest: str | None = sha256_file(p)
        except OSError:
            digest = None
        return {"method": self.method, "file": str(p.resolve()), "sha256": digest}


@register_quantizer("imatrix-file")
class ImatrixFileQuantizer(Quantizer):
    """Each tensor rounded to nearest with its importances from the file; tensors the file has none for
    (the embedding; the output head unless llama-imatrix was told to collect it) without, as llama-quantize
    does."""

    config_class = ImatrixFileConfig

    def __init__(self, config: QuantizeConfig | None = None) -> None:
        super().__init__(config)
        self._file: ImatrixFile | None = None
        self.notes: list[str] = []

    @property
    def cfg(self) -> ImatrixFileConfig:
        assert isinstance(self.config, ImatrixFileConfig)
        return self.config

    @property
    def uses_imatrix(self) -> bool:
        return True

    @property
    def file(self) -> ImatrixFile:
        if self._file is None:
            if not self.cfg.file:
                raise InputError("--method imatrix-file rounds with a llama.cpp importance matrix: give the file "
                                 "with --imatrix FILE (ImatrixFileConfig(file=...))")
            self._file = read_imatrix(self.cfg.file)
        return self._file

    def prepare(self, checkpoint: HFCheckpoint, plan: dict[str, Any],
                progress: Callable[[str, int, int], None] | None = None) -> None:
        """Read the file and check it against the model before any tensor is written: a plan that rounds
        nothing has no use for it; a file for another model names none of its tensors, or tensors it lacks
        (blocks beyond its last: a deeper model's, or this one's before --prune depth, whose importances would
        land on the wrong blocks); a type llama.cpp will not write without importances needs them."""
        from edgekit.converters.formats.gguf.mixes import NEEDS_IMATRIX

        im = self.file
        rounded = [n for n, t in plan.items() if not _is_float(t)]
        if not rounded:  # e.g. GGUF --type F16: as ONNX --bits 16, MLC q0f16 and Core ML in float refuse it
            kinds = "/".join(sorted({getattr(t, "name", str(t)) for t in plan.values()}))
            raise InputError(f"{method_flag(self.cfg.method)} quantizes weights; this conversion keeps every tensor "
                             f"in float ({kinds}): give a quantized --type (e.g. Q4_K_M) for GGUF")
        have = [n for n in rounded if n in im.importances]
        if not have:
            sample = ", ".join(sorted(im.importances)[:2])
            raise InputError(f"{im.path} has importances for none of this model's tensors (it names {sample}, ...): it "
                             f"was made for another model; {_MAKE_ONE}")
        _check_model(im, checkpoint, plan)
        without = [n for n in rounded if n not in im.importances]
        needy = [n for n in without if plan[n] in NEEDS_IMATRIX and n not in (*_NOT_COLLECTED, "output.weight")]
        if needy:
            raise InputError(f"{im.path} has no importances for {needy[0]}, which {getattr(plan[needy[0]], 'name', plan[needy[0]])} needs (llama.cpp "
                             f"refuses it without); {_MAKE_ONE}, or choose a type of 3 bits or more")
        note = f"importances from {im.path.name} ({im.describe()}) for {len(have)} of {len(rounded)} rounded tensors"
        if without:
            note += f"; {_without(without)}"
        self.notes.append(note)

    def quantize(self, name: str, weight: np.ndarray, qtype: Any) -> np.ndarray:
        weight = np.ascontiguousarray(weight, dtype=np.float32)
        if weight.ndim == 1 or _is_float(qtype):
            return as_grid(qtype).quantize(weight)
        return gptq_kernel.rtn(weight, qtype, self.file.for_tensor(name, weight.shape[1])).data
