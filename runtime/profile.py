"""The profiler: llama-bench's tests (pp N, tg N, pp N + tg M at a depth) on any artifact, with time to
first token, load time, peak resident memory, repetitions (mean, stddev), warm-up, sweeps over
threads / batch / context / depth / GPU layers, several artifacts interleaved, roofline and energy.

GGUF artifacts are timed inside the llama.cpp worker process (its ``bench`` op), so no pipe traffic
falls inside a timed region; other backends go through ``Backend.reset()`` / ``Backend.decode()``
(both in :mod:`.profile_measure`).
The row schema is :mod:`edgekit.runtime.profile_schema`; which path a backend takes is decided by the
capabilities it declares (:mod:`edgekit.runtime.base`), never by its format.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.artifact import Artifact, now_iso
from edgekit.errors import BackendError, EdgekitError, InputError
from edgekit.progress import ProgressFn
from edgekit.runtime.profile_measure import roofline, run_generic_test, run_worker_test
from edgekit.runtime.profile_schema import (
    SCHEMA,
    ProfileRow,
    TestSpec,
    from_llama_bench,
    mean_std,
    parse_tests,
    summarize,
)

__all__ = ["ProfileConfig", "ProfileInterrupted", "ProfileRow", "ProfileRun", "TestSpec", "from_llama_bench",
           "mean_std", "parse_tests", "profile", "summarize", "SCHEMA"]

RowFn = Callable[[ProfileRow], None]


@dataclass(frozen=True)
class ProfileConfig:
    """What to measure.

    tests: llama-bench tests (default pp512 and tg128). reps: timed repetitions per test. warmup: one
    short untimed run before each test. threads / batch / ctx / depth / gpu_layers: values to sweep
    (every combination is run); ctx None sizes the context to the largest test; depth is added to
    every test. offload_auto: GPU layers and tensor overrides from the offload planner instead of
    gpu_layers. method: "auto" (llama.cpp's in-worker loop for GGUF, else generic) or "generic"
    (``Backend.reset``/``decode``, any backend). energy / roofline: add those measurements.
    seed: random prompt tokens. backend_options: more keyword arguments for the backend. backend: the
    registered backend to use (None: the preferred one for each artifact's format).
    drafters: speculative decoding to measure ("ngram", or draft models' paths): for each, rows of greedy
    generations of ``gen_tokens`` from ``prompt`` with and without it (:mod:`.profile_drafting`).
    experts: values to sweep of the experts a mixture-of-experts GGUF runs per token (a count, "all", or None
    for the file's own; :func:`.llamacpp_decoding.experts_options`): a ``--sparse-ffn`` file's speed curve.
    """

    tests: tuple[TestSpec, ...] = (TestSpec(n_prompt=512), TestSpec(n_gen=128))
    reps: int = 5
    warmup: bool = True
    threads: tuple[int | None, ...] = (None,)
    batch: tuple[int, ...] = (512,)
    ctx: tuple[int | None, ...] = (None,)
    depth: tuple[int, ...] = (0,)
    gpu_layers: tuple[int, ...] = (0,)
    offload_auto: bool = False
    method: str = "auto"
    energy: bool = True
    roofline: bool = True
    seed: int = 0
    backend_options: tuple[tuple[str, Any], ...] = ()
    backend: str | None = None
    drafters: tuple[str, ...] = ()
    prompt: str | None = None
    gen_tokens: int = 128
    experts: tuple[str | None, ...] = (None,)

    def __post_init__(self) -> None:
        if not self.tests:
            raise InputError("give at least one test (e.g. pp512,tg128)")
        if self.reps < 1:
            raise InputError("--reps must be >= 1")
        if self.gen_tokens < 2:
            raise InputError("--gen must be at least 2 tokens")
        if self.method not in ("auto", "generic"):
            raise InputError("method must be 'auto' or 'generic'")
        for name in ("threads", "batch", "ctx", "depth", "gpu_layers"):
            values = getattr(self, name)
            if not values:
                raise InputError(f"--{name} needs at least one value")
            flag = "--gpu-layers" if name == "gpu_layers" else f"--{name}"
            if name in ("threads", "batch", "ctx") and any(v is not None and v < 1 for v in values):
                raise InputError(f"{flag} values must be at least 1")
            if any(v is not None and v < 0 for v in values):
                raise InputError(f"{flag} values must be 0 or more")
        for c in self.ctx:
            for d in self.depth:
                test = max(self.tests, key=lambda t: t.n_depth + d + t.n_tokens)
                need = test.n_depth + d + test.n_tokens
                if c is not None and c < need:
                    at = f" at depth {d}" if d else ""
                    raise InputError(f"--ctx {c} cannot hold {test.name}{at} ({need} tokens); raise --ctx to "
                                     f"{need} or more, or leave it out to size it to the tests")
        from edgekit.runtime.hostinfo import check_threads

        for t in self.threads:
            check_threads(t)

    def combos(self) -> list[dict[str, Any]]:
        """Every configuration of the sweep, in a stable order."""
        return [{"n_threads": t, "n_batch": b, "n_ctx": c, "depth": d, "n_gpu_layers": g, "experts": e}
                for t, b, c, d, g, e in itertools.product(self.threads, self.batch, self.ctx, self.depth,
                                                          self.gpu_layers, self.experts or (None,))]


@dataclass
class ProfileRun:
    """The rows of one profile run; ``status`` is "interrupted" when it was cancelled or Ctrl-C'd."""

    rows: list[ProfileRow] = field(default_factory=list)
    status: str = "ok"
    started: str = ""
    host: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "status": self.status, "started": self.started, "host": self.host,
                "rows": [r.to_json() for r in self.rows]}


class ProfileInterrupted(EdgekitError):
    """Ctrl-C during a profile; ``run`` holds what was measured (marked interrupted)."""

    exit_code = 130

    def __init__(self, run: ProfileRun) -> None:
        super().__init__(f"interrupted: kept {len(run.rows)} result row(s), marked 'interrupted'")
        self.run = run


def artifact_info(art: Artifact) -> dict[str, Any]:
    """The row's ``artifact`` block: identity (path, sha256, size) and what the manifest says about it."""
    from edgekit.hashing import sha256_file_cached

    m = art.manifest
    ppl = None
    for ev in reversed(m.get("eval") or []):
        if ev.get("ppl") is not None or ev.get("perplexity") is not None:
            ppl = ev.get("ppl", ev.get("perplexity"))
            break
    f = art.model_file
    return {"name": art.name, "path": str(art.path.resolve() if art.bare_file is None else f.resolve()),
            "format": art.format, "model_file": f.name, "size_bytes": f.stat().st_size if f.is_file() else None,
            "sha256": sha256_file_cached(f) if f.is_file() else None, "preset": m.get("preset"), "bpw": m.get("bpw"),
            "n_params": (m.get("source") or {}).get("n_params"), "perplexity": ppl}


def profile(
    targets: Sequence[str | Path | Artifact],
    cfg: ProfileConfig | None = None,
    *,
    on_row: RowFn | None = None,
    on_progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> ProfileRun:
    """Profile ``targets`` (artifact folders or model files) under every configuration of ``cfg``.

    Configurations are the outer loop and artifacts the inner one, so drift hits them alike. Rows
    reach ``on_row`` as they complete. ``cancel.set()`` (any thread) stops within one decode and
    returns a run marked "interrupted"; Ctrl-C does the same and raises :class:`ProfileInterrupted`.
    """
    from edgekit.runtime import hostinfo
    from edgekit.runtime.base import backend_for_format, backend_options

    cfg = cfg or ProfileConfig()
    arts = [t if isinstance(t, Artifact) else Artifact.open(t) for t in targets]
    if not arts:
        raise InputError("give at least one artifact to profile")
    for art in arts:
        cls = backend_for_format(art.format, cfg.backend)  # a missing runtime fails here, before anything runs
        if cfg.drafters and "draft" not in backend_options(cls):
            raise InputError(f"--draft / --speculative need a GGUF or ONNX artifact (llama.cpp or onnxruntime "
                             f"verifies the drafts); {art.name} is {art.format}")
    if cfg.drafters:
        from edgekit.runtime.profile_drafting import drafter_options

        for d in cfg.drafters:
            drafter_options(d)  # a missing draft model fails here, before anything runs
    run = ProfileRun(started=now_iso(), host=hostinfo.host_fingerprint())
    ctx = _Context(cfg, run, on_row, cancel)
    pairs = [(combo, art) for combo in cfg.combos() for art in arts]
    if cfg.experts != (None,):  # every file and value checked before anything is timed
        pairs = _experts_pairs(pairs, arts, cfg.experts)
    total = len(pairs) * (len(cfg.tests) + (1 + len(cfg.drafters) if cfg.drafters else 0))
    infos = {id(a): artifact_info(a) for a in arts}
    try:
        for combo, art in pairs:
            if ctx.cancelled():
                break
            _profile_one(ctx, art, infos[id(art)], combo, on_progress, total)
    except KeyboardInterrupt:
        ctx.flush_partial()
        run.status = "interrupted"
        raise ProfileInterrupted(run) from None
    if ctx.cancelled():
        run.status = "interrupted"
    return run


def _experts_pairs(pairs: list[tuple[dict[str, Any], Artifact]], arts: list[Artifact],
                   experts: tuple[str | None, ...]) -> list[tuple[dict[str, Any], Artifact]]:
    """An experts sweep over several files: each mixture-of-experts file runs every value (checked here); a
    file without experts (the dense baseline beside a --sparse-ffn file) runs once, with its own FFN."""
    from edgekit.runtime.llamacpp_decoding import experts_options
    from edgekit.runtime.memory import read_shape

    moe = {id(a): a.format == "gguf" and read_shape(a.model_file).n_expert > 0 for a in arts}
    if not any(moe.values()):
        experts_options(arts[0].bare_file or arts[0].path, experts[0] or "all")  # raises: says why
    for a in arts:
        for v in experts:
            if moe[id(a)] and v is not None:
                experts_options(a.bare_file or a.path, v)
    return [({**c, "experts": None}, a) if not moe[id(a)] else (c, a) for c, a in pairs
            if moe[id(a)] or c["experts"] == experts[0]]


class _Context:
    """Shared state of one run: the config, the rows so far, the test in progress (for Ctrl-C)."""

    def __init__(self, cfg: ProfileConfig, run: ProfileRun, on_row: RowFn | None, cancel: threading.Event | None):
        self.cfg, self.run, self.on_row, self.cancel = cfg, run, on_row, cancel
        self.partial: ProfileRow | None = None
        self.done = 0
        self._bandwidth: float | None = None
        self._energy: Any = None

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def emit(self, row: ProfileRow) -> None:
        self.partial = None
        self.run.rows.append(row)
        if self.on_row is not None:
            self.on_row(row)

    def flush_partial(self) -> None:
        if self.partial is not None and self.partial.samples_s:
            self.partial.status = "interrupted"
            self.emit(self.partial)
        self.partial = None

    def bandwidth(self) -> float:
        if self._bandwidth is None:
            from edgekit.runtime import hostinfo

            self._bandwidth = hostinfo.memory_bandwidth()
        return self._bandwidth

    def energy(self) -> Any:
        if self._energy is None:
            from edgekit.runtime.hostinfo import EnergyMeter

            self._energy = EnergyMeter()
        return self._energy


def _needed_ctx(tests: Sequence[TestSpec], depth: int) -> int:
    need = max(t.n_depth + depth + t.n_tokens for t in tests)
    return max(256, -(-need // 256) * 256)


def _profile_one(ctx: _Context, art: Artifact, info: dict[str, Any], combo: dict[str, Any],
                 on_progress: ProgressFn | None, total: int) -> None:
    cfg = ctx.cfg
    tests = [t.with_depth(combo["depth"]) for t in cfg.tests]
    n_ctx = combo["n_ctx"] or _needed_ctx(cfg.tests, combo["depth"])
    options: dict[str, Any] = dict(cfg.backend_options)
    # The physical cores, named so rows say it; not lowered on a busy machine (rows stay comparable in the
    # history), but said: such a run measures the other programs as much as the artifact.
    from edgekit.runtime import hostinfo

    threads = hostinfo.thread_count(combo["n_threads"], adapt=False)
    from edgekit.runtime.base import InProcessBench, OffloadPlanner, backend_for_format, backend_options

    backend_cls = backend_for_format(art.format, cfg.backend)
    options.update(n_ctx=n_ctx, n_batch=combo["n_batch"], n_threads=threads)
    if combo["n_gpu_layers"] or "n_gpu_layers" in backend_options(backend_cls):
        options["n_gpu_layers"] = combo["n_gpu_layers"]
    plan_note = None
    if combo.get("experts") is not None:
        from edgekit.runtime.llamacpp_decoding import experts_options

        options.update(experts_options(art.bare_file or art.path, combo["experts"]))
    if cfg.offload_auto and isinstance(backend_cls, OffloadPlanner):
        from edgekit.runtime.llamacpp_decoding import experts_used as used

        plan = backend_cls.offload_plan(art.model_file, n_ctx, n_batch=combo["n_batch"], n_expert_used=used(options))
        options.update(plan.backend_options())
        plan_note = plan.reason
    config = {"n_threads": threads, "n_batch": combo["n_batch"], "n_ubatch": combo["n_batch"],
              "n_ctx": n_ctx, "n_gpu_layers": options.get("n_gpu_layers", 0), "type_k": _cache_name(options, "type_k"),
              "type_v": _cache_name(options, "type_v"), "offload_kqv": options.get("offload_kqv", True),
              "tensor_overrides": [list(o) for o in options.get("tensor_overrides", ())], "plan": plan_note}
    from edgekit.runtime.llamacpp_decoding import experts_used

    if experts_used(options) is not None:
        config["n_expert_used"] = experts_used(options)
    use_worker = cfg.method == "auto" and isinstance(backend_cls, InProcessBench)

    def row_for(test: TestSpec, backend_name: str, runtime: dict[str, Any], load_s: float | None) -> ProfileRow:
        return ProfileRow(test=test.name, n_prompt=test.n_prompt, n_gen=test.n_gen, n_depth=test.n_depth,
                          artifact=info, config=dict(config), timestamp=now_iso(),
                          method="llamacpp-worker" if use_worker else "generic", backend=backend_name,
                          runtime=runtime, host=ctx.run.host, load_s=load_s)

    try:
        backend, load_s = _open(art, options, cfg.backend)
    except (BackendError, InputError) as exc:
        for test in tests:
            row = row_for(test, "", {}, None)
            row.status, row.error = "error", str(exc)
            ctx.emit(row)
        return
    try:
        runtime = _runtime_info(backend)
        for test in tests:
            if ctx.cancelled():
                return
            label = f"{info['name']} {test.name} (ctx {n_ctx}, threads {config['n_threads']}, batch {combo['n_batch']})"
            if on_progress is not None:
                on_progress(label, ctx.done, total)
            row = row_for(test, getattr(backend, "name", ""), runtime, load_s)
            ctx.partial = row
            try:
                if use_worker:
                    run_worker_test(ctx, backend, test, row)
                else:
                    run_generic_test(ctx, backend, test, row)
            except BackendError as exc:
                row.status, row.error = "error", str(exc)
                ctx.emit(row)
                return
            roofline(ctx, art, row, test)
            ctx.done += 1
            if row.status == "interrupted" and not row.samples_s:
                ctx.partial = None
                return
            ctx.emit(row)
            if on_progress is not None:
                on_progress(label, ctx.done, total)
    finally:
        backend.close()
    if cfg.drafters and not ctx.cancelled():
        _profile_drafting(ctx, art, info, options, config, on_progress, total)


def _profile_drafting(ctx: _Context, art: Artifact, info: dict[str, Any], options: dict[str, Any],
                      config: dict[str, Any], on_progress: ProgressFn | None, total: int) -> None:
    """The plain and drafted generation rows of one artifact and configuration (after its other tests)."""
    from edgekit.runtime.profile_drafting import DEFAULT_PROMPT, drafting_rows

    cfg = ctx.cfg
    n_ctx = max(int(options["n_ctx"]), 1024)  # the prompt, its chat template and the generation

    def on_row(row: ProfileRow) -> None:
        ctx.done += 1
        ctx.emit(row)
        if on_progress is not None:
            on_progress(f"{info['name']} {row.label}", ctx.done, total)

    if on_progress is not None:
        on_progress(f"{info['name']} gen{cfg.gen_tokens} with and without drafting", ctx.done, total)
    drafting_rows(art, info, cfg.drafters, options={**options, "n_ctx": n_ctx}, config={**config, "n_ctx": n_ctx},
                  host=ctx.run.host, prompt=cfg.prompt or DEFAULT_PROMPT, n_gen=cfg.gen_tokens, reps=cfg.reps,
                  backend_name=cfg.backend, cancelled=ctx.cancelled, on_row=on_row)


def _open(art: Artifact, options: dict[str, Any], backend_name: str | None = None) -> tuple[Any, float]:
    from edgekit.runtime.base import open_backend

    t0 = time.perf_counter()
    backend = open_backend(art, backend_name, **options)
    load_s = float(getattr(backend, "load_time", 0.0) or (time.perf_counter() - t0))
    return backend, load_s


def _runtime_info(backend: Any) -> dict[str, Any]:
    info = getattr(backend, "info", None) or {}
    return {"llama_cpp_python": info.get("llama_cpp_version"), "system_info": info.get("system_info"),
            "safe_cpu": info.get("safe_cpu")} if info else {}


def _cache_name(options: dict[str, Any], key: str) -> str:
    """A KV cache type as the memory model names it (``-O type_k=8`` is ``q8_0``)."""
    from edgekit.runtime.llamacpp_decoding import KV_CACHE_TYPES

    value = options.get(key, "f16")
    return next((name for name, n in KV_CACHE_TYPES.items() if n == value and not isinstance(value, bool)),
                str(value).lower())

