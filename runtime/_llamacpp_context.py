"""A llama.cpp context as a :class:`edgekit.runtime.speculative.Context`, with an attention-sink KV window.

Runs inside the llama.cpp worker process (imports llama_cpp and numpy only). The context remembers the
tokens it was filled with, so a new request reuses the common prefix (a chat turn evaluates only the new
message). With ``window`` set, the cache never holds more than ``window`` tokens: before a batch that would
overflow it, the oldest tokens after the first ``sinks`` are removed and the rest shifted down
(``llama_memory_seq_rm`` + ``llama_memory_seq_add``: llama.cpp re-rotates the cached keys), so positions
stay contiguous, as StreamingLLM assigns them. Eviction goes in steps of ``evict_step`` tokens so the
shift is not paid on every token.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.runtime.speculative import sync_context


class ContextFull(ValueError):
    pass


class LlamaContext:
    def __init__(self, llm: Any, window: int | None = None, sinks: int = 4, evict_step: int | None = None,
                 n_ctx: int | None = None) -> None:
        import llama_cpp
        from llama_cpp import _internals

        self.lib = llama_cpp
        self.llm, self.ctx = llm, llm.ctx
        self.n_vocab, self.n_ctx, self.n_batch = llm.n_vocab(), llm.n_ctx(), llm.n_batch
        if n_ctx is not None:  # llama.cpp rounds a small context up (to 256); the one asked for is the limit
            self.n_ctx = min(self.n_ctx, int(n_ctx))
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        if window is not None:
            if window > self.n_ctx:
                raise ValueError(f"the KV window ({window}) is larger than the context ({self.n_ctx})")
            if sinks < 0 or sinks >= window - 1:
                raise ValueError(f"--kv-sinks must be >= 0 and below the window ({window})")
            if not llama_cpp.llama_memory_can_shift(self.mem):
                raise ValueError("this model's KV cache cannot be shifted (no RoPE); it cannot use a KV window")
        self.window, self.sinks = window, sinks
        self.evict_step = max(1, evict_step if evict_step is not None else (window or 0) // 32)
        self.batch = _internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False)
        self.logical: list[int] = []
        self.reused = 0  # the prefix the last sync kept
        self.dropped = 0  # tokens evicted from just after the sinks
        self.evictions = 0

    # -- state ------------------------------------------------------------------------------------

    @property
    def tokens(self) -> list[int]:
        return self.logical

    @property
    def cells(self) -> int:
        """Tokens held in the cache now."""
        return len(self.logical) - self.dropped

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.mem, True)
        self.logical, self.dropped = [], 0
        self.llm.n_tokens = 0

    def truncate(self, n: int) -> None:
        if n >= len(self.logical):
            return
        if self.dropped and n < self.sinks + self.dropped:
            raise ContextFull("cannot rewind into tokens the KV window has evicted")
        keep = n - self.dropped
        self.lib.llama_memory_seq_rm(self.mem, 0, keep, -1)
        self.logical = self.logical[:n]
        self.llm.n_tokens = self.cells

    def sync(self, tokens: list[int], logits: bool = False) -> np.ndarray | None:
        return sync_context(self, tokens, logits, self.sinks + self.dropped if self.dropped else 0)

    # -- evaluation -------------------------------------------------------------------------------

    def _make_room(self, n_in: int) -> None:
        limit = self.window or self.n_ctx
        over = self.cells + n_in - limit
        if over <= 0:
            return
        if self.window is None:
            raise ContextFull(f"{self.cells + n_in} tokens do not fit the context of {self.n_ctx}")
        evictable = self.cells - self.sinks
        n = min(evictable, max(over, self.evict_step))
        if n < over:
            raise ContextFull(f"a batch of {n_in} tokens does not fit a KV window of {self.window} with "
                              f"{self.sinks} sinks")
        start = self.sinks
        self.lib.llama_memory_seq_rm(self.mem, 0, start, start + n)
        self.lib.llama_memory_seq_add(self.mem, 0, start + n, -1, -n)
        self.dropped += n
        self.evictions += 1

    def room(self) -> int | None:
        if self.window is None:
            return None
        left = self.window - self.cells
        return left if left > 0 else max(1, min(self.evict_step, self.cells - self.sinks))

    def extend(self, tokens: list[int], logits: str = "all") -> np.ndarray | None:
        if not tokens:
            return np.zeros((0, self.n_vocab), np.float32) if logits == "all" else None
        step = self.n_batch if self.window is None else max(1, min(self.n_batch, self.window - self.sinks))
        rows = []
        last = None
        for i in range(0, len(tokens), step):
            chunk = [int(t) for t in tokens[i : i + step]]
            self._make_room(len(chunk))
            self.batch.set_batch(batch=chunk, n_past=self.cells, logits_all=logits == "all")
            rc = self.lib.llama_decode(self.ctx, self.batch.batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            self.logical.extend(chunk)
            self.llm.n_tokens = self.cells
            if logits == "all":
                ptr = self.lib.llama_get_logits(self.ctx)
                rows.append(np.ctypeslib.as_array(ptr, shape=(len(chunk), self.n_vocab)).copy())
            elif logits == "last" and i + step >= len(tokens):
                ptr = self.lib.llama_get_logits_ith(self.ctx, -1)
                last = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        if logits == "all":
            return rows[0] if len(rows) == 1 else np.concatenate(rows)
        return last

    def positions(self) -> tuple[int, int]:
        """(lowest, highest) position the cache holds for the sequence (-1, -1 when empty)."""
        lo = self.lib.llama_memory_seq_pos_min(self.mem, 0)
        hi = self.lib.llama_memory_seq_pos_max(self.mem, 0)
        return int(lo), int(hi)

    def close(self) -> None:
        self.batch.close()


def vocab_fingerprint(llm: Any, samples: int = 512) -> tuple[int, list[str]]:
    """(n_vocab, the text of an even sample of tokens): two models can draft for each other only when
    these agree."""
    n = llm.n_vocab()
    ids = sorted({*np.linspace(0, n - 1, num=min(samples, n)).astype(int).tolist(), llm.token_eos(), llm.token_bos()})
    texts = []
    for i in ids:
        texts.append(llm._model.token_get_text(i) if i >= 0 else "")
    return n, texts

