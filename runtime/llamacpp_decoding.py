"""The llama.cpp backend's decoding options: speculative decoding (a draft model or prompt lookup, the draft
length) and the attention-sink KV window, checked in the parent so a bad one is a one-line error before
anything loads; the worker (``_llamacpp_worker.setup_decoding``) acts on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekit.errors import InputError


def decoding_options(draft: str | Path | None, speculative: str | None, n_draft: int | None,
                     kv_window: int | None, kv_sinks: int, kv_evict_step: int | None = None) -> dict[str, Any]:
    """The worker's decoding options, checked here so a bad one is a one-line error before anything loads."""
    from edgekit.runtime.speculative import drafting_mode

    mode = drafting_mode(draft, speculative, n_draft)
    out: dict[str, Any] = {"mode": mode}
    if mode == "draft":
        if draft is None:
            raise InputError("speculative decoding with a draft model needs --draft MODEL (a smaller GGUF with the "
                             "same tokenizer; make one with: edgekit convert MODEL --draft-for MODEL)")
        out["draft_path"] = str(draft_model_file(draft))
    if n_draft is not None:
        out["n_draft"] = int(n_draft)
    if kv_window is not None:
        if int(kv_window) < 64:
            raise InputError("--kv-window must be at least 64 tokens")
        if not 0 <= int(kv_sinks) < int(kv_window) // 2:
            raise InputError("--kv-sinks must be >= 0 and under half the window")
        out.update(kv_window=int(kv_window), kv_sinks=int(kv_sinks))
        if kv_evict_step is not None:
            if not 1 <= int(kv_evict_step) <= int(kv_window) - int(kv_sinks):
                raise InputError("--kv-evict-step must be between 1 and the window minus the sinks")
            out["kv_evict_step"] = int(kv_evict_step)
    elif kv_evict_step is not None:
        raise InputError("--kv-evict-step needs --kv-window")
    return out


def interactive_defaults(artifact: str | Path) -> dict[str, Any]:
    """Options `run`, `chat` and `serve` decode a GGUF artifact with unless told otherwise: flash attention,
    as llama.cpp's own CLI and server default to (``-fa auto``), which llama-cpp-python leaves off. It is as
    fast here (SmolLM2 Q8_0, 200 tokens, 1 thread: 78-80 tok/s with or without it), and it is the attention
    drafting and ``--prediction`` verify with, so ``--draft``/``--speculative`` give plain decoding's greedy
    text. ``-O flash_attn=false`` turns it off. Empty for other formats, or a path that is no artifact."""
    from edgekit.artifact import Artifact
    from edgekit.errors import EdgekitError

    try:
        fmt = artifact.format if isinstance(artifact, Artifact) else Artifact.open(artifact).format
    except (EdgekitError, OSError):  # a Hugging Face folder, or a bad path that loading names in its own words
        return {}
    return {"flash_attn": True} if fmt == "gguf" else {}


def draft_model_file(draft: str | Path) -> Path:
    """The GGUF file of a draft given as an artifact folder (checked against its manifest's sha256, as the
    target is) or a file (a one-line error otherwise: :func:`.base.draft_model_file`)."""
    from edgekit.runtime.base import draft_model_file as checked_draft

    return checked_draft(draft, "gguf")


def check_window_trained(models: list[Path], kv_window: int | None) -> None:
    """Refuse a ``--kv-window`` longer than the context a GGUF (the target, or its draft, which keeps the
    same window) was trained for, from its header's ``context_length``, as the ONNX backend refuses a window
    past its rotary tables: the window's positions would run past any the model has seen. A file whose
    header does not say (or does not read: llama.cpp names that when it loads) is not checked."""
    if kv_window is None:
        return
    from edgekit.errors import EdgekitError
    from edgekit.runtime.memory import read_shape

    for model in models:
        try:
            trained = read_shape(model).n_ctx_train
        except (EdgekitError, OSError, ValueError):
            continue
        if trained and int(kv_window) > trained:
            raise InputError(f"--kv-window {kv_window} is longer than the {trained} positions {model.name} was "
                             f"trained for; use at most {trained}")


def experts_options(model: str | Path, experts: str | int) -> dict[str, Any]:
    """``--experts K``: llama.cpp runs ``K`` of a mixture-of-experts GGUF's experts per token instead of the
    count the file names (``kv_overrides`` of ``ARCH.expert_used_count``). In a ``convert --sparse-ffn`` file
    the experts are the cold clusters beside the always-run hot set, so one file gives the whole speed and
    quality curve, and 'all' is the dense model. ``model``: an artifact folder, its name or a GGUF file."""
    from edgekit.artifact import Artifact
    from edgekit.errors import EdgekitError
    from edgekit.runtime.memory import read_shape

    try:
        art = Artifact.open(model)
    except EdgekitError:
        art = None
    if art is None or art.format != "gguf":
        raise InputError(f"--experts sets how many experts a mixture-of-experts GGUF runs per token; {model} is not "
                         "a GGUF artifact or file (a hot/cold one: edgekit convert MODEL --sparse-ffn 0.5)")
    shape = read_shape(art.model_file)
    if shape.n_expert <= 0:
        raise InputError(f"--experts: {art.model_file.name} ({shape.architecture}) has no experts; drop --experts (a "
                         "hot/cold file: edgekit convert MODEL --sparse-ffn 0.5)")
    text = str(experts).strip().lower()
    k = shape.n_expert if text == "all" else int(text) if text.isdigit() else 0
    if not 1 <= k <= shape.n_expert:
        raise InputError(f"--experts takes 1 to {shape.n_expert} (this file's experts) or 'all', not {experts!r}")
    return {"kv_overrides": {f"{shape.architecture}.expert_used_count": k}}


def experts_used(options: dict[str, Any]) -> int | None:
    """The expert count an ``experts_options`` override sets (None: the file's own)."""
    for key, value in (options.get("kv_overrides") or {}).items():
        if str(key).endswith(".expert_used_count"):
            return int(value)
    return None


# The KV cache types llama.cpp takes for type_k / type_v (-O type_k=q8_0 or its ggml number, 8).
KV_CACHE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}
_BOOL_OPTIONS = ("flash_attn", "use_mmap", "use_mlock", "offload_kqv", "op_offload", "swa_full", "embedding",
                 "logits_all", "no_perf", "vocab_only", "spm_infill")


def check_llama_options(extra: dict[str, Any]) -> dict[str, Any]:
    """``-O`` values llama.cpp would take badly, refused by name before it loads: a KV cache type it
    has no kernel for (type_k=99 aborted the process) or a word where a switch goes (flash_attn=maybe
    passed as true). Cache types may be given by name; they go to llama.cpp as their numbers."""
    out = dict(extra)
    for key in ("type_k", "type_v"):
        if key not in out or out[key] is None:
            continue
        value = out[key]
        by_number = {v: k for k, v in KV_CACHE_TYPES.items()}
        if isinstance(value, str) and value.lower() in KV_CACHE_TYPES:
            out[key] = KV_CACHE_TYPES[value.lower()]
        elif isinstance(value, bool) or value not in by_number:
            raise InputError(f"-O {key}={value}: llama.cpp's KV cache takes "
                             + ", ".join(f"{k} ({v})" for k, v in KV_CACHE_TYPES.items()))
    for key in _BOOL_OPTIONS:
        if key in out and out[key] is not None and not isinstance(out[key], bool):
            raise InputError(f"-O {key}={out[key]}: give true or false")
    return out

