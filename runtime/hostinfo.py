"""Facts about this host that profiles and plans need, measured once and cached.

* :func:`host_fingerprint`: CPU, cores, RAM, OS, GPUs - the key that history rows are compared by.
* :func:`memory_bandwidth`: host memory bandwidth (STREAM-style copy over all cores, best of a few),
  measured once per host and cached in ``edgekit_home()/host.json``; the roofline's denominator.
* :func:`baseline_rss`: resident memory of a llama.cpp worker before it loads a model (Python plus
  the llama.cpp libraries), measured once per host and llama-cpp-python version, cached.
* :func:`devices`: the ggml devices this llama.cpp build sees (CPU, CUDA/Metal/Vulkan GPUs, memory).
* :class:`EnergyMeter`: Linux RAPL powercap counters when readable; otherwise it says why not.
* :func:`pick_threads`: how many CPU threads a run should use: the physical cores, fewer when other
  programs keep the CPUs busy (threads that must take turns on a core wait on each other at every step).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from edgekit.errors import BackendCrashed, BackendError, EdgekitError, InputError, notice, require
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
        edgekit_home(create=True)
        with atomic_file(_cache_path()) as tmp:
            tmp.write_text(json.dumps(data, indent=1))
    except (OSError, EdgekitError):
        pass  # a read-only or full cache only costs a re-measurement


def _probe() -> dict[str, Any]:
    """Ask a fresh llama.cpp worker for its devices and its resident memory before any model."""
    from edgekit.runtime import llamacpp_build, llamacpp_errors

    try:
        res = subprocess.run([*llamacpp_build.wrapper_prefix(), sys.executable, str(_WORKER), "--devices"],
                             capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendError(f"could not start a llama.cpp worker to list devices: {exc}") from exc
    if res.returncode < 0:
        raise BackendCrashed(llamacpp_errors.crash_message(res.returncode, "listing its devices", ""))
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


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask: a container's cpuset, ``taskset``)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def physical_cores() -> int:
    """Physical cores this process may use: SMT siblings share one core's arithmetic units, so a thread
    per logical CPU only adds contention. Falls back to the logical count when psutil cannot tell."""
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except (ImportError, OSError, RuntimeError):
        physical = None
    logical = os.cpu_count() or 1
    usable = usable_cpus()
    if not physical:
        return usable
    return max(1, min(usable, round(usable * physical / logical)))  # a cpuset keeps its share of SMT pairs


def busy_cpus(interval: float = 0.1) -> float:
    """How many of the usable CPUs other programs keep busy now, measured over ``interval`` seconds
    (this process sleeps meanwhile, so it is not counted).

    Measured, not read from the load average: the 1-minute load lags by a minute either way (right after
    a conversion it still says "busy" and would starve the next run; a job started seconds ago does not
    show yet), counts processes waiting on the disk, and inside a container it is the whole host's."""
    import psutil

    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = None
    per_cpu = psutil.cpu_percent(interval=interval, percpu=True)
    if allowed is not None and max(allowed, default=-1) < len(per_cpu):
        per_cpu = [per_cpu[i] for i in allowed]
    return sum(per_cpu) / 100.0


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count to use and, when other programs compete for the CPUs, one line saying so
    (``adapted``: the default was lowered; otherwise the count asked for was kept)."""

    threads: int
    note: str | None = None
    adapted: bool = False


# Half a CPU of slack: a desktop's background work (a browser tab, an editor) should not cost a thread.
_SLACK = 0.5


def pick_threads(requested: int | None = None, *, adapt: bool = True, busy: float | None = None) -> ThreadChoice:
    """Threads for llama.cpp, onnxruntime or PyTorch work.

    ``requested`` None: the physical cores, lowered (``adapt``) to the CPUs other programs leave free, at
    least one; ``requested`` N: N, with a note when N threads cannot each have a CPU. Oversubscription is
    not a slowdown in proportion: llama.cpp's threads meet at a barrier after every matrix product and
    spin there, so a thread waiting for a time slice stalls all the others (SmolLM2-135M Q4_K_M, 64 tokens,
    on a 2-core machine that other programs kept busy: two threads 0.6-2.3 tok/s with a 9-17 s first
    token, one thread 6-28 tok/s with a 0.3-1.3 s first token)."""
    default = physical_cores()
    want = requested or default
    if want <= 1:
        return ThreadChoice(1)
    usable = usable_cpus()
    busy = busy_cpus() if busy is None else busy
    free = usable - busy
    if want <= free + _SLACK:
        return ThreadChoice(want)
    fits = max(1, int(free + _SLACK))
    load = f"{busy:.1f} of {usable} CPUs are busy with other programs"
    if requested is None and adapt:
        return ThreadChoice(fits, f"{load}: using {fits} thread{'s' * (fits > 1)} instead of {default} "
                                  f"(-t {default} to use them all anyway)", adapted=True)
    return ThreadChoice(want, f"{load}: {want} threads will wait on each other and can run many times slower; "
                              f"use -t {fits} (or stop the other work)")


_busy_cache: tuple[float, float] | None = None  # (monotonic time, busy CPUs): one measurement serves a sweep
_said: set[str] = set()


def _busy_now() -> float:
    global _busy_cache
    now = time.monotonic()
    if _busy_cache is None or now - _busy_cache[0] > 10:
        _busy_cache = (now, busy_cpus())
    return _busy_cache[1]


def _say_once(note: str, warn: Callable[[str], None] | None) -> None:
    if note in _said:
        return
    _said.add(note)
    if warn is not None:
        try:
            warn(note)
        except Warning:  # ``warn`` went through the warning filters and an `error` one raised it: still a note
            notice(note, stacklevel=4)
    else:
        notice(note, stacklevel=4)


# More threads than this is a typo, not a machine: -t 100000 exhausted the host's thread limit and crashed
# OpenBLAS. Not tied to this host's cores, since profile --device runs threads on another machine.
MAX_THREADS = 1024


def check_threads(requested: int | None, flag: str = "--threads") -> int | None:
    """``requested`` when it is None (the default: the physical cores) or a whole number in
    1..:data:`MAX_THREADS`; else an :class:`InputError` that gives the range."""
    if requested is None:
        return None
    if isinstance(requested, bool) or not isinstance(requested, int) or not 1 <= requested <= MAX_THREADS:
        raise InputError(f"{flag} must be a whole number from 1 to {MAX_THREADS} (this machine has "
                         f"{os.cpu_count() or '?'} CPUs), got {requested!r}; leave it out for the physical cores")
    return requested


def thread_count(requested: int | None, warn: Callable[[str], None] | None = None, *, adapt: bool = True) -> int:
    """:func:`pick_threads` for a backend about to start: its note goes to ``warn`` (default: an
    :class:`~edgekit.errors.EdgekitWarning`, never raised as an error), once per process; a measurement is
    reused for 10 seconds, so a profile sweep that opens one backend after another measures once (and never
    its own workers)."""
    check_threads(requested)
    if (requested or physical_cores()) <= 1:
        return 1
    choice = pick_threads(requested, adapt=adapt, busy=_busy_now())
    if choice.note:
        _say_once(choice.note, warn)
    return choice.threads


@contextlib.contextmanager
def torch_threads(torch: Any, n: int) -> Iterator[int]:
    """PyTorch's intra-op pool (one per process) sized to ``n`` within the block, then the caller's size
    again: an SDK call or a backend's lifetime must not leave a host application's setting changed."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def use_torch_threads(requested: int | None = None) -> int:
    """Size PyTorch's intra-op pool (process-wide) for calibration and other PyTorch work: ``requested``
    or the physical cores. Not lowered on a busy machine: PyTorch's pool does not stall as llama.cpp's
    does (GPTQ of SmolLM2-135M with 8x128 calibration tokens on a 2-core machine that other programs
    kept busy: 2 threads 93 s, 1 thread 107 s); the note only says it will take longer. Imports torch:
    call only where PyTorch work follows."""
    check_threads(requested)
    torch = require("torch", "torch")

    n = requested or physical_cores()
    torch.set_num_threads(n)
    busy, usable = _busy_now(), usable_cpus()
    if busy > _SLACK + max(0, usable - n):
        _say_once(f"{busy:.1f} of {usable} CPUs are busy with other programs: PyTorch work (calibration, "
                  "pruning, healing) will take longer than on a quiet machine", None)
    return n
