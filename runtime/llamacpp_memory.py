"""The llama.cpp backend's memory side, without a model loaded: the weights that fit a RAM budget, the
memory a GGUF file needs at a context, the bytes each decoded token reads and the CPU/GPU offload plan
(runtime.base's ``SizesWeights``, ``MemoryModel`` and ``OffloadPlanner``), all from :mod:`.memory` and
:mod:`.plan` on the file's header. :class:`.llamacpp.LlamaCppBackend` inherits them."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class LlamaCppMemory:
    """Class methods only: a GGUF file's memory model and offload plan."""

    @classmethod
    def weight_room(cls, hparams: Any, n_ctx: int, ram_bytes: int) -> tuple[int, dict[str, int]]:
        """Bytes of weights that fit ``ram_bytes`` at ``n_ctx`` (:func:`.memory.weight_room`), with the
        llama.cpp worker's measured baseline (a typical one where llama.cpp cannot start here)."""
        from edgekit.runtime.hostinfo import baseline_rss
        from edgekit.runtime.memory import weight_room

        return weight_room(hparams, n_ctx, ram_bytes, baseline_bytes=baseline_rss(strict=False))

    @classmethod
    def memory_estimate(cls, model_file: Path, n_ctx: int, n_batch: int = 512) -> Any:
        """Weights, repacked copies, KV cache and compute buffers at ``n_ctx`` (:mod:`.memory`), plus the llama.cpp
        worker's measured baseline (a typical one where llama.cpp cannot start here), as ``plan`` counts it and as
        the ONNX backend's estimate includes its own: the figure is the process's peak, not its model's share."""
        from edgekit.runtime.hostinfo import baseline_rss
        from edgekit.runtime.memory import MemoryConfig, estimate_memory, read_shape

        return estimate_memory(read_shape(model_file), MemoryConfig(n_ctx=n_ctx, n_batch=n_batch),
                               baseline_bytes=baseline_rss(strict=False))

    @classmethod
    def decode_bytes_per_token(cls, model_file: Path, depth: int, n_ctx: int, type_k: str = "f16",
                               type_v: str = "f16") -> int:
        from edgekit.runtime.memory import MemoryConfig, decode_bytes_per_token, read_shape

        reads = decode_bytes_per_token(read_shape(model_file), depth,
                                       MemoryConfig(n_ctx=n_ctx, type_k=type_k, type_v=type_v))
        return int(reads["cpu"] + reads["gpu"])

    @classmethod
    def offload_plan(cls, model_file: Path, n_ctx: int, n_batch: int = 512, *, budget: Any = None,
                     bandwidths: Any = None, cache_type: str = "f16", vram_bytes: int | None = None,
                     draft: Any = None, n_expert_used: int | None = None) -> Any:
        """llama.cpp's fastest placement (:mod:`.plan`): for this host when ``budget`` is None (its GPU's
        free memory, or ``vram_bytes``); ``draft`` (a :class:`.plan.DraftMemory`) takes its RAM first;
        ``n_expert_used``: experts run per token, when ``--experts`` overrides the file's count."""
        from edgekit.runtime.hostinfo import baseline_rss
        from edgekit.runtime.memory import read_shape
        from edgekit.runtime.plan import auto_plan, plan_offload

        if budget is None:
            return auto_plan(model_file, n_ctx, n_batch=n_batch, vram_bytes=vram_bytes, draft=draft,
                             n_expert_used=n_expert_used)
        return plan_offload(read_shape(model_file, n_expert_used), budget, n_ctx, bandwidths, gpu_available=True,
                            baseline_bytes=baseline_rss(strict=False), n_batch=n_batch,
                            type_k=cache_type, type_v=cache_type, draft=draft)
