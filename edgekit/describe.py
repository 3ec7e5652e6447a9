"""``edgekit inspect``: what is inside an artifact, read from the model file itself by its format's home
(``Format.describe``): architecture and hyperparameters, parameter count, per-tensor types (with the
fallbacks the converter applied), file size, bits per weight, and the memory it needs at a context length.

A Hugging Face checkpoint folder is described before anything is converted (:func:`describe_checkpoint`):
its shape, parameters, stored dtypes and size, its memory at a context length, and what each ``convert
--bits N`` would make of it. Those rows are the converter's own plan (llama.cpp's mix rules and its
fallbacks for rows that do not fit a block), so the sizes are the tensor data the GGUF will hold, exact to
the byte; the file adds its header and vocabulary.

The report also carries what the manifest says about how the artifact was made (recipe, pruning, sparsity,
evaluations); those fields are checked against the shapes the report gives them first, so a hand-edited or
damaged edgekit.json is refused by name instead of failing half-way through the report.
"""

from __future__ import annotations

import math
from collections import Counter
from numbers import Real
from pathlib import Path
from typing import Any

from edgekit import library
from edgekit.artifact import MANIFEST_NAME, Artifact
from edgekit.converters.diffusion.pipeline import is_pipeline
from edgekit.converters.formats.base import FORMATS
from edgekit.errors import CorruptFileError, EdgekitError, InputError, UnsupportedError
from edgekit.model import HFCheckpoint

_NUM = (Real,)
_OPT = object()  # marks an optional key: {"key": (_OPT, spec)}
# What each manifest field that inspect reports must look like: a type tuple, a {key: spec} mapping (keys
# required unless wrapped with _OPT), or [spec] for a list of items.
_HEAL = {"steps": _NUM, "minutes": _NUM, "kl_before": _NUM, "kl_after": _NUM, "kl_refit": (_OPT, _NUM),
         "refit_kept": (_OPT, bool), "kept": (_OPT, bool), "kl_trained": (_OPT, _NUM)}
_MANIFEST: dict[str, Any] = {
    "tensors": dict,
    "preset": (str, type(None)),
    "recipe": (dict, type(None)),
    "sparsity": (_OPT, {"mean": _NUM, "linears": _NUM, "steps": [str]}),
    "ternary": (_OPT, {"share": _NUM, "linears": _NUM, "group": _NUM, "scale": str, "stored_as": dict,
                       "distill": (_OPT, _HEAL)}),
    "aqlm": (_OPT, {"distill": (_OPT, _HEAL)}),
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


def check_ctx(ctx: Any) -> None:
    if isinstance(ctx, bool) or not isinstance(ctx, int) or not 0 < ctx <= MAX_CTX:
        raise InputError(f"--ctx {ctx!r} is out of range; give a context length between 1 and {MAX_CTX}")


#: the context ``inspect`` counts memory at unless asked (or the trained one where that is shorter)
INSPECT_CTX = 4096


def inspect_target(target: str | Path, ctx: int | None = None) -> dict[str, Any]:
    """:func:`edgekit.api.inspect`: an artifact by name or path, or a checkpoint folder before converting."""
    if ctx is not None:
        check_ctx(ctx)
    p = library.resolve(target)
    if p.is_dir() and (p / "config.json").is_file() and not (p / MANIFEST_NAME).exists() and not is_pipeline(p):
        ckpt = HFCheckpoint.open(p)
        trained = ckpt.hparams.n_ctx_train
        return _note_ctx(describe_checkpoint(ckpt, ctx or _default_ctx(trained)), trained, ctx)
    art = Artifact.open(target)
    info = describe(art, ctx or INSPECT_CTX)
    trained = (info.get("hparams") or {}).get("context_length")
    if ctx is None and "memory" in info and _default_ctx(trained) != INSPECT_CTX:  # a short-context model
        info = describe(art, _default_ctx(trained))
    _note_ctx(info, trained, ctx)
    if "memory" in info:  # what the runtime's memory model predicts, beside the weights + KV cache count
        from edgekit.runtime.base import memory_to_run

        modelled = memory_to_run(art.format, art.model_file, info["memory"]["ctx"])
        if modelled is not None:
            info["memory"]["to_run"] = {"runtime": modelled[0], "bytes": modelled[1]}
    return info


def _default_ctx(trained: Any) -> int:
    """The context inspect counts memory at when none is asked: 4096 tokens, or the trained context when that
    is shorter (memory at a context the model never saw is not what it will use)."""
    if isinstance(trained, int) and not isinstance(trained, bool) and trained > 0:
        return min(INSPECT_CTX, trained)
    return INSPECT_CTX


def _note_ctx(info: dict[str, Any], trained: Any, asked: int | None) -> dict[str, Any]:
    """Marks a memory figure asked at a context longer than the model was trained for (``memory.beyond_trained``
    holds the trained context)."""
    mem = info.get("memory")
    if asked is not None and isinstance(mem, dict) and isinstance(trained, int) and asked > trained:
        mem["beyond_trained"] = trained
    return info


def describe(art: Artifact, ctx: int = 4096) -> dict[str, Any]:
    check_ctx(ctx)
    if art.format not in FORMATS:
        raise UnsupportedError(f"inspect reads {', '.join(f.upper() for f in FORMATS.names())} artifacts; "
                               f"this one is {art.format!r}")
    if art.manifest.get("task") == "diffusion":
        return describe_diffusion(art)
    check_manifest_report(art.manifest)
    info = FORMATS.get(art.format)().describe(art, ctx)
    if art.manifest.get("ternary"):
        info["ternary"] = art.manifest["ternary"]
    aqlm = art.manifest.get("aqlm")
    if isinstance(aqlm, dict) and isinstance(aqlm.get("distill"), dict):
        info["distill"] = aqlm["distill"]
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

# safetensors dtype -> bytes per element
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}
BITS = (8, 6, 5, 4, 3, 2)


def kv_cache_f16(n_layer: int, n_head_kv: int, head_dim: int, ctx: int) -> int:
    """K and V of every block in llama.cpp's default f16 cache at ``ctx``, for the cells it allocates there
    (rounded up to 256, as ``inspect`` of a GGUF and ``plan`` count them)."""
    from edgekit.converters.formats.gguf.read import kv_cells

    return 2 * n_layer * kv_cells(ctx) * n_head_kv * head_dim * 2


def gguf_options(ckpt: HFCheckpoint, ctx: int) -> list[dict[str, Any]]:
    """For F16 and each ``--bits`` preset: the tensor bytes, bits per weight and fallbacks of the GGUF
    that ``edgekit convert --bits N`` writes (from the converter's plan), and its memory at ``ctx``."""
    from edgekit.converters.formats.base import ConvertRecipe
    from edgekit.converters.formats.gguf import mixes
    from edgekit.converters.formats.gguf.writer import plan_tensors

    hp = ckpt.hparams
    kv = kv_cache_f16(hp.n_layer, hp.n_head_kv, hp.head_dim, ctx)
    rows = []
    for bits, preset in [(None, "F16"), *((b, None) for b in BITS)]:
        plan = plan_tensors(ckpt, ConvertRecipe(bits=bits, preset=preset))
        nbytes = sum(t.nbytes for t in plan)
        n = sum(math.prod(t.shape) for t in plan)
        fallbacks = Counter(f"{t.assignment.wanted.name}->{t.assignment.type.name}" for t in plan
                            if t.assignment.fell_back)
        rows.append({"bits": bits, "preset": preset or mixes.preset_for_bits(bits).name, "weight_bytes": nbytes,
                     "bpw": round(8 * nbytes / n, 4), "fallbacks": sum(fallbacks.values()),
                     "fallback_summary": dict(fallbacks.most_common()), "memory_total": nbytes + kv})
    return rows


def _gguf_rows(ckpt: HFCheckpoint, ctx: int) -> dict[str, Any]:
    try:
        return {"gguf": gguf_options(ckpt, ctx)}
    except EdgekitError as exc:  # a checkpoint GGUF cannot hold: the rest of the report still stands
        return {"gguf": [], "gguf_error": str(exc)}


def describe_checkpoint(ckpt: HFCheckpoint, ctx: int) -> dict[str, Any]:
    """What :func:`edgekit.describe.describe` reports of an artifact, for a checkpoint folder, plus
    ``gguf``: the rows of :func:`gguf_options`."""
    hp = ckpt.hparams
    refs = list(ckpt.tensors.values())
    tensors = [{"name": r.name, "type": r.dtype, "shape": list(r.shape), "n_elements": r.numel,
                "bytes": r.numel * _DTYPE_BYTES.get(r.dtype, 4)} for r in refs]
    n_params = sum(t["n_elements"] for t in tensors)
    weight_bytes = sum(t["bytes"] for t in tensors)
    kv = kv_cache_f16(hp.n_layer, hp.n_head_kv, hp.head_dim, ctx)
    counts = Counter(t["type"] for t in tensors)
    ffn = list(hp.ffn_widths) if hp.ffn_widths is not None else hp.n_ff
    return {
        "path": str(ckpt.path),
        "format": "hf",
        "architecture": ckpt.spec.gguf_arch,
        "name": (ckpt.config.get("architectures") or ["?"])[0],
        "hparams": {"block_count": hp.n_layer, "embedding_length": hp.n_embd, "feed_forward_length": ffn,
                    "attention.head_count": hp.n_head, "attention.head_count_kv": hp.n_head_kv,
                    "context_length": hp.n_ctx_train, "rope.freq_base": hp.rope_theta, "vocab_size": hp.n_vocab,
                    "tie_word_embeddings": hp.tie_embeddings},
        "n_params": n_params,
        "file_bytes": sum(f.stat().st_size for f in ckpt.weight_files),
        "weight_bytes": weight_bytes,
        "bpw": round(8 * weight_bytes / n_params, 4) if n_params else 0.0,
        "type_counts": dict(counts.most_common()),
        "type_bytes": {k: sum(t["bytes"] for t in tensors if t["type"] == k) for k in counts},
        "fallbacks": 0,
        "fallback_summary": {},
        "memory": {"ctx": ctx, "weights": weight_bytes, "kv_cache_f16": kv, "total": weight_bytes + kv},
        **_gguf_rows(ckpt, ctx),
        "tensors": tensors,
    }
