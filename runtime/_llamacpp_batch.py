"""Continuous batching in the llama.cpp worker: several generations decoded together in one context.

Runs inside the llama.cpp worker process (imports llama_cpp and numpy only). One llama.cpp context holds
``n_seq`` sequences; each may hold ``n_ctx_seq`` tokens. Every :meth:`Batcher.step` builds one ``llama_batch``
from all sequences at once: the last sampled token of each generating sequence, and as many prompt tokens
of newly admitted ones as fit ``n_batch`` (a long prompt is fed over several steps, so it never stalls the
others for long), runs ``llama_decode`` once, and samples the next token of every sequence whose row came
back, with the same sampler as single-sequence generation (:func:`edgekit.runtime.speculative.accept`).
This is how llama.cpp's own server serves parallel slots: the weights are read once per step for all
sequences, so on a CPU, where decoding is memory-bound, N streams cost little more than one.

The KV cache is one pool shared by the sequences (``kv_unified``, the default) or a stream per sequence
(``unified=False``). Measured on the real 135M Q4_K_M model, 8 sequences, 5 requests each arriving as the
last one ends (prefix cache on): 106.5 tok/s shared against 58.4 with streams, whose one-token-per-sequence
steps slowed from 76 to 124 ms as sequences came and went (65.7 ms shared). Streams buy exactness: with flash
attention a sequence's attention then never sees the other sequences' cells, and a greedy answer equals the
answer decoded alone; in the shared pool it is summed in another order and near-ties can go the other way.

A finished sequence's cells are kept: a new request goes to the free sequence whose cached tokens share
the longest prefix with its prompt and evaluates only the rest (llama-server's prompt cache). Chat requests
share the template's system turn, and a client's next turn shares the whole conversation so far.

Batched matrix products are not bit-identical to one-row products on every CPU kernel, so a greedy answer
can differ from the same request decoded alone after some tokens (llama-server's answers do the same).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekit.runtime.base import SamplingConfig
from edgekit.runtime.speculative import accept, common_prefix


@dataclass
class Sequence:
    """One admitted request. ``todo``: prompt tokens not yet in the cache; ``pos``: tokens in the cache."""

    rid: Any
    prompt: list[int]
    sampling: SamplingConfig
    rng: np.random.Generator
    seq_id: int = -1
    todo: list[int] = field(default_factory=list)
    kv: list[int] = field(default_factory=list)  # the tokens in the cache, in order
    last: int | None = None  # the token sampled last, fed at the next step
    generated: list[int] = field(default_factory=list)
    reused: int = 0  # prompt tokens found in the cache


class Batcher:
    """Sequences of up to ``n_seq`` requests at once over ``model``; more wait in a FIFO queue."""

    def __init__(self, model: Any, *, n_seq: int, n_ctx_seq: int, n_batch: int, n_threads: int | None,
                 flash_attn: bool | None = None, unified: bool = True) -> None:
        import llama_cpp

        self.lib = llama_cpp
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_seq * n_ctx_seq
        params.n_batch = params.n_ubatch = max(n_batch, n_seq)
        params.n_seq_max = n_seq
        params.kv_unified = unified
        if n_threads:
            params.n_threads = params.n_threads_batch = int(n_threads)
        if flash_attn is not None and hasattr(params, "flash_attn_type"):
            params.flash_attn_type = 1 if flash_attn else 0
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context of {n_seq} x {n_ctx_seq} tokens "
                               "(out of memory?); lower --parallel or --ctx")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_seq, self.n_ctx_seq, self.n_batch = n_seq, n_ctx_seq, int(params.n_batch)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.free = list(range(n_seq))
        self.cached: dict[int, list[int]] = {i: [] for i in range(n_seq)}  # each free sequence's cells
        self.running: dict[Any, Sequence] = {}
        self.waiting: deque[Sequence] = deque()
        self.steps = 0
        self.decode_seconds = self.sample_seconds = 0.0  # in llama_decode, and choosing tokens

    def active(self) -> bool:
        return bool(self.running or self.waiting)

    def admit(self, seq: Sequence) -> None:
        if len(seq.prompt) >= self.n_ctx_seq:
            raise ValueError(f"the prompt is {len(seq.prompt)} tokens but each sequence holds {self.n_ctx_seq}; "
                             "shorten it or serve with a larger --ctx")
        self.waiting.append(seq)

    def room(self, rid: Any) -> int:
        """Tokens the sequence ``rid`` may still generate before its part of the cache is full."""
        seq = self.running.get(rid) or next(s for s in self.waiting if s.rid == rid)
        return self.n_ctx_seq - len(seq.prompt)

    def release(self, rid: Any, keep: bool = True) -> None:
        """Forget ``rid`` (done or cancelled); its cells stay cached for a later prompt unless ``keep`` is off."""
        seq = self.running.pop(rid, None)
        if seq is None:
            self.waiting = deque(s for s in self.waiting if s.rid != rid)
            return
        if not keep:
            self.lib.llama_memory_seq_rm(self.mem, seq.seq_id, -1, -1)
        self.cached[seq.seq_id] = seq.kv if keep else []
        self.free.append(seq.seq_id)

    def _start(self, seq: Sequence) -> None:
        """Give ``seq`` the free sequence whose cache shares most of its prompt, and drop the rest of it."""
        best = max(self.free, key=lambda i: common_prefix(self.cached[i], seq.prompt))
        self.free.remove(best)
        keep = min(common_prefix(self.cached[best], seq.prompt), len(seq.prompt) - 1)  # the last one gives logits
        self.lib.llama_memory_seq_rm(self.mem, best, keep, -1)
        seq.seq_id, seq.kv, seq.todo, seq.reused = best, seq.prompt[:keep], seq.prompt[keep:], keep
        self.cached[best] = []
        self.running[seq.rid] = seq

    def step(self) -> list[tuple[Any, int]]:
        """One ``llama_decode`` over every sequence; the ``(rid, token)`` pairs sampled by it."""
        while self.waiting and self.free:
            self._start(self.waiting.popleft())
        n = 0
        rows: list[tuple[int, Sequence]] = []
        for seq in self.running.values():  # generating sequences first: one token each, never starved
            if seq.last is not None:
                rows.append((n, seq))
                self._put(n, seq, seq.last, True)
                n += 1
        for seq in self.running.values():  # then prompt chunks, as far as the batch has room
            if seq.todo and n < self.n_batch:
                take = seq.todo[: self.n_batch - n]
                seq.todo = seq.todo[len(take):]
                for j, tok in enumerate(take):
                    want = not seq.todo and j == len(take) - 1
                    if want:
                        rows.append((n, seq))
                    self._put(n, seq, tok, want)
                    n += 1
        if n == 0:
            return []
        self.batch.n_tokens = n
        t0 = time.perf_counter()
        rc = self.lib.llama_decode(self.ctx, self.batch)
        t1 = time.perf_counter()
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for a batch of {n} tokens over {len(self.running)} "
                               "sequences")
        self.steps += 1
        out = []
        for i, seq in rows:
            logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
            _, tok = accept(logits[None, :], [], [], seq.sampling, seq.rng, seq.generated)
            seq.last = tok
            seq.generated.append(tok)
            out.append((seq.rid, tok))
        self.decode_seconds += t1 - t0
        self.sample_seconds += time.perf_counter() - t1
        return out

    def _put(self, i: int, seq: Sequence, token: int, logits: bool) -> None:
        b = self.batch
        b.token[i] = token
        b.pos[i] = len(seq.kv)
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq.seq_id
        b.logits[i] = 1 if logits else 0
        seq.kv.append(token)
