"""How a checkpoint's tensors become the ONNX graph's: which tensor gets which grid (the plan the
quantizers' ``prepare`` reads, in GGUF names), loading and encoding them through the quantizer, and
assembling embedding, layers and head with :class:`.onnx_graph.GraphBuilder`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGMLQuantizationType as T

from edgekit.converters.formats.base import ProgressFn
from edgekit.converters.quantize import nbits
from edgekit.converters.quantize.base import Quantizer
from edgekit.converters.quantize.nbits import NBitsType
from edgekit.converters.structure.width import cut_padding, own_shape
from edgekit.errors import InputError, UnsupportedError
from edgekit.model import HFCheckpoint

if TYPE_CHECKING:
    from edgekit.converters.formats.onnx.options import OnnxOptions


@dataclass
class _Planned:
    """One tensor the graph uses: its checkpoint name, GGUF name, and grid (or float type)."""

    hf: str
    gguf: str
    qtype: Any  # NBitsType or a float ggml type


def _plan(ckpt: HFCheckpoint, opts: OnnxOptions) -> dict[str, _Planned]:
    """GGUF-named plan (what the quantizers' ``prepare`` reads) of the tensors the quantizer encodes.

    The embedding is not in it: it is a lookup table, encoded by plain round-to-nearest (see
    :meth:`_Weights.embedding`). A quantized lm_head always is, as ``output.weight``, even when the
    checkpoint ties it to the embedding: in ONNX the two are separate tensors, so GPTQ may fit the head
    to its own inputs without touching the table.
    """
    out: dict[str, _Planned] = {}
    emb_hf = None
    for hf in ckpt.tensors:
        g = ckpt.spec.gguf_name(hf)
        if g is None:
            continue
        if g == "token_embd.weight":
            emb_hf = hf
            continue
        if g == "output.weight":
            if ckpt.hparams.tie_embeddings:
                continue
            qt: Any = opts.lm_head_grid() or T.F32
        elif g.endswith(".weight") and "norm" not in g and opts.quantized:
            qt = opts.grid
        else:
            qt = T.F32
        out[g] = _Planned(hf, g, qt)
    if emb_hf is None:
        raise UnsupportedError("the checkpoint has no token embedding (model.embed_tokens.weight)")
    grid = opts.lm_head_grid()
    if opts.embed_mode == "shared":
        # one tensor for both uses: importance-weighted RTN by the quantizer, as for GGUF's tied files
        out["token_embd.weight"] = _Planned(emb_hf, "token_embd.weight", grid)
        return out
    if ckpt.hparams.tie_embeddings and grid is not None:
        out["output.weight"] = _Planned(emb_hf, "output.weight", grid)
    out["token_embd.weight"] = _Planned(emb_hf, "token_embd.weight",
                                        NBitsType(8, opts.block_size, True) if opts.embed_mode == "int8" else T.F32)
    return out


class _Weights:
    """Loads a tensor, runs it through the quantizer (in the checkpoint's own layout, as every quantizer
    works), and hands back HF-layout floats or MatMulNBits tensors."""

    def __init__(self, ckpt: HFCheckpoint, quantizer: Quantizer, plan: dict[str, _Planned]) -> None:
        self.ckpt, self.quantizer, self.plan = ckpt, quantizer, plan

    def _load(self, g: str) -> tuple[np.ndarray, tuple[int, ...]]:
        """The float32 weights of ``g`` without the zero padding of per-block FFN widths, and the shape
        the checkpoint stores (padding included: what calibrated methods encode)."""
        w = self.ckpt.load(self.plan[g].hf).astype(np.float32, copy=False)
        shape = own_shape(self.ckpt.hparams, g, w.shape)
        return (w if shape == w.shape else np.ascontiguousarray(w[: shape[0], : shape[-1]])), w.shape

    def float(self, g: str) -> np.ndarray:
        w, stored = self._load(g)
        raw = np.ascontiguousarray(self.quantizer.quantize(g, w, T.F32)).reshape(-1).view(np.float32)
        if raw.size != w.size:  # a calibrated method's weights, in the checkpoint's padded shape
            raw = cut_padding(raw.reshape(stored), w.shape[0], w.shape[-1])
        return raw.reshape(w.shape)

    def embedding(self) -> tuple[Any, np.ndarray | None]:
        """The token embedding: ``(None, float32 table)``, or ``(int8 records, None)`` by round-to-nearest
        (a lookup table has no activations to calibrate against). The float table of a quantized embedding
        is not handed back: a large vocabulary's is hundreds of MB, held through every layer."""
        p = self.plan["token_embd.weight"]
        w = self.ckpt.load(p.hf).astype(np.float32, copy=False)
        if p.qtype == T.F32:
            return None, w
        return nbits.split(p.qtype, p.qtype.quantize(w), w.shape[0]), None

    def quantized(self, g: str, qt: NBitsType) -> nbits.SplitTensors:
        """MatMulNBits tensors of ``g`` on grid ``qt`` (HF layout)."""
        w, _ = self._load(g)
        rec = cut_padding(self.quantizer.quantize(g, w, qt), w.shape[0], qt.row_bytes(w.shape[-1]))
        del w
        return nbits.split(qt, rec, rec.shape[0])


def _build(ckpt: HFCheckpoint, opts: OnnxOptions, gopts, weights: _Weights, data, progress: ProgressFn):
    import edgekit.converters.formats.onnx.graph as og

    hp = ckpt.hparams
    b = og.GraphBuilder(hp, gopts, data)
    dt = gopts.np_dtype
    tensors: dict[str, dict[str, Any]] = {}
    step = 0
    total = hp.n_layer + 2

    def record(hf_names: list[str], qt: Any, shape: tuple[int, ...], **extra: Any) -> None:
        for n in hf_names:
            tensors[n] = {"type": qt.name if hasattr(qt, "name") else str(qt), "shape": list(shape), **extra}

    # embedding
    progress("embedding", step, total)
    emb_name = weights.plan["token_embd.weight"].hf
    embed_float = None
    if opts.embed_mode == "shared":
        qt = weights.plan["token_embd.weight"].qtype
        q = weights.quantized("token_embd.weight", qt)
        names = [b.const("lm_head.qweight", q.B), b.const("lm_head.scales", q.scales.astype(dt))]
        zp = q.zero_points if q.zero_points is not None else _default_zero_points(qt, q.scales.shape)
        b.const("lm_head.qzeros", zp)
        flat = b.one("Reshape", [names[0], b.const("embed_tokens/shape", np.array([hp.n_vocab, -1], np.int64))],
                     "embed_tokens/Reshape")
        x = b.one("GatherBlockQuantized", [flat, "input_ids", names[1], "lm_head.qzeros"],
                  "embed_tokens/GatherBlockQuantized", domain=og.MS, bits=qt.bits, block_size=qt.block,
                  gather_axis=0, quantize_axis=1)
        record([emb_name], qt, (hp.n_vocab, hp.n_embd))
        shared_head = og.Linear(hp.n_vocab, hp.n_embd, q=nbits.SplitTensors(q.B, q.scales, zp), qtype=qt)
    elif (emb := weights.embedding())[0] is not None:
        q, qt, shared_head = emb[0], weights.plan["token_embd.weight"].qtype, None
        zp = q.zero_points if q.zero_points is not None else np.full(q.scales.shape, qt.default_zp, np.uint8)
        x = b.one("GatherBlockQuantized", [
            b.const("embed_tokens.qweight", q.B.reshape(hp.n_vocab, hp.n_embd)), "input_ids",
            b.const("embed_tokens.scales", q.scales.astype(dt)), b.const("embed_tokens.qzeros", zp)],
            "embed_tokens/GatherBlockQuantized", domain=og.MS, bits=8, block_size=qt.block, gather_axis=0,
            quantize_axis=1)
        record([emb_name], qt, (hp.n_vocab, hp.n_embd))
        q = emb = None  # the records are in the data file now; a large vocabulary's are 100s of MB
    else:
        embed_float, shared_head = emb[1], None
        table = b.const("embed_tokens.weight", embed_float.astype(dt))
        x = b.one("Gather", [table, "input_ids"], "embed_tokens/Gather", axis=0)
        record([emb_name], gopts.dtype.upper(), (hp.n_vocab, hp.n_embd))

    seqlens, total_len = b.mask_inputs()
    caches = b.rotary_caches()
    for i in range(hp.n_layer):
        step += 1
        progress(f"layer {i + 1}/{hp.n_layer}", step, total)
        pre = f"blk.{i}."
        h = b.rms_norm(x, weights.float(pre + "attn_norm.weight"), f"layers.{i}.input_layernorm")
        qkv = _linear(weights, opts, [pre + "attn_q.weight", pre + "attn_k.weight", pre + "attn_v.weight"],
                      [pre + "attn_q.bias", pre + "attn_k.bias", pre + "attn_v.bias"], record)
        qkv_out = b.linear(h, qkv, f"layers.{i}.attn.qkv_proj")
        if pre + "attn_q_norm.weight" in weights.plan:  # Qwen3: per-head q/k RMSNorms before the rotary
            q, k, v = b.qk_norms(qkv_out, weights.float(pre + "attn_q_norm.weight"),
                                 weights.float(pre + "attn_k_norm.weight"), f"layers.{i}.self_attn")
            a = b.attention(q, i, seqlens, total_len, caches, kv=(k, v))
        else:
            a = b.attention(qkv_out, i, seqlens, total_len, caches)
        o = _linear(weights, opts, [pre + "attn_output.weight"], [], record)
        x = b.one("Add", [x, b.linear(a, o, f"layers.{i}.attn.o_proj")], f"layers.{i}/residual_attn")
        h = b.rms_norm(x, weights.float(pre + "ffn_norm.weight"), f"layers.{i}.post_attention_layernorm")
        gu = _linear(weights, opts, [pre + "ffn_gate.weight", pre + "ffn_up.weight"], [], record)
        m = b.swiglu(b.linear(h, gu, f"layers.{i}.mlp.gate_up_proj"), gu.n // 2, f"layers.{i}.mlp")
        d = _linear(weights, opts, [pre + "ffn_down.weight"], [], record)
        x = b.one("Add", [x, b.linear(m, d, f"layers.{i}.mlp.down_proj")], f"layers.{i}/residual_mlp")

    step += 1
    progress("lm_head", step, total)
    h = b.rms_norm(x, weights.float("output_norm.weight"), "norm")
    if shared_head is not None:
        logits = b.linear(h, shared_head, "lm_head")  # the initializers the embedding already reads
    else:
        logits = _lm_head(b, weights, opts, h, embed_float, record)
    if dt != np.float32:
        logits = b.one("Cast", [logits], "logits/cast", to=og.TensorProto.FLOAT)
    b.nodes.append(og.helper.make_node("Identity", [logits], ["logits"], name="logits"))
    inputs, outputs = b.io()
    progress("graph built", total, total)
    return b.finish(inputs, outputs, ckpt.path.name), tensors


def _linear(weights: _Weights, opts: OnnxOptions, names: list[str], bias_names: list[str],
            record: Callable) -> Any:
    """One (possibly fused) projection from the GGUF-named tensors ``names`` (rows concatenated)."""
    from edgekit.converters.formats.onnx.graph import Linear

    plan = weights.plan
    biases = [weights.float(n) for n in bias_names if n in plan]
    bias = np.concatenate(biases) if biases else None
    qt = plan[names[0]].qtype
    if isinstance(qt, NBitsType):
        parts = [weights.quantized(n, qt) for n in names]
        n_rows = sum(p.B.shape[0] for p in parts)
        k = parts[0].B.shape[1] * qt.block
        zps = [p.zero_points for p in parts]
        q = nbits.SplitTensors(np.concatenate([p.B for p in parts]), np.concatenate([p.scales for p in parts]),
                               None if zps[0] is None else np.concatenate(zps))
        for n, p in zip(names, parts, strict=True):
            record([plan[n].hf], qt, (p.B.shape[0], k))
        return Linear(n_rows, k, q=q, qtype=qt, bias=bias)
    ws = [weights.float(n) for n in names]
    for n, w in zip(names, ws, strict=True):
        record([plan[n].hf], opts.graph_dtype.upper(), w.shape)
    w = np.concatenate(ws)
    return Linear(w.shape[0], w.shape[1], float_w=w, bias=bias)


def _lm_head(b, weights: _Weights, opts: OnnxOptions, h: str, embed_float: np.ndarray | None,
             record: Callable) -> str:
    from edgekit.converters.formats.onnx.graph import Linear

    hp = weights.ckpt.hparams
    tied = hp.tie_embeddings
    mode = opts.lm_head_mode
    # a tied checkpoint's head stored apart is a second table of the embedding's parameters: listed (its
    # bytes are in the file) and marked, so the parameter count takes it once
    copy = {"tied_to": weights.plan["token_embd.weight"].hf} if tied else {}
    if mode == "tied":
        if embed_float is None:
            raise InputError("lm_head=tied needs embed=float")
        # The file holds the table once; onnxruntime folds the Transpose at load into the weight a separate
        # head stores, so the session runs the same MatMul (same speed, same logits). A Gemm(transB=1) left a
        # Reshape between head and output: on x86 the fp16 graph then rounded the logits to fp16.
        t = b.one("Transpose", ["embed_tokens.weight"], "lm_head/Transpose", perm=[1, 0])
        return b.one("MatMul", [h, t], "lm_head/MatMul")
    head = weights.plan.get("output.weight")
    grid = head.qtype if head is not None and isinstance(head.qtype, NBitsType) else None
    if grid is not None:
        q = weights.quantized("output.weight", grid)
        record(["lm_head.weight"], grid, (hp.n_vocab, hp.n_embd), **copy)
        return b.linear(h, Linear(hp.n_vocab, hp.n_embd, q=q, qtype=grid), "lm_head")
    w = embed_float if (tied and embed_float is not None) else weights.float("output.weight" if not tied else
                                                                               "token_embd.weight")
    record(["lm_head.weight"], opts.graph_dtype.upper(), w.shape, **copy)
    return b.linear(h, Linear(hp.n_vocab, hp.n_embd, float_w=w), "lm_head")


def _default_zero_points(t: NBitsType, scales_shape: tuple[int, ...]) -> np.ndarray:
    """Explicit zero points of a symmetric grid, packed as MatMulNBits / GatherBlockQuantized read them."""
    n, nb = scales_shape
    if t.bits == 8:
        return np.full((n, nb), t.default_zp, np.uint8)
    return np.full((n, (nb + 1) // 2), t.default_zp | (t.default_zp << 4), np.uint8)
