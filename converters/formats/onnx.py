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
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

from edgekit.converters.formats.base import ConvertRecipe, Format, ProgressFn, no_progress, register_format
from edgekit.converters.formats.onnx_read import read_weights
from edgekit.converters.formats.onnx_weights import _build, _plan, _Weights
from edgekit.converters.quantize.base import Quantizer
from edgekit.converters.quantize.nbits import NBitsType
from edgekit.errors import DiskFullError, InputError, UnsupportedError, require
from edgekit.fsutil import check_free_space
from edgekit.model import HFCheckpoint

__all__ = ["OnnxFormat", "OnnxOptions", "read_weights"]

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
