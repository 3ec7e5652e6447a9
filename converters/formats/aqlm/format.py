"""Hugging Face AQLM checkpoints: what AQLM's own toolkit writes and ``transformers`` loads with the ``aqlm``
package (``AqlmConfig``), encoded by edgekit's AQLM (:mod:`edgekit.converters.quantize.aqlm_kernel`).

``edgekit convert MODEL --to aqlm --bits 2`` writes, into the artifact folder: ``model.safetensors`` with,
for every decoder linear, ``<name>.codes`` (``(out, in/g, M)``, int8 for 8-bit codebooks with codes of 128
and more stored as ``code - 256``, as ``aqlm.utils.pack_int_data`` does; int16 up to 16 bits),
``<name>.codebooks`` (fp16 ``(M, 2^B, 1, g)``) and ``<name>.scales`` (fp16 ``(out, 1, 1, 1)``); the embedding
(and an untied head) in fp16, or float8 e4m3 with ``-O embedding=fp8``, norms in float32; ``config.json`` with its
``quantization_config``, the tokenizer files and ``edgekit.json``. A size budget (``--size 85MB``) picks the number
of 8-bit codebooks that fits.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

from edgekit.converters.formats.aqlm.layout import MODEL_FILE, pack_codes
from edgekit.converters.formats.aqlm.options import AQLMOptions
from edgekit.converters.formats.base import (
    ConvertRecipe,
    Format,
    ProgressFn,
    no_progress,
    register_format,
    size_fields,
)
from edgekit.converters.quantize.aqlm_kernel import AQLMScheme
from edgekit.converters.quantize.base import method_flag
from edgekit.converters.quantize.steps.base import F8_E4M3
from edgekit.errors import DiskFullError, InputError
from edgekit.fsutil import check_free_space
from edgekit.model import HFCheckpoint

SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
#: Module names transformers must leave as plain layers (both spellings: transformers 4.x matched
#: ``<module>.weight``, 5.x matches module names).
NOT_QUANTIZED = ["model.embed_tokens.weight", "lm_head.weight", "lm_head"]


def is_linear(ckpt: HFCheckpoint, name: str) -> bool:
    m = re.fullmatch(r"model\.layers\.\d+\.(.+)", name)
    return bool(m) and m.group(1) in ckpt.spec.linear_suffixes


def scheme_for_budget(ckpt: HFCheckpoint, budget_bytes: int, in_group: int, embedding: str = "f16") -> AQLMScheme:
    """The most 8-bit codebooks (1-8) whose checkpoint fits ``budget_bytes``."""
    best = None
    for m in range(1, 9):
        s = AQLMScheme(m, 8, in_group)
        if checkpoint_bytes(ckpt, s, embedding) <= budget_bytes:
            best = s
    if best is None:
        need = checkpoint_bytes(ckpt, AQLMScheme(1, 8, in_group), embedding)
        hint = "" if embedding == "fp8" else ", or store the embedding in 8 bits with -O embedding=fp8"
        raise InputError(f"the smallest AQLM checkpoint of this model (1x8) is {need / 1e6:.1f} MB; "
                         f"give a budget of at least that{hint}")
    return best


def checkpoint_bytes(ckpt: HFCheckpoint, scheme: AQLMScheme, embedding: str = "f16") -> int:
    """Bytes of the tensors the writer stores (linears encoded, embedding and untied head fp16 or fp8, the rest
    float32)."""
    total = 0
    tied = ckpt.hparams.tie_embeddings
    for name, ref in ckpt.tensors.items():
        if ckpt.spec.gguf_name(name) is None or (name == "lm_head.weight" and tied):
            continue
        if is_linear(ckpt, name):
            total += scheme.nbytes(ref.shape[0], ref.shape[1])
        else:
            total += ref.numel * ((1 if embedding == "fp8" else 2) if len(ref.shape) == 2 else 4)
    return total


def to_fp8(weight: np.ndarray) -> tuple[np.ndarray, float]:
    """``weight`` rounded to float8 e4m3 (nearest, saturating at +-448, as torch casts), as its raw bytes, and
    the relative RMS error of the rounding."""
    import torch

    w = torch.from_numpy(np.ascontiguousarray(weight, np.float32))
    q = w.to(torch.float8_e4m3fn)
    err = float((q.float() - w).pow(2).sum().sqrt() / w.pow(2).sum().sqrt().clamp_min(1e-30))
    return q.view(torch.uint8).numpy(), err


@register_format("aqlm")
class AQLMFormat(Format):
    """Hugging Face AQLM: additive codebooks that transformers runs with the aqlm package."""

    name = "aqlm"
    options_class = AQLMOptions
    model_filename = MODEL_FILE
    default_method = "aqlm"
    default_bits = 2  # AQLM's canonical 2x8: two 256-entry codebooks per 8 weights

    def default_output_suffix(self, recipe: ConvertRecipe) -> str:
        opts = AQLMOptions.from_recipe(recipe)
        name = f"aqlm-{recipe.budget_label()}" if recipe.budgeted and "scheme" not in recipe.extra \
            else f"aqlm-{opts.scheme}"
        return name + ("-fp8" if opts.embedding == "fp8" else "")

    def describe(self, art: Any, ctx: int = 4096) -> dict[str, Any]:
        from edgekit.converters.formats.aqlm.read import describe_aqlm

        return describe_aqlm(art, ctx)

    def convert(self, checkpoint: HFCheckpoint, out_dir: Path, recipe: ConvertRecipe, quantizer: Any,
                progress: ProgressFn = no_progress) -> dict[str, Any]:
        opts = AQLMOptions.from_recipe(recipe)
        if quantizer.config.method != "aqlm":
            raise InputError(f"--to aqlm encodes with --method aqlm; drop {method_flag(quantizer.config.method)}")
        checkpoint.require_tokenizer()
        if recipe.budgeted and "scheme" not in recipe.extra:
            budget = recipe.size if recipe.size is not None else int(recipe.bpw * checkpoint.n_params / 8)
            scheme = scheme_for_budget(checkpoint, budget, opts.in_group, opts.embedding)
        else:
            scheme = opts.aqlm
        for name in checkpoint.tensors:
            if is_linear(checkpoint, name) and checkpoint.tensors[name].shape[1] % scheme.in_group:
                raise InputError(f"{name} has {checkpoint.tensors[name].shape[1]} input columns, not a multiple of "
                                 f"AQLM's group of {scheme.in_group}; give -O in_group=4")
        est = checkpoint_bytes(checkpoint, scheme, opts.embedding)
        check_free_space(out_dir, est, "the AQLM checkpoint", headroom=16 << 20)
        tied = checkpoint.hparams.tie_embeddings
        plan: dict[str, Any] = {}
        for name, ref in checkpoint.tensors.items():
            g = checkpoint.spec.gguf_name(name)
            if g is None or (name == "lm_head.weight" and tied):
                continue
            plan[g] = scheme if is_linear(checkpoint, name) else T.F32 if len(ref.shape) != 2 \
                else F8_E4M3 if opts.embedding == "fp8" else T.F16
        t0 = time.perf_counter()
        quantizer.prepare(checkpoint, plan, progress)
        arrays: dict[str, np.ndarray] = {}
        fp8: dict[str, float] = {}  # tensors stored as float8 e4m3 (raw bytes in ``arrays``) -> rounding error
        tensors: dict[str, dict[str, Any]] = {}
        for name, ref in checkpoint.tensors.items():
            g = checkpoint.spec.gguf_name(name)
            if g not in plan:
                continue
            if isinstance(plan[g], AQLMScheme):
                enc = quantizer.take(g)
                base = name[: -len(".weight")]
                parts = {"codes": pack_codes(enc.codes, scheme.nbits),
                         "codebooks": enc.codebooks.astype(np.float16)[:, :, None, :],
                         "scales": enc.scales.astype(np.float16).reshape(-1, 1, 1, 1)}
                for key, arr in parts.items():
                    arrays[f"{base}.{key}"] = np.ascontiguousarray(arr)
                tensors[name] = {"type": f"AQLM_{scheme.name}", "shape": list(ref.shape),
                                 "bytes": sum(a.nbytes for a in parts.values())}
                continue
            w = checkpoint.load(name)
            if plan[g] == F8_E4M3:
                arr, fp8[name] = to_fp8(w)  # from the checkpoint's own values: one rounding, not two
                arrays[name] = arr
                tensors[name] = {"type": "F8_E4M3", "shape": list(ref.shape), "bytes": arr.nbytes}
                continue
            raw = np.asarray(quantizer.quantize(g, w, plan[g]))
            dtype = np.float16 if plan[g] == T.F16 else np.float32
            arr = np.frombuffer(raw.tobytes(), dtype).reshape(w.shape)
            arrays[name] = np.ascontiguousarray(arr)
            tensors[name] = {"type": plan[g].name, "shape": list(ref.shape), "bytes": arr.nbytes}
        progress("writing the AQLM checkpoint", 0, 1)
        _write(out_dir, checkpoint, arrays, scheme, set(fp8))
        progress("writing the AQLM checkpoint", 1, 1)
        n_params = sum(r.numel for n, r in checkpoint.tensors.items()
                       if checkpoint.spec.gguf_name(n) is not None and not (n == "lm_head.weight" and tied))
        size = sum(a.nbytes for a in arrays.values())
        report = getattr(quantizer, "report", {}).get("aqlm", {})
        layer_s = [round(sum(v["s"] for v in report[k].values()), 1) for k in sorted(report, key=int)]
        errs = [v["rel_error"] for k in report for v in report[k].values()]
        return {
            "files": {"model": MODEL_FILE},
            "preset": f"AQLM_{scheme.name}",
            "aqlm": {"scheme": scheme.name, "num_codebooks": scheme.num_codebooks, "nbits_per_codebook": scheme.nbits,
                     "in_group_size": scheme.in_group, "code_bits_per_weight": scheme.code_bits_per_weight,
                     "embedding": opts.embedding,
                     **({"fp8_rel_error": {k: round(v, 5) for k, v in fp8.items()}} if fp8 else {}),
                     "build_s": round(time.perf_counter() - t0, 1), "layer_s": layer_s,
                     "mean_rel_error": round(float(np.mean(errs)), 5) if errs else None,
                     **({"distill": quantizer.report["distill"]} if "distill" in getattr(quantizer, "report", {})
                        else {})},
            **size_fields(n_params, size, tensors, quantizer),
        }


def _write(out_dir: Path, ckpt: HFCheckpoint, arrays: dict[str, np.ndarray], scheme: AQLMScheme,
           fp8: set[str]) -> None:
    """model.safetensors (the ``fp8`` names hold float8 e4m3 bytes), config.json and the tokenizer files."""
    import torch
    from safetensors.torch import save_file

    stored = {k: torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in arrays.items()}
    stored.update({k: stored[k].view(torch.float8_e4m3fn) for k in fp8})
    try:
        save_file(stored, str(out_dir / MODEL_FILE), metadata={"format": "pt"})
    except OSError as exc:
        raise DiskFullError(f"cannot write {out_dir / MODEL_FILE}: {exc.strerror or exc}; free space or choose "
                            "another -o") from exc
    config = dict(ckpt.config)
    config["torch_dtype"] = "float16"
    config["quantization_config"] = {"quant_method": "aqlm", "in_group_size": scheme.in_group, "out_group_size": 1,
                                     "num_codebooks": scheme.num_codebooks, "nbits_per_codebook": scheme.nbits,
                                     "linear_weights_not_to_quantize": list(NOT_QUANTIZED)}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in SIDE_FILES:
        if (ckpt.path / name).exists():
            shutil.copy2(ckpt.path / name, out_dir / name)
