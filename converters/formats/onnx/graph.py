"""The ONNX decoder graph for Llama-family models, built node by node.

One graph serves prefill and decode (the past key/values may be empty), with the input/output names
the ONNX LLM ecosystem uses (Optimum, onnxruntime-genai):

    input_ids int64 [batch, seq]         attention_mask int64 [batch, total]
    past_key_values.{i}.key/.value [batch, kv_heads, past, head_dim]
    -> logits float32 [batch, seq, vocab], present.{i}.key/.value [batch, kv_heads, total, head_dim]

Per layer: RMSNorm written as plain ONNX ops (onnxruntime fuses it into SimplifiedLayerNormalization
at load), one fused Q/K/V projection, ``GroupQueryAttention`` (com.microsoft: rotary embedding, the KV
cache append and causal attention in one kernel), the output projection, RMSNorm, one fused gate/up
projection, SiLU, the down projection. Qwen3 adds per-head RMSNorms of the queries and keys between the
projection and the attention (:meth:`GraphBuilder.qk_norms`). Projections are ``MatMulNBits``
(com.microsoft) when quantized, ``MatMul`` against a transposed float initializer otherwise. The embedding is a ``Gather`` or a
``GatherBlockQuantized``; the lm_head a projection or (``tied``) a ``MatMul`` on the embedding table
transposed (one stored copy; onnxruntime folds the ``Transpose`` at load).

Weights never sit in the protobuf: :class:`ExternalData` streams each initializer to the ``.data`` file
as it is produced and leaves a reference in the graph, so a model of any size serialises.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekit.arch import HParams
from edgekit.attention import inv_freq
from edgekit.converters.quantize.nbits import NBitsType, SplitTensors

MS = "com.microsoft"
_ALIGN = 4096  # external tensors start on page boundaries so onnxruntime can map them
_INLINE_MAX = 1024  # tensors up to this many bytes stay in the protobuf

NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


class ExternalData:
    """Appends tensor bytes to one external data file; ``initializer`` returns the graph's reference."""

    def __init__(self, path: Path | None, f: BinaryIO | None) -> None:
        self.path, self.f = path, f
        self.offset = 0

    def initializer(self, name: str, arr: np.ndarray) -> TensorProto:
        arr = np.ascontiguousarray(arr)
        if self.f is None or arr.nbytes <= _INLINE_MAX:
            return numpy_helper.from_array(arr, name)
        pad = -self.offset % _ALIGN
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        self.f.write(memoryview(arr.reshape(-1)).cast("B"))  # no second copy of a large tensor
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        t.data_location = TensorProto.EXTERNAL
        assert self.path is not None
        for k, v in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(arr.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.offset += arr.nbytes
        return t


@dataclass(frozen=True)
class GraphOptions:
    """dtype: activations and float weights, "fp32" or "fp16". opset: the ai.onnx opset (17..23).
    accuracy_level: MatMulNBits' minimum compute accuracy (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
    activations: fastest on CPUs). windows: each layer's attention window, 0 for full attention
    (:func:`..attention.layer_windows`); a layer past the end has none."""

    dtype: str = "fp32"
    opset: int = 21
    accuracy_level: int = 4
    windows: tuple[int, ...] = ()

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(np.float16 if self.dtype == "fp16" else np.float32)


@dataclass
class Linear:
    """A projection's weights: ``float`` ``(N, K)`` (HF layout) or quantized ``q`` with its grid."""

    n: int
    k: int
    float_w: np.ndarray | None = None
    q: SplitTensors | None = None
    qtype: NBitsType | None = None
    bias: np.ndarray | None = None


@dataclass
class GraphBuilder:
    hp: HParams
    opts: GraphOptions
    data: ExternalData
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    _n: Counter = field(default_factory=Counter)
    _names: set = field(default_factory=set)

    # -- plumbing ------------------------------------------------------------------------------------

    def _name(self, base: str) -> str:
        self._n[base] += 1
        return f"{base}_{self._n[base]}" if self._n[base] > 1 else base

    def const(self, name: str, arr: np.ndarray) -> str:
        """Add an initializer; a name given twice refers to the first (how tied tensors are shared)."""
        if name not in self._names:
            self._names.add(name)
            self.inits.append(self.data.initializer(name, arr))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, name: str | None = None,
             domain: str = "", **attrs) -> list[str]:
        nm = self._name(name or op)
        outs = [f"{nm}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=nm, domain=domain or None, **attrs))
        return outs

    def one(self, op: str, inputs: list[str], name: str | None = None, domain: str = "", **attrs) -> str:
        return self.node(op, inputs, 1, name, domain, **attrs)[0]

    # -- blocks --------------------------------------------------------------------------------------

    def rms_norm(self, x: str, gamma: np.ndarray, name: str) -> str:
        dt = self.opts.np_dtype
        w = self.const(f"{name}.weight", gamma.astype(dt))
        xf = x if dt == np.float32 else self.one("Cast", [x], f"{name}/cast_in", to=TensorProto.FLOAT)
        two = self.const(f"{name}/two", np.array(2.0, np.float32))
        eps = self.const(f"{name}/eps", np.array(self.hp.rms_eps, np.float32))
        sq = self.one("Pow", [xf, two], f"{name}/pow")
        if self.opts.opset >= 18:
            axes = self.const(f"{name}/axes", np.array([-1], np.int64))
            ms = self.one("ReduceMean", [sq, axes], f"{name}/mean", keepdims=1)
        else:
            ms = self.one("ReduceMean", [sq], f"{name}/mean", axes=[-1], keepdims=1)
        rms = self.one("Sqrt", [self.one("Add", [ms, eps], f"{name}/add_eps")], f"{name}/sqrt")
        y = self.one("Div", [xf, rms], f"{name}/div")
        if dt != np.float32:
            y = self.one("Cast", [y], f"{name}/cast_out", to=NP_TO_ONNX[dt])
        return self.one("Mul", [y, w], f"{name}/scale")

    def linear(self, x: str, lin: Linear, name: str) -> str:
        dt = self.opts.np_dtype
        if lin.q is not None:
            assert lin.qtype is not None
            t = lin.qtype
            ins = [x, self.const(f"{name}.qweight", lin.q.B), self.const(f"{name}.scales", lin.q.scales.astype(dt))]
            if lin.q.zero_points is not None:
                ins.append(self.const(f"{name}.qzeros", lin.q.zero_points))
            y = self.one("MatMulNBits", ins, f"{name}/MatMulNBits", domain=MS, K=lin.k, N=lin.n, bits=t.bits,
                         block_size=t.block, accuracy_level=self.opts.accuracy_level)
        else:
            assert lin.float_w is not None
            wt = self.const(f"{name}.weight_t", np.ascontiguousarray(lin.float_w.T.astype(dt)))
            y = self.one("MatMul", [x, wt], f"{name}/MatMul")
        if lin.bias is not None:
            y = self.one("Add", [y, self.const(f"{name}.bias", lin.bias.astype(dt))], f"{name}/bias")
        return y

    def rotary_caches(self) -> tuple[str, str]:
        cos, sin = rotary_tables(self.hp)
        dt = self.opts.np_dtype
        return self.const("rotary.cos_cache", cos.astype(dt)), self.const("rotary.sin_cache", sin.astype(dt))

    def qk_norms(self, qkv: str, q_gamma: np.ndarray, k_gamma: np.ndarray, name: str) -> tuple[str, str, str]:
        """Qwen3's per-head RMSNorms of the queries and keys (one weight of head_dim shared by the heads),
        before the rotary embedding GroupQueryAttention applies: the fused projection split into q, k, v,
        q and k viewed as (batch, seq, heads, head_dim) around :meth:`rms_norm` (last axis), and back."""
        hp = self.hp
        q_w, kv_w = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        split = self.const(f"{name}/qkv_split", np.array([q_w, kv_w, kv_w], np.int64))
        q, k, v = self.node("Split", [qkv, split], 3, f"{name}/qkv_Split", axis=-1)
        flat = self.const("qk_norm/flat_shape", np.array([0, 0, -1], np.int64))
        normed = []
        for x, heads, gamma, which in ((q, hp.n_head, q_gamma, "q_norm"), (k, hp.n_head_kv, k_gamma, "k_norm")):
            shape = self.const(f"qk_norm/{which}_shape", np.array([0, 0, heads, hp.head_dim], np.int64))
            x = self.one("Reshape", [x, shape], f"{name}.{which}/heads")
            x = self.rms_norm(x, gamma, f"{name}.{which}")
            normed.append(self.one("Reshape", [x, flat], f"{name}.{which}/flat"))
        return normed[0], normed[1], v

    def attention(self, qkv: str, i: int, seqlens_k: str, total_len: str, caches: tuple[str, str],
                  kv: tuple[str, str] = ("", "")) -> str:
        """``qkv``: the packed projection, or the queries alone with ``kv`` the keys and values."""
        hp = self.hp
        out, pk, pv = self.node(
            "GroupQueryAttention",
            [qkv, *kv, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len, *caches],
            3, f"layers.{i}.attn/GroupQueryAttention", domain=MS,
            num_heads=hp.n_head, kv_num_heads=hp.n_head_kv, scale=1.0 / math.sqrt(hp.head_dim),
            do_rotary=1, rotary_interleaved=0, local_window_size=self.window(i) or -1,
        )
        self.nodes.append(helper.make_node("Identity", [pk], [f"present.{i}.key"], name=f"present.{i}.key"))
        self.nodes.append(helper.make_node("Identity", [pv], [f"present.{i}.value"], name=f"present.{i}.value"))
        return out

    def window(self, layer: int) -> int:
        return self.opts.windows[layer] if layer < len(self.opts.windows) else 0

    def mask_inputs(self) -> tuple[str, str]:
        """``seqlens_k`` (int32 [batch], valid tokens - 1) and ``total_sequence_length`` (int32 scalar)."""
        one = self.const("mask/one", np.array(1, np.int64))
        axes = self.const("mask/axes", np.array([1], np.int64))
        total = self.one("ReduceSum", ["attention_mask", axes], "mask/sum", keepdims=0)
        seqlens = self.one("Cast", [self.one("Sub", [total, one], "mask/sub")], "mask/seqlens_k", to=TensorProto.INT32)
        shape = self.one("Shape", ["attention_mask"], "mask/shape")
        idx = self.const("mask/idx1", np.array(1, np.int64))
        tl = self.one("Gather", [shape, idx], "mask/total_len", axis=0)
        return seqlens, self.one("Cast", [tl], "mask/total_len_i32", to=TensorProto.INT32)

    def swiglu(self, gate_up: str, n_ff: int, name: str) -> str:
        split = self.const(f"{name}/split", np.array([n_ff, n_ff], np.int64))
        gate, up = self.node("Split", [gate_up, split], 2, f"{name}/Split", axis=-1)
        silu = self.one("Mul", [gate, self.one("Sigmoid", [gate], f"{name}/sigmoid")], f"{name}/silu")
        return self.one("Mul", [silu, up], f"{name}/mul")

    # -- the model -----------------------------------------------------------------------------------

    def io(self) -> tuple[list, list]:
        hp, et = self.hp, NP_TO_ONNX[self.opts.np_dtype]
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
        ]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", hp.n_vocab])]
        for i in range(hp.n_layer):
            for kv in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kv}", et, ["batch", hp.n_head_kv, "past", hp.head_dim]))
                outputs.append(helper.make_tensor_value_info(
                    f"present.{i}.{kv}", et, ["batch", hp.n_head_kv, "total", hp.head_dim]))
        return inputs, outputs

    def finish(self, inputs: list, outputs: list, name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.inits)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", self.opts.opset), helper.make_opsetid(MS, 1)],
            producer_name="edgekit",
        )
        model.ir_version = min(model.ir_version, 10)  # onnxruntime reads IR <= 10 (onnx 1.16+ writes 11)
        return model


def rotary_tables(hp: HParams) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches ``(max_positions, head_dim / 2)`` for HF's non-interleaved rotary embedding, with
    the rope scalings Llama-family checkpoints use (linear, llama3: :func:`..attention.inv_freq`).

    Computed in float32 the way transformers computes them (inverse frequencies, then position times
    frequency, then cos/sin, all float32), not more precisely: the graph should reproduce the reference
    model, and at position p the float32 angle is off by up to p * 2**-24 relative."""
    f32 = np.float32
    inv = inv_freq(hp, f32)
    freqs = np.arange(hp.n_ctx_train, dtype=f32)[:, None] * inv[None, :]
    return np.cos(freqs).astype(f32), np.sin(freqs).astype(f32)


def ops_used(model: onnx.ModelProto) -> dict[str, int]:
    """``{"domain::op" or "op": count}`` of the graph's nodes."""
    c = Counter((f"{n.domain}::{n.op_type}" if n.domain else n.op_type) for n in model.graph.node)
    return dict(sorted(c.items()))
