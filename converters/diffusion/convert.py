"""``edgekit convert PIPELINE --to onnx [--bits 8|4 --method rtn|gptq]``: a diffusers pipeline as an artifact.

The artifact folder holds the format's UNet graph(s) (written by the exporter registered for ``--to``), the
scheduler config and edgekit_diffusion.json copied from the pipeline, and ``edgekit.json``: ``"task":
"diffusion"``, the source and its sha256, the recipe, the sampler defaults (sampler, steps, the grid a
consistency student was distilled on), the graphs, sizes and the bits the weights are stored in. It is
written atomically: nothing is left under the output if anything fails.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any

from edgekit import artifact, library
from edgekit.artifact import Artifact, is_artifact_folder
from edgekit.converters.diffusion.export import EXPORTERS
from edgekit.converters.diffusion.pipeline import EDGEKIT_FILE, Pipeline, open_pipeline
from edgekit.errors import InputError, UnsupportedError
from edgekit.fsutil import atomic_dir, check_output
from edgekit.hashing import sha256_files
from edgekit.progress import ProgressFn, no_progress

TASK = "diffusion"
FLOAT_BITS = (16, 32)
SCHEDULER_FILE = "scheduler_config.json"
QUANTIZE_MODULE = "edgekit.converters.diffusion.quantize"


def quant_label(bits: int, method: str, lowrank: int) -> str:
    """The quantization part of an artifact's name: ``fp32``, ``w8``, ``w4-gptq-lr16``."""
    if bits in FLOAT_BITS:
        return "fp32"
    return f"w{bits}" + (f"-{method}" if method != "rtn" else "") + (f"-lr{lowrank}" if lowrank else "")


def default_output(src: Path, to: str, bits: int, method: str, lowrank: int) -> Path:
    """``./pipe-4step`` + onnx, 8 bits -> ``<library>/pipe-4step-onnx-w8``."""
    return library.store_dir(create=True) / library.artifact_name(Path(src).absolute().resolve().name, to, quant_label(bits, method, lowrank))


def convert_pipeline(src: str | Path, to: str = "onnx", *, output: str | Path | None = None, bits: int | None = 8,
                     method: str = "rtn", options: dict[str, Any] | None = None, force: bool = False,
                     progress: ProgressFn = no_progress) -> Artifact:
    """Convert the diffusers pipeline folder ``src`` into an artifact in format ``to``.

    ``bits``: 16/32 (or None) keep float32 weights; 2-8 quantize the UNet's conv and linear weights with
    ``method`` (rtn or gptq). ``options``: ``lowrank`` (rank of an SVDQuant-style float branch, 0: none),
    ``block_size`` (inputs per scale) and ``calib_images`` go to the quantizer, the rest to the format's
    exporter (ONNX: ``deepcache``). An existing ``output`` needs ``force`` and must be an edgekit artifact.
    """
    opts = dict(options or {})
    bits = 32 if bits is None else int(bits)
    if not (bits in FLOAT_BITS or 2 <= bits <= 8):
        raise InputError(f"--bits {bits} is not a diffusion weight width: give 8 or 4 (2-8 integers), or 16 (float)")
    lowrank = int(opts.pop("lowrank", 0) or 0)
    quant_opts = {k: opts.pop(k) for k in ("block_size", "calib_images") if k in opts}
    if bits in FLOAT_BITS and (method != "rtn" or lowrank or quant_opts):
        raise InputError(f"--method, lowrank and block_size quantize weights; give --bits 8 or 4 with them "
                         f"(--bits {bits} keeps float weights)")
    exporter = EXPORTERS.get(to)()
    pipe = open_pipeline(src)
    out = Path(output).expanduser() if output else default_output(pipe.path, to, bits, method, lowrank)
    check_output(out, force, is_artifact_folder)  # before quantizing, which takes a while
    unet = pipe.load_unet()
    weights = None
    if bits not in FLOAT_BITS:
        weights = _quantize(pipe, unet, bits, method, lowrank, quant_opts, progress)
    notes: list[str] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out, force=force, replaceable=is_artifact_folder, notes=notes) as tmp:
        fields = exporter.export(pipe, unet, weights, tmp, opts, progress)
        fields["files"]["scheduler"] = SCHEDULER_FILE
        (tmp / SCHEDULER_FILE).write_text(json.dumps(pipe.scheduler_config, indent=2) + "\n")
        if (pipe.path / EDGEKIT_FILE).is_file():
            shutil.copyfile(pipe.path / EDGEKIT_FILE, tmp / EDGEKIT_FILE)
            fields["files"]["info"] = EDGEKIT_FILE
        manifest = _manifest(pipe, unet, to, bits, method, lowrank, quant_opts, opts, weights, fields)
        manifest["sha256"] = artifact.checksum_files(tmp)
        artifact.write_manifest(tmp, manifest)
    art = Artifact.open(out, verify=False)
    artifact.remember_checksums(art)
    art.notes = notes
    return art


def _quantize(pipe: Pipeline, unet: Any, bits: int, method: str, lowrank: int, quant_opts: dict[str, Any],
              progress: ProgressFn) -> dict[str, Any]:
    try:
        from edgekit.converters.diffusion.quantize import quantize_unet
    except ModuleNotFoundError as exc:
        if exc.name != QUANTIZE_MODULE:
            raise
        raise UnsupportedError("this edgekit has no diffusion quantizer (edgekit.converters.diffusion.quantize); "
                               "convert with --bits 16 for float weights") from None
    takes = inspect.signature(quantize_unet).parameters
    extra = {k: v for k, v in quant_opts.items() if k in takes}
    unknown = sorted(set(quant_opts) - set(extra))
    if unknown:
        raise InputError(f"-O {unknown[0]} is not an option of the diffusion quantizer; drop it")
    return quantize_unet(pipe, unet, bits, method=method, lowrank=lowrank, progress=progress, **extra)


def _manifest(pipe: Pipeline, unet: Any, to: str, bits: int, method: str, lowrank: int, quant_opts: dict[str, Any],
              opts: dict[str, Any], weights: dict[str, Any] | None, fields: dict[str, Any]) -> dict[str, Any]:
    n_params = sum(p.numel() for p in unet.parameters())
    quantized = sum(int(qw.q.size) for qw in (weights or {}).values())
    main = (fields.get("graphs") or {}).get("unet") or {}
    size = int(main.get("bytes") or fields.get("size_bytes", 0))  # bits per weight of the graph one step runs
    return {
        "schema": artifact.SCHEMA,
        "format": to,
        "task": TASK,
        "created": artifact.now_iso(),
        "source": {"path": str(pipe.path.resolve()), "sha256": sha256_files([pipe.weights]),
                   "architecture": pipe.unet_config.get("_class_name", "UNet2DModel"), "n_params": n_params},
        "recipe": {"bits": bits, "method": method if weights else None, "lowrank": lowrank, **quant_opts,
                   "options": opts},
        "sampler": {"sampler": pipe.sampler, "steps": pipe.default_steps,
                    "origin_steps": pipe.origin_steps},
        "unet": {"sample_size": pipe.sample_size, "in_channels": pipe.in_channels,
                 "num_classes": pipe.num_classes, "prediction_type": pipe.scheduler_config.get("prediction_type", "epsilon")},
        "bits": bits if weights else 32,
        "quantized_params": quantized,
        "preset": quant_label(bits, method, lowrank),
        "bpw": round(8 * size / max(1, n_params), 3),
        "tools": artifact.tool_versions("diffusers", "numpy", "onnx", "safetensors", "torch"),
        **fields,
    }
