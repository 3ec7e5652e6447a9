"""Quality measurement: perplexity under llama-perplexity's protocol, and agreement with a reference.

Protocol (as llama.cpp's ``llama-perplexity``): the text is tokenized once; it is cut into
non-overlapping chunks of ``ctx`` tokens; each chunk is evaluated from an empty context (its first
token replaced by BOS when the vocabulary adds one) and only the second half is scored, so every
scored token sees at least ``ctx/2`` tokens of context. With a reference model, the same token ids
go through it and the scored positions also give KL(reference || artifact) and top-1 agreement.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit.errors import InputError

if TYPE_CHECKING:
    from edgekit.converters.formats.base import ProgressFn
    from edgekit.runtime.base import Backend


@dataclass(frozen=True)
class EvalConfig:
    """ctx: tokens per chunk (llama-perplexity's -c). chunks: at most this many chunks (None: all)."""

    ctx: int = 512
    chunks: int | None = None

    def __post_init__(self) -> None:
        if self.ctx < 8 or self.ctx % 2:
            raise InputError("--ctx must be an even number >= 8")
        if self.chunks is not None and self.chunks < 1:
            raise InputError("--chunks must be >= 1")


@dataclass
class EvalResult:
    """What an evaluation measured. ``ppl_stderr`` is the standard error of the perplexity estimate."""

    ctx: int
    chunks: int
    tokens_scored: int
    ppl: float
    ppl_stderr: float
    ref_ppl: float | None = None
    kl_mean: float | None = None
    kl_p99: float | None = None
    top1_agreement: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    text_name: str | None = None  # what it was measured on: the text file's name and sha256, and the reference
    text_sha256: str | None = None
    ref: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and v != {}}

    def provenance(self) -> str:
        """What the perplexity was measured on, in a few words (see :func:`provenance_label`)."""
        return provenance_label(self.to_json())


def text_identity(path: str | Path) -> tuple[str, str]:
    """A text file's name and sha256, recorded with every evaluation so a figure names what it measured."""
    from edgekit.fsutil import sha256_file

    p = Path(path).expanduser()
    return p.name, sha256_file(p)


def text_name(e: dict[str, Any]) -> str:
    """The name of the text a recorded evaluation measured (older records keep only its path)."""
    return str(e.get("text_name") or (Path(str(e["text"])).name if e.get("text") else "unnamed text"))


def provenance_label(e: dict[str, Any]) -> str:
    """``valid.txt sha256:3f2a9c1e, 16 chunks x 512, ref SmolLM2-135M`` from a recorded evaluation (older
    records without a hash say so)."""
    name = text_name(e)
    sha = f"sha256:{str(e['text_sha256'])[:8]}" if e.get("text_sha256") else "no hash recorded"
    if e.get("kv_window"):
        shape = f"{e.get('tokens_scored', '?')} tokens through a KV window of {e['kv_window']}"
    else:
        shape = f"{e.get('chunks', '?')} chunks x {e.get('ctx', '?')}"
    ref = f", ref {Path(str(e['ref'])).name}" if e.get("ref") else ""
    return f"{name} {sha}, {shape}{ref}"


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def bos_id(backend: Backend) -> int | None:
    """The BOS id the tokenizer adds, or None when it adds none."""
    with_special = backend.tokenize("a", add_special=True)
    without = backend.tokenize("a", add_special=False)
    return with_special[0] if len(with_special) > len(without) else None


def read_text(path: str | Path) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"{p} does not exist; give a plain-text file with --text")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{p} is not UTF-8 text; give a plain-text file") from exc


def chunk_tokens(tokens: list[int], cfg: EvalConfig) -> list[list[int]]:
    n = len(tokens) // cfg.ctx
    if cfg.chunks is not None:
        n = min(n, cfg.chunks)
    if n == 0:
        raise InputError(
            f"the text has {len(tokens)} tokens, fewer than one chunk of {cfg.ctx}; give more text or a smaller --ctx"
        )
    return [tokens[i * cfg.ctx:(i + 1) * cfg.ctx] for i in range(n)]


def perplexity(
    backend: Backend,
    text: str,
    cfg: EvalConfig = EvalConfig(),
    ref: Backend | None = None,
    progress: ProgressFn | None = None,
) -> EvalResult:
    """Evaluate ``backend`` on ``text``; with ``ref``, also KL divergence and top-1 agreement."""
    tokens = backend.tokenize(text, add_special=True)
    bos = bos_id(backend)
    chunks = chunk_tokens(tokens, cfg)
    first = cfg.ctx // 2
    nll: list[np.ndarray] = []
    ref_nll: list[np.ndarray] = []
    kls: list[np.ndarray] = []
    agree: list[np.ndarray] = []
    for i, chunk in enumerate(chunks):
        if progress:
            progress("evaluating", i, len(chunks))
        if bos is not None:
            chunk = [bos, *chunk[1:]]
        targets = np.asarray(chunk[first + 1:])
        lp = log_softmax(backend.logits(chunk)[first:-1])
        nll.append(-lp[np.arange(len(targets)), targets])
        if ref is not None:
            rlp = log_softmax(ref.logits(chunk)[first:-1])
            ref_nll.append(-rlp[np.arange(len(targets)), targets])
            kls.append((np.exp(rlp) * (rlp - lp)).sum(axis=-1))
            agree.append(rlp.argmax(-1) == lp.argmax(-1))
    if progress:
        progress("evaluating", len(chunks), len(chunks))
    all_nll = np.concatenate(nll)
    mean = float(all_nll.mean())
    # Standard error of exp(mean NLL) by the delta method, as llama-perplexity reports it.
    stderr = math.exp(mean) * float(all_nll.std(ddof=1) / math.sqrt(len(all_nll))) if len(all_nll) > 1 else 0.0
    result = EvalResult(ctx=cfg.ctx, chunks=len(chunks), tokens_scored=len(all_nll), ppl=math.exp(mean),
                        ppl_stderr=stderr)
    if ref is not None:
        kl = np.concatenate(kls)
        result.ref_ppl = math.exp(float(np.concatenate(ref_nll).mean()))
        result.kl_mean = float(kl.mean())
        result.kl_p99 = float(np.percentile(kl, 99))
        result.top1_agreement = float(np.concatenate(agree).mean())
    return result
