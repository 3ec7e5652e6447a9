"""Offload planning for llama.cpp: does a model fit a device, and how to split it for speed.

The planner enumerates llama.cpp's placements - N GPU layers (``-ngl``), KV cache of offloaded
layers on the GPU or not (``--no-kv-offload``), and with all layers offloaded, the FFN (or, for MoE
models, the expert) tensors of some layers kept on the CPU (``-ot 'blk\\.(..)\\.ffn_.*=CPU'``) -
predicts each one's memory with :mod:`edgekit.runtime.memory`, drops those over budget, and ranks the
rest by a decode cost model: bytes read per token on each device over that device's bandwidth (the
CPU's at the share a decode matmul reaches), plus fixed costs per token that bytes miss: each block
computed on the GPU (kernel launches), each block with work on the CPU (the thread pool's
synchronisations) and each CPU<->GPU hand-over in the graph. The fixed costs come from measurements
on an H200 with a 16-core Xeon (``bench/sparse_ffn_gpu.py``: a 1.1B-shaped model all on the GPU decodes
at 66 us per block although its bytes take 7); with bytes alone the model ranked a layer split of a
sparse-FFN file above hot-on-GPU/cold-on-CPU, measured 19% faster. Its absolute tokens/s are an
estimate, not a promise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.errors import InputError
from edgekit.runtime.memory import (
    LLAMA_CPP_UBATCH,
    MemoryConfig,
    MemoryEstimate,
    ModelShape,
    decode_bytes_per_token,
    estimate_memory,
    gpu_blocks,
)

# Fixed costs and CPU efficiency, chosen on 68 measured placements of two models under 9 budgets on an H200
# with a 16-core Xeon (bench/results/sparse_ffn_gpu_cal*.json): following the model's pick loses at most 5% of
# decode speed against the fastest measured placement in each of 18 (model, budget) groups (noise is 4%).
SPLIT_COST_S = 20e-6  # one CPU<->GPU hand-over of activations plus a synchronisation, per token
GPU_BLOCK_S = 40e-6  # one block computed on the GPU, per token, beyond its bytes: its kernel launches
CPU_BLOCK_S = 15e-6  # one block with work on the CPU, per token, beyond its bytes: thread-pool barriers
CPU_EFFICIENCY = 0.5  # the share of the host's copy bandwidth a quantized decode matmul reaches
DEFAULT_GPU_BPS = 300e9  # assumed GPU memory bandwidth when none is given (a mid-range discrete GPU)
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*$", re.I)


def parse_size(text: str | int | float) -> int:
    """``"6GiB"``, ``"8G"``, ``"512MB"``, ``"1.5T"`` or a byte count -> bytes (G and GiB are both 2**30)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE_RE.match(text)
    if not m:
        raise InputError(f"size {text!r} is not like 6GiB, 8G or 512MB")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


@dataclass(frozen=True)
class Budget:
    """Memory the model may use: ``ram_bytes`` on the host, ``vram_bytes`` on the GPU (0: no GPU)."""

    ram_bytes: int
    vram_bytes: int = 0

    def __post_init__(self) -> None:
        if self.ram_bytes <= 0 or self.vram_bytes < 0:
            raise InputError("--ram must be > 0 and --vram >= 0")


@dataclass(frozen=True)
class Bandwidths:
    """Memory bandwidth in bytes/s of the host (``cpu_Bps``) and the GPU (``gpu_Bps``)."""

    cpu_Bps: float
    gpu_Bps: float = DEFAULT_GPU_BPS


@dataclass
class OffloadPlan:
    """A placement: what llama.cpp should be told, what it will use, and how fast it should decode."""

    device: str  # "cpu" | "gpu" | "split"
    n_gpu_layers: int
    offload_kqv: bool
    tensor_overrides: list[tuple[str, str]]
    n_ctx: int
    memory: MemoryEstimate
    predicted_tps: float
    reason: str
    fits: bool = True
    candidates: list[dict[str, Any]] = field(default_factory=list)
    draft: DraftMemory | None = None  # a draft model loaded beside the target (counted in the RAM budget)

    def backend_options(self) -> dict[str, Any]:
        """Keyword arguments for :class:`~edgekit.runtime.llamacpp.LlamaCppBackend` / ``api.open_backend``."""
        opts: dict[str, Any] = {"n_gpu_layers": self.n_gpu_layers, "n_ctx": self.n_ctx}
        if self.n_gpu_layers:
            opts["offload_kqv"] = self.offload_kqv
        if self.tensor_overrides:
            opts["tensor_overrides"] = [tuple(o) for o in self.tensor_overrides]
        return opts

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "fits": self.fits, "n_ctx": self.n_ctx, "n_gpu_layers": self.n_gpu_layers,
                "offload_kqv": self.offload_kqv, "tensor_overrides": [list(o) for o in self.tensor_overrides],
                "predicted_tps": round(self.predicted_tps, 2), "reason": self.reason, "memory": self.memory.to_json(),
                "backend_options": {k: [list(o) for o in v] if k == "tensor_overrides" else v
                                    for k, v in self.backend_options().items()},
                "candidates": self.candidates,
                "draft": self.draft.to_json() if self.draft else None,
                "ram_total_bytes": self.memory.ram_bytes + (self.draft.ram_bytes if self.draft else 0)}


@dataclass(frozen=True)
class DraftMemory:
    """What a speculative-decoding draft adds to its target's process: its own weights, a KV cache as long
    as the target's (the window, with one) and its compute buffers, all on the CPU (both backends load the
    draft in the target's process, and llama.cpp's with no GPU layers: it needs no VRAM)."""

    path: str
    ram_bytes: int  # peak resident
    parts: dict[str, int]

    @property
    def required_bytes(self) -> int:
        """What must fit in RAM: the peak less the file pages read to repack weights (as for the target)."""
        return self.ram_bytes - self.parts.get("weights_repacked", 0)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "ram_bytes": self.ram_bytes, "ram_required_bytes": self.required_bytes,
                "parts": self.parts}


def draft_memory(draft: str | Path, target_format: str, n_ctx: int, n_batch: int = 512) -> DraftMemory:
    """The memory model of ``draft`` (an artifact folder or model file of the target's format) at ``n_ctx``,
    less the process baseline the target already counts. A draft of another format is a one-line error."""
    from edgekit.runtime.base import MemoryModel, backend_for_format

    if target_format == "gguf":
        from edgekit.runtime.llamacpp_decoding import draft_model_file

        model_file = draft_model_file(draft)
    elif target_format == "onnx":
        from edgekit.runtime.onnx import draft_model_file as onnx_draft_file

        model_file = onnx_draft_file(draft)
    else:
        raise InputError(f"--draft: {target_format} artifacts do not decode speculatively (GGUF and ONNX do)")
    cls = backend_for_format(target_format)
    if not isinstance(cls, MemoryModel):
        raise InputError(f"--draft: the {cls.name} backend has no memory model to count a draft with")
    est = cls.memory_estimate(model_file, n_ctx, n_batch)
    parts = {k: int(v) for k, v in est.parts.items() if k != "baseline" and v}
    return DraftMemory(path=str(model_file), ram_bytes=sum(parts.values()), parts=parts)


def window_context(n_ctx: int, kv_window: int | None) -> int:
    """The context a backend allocates: with a KV window, the window (both backends size the cache to it)."""
    if kv_window is None:
        return n_ctx
    from edgekit.runtime.llamacpp_decoding import decoding_options

    decoding_options(None, None, None, kv_window, 0)  # the window's checks, as run and serve make them
    return int(kv_window)


def _layers_pattern(layers: list[int], what: str) -> str:
    return rf"blk\.({'|'.join(str(i) for i in layers)})\.{what}"


def _candidates(shape: ModelShape, gpu: bool) -> list[tuple[int, bool, tuple[tuple[str, str], ...], str]]:
    """(n_gpu_layers, offload_kqv, overrides, label) placements worth comparing."""
    out: list[tuple[int, bool, tuple[tuple[str, str], ...], str]] = [(0, True, (), "CPU only")]
    if not gpu:
        return out
    full = shape.n_layer + 1
    for ngl in range(1, full + 1):
        for kqv in (True, False):
            out.append((ngl, kqv, (), f"-ngl {ngl}" + ("" if kqv else " --no-kv-offload")))
    moe = shape.n_expert > 0
    what = r"ffn_(up|down|gate)_exps" if moe else r"ffn_(up|down|gate)"
    if moe:  # all experts on the CPU, everything else on the GPU: the usual MoE split
        out.append((full, True, ((r"ffn_(up|down|gate)_exps", "CPU"),), "-ngl all, all experts on CPU"))
    for j in range(1, shape.n_layer + 1):
        layers = list(range(j))
        out.append((full, True, ((_layers_pattern(layers, what), "CPU"),),
                    f"-ngl all, {'experts' if moe else 'FFN'} of {j} layer(s) on CPU"))
    return out


def _split_blocks(shape: ModelShape, cfg: MemoryConfig) -> set[int]:
    """Offloaded blocks (the last ``gpu_blocks``) with a part kept on the CPU by a tensor override."""
    first = shape.n_layer - gpu_blocks(shape, cfg)
    return {t.layer for t in shape.tensors if t.layer is not None and t.layer >= first and any(
        re.search(p, t.name) for p, b in cfg.tensor_overrides if b.upper().startswith("CPU"))}


def _splits(shape: ModelShape, cfg: MemoryConfig) -> int:
    """CPU<->GPU hand-overs per token: at the layer boundary, around each overridden block part,
    and twice per offloaded layer whose attention runs on the CPU (KV there)."""
    if cfg.n_gpu_layers == 0:
        return 0
    ngl = gpu_blocks(shape, cfg)
    n = 1 if ngl < shape.n_layer else 0  # CPU blocks hand over to the GPU's (the output layer is always there)
    n += 2 * len(_split_blocks(shape, cfg))
    if not cfg.offload_kqv:
        n += 2 * ngl
    return n


def _blocks(shape: ModelShape, cfg: MemoryConfig) -> tuple[int, int]:
    """(blocks computed on the GPU, blocks with weights read on the CPU) in one decode step."""
    on_gpu = gpu_blocks(shape, cfg)
    return on_gpu, shape.n_layer - on_gpu + len(_split_blocks(shape, cfg))


def decode_seconds(shape: ModelShape, cfg: MemoryConfig, reads: dict[str, float], bandwidths: Bandwidths) -> float:
    """Predicted seconds per decoded token of placement ``cfg``, given the bytes it reads on each device."""
    n_gpu, n_cpu = _blocks(shape, cfg)
    return (reads["cpu"] / (CPU_EFFICIENCY * bandwidths.cpu_Bps) + reads["gpu"] / bandwidths.gpu_Bps
            + GPU_BLOCK_S * n_gpu + CPU_BLOCK_S * n_cpu + SPLIT_COST_S * _splits(shape, cfg))


def plan_offload(
    shape: ModelShape,
    budget: Budget,
    n_ctx: int,
    bandwidths: Bandwidths,
    *,
    gpu_available: bool = True,
    baseline_bytes: int = 0,
    n_batch: int = 512,
    type_k: str = "f16",
    type_v: str = "f16",
    depth: int | None = None,
    draft: DraftMemory | None = None,
) -> OffloadPlan:
    """The fastest placement of ``shape`` at ``n_ctx`` that fits ``budget``.

    ``gpu_available`` False (no GPU device, or a budget of 0 VRAM) leaves only the CPU. ``depth``:
    the context depth decode speed is predicted at (default: half the context). ``draft``: a draft model
    loaded beside the target, whose RAM comes out of the budget first. Raises :class:`InputError` when
    nothing fits.
    """
    if n_ctx <= 0:
        raise InputError("--ctx must be > 0")
    gpu = gpu_available and budget.vram_bytes > 0
    depth = n_ctx // 2 if depth is None else depth
    reserved = draft.required_bytes if draft else 0
    if reserved >= budget.ram_bytes:
        raise InputError(f"the draft alone needs {_gib(reserved)} RAM at --ctx {n_ctx} of a {_gib(budget.ram_bytes)} "
                         "budget; use a smaller draft, a KV window (--kv-window) or no draft")
    scored = []
    for ngl, kqv, overrides, label in _candidates(shape, gpu):
        cfg = MemoryConfig(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=min(n_batch, LLAMA_CPP_UBATCH), type_k=type_k, type_v=type_v,
                           n_gpu_layers=ngl, offload_kqv=kqv, tensor_overrides=overrides, gpu_present=gpu)
        est = estimate_memory(shape, cfg, baseline_bytes=baseline_bytes)
        reads = decode_bytes_per_token(shape, depth, cfg)
        seconds = decode_seconds(shape, cfg, reads, bandwidths)
        fits = est.ram_required_bytes + reserved <= budget.ram_bytes and est.vram_bytes <= budget.vram_bytes
        scored.append((fits, 1.0 / seconds, -len(overrides), ngl, kqv, overrides, label, est))
    fitting = [s for s in scored if s[0]]
    summary = [{"label": s[6], "fits": s[0], "predicted_tps": round(s[1], 2), "ram_bytes": s[7].ram_required_bytes,
                "vram_bytes": s[7].vram_bytes} for s in scored]
    if not fitting:
        cpu_only = scored[0][7]
        least_vram = min(scored, key=lambda s: (s[7].ram_required_bytes, s[7].vram_bytes))[7]
        need = f"at least {_gib(least_vram.ram_required_bytes + reserved)} RAM" + (
            f" with {_gib(least_vram.vram_bytes)} VRAM" if least_vram.vram_bytes else "")
        who = f"this model and its draft ({_gib(reserved)} RAM) need" if reserved else "this model needs"
        if gpu and cpu_only.ram_required_bytes + reserved <= budget.ram_bytes:  # only the GPU's own buffer is short
            raise InputError(
                f"nothing fits {_gib(budget.vram_bytes)} VRAM: a GPU build of llama.cpp takes "
                f"{_gib(cpu_only.vram_bytes)} VRAM even at -ngl 0 (its compute buffer), while the CPU alone needs "
                f"{_gib(cpu_only.ram_required_bytes + reserved)} of the {_gib(budget.ram_bytes)} RAM; "
                "free some VRAM, or give --vram 0 to plan for a CPU-only build")
        raise InputError(
            f"nothing fits: at --ctx {n_ctx} {who} {need} (CPU only: "
            f"{_gib(cpu_only.ram_required_bytes + reserved)} RAM); "
            f"the budget is {_gib(budget.ram_bytes)} RAM + {_gib(budget.vram_bytes)} VRAM. Use a smaller --ctx, "
            "a smaller quantization (edgekit convert --bits 3), or a q8_0 KV cache")
    best = max(fitting, key=lambda s: (s[1], s[2]))
    _, tps, _, ngl, kqv, overrides, label, est = best
    device = "cpu" if ngl == 0 else ("gpu" if est.parts["weights_cpu"] <= _embd_bytes(shape) and kqv else "split")
    if not gpu:
        why = ("no GPU device in this llama.cpp build" if not gpu_available else "no VRAM budget (--vram 0)")
        reason = f"CPU only: {why}; needs {_gib(est.ram_required_bytes + reserved)} RAM of {_gib(budget.ram_bytes)}"
    else:
        reason = (f"{label}: fastest placement within {_gib(budget.vram_bytes)} VRAM + {_gib(budget.ram_bytes)} RAM "
                  f"(predicted {tps:.1f} tok/s at depth {depth}; uses {_gib(est.vram_bytes)} VRAM, "
                  f"{_gib(est.ram_bytes + (draft.ram_bytes if draft else 0))} RAM)")
    if draft:
        reason += f"; {_gib(reserved)} of the RAM is the draft's, on the CPU"
    return OffloadPlan(device=device, n_gpu_layers=ngl, offload_kqv=kqv, tensor_overrides=list(overrides),
                       n_ctx=n_ctx, memory=est, predicted_tps=tps, reason=reason, candidates=summary, draft=draft)


def _experts_used(art: Any, experts: str | int | None) -> int | None:
    """``--experts`` as the count it runs (checked against the file), or None for the file's own."""
    if experts is None:
        return None
    from edgekit.runtime.llamacpp_decoding import experts_options, experts_used

    return experts_used(experts_options(art.bare_file or art.path, experts))


def _embd_bytes(shape: ModelShape) -> int:
    return sum(t.n_bytes for t in shape.tensors if t.name.startswith("token_embd"))


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


@dataclass
class MemoryPlan:
    """Whether an artifact whose runtime has a memory model but no offload planner fits a RAM budget."""

    fits: bool
    ram_bytes: int
    ram_budget: int
    n_ctx: int
    runtime: str
    parts: dict[str, int]
    reason: str
    estimate: dict[str, Any] = field(default_factory=dict)
    draft: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {**self.estimate, "fits": self.fits, "ram_budget": self.ram_budget, "device": "CPU",
                "runtime": self.runtime, "reason": self.reason, "draft": self.draft, "ram_total_bytes": self.ram_bytes}


DEFAULT_PLAN_CTX = 4096

# formats whose artifact fixes its context at conversion: the -O option that sets it and its largest value
_FIXED_CONTEXT = {"mlc": ("context_window_size", 1 << 20), "coreml": ("context", 32768)}


def _refuse_context(art: Any, asked: int, holds: int, kv_window: int | None) -> None:
    """An MLC or Core ML artifact holds at most ``holds`` tokens (fixed when it was converted): refuse a plan
    at a longer context in one line, naming how to get one."""
    flag = f"--kv-window {asked}" if kv_window is not None else f"--ctx {asked}"
    fix = ""
    if art.format in _FIXED_CONTEXT:
        key, most = _FIXED_CONTEXT[art.format]
        fmt = "Core ML" if art.format == "coreml" else art.format.upper()
        fix = (f", or re-convert it with -O {key}={asked}" if asked <= most else
               f", or re-convert it with -O {key}={most}, the most a {fmt} artifact holds")
    raise InputError(f"{art.name} holds at most {holds} tokens (its context, fixed when it was converted), so "
                     f"{flag} does not fit: plan at --ctx {holds} or less{fix}")


def plan_artifact(art: Any, *, ram_bytes: int | None = None, vram_bytes: int = 0, n_ctx: int | None = None,
                  n_batch: int = 512, cache_type: str = "f16", cpu_Bps: float | None = None,
                  gpu_Bps: float = DEFAULT_GPU_BPS, backend: str | None = None, draft: str | Path | None = None,
                  kv_window: int | None = None, experts: str | int | None = None) -> OffloadPlan | MemoryPlan:
    """Does ``art`` fit, and how to split it: an :class:`OffloadPlan` where its runtime plans offloading
    (raises :class:`InputError` when nothing fits), else a :class:`MemoryPlan` from its memory model.
    ``ram_bytes`` defaults to the memory available now, ``cpu_Bps`` to this host's measured bandwidth.
    ``draft``: a speculative-decoding draft loaded beside the target (its RAM counts); ``kv_window``: the
    context is the window, as the backends allocate it; ``experts``: ``--experts`` (a mixture-of-experts GGUF's
    experts run per token: the bytes each token reads). ``n_ctx`` defaults to 4096, or to the artifact's own
    context where it holds fewer (MLC, Core ML); a longer ``n_ctx`` than an artifact holds raises InputError."""
    import psutil

    from edgekit.artifact import Artifact
    from edgekit.errors import UnsupportedError
    from edgekit.runtime import hostinfo
    from edgekit.runtime.base import MemoryModel, OffloadPlanner, backend_for_format
    from edgekit.validate import check_number

    if not isinstance(art, Artifact):
        art = Artifact.open(art)  # a library name or a path, as every other SDK entry takes
    check_number(vram_bytes, "--vram", at_least=0)
    if ram_bytes is not None:
        check_number(ram_bytes, "--ram", above=0)
    cls = backend_for_format(art.format, backend)
    asked = n_ctx is not None or kv_window is not None
    n_ctx = window_context(DEFAULT_PLAN_CTX if n_ctx is None else n_ctx, kv_window)
    if kv_window is not None and art.format == "gguf":  # as run and serve refuse it, before any plan
        from edgekit.runtime.llamacpp_decoding import check_window_trained

        check_window_trained([art.model_file], kv_window)
    ram = ram_bytes if ram_bytes is not None else int(psutil.virtual_memory().available)
    if isinstance(cls, OffloadPlanner):
        dm = draft_memory(draft, art.format, n_ctx, n_batch) if draft is not None else None
        bws = Bandwidths(cpu_Bps=cpu_Bps or hostinfo.memory_bandwidth(), gpu_Bps=gpu_Bps)
        return cls.offload_plan(art.model_file, n_ctx, n_batch, budget=Budget(ram, vram_bytes), bandwidths=bws,
                                cache_type=cache_type, draft=dm, n_expert_used=_experts_used(art, experts))
    if isinstance(cls, MemoryModel):
        est = cls.memory_estimate(art.model_file, n_ctx, n_batch)
        holds = int(getattr(est, "n_ctx", 0) or n_ctx)
        if holds < n_ctx:  # the artifact's context is fixed (MLC's context window, Core ML's state)
            if asked:
                _refuse_context(art, n_ctx, holds, kv_window)
            n_ctx = holds  # the default context, where the artifact holds fewer: plan at what it holds
        dm = draft_memory(draft, art.format, n_ctx, n_batch) if draft is not None else None
        note = (f"{cls.name} runs the whole model in host memory; GPU offload is not planned for "
                f"{art.format.upper()}" + (" (--vram ignored)" if vram_bytes else ""))
        parts = dict(est.parts)
        total = int(est.ram_bytes)
        if dm is not None:
            parts["draft"] = dm.ram_bytes
            total += dm.ram_bytes  # onnxruntime maps nothing it could drop: the draft's peak is what it needs
            note += f"; the draft ({_gib(dm.ram_bytes)}) runs in the same process"
        return MemoryPlan(fits=total <= ram, ram_bytes=total, ram_budget=ram, n_ctx=n_ctx, runtime=cls.name,
                          parts=parts, reason=note, estimate=est.to_json(),
                          draft=dm.to_json() if dm is not None else None)
    raise UnsupportedError(f"plan needs a runtime with a memory model; the {cls.name} backend for "
                           f"{art.format!r} artifacts has none")


def offload_options(art: Any, offload: str, n_ctx: int, *, vram_bytes: int | None = None,
                    draft: str | Path | None = None, experts: str | int | None = None
                    ) -> tuple[dict[str, Any], str | None]:
    """``--offload auto|none``: the backend options of this host's plan and its reason (None when the
    artifact's runtime plans no offloading or ``none`` was asked); ``vram_bytes`` caps the GPU budget;
    ``draft``: a draft model to load beside the target, whose RAM the plan leaves free; ``experts``: as
    ``run --experts`` (the experts each token reads). ``art``: an Artifact, a library name or a path."""
    from edgekit.artifact import Artifact
    from edgekit.runtime.base import OffloadPlanner, backend_for_format

    if offload == "none":
        return {}, None
    if offload != "auto":
        raise InputError("--offload takes 'auto' or 'none'")
    if not isinstance(art, Artifact):
        art = Artifact.open(art)  # as plan_artifact and every other SDK entry take it
    cls = backend_for_format(art.format)
    if not isinstance(cls, OffloadPlanner):
        return {}, None
    dm = draft_memory(draft, art.format, n_ctx) if draft is not None else None
    plan = cls.offload_plan(art.model_file, n_ctx, vram_bytes=vram_bytes, draft=dm,
                            n_expert_used=_experts_used(art, experts))
    opts = plan.backend_options()
    opts.pop("n_ctx", None)
    return opts, plan.reason


def auto_plan(model_file: Any, n_ctx: int, *, ram_bytes: int | None = None, vram_bytes: int | None = None,
              n_batch: int = 512, draft: DraftMemory | None = None, n_expert_used: int | None = None) -> OffloadPlan:
    """``--offload auto``: plan for this host - its GPUs' free memory (or ``vram_bytes``), its available RAM
    (or ``ram_bytes``) less a ``draft``'s, its measured bandwidth and llama.cpp's baseline."""
    import psutil

    from edgekit.runtime import hostinfo
    from edgekit.runtime.memory import read_shape

    shape = read_shape(model_file, n_expert_used)
    gpus = hostinfo.gpu_devices(strict=False)
    vram = vram_bytes if vram_bytes is not None else sum(int(g["free_bytes"]) for g in gpus[:1])
    ram = ram_bytes if ram_bytes is not None else int(psutil.virtual_memory().available)
    return plan_offload(shape, Budget(ram_bytes=ram, vram_bytes=vram), n_ctx,
                        Bandwidths(cpu_Bps=hostinfo.memory_bandwidth()), gpu_available=bool(gpus),
                        baseline_bytes=hostinfo.baseline_rss(strict=False), n_batch=n_batch, draft=draft)
