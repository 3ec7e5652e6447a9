"""Memory model for ONNX decoders on onnxruntime's CPU execution provider.

What a session holds at its peak, by part (bytes):

* ``weights``: the external data file. onnxruntime reads it into the session, except rows of a float
  ``Gather`` table (the token embedding) that are never looked up: their pages stay cold;
* ``weights_prepacked``: ``MatMulNBits`` weights repacked into MLAS's own block layout at load (the
  original initializer stays mapped), so 4/8-bit weights count about twice;
* ``weights_upcast``: on x86-64 the CPU provider has no float16 ``MatMul`` kernel, so at load it inserts
  casts and converts a float16 graph's ``MatMul`` weights to float32, dropping the float16 originals: such a
  weight is held at twice its size in the file (measured: one 50 MB float16 MatMul weight, a 107 MB
  session; SmolLM2's float16 graph 932 MB at ctx 1024 where the model without this said 519 MB);
* ``kv``: 2 x layers x ctx x KV heads x head size x element size, once where the graph's attention
  appends to a buffer bound as both past and present (``GroupQueryAttention`` graphs such as
  edgekit's; :mod:`._onnx_kv`), else twice: the past fed in and the presents returned;
* ``logits``: the logits of one prefill chunk (``n_batch`` x vocab x 4 bytes), the largest activation;
  a float16 head upcast as above computes them in float32, casts them to the graph's float16 and back
  to the float32 output: 10 bytes a logit, all three alive at once;
* ``activations``: the arena for one chunk's hidden states (hidden, Q/K/V, FFN), a few times over;
* ``overhead``: onnxruntime's own allocations at load (session, kernels, thread pools): a constant
  measured on this machine, like ``baseline`` (the edgekit CLI process before it creates the session).

Checked against measured peak RSS in tests/runtime/test_onnx_backend.py (SmolLM2-135M: fp32 and 4-bit
graphs within about 3% at ctx 512 and 2048 when the constants were measured; fp16 since stop 43).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.errors import CorruptFileError, UnsupportedError, require
from edgekit.runtime._onnx_kv import kv_in_place

# Measured on x86-64 Linux with onnxruntime 1.31 (SmolLM2-135M, fp32 and 4-bit graphs): RSS after
# loading a session less the weights it reads and repacks.
ORT_OVERHEAD = 40 << 20
# The process a session runs in: the edgekit CLI (its imports: onnx, numpy, tokenizers, the CLI) before it
# creates the session. Measured (onnxruntime 1.31, Python 3.11, x86-64 Linux) as VmRSS at the
# InferenceSession call of `edgekit run <tiny 4-bit ONNX> -c 1024`: 77,540 kB (the same with SmolLM2's
# 4-bit graph); a bare Python with onnxruntime imported is 44.4 MiB, what this was before (47 MiB), and
# the plan fell short: tiny 4-bit ONNX at ctx 1024, plan 100.1 MB where `edgekit run -p hello -n 16`
# peaked at 117.4 MB and `profile --tests pp1000 --ctx 1024` at 127.2 MB; SmolLM2 4-bit, plan 404.1 MB
# where profile pp1000 peaked at 443.5 MB and the SDK (OnnxBackend, 1024 tokens) at 432.5 MB. With this
# baseline: 130.6 MB (+11% over the short run, +2.6% over profile) and 434.6 MB (-2.0%, +0.5%).
BASELINE = 76 << 20
_ELEM = {1: 4, 10: 2, 16: 2}  # ONNX FLOAT, FLOAT16, BFLOAT16


@dataclass(frozen=True)
class OnnxMemoryEstimate:
    ram_bytes: int
    parts: dict[str, int] = field(default_factory=dict)
    n_ctx: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"ram_bytes": self.ram_bytes, "ram_required_bytes": self.ram_bytes, "vram_bytes": 0,
                "parts": self.parts, "n_ctx": self.n_ctx, "runtime": "onnxruntime (CPU)"}


def estimate_onnx_memory(model_file: str | Path, n_ctx: int, n_batch: int = 512,
                         baseline_bytes: int = BASELINE) -> OnnxMemoryEstimate:
    """Predicted peak RSS of an onnxruntime session of ``model_file`` filled to ``n_ctx`` tokens."""
    onnx = require("onnx", "onnx")
    path = Path(model_file)
    from edgekit.converters.formats.onnx.read import load_graph

    model = load_graph(path)
    sizes = _held_sizes(onnx, model)
    upcast_names = _upcast_weights(model)
    nbits = cold = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and len(node.input) > 1 and node.input[1] in sizes:
            nbits += sizes[node.input[1]]
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[0] in sizes and node.input[1] == "input_ids":
            cold += sizes[node.input[0]]
    past = [i for i in model.graph.input if i.name.startswith("past_key_values.")]
    if not past:
        raise UnsupportedError(f"{path.name} has no past_key_values inputs; cannot model its KV cache")
    tt = past[0].type.tensor_type
    dims = [d.dim_value for d in tt.shape.dim]
    if len(dims) != 4:
        raise CorruptFileError(f"{path}: {past[0].name} has {len(dims)} dimensions, not (batch, KV heads, "
                               "positions, head size); re-run 'edgekit convert'")
    kv_heads, head_dim = dims[1], dims[3]
    if not kv_heads or not head_dim:
        raise UnsupportedError(f"{path.name}: symbolic KV shapes; cannot model its KV cache")
    elem = _ELEM.get(tt.elem_type, 4)
    kv_copies = 1 if kv_in_place(model) else 2
    logits_dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] if model.graph.output else []
    vocab = logits_dims[-1] if logits_dims else 0
    hidden = kv_heads * head_dim  # lower bound; refined from an initializer below when available
    for t in model.graph.initializer:
        if t.name.endswith("input_layernorm.weight") and t.dims:
            hidden = int(t.dims[0])
            break
    data = sum(sizes.values())
    chunk = min(n_batch, n_ctx)
    upcast = sum(sizes[n] for n in upcast_names if n in sizes)
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    dims.update({out: dims[src][::-1] for out, src in _folded(model).items()})
    head_upcast = bool(vocab) and any(dims[n][-1:] == [vocab] for n in upcast_names)
    parts = {
        "weights": data - cold,
        "weights_prepacked": nbits,
        "weights_upcast": upcast,
        "kv": kv_copies * len(past) * n_ctx * kv_heads * head_dim * elem,
        "logits": chunk * vocab * (10 if head_upcast else 4),
        "activations": 8 * chunk * hidden * 4,
        "overhead": ORT_OVERHEAD,
        "baseline": baseline_bytes,
    }
    return OnnxMemoryEstimate(ram_bytes=sum(parts.values()), parts=parts, n_ctx=n_ctx)


def onnx_decode_bytes_per_token(model_file: str | Path, depth: int) -> int:
    """Bytes one decode step must read: every weight the graph multiplies with (a table that is only
    looked up, by Gather or GatherBlockQuantized, gives one row) plus the KV cache up to ``depth``."""
    onnx = require("onnx", "onnx")
    from edgekit.converters.formats.onnx.read import load_graph

    model = load_graph(model_file)
    sizes = _held_sizes(onnx, model)
    folded = _folded(model)
    lookups = {n.input[0] for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
    others = {i for n in model.graph.node if n.op_type not in ("Gather", "GatherBlockQuantized")
              and not (n.output and n.output[0] in folded) for i in n.input}
    lookup_only = {name for name in lookups & sizes.keys() if name not in others}
    est = estimate_onnx_memory(model_file, max(depth, 1), n_batch=1)
    copies = 1 if kv_in_place(model) else 2
    kv_per_cell = est.parts["kv"] // copies // max(depth, 1)  # one copy, per context cell
    upcast = _upcast_weights(model)  # read as the float32 copies the session holds
    return sum(v * (2 if k in upcast else 1) for k, v in sizes.items() if k not in lookup_only) + kv_per_cell * depth


def _upcast_weights(model: Any) -> set[str]:
    """Initializers onnxruntime's CPU provider converts to float32 at load on this machine: the float16
    (and bfloat16) right-hand weights of ``MatMul`` on x86-64, which has no such kernel."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return set()  # arm64 builds of MLAS multiply float16 natively
    half = {t.name for t in model.graph.initializer if t.data_type in (10, 16)}
    half |= {out for out, src in _folded(model).items() if src in half}
    return {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in half}


def _folded(model: Any) -> dict[str, str]:
    """Outputs of a ``Transpose`` of an initializer (a tied head reading the embedding table) -> that
    initializer: onnxruntime folds them at load into constants of their own, so the session holds the
    table twice, as a graph storing the head apart does (measured on SmolLM2: the same peak RSS)."""
    inits = {t.name for t in model.graph.initializer}
    return {n.output[0]: n.input[0] for n in model.graph.node
            if n.op_type == "Transpose" and n.input and n.input[0] in inits and n.output}


def _held_sizes(onnx: Any, model: Any) -> dict[str, int]:
    """Bytes of every constant the session holds after load: the initializers and the folded transposes."""
    sizes = {t.name: _nbytes(onnx, t) for t in model.graph.initializer}
    return {**sizes, **{out: sizes[src] for out, src in _folded(model).items()}}


def _nbytes(onnx: Any, t: Any) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def onnx_weight_room(hp: Any, n_ctx: int, ram_bytes: int, n_batch: int = 512,
                     baseline_bytes: int = BASELINE) -> tuple[int, dict[str, int]]:
    """The inverse of :func:`estimate_onnx_memory` before a graph exists: bytes of weights (the data file)
    that fit in ``ram_bytes`` at ``n_ctx`` for hyperparameters ``hp``, and the other parts. MatMulNBits
    weights are held twice (the file's and MLAS's packed copy), so the room is half what is left."""
    chunk = min(n_batch, n_ctx)
    parts = {"kv": 2 * 2 * hp.n_layer * n_ctx * hp.n_head_kv * hp.head_dim * 4, "logits": chunk * hp.n_vocab * 4,
             "activations": 8 * chunk * hp.n_embd * 4, "overhead": ORT_OVERHEAD, "baseline": baseline_bytes}
    return (ram_bytes - sum(parts.values())) // 2, parts
