"""Structural changes to a checkpoint before it is converted: depth pruning (fewer decoder blocks) and
width pruning (fewer FFN neurons and query heads per block), chosen by importance measured on
calibration data. The result is a plain Hugging Face checkpoint folder of the same architecture, so
every format, method and runtime takes it unchanged."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgekit.converters.structure.depth import DepthSpec, prune_depth
from edgekit.converters.structure.importance import LayerImportance, layer_importance
from edgekit.converters.structure.width import WidthSpec, prune_width
from edgekit.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from edgekit.calibration import CalibConfig
    from edgekit.model import HFCheckpoint

__all__ = ["DepthSpec", "LayerImportance", "WidthSpec", "apply", "layer_importance", "prune_depth", "prune_width",
           "validate"]

KINDS = ("depth", "width")


def validate(spec: str) -> None:
    """Parse ``spec`` (``depth:...`` or ``width:...``) without touching a model; raises InputError."""
    kind, _, rest = spec.partition(":")
    if kind == "depth":
        DepthSpec.parse(rest)
    elif kind == "width":
        WidthSpec.parse(rest)
    else:
        raise InputError(f"structural pruning {spec!r}: use depth:K or width:ffn=N,heads=N (or width:auto "
                         "--params N; unstructured pruning is a layer step: --prune wanda:0.5)")


def apply(ckpt: HFCheckpoint, spec: str, calib: CalibConfig, out: Path,
          progress: Callable[[str, int, int], None] | None = None) -> tuple[Path, dict[str, Any]]:
    """Write the pruned checkpoint into the new folder ``out``; returns it and what was removed and why."""
    validate(spec)
    kind, _, rest = spec.partition(":")
    if kind == "depth":
        from edgekit.converters.structure.depth import choose_layers

        drop, info = choose_layers(ckpt, DepthSpec.parse(rest), calib, progress)
        if progress:
            progress(f"writing the checkpoint without blocks {drop}", 0, 1)
        path = prune_depth(ckpt, drop, out)
        return path, {"kind": "depth", "dropped_layers": drop, "n_layer": ckpt.hparams.n_layer - len(drop),
                      "n_layer_source": ckpt.hparams.n_layer, **info}
    from edgekit.converters.structure import width

    wspec = WidthSpec.parse(rest)
    width.check(wspec, ckpt)
    scores = width.importance(ckpt, calib, progress)
    auto: dict[str, Any] = {}
    if wspec.auto:
        heads = width.choose(WidthSpec(heads=wspec.heads), ckpt, scores) if wspec.heads else None
        curves = width.width_sensitivity(ckpt, scores, calib, {i: k["heads"] for i, k in heads.items()}
                                         if heads else None, progress=progress)
        keep, auto = width.choose_auto(wspec, ckpt, scores, curves)
    else:
        keep = width.choose(wspec, ckpt, scores)
    if progress:
        progress("writing the narrowed checkpoint", 0, 1)
    path = prune_width(ckpt, wspec, keep, out)
    hp = ckpt.hparams
    n_ff = max(auto["ffn_widths"]) if auto else wspec.ffn or hp.n_ff
    return path, {"kind": "width", "n_ff": n_ff, "n_ff_source": hp.n_ff,
                  "n_head": wspec.heads or hp.n_head, "n_head_source": hp.n_head, "measure": "activation",
                  "kept_heads": {str(i): k["heads"] for i, k in keep.items() if "heads" in k}, **auto}
