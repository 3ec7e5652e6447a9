"""This host: CPU model and ISA features, cores, RAM, GPUs (nvidia-smi), OS, free disk.

The host is also a device you can push to (a verified local copy), which keeps the push logic
testable without any link at all.
"""

from __future__ import annotations

import os
import platform as _platform
import shutil
import socket
import subprocess
from pathlib import Path

from edgekit.devices.base import (
    BytesFn,
    Cancel,
    Device,
    DeviceInfo,
    GpuInfo,
    Platform,
    PushCancelledCheck,
    RunResult,
    normalize_arch,
    register_platform,
)
from edgekit.fslimits import nearest_existing
from edgekit.fsutil import edgekit_home

# ISA flags that decide which kernels llama.cpp and onnxruntime can use.
INTERESTING_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                     "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd", "asimddp",
                     "asimdhp", "sve", "sve2", "i8mm", "bf16", "dotprod")


def cpu_from_proc(text: str) -> tuple[str | None, tuple[str, ...]]:
    """(CPU model, interesting ISA flags) from /proc/cpuinfo text (x86 "flags", Arm "Features")."""
    model = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and model is None:
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    return model, tuple(f for f in INTERESTING_FLAGS if f in flags)


def nvidia_gpus() -> tuple[GpuInfo, ...]:
    """GPUs as nvidia-smi reports them; () without nvidia-smi or when it fails."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return ()
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            mib = [int(p) * (1 << 20) if p.isdigit() else None for p in parts[1:]]
            gpus.append(GpuInfo(parts[0], mib[0], mib[1]))
    return tuple(gpus)


class HostDevice(Device):
    platform = "host"

    def __init__(self) -> None:
        super().__init__("")

    def default_dest(self) -> str:
        return str(edgekit_home() / "pushed")

    def info(self) -> DeviceInfo:
        import psutil

        try:
            model, flags = cpu_from_proc(Path("/proc/cpuinfo").read_text())
        except OSError:
            model, flags = _platform.processor() or None, ()
        vm = psutil.virtual_memory()
        dest = Path(self.default_dest())
        disk = shutil.disk_usage(nearest_existing(dest))  # a home whose cache is not made yet (or cannot be)
        uname = _platform.uname()
        board = None
        dt = Path("/proc/device-tree/model")
        if dt.exists():  # Raspberry Pi, Jetson and other device-tree boards name themselves here
            board = dt.read_bytes().rstrip(b"\0").decode(errors="replace")
        return DeviceInfo(
            id="host", platform="host", name=socket.gethostname(), model=board or model, os=uname.system,
            os_version=uname.release, arch=normalize_arch(uname.machine), soc=board, cpu=model,
            cpu_features=flags, cores=os.cpu_count(), ram_total=vm.total, ram_available=vm.available,
            storage_path=str(dest), storage_total=disk.total, storage_free=disk.free, gpus=nvidia_gpus())

    def run(self, command: str, timeout: float | None = 600) -> RunResult:
        p = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=timeout)
        return RunResult(p.returncode, p.stdout, p.stderr)

    def resolve(self, path: str) -> str:
        return str(Path(path).expanduser())

    def free_bytes(self, path: str) -> int | None:
        return shutil.disk_usage(nearest_existing(Path(path))).free

    def append_from(self, local: Path, remote: str, offset: int, on_bytes: BytesFn, cancel: Cancel | None) -> None:
        with open(local, "rb") as src, open(remote, "ab") as dst:
            src.seek(offset)
            while block := src.read(1 << 20):
                PushCancelledCheck(cancel)
                dst.write(block)
                on_bytes(len(block))


@register_platform("host")
class HostPlatform(Platform):
    name = "host"

    def discover(self) -> tuple[list[DeviceInfo], str | None]:
        return [HostDevice().info()], None

    def open(self, ident: str) -> Device:
        return HostDevice()
