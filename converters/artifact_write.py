"""How ``api.convert`` writes an artifact folder: a scratch folder renamed into place at the end, with its
manifest (the source and its checksum, the recipe and the method's settings, what the format and the method
report, the files' checksums), and the pruned copy of a checkpoint that structural pruning converts."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgekit.artifact import (
    MANIFEST_NAME,
    SCHEMA,
    checksum_files,
    is_artifact_folder,
    now_iso,
    tool_versions,
    write_manifest,
)
from edgekit.calibration import CalibConfig
from edgekit.converters.formats.base import ConvertRecipe, ProgressFn
from edgekit.converters.quantize.base import Quantizer
from edgekit.errors import InputError, OutputExistsError, UnsupportedError
from edgekit.fsutil import atomic_dir, temp_dir
from edgekit.hashing import sha256_files
from edgekit.model import HFCheckpoint


def check_same_source(out: Path, source: Path, force: bool, notes: list[str]) -> None:
    """An existing artifact at ``out`` converted from another source (two models in folders of one name share
    a default name) is named as such: refused without ``force``, and its replacement said with it."""
    try:
        made_from = json.loads((out / MANIFEST_NAME).read_text())["source"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if not isinstance(made_from, str) or made_from == str(source.resolve()):
        return
    if not force:
        raise OutputExistsError(f"{out} already exists and holds a conversion of {made_from}, not of {source}; "
                                "choose another -o (output=), or pass --force (force=True) to replace it")
    notes.append(f"the artifact replaced at {out} was a conversion of {made_from}")


def check_arch(fmt: Any, ckpt: HFCheckpoint) -> None:
    """A format whose graphs compute only some families refuses the others before any work, naming what
    converts them (its graph would leave out what it does not know: BitNet's sub-norms, say)."""
    archs = getattr(fmt, "archs", None)
    if archs is None or set(ckpt.spec.hf_classes) & set(archs):
        return
    others = [f"--to {name}" for name in ("gguf", "onnx", "coreml", "mlc") if name != fmt.name
              and _takes(name, ckpt.spec.hf_classes)]
    raise UnsupportedError(f"--to {fmt.name} writes {', '.join(archs)} checkpoints; this one is "
                           f"{ckpt.spec.hf_classes[0]}: convert it with {' or '.join(others)}")


def _takes(name: str, classes: tuple[str, ...]) -> bool:
    from edgekit.converters.formats.base import FORMATS

    archs = getattr(FORMATS.get(name), "archs", None)
    return archs is None or bool(set(classes) & set(archs))


def write_artifact(fmt: Any, ckpt: HFCheckpoint, out: Path, gguf_src: Path | None, recipe: ConvertRecipe,
                   quantizer: Quantizer, force: bool, notes: list[str], progress: ProgressFn) -> None:
    """Convert ``ckpt`` (pruned first where the recipe says) with ``fmt`` into the folder ``out``, all at once or
    not at all, with its manifest: the source and its sha256, the recipe, what the format and the method
    report, and the files' sha256. ``notes`` gets what the format and the method say."""
    check_arch(fmt, ckpt)
    per_block = ckpt.hparams.ffn_widths is not None or (recipe.prune or "").startswith("width:auto")
    if per_block and fmt.name not in ("gguf", "onnx"):
        raise InputError(f"per-block FFN widths (width:auto) are written to GGUF (llama.cpp's deci) and ONNX; "
                         f"--to {fmt.name} (to=\"{fmt.name}\") takes uniform width pruning (width:ffn=N) instead")
    with atomic_dir(out, force=force, replaceable=is_artifact_folder, notes=notes) as tmp:
        source = ckpt
        with _structured(ckpt, recipe, quantizer, out, progress) as (ckpt, pruned):
            fields = fmt.convert(ckpt, tmp, recipe, quantizer, progress)
        notes.extend(fields.pop("notes", []))  # what the format warns about (--bits far from its bpw)
        notes.extend(getattr(quantizer, "notes", []))  # what the method says of its inputs (an imatrix file's)
        if pruned:
            fields["pruned"] = pruned
        sparsity = getattr(quantizer, "report", {}).get("sparsity")
        if sparsity:
            steps = [c for c in quantizer.config.steps() if hasattr(c, "sparsity")]  # type: ignore[attr-defined]
            values = [v for layer in sparsity.values() for v in layer.values()]
            fields["sparsity"] = {"steps": [f"{c.step}:{c.sparsity}" for c in steps],
                                  "mean": round(sum(values) / len(values), 4), "linears": len(values)}
            kept = getattr(quantizer, "report", {}).get("zeros_kept", {})
            pruned = {(i, n): v for i, layer in sparsity.items() for n, v in layer.items()}
            stored = [pruned[i, n] * kept.get(i, {}).get(n, 1.0) for i, n in pruned]  # unrounded (float): all kept
            # the share of weights the file stores as exact zeros: below "mean" where a grid with a minimum
            # (Q4_1, Q4_K, Q5_K, Q2_K) rounds a pruned weight to its nearest value, within half a step of 0
            fields["sparsity"]["stored"] = round(sum(stored) / len(stored), 4)
        ternary = getattr(quantizer, "report", {}).get("ternary")
        if ternary:
            fields["ternary"] = ternary
        # a format corrects the recipe where its options decide (MLC's --quant picks the bits)
        corrections = fields.pop("recipe", {})
        manifest: dict[str, Any] = {
            "schema": SCHEMA,
            "format": fmt.name,
            "created": now_iso(),
            "source": {
                "path": str((gguf_src or source.path).resolve()),
                "sha256": sha256_files([gguf_src] if gguf_src else source.weight_files),
                **({"imported_from": "gguf"} if gguf_src else {}),
                "architecture": (source.config.get("architectures") or ["?"])[0],
                "n_params": source.n_params,
            },
            "recipe": {**recipe.to_json(), "quantizer": quantizer.config.to_json(), **corrections},
            "tools": tool_versions("gguf", "numpy", "safetensors", "torch", "transformers"),
            **fields,
        }
        manifest["sha256"] = checksum_files(tmp)  # checked before each use: a changed file is caught
        write_manifest(tmp, manifest)


@contextlib.contextmanager
def _structured(ckpt: HFCheckpoint, recipe: ConvertRecipe, quantizer: Quantizer, out: Path,
                progress: ProgressFn) -> Iterator[tuple[HFCheckpoint, dict[str, Any] | None]]:
    """The checkpoint to convert: ``ckpt`` itself, or (``recipe.prune``) a pruned copy in a scratch folder
    beside the output, removed afterwards whatever happens."""
    if not recipe.prune:
        yield ckpt, None
        return
    from edgekit.converters import structure

    calib = recipe.calib or getattr(quantizer.config, "calib", None) or CalibConfig()
    with temp_dir(out.parent, out.name, "prune") as scratch:
        path, info = structure.apply(ckpt, recipe.prune, calib, scratch / ckpt.path.name, progress)  # keeps its name
        if recipe.heal is not None:
            from edgekit.converters.structure.heal import heal

            info["heal"] = heal(ckpt, path, recipe.prune, recipe.heal, calib, progress)
        yield HFCheckpoint.open(path), info
