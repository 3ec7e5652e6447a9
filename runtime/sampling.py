"""Token selection and stop strings in numpy, for backends that compute logits themselves."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from edgekit.runtime.base import SamplingConfig


def stop_cut(text: str, stops: tuple[str, ...]) -> tuple[int | None, int]:
    """(index of the first complete stop string or None, length of text safe to emit now)."""
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    if hits:
        return min(hits), min(hits)
    hold = 0
    for s in stops:  # keep back a tail that could still become a stop string
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return None, len(text) - hold


def next_token_nll(rows: np.ndarray, following: list[int]) -> np.ndarray:
    """Negative log-likelihood of ``following[i]`` under logits row ``i`` (float64 log-softmax); rows past
    the end of ``following`` are ignored."""
    m = len(following)
    z = np.asarray(rows[:m], dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return np.log(np.exp(z).sum(axis=1)) - z[np.arange(m), following]


def distribution(logits: np.ndarray, sampling: SamplingConfig, previous: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The distribution ``pick`` draws from: (token ids, probabilities summing to 1). Repeat penalty, then
    temperature / top-k / min-p / top-p (llama.cpp's order of truncations); greedy is one token with p=1.
    Speculative decoding's acceptance rule compares these for the target and the draft."""
    if sampling.temperature == 0 and (sampling.repeat_penalty == 1.0 or not previous):
        # the argmax of the logits as they are (a float64 copy first: 0.34 ms a call on a 49k vocabulary,
        # which speculative decoding pays for every draft step and every verified row)
        return np.array([int(np.argmax(logits))]), np.ones(1)
    z = np.asarray(logits, dtype=np.float64).copy()
    if sampling.repeat_penalty != 1.0 and previous:
        prev = np.unique(np.asarray(previous))
        v = z[prev]
        z[prev] = np.where(v > 0, v / sampling.repeat_penalty, v * sampling.repeat_penalty)
    if sampling.temperature == 0:
        return np.array([int(np.argmax(z))]), np.ones(1)
    if sampling.top_k:
        k = min(sampling.top_k, z.size)
        idx = np.argpartition(-z, k - 1)[:k]
    else:
        idx = np.arange(z.size)
    zl = z[idx] / sampling.temperature
    p = np.exp(zl - zl.max())
    p /= p.sum()
    if sampling.min_p:
        keep = p >= sampling.min_p * p.max()
        idx, p = idx[keep], p[keep]
    order = np.argsort(-p, kind="stable")
    idx, p = idx[order], p[order]
    if sampling.top_p < 1.0:
        keep = np.cumsum(p) - p < sampling.top_p * p.sum()
        idx, p = idx[keep], p[keep]
    return idx, p / p.sum()


def pick(logits: np.ndarray, sampling: SamplingConfig, rng: np.random.Generator, previous: list[int]) -> int:
    """The next token from ``logits`` (float, (n_vocab,)): greedy, or a draw from :func:`distribution`."""
    idx, p = distribution(logits, sampling, previous)
    return int(idx[0]) if sampling.temperature == 0 else int(rng.choice(idx, p=p))


class TextStream:
    """Generated token ids -> text pieces safe to show as they come: a tail that could still become a
    stop string, or an incomplete UTF-8 character, is held back; the text ends at the first stop string
    (which is not shown). ``decode(ids)`` turns the whole id list into text."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...]) -> None:
        self.decode, self.stops = decode, stops
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> tuple[str, bool]:
        """Add one token: (text to show now, whether a stop string ended the text)."""
        self.ids.append(token)
        text = self.decode(self.ids)
        stop_at, safe = stop_cut(text, self.stops)
        if stop_at is not None:
            piece = text[self.emitted : stop_at] if stop_at > self.emitted else ""
            self.emitted = max(self.emitted, stop_at)
            return piece, True
        if safe > self.emitted and not text.endswith("\ufffd"):
            piece, self.emitted = text[self.emitted : safe], safe
            return piece, False
        return "", False

    def rest(self, cut: bool = False) -> str:
        """What is still held back, once generation ended without a stop string. ``cut``: it was cut short
        (max_tokens), maybe inside a character, whose first bytes decode to a trailing U+FFFD: that is
        dropped, not shown (a U+FFFD followed by more text, the model's own, stays)."""
        text = self.decode(self.ids)
        piece, self.emitted = text[self.emitted :], max(self.emitted, len(text))
        return piece.rstrip("\ufffd") if cut else piece


def stream_tokens(tokens: Iterator[int], eos: set[int], stream: TextStream, stats: Any, budget: int,
                  t0: float) -> Iterator[str]:
    """Text pieces of generated token ids as they are safe to show: stop on EOS / a stop string / ``budget``
    tokens (the next token is not asked for then). Fills ``stats`` (a GenerationStats): time to first
    token, generated tokens, stop reason."""
    stats.stop_reason = "length"
    for tok in tokens:
        if not stream.ids:
            stats.time_to_first_token = time.perf_counter() - t0
        if tok in eos:
            stats.stop_reason = "eos"
            break
        piece, stopped = stream.push(tok)
        stats.generated_tokens = len(stream.ids)
        if piece:
            yield piece
        if stopped:
            stats.stop_reason = "stop"
            break
        if len(stream.ids) >= budget:
            break
    if stats.stop_reason != "stop" and (tail := stream.rest(cut=stats.stop_reason == "length")):
        yield tail


def decode_loop(logits: Any, step: Callable[[int], Any], choose: Callable[[Any, list[int]], int], eos: set[int],
                stream: TextStream, stats: Any, budget: int, t0: float) -> Iterator[str]:
    """The shared generation loop: ``choose`` a token from ``logits``, then ``step(token)`` for the next
    logits, only while :func:`stream_tokens` asks for more."""

    def tokens() -> Iterator[int]:
        z = logits
        while True:
            tok = choose(z, stream.ids)
            yield tok
            z = step(tok)

    yield from stream_tokens(tokens(), eos, stream, stats, budget, t0)
