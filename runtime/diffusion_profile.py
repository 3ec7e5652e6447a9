"""``edgekit profile`` of a diffusion model: load time, latency per image and per step, peak memory.

Each configuration (batch size x DeepCache interval) samples the model's default steps ``reps`` times after
one untimed run; the report gives medians. Per-step times are split into full and shallow (DeepCache) steps,
so the cost of the deep part is visible. Peak memory is this process's high-water mark (VmHWM), reset after
loading where Linux allows, so it covers the model's sampling rather than what ran before.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from edgekit.converters.diffusion.sampler import SampleTrace
from edgekit.errors import InputError
from edgekit.runtime.diffusion import open_diffusion

SCHEMA = "edgekit.profile.diffusion/1"


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def profile_diffusion(target: str | Path, *, batches: tuple[int, ...] = (1, 8), reps: int = 5, steps: int | None = None,
                      cache_intervals: tuple[int, ...] = (1,), threads: int | None = None, seed: int = 0,
                      progress: Any = None) -> dict[str, Any]:
    """Time sampling of ``target`` for each batch size and DeepCache interval; see the module docstring."""
    if reps < 1 or any(b < 1 for b in batches) or any(k < 1 for k in cache_intervals):
        raise InputError("--reps, batch sizes and cache intervals must be at least 1")
    rss0 = _status("VmRSS")
    t0 = time.perf_counter()
    with open_diffusion(target, threads=threads) as model:
        load_s = time.perf_counter() - t0
        rss_loaded = _status("VmRSS")
        reset = _reset_peak()
        rows = []
        configs = [(b, k) for k in cache_intervals for b in batches]
        for i, (batch, interval) in enumerate(configs):
            cfg = model.config(steps, seed, interval)
            labels = model.labels(batch, None)
            model.generate(batch, labels, cfg)  # warm-up: allocations, thread pools
            seconds, full_ms, shallow_ms = [], [], []
            for _ in range(reps):
                trace = SampleTrace()
                start = time.perf_counter()
                model.generate(batch, labels, cfg, trace)
                seconds.append(time.perf_counter() - start)
                full_ms += [1000 * s for s, f in zip(trace.step_seconds, trace.full, strict=True) if f]
                shallow_ms += [1000 * s for s, f in zip(trace.step_seconds, trace.full, strict=True) if not f]
            med = statistics.median(seconds)
            rows.append({"batch": batch, "cache_interval": interval, "steps": cfg.steps, "reps": reps,
                         "s_per_image": med / batch, "ms_per_step": 1000 * med / cfg.steps,
                         "ms_full_step": statistics.median(full_ms) if full_ms else None,
                         "ms_shallow_step": statistics.median(shallow_ms) if shallow_ms else None,
                         "images_per_s": batch / med})
            if progress is not None:
                progress("profiling", i + 1, len(configs))
        return {"schema": SCHEMA, "artifact": str(target), "runtime": model.name,
                "threads": model.threads, "sampler": model.defaults.sampler,
                "load_s": load_s, "rss_before_bytes": rss0, "rss_loaded_bytes": rss_loaded,
                "peak_rss_bytes": _status("VmHWM"), "peak_since": "load" if reset else "process start",
                "rows": rows}
