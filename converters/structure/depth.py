"""Depth pruning: drop whole decoder blocks and write the smaller checkpoint.

``depth:K`` removes the ``K`` blocks of lowest block influence; ``depth:K:angular`` removes the ``K``
consecutive blocks of smallest angular distance; ``depth:layers=3,7`` removes the blocks named. The
remaining blocks are renumbered; the result is a checkpoint of the same architecture with
``num_hidden_layers`` lowered, written as one safetensors file beside copies of the config and
tokenizer files, so conversion and every runtime treat it as any other model.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekit.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Callable

    from edgekit.calibration import CalibConfig
    from edgekit.model import HFCheckpoint

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_SIDE = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
         "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")


@dataclass(frozen=True)
class DepthSpec:
    """How many blocks to drop and how to choose them (``influence``, ``angular`` or given ``layers``)."""

    count: int = 0
    measure: str = "influence"
    layers: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> DepthSpec:
        """``"6"``, ``"6:angular"``, ``"layers=3,7"`` (the part after ``depth:``)."""
        t = text.strip()
        try:
            if t.startswith("layers="):
                layers = tuple(sorted({int(v) for v in t[len("layers="):].split(",") if v.strip()}))
                return cls(count=len(layers), measure="given", layers=layers)
            count, _, measure = t.partition(":")
            spec = cls(count=int(count), measure=measure or "influence")
        except ValueError:
            raise InputError(f"depth:{text}: give a block count (depth:6), depth:6:angular, or depth:layers=3,7")\
                from None
        if spec.measure not in ("influence", "angular"):
            raise InputError(f"depth:{text}: choose blocks by 'influence' (default) or 'angular'")
        if spec.count < 1:
            raise InputError("depth pruning needs at least one block to drop (depth:1 or more)")
        return spec


def choose_layers(ckpt: HFCheckpoint, spec: DepthSpec, calib: CalibConfig,
                  progress: Callable[[str, int, int], None] | None = None) -> tuple[list[int], dict[str, Any]]:
    """The blocks to drop and the measurements behind the choice."""
    n = ckpt.hparams.n_layer
    if spec.count >= n:
        raise InputError(f"the model has {n} blocks; depth pruning can drop at most {n - 1}")
    if spec.measure == "given":
        bad = [i for i in spec.layers if not 0 <= i < n]
        if bad:
            raise InputError(f"blocks {bad} do not exist; this model's blocks are 0..{n - 1}")
        return list(spec.layers), {"measure": "given"}
    from edgekit.converters.structure.importance import layer_importance

    imp = layer_importance(ckpt, calib, windows=(spec.count,) if spec.measure == "angular" else (), progress=progress)
    drop = imp.best_window(spec.count) if spec.measure == "angular" else imp.least_influential(spec.count)
    info: dict[str, Any] = {"measure": spec.measure, "influence": imp.influence}
    if spec.measure == "angular":
        info["angular"] = imp.angular[spec.count]
    return drop, info


def prune_depth(ckpt: HFCheckpoint, drop: list[int], out: Path) -> Path:
    """Write ``ckpt`` without the blocks ``drop`` into the (new, empty) folder ``out``."""
    from safetensors.numpy import save_file

    n = ckpt.hparams.n_layer
    keep = [i for i in range(n) if i not in set(drop)]
    renumber = {old: new for new, old in enumerate(keep)}
    tensors = {}
    for name in ckpt.tensors:
        m = _LAYER.match(name)
        if m is None:
            tensors[name] = ckpt.load(name)
        elif int(m.group(1)) in renumber:
            tensors[f"model.layers.{renumber[int(m.group(1))]}.{m.group(2)}"] = ckpt.load(name)
    out.mkdir(parents=True, exist_ok=False)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = dict(ckpt.config)
    config["num_hidden_layers"] = len(keep)
    for key in ("layer_types", "sliding_window_layers", "edgekit_ffn_widths"):  # per-layer lists follow the kept blocks
        if isinstance(config.get(key), list) and len(config[key]) == n:
            config[key] = [config[key][i] for i in keep]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in _SIDE:
        if (ckpt.path / name).exists():
            shutil.copy2(ckpt.path / name, out / name)
    return out
