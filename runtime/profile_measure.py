"""How the profiler times one test and what it derives from the samples: llama-bench's tests inside the
llama.cpp worker (its ``bench`` op) or through ``Backend.reset()`` / ``decode()`` in this process, peak
resident memory, RAPL energy, and the CPU roofline (bytes read per token over host bandwidth).

``ctx`` is :mod:`.profile`'s run context: ``cfg`` (the :class:`.profile.ProfileConfig`), ``cancelled()``,
``energy()`` (the RAPL meter) and ``bandwidth()`` (this host's, measured once).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from edgekit.artifact import Artifact
from edgekit.errors import EdgekitError
from edgekit.runtime.profile_schema import ProfileRow, TestSpec


def run_worker_test(ctx: Any, backend: Any, test: TestSpec, row: ProfileRow) -> None:
    cfg = ctx.cfg
    meter = ctx.energy() if cfg.energy else None
    joules: list[float] = []

    def on_rep(rep: dict[str, Any]) -> None:
        row.samples_s.append(float(rep["seconds"]))
        if rep.get("ttft") is not None:
            row.ttft_samples_s.append(float(rep["ttft"]))
        if rep.get("peak_rss"):
            row.peak_rss_bytes = int(rep["peak_rss"])
        if rep.get("joules") is not None:
            joules.append(float(rep["joules"]))

    res = backend.bench(test.n_prompt, test.n_gen, test.n_depth, reps=cfg.reps, warmup=cfg.warmup, seed=cfg.seed,
                        rapl=meter.zones if meter is not None and meter.available else (),
                        on_rep=on_rep, cancel=ctx.cancelled)
    if res.get("peak_rss"):
        row.peak_rss_bytes = int(res["peak_rss"])
    if res["cancelled"]:
        row.status = "interrupted"
    if meter is not None:
        row.energy = _energy_block(meter, joules, row)


def run_generic_test(ctx: Any, backend: Any, test: TestSpec, row: ProfileRow) -> None:
    """The same tests on ``Backend.reset()`` / ``decode()``: any backend, timed in this process."""
    cfg = ctx.cfg
    rng = random.Random(cfg.seed)
    n_vocab = backend.n_vocab

    def toks(n: int) -> list[int]:
        return [rng.randrange(n_vocab) for _ in range(n)]

    in_process = _in_this_process(backend)
    if in_process:  # this row's peak, not an earlier test's (the llama.cpp worker resets its own in ``bench``)
        from edgekit.runtime._llamacpp_native import reset_peak_rss

        reset_peak_rss()
    if cfg.warmup:
        backend.reset()
        if test.n_prompt:
            backend.decode(toks(min(32, test.n_prompt)))
        if test.n_gen:
            backend.decode(toks(1))
    for _ in range(cfg.reps):
        if ctx.cancelled():
            row.status = "interrupted"
            break
        backend.reset()
        if test.n_depth:
            backend.decode(toks(test.n_depth))
        prompt = toks(test.n_prompt)
        t0 = time.perf_counter()
        if prompt:
            backend.decode(prompt)
            row.ttft_samples_s.append(time.perf_counter() - t0)
        for tok in toks(test.n_gen):
            if ctx.cancelled():
                break
            backend.decode([tok])
        seconds = time.perf_counter() - t0
        if ctx.cancelled():
            row.status = "interrupted"
            break
        row.samples_s.append(seconds)
    row.peak_rss_bytes = _peak_rss(backend)
    if cfg.energy:
        row.energy = {"available": False, "reason": "energy is measured on the llama.cpp worker path only"}


def _in_this_process(backend: Any) -> bool:
    """The backend computes in this process (no worker of its own whose memory it reports)."""
    from edgekit.runtime.base import ReportsMemory

    return not isinstance(backend, ReportsMemory) and not getattr(backend, "pid", None)


def _peak_rss(backend: Any) -> int | None:
    """Peak RSS of the process holding the model: the backend's worker if it has one, else this one. Both
    reset the peak before each test (Linux's /proc/self/clear_refs), so a row's peak is reached during its
    own test; memory an earlier test made resident and the runtime keeps (llama.cpp's compute buffer,
    onnxruntime's arena, both allocated once per context) is still resident then, so it counts. Where the
    peak cannot be reset (not Linux), it is the process's peak so far."""
    from edgekit.runtime.base import ReportsMemory

    if isinstance(backend, ReportsMemory):
        try:
            return int(backend.memory()["peak_rss"])
        except (EdgekitError, KeyError, TypeError):
            pass
    pid = getattr(backend, "pid", None)
    path = f"/proc/{pid}/status" if pid else "/proc/self/status"
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _energy_block(meter: Any, joules: list[float], row: ProfileRow) -> dict[str, Any]:
    if not meter.available:
        return {"available": False, "reason": meter.reason}
    if not joules:
        return {"available": False, "reason": "RAPL counters could not be read during the test"}
    mean_j = sum(joules) / len(joules)
    tokens = row.n_prompt + row.n_gen
    return {"available": True, "source": "rapl", "scope": "CPU package (whole host)", "joules": mean_j,
            "joules_per_token": mean_j / tokens if tokens else None}


def roofline(ctx: Any, art: Artifact, row: ProfileRow, test: TestSpec) -> None:
    """Roofline for generation tests on the CPU: bytes read per token over host bandwidth."""
    from edgekit.runtime.base import MemoryModel, backend_for_format

    backend_cls = backend_for_format(art.format, ctx.cfg.backend)
    if not ctx.cfg.roofline or not test.n_gen or test.n_prompt or not isinstance(backend_cls, MemoryModel):
        return
    if row.config.get("n_gpu_layers"):
        row.roofline = {"available": False, "reason": "GPU bandwidth is not measured; roofline covers CPU runs"}
        return
    per_token = backend_cls.decode_bytes_per_token(art.model_file, test.n_depth + test.n_gen // 2,
                                                   row.config["n_ctx"], row.config.get("type_k", "f16"),
                                                   row.config.get("type_v", "f16"))
    if row.config.get("n_expert_used") is not None:  # --experts: the experts read are the ones run, not the file's
        from edgekit.runtime.memory import MemoryConfig, decode_bytes_per_token, read_shape

        shape = read_shape(art.model_file, row.config["n_expert_used"])
        reads = decode_bytes_per_token(shape, test.n_depth + test.n_gen // 2, MemoryConfig(
            n_ctx=row.config["n_ctx"], type_k=row.config.get("type_k", "f16"), type_v=row.config.get("type_v", "f16")))
        per_token = int(reads["cpu"] + reads["gpu"])
    bw = ctx.bandwidth()
    ceiling = bw / per_token
    tps, _ = row.tps
    row.roofline = {"available": True, "bytes_per_token": int(per_token), "bandwidth_Bps": bw,
                    "ceiling_tps": ceiling, "fraction": (tps / ceiling) if tps else None}
