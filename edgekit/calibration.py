"""Calibration data for calibrated quantization (GPTQ, AWQ, importance matrices).

``self`` (the default) needs no dataset: sequences are sampled from the float model itself, as
LLM-QAT does, so the statistics describe what the model actually produces. A text file gives
random windows of its tokens instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import InputError


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
                **({"temperature": self.temperature, "top_k": self.top_k} if self.source == "self" else {})}


def _start_token(tokenizer) -> int:
    for tok in (tokenizer.bos_token_id, tokenizer.eos_token_id, 0):
        if tok is not None:
            return int(tok)
    return 0


def self_generated(model, tokenizer, cfg: CalibConfig, progress=None):
    """``cfg.samples`` sequences of ``cfg.seqlen`` tokens sampled from ``model`` (batched, KV cache)."""
    import torch

    gen = torch.Generator().manual_seed(cfg.seed)
    start = _start_token(tokenizer)
    out = torch.full((cfg.samples, cfg.seqlen), start, dtype=torch.long)
    batch = 16
    with torch.inference_mode():
        for b0 in range(0, cfg.samples, batch):
            rows = slice(b0, min(b0 + batch, cfg.samples))
            ids = out[rows, :1]
            past = None
            for t in range(1, cfg.seqlen):
                res = model(ids, past_key_values=past, use_cache=True)
                past = res.past_key_values
                logits = res.logits[:, -1].float() / cfg.temperature
                kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
                out[rows, t] = nxt[:, 0]
                ids = nxt
                if progress and t % 32 == 0:
                    done = b0 * cfg.seqlen + (rows.stop - b0) * t
                    progress("sampling calibration text from the model", done, cfg.samples * cfg.seqlen)
    return out


def from_text(tokenizer, cfg: CalibConfig):
    """Random windows of ``cfg.seqlen`` tokens from a text file (seeded)."""
    import torch

    text = Path(cfg.source).expanduser().read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < cfg.seqlen + 1:
        raise InputError(f"--calib {cfg.source} has {len(ids)} tokens, fewer than --calib-seqlen {cfg.seqlen}")
    ids = torch.tensor(ids)
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, len(ids) - cfg.seqlen, (cfg.samples,), generator=gen)
    return torch.stack([ids[s:s + cfg.seqlen] for s in starts.tolist()])


def calibration_tokens(model, tokenizer, cfg: CalibConfig, progress=None):
    """(samples, seqlen) token ids for calibration."""
    if cfg.source == "self":
        return self_generated(model, tokenizer, cfg, progress)
    return from_text(tokenizer, cfg)
