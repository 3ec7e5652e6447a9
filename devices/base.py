"""The device layer's shared pieces: what a device looks like, the platform registry, and the errors.

A *platform* (host, android, ios, ssh) discovers its devices and opens one by id. A *device* answers
``info()`` and offers the few remote file-system primitives a verified, resumable push needs
(``file_size``, ``append_from``, ``sha256``, ``rename``, ``makedirs``, ``remove``, ``run``). The push
logic itself (transfer.py) is written once against those primitives.
"""

from __future__ import annotations

import shlex
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgekit.errors import EdgekitError, InputError
from edgekit.registry import Registry

PLATFORMS: Registry[type[Platform]] = Registry(
    "device platform",
    ("edgekit.devices.host", "edgekit.devices.adb", "edgekit.devices.ios", "edgekit.devices.ssh"),
)
register_platform = PLATFORMS.register

# Callback for bytes moved: (bytes_done_in_this_call) -> None; raising from it aborts the transfer.
BytesFn = Callable[[int], None]


class Cancel(Protocol):
    def is_set(self) -> bool: ...


class DeviceError(EdgekitError):
    """A device could not be reached or refused an operation."""

    exit_code = 8


class DeviceDisconnected(DeviceError):
    """The link to the device dropped; a push keeps its partial file so the next push resumes."""


class DevicePermissionError(DeviceError):
    """The device refused to write where it was asked to."""


class VerificationError(DeviceError):
    """A file on the device does not hash to what was sent."""


class InsufficientMemoryError(DeviceError):
    """The artifact would not fit the device's RAM at the chosen context."""


class PushInProgress(DeviceError):
    """Another push into the same folder of the device holds its lock (see pushlock.py)."""


class PushCancelled(DeviceError):
    """The caller cancelled a push; the partial file stays on the device for resuming."""

    exit_code = 130


@dataclass(frozen=True)
class GpuInfo:
    name: str
    vram_total: int | None = None
    vram_free: int | None = None


@dataclass(frozen=True)
class DeviceInfo:
    """What edgekit knows about one device. Sizes are bytes; unknown values are None."""

    id: str
    platform: str
    name: str
    state: str = "ready"
    detail: str | None = None
    model: str | None = None
    os: str | None = None
    os_version: str | None = None
    arch: str | None = None
    abi: str | None = None
    soc: str | None = None
    cpu: str | None = None
    cpu_features: tuple[str, ...] = ()
    cores: int | None = None
    ram_total: int | None = None
    ram_available: int | None = None
    storage_path: str | None = None
    storage_total: int | None = None
    storage_free: int | None = None
    gpus: tuple[GpuInfo, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["cpu_features"] = list(self.cpu_features)
        d["gpus"] = [asdict(g) for g in self.gpus]
        return d


@dataclass
class Discovery:
    """The result of looking for devices: what was found and, per platform, why not more."""

    devices: list[DeviceInfo] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"devices": [d.to_json() for d in self.devices], "notes": dict(self.notes)}


@dataclass(frozen=True)
class RunResult:
    rc: int
    stdout: str
    stderr: str = ""

    @property
    def output(self) -> str:
        return (self.stdout + self.stderr).strip()


class Device(ABC):
    """An opened device. Remote paths are POSIX strings in the device's own file system."""

    platform: str = ""

    def __init__(self, ident: str) -> None:
        self.ident = ident

    @property
    def id(self) -> str:
        return f"{self.platform}:{self.ident}" if self.ident else self.platform

    @abstractmethod
    def info(self) -> DeviceInfo: ...

    @abstractmethod
    def default_dest(self) -> str: ...

    @abstractmethod
    def run(self, command: str, timeout: float | None = 600) -> RunResult:
        """Run a shell command line on the device."""

    @abstractmethod
    def append_from(self, local: Path, remote: str, offset: int, on_bytes: BytesFn, cancel: Cancel | None) -> None:
        """Append ``local[offset:]`` to ``remote`` (which holds exactly ``offset`` bytes already)."""

    def resolve(self, path: str) -> str:
        """An absolute form of a user-given remote path (SSH expands ``~``)."""
        return path

    def file_size(self, path: str) -> int | None:
        r = self.run(f"stat -c %s {shlex.quote(path)} 2>/dev/null")
        return int(r.stdout.split()[0]) if r.rc == 0 and r.stdout.strip().isdigit() else None

    def sha256(self, path: str) -> str:
        r = self.run(f"sha256sum {shlex.quote(path)}", timeout=None)
        digest = r.stdout.split()[0] if r.rc == 0 and r.stdout.split() else ""
        if len(digest) != 64:
            raise DeviceError(f"cannot hash {path} on {self.id}: {r.output or 'sha256sum failed'}; "
                              "the device needs sha256sum (toybox/coreutils)")
        return digest

    def makedirs(self, path: str) -> None:
        self._check(self.run(f"mkdir -p {shlex.quote(path)}"), f"create {path}")

    def is_dir(self, path: str) -> bool:
        return self.run(f"test -d {shlex.quote(path)}").rc == 0

    def rename(self, src: str, dst: str) -> None:
        """Put ``src`` in place of the file ``dst``; a folder at ``dst`` is refused (``mv`` would move ``src``
        into it)."""
        q = shlex.quote
        r = self.run(f"if [ -d {q(dst)} ]; then exit {_FOLDER_RC}; fi; mv -f {q(src)} {q(dst)}")
        if r.rc == _FOLDER_RC:
            raise DeviceError(folder_in_the_way(self.id, dst))
        self._check(r, f"rename {src} to {dst}")

    def remove(self, path: str) -> None:
        self.run(f"rm -f {shlex.quote(path)}")

    def free_bytes(self, path: str) -> int | None:
        """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
        r = self.run(f"d={shlex.quote(path)}; while [ ! -d \"$d\" ]; do d=$(dirname \"$d\"); done; df -k \"$d\"")
        return parse_df_k(r.stdout)[1] if r.rc == 0 else None

    def close(self) -> None:  # noqa: B027 - most devices hold nothing to release
        """Release connections; the device object is unusable afterwards."""

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, r: RunResult, what: str) -> None:
        if r.rc == 0:
            return
        msg = r.output or f"exit status {r.rc}"
        if "permission denied" in msg.lower() or "not permitted" in msg.lower() or "read-only" in msg.lower():
            raise DevicePermissionError(
                f"{self.id} refused to {what}: {msg}; choose a destination the device lets you write "
                f"with --dest (default {self.default_dest()})")
        raise DeviceError(f"{self.id} could not {what}: {msg}")


_FOLDER_RC = 21  # the shell's answer "the target is a folder" in rename


def folder_in_the_way(device_id: str, path: str) -> str:
    return (f"{path} is a folder on {device_id}, where a file of the artifact goes; remove that folder there, or "
            "push with --name (or --dest) to put the artifact somewhere else")


class Platform(ABC):
    """One kind of device: finds them and opens them by id (the part after ``platform:``)."""

    name: str = ""

    @abstractmethod
    def discover(self) -> tuple[list[DeviceInfo], str | None]:
        """Devices found, and a note saying why there are none or what is missing (or None)."""

    @abstractmethod
    def open(self, ident: str) -> Device: ...


def parse_df_k(text: str) -> tuple[int | None, int | None]:
    """(total, free) bytes from ``df -k PATH`` output (coreutils, toybox and busybox alike)."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if len(lines) < 2:
        return None, None
    # A long device name wraps onto its own line in busybox: join the data lines.
    fields = " ".join(lines[1:]).split()
    nums = [f for f in fields if f.isdigit()]
    if len(nums) < 3:
        return None, None
    return int(nums[0]) * 1024, int(nums[2]) * 1024


def parse_meminfo(text: str) -> tuple[int | None, int | None]:
    """(MemTotal, MemAvailable) bytes from /proc/meminfo."""
    vals: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            vals[key.strip()] = int(parts[0]) * 1024
    return vals.get("MemTotal"), vals.get("MemAvailable", vals.get("MemFree"))


ARCH_ALIASES = {"arm64": "aarch64", "aarch64": "aarch64", "arm64-v8a": "aarch64", "x86_64": "x86_64",
                "amd64": "x86_64", "armv7l": "armv7", "armv7": "armv7", "armeabi-v7a": "armv7", "armv8l": "armv7",
                "i686": "x86", "i386": "x86", "x86": "x86", "riscv64": "riscv64"}


def normalize_arch(machine: str | None) -> str | None:
    if not machine:
        return None
    return ARCH_ALIASES.get(machine.strip().lower(), machine.strip().lower())


def split_device_id(device_id: str) -> tuple[str, str]:
    """``"android:R58M"`` -> ``("android", "R58M")``; ``"host"`` -> ``("host", "")``."""
    platform, _, ident = device_id.partition(":")
    if platform.lower() not in PLATFORMS:
        raise InputError(f"unknown device {device_id!r}: ids look like host, android:SERIAL, ios:UDID or "
                         f"ssh:NAME; run 'edgekit devices' to list them")
    if platform.lower() != "host" and not ident:
        raise InputError(f"device id {device_id!r} needs a name after '{platform}:'; run 'edgekit devices'")
    return platform.lower(), ident


def PushCancelledCheck(cancel: Cancel | None) -> None:  # noqa: N802 - reads as a statement at call sites
    """Raise :class:`PushCancelled` when ``cancel`` is set (checked between blocks of a transfer)."""
    if cancel is not None and cancel.is_set():
        raise PushCancelled("push cancelled; the partial file stays on the device and the next push resumes it")
