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


def draft_model_file(draft: str | Path) -> Path:
    """The GGUF file of a draft given as an artifact folder or a file (a one-line error otherwise)."""
    p = Path(draft).expanduser()
    if p.is_file():
        return p.resolve()
    if p.is_dir():
        from edgekit.artifact import Artifact

        art = Artifact.open(p)
        if art.format != "gguf":
            raise InputError(f"the draft {p} holds {art.format.upper()}, not GGUF; llama.cpp drafts are GGUF (convert it "
                             "with: edgekit convert MODEL --draft-for MODEL)")
        return art.model_file.resolve()
    raise InputError(f"draft model not found: {p}")
