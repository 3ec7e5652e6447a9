"""Calibration data for calibrated quantization (GPTQ, AWQ, importance matrices).

``self`` (the default) needs no dataset: sequences are sampled from the float model itself, as
LLM-QAT does, so the statistics describe what the model actually produces. A text file gives
windows of its tokens instead, in a random order and overlapping as little as it allows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError, InputError

_VERSION = 3  # bump when the sampling procedure changes, so cached data is not reused


@dataclass(frozen=True)
class CalibConfig:
    """Where calibration activations come from.

    source: "self" (sample from the float model) or a path to a plain-text file.
    samples: number of sequences. seqlen: tokens per sequence.
    temperature / top_k: sampling for "self" (full-temperature sampling keeps the data diverse;
    top-k cuts the junk tail of the distribution).
    seed: makes the data, and so the conversion, reproducible.
    """

    source: str = "self"
    samples: int = 32
    seqlen: int = 512
    temperature: float = 1.0
    top_k: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seqlen < 16:
            raise InputError("--calib-samples must be >= 1 and --calib-seqlen >= 16")
        if self.source != "self" and not Path(self.source).expanduser().is_file():
            raise InputError(f"--calib {self.source}: no such file; give a plain-text file or 'self'")

    def describe(self) -> dict[str, Any]:
        src = self.source if self.source == "self" else str(Path(self.source).expanduser().resolve())
        return {"source": src, "samples": self.samples, "seqlen": self.seqlen, "seed": self.seed,
                **({"temperature": self.temperature, "top_k": self.top_k} if self.source == "self"
                   else {"windows": "tiled"})}


def _start_token(tokenizer) -> int:
    for tok in (tokenizer.bos_token_id, tokenizer.eos_token_id, 0):
        if tok is not None:
            return int(tok)
    return 0


def self_generated(model, tokenizer, cfg: CalibConfig, progress=None):
    """``cfg.samples`` sequences of ``cfg.seqlen`` tokens sampled from ``model``.

    All sequences advance together against a preallocated (static) KV cache: at this model size a
    decoding step costs about the same for 1 or 32 sequences, and a growing cache would be copied at
    every step.
    """
    import torch
    from transformers import StaticCache

    gen = torch.Generator().manual_seed(cfg.seed)
    n = cfg.seqlen + 1  # the start token is dropped at the end (see below)
    out = torch.full((cfg.samples, n), _start_token(tokenizer), dtype=torch.long)
    cache = StaticCache(config=model.config, max_cache_len=n)
    ids = out[:, :1]
    with torch.inference_mode():
        for t in range(1, n):
            res = model(ids, past_key_values=cache, use_cache=True, cache_position=torch.tensor([t - 1]))
            logits = res.logits[:, -1].float() / cfg.temperature
            if t == 1:  # diverse openings (LLM-QAT samples the first token at random): uniform over the
                # model's 200 likeliest first tokens, so sequences do not share one opening or mode
                top = torch.topk(logits, 200, dim=-1).indices
                ids = top.gather(1, torch.randint(0, 200, (top.shape[0], 1), generator=gen))
            else:  # sample within the top k only: the same distribution, without a 49k-way multinomial
                vals, top = torch.topk(logits, cfg.top_k, dim=-1)
                ids = top.gather(1, torch.multinomial(torch.softmax(vals, -1), 1, generator=gen))
            out[:, t] = ids[:, 0]
            if progress and t % 16 == 0:
                progress("sampling calibration text from the model", t, n)
    # Sequences start on an ordinary token, as evaluation chunks and most of a model's contexts do:
    # position 0 is the attention sink and its statistics depend on which token sits there.
    return out[:, 1:].contiguous()


def from_text(tokenizer, cfg: CalibConfig):
    """``cfg.samples`` windows of ``cfg.seqlen`` tokens from a text file (seeded), as little overlapped as
    the text allows: the text is cut into consecutive windows from a random offset and they are taken in a
    random order; only when more are asked for than it holds does another cut, from another offset, follow.
    (Independent random windows would cover only about 1 - 1/e of a text they could tile once, repeating
    the rest: the same number of sequences then carries less of the text.)"""
    import torch

    text = Path(cfg.source).expanduser().read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < cfg.seqlen + 1:
        raise InputError(f"--calib {cfg.source} has {len(ids)} tokens, fewer than --calib-seqlen {cfg.seqlen}")
    ids = torch.tensor(ids)
    gen = torch.Generator().manual_seed(cfg.seed)
    starts: list[int] = []
    while len(starts) < cfg.samples:
        offset = int(torch.randint(0, min(cfg.seqlen, len(ids) - cfg.seqlen + 1), (1,), generator=gen))
        tiles = range(offset, len(ids) - cfg.seqlen + 1, cfg.seqlen)
        starts += [tiles[i] for i in torch.randperm(len(tiles), generator=gen).tolist()]
    return torch.stack([ids[s:s + cfg.seqlen] for s in starts[:cfg.samples]])


def _read_cached(path: Path, cfg: CalibConfig, n_vocab: int):
    """The cached token ids at ``path`` as an int64 array, or None when the file cannot be read or does not
    hold ``cfg.samples`` x ``cfg.seqlen`` ids below ``n_vocab`` (damaged: a cache miss, rewritten after)."""
    import numpy as np

    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):  # garbage, empty, truncated, or an object (pickle) array
        return None
    if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu" or ids.shape != (cfg.samples, cfg.seqlen):
        return None
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n_vocab):
        return None
    return np.ascontiguousarray(ids, dtype=np.int64)


def calibration_tokens(model, tokenizer, cfg: CalibConfig, progress=None, cache_key: str | None = None):
    """(samples, seqlen) token ids for calibration.

    Self-generated data is kept in edgekit's cache under ``cache_key`` (the source weights' hash):
    the same model and settings give the same tokens, and sampling them is the slow part. An entry that
    cannot be read, or holds the wrong shape or ids outside the model's vocabulary, is a cache miss: it is
    sampled again and replaced (atomically).
    """
    import numpy as np
    import torch

    if cfg.source != "self":
        return from_text(tokenizer, cfg)
    path = None
    if cache_key:
        from edgekit.fsutil import atomic_file, edgekit_home

        tag = hashlib.sha256(json.dumps([cache_key, cfg.describe(), _VERSION]).encode()).hexdigest()[:24]
        path = edgekit_home() / "calib" / f"{tag}.npy"
        if path.exists():
            cached = _read_cached(path, cfg, model.get_input_embeddings().num_embeddings)
            if cached is not None:
                return torch.from_numpy(cached)
    ids = self_generated(model, tokenizer, cfg, progress)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, ids.numpy(), allow_pickle=False)
        except (OSError, EdgekitError) as exc:  # a full or read-only cache only costs the sampling next time
            import warnings

            cause = exc.__cause__ or exc  # the OSError behind atomic_file's one line
            reason = getattr(cause, "strerror", None) or str(cause)
            warnings.warn(f"the calibration tokens could not be cached in {path.parent} ({reason}); going on "
                          "without: free some space there, or set EDGEKIT_HOME to another folder", stacklevel=2)
    return ids
