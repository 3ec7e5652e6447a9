"""``edgekit inspect``: what is inside an artifact, read from the model file itself by its format's home
(``Format.describe``): architecture and hyperparameters, parameter count, per-tensor types (with the
fallbacks the converter applied), file size, bits per weight, and the memory it needs at a context length.

The report also carries what the manifest says about how the artifact was made (recipe, pruning, sparsity,
evaluations); those fields are checked against the shapes the report gives them first, so a hand-edited or
damaged edgekit.json is refused by name instead of failing half-way through the report.
"""

from __future__ import annotations

from numbers import Real
from typing import Any

from edgekit.artifact import Artifact
from edgekit.converters.formats.base import FORMATS
from edgekit.errors import CorruptFileError, InputError, UnsupportedError

_NUM = (Real,)
_OPT = object()  # marks an optional key: {"key": (_OPT, spec)}
# What each manifest field that inspect reports must look like: a type tuple, a {key: spec} mapping (keys
# required unless wrapped with _OPT), or [spec] for a list of items.
_HEAL = {"steps": _NUM, "minutes": _NUM, "kl_before": _NUM, "kl_after": _NUM, "kl_refit": (_OPT, _NUM),
         "refit_kept": (_OPT, bool)}
_MANIFEST: dict[str, Any] = {
    "tensors": dict,
    "preset": (str, type(None)),
    "recipe": (dict, type(None)),
    "sparsity": (_OPT, {"mean": _NUM, "linears": _NUM, "steps": [str]}),
    "ternary": (_OPT, {"share": _NUM, "linears": _NUM, "group": _NUM, "scale": str, "stored_as": dict,
                       "distill": (_OPT, _HEAL)}),
    "eval": [{"ppl": _NUM, "ctx": _NUM, "chunks": _NUM, "kl_mean": (_OPT, _NUM), "top1_agreement": (_OPT, _NUM)}],
}
_PRUNED = {
    "depth": {"dropped_layers": [_NUM], "n_layer_source": _NUM, "heal": (_OPT, _HEAL)},
    "width": {"n_ff_source": _NUM, "n_ff": _NUM, "n_head_source": _NUM, "n_head": _NUM, "heal": (_OPT, _HEAL),
              "ffn_widths": (_OPT, [_NUM]), "n_params": (_OPT, _NUM), "n_params_source": (_OPT, _NUM),
              "params_target": (_OPT, _NUM)},
}


def _check(value: Any, spec: Any, where: str) -> None:
    if isinstance(spec, tuple) and spec and spec[0] is _OPT:
        spec = spec[1]
    if isinstance(spec, list):
        if not isinstance(value, list):
            raise _bad(where, "a list")
        for i, item in enumerate(value):
            _check(item, spec[0], f"{where}[{i}]")
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            raise _bad(where, "an object")
        for key, sub in spec.items():
            if key in value:
                _check(value[key], sub, f"{where}.{key}")
            elif not (isinstance(sub, tuple) and sub and sub[0] is _OPT):
                raise _bad(f"{where}.{key}", "present")
    elif isinstance(value, bool) and bool not in (spec if isinstance(spec, tuple) else (spec,)) \
            or not isinstance(value, spec):
        raise _bad(where, f"of type {'/'.join(t.__name__ for t in (spec if isinstance(spec, tuple) else (spec,)))}")


def _bad(where: str, should: str) -> CorruptFileError:
    return CorruptFileError(f"edgekit.json: {where} should be {should}; re-run 'edgekit convert' to rebuild it")


def check_manifest_report(manifest: dict[str, Any]) -> None:
    """Raise :class:`CorruptFileError` naming the first manifest field inspect reports that has the wrong shape."""
    for key, spec in _MANIFEST.items():
        if manifest.get(key) is not None:
            _check(manifest[key], spec, key)
    for name, entry in manifest.get("tensors", {}).items():
        _check(entry, dict, f"tensors.{name}")
    pruned = manifest.get("pruned")
    if pruned:
        _check(pruned, dict, "pruned")
        kind = "depth" if pruned.get("kind") == "depth" else "width"
        _check(pruned, _PRUNED[kind], "pruned")


MAX_CTX = 1 << 28  # the bound the GGUF and config checks put on a model's context length


def describe(art: Artifact, ctx: int = 4096) -> dict[str, Any]:
    if isinstance(ctx, bool) or not isinstance(ctx, int) or not 0 < ctx <= MAX_CTX:
        raise InputError(f"--ctx {ctx!r} is out of range; give a context length between 1 and {MAX_CTX}")
    if art.format not in FORMATS:
        raise UnsupportedError(f"inspect reads {', '.join(f.upper() for f in FORMATS.names())} artifacts; "
                               f"this one is {art.format!r}")
    if art.manifest.get("task") == "diffusion":
        return describe_diffusion(art)
    check_manifest_report(art.manifest)
    info = FORMATS.get(art.format)().describe(art, ctx)
    if art.manifest.get("ternary"):
        info["ternary"] = art.manifest["ternary"]
    return info


def describe_diffusion(art: Artifact) -> dict[str, Any]:
    """A diffusion artifact: how it samples, its recipe, and each graph as its exporter reads it back."""
    from edgekit.converters.diffusion.export import EXPORTERS

    m = art.manifest
    for key in ("graphs", "unet", "sampler", "source", "recipe"):
        if not isinstance(m.get(key), dict):
            raise _bad(key, "an object")
    keep = ("format", "task", "source", "recipe", "sampler", "unet", "bits", "preset", "bpw", "size_bytes",
            "quantized_params", "deepcache", "weight_storage", "created")
    exporter = EXPORTERS.get(art.format)()
    reader = getattr(exporter, "describe", None)  # an exporter that cannot read its files back: the manifest's
    return {"path": str(art.path), **{k: m.get(k) for k in keep},
            "graphs": reader(art) if reader is not None else m["graphs"]}
