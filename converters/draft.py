"""Drafts for speculative decoding, made from the model they will serve.

A draft must share the target's tokenizer and be much cheaper per token while agreeing with it often.
edgekit's draft recipe for llama.cpp: keep a third of the transformer blocks (the ones block influence
ranks highest, :mod:`.structure.depth`), distil the pruned model from the whole one (:mod:`.structure.heal`,
resumable), and round to Q4_0 (the cheapest type to decode on CPUs). Any part can be overridden
(``--prune``, ``--heal``, ``--type``). For onnxruntime (:func:`onnx_draft_recipe`): the whole model at 8
bits, which its target accepts almost always, at half a step (``--bits``, ``--prune`` and ``--heal``
override). The draft's manifest records the target it was made for.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from edgekit.errors import InputError

DEFAULT_HEAL = "20m"
DEFAULT_TYPE = "Q4_0"
KEEP_FRACTION = 1 / 3
#: An ONNX draft: the whole model at 8 bits (MatMulNBits). On SmolLM2 beside the FP16 graph it is accepted
#: on 94-98% of its tokens at 0.37-0.38 of a target step (8.1 ms against 21-22 ms, the KV caches bound in
#: place): 1.68x on rewrite/extract prompts, 1.57x on chat; the 4-bit copy on 67-76% at 0.28-0.30 (1.51x,
#: 1.33x), and a third of the blocks distilled (the GGUF recipe) on 11-30%, which no draft length pays for
#: (bench/results/speculative_onnx16_bound.txt, speculative.txt).
ONNX_DRAFT_BITS = 8


def default_prune(n_layer: int) -> str:
    """``depth:K`` keeping about a third of ``n_layer`` blocks (at least 2)."""
    keep = max(2, round(n_layer * KEEP_FRACTION))
    if keep >= n_layer:
        raise InputError(f"the model has only {n_layer} blocks: too few to make a cheaper draft by depth")
    return f"depth:{n_layer - keep}"


def tokenizer_fingerprint(folder: Path) -> str | None:
    """A hash of a checkpoint folder's tokenizer files (None when it has none)."""
    h = hashlib.sha256()
    found = False
    for name in ("tokenizer.json", "tokenizer.model"):
        f = folder / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes())
            found = True
    return h.hexdigest()[:16] if found else None


def target_record(model: Path, target: str | Path) -> dict[str, Any]:
    """What the draft's manifest says about its target, after checking they share a tokenizer: the target is
    the checkpoint folder or an edgekit artifact converted from a checkpoint with the same tokenizer."""
    t = Path(target).expanduser()
    if not t.exists():
        raise InputError(f"--draft-for {target}: no such folder or file")
    src = t
    if (t / "edgekit.json").exists() or t.is_file():
        from edgekit.artifact import Artifact

        art = Artifact.open(t)
        source = (art.manifest.get("source") or {}).get("path")
        if not source or not Path(source).is_dir():
            raise InputError(f"--draft-for {target}: its manifest names no source checkpoint here; give the checkpoint "
                             "folder the target was converted from")
        src = Path(source)
    mine, theirs = tokenizer_fingerprint(Path(model)), tokenizer_fingerprint(src)
    if mine is None or theirs is None or mine != theirs:
        raise InputError(f"--draft-for {target}: its tokenizer differs from {model}'s; a draft must share the target's "
                         "tokenizer")
    return {"target": str(t.resolve()), "tokenizer": mine}


def draft_recipe(model: str | Path, target: str | Path | None = None, recipe: Any = None, *,
                 heal: str | None = DEFAULT_HEAL, preset: str | None = DEFAULT_TYPE) -> Any:
    """The recipe for a draft of ``target`` (default: ``model`` itself) made from ``model``: ``recipe``'s own
    prune / heal win over the draft defaults; ``preset`` (default Q4_0) replaces the recipe's type unless
    None."""
    from edgekit.converters.formats.base import ConvertRecipe
    from edgekit.converters.structure.heal import HealConfig
    from edgekit.model import HFCheckpoint

    ckpt = HFCheckpoint.open(model)
    recipe = recipe or ConvertRecipe(bits=None, preset=preset or DEFAULT_TYPE)
    n_layer = int(ckpt.config.get("num_hidden_layers") or 0)
    prune = recipe.prune or default_prune(n_layer)
    if not prune.startswith("depth:"):
        raise InputError("a draft is made faster by depth (--prune depth:K); width or weight pruning does not "
                         "make llama.cpp decode faster")
    heal_cfg = recipe.heal
    if heal_cfg is None and heal:
        heal_cfg = HealConfig(minutes=HealConfig.parse_minutes(heal))
    record = target_record(ckpt.path, target if target is not None else ckpt.path)
    types = {"preset": preset, "bits": None, "bpw": None} if preset else {}
    return dataclasses.replace(recipe, prune=prune, heal=heal_cfg, draft_for=record, **types)


def onnx_draft_recipe(model: str | Path, target: str | Path | None = None, recipe: Any = None, *,
                      bits: int | None = ONNX_DRAFT_BITS) -> Any:
    """The recipe for an ONNX draft of ``target`` (default: ``model`` itself) made from ``model``: ``bits``
    (default 8; None keeps ``recipe``'s size) at full depth unless ``recipe`` prunes by depth (healed only
    when ``recipe`` says so)."""
    from edgekit.converters.formats.base import ConvertRecipe
    from edgekit.model import HFCheckpoint

    ckpt = HFCheckpoint.open(model)
    recipe = recipe or ConvertRecipe(bits=bits)
    if recipe.prune and not recipe.prune.startswith("depth:"):
        raise InputError("a draft is made faster by depth (--prune depth:K); width or weight pruning does not "
                         "make onnxruntime decode faster")
    record = target_record(ckpt.path, target if target is not None else ckpt.path)
    sized = {"bits": bits, "preset": None, "bpw": None, "size": None} if bits is not None else {}
    return dataclasses.replace(recipe, draft_for=record, **sized)
