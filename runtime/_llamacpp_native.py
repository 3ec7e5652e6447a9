"""What the llama.cpp worker asks of its process and of ggml: resident memory, RAPL energy counters, the
devices and buffer types of this llama.cpp build, and llama.cpp's tensor buffer-type overrides.

Imported by the worker process only (ctypes and llama_cpp's ggml bindings; nothing from edgekit).
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any


def install_overrides(llama_mod: Any, overrides: list[tuple[str, str]]) -> Any:
    """Pass llama.cpp's tensor buffer-type overrides (``-ot PATTERN=BUFT``) through the model params.

    llama-cpp-python 0.3.36 declares ``tensor_buft_overrides`` as a plain pointer and never sets
    it, so the NULL-terminated array of {pattern, buffer type} is built here; the caller keeps the
    returned objects alive as long as the model.
    """
    bufts = buffer_types()
    wanted = {b.upper() for _, b in overrides}
    missing = sorted(wanted - set(bufts))
    if missing:
        raise ValueError(f"unknown buffer type(s) {', '.join(missing)} for a tensor override; "
                         f"this llama.cpp has: {', '.join(sorted(bufts))}")

    class Override(ctypes.Structure):
        _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]

    arr = (Override * (len(overrides) + 1))()
    keep = [p.encode("utf-8") for p, _ in overrides]
    for i, (_, b) in enumerate(overrides):
        arr[i].pattern = keep[i]
        arr[i].buft = bufts[b.upper()]
    arr[len(overrides)].pattern = None
    previous = llama_mod.llama_cpp.llama_model_default_params

    def with_overrides() -> Any:
        params = previous()
        params.tensor_buft_overrides = ctypes.cast(arr, ctypes.c_void_p)
        return params

    llama_mod.llama_cpp.llama_model_default_params = with_overrides
    return keep, arr


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """This process's resident set size now."""
    value = _status_kb("VmRSS")
    if value is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return value


def reset_peak_rss() -> bool:
    """Start this process's peak resident set size over from its current RSS (Linux: writing 5 to
    /proc/self/clear_refs resets VmHWM), so that the next :func:`peak_rss_bytes` is the peak since now.
    False where it cannot be reset (no /proc, or a kernel that refuses): the peak stays the process's
    lifetime peak there, which is what a row measured after a bigger test then reports."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident set size since it started, or since the last :func:`reset_peak_rss`."""
    value = _status_kb("VmHWM")
    if value is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return value


def read_rapl(zones: list[tuple[str, int]]) -> list[int] | None:
    if not zones:
        return None
    try:
        return [int(open(path).read()) for path, _ in zones]
    except (OSError, ValueError):
        return None


def rapl_joules(e0: list[int] | None, e1: list[int] | None, zones: list[tuple[str, int]]) -> float | None:
    """Energy between two RAPL readings (microjoule counters that wrap at their max range)."""
    if e0 is None or e1 is None:
        return None
    total = 0
    for a, b, (_, wrap) in zip(e0, e1, zones, strict=True):
        total += b - a if b >= a else b + wrap - a
    return total / 1e6


def _ggml_devices() -> Any:
    """libggml with the device-enumeration signatures declared (ctypes needs them for 64-bit pointers)."""
    from llama_cpp import _ggml

    g = _ggml.libggml
    g.ggml_backend_dev_count.restype = ctypes.c_size_t
    g.ggml_backend_dev_get.restype = ctypes.c_void_p
    g.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    return g


def buffer_types() -> dict[str, int]:
    """ggml buffer type name (upper case) -> pointer, over every device of this llama.cpp build."""
    g = _ggml_devices()
    g.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    g.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    g.ggml_backend_buft_name.restype = ctypes.c_char_p
    g.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    out = {}
    for i in range(g.ggml_backend_dev_count()):
        buft = g.ggml_backend_dev_buffer_type(g.ggml_backend_dev_get(i))
        if buft:
            out[g.ggml_backend_buft_name(buft).decode().upper()] = buft
    return out


def devices() -> list[dict[str, Any]]:
    """Every ggml device this llama.cpp build sees: name, kind (cpu/gpu/igpu/accel), memory."""
    g = _ggml_devices()
    g.ggml_backend_dev_name.restype = ctypes.c_char_p
    g.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    g.ggml_backend_dev_description.restype = ctypes.c_char_p
    g.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    g.ggml_backend_dev_type.restype = ctypes.c_int
    g.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    g.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                          ctypes.POINTER(ctypes.c_size_t)]
    kinds = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}
    out = []
    for i in range(g.ggml_backend_dev_count()):
        dev = g.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        g.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append({"name": g.ggml_backend_dev_name(dev).decode(), "description":
                    (g.ggml_backend_dev_description(dev) or b"").decode("utf-8", "replace"),
                    "kind": kinds.get(g.ggml_backend_dev_type(dev), "other"),
                    "free_bytes": free.value, "total_bytes": total.value})
    return out
