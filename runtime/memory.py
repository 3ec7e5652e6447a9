"""A memory model for GGUF artifacts under llama.cpp: what a model needs in RAM and VRAM.

Read from the GGUF header alone (no weights are loaded): weights by tensor type and layer, the KV
cache by context length, heads and cache type, compute buffers, and the process's own baseline.

What is modeled and what is measured:
  * weights, KV cache and the output buffer are exact byte counts (llama.cpp allocates exactly these;
    the KV cache is cleared at load, so it is resident from the start);
  * weights repacked for the CPU (llama.cpp's CPU_REPACK buffers: Q4_0, Q4_K, IQ4_NL on x86 with
    AVX2, when rows come in multiples of 8) are counted twice: the repacked copy plus the mapped
    file pages read to make it;
  * the compute buffer is sized as llama.cpp sizes it (:func:`compute_bytes`): the graph of its worst-case
    ubatch, the larger of the attention phase (KQ scores n_head x n_kv x n_ubatch f32 and the mask, unless
    flash attention) and the output phase (logits of every row of the ubatch); it matches the buffer
    llama.cpp logs to within ~1%. A run that asks for the last row's logits (generation, a prompt) never
    touches the output phase's pages, so the resident part counts ``MemoryConfig.n_outputs`` rows;
  * the CPU backend's work buffer (:func:`work_bytes`), which llama.cpp does not log: the softmaxed KQ
    converted to the V cache's type for the KQ x V product, half the size of KQ again;
  * the baseline (Python + llama.cpp libraries, before a model is loaded) is measured once per host
    by :func:`edgekit.runtime.hostinfo.baseline_rss` and cached, or passed in.
VRAM parts are modeled the same way but have not been measured (no GPU was available).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgekit.converters.formats.gguf.read import kv_cells
from edgekit.errors import InputError, UnsupportedError

# Bytes per element of KV cache types (ggml block sizes: q8_0 = 34 bytes / 32, q4_0 = 18 / 32 ...).
CACHE_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
                    "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32}
# Tensor types llama.cpp's CPU backend repacks into interleaved layouts on x86 with AVX2 (its
# "CPU_REPACK" buffer), when the row count is a multiple of 8.
REPACK_TYPES = {"Q4_0", "Q4_K", "IQ4_NL"}
# llama-cpp-python's n_ubatch when none is given (edgekit's worker gives none): the physical batch
LLAMA_CPP_UBATCH = 512
# Memory besides the buffers and weights above: the vocabulary (the GGUF's token and merge arrays,
# llama.cpp's token maps and BPE ranks), the KV cache's per-cell bookkeeping (positions, sequence sets and
# maps), the context, thread pools and allocator slack. Fitted to measured peak RSS (edgekit profile ppN
# --ctx N: the worker's VmHWM) less every other part, at -t 1 with llama-cpp-python 0.3.36 on x86-64: a
# tiny Llama (384 tokens) left 8.1, 9.2, 9.4, 11.1 MB at ctx 512, 1024, 4096, 16384; SmolLM2-135M Q4_1
# (49152 tokens) 23.3, 24.4, 24.3, 24.1, 24.9, 26.7 MB at ctx 512, 1024, 2048, 4096, 8192, 16384.
VOCAB_BYTES_PER_TOKEN = 320
KV_CELL_BYTES = 128
FIXED_OVERHEAD = 9 << 20

_LAYER_RE = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str
    n_elements: int
    n_bytes: int
    rows: int  # ne[1]: output features of a matrix (1 for vectors)
    layer: int | None  # the block index, None for token_embd / output / output_norm


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs from a GGUF: hyperparameters and every tensor's type and size."""

    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    tensors: tuple[TensorInfo, ...]
    n_expert: int = 0
    n_expert_used: int = 0
    file_bytes: int = 0

    @property
    def weight_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def layer_bytes(self, layer: int) -> int:
        return sum(t.n_bytes for t in self.tensors if t.layer == layer)

    @property
    def output_tied(self) -> bool:
        """The output projection reuses token_embd (no output.weight tensor)."""
        return not any(t.name == "output.weight" for t in self.tensors)


def read_shape(path: str | Path, n_expert_used: int | None = None) -> ModelShape:
    """The :class:`ModelShape` of a GGUF file (header only); ``n_expert_used``: the experts run per token when
    ``--experts`` overrides the file's count (the bytes each token reads)."""
    from edgekit.converters.formats.gguf.read import read_gguf_header

    p = Path(path)
    reader = read_gguf_header(p, vocab=False)

    def kv(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = kv("general.architecture")
    if not arch:
        raise UnsupportedError(f"{p.name} has no general.architecture; cannot model its memory")
    n_layer = int(kv(f"{arch}.block_count", 0) or 0)
    n_embd = int(kv(f"{arch}.embedding_length", 0) or 0)
    n_head = _scalar(kv(f"{arch}.attention.head_count", 1))
    n_head_kv = _scalar(kv(f"{arch}.attention.head_count_kv", n_head))
    head_k = int(kv(f"{arch}.attention.key_length", 0) or (n_embd // max(n_head, 1)))
    head_v = int(kv(f"{arch}.attention.value_length", 0) or head_k)
    tensors = []
    for t in reader.tensors:
        m = _LAYER_RE.match(t.name)
        shape = [int(x) for x in t.shape]
        tensors.append(TensorInfo(name=t.name, type=t.tensor_type.name, n_elements=int(t.n_elements),
                                  n_bytes=int(t.n_bytes), rows=shape[1] if len(shape) > 1 else 1,
                                  layer=int(m.group(1)) if m else None))
    vocab = kv(f"{arch}.vocab_size")
    if vocab is None:
        toks = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(toks.data) if toks is not None else 0
    if not n_layer or not n_embd or not vocab:
        raise UnsupportedError(f"{p.name} lacks block_count/embedding_length/vocabulary; cannot model its memory")
    return ModelShape(
        architecture=str(arch), n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
        head_dim_k=head_k, head_dim_v=head_v, n_ff=_scalar(kv(f"{arch}.feed_forward_length", 4 * n_embd)),
        n_vocab=int(vocab), n_ctx_train=int(kv(f"{arch}.context_length", 0) or 0), tensors=tuple(tensors),
        n_expert=int(kv(f"{arch}.expert_count", 0) or 0),
        n_expert_used=int(n_expert_used if n_expert_used is not None else kv(f"{arch}.expert_used_count", 0) or 0),
        file_bytes=p.stat().st_size,
    )


def _scalar(v: Any) -> int:
    """Per-layer arrays (head counts that vary by layer) are summarised by their maximum."""
    if isinstance(v, (list, tuple)):
        return int(max(v)) if v else 0
    return int(v or 0)


@dataclass(frozen=True)
class MemoryConfig:
    """How the model will be run.

    n_ctx: KV cache cells. n_kv: the most cells attention reads in one step (default n_ctx: a full
    context; a short run reads fewer). n_batch / n_ubatch: llama.cpp's logical and physical batch.
    type_k / type_v: KV cache types. flash_attn: no attention-score matrix in the compute buffer.
    n_gpu_layers: llama.cpp's -ngl: the output layer and the last N - 1 blocks go to the GPU (N = n_layer + 1: all).
    offload_kqv: the KV cache of offloaded blocks lives on the GPU. tensor_overrides: (regex, buffer
    type) pairs as llama.cpp's -ot; "CPU" keeps matching tensors in host memory. use_mmap: weights
    are mapped from the file (llama.cpp's default). repack: CPU repacking of REPACK_TYPES is on.
    gpu_present: the process has a GPU backend; then even -ngl 0 allocates a GPU compute buffer, for the
    batch ops llama.cpp offloads (op offload) with a copy of the weight they read.
    n_outputs: rows of logits a step computes: 1 when generating or reading a prompt, n_batch when
    every position's logits are wanted (perplexity); the host output buffer and the resident part of
    the compute buffer hold that many.
    """

    n_ctx: int = 4096
    n_kv: int | None = None
    n_batch: int = 512
    n_ubatch: int = LLAMA_CPP_UBATCH
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = False
    n_gpu_layers: int = 0
    offload_kqv: bool = True
    tensor_overrides: tuple[tuple[str, str], ...] = ()
    repack: bool = True
    gpu_present: bool = False
    n_outputs: int = 1

    def __post_init__(self) -> None:
        if self.n_ctx <= 0 or self.n_batch <= 0 or self.n_ubatch <= 0 or self.n_outputs <= 0:
            raise InputError("context, batch and output sizes must be > 0")
        for t in (self.type_k, self.type_v):
            if t not in CACHE_TYPE_BYTES:
                raise InputError(f"unknown KV cache type {t!r}; use one of {', '.join(CACHE_TYPE_BYTES)}")
        for pattern, _ in self.tensor_overrides:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise InputError(f"tensor override pattern {pattern!r} is not a valid regex: {exc}") from None


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak resident memory: ``ram_bytes`` on the host, ``vram_bytes`` on the GPU."""

    ram_bytes: int
    vram_bytes: int
    parts: dict[str, int] = field(default_factory=dict)
    n_ctx: int = 0
    notes: tuple[str, ...] = ()

    @property
    def ram_required_bytes(self) -> int:
        """What must fit in RAM: the peak less the file pages read to repack weights (page cache the
        kernel can drop once the repacked copy exists; they count in RSS only while nothing needs them)."""
        return self.ram_bytes - self.parts.get("weights_repacked", 0)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ram_required_bytes"] = self.ram_required_bytes
        d["notes"] = list(self.notes)
        return d


def gpu_blocks(shape: ModelShape, cfg: MemoryConfig) -> int:
    """Blocks llama.cpp computes on the GPU under ``-ngl N``: it counts the output layer as layer n_layer and
    offloads the last N of the n_layer + 1, so N <= n_layer means the output layer and the last N - 1 blocks
    (seen in its buffers on an H200: -ngl 14 of 22 blocks put 13 blocks' KV and the output head on the GPU)."""
    return max(0, min(cfg.n_gpu_layers, shape.n_layer + 1) - 1)


def output_on_gpu(cfg: MemoryConfig) -> bool:
    """The output layer is the first one ``-ngl`` offloads."""
    return cfg.n_gpu_layers >= 1


def tensor_device(shape: ModelShape, t: TensorInfo, cfg: MemoryConfig) -> str:
    """"gpu" or "cpu": where llama.cpp puts tensor ``t`` under ``cfg`` (overrides win, as with -ot)."""
    for pattern, buft in cfg.tensor_overrides:
        if re.search(pattern, t.name):
            return "cpu" if buft.upper().startswith("CPU") else "gpu"
    if t.layer is None:
        if t.name.startswith("token_embd"):
            return "cpu"  # the input layer always stays on the CPU
        return "gpu" if output_on_gpu(cfg) else "cpu"
    return "gpu" if t.layer >= shape.n_layer - gpu_blocks(shape, cfg) else "cpu"


def kv_bytes_per_cell(shape: ModelShape, cfg: MemoryConfig) -> float:
    """KV cache bytes per context cell per layer (K and V)."""
    return shape.n_head_kv * (shape.head_dim_k * CACHE_TYPE_BYTES[cfg.type_k]
                              + shape.head_dim_v * CACHE_TYPE_BYTES[cfg.type_v])


def ubatch_tokens(cfg: MemoryConfig) -> int:
    """Tokens in llama.cpp's worst-case ubatch, for which it reserves its graph: n_batch is capped at the
    context (causal models) and n_ubatch at n_batch (llama_context's constructor)."""
    return min(cfg.n_ubatch, cfg.n_batch, kv_cells(cfg.n_ctx))


def compute_bytes(shape: ModelShape, cfg: MemoryConfig, n_outputs: int | None = None) -> int:
    """llama.cpp's compute buffer: what ggml's allocator needs for the graph of one worst-case ubatch of
    ``t`` tokens reading ``n_kv`` cells, the larger of two phases (tensors are freed after their last use):

    * attention: KQ (n_head x n_kv x t f32, softmaxed in place) and the mask (n_kv x t f32) alive together,
      besides 5 hidden-size activations, V's row indices (int64, one per V element written, while V is
      stored transposed) and the int32/int64 inputs (token, position, output and K row ids: 20 bytes a
      token). With flash attention there is no KQ, and the mask is float16;
    * output: the logits of ``n_outputs`` rows (default ``t``: the reserve counts every row an output)
      and 3 hidden-size activations.

    Checked against llama.cpp's logged "CPU compute buffer size" (llama-cpp-python 0.3.36,
    tests/runtime/test_memory.py): a tiny Llama (4 heads, 256 wide, 384 tokens) and SmolLM2-135M
    (9 heads, 576 wide, 49152 tokens) at ctx 512-16384 and n_ubatch 128-2048, to within 1.2%.
    ``cfg.n_kv`` < n_ctx gives the part a run reading fewer cells touches."""
    t = ubatch_tokens(cfg)
    n_kv = min(kv_cells(cfg.n_kv or cfg.n_ctx), kv_cells(cfg.n_ctx))
    rows = t if n_outputs is None else min(n_outputs, t)
    n_embd_v = shape.n_head_kv * shape.head_dim_v
    if cfg.flash_attn:
        attention = 2 * n_kv * t + 4 * 8 * shape.n_embd * t
    else:
        attention = 4 * t * (n_kv * (shape.n_head + 1) + 5 * shape.n_embd + 2 * n_embd_v)
    output = 4 * (rows * shape.n_vocab + 3 * shape.n_embd * t)
    return max(attention, output) + 20 * t


def work_bytes(shape: ModelShape, cfg: MemoryConfig) -> int:
    """The CPU backend's work buffer (ggml's cplan, allocated on the heap per graph and kept): its largest
    is the softmaxed KQ converted to the V cache's type for the KQ x V product (n_head x n_kv x t, 2 bytes
    an element for an f16 cache), without flash attention; else the activations a weight product
    quantizes (at most 2 bytes an element of the widest). Not in llama.cpp's log: measured as the part of
    peak RSS that grows with n_head x n_kv x t beyond the logged buffers (a tiny Llama at ctx 16384:
    67 MB)."""
    t = ubatch_tokens(cfg)
    n_kv = min(kv_cells(cfg.n_kv or cfg.n_ctx), kv_cells(cfg.n_ctx))
    activations = 2 * t * max(shape.n_ff, shape.n_embd)
    if cfg.flash_attn or cfg.type_v == "f32":
        return activations
    return max(activations, int(shape.n_head * n_kv * t * CACHE_TYPE_BYTES[cfg.type_v]))


def estimate_memory(shape: ModelShape, cfg: MemoryConfig | None = None, *, baseline_bytes: int = 0) -> MemoryEstimate:
    """Predicted peak memory of running ``shape`` under ``cfg`` (``baseline_bytes``: the process before
    loading, see :func:`edgekit.runtime.hostinfo.baseline_rss`)."""
    cfg = cfg or MemoryConfig()
    weights = {"cpu": 0, "gpu": 0}
    repacked = 0
    for t in shape.tensors:
        dev = tensor_device(shape, t, cfg)
        weights[dev] += t.n_bytes
        if dev == "cpu" and cfg.repack and t.type in REPACK_TYPES and t.rows % 8 == 0 and t.layer is not None:
            repacked += t.n_bytes
        if t.name.startswith("token_embd") and shape.output_tied and output_on_gpu(cfg):
            weights["gpu"] += t.n_bytes  # the tied output head: llama.cpp loads a second copy on the GPU
    n_gpu_blocks = gpu_blocks(shape, cfg)
    cells = kv_cells(cfg.n_ctx)  # the rule inspect counts too
    per_layer = kv_bytes_per_cell(shape, cfg) * cells
    kv_gpu = int(per_layer * n_gpu_blocks) if cfg.offload_kqv else 0
    kv_cpu = int(per_layer * shape.n_layer) - kv_gpu
    any_gpu = weights["gpu"] > 0 or kv_gpu > 0
    # The host compute buffer is malloc'd at llama.cpp's size, but only the pages a run's graphs write
    # become resident: with n_outputs rows of logits, not the reserve's every row.
    compute_cpu = compute_bytes(shape, cfg, n_outputs=cfg.n_outputs)
    # The CPU backend's work buffer, where attention runs on the CPU.
    attn_cpu = kv_cpu > 0 or not cfg.offload_kqv
    work_cpu = work_bytes(shape, cfg) if attn_cpu else 0
    # A GPU compute buffer is allocated whole (cudaMalloc), sized for the worst ubatch: all outputs.
    compute_gpu = compute_bytes(shape, cfg) if any_gpu else 0
    if not any_gpu and cfg.gpu_present:  # op offload: the activations and the largest weight an op copies over
        compute_gpu = compute_bytes(shape, cfg) + max((t.n_bytes for t in shape.tensors), default=0)
    # llama.cpp's host output buffer: logits of the rows a batch outputs (its log: 0.19 MiB for 49152 tokens)
    output = 4 * shape.n_vocab * min(cfg.n_outputs, cfg.n_batch)
    overhead = FIXED_OVERHEAD + VOCAB_BYTES_PER_TOKEN * shape.n_vocab + KV_CELL_BYTES * cells
    parts = {"baseline": int(baseline_bytes), "weights_cpu": weights["cpu"], "weights_repacked": repacked,
             "weights_gpu": weights["gpu"], "kv_cpu": kv_cpu, "kv_gpu": kv_gpu, "compute_cpu": compute_cpu,
             "work_cpu": work_cpu, "compute_gpu": compute_gpu, "output_cpu": output, "overhead": overhead}
    ram = baseline_bytes + weights["cpu"] + repacked + kv_cpu + compute_cpu + work_cpu + output + overhead
    vram = weights["gpu"] + kv_gpu + compute_gpu
    notes = []
    if not baseline_bytes:
        notes.append("process baseline not included")
    if any_gpu:
        notes.append("VRAM figures are modeled, not measured")
    reserved = compute_bytes(shape, cfg)
    if reserved > 1.05 * compute_cpu:
        notes.append(f"llama.cpp allocates a {reserved / 2**20:.2f} MiB CPU compute buffer (for every row's logits); "
                     f"{compute_cpu / 2**20:.2f} MiB of it is written when {cfg.n_outputs} row(s) of logits are computed")
    return MemoryEstimate(ram_bytes=int(ram), vram_bytes=int(vram), parts=parts, n_ctx=cfg.n_ctx, notes=tuple(notes))


def decode_bytes_per_token(shape: ModelShape, depth: int = 0, cfg: MemoryConfig | None = None) -> dict[str, float]:
    """Bytes one decode step reads, split by device: every weight but the embedding rows not looked up
    (experts at their active fraction), plus ``depth`` cells of KV cache per layer."""
    cfg = cfg or MemoryConfig()
    out = {"cpu": 0.0, "gpu": 0.0}
    expert_frac = shape.n_expert_used / shape.n_expert if shape.n_expert else 1.0
    for t in shape.tensors:
        if t.name.startswith("token_embd") and not shape.output_tied:
            read = t.n_bytes / max(shape.n_vocab, 1)  # one row looked up
        elif "_exps" in t.name:
            read = t.n_bytes * expert_frac
        else:
            read = float(t.n_bytes)
        if t.name.startswith("token_embd") and shape.output_tied:
            dev = "gpu" if output_on_gpu(cfg) else "cpu"  # read by the output matmul
        else:
            dev = tensor_device(shape, t, cfg)
        out[dev] += read
    kv_layer = kv_bytes_per_cell(shape, cfg) * depth
    n_gpu_blocks = gpu_blocks(shape, cfg)
    out["gpu" if cfg.offload_kqv else "cpu"] += kv_layer * n_gpu_blocks
    out["cpu"] += kv_layer * (shape.n_layer - n_gpu_blocks)
    return out


def weight_room(hp: Any, n_ctx: int, ram_bytes: int, baseline_bytes: int = 0) -> tuple[int, dict[str, int]]:
    """The inverse of :func:`estimate_memory` before a GGUF exists: bytes of weights that fit in
    ``ram_bytes`` at ``n_ctx`` for a model of hyperparameters ``hp`` (:class:`edgekit.arch.HParams`), and
    the other parts it leaves room for. Weights are mapped once; a repacked copy is page cache the kernel
    can drop, so it is not counted (as in ``ram_required_bytes``)."""
    shape = ModelShape(architecture="?", n_layer=hp.n_layer, n_embd=hp.n_embd, n_head=hp.n_head,
                       n_head_kv=hp.n_head_kv, head_dim_k=hp.head_dim, head_dim_v=hp.head_dim, n_ff=hp.n_ff,
                       n_vocab=hp.n_vocab, n_ctx_train=hp.n_ctx_train, tensors=())
    est = estimate_memory(shape, MemoryConfig(n_ctx=n_ctx), baseline_bytes=baseline_bytes)
    parts = {k: v for k, v in est.parts.items() if v and not k.startswith("weights")}
    return ram_bytes - sum(parts.values()), parts
