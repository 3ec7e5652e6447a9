"""Checks on a Hugging Face config.json before anything is sized from it: types, bounds and the head layout.

A bad value otherwise surfaces far from its cause (a ZeroDivisionError from zero heads, an architecture
list iterated letter by letter); these checks refuse it up front and name the key. The config is checked
against the weights' shapes by :func:`edgekit.model.check_shapes`.
"""

from __future__ import annotations

import math
from typing import Any

from edgekit.errors import CorruptFileError, InputError

# Upper bounds far above any released model: a value past them is a typo or a corrupted file, and
# taking it at face value would size a KV cache or a loop from it.
_INT_KEYS = {
    "num_hidden_layers": 4096,
    "num_attention_heads": 16384,
    "num_key_value_heads": 16384,
    "hidden_size": 1 << 20,
    "intermediate_size": 1 << 22,
    "vocab_size": 1 << 24,
    "head_dim": 1 << 16,
    "max_position_embeddings": 1 << 28,
}
_OPTIONAL_INT_KEYS = ("num_key_value_heads", "head_dim", "max_position_embeddings")
# GGUF stores these as float32: a value past its range cannot be written.
_FLOAT_KEYS = {"rope_theta": (0.0, 1e15), "rms_norm_eps": (0.0, 1.0)}


def _fail(source: str, key: str, problem: str) -> CorruptFileError:
    return CorruptFileError(f"{source}: {key!r} {problem}; fix config.json or re-download the model")


def check_config(cfg: Any, source: str = "config.json") -> None:
    """Raise :class:`CorruptFileError` naming the first key of ``cfg`` with a wrong type or value.

    Missing required keys are left to :meth:`HParams.from_config` (a different model kind, not a corrupt file).
    """
    if not isinstance(cfg, dict):
        raise CorruptFileError(f"{source} holds a JSON {type(cfg).__name__}, not an object of settings; "
                               "fix config.json or re-download the model")
    archs = cfg.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise _fail(source, "architectures", f"must be a list of class names like [\"LlamaForCausalLM\"], got {archs!r:.60}")
    for key, top in _INT_KEYS.items():
        if key not in cfg:
            continue  # missing: HParams says which family of model it expected (or takes a default)
        v = cfg[key]
        if v is None and key in _OPTIONAL_INT_KEYS:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise _fail(source, key, f"must be a whole number, got {v!r:.40}")
        if not 0 < v <= top:
            raise _fail(source, key, f"is {v}; it must be between 1 and {top}")
    for key, (lo, hi) in _FLOAT_KEYS.items():
        v = cfg.get(key)
        if v is None:
            continue
        if not _positive(v, hi):
            raise _fail(source, key, f"must be a number in ({lo:g}, {hi:g}), got {v!r:.40}")
    for key in ("rope_scaling", "rope_parameters"):
        v = cfg.get(key)
        if v is not None and not isinstance(v, dict):
            raise _fail(source, key, f"must be an object or null, got {v!r:.40}")
        for sub, hi in (("rope_theta", 1e15), ("factor", 1e6)):
            x = (v or {}).get(sub)
            if x is not None and not _positive(x, hi):
                raise _fail(source, f"{key}.{sub}", f"must be a number in (0, {hi:g}), got {x!r:.40}")
    vocab = cfg.get("vocab_size") if isinstance(cfg.get("vocab_size"), int) else None
    for key in _TOKEN_ID_KEYS:
        v = cfg.get(key)
        ids = v if isinstance(v, list) else [v]
        if v is not None and not all(not isinstance(i, bool) and isinstance(i, int) and 0 <= i < (vocab or 2**31)
                                     for i in ids):
            raise _fail(source, key, f"must be a token id in 0..{(vocab or 2**31) - 1} (or a list of them, or null), "
                                     f"got {v!r:.40}")
    widths = cfg.get("edgekit_ffn_widths")  # per-block FFN widths written by width:auto pruning
    if widths is not None:
        n_ff, n_layer = cfg.get("intermediate_size"), cfg.get("num_hidden_layers")
        if (not isinstance(widths, list) or len(widths) != n_layer
                or not all(not isinstance(w, bool) and isinstance(w, int) and 0 < w <= (n_ff or 0) for w in widths)):
            raise _fail(source, "edgekit_ffn_widths", f"must list num_hidden_layers ({n_layer}) widths in 1.."
                                                      f"{n_ff}, got {widths!r:.60}")
    tie = cfg.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        raise _fail(source, "tie_word_embeddings", f"must be true or false, got {tie!r:.40}")
    _check_head_layout(cfg, source)


# Special token ids: gguf's SpecialVocab reads them from config.json and the writer refuses bad ones mid-way.
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id")


def check_number(value: Any, flag: str, *, above: float | None = None, at_least: float | None = None,
                 below: float | None = None, at_most: float | None = None, note: str = "") -> float:
    """``value`` when it is a finite number within the bounds given, else an :class:`InputError` naming
    ``flag``, the range and the value. NaN fails every comparison and infinity passes ``x > 0``, so both
    slip past checks such as ``x < 0``; every numeric option goes through here instead. ``note``: a few
    words after the range, e.g. ``" (0 is greedy)"``."""
    lo = f"({above}" if above is not None else f"[{at_least}" if at_least is not None else None
    hi = f"{below})" if below is not None else f"{at_most}]" if at_most is not None else None
    if lo and hi:
        rng = f"in {lo}, {hi}"
    elif lo:
        rng = f"{'>' if above is not None else '>='} {lo[1:]}"
    elif hi:
        rng = f"{'<' if below is not None else '<='} {hi[:-1]}"
    else:
        rng = ""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
    ok = ok and (below is None or value < below) and (at_most is None or value <= at_most)
    if not ok:
        number = not isinstance(value, bool) and isinstance(value, (int, float))
        got = value if number else f"{value!r}, a {type(value).__name__}"  # '0.5' the string read as 0.5
        raise InputError(f"{flag} must be a finite number {rng}{note}, got {got}".replace("number  ", "number "))
    return float(value)


def _positive(x: Any, hi: float) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and 0 < x < hi


def _check_head_layout(cfg: dict, source: str) -> None:
    heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    if not isinstance(heads, int) or not isinstance(hidden, int):
        return
    kv = cfg.get("num_key_value_heads") or heads
    if heads % kv:
        raise _fail(source, "num_key_value_heads", f"is {kv}, which does not divide num_attention_heads {heads}")
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise _fail(source, "hidden_size", f"is {hidden}, not a multiple of num_attention_heads {heads} "
                                               "(and no head_dim is given)")
        head_dim = hidden // heads
    if head_dim % 2:  # rotary embeddings rotate pairs of dimensions
        raise _fail(source, "head_dim", f"is {head_dim}; rotary attention needs an even head size")


def check_stream_tokens(max_tokens: int | None) -> None:
    """``--max-tokens`` of a KV-window perplexity run: None (the whole text) or at least 2 tokens."""
    if max_tokens is not None and max_tokens < 2:
        raise InputError(f"--max-tokens must be at least 2 (a token is scored from the ones before it), got {max_tokens}")


def check_path(value: Any, what: str = "the target") -> None:
    """``value`` is a path (str or os.PathLike); else an :class:`InputError` naming ``what`` (the SDK's
    arguments, so that ``convert(5)`` is not pathlib's TypeError)."""
    import os

    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        raise InputError(f"{what} must be a path or a library name (str or pathlib.Path), got {type(value).__name__}")


def check_type(value: Any, cls: type | tuple[type, ...], what: str, example: str) -> None:
    """``value`` is an instance of ``cls``; else an :class:`InputError` with an ``example`` of one."""
    if not isinstance(value, cls):
        raise InputError(f"{what} must be {example}, got {type(value).__name__}")
