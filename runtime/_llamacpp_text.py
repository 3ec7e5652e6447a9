"""What the llama.cpp worker sends for one generation: each token's text, cut at stop strings, then why it
ended. Runs inside the worker process (imports llama_cpp only when a token is checked for end-of-generation).
"""

from __future__ import annotations

import codecs
import time
from typing import Any


class StopFilter:
    """Cuts streamed text at the first stop string, holding back any tail that may begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was hit (the rest is then dropped)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextOut:
    """What one generation sends: each token's text (cut at stop strings), then ``done`` with why it ended."""

    def __init__(self, worker: Any, rid: Any, s: dict[str, Any], max_new: int, t0: float) -> None:
        self.worker, self.rid, self.max_new, self.t0 = worker, rid, max_new, t0
        self.max_tokens = int(s["max_tokens"])
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.stopper = StopFilter(list(s.get("stop") or ()))
        self.n, self.t_first = 0, 0.0

    def push(self, tok: int) -> str | None:
        """Send ``tok``; the reason the generation ends with it (None: it goes on)."""
        import llama_cpp

        w = self.worker
        if w.is_cancelled(self.rid):
            return "cancelled"
        if llama_cpp.llama_vocab_is_eog(w.vocab, tok):
            return "eos"
        self.n += 1
        if self.n == 1:
            self.t_first = time.perf_counter() - self.t0
        out, hit = self.stopper.feed(self.decoder.decode(w.piece(tok)))
        w.send(ev="token", id=self.rid, t=out, n=self.n)
        if hit:
            return "stop"
        if self.n >= self.max_new:
            return "length"
        return "cancelled" if w.is_cancelled(self.rid) else None

    def done(self, reason: str, **extra: Any) -> None:
        if reason in ("length", "cancelled"):
            # cut short, maybe inside a character: its first bytes are dropped, not shown as U+FFFD (bytes
            # the model ended with at its own end of sequence are its answer, replacement and all)
            self.decoder.reset()
            tail = self.stopper.flush()
        else:
            tail = "" if reason == "stop" else self.stopper.feed(self.decoder.decode(b"", final=True))[0] + self.stopper.flush()
        self.worker.send(ev="done", id=self.rid, t=tail, n=self.n, stop_reason=reason,
                         context_full=reason == "length" and self.max_new < self.max_tokens,
                         time_to_first_token=self.t_first, total_time=time.perf_counter() - self.t0, **extra)
        self.worker.cancel_ids.discard(self.rid)
