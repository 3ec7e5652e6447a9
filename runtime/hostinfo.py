"""Facts about this host that profiles and plans need, measured once and cached.

* :func:`host_fingerprint`: CPU, cores, RAM, OS, GPUs - the key that history rows are compared by.
* :func:`memory_bandwidth`: host memory bandwidth (STREAM-style copy over all cores, best of a few),
  measured once per host and cached in ``edgekit_home()/host.json``; the roofline's denominator.
* :func:`baseline_rss`: resident memory of a llama.cpp worker before it loads a model (Python plus
  the llama.cpp libraries), measured once per host and llama-cpp-python version, cached.
* :func:`devices`: the ggml devices this llama.cpp build sees (CPU, CUDA/Metal/Vulkan GPUs, memory).
* :class:`EnergyMeter`: Linux RAPL powercap counters when readable; otherwise it says why not.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from edgekit.errors import BackendCrashed, BackendError
from edgekit.fsutil import atomic_file, edgekit_home

RAPL_ROOT = Path("/sys/class/powercap")
_WORKER = Path(__file__).with_name("_llamacpp_worker.py")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def _llama_version() -> str:
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return ""


def _cache_path() -> Path:
    return edgekit_home() / "host.json"


def _load_cache() -> dict[str, Any]:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(key: str, value: Any) -> None:
    data = _load_cache()
    data[key] = value
    try:
        with atomic_file(_cache_path()) as tmp:
            tmp.write_text(json.dumps(data, indent=1))
    except OSError:
        pass  # a read-only cache only costs a re-measurement


def _probe() -> dict[str, Any]:
    """Ask a fresh llama.cpp worker for its devices and its resident memory before any model."""
    from edgekit.runtime import llamacpp_build

    try:
        res = subprocess.run([*llamacpp_build.wrapper_prefix(), sys.executable, str(_WORKER), "--devices"],
                             capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendError(f"could not start a llama.cpp worker to list devices: {exc}") from exc
    if res.returncode < 0:
        raise BackendCrashed(llamacpp_build.crash_message(res.returncode, "listing its devices", ""))
    if res.returncode != 0:
        tail = res.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise BackendError(f"llama.cpp could not list its devices ({tail[0][:200]}); "
                           f"reinstall it with `{llamacpp_build.rebuild_command()}`")
    return json.loads(res.stdout.decode().strip().splitlines()[-1])


_probe_cache: dict[str, Any] = {}


def devices() -> list[dict[str, Any]]:
    """ggml devices of this llama.cpp build: ``{"name", "description", "kind", "free_bytes", "total_bytes"}``."""
    if "devices" not in _probe_cache:
        _probe_cache.update(_probe())
    return list(_probe_cache["devices"])


def gpu_devices(strict: bool = True) -> list[dict[str, Any]]:
    """The GPUs llama.cpp can offload to (empty on a CPU-only build or host). ``strict=False``: also
    empty when llama.cpp cannot start, for arithmetic that must not need a working runtime (plans)."""
    try:
        return [d for d in devices() if d["kind"] in ("gpu", "igpu")]
    except BackendError:
        if strict:
            raise
        return []


def host_fingerprint() -> dict[str, Any]:
    """What identifies this host's performance: CPU, cores, RAM, OS, GPUs, llama-cpp-python version."""
    try:
        gpus = [d["description"] or d["name"] for d in gpu_devices()]
    except BackendError:
        gpus = []
    info = {"hostname": platform.node(), "cpu": cpu_name(), "cores": os.cpu_count() or 1, "ram_bytes": _ram_bytes(),
            "os": f"{platform.system()}-{platform.release()}", "machine": platform.machine(), "gpus": gpus,
            "llama_cpp_python": _llama_version()}
    key = json.dumps({k: info[k] for k in ("hostname", "cpu", "cores", "ram_bytes", "machine", "gpus")}, sort_keys=True)
    info["fingerprint"] = hashlib.sha256(key.encode()).hexdigest()[:16]
    return info


# A llama.cpp worker's resident memory before a model (Python, numpy, llama-cpp-python's libraries): 43 MiB
# measured on x86-64 Linux with llama-cpp-python 0.3.36. Plans use it where llama.cpp cannot start.
TYPICAL_BASELINE_RSS = 44 << 20


def baseline_rss(refresh: bool = False, strict: bool = True) -> int:
    """Resident bytes of a llama.cpp worker before it loads a model; measured once per host and version.
    ``strict=False``: :data:`TYPICAL_BASELINE_RSS` when llama.cpp cannot start (plans are arithmetic)."""
    key = f"baseline_rss/{_llama_version()}/{sys.version_info[0]}.{sys.version_info[1]}"
    cached = _load_cache().get(key)
    if cached and not refresh:
        return int(cached)
    try:
        value = int(_probe()["baseline_rss"])
    except BackendError:
        if strict:
            raise
        return TYPICAL_BASELINE_RSS
    _save_cache(key, value)
    return value


def measure_bandwidth(size_bytes: int = 256 << 20, threads: int | None = None, repeats: int = 5) -> float:
    """Host memory bandwidth in bytes/s: a copy split over ``threads`` (numpy releases the GIL), counting
    bytes read + written (STREAM's convention), best of ``repeats``."""
    import numpy as np

    threads = threads or os.cpu_count() or 1
    src = np.ones(size_bytes // 8)
    dst = np.empty_like(src)
    bounds = np.linspace(0, len(src), threads + 1).astype(int)

    def copy(lo: int, hi: int) -> None:
        np.copyto(dst[lo:hi], src[lo:hi])

    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=copy, args=(bounds[i], bounds[i + 1])) for i in range(threads)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, 2 * src.nbytes / (time.perf_counter() - t0))
    return best


def memory_bandwidth(refresh: bool = False) -> float:
    """This host's memory bandwidth (bytes/s), measured once and cached by host fingerprint."""
    fp = host_fingerprint()["fingerprint"]
    key = f"bandwidth/{fp}"
    cached = _load_cache().get(key)
    if cached and not refresh:
        return float(cached)
    value = measure_bandwidth()
    _save_cache(key, value)
    return value


class EnergyMeter:
    """Package energy from Linux RAPL (``/sys/class/powercap/intel-rapl:N/energy_uj``).

    ``available`` says whether it can be read; ``reason`` why not. ``zones`` are (counter path,
    wrap range) pairs for the llama.cpp worker to read around its timed loop.
    """

    def __init__(self, root: Path = RAPL_ROOT) -> None:
        self.zones: list[tuple[str, int]] = []
        self.reason = ""
        if not root.is_dir():
            self.reason = f"no RAPL powercap on this host ({root} does not exist)"
            return
        for zone in sorted(root.glob("intel-rapl:*")):
            if zone.name.count(":") != 1:  # package zones only; subzones (core, uncore) are inside them
                continue
            counter, wrap = zone / "energy_uj", zone / "max_energy_range_uj"
            try:
                int(counter.read_text())
                self.zones.append((str(counter), int(wrap.read_text())))
            except (OSError, ValueError) as exc:
                self.reason = f"RAPL counters are not readable ({exc.__class__.__name__}: run as root or "\
                              "grant read access to energy_uj)"
                self.zones = []
                return
        if not self.zones:
            self.reason = f"no RAPL package zones under {root}"

    @property
    def available(self) -> bool:
        return bool(self.zones)
