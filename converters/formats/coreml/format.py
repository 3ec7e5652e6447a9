"""Core ML artifacts: a stateful KV-cache program (``.mlpackage``) with edgekit's own weights.

``edgekit convert MODEL --to coreml --bits 16`` writes ``model.mlpackage`` (an iOS18 / macOS15 ML program:
:mod:`.program`), the tokenizer files and chat template beside it, and ``edgekit.json``. ``--bits 4|8``
stores every matrix (and the embedding) as ``constexpr_blockwise_shift_scale`` codes from edgekit's own
quantizers (RTN, GPTQ, AWQ: :mod:`edgekit.converters.quantize.grids.coreml`); ``--palettize N`` stores
``constexpr_lut_to_dense`` palettes (k-means, or sensitivity-weighted with ``--method squeezellm``).
Norms and biases are fp16. The package is written with ``skip_model_load=True``: coremltools compiles
nothing on Linux, and the reference evaluator (:mod:`edgekit.runtime.coreml`) reads it back from here.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

from edgekit.attention import layer_windows, uniform_window
from edgekit.converters.formats.base import (
    ConvertRecipe,
    Format,
    ProgressFn,
    no_progress,
    register_format,
    size_fields,
)
from edgekit.converters.formats.coreml.options import CoreMLOptions
from edgekit.converters.formats.coreml.package import (
    MODEL_NAME,
    coremltools,
    interruptible,
    package_bytes,
    save_package,
    scratch_in,
)
from edgekit.converters.formats.coreml.program import Blockwise, Dense, Palette, Weight
from edgekit.converters.quantize.base import Quantizer, method_flag
from edgekit.errors import InputError
from edgekit.fsutil import check_free_space
from edgekit.model import HFCheckpoint

BLOCK_SIZES = (16, 32, 64, 128, 256)  # constexpr_blockwise_shift_scale blocks edgekit's grids take
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "chat_template.jinja")
_PALETTE_METHODS = {"squeezellm"}


class _Source:
    """The stored form of each tensor, by Hugging Face name: loaded, sent through the quantizer on its
    planned grid (so calibrated methods hand over the bytes they chose), and unpacked for the writer."""

    def __init__(self, ckpt: HFCheckpoint, quantizer: Quantizer, plan: dict[str, Any]) -> None:
        self.ckpt, self.quantizer, self.plan = ckpt, quantizer, plan
        self.names = set(ckpt.tensors)
        self.tied = "lm_head.weight" not in ckpt.tensors
        self.tensors: dict[str, dict[str, Any]] = {}

    def __call__(self, hf: str) -> Weight:
        g = self.ckpt.spec.gguf_name(hf)
        w = self.ckpt.load(hf)
        qt = self.plan[g]
        raw = self.quantizer.quantize(g, w, qt)
        self.tensors[hf] = {"type": "F16" if qt in (T.F16, T.F32) else qt.name, "shape": list(w.shape)}
        if qt == T.F32:
            return Dense(np.frombuffer(raw.tobytes(), np.float32).reshape(w.shape).astype(np.float16))
        if qt == T.F16:
            return Dense(np.frombuffer(raw.tobytes(), np.float16).reshape(w.shape))
        return stored_form(qt, raw, w.shape)


def stored_form(grid: Any, raw: np.ndarray, shape: tuple[int, ...]) -> Weight:
    """The Core ML tensors of a matrix's grid records (what the quantizer returned)."""
    from edgekit.converters.quantize import nbits
    from edgekit.converters.quantize.grids.coreml import CoreMLPalette

    rows, cols = shape
    if isinstance(grid, CoreMLPalette):
        luts, idx, delta = grid.unpack(np.asarray(raw).reshape(rows, -1))
        return Palette(grid.bits, idx.reshape(rows, cols), luts, None if delta is None else delta.reshape(rows, cols))
    codes, params = nbits.unpack(grid, np.asarray(raw).reshape(-1, grid.record))
    nb = cols // grid.block
    return Blockwise(grid.bits, codes.reshape(rows, cols), params.d.reshape(rows, nb),
                     None if grid.symmetric else params.zp.reshape(rows, nb))


@register_format("coreml")
class CoreMLFormat(Format):
    """Apple's Core ML: an ML program with the KV cache as state, fp16, blockwise or palettized weights."""

    name = "coreml"
    archs = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
    options_class = CoreMLOptions
    model_filename = MODEL_NAME

    def default_output_suffix(self, recipe: ConvertRecipe) -> str:
        return f"coreml-{CoreMLOptions.from_recipe(recipe).label}"

    def describe(self, art: Any, ctx: int = 4096) -> dict[str, Any]:
        from edgekit.converters.formats.coreml.read import describe_coreml

        return describe_coreml(art, ctx)

    def convert(self, checkpoint: HFCheckpoint, out_dir: Path, recipe: ConvertRecipe, quantizer: Quantizer,
                progress: ProgressFn = no_progress) -> dict[str, Any]:
        ct = coremltools()
        from edgekit.converters.formats.coreml.program import build

        checkpoint.require_tokenizer()
        hp = checkpoint.hparams
        opts = CoreMLOptions.from_recipe(recipe)
        method = quantizer.config.method
        if not opts.quantized and method != "rtn":
            raise InputError(f"{method_flag(method)} quantizes weights; give --bits 4|8 or --palettize N for Core ML")
        if method in _PALETTE_METHODS and opts.palettize is None:
            raise InputError(f"--method {method} fits palettes; give --palettize 2|3|4|6|8 with it")
        grid = opts.grid
        if grid is not None:
            _check_shapes(checkpoint, opts, grid)
        plan = _plan(checkpoint, grid)
        est = sum(checkpoint.tensors[h].numel for h in checkpoint.tensors) * (2 if grid is None else 1)
        check_free_space(out_dir, est, "the Core ML package", headroom=64 << 20)
        quantizer.prepare(checkpoint, plan, progress)
        source = _Source(checkpoint, quantizer, plan)
        t0 = time.perf_counter()
        windows = layer_windows(checkpoint.config, hp.n_layer)
        prog = interruptible(build, hp, opts.context, source, progress, windows)  # coremltools' MIL builder
        progress("writing the ML program (coremltools)", hp.n_layer + 2, hp.n_layer + 2)
        C = opts.context
        # coremltools draws tqdm bars for its pass pipelines; edgekit shows its own progress
        with scratch_in(out_dir), contextlib.redirect_stderr(io.StringIO()):
            model = interruptible(
                ct.convert, prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                compute_precision=ct.precision.FLOAT16, skip_model_load=True,
                inputs=[ct.TensorType("input_ids", shape=(1, ct.RangeDim(1, C)), dtype=np.int32),
                        ct.TensorType("causal_mask", shape=(1, 1, ct.RangeDim(1, C), ct.RangeDim(1, C)),
                                      dtype=np.float16)],
                outputs=[ct.TensorType("logits", dtype=np.float32)])
            # the program masks each sliding layer itself; edgekit.sliding_window is the window the runtime's
            # causal_mask applies to every layer, so it is set only when every layer has that window
            window = uniform_window(windows)
            model.user_defined_metadata.update({
                "edgekit.context": str(C), "edgekit.n_layer": str(hp.n_layer),
                "edgekit.sliding_window": str(window), "edgekit.layer_windows": ",".join(map(str, windows)),
                "edgekit.source": checkpoint.path.name})
            model.short_description = f"{checkpoint.path.name} for Core ML (edgekit, {opts.label})"
            interruptible(save_package, model, out_dir / MODEL_NAME)
        build_s = time.perf_counter() - t0
        for name in SIDE_FILES:
            if (checkpoint.path / name).exists():
                shutil.copy2(checkpoint.path / name, out_dir / name)
        return _manifest_fields(opts, out_dir / MODEL_NAME, source.tensors, quantizer, build_s, windows, prog)


def _plan(ckpt: HFCheckpoint, grid: Any) -> dict[str, Any]:
    """GGUF name -> grid: every matrix (embedding and head included: one tensor when tied) on ``grid``,
    vectors in float (stored fp16)."""
    plan: dict[str, Any] = {}
    for hf, ref in ckpt.tensors.items():
        g = ckpt.spec.gguf_name(hf)
        if g is None:
            continue
        matrix = len(ref.shape) == 2
        plan[g] = (grid if grid is not None else T.F16) if matrix else T.F32
    return plan


def _check_shapes(ckpt: HFCheckpoint, opts: CoreMLOptions, grid: Any) -> None:
    from edgekit.converters.quantize.grids.coreml import LUT_GROUPS

    matrices = {hf: ref.shape for hf, ref in ckpt.tensors.items() if len(ref.shape) == 2}
    groups = [g for g in LUT_GROUPS if all(rows % g == 0 for rows, _ in matrices.values())]
    blocks = [b for b in BLOCK_SIZES if all(cols % b == 0 for _, cols in matrices.values())]
    for hf, (rows, cols) in matrices.items():
        if opts.palettize is not None and rows % opts.lut_group:
            raise InputError(f"{hf} has {rows} rows, not a multiple of -O lut_group={opts.lut_group}; use "
                             f"-O lut_group={groups[-1]}, which divides every matrix's output size")
        if opts.palettize is None and cols % opts.block_size:
            fix = (f"use --block-size {blocks[-1]}, which divides every matrix's rows" if blocks else
                   f"no block size ({', '.join(map(str, BLOCK_SIZES))}) divides every matrix's rows: use --bits 16, "
                   f"--palettize N (palettes take any row length; with -O lut_group={groups[-1]}), or convert to GGUF")
            raise InputError(f"{hf} has rows of {cols} weights, not a multiple of --block-size {opts.block_size}; "
                             + fix)


def _manifest_fields(opts: CoreMLOptions, path: Path, tensors: dict[str, dict[str, Any]], quantizer: Quantizer,
                     build_s: float, windows: list[int], prog: Any) -> dict[str, Any]:
    size = package_bytes(path)
    n_params = sum(int(np.prod(t["shape"])) for t in tensors.values())
    ops = sorted({op.op_type for op in prog.functions["main"].operations})
    fields_: dict[str, Any] = {
        "files": {"model": path.name},
        "preset": opts.label.upper(),
        "coreml": {**{k: v for k, v in asdict(opts).items() if v is not None},
                   "grid": opts.grid.name if opts.grid is not None else "F16",
                   "deployment_target": "iOS18", "compute_precision": "fp16",
                   "inputs": ["input_ids", "causal_mask"], "states": "k_cache_{i}, v_cache_{i}",
                   "sliding_window": uniform_window(windows) or None, "ops": ops, "build_s": round(build_s, 1)},
        **size_fields(n_params, size, tensors, quantizer),
    }
    if any(windows):
        fields_["coreml"]["layer_windows"] = windows
    return fields_
