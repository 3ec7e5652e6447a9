"""ONNX artifacts: a KV-cache decoder graph with 4-/8-bit ``MatMulNBits`` weights (onnxruntime).

``edgekit convert MODEL --to onnx --bits 4 --method gptq`` writes ``model.onnx`` (the graph, small),
``model.onnx.data`` (every weight, page-aligned) and the tokenizer files beside them. Weights are
encoded by edgekit's own quantizers onto MatMulNBits grids (:mod:`..quantize.nbits`), so RTN, GPTQ, AWQ
and the importance matrix work exactly as for GGUF. The graph's nodes are :mod:`.onnx_graph`'s, which
tensor becomes what is :mod:`.onnx_weights`, reading a graph's weights back is :mod:`.onnx_read`.

Options (``ConvertRecipe.extra``, on the CLI ``--block-size``, ``--sym/--asym``, ``--dtype`` and
``-O key=value``) are :class:`OnnxOptions`.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

from edgekit.attention import layer_windows
from edgekit.calibration import CalibConfig
from edgekit.converters.formats.base import (
    ConvertRecipe,
    Format,
    ProgressFn,
    no_progress,
    register_format,
    size_fields,
)
from edgekit.converters.formats.onnx.options import OnnxOptions
from edgekit.converters.formats.onnx.weights import _build, _plan, _Weights
from edgekit.converters.quantize.base import Quantizer, method_flag
from edgekit.errors import DiskFullError, InputError, UnsupportedError, require
from edgekit.fsutil import check_free_space
from edgekit.model import HFCheckpoint
from edgekit.native_path import utf8_path_to_load

# Files a runtime needs beside the graph (tokenizer, chat template, generation defaults).
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits block sizes onnxruntime runs
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "chat_template.jinja")
PROTOBUF_LIMIT = 2 << 30


@register_format("onnx")
class OnnxFormat(Format):
    """onnxruntime's format: decoder graph with KV cache, MatMulNBits weights, external data."""

    name = "onnx"
    archs = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
    options_class = OnnxOptions
    model_filename = "model.onnx"

    def default_output_suffix(self, recipe: ConvertRecipe) -> str:
        opts = OnnxOptions.from_recipe(recipe)
        if recipe.budgeted:
            return f"onnx-{recipe.budget_label()}"
        if not opts.quantized:
            return f"onnx-{opts.graph_dtype}"
        return f"onnx-{opts.grid.name.lower()}"

    def describe(self, art: Any, ctx: int = 4096) -> dict[str, Any]:
        from edgekit.converters.formats.onnx.read import describe_onnx

        return describe_onnx(art, ctx)

    def convert(self, checkpoint: HFCheckpoint, out_dir: Path, recipe: ConvertRecipe, quantizer: Quantizer,
                progress: ProgressFn = no_progress) -> dict[str, Any]:
        onnx = require("onnx", "onnx")
        import edgekit.converters.formats.onnx.graph as og

        checkpoint.require_tokenizer()
        hp = checkpoint.hparams
        opts = OnnxOptions.from_recipe(recipe).resolve(hp.tie_embeddings)
        if not opts.quantized and quantizer.config.method != "rtn":
            raise InputError(f"{method_flag(quantizer.config.method)} quantizes weights; give --bits 4 or 8 for ONNX")
        if opts.quantized and (hp.n_embd % opts.block_size or hp.n_ff % opts.block_size):
            raise InputError(f"hidden size {hp.n_embd} / FFN size {hp.n_ff} are not multiples of --block-size "
                             f"{opts.block_size}; {_block_fix((hp.n_embd, hp.n_ff))}")
        attn_w = hp.n_head * hp.head_dim  # the output projection's input width (Qwen3's exceeds the hidden size)
        if opts.quantized and attn_w != hp.n_embd and attn_w % opts.block_size:
            raise InputError(f"attention width {attn_w} ({hp.n_head} heads of {hp.head_dim}) is not a multiple of "
                             f"--block-size {opts.block_size}; {_block_fix((hp.n_embd, hp.n_ff, attn_w))}")
        if opts.quantized and any(w % opts.block_size for w in hp.ffn_widths or ()):
            raise InputError(f"this checkpoint's per-block FFN widths (width:auto, multiples of 32) are not all "
                             f"multiples of --block-size {opts.block_size}; use --block-size 32")
        if hp.head_dim % 16:
            raise UnsupportedError(f"head size {hp.head_dim} is not a multiple of 16, which onnxruntime's "
                                   "GroupQueryAttention kernel needs; export this model to GGUF instead")
        plan = _plan(checkpoint, opts)
        budget_report = None
        if recipe.budgeted or recipe.tensor_types:
            from edgekit.converters.formats.onnx.budget import apply as apply_budget

            calib = recipe.calib or getattr(quantizer.config, "calib", None) or CalibConfig()
            budget_report = apply_budget(checkpoint, plan, opts, bpw=recipe.bpw, size=recipe.size,
                                         grids=recipe.bpw_types,
                                         tensor_types=recipe.tensor_types, calib=calib, progress=progress)
        est = sum(checkpoint.tensors[p.hf].numel * (4 if p.qtype == T.F32 else 1) for p in plan.values())
        check_free_space(out_dir, est, "the ONNX files", headroom=64 << 20)
        if not opts.external_data and est > PROTOBUF_LIMIT - (64 << 20):
            raise InputError(f"about {est / 2**30:.1f} GiB of weights cannot fit one protobuf file (2 GiB limit); "
                             "drop -O external_data=false (weights then go to model.onnx.data)")
        shared = opts.embed_mode == "shared"
        quantizer.prepare(checkpoint, {g: p.qtype for g, p in plan.items() if shared or g != "token_embd.weight"},
                          progress)

        graph_opts = og.GraphOptions(dtype=opts.graph_dtype, opset=opts.opset, accuracy_level=opts.accuracy_level,
                                     windows=tuple(layer_windows(checkpoint.config, hp.n_layer)))
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
        with utf8_path_to_load(model_path, "onnx's checker") as native:  # it takes the path as strict UTF-8
            onnx.checker.check_model(native)
        for name in SIDE_FILES:
            if (checkpoint.path / name).exists():
                shutil.copy2(checkpoint.path / name, out_dir / name)
        fields_ = _manifest_fields(opts, model, tensors, model_path, data_path if opts.external_data else None,
                                   quantizer, tied=hp.tie_embeddings)
        if budget_report is not None:
            fields_["budget"] = budget_report
            if recipe.budgeted:
                fields_["preset"] = f"{recipe.bpw:g} bpw" if recipe.bpw is not None else \
                    f"{recipe.size / 1e6:.4g} MB"
        return fields_


def _block_fix(sizes: tuple[int, ...]) -> str:
    """The fix for widths no --block-size divides: a block size that divides them all, when one exists."""
    fits = [b for b in BLOCK_SIZES if all(n % b == 0 for n in sizes)]
    if fits:
        return f"use --block-size {fits[-1]}, which divides {'both' if len(sizes) == 2 else 'all of them'}"
    return (f"no block size ({', '.join(map(str, BLOCK_SIZES))}) divides {' and '.join(map(str, sizes))}: "
            "export it in float (--bits 16 or 32), or convert to GGUF")


def _manifest_fields(opts: OnnxOptions, model, tensors: dict, model_path: Path, data_path: Path | None,
                     quantizer: Quantizer, *, tied: bool) -> dict[str, Any]:
    from edgekit.converters.formats.onnx.graph import ops_used
    from edgekit.converters.formats.onnx.read import weight_tensors

    size = model_path.stat().st_size + (data_path.stat().st_size if data_path else 0)
    # parameters and bits per weight as inspect counts them (and GGUF's manifest): the weights' stored bytes,
    # norms included, over all parameters; size_bytes stays the files' (graph and rotary tables too)
    weights = weight_tensors(model, tensors, tied, model_path.parent / "edgekit.json")
    n_params = sum(int(np.prod(t["shape"], dtype=object)) for t in weights if "tied_to" not in t)
    weight_bytes = sum(t["bytes"] for t in weights)
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
        **size_fields(n_params, size, tensors, quantizer),
    }
    fields_["bpw"] = round(8 * weight_bytes / n_params, 4) if n_params else 0.0
    return fields_
