"""ONNX artifacts: a KV-cache decoder graph with 4-/8-bit ``MatMulNBits`` weights (onnxruntime).

``edgekit convert MODEL --to onnx --bits 4 --method gptq`` writes ``model.onnx`` (the graph, small),
``model.onnx.data`` (every weight, page-aligned) and the tokenizer files beside them. Weights are
encoded by edgekit's own quantizers onto MatMulNBits grids (:mod:`..quantize.nbits`), so RTN, GPTQ, AWQ
and the importance matrix work exactly as for GGUF; the graph is :mod:`.onnx_graph`'s.

Options (``ConvertRecipe.extra``, on the CLI ``--block-size``, ``--sym/--asym``, ``--dtype`` and
``-O key=value``) are :class:`OnnxOptions`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

from edgekit.arch import unpermute_for_rope
from edgekit.converters.formats.base import ConvertRecipe, Format, ProgressFn, no_progress, register_format
from edgekit.converters.quantize import nbits
from edgekit.converters.quantize.base import Quantizer
from edgekit.converters.quantize.nbits import NBitsType
from edgekit.errors import DiskFullError, InputError, UnsupportedError, require
from edgekit.fsutil import check_free_space
from edgekit.model import HFCheckpoint

# Files a runtime needs beside the graph (tokenizer, chat template, generation defaults).
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "chat_template.jinja")
PROTOBUF_LIMIT = 2 << 30
_OPSETS = range(17, 24)


@dataclass(frozen=True)
class OnnxOptions:
    """How the ONNX artifact is built.

    bits: 4 or 8 (MatMulNBits), 16 or 32 (float graph, no quantization).
    block_size: weights per quantization block along the input dimension (16..256, a power of two).
    symmetric: zero point fixed at 2**(bits-1) (None: asymmetric for 4 bits, symmetric for 8).
    dtype: "fp32" or "fp16" activations and float weights (bits 16 implies fp16).
    embed: "float", "int8" (GatherBlockQuantized), or "shared": the embedding reads the quantized lm_head's
        own tensors (one copy; checkpoints with tied embeddings; the default for them when quantized).
    lm_head: "int8", "int4", "float", or "tied" (a Gemm reading the float embedding table: one copy);
        default: the body's bit width (int4 for 4-bit, as onnxruntime's tools do: the head is read for every
        token, so an 8-bit head costs about 15% of decode speed on SmolLM2; ``int8`` buys back quality).
    accuracy_level: MatMulNBits compute accuracy (4: int8 activations, fastest on CPU; 1: fp32).
    opset: the ai.onnx opset (17..23). external_data: weights in model.onnx.data (False: one file,
    only possible under protobuf's 2 GiB limit).
    """

    bits: int = 4
    block_size: int = 32
    symmetric: bool | None = None
    dtype: str = "fp32"
    embed: str | None = None
    lm_head: str | None = None
    accuracy_level: int = 4
    opset: int = 21
    external_data: bool = True

    def __post_init__(self) -> None:
        if self.bits not in (4, 8, 16, 32):
            raise InputError(f"--bits {self.bits} is not available for ONNX; use 4 or 8 (MatMulNBits), 16 or 32 (float)")
        if self.dtype not in ("fp32", "fp16"):
            raise InputError(f"--dtype {self.dtype!r}: use fp32 or fp16")
        if self.opset not in _OPSETS:
            raise UnsupportedError(f"opset {self.opset} is not supported; use {_OPSETS.start}..{_OPSETS.stop - 1}")
        if self.embed not in (None, "float", "int8", "shared"):
            raise InputError(f"embed={self.embed!r}: use float, int8 or shared")
        if self.lm_head not in (None, "int8", "int4", "float", "tied"):
            raise InputError(f"lm_head={self.lm_head!r}: use int8, int4, float or tied")
        if self.lm_head == "tied" and self.embed_mode == "int8":
            raise InputError("lm_head=tied shares the float embedding table; use it with embed=float")
        if self.accuracy_level not in range(5):
            raise InputError("accuracy_level must be 0..4")
        if self.quantized:
            self.grid  # validates the block size  # noqa: B018

    @property
    def quantized(self) -> bool:
        return self.bits in (4, 8)

    @property
    def graph_dtype(self) -> str:
        return "fp16" if self.bits == 16 else self.dtype

    @property
    def grid(self) -> NBitsType:
        sym = self.symmetric if self.symmetric is not None else self.bits == 8
        return NBitsType(self.bits, self.block_size, sym)

    @property
    def embed_mode(self) -> str:
        return self.embed or ("int8" if self.quantized else "float")

    def resolve(self, tied: bool) -> OnnxOptions:
        """Fill in the embedding default for this checkpoint and check the head/embedding pairing."""
        from dataclasses import replace

        embed = self.embed
        head_quantized = self.lm_head_grid() is not None
        if embed is None:
            embed = "shared" if tied and head_quantized else self.embed_mode
        if embed == "shared" and not (tied and head_quantized):
            raise InputError("embed=shared needs a checkpoint with tied embeddings and a quantized lm_head "
                             "(lm_head=int8 or int4)")
        return replace(self, embed=embed, lm_head=self.lm_head_mode)

    @property
    def lm_head_mode(self) -> str:
        return self.lm_head or ({4: "int4", 8: "int8"}.get(self.bits, "float"))

    def lm_head_grid(self) -> NBitsType | None:
        mode = self.lm_head_mode
        if mode == "int8":
            return NBitsType(8, self.block_size, True)
        if mode == "int4":
            return NBitsType(4, self.block_size, self.grid.symmetric if self.quantized else False)
        return None

    @classmethod
    def from_recipe(cls, recipe: ConvertRecipe) -> OnnxOptions:
        if recipe.bpw is not None:
            raise UnsupportedError("--bpw budgets are for GGUF; for ONNX give --bits 4|8 (and --block-size)")
        if recipe.tensor_types:
            raise UnsupportedError("--tensor-type applies to GGUF; for ONNX use -O lm_head=... / -O embed=...")
        known = {f.name for f in fields(cls)} - {"bits"}
        extra = dict(recipe.extra)
        unknown = sorted(set(extra) - known)
        if unknown:
            raise InputError(f"unknown ONNX option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        bits = recipe.bits
        if recipe.preset:
            p = recipe.preset.upper()
            if p in ("F32", "FP32"):
                bits = 32
            elif p in ("F16", "FP16"):
                bits = 16
            else:
                g = NBitsType.parse(p)
                bits = g.bits
                extra.setdefault("block_size", g.block)
                extra.setdefault("symmetric", g.symmetric)
        return cls(bits=int(bits or 4), **extra)


# ----------------------------------------------------------------------------------------------------


@dataclass
class _Planned:
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
    """Loads a tensor, runs it through the quantizer (in GGUF row order, as quantizers expect), and
    hands back HF-layout floats or MatMulNBits tensors."""

    def __init__(self, ckpt: HFCheckpoint, quantizer: Quantizer, plan: dict[str, _Planned]) -> None:
        self.ckpt, self.quantizer, self.plan = ckpt, quantizer, plan

    def _to_gguf(self, g: str, w: np.ndarray) -> np.ndarray:
        from edgekit.converters.formats.gguf import to_gguf_layout

        return to_gguf_layout(self.ckpt, g, w)

    def _from_gguf(self, g: str, rows: np.ndarray) -> np.ndarray:
        hp = self.ckpt.hparams
        if self.ckpt.spec.permute_qk:
            if g.endswith("attn_q.weight"):
                return unpermute_for_rope(rows, hp.n_head)
            if g.endswith("attn_k.weight"):
                return unpermute_for_rope(rows, hp.n_head_kv)
        return rows

    def float(self, g: str) -> np.ndarray:
        p = self.plan[g]
        w = self.ckpt.load(p.hf).astype(np.float32)
        raw = self.quantizer.quantize(g, self._to_gguf(g, w), T.F32)
        return self._from_gguf(g, np.frombuffer(raw.tobytes(), np.float32).reshape(w.shape))

    def embedding(self) -> tuple[Any, np.ndarray]:
        """The token embedding: float32 table, or int8 records by round-to-nearest (a lookup table
        has no activations to calibrate against)."""
        p = self.plan["token_embd.weight"]
        w = self.ckpt.load(p.hf).astype(np.float32)
        if p.qtype == T.F32:
            return None, w
        from edgekit.converters.quantize import ggml

        rec = ggml.quantize(w, p.qtype)
        return nbits.split(p.qtype, rec, w.shape[0]), w

    def quantized(self, g: str, qt: NBitsType) -> tuple[nbits.SplitTensors, np.ndarray]:
        """MatMulNBits tensors of ``g`` on grid ``qt`` and the float32 weights they decode to (HF layout)."""
        hf = self.plan[g].hf
        w = self.ckpt.load(hf).astype(np.float32)
        rec = self._from_gguf(g, self.quantizer.quantize(g, self._to_gguf(g, w), qt))
        return nbits.split(qt, rec, w.shape[0]), nbits.dequantize(qt, rec)


@register_format("onnx")
class OnnxFormat(Format):
    """onnxruntime's format: decoder graph with KV cache, MatMulNBits weights, external data."""

    name = "onnx"
    model_filename = "model.onnx"

    def default_output_suffix(self, recipe: ConvertRecipe) -> str:
        opts = OnnxOptions.from_recipe(recipe)
        if not opts.quantized:
            return f"onnx-{opts.graph_dtype}"
        return f"onnx-{opts.grid.name.lower()}"

    def convert(self, checkpoint: HFCheckpoint, out_dir: Path, recipe: ConvertRecipe, quantizer: Quantizer,
                progress: ProgressFn = no_progress) -> dict[str, Any]:
        onnx = require("onnx", "onnx")
        from edgekit.converters.formats import onnx_graph as og

        checkpoint.require_tokenizer()
        hp = checkpoint.hparams
        opts = OnnxOptions.from_recipe(recipe).resolve(hp.tie_embeddings)
        if not opts.quantized and quantizer.config.method != "rtn":
            raise InputError(f"--method {quantizer.config.method} quantizes weights; give --bits 4 or 8 for ONNX")
        if opts.quantized and (hp.n_embd % opts.block_size or hp.n_ff % opts.block_size):
            raise InputError(f"hidden size {hp.n_embd} / FFN size {hp.n_ff} are not multiples of --block-size "
                             f"{opts.block_size}; pick a block size that divides both (e.g. 32)")
        if hp.head_dim % 16:
            raise UnsupportedError(f"head size {hp.head_dim} is not a multiple of 16, which onnxruntime's "
                                   "GroupQueryAttention kernel needs; export this model to GGUF instead")
        plan = _plan(checkpoint, opts)
        est = sum(checkpoint.tensors[p.hf].numel * (4 if p.qtype == T.F32 else 1) for p in plan.values())
        check_free_space(out_dir, est + (64 << 20), "the ONNX files")
        if not opts.external_data and est > PROTOBUF_LIMIT - (64 << 20):
            raise InputError(f"about {est / 2**30:.1f} GiB of weights cannot fit one protobuf file (2 GiB limit); "
                             "drop -O external_data=false (weights then go to model.onnx.data)")
        shared = opts.embed_mode == "shared"
        quantizer.prepare(checkpoint, {g: p.qtype for g, p in plan.items() if shared or g != "token_embd.weight"},
                          progress)

        graph_opts = og.GraphOptions(dtype=opts.graph_dtype, opset=opts.opset, accuracy_level=opts.accuracy_level,
                                     sliding_window=checkpoint.config.get("sliding_window"))
        model_path = out_dir / self.model_filename
        data_path = out_dir / (self.model_filename + ".data")
        try:
            if opts.external_data:
                with open(data_path, "wb") as f:
                    model, tensors = _build(checkpoint, opts, graph_opts, _Weights(checkpoint, quantizer, plan),
                                            og.ExternalData(data_path, f), progress)
            else:
                model, tensors = _build(checkpoint, opts, graph_opts, _Weights(checkpoint, quantizer, plan),
                                        og.ExternalData(None, None), progress)
            onnx.save_model(model, str(model_path))
        except OSError as exc:
            if exc.errno == 28:
                raise DiskFullError("the disk filled up while writing the ONNX files; free space and retry") from exc
            raise
        except ValueError as exc:  # protobuf refuses messages over 2 GiB
            if "2GB" in str(exc) or "2 GiB" in str(exc) or "too large" in str(exc).lower():
                raise InputError("the graph exceeds protobuf's 2 GiB limit; keep the default external data") from exc
            raise
        progress("checking the graph (onnx.checker)", 0, 1)
        onnx.checker.check_model(str(model_path))
        for name in SIDE_FILES:
            if (checkpoint.path / name).exists():
                shutil.copy2(checkpoint.path / name, out_dir / name)
        return _manifest_fields(opts, model, tensors, model_path, data_path if opts.external_data else None,
                                quantizer)


def _build(ckpt: HFCheckpoint, opts: OnnxOptions, gopts, weights: _Weights, data, progress: ProgressFn):
    from edgekit.converters.formats import onnx_graph as og

    hp = ckpt.hparams
    b = og.GraphBuilder(hp, gopts, data)
    dt = gopts.np_dtype
    tensors: dict[str, dict[str, Any]] = {}
    step = 0
    total = hp.n_layer + 2

    def record(hf_names: list[str], qt: Any, shape: tuple[int, ...]) -> None:
        for n in hf_names:
            tensors[n] = {"type": qt.name if hasattr(qt, "name") else str(qt), "shape": list(shape)}

    # embedding
    progress("embedding", step, total)
    emb_name = weights.plan["token_embd.weight"].hf
    embed_float = None
    if opts.embed_mode == "shared":
        qt = weights.plan["token_embd.weight"].qtype
        q, _ = weights.quantized("token_embd.weight", qt)
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
        a = b.attention(b.linear(h, qkv, f"layers.{i}.attn.qkv_proj"), i, seqlens, total_len, caches)
        o = _linear(weights, opts, [pre + "attn_output.weight"], [], record)
        x = b.one("Add", [x, b.linear(a, o, f"layers.{i}.attn.o_proj")], f"layers.{i}/residual_attn")
        h = b.rms_norm(x, weights.float(pre + "ffn_norm.weight"), f"layers.{i}.post_attention_layernorm")
        gu = _linear(weights, opts, [pre + "ffn_gate.weight", pre + "ffn_up.weight"], [], record)
        m = b.swiglu(b.linear(h, gu, f"layers.{i}.mlp.gate_up_proj"), hp.n_ff, f"layers.{i}.mlp")
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
    from edgekit.converters.formats.onnx_graph import Linear

    plan = weights.plan
    biases = [weights.float(n) for n in bias_names if n in plan]
    bias = np.concatenate(biases) if biases else None
    qt = plan[names[0]].qtype
    if isinstance(qt, NBitsType):
        parts = [weights.quantized(n, qt)[0] for n in names]
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
    from edgekit.converters.formats.onnx_graph import Linear

    hp = weights.ckpt.hparams
    tied = hp.tie_embeddings
    mode = opts.lm_head_mode
    name = "lm_head.weight" if not tied else weights.plan["token_embd.weight"].hf
    if mode == "tied":
        if embed_float is None:
            raise InputError("lm_head=tied needs embed=float")
        # Gemm(transB=1) reads the (vocab, hidden) embedding table as is: no second copy
        flat = b.one("Reshape", [h, b.const("lm_head/flat", np.array([-1, hp.n_embd], np.int64))], "lm_head/flat")
        y = b.one("Gemm", [flat, "embed_tokens.weight"], "lm_head/Gemm", transB=1)
        shape = b.one("Concat", [b.one("Shape", ["input_ids"], "lm_head/ids_shape"),
                                 b.const("lm_head/vocab", np.array([hp.n_vocab], np.int64))], "lm_head/shape", axis=0)
        return b.one("Reshape", [y, shape], "lm_head/unflat")
    grid = opts.lm_head_grid()
    if grid is not None:
        q, _ = weights.quantized("output.weight", grid)
        record(["lm_head.weight"], grid, (hp.n_vocab, hp.n_embd))
        return b.linear(h, Linear(hp.n_vocab, hp.n_embd, q=q, qtype=grid), "lm_head")
    w = embed_float if (tied and embed_float is not None) else weights.float("output.weight" if not tied else
                                                                               "token_embd.weight")
    record([name], opts.graph_dtype.upper(), w.shape)
    return b.linear(h, Linear(hp.n_vocab, hp.n_embd, float_w=w), "lm_head")


def _manifest_fields(opts: OnnxOptions, model, tensors: dict, model_path: Path, data_path: Path | None,
                     quantizer: Quantizer) -> dict[str, Any]:
    from edgekit.converters.formats.onnx_graph import ops_used

    size = model_path.stat().st_size + (data_path.stat().st_size if data_path else 0)
    n_params = sum(int(np.prod(t["shape"])) for t in tensors.values())
    files = {"model": model_path.name}
    if data_path:
        files["data"] = data_path.name
    fields_: dict[str, Any] = {
        "files": files,
        "preset": opts.grid.name if opts.quantized else opts.graph_dtype.upper(),
        "onnx": {
            **{k: v for k, v in asdict(opts).items() if v is not None},
            "symmetric": opts.grid.symmetric if opts.quantized else None,
            "embed": opts.embed_mode, "lm_head": opts.lm_head_mode, "graph_dtype": opts.graph_dtype,
            "opset": {"ai.onnx": opts.opset, "com.microsoft": 1},
            "ir_version": int(model.ir_version),
            "ops": ops_used(model),
            "inputs": [i.name for i in model.graph.input][:4] + ["..."],
        },
        "n_params": n_params,
        "size_bytes": size,
        "bpw": round(8 * size / n_params, 4) if n_params else 0.0,
        "tensors": tensors,
    }
    if getattr(quantizer, "report", None):
        fields_["quantizer_report"] = {k: v for k, v in quantizer.report.items() if k.endswith("_s")}
    return fields_


def _default_zero_points(t: NBitsType, scales_shape: tuple[int, ...]) -> np.ndarray:
    """Explicit zero points of a symmetric grid, packed as MatMulNBits / GatherBlockQuantized read them."""
    n, nb = scales_shape
    if t.bits == 8:
        return np.full((n, nb), t.default_zp, np.uint8)
    return np.full((n, (nb + 1) // 2), t.default_zp | (t.default_zp << 4), np.uint8)


def read_weights(model_path: str | Path) -> dict[str, np.ndarray]:
    """The float32 weights an edgekit ONNX graph computes with, under their Hugging Face names: each
    MatMulNBits / GatherBlockQuantized tensor decoded from the graph's own initializers (fused
    projections split back). Tests and benchmarks load these into PyTorch to check the graph."""
    onnx = require("onnx", "onnx")
    from onnx import numpy_helper

    path = Path(model_path)
    model = onnx.load(str(path), load_external_data=True)
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    cfg = json.loads((path.parent / "config.json").read_text())
    from edgekit.arch import HParams

    hp = HParams.from_config(cfg)
    out: dict[str, np.ndarray] = {}

    def decode(node) -> np.ndarray:
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        bits, block = int(a["bits"]), int(a["block_size"])
        data, scales = init[node.input[0 if node.op_type == "GatherBlockQuantized" else 1]], None
        if node.op_type == "GatherBlockQuantized":
            scales, zps = init[node.input[2]], init[node.input[3]] if len(node.input) > 3 else None
            n = data.shape[0]
        else:
            scales = init[node.input[2]]
            zps = init[node.input[3]] if len(node.input) > 3 and node.input[3] else None
            n = int(a["N"])
        t = NBitsType(bits, block, False)  # decoded through the asymmetric record: zp given explicitly
        blob = data.reshape(n, -1, t.blob)
        nb = blob.shape[1]
        if zps is None:
            z = np.full((n, nb), t.default_zp, np.uint8)
        elif bits == 4 and node.op_type == "MatMulNBits":
            zz = zps.reshape(n, -1)
            z = np.stack([zz & 0x0F, zz >> 4], axis=2).reshape(n, -1)[:, :nb]
        else:
            z = zps.reshape(n, nb)
        records = [blob, scales.reshape(n, nb, 1).astype(np.float16).view(np.uint8).reshape(n, nb, 2),
                   z.reshape(n, nb, 1)]
        return nbits.dequantize(t, np.concatenate(records, axis=2).reshape(n, -1))

    q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    splits = {"qkv_proj": [("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)],
              "gate_up_proj": [("mlp.gate_proj", hp.n_ff), ("mlp.up_proj", hp.n_ff)],
              "o_proj": [("self_attn.o_proj", hp.n_embd)], "down_proj": [("mlp.down_proj", hp.n_embd)]}
    for node in model.graph.node:
        name = node.name
        if node.op_type in ("MatMulNBits", "MatMul") and "/" in name:
            base = name.split("/")[0]  # layers.{i}.attn.qkv_proj or lm_head
            w = decode(node) if node.op_type == "MatMulNBits" else init[node.input[1]].T.astype(np.float32)
            if base == "lm_head":
                out["lm_head.weight"] = w
                continue
            i, kind = base.split(".")[1], base.split(".")[-1]
            r0 = 0
            for hf, rows in splits[kind]:
                out[f"model.layers.{i}.{hf}.weight"] = w[r0 : r0 + rows]
                r0 += rows
        elif node.op_type == "GatherBlockQuantized" and node.input[0] in init:
            out["model.embed_tokens.weight"] = decode(node)
        elif node.op_type == "Gather" and node.input[0] in init and init[node.input[0]].ndim == 2:
            out["model.embed_tokens.weight"] = init[node.input[0]].astype(np.float32)
        elif node.op_type == "Gemm" and name.startswith("lm_head"):
            out["lm_head.weight"] = init[node.input[1]].astype(np.float32)
    if "model.embed_tokens.weight" not in out:  # embed=shared: the table is the lm_head's tensor
        out["model.embed_tokens.weight"] = out["lm_head.weight"]
    for t_name, arr in init.items():
        if t_name.endswith("layernorm.weight") or t_name == "norm.weight":
            out["model." + t_name] = arr.astype(np.float32)
        elif t_name.endswith(".bias") and ".attn.qkv_proj" in t_name:
            i = t_name.split(".")[1]
            r0 = 0
            for hf, rows in splits["qkv_proj"]:
                out[f"model.layers.{i}.{hf}.bias"] = arr[r0 : r0 + rows].astype(np.float32)
                r0 += rows
    return out
