"""Size-first targets: the largest artifact that fits a device (``convert --fit DEVICE --ctx N``).

The runtime that will run the format inverts its memory model (the :class:`SizesWeights` capability):
RAM left for weights once the KV cache at ``n_ctx``, compute buffers, logits and the process's baseline
are counted; the device's free storage bounds the file too. The smaller of the two becomes a size
budget, which the format's budget turns into types per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgekit.errors import InputError, UnsupportedError
from edgekit.runtime.base import SizesWeights, backend_for_format

STORAGE_SLACK = 0.9  # leave a tenth of the free storage: a full disk breaks more than the push
# Budgets choose from types up to 8 bits (Q8_0 is 8.5 bpw, INT8 with fp32 scales per 32 about 9): room
# beyond this many bits per weight buys nothing, so a roomy device gets every tensor at its widest type.
MAX_USEFUL_BPW = 9.0
MB = 1e6


def _mb(size: int) -> str:
    """``--size``'s number of MB: whole MB, or 4 significant digits under 10 MB (a tiny model's 0.1386, not 0)."""
    return f"{size / MB:.0f}" if size >= 10 * MB else f"{size / MB:.4g}"


@dataclass(frozen=True)
class FitTarget:
    """A size budget for one device: ``size`` bytes of model files, and how it was found."""

    device: str
    size: int
    n_ctx: int
    ram_bytes: int
    ram_kind: str  # "available" or "total": what the device reported
    weight_room: int
    storage_free: int | None
    limited_by: str  # "RAM" or "storage"
    parts: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        others = sum(self.parts.values())
        disk = f", {self.storage_free / MB:,.0f} MB free storage" if self.storage_free is not None else ""
        return (f"{self.device}: {self.ram_bytes / MB:,.0f} MB RAM {self.ram_kind}{disk}; at context {self.n_ctx} "
                f"the KV cache, buffers and runtime take {others / MB:,.0f} MB, leaving {self.weight_room / MB:,.0f} "
                f"MB for weights -> --size {_mb(self.size)}MB (limited by {self.limited_by})")

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "parts": dict(self.parts)}


def fit_size(hparams: Any, n_params: int, fmt: str, info: Any, n_ctx: int, backend: str | None = None) -> FitTarget:
    """The :class:`FitTarget` for a model of ``hparams`` and ``n_params`` weights in format ``fmt`` on the
    device ``info`` describes (a :class:`edgekit.devices.base.DeviceInfo`) at context ``n_ctx``."""
    if n_ctx <= 0:
        raise InputError("--ctx must be > 0")
    runtime = backend_for_format(fmt, backend)
    if not isinstance(runtime, SizesWeights):
        raise UnsupportedError(f"--fit picks a size for GGUF, ONNX or AQLM artifacts; {fmt} artifacts take one "
                               "quantization for every matrix: give --bits (or the format's --quant/-O) instead")
    ram, kind = (info.ram_available, "available") if info.ram_available else (info.ram_total, "total")
    if not ram:
        raise InputError(f"{info.id} does not report its RAM; give --size instead of --fit")
    room, parts = runtime.weight_room(hparams, n_ctx, int(ram))
    if room <= 0:
        raise InputError(f"at context {n_ctx} the KV cache, buffers and runtime alone need "
                         f"{sum(parts.values()) / MB:,.0f} MB, more than the {ram / MB:,.0f} MB {kind} on "
                         f"{info.id}; lower --ctx")
    size, limited = room, "RAM"
    if info.storage_free is not None and info.storage_free * STORAGE_SLACK < room:
        size, limited = int(info.storage_free * STORAGE_SLACK), "storage"
    if size > MAX_USEFUL_BPW * n_params / 8:
        size, limited = int(MAX_USEFUL_BPW * n_params / 8), "the model: every tensor at its widest 8-bit type fits"
    return FitTarget(device=info.id, size=int(size), n_ctx=n_ctx, ram_bytes=int(ram), ram_kind=kind,
                     weight_room=int(room), storage_free=info.storage_free, limited_by=limited, parts=parts)


def check_fit(art: Any, target: FitTarget) -> tuple[bool, str]:
    """Whether the written artifact fits the target, by the runtime's memory model on the real file."""
    runtime = backend_for_format(art.format)
    est = runtime.memory_estimate(art.model_file, target.n_ctx)  # type: ignore[attr-defined]
    need = int(est.to_json().get("ram_required_bytes", est.ram_bytes))
    size = sum(p.stat().st_size for p in art.path.rglob("*") if p.is_file())
    ok = need <= target.ram_bytes and (target.storage_free is None or size <= target.storage_free)
    return ok, (f"needs about {need / MB:,.0f} MB RAM at context {target.n_ctx} of {target.ram_bytes / MB:,.0f} MB "
                f"{target.ram_kind} on {target.device}; {size / MB:,.1f} MB on disk")


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_file_size(text: str) -> int:
    """``"90MB"`` -> 90,000,000 bytes. MB and GB count in powers of 1000, as edgekit prints file sizes;
    MiB and GiB in powers of 1024."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise InputError(f"--size {text!r} is not a size like 90MB, 1.5GB or 512MiB")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise InputError("--size must be more than 0, e.g. --size 90MB")
    return size
