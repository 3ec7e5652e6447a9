"""An answer cut by max_tokens inside a multi-byte character, as both backends' text streams send it (no
model): the character's first bytes are dropped, not shown as U+FFFD (QA 54, through `edgekit serve`); a
U+FFFD the model wrote, and an incomplete character at the model's own end of sequence, stay as they were."""

from __future__ import annotations

import time

import pytest

from edgekit.runtime.base import GenerationStats
from edgekit.runtime.sampling import TextStream, stream_tokens

GRIN = "😀".encode()  # 4 bytes: a max_tokens cut after the first two leaves half a character
EOS = 99
PIECES = {0: b"ok ", 1: GRIN[:2], 2: GRIN[2:], 3: "\ufffd".encode(), 4: b"x"}


def _stream(tokens: list[int], budget: int) -> tuple[str, str]:
    """ONNX (and Core ML, torch): token ids through TextStream, decoded as byte-level BPE decodes them."""
    stream = TextStream(lambda ids: b"".join(PIECES[i] for i in ids).decode("utf-8", "replace"), ())
    stats = GenerationStats()
    text = "".join(stream_tokens(iter(tokens), {EOS}, stream, stats, budget, time.perf_counter()))
    return text, stats.stop_reason


class _Worker:
    """What TextOut asks of the llama.cpp worker: each token's bytes, cancellation, and what it sends."""

    vocab = None

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.cancel_ids: set = set()

    def piece(self, tok: int) -> bytes:
        return PIECES[tok]

    def is_cancelled(self, rid: object) -> bool:
        return rid in self.cancel_ids

    def send(self, **msg: object) -> None:
        self.sent.append(msg)


def _worker_text(tokens: list[int], max_new: int, monkeypatch, cancel_after: int | None = None) -> tuple[str, str]:
    """GGUF: token ids through the llama.cpp worker's TextOut (llama_cpp's end-of-generation check faked)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from edgekit.runtime._llamacpp_text import TextOut

    monkeypatch.setattr(llama_cpp, "llama_vocab_is_eog", lambda vocab, tok: tok == EOS)
    w = _Worker()
    out = TextOut(w, 1, {"max_tokens": max_new, "stop": []}, max_new, time.perf_counter())
    reason = "length"
    for i, tok in enumerate(tokens):
        if cancel_after is not None and i == cancel_after:
            w.cancel_ids.add(1)
        if end := out.push(tok):
            reason = end
            break
    out.done(reason)
    assert w.sent[-1]["stop_reason"] == reason
    return "".join(m["t"] for m in w.sent), reason


@pytest.mark.parametrize("tokens, budget, want, reason", [
    ([0, 1, 2], 2, "ok ", "length"),  # cut inside the character: its first bytes are dropped
    ([0, 1, 2], 3, "ok 😀", "length"),
    ([0, 3, 4, 1, 2], 4, "ok \ufffdx", "length"),  # the model's own U+FFFD, then the cut
    ([0, 1, EOS], 5, "ok \ufffd", "eos"),  # the model ended there itself: its answer as it was
])
def test_a_cut_inside_a_character_drops_it_onnx(tokens, budget, want, reason):
    assert _stream(tokens, budget) == (want, reason)


@pytest.mark.parametrize("tokens, budget, want, reason", [
    ([0, 1, 2], 2, "ok ", "length"),
    ([0, 1, 2], 3, "ok 😀", "length"),
    ([0, 3, 4, 1, 2], 4, "ok \ufffdx", "length"),
    ([0, 1, EOS], 5, "ok \ufffd", "eos"),
])
def test_a_cut_inside_a_character_drops_it_gguf(tokens, budget, want, reason, monkeypatch):
    assert _worker_text(tokens, budget, monkeypatch) == (want, reason)


def test_a_cancel_inside_a_character_drops_it_gguf(monkeypatch):
    assert _worker_text([0, 1, 2, 4], 10, monkeypatch, cancel_after=2) == ("ok ", "cancelled")
