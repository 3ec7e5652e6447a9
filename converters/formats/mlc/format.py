"""MLC-LLM artifacts: the weight shards, ``tensor-cache.json`` and ``mlc-chat-config.json`` that
``mlc_llm convert_weight`` + ``gen_config`` write, from edgekit's own quantizers.

``edgekit convert MODEL --to mlc --quant q4f16_1 [--method gptq]`` writes, into the artifact folder:
``params_shard_*.bin`` (MLC's 32 MiB shards), ``tensor-cache.json`` (and the older ``ndarray-cache.json``;
``tensor-cache-b16.json`` when float32 tensors were bf16-encoded), ``mlc-chat-config.json`` (with the
conversation template derived from the checkpoint's chat template), the tokenizer files and
``edgekit.json``. Every quantized matrix goes through the quantizer on the mode's registered grid
(:mod:`edgekit.converters.quantize.grids.mlc`), in the checkpoint's layout; this writer fuses Q/K/V and
gate/up, splits the records into ``q_weight`` / ``q_scale`` and transposes them for the ``_0`` modes.

The model library (the compiled kernels the MLC runtime needs beside the weights) is built by
``mlc_llm compile``: ``--compile TARGET`` runs it when mlc_llm is installed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

import edgekit.converters.formats.mlc.chat_config as chat_config
import edgekit.converters.formats.mlc.layout as layout
from edgekit.converters.formats.base import (
    ConvertRecipe,
    Format,
    ProgressFn,
    no_progress,
    register_format,
    size_fields,
)
from edgekit.converters.formats.mlc.cache import TensorCacheWriter
from edgekit.converters.formats.mlc.options import MLCOptions
from edgekit.converters.quantize import mlcgroup
from edgekit.converters.quantize.base import Quantizer, method_flag
from edgekit.errors import BackendError, InputError
from edgekit.fsutil import check_free_space
from edgekit.model import HFCheckpoint

MODEL_FILE = "mlc-chat-config.json"
# Where MLC's Android app (MLCChat, package ai.mlc.mlcchat) reads a model: its external files folder,
# ``getExternalFilesDir("")/<model_id>/`` holding mlc-chat-config.json and tensor-cache.json (mlc-llm's
# android/MLCChat AppViewModel.kt; bundle_weight.py pushes weights there through /data/local/tmp).
ANDROID_DEST = "/storage/emulated/0/Android/data/ai.mlc.mlcchat/files"
_LIB_SUFFIX = {"android": ".tar", "iphone": ".tar", "webgpu": ".wasm"}
@register_format("mlc")
class MLCFormat(Format):
    """MLC-LLM: group-quantized (or fp16/fp32) weights in MLC's tensor cache plus its chat config."""

    name = "mlc"
    archs = tuple(layout.ARCHS)
    options_class = MLCOptions
    model_filename = MODEL_FILE

    def default_output_suffix(self, recipe: ConvertRecipe) -> str:
        return f"mlc-{MLCOptions.from_recipe(recipe).quant}"

    def push_dest(self, platform: str) -> str | None:
        return ANDROID_DEST if platform == "android" else None

    def describe(self, art: Any, ctx: int = 4096) -> dict[str, Any]:
        from edgekit.converters.formats.mlc.read import describe_mlc

        return describe_mlc(art, ctx)

    def convert(self, checkpoint: HFCheckpoint, out_dir: Path, recipe: ConvertRecipe, quantizer: Quantizer,
                progress: ProgressFn = no_progress) -> dict[str, Any]:
        opts = MLCOptions.from_recipe(recipe)  # refuses --compile without mlc_llm, before any work
        checkpoint.require_tokenizer()
        _, arch = layout.arch_for(checkpoint.config)
        hp = checkpoint.hparams
        grid = opts.grid
        method = quantizer.config.method
        if grid is None and method != "rtn":
            raise InputError(f"{method_flag(method)} quantizes weights; {opts.quant} stores them unquantized: "
                             "give --quant q4f16_1 (or another q3/q4 mode)")
        params = layout.params(arch, hp)
        plan = _plan(checkpoint, params, grid, opts.mode.dtype)
        est = sum(r.numel for r in checkpoint.tensors.values()) * (2 if grid is None else 1)
        check_free_space(out_dir, est, "the MLC weights", headroom=64 << 20)
        context = opts.context_window_size or hp.n_ctx_train
        prefill = min(opts.prefill_chunk_size or min(context, 8192), context)
        t0 = time.perf_counter()
        quantizer.prepare(checkpoint, plan, progress)
        writer = TensorCacheWriter(out_dir, opts.shard_mb << 20)
        tensors: dict[str, dict[str, Any]] = {}
        for i, p in enumerate(params):
            progress(f"writing {opts.quant} weights", i, len(params))
            for name, arr, kind in _encode(checkpoint, quantizer, plan, p, opts):
                writer.add(name, arr)
                tensors[name] = {"type": kind, "shape": list(arr.shape), "dtype": str(arr.dtype)}
        n_params = sum(r.numel for n, r in checkpoint.tensors.items() if checkpoint.spec.gguf_name(n) is not None)
        cache = writer.finish(n_params)
        progress(f"writing {opts.quant} weights", len(params), len(params))
        mc = layout.model_config(arch, checkpoint.config, hp, context, prefill)
        notes: list[str] = []
        chat = chat_config.build(checkpoint, out_dir, arch.model_type, opts.quant, mc, notes)
        lib = _compile(out_dir, opts.compile, progress) if opts.compile else None
        size = sum(s["nbytes"] for s in cache["records"])
        fields: dict[str, Any] = {
            "files": {"model": MODEL_FILE, **({"library": lib} if lib else {})},
            "preset": opts.quant,
            "mlc": {**{k: v for k, v in asdict(opts).items() if v is not None},
                    "grid": grid.name if grid is not None else opts.mode.dtype, "layout": opts.mode.layout,
                    "model_type": arch.model_type, "shards": len(cache["records"]),
                    "context_window_size": chat["context_window_size"],
                    "prefill_chunk_size": chat["prefill_chunk_size"], "build_s": round(time.perf_counter() - t0, 1),
                    "library": lib},
            **size_fields(n_params, size, tensors, quantizer),
            # the recipe as run: --quant picks the mode, so --bits' default (4) says nothing about q0f16
            "recipe": {"bits": opts.mode.bits},  # merged into the recipe the core writes
        }
        if notes:
            fields["notes"] = notes
        return fields


def _plan(ckpt: HFCheckpoint, params: list[layout.Param], grid: Any, dtype: str) -> dict[str, Any]:
    """GGUF name -> grid for the quantizer: linears and the embedding on ``grid`` (the model dtype in q0
    modes), norms and biases in F32."""
    plan: dict[str, Any] = {}
    float_type = T.F16 if dtype == "float16" else T.F32
    for p in params:
        for src in p.sources:
            if src not in ckpt.tensors:
                raise InputError(f"{ckpt.path} lacks {src}, which MLC's {p.name} is made of; is the checkpoint complete?")
            g = ckpt.spec.gguf_name(src)
            plan[g] = (grid if grid is not None else float_type) if p.kind != "float" else T.F32
    return plan


def _encode(ckpt: HFCheckpoint, quantizer: Quantizer, plan: dict[str, Any], p: layout.Param,
            opts: MLCOptions) -> list[tuple[str, np.ndarray, str]]:
    """The MLC tensors of one parameter: (name, array, type)."""
    dtype = np.float16 if opts.mode.dtype == "float16" else np.float32
    grid = opts.grid
    if p.kind == "float" or grid is None:
        # through the quantizer too: a calibrated step may have changed them (AWQ folds 1/s into the norms)
        parts = []
        for src in p.sources:
            w, g = ckpt.load(src), ckpt.spec.gguf_name(src)
            raw = np.asarray(quantizer.quantize(g, w, plan[g]))
            parts.append(np.frombuffer(raw.tobytes(), np.float16 if plan[g] == T.F16 else np.float32).reshape(w.shape))
        return [(p.name, np.concatenate(parts, axis=0).astype(dtype), opts.mode.dtype)]
    rows, width = [], None
    for src in p.sources:
        w = ckpt.load(src)
        width, n_rows = w.shape[1], w.shape[0]
        raw = quantizer.quantize(ckpt.spec.gguf_name(src), w, plan[ckpt.spec.gguf_name(src)])
        del w  # a vocabulary table's float32 copy is hundreds of MB: gone before the next one loads
        rows.append(np.asarray(raw, dtype=np.uint8).reshape(n_rows, -1))
    records = rows[0] if len(rows) == 1 else np.concatenate(rows, axis=0)
    del rows
    if records.shape[1] != grid.row_bytes(width):
        raise BackendError(f"the quantizer returned {records.shape[1]} bytes per row of {p.name}; "
                           f"{grid.name} needs {grid.row_bytes(width)}")
    q_weight, q_scale = mlcgroup.split(grid, records, records.shape[0])
    if opts.mode.layout == "KN" and p.kind == "linear":  # the _0 modes store linears transposed
        q_weight, q_scale = np.ascontiguousarray(q_weight.T), np.ascontiguousarray(q_scale.T)
    wn, sn = layout.quantized_names(p.name)
    return [(wn, q_weight, grid.name), (sn, q_scale, grid.name)]


def _compile(out_dir: Path, target: str, progress: ProgressFn) -> str:
    """``mlc_llm compile`` of the written config for ``target``; returns the library's file name."""
    name = f"lib-{target}{_LIB_SUFFIX.get(target, '.so')}"
    progress(f"mlc_llm compile --device {target}", 0, 1)
    cmd = [sys.executable, "-m", "mlc_llm", "compile", str(out_dir / MODEL_FILE), "--device", target,
           "-o", str(out_dir / name)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BackendError(f"mlc_llm compile --device {target} failed: {tail[0][:300]}")
    progress(f"mlc_llm compile --device {target}", 1, 1)
    return name
