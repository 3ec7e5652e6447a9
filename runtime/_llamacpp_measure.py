"""The llama.cpp worker's measuring operations (:mod:`edgekit.runtime._llamacpp_worker` hosts them):
llama-bench's tests timed inside the process, per-token NLL of a long text through the KV window, and
full logits of a sequence; with the cache reset they share. A mixin of the worker's ``Worker``: it reads
the worker's loaded model (``llm``, ``vocab``, ``n_batch``, ``seq``) and replies through its ``send``.
Imported by the worker script, so it imports only light modules."""

from __future__ import annotations

import errno
import os
import time
from typing import Any

from edgekit.runtime._llamacpp_native import peak_rss_bytes, rapl_joules, read_rapl, reset_peak_rss

NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


class TempSpaceError(OSError):
    """The temporary folder has no room for an array the parent asked for (the parent reports it as a full
    disk, not a crash)."""


def open_npy(path: str, shape: tuple[int, ...], what: str) -> Any:
    """A float32 ``.npy`` memory map at ``path`` with its blocks reserved up front. A sparse file on a full
    tmpfs faults (SIGBUS) on the first page the filesystem cannot back, which reads as a llama.cpp crash;
    reserving first turns that into a :class:`TempSpaceError` that names the folder and the fix."""
    import numpy as np

    try:
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        _reserve(path)
        return arr
    except OSError as exc:
        if exc.errno not in NO_ROOM:
            raise
        try:
            os.unlink(path)
        except OSError:
            pass
        raise TempSpaceError(no_room_message(path, shape, what)) from None


def _reserve(path: str) -> None:
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno in NO_ROOM:
            raise
        # a filesystem that cannot preallocate (EOPNOTSUPP, EINVAL): the map is filled as before
    finally:
        os.close(fd)


def no_room_message(path: str, shape: tuple[int, ...], what: str) -> str:
    """One line: which temporary folder is full, what did not fit, and the fix."""
    folder = os.path.dirname(os.path.dirname(os.path.abspath(path)))  # above the edgekit-llamacpp-* folder
    need = 4
    for n in shape:
        need *= int(n)
    try:
        st = os.statvfs(folder)
        free = f", {_size(st.f_bavail * st.f_frsize)} free"
    except OSError:
        free = ""
    return (f"the temporary folder {folder} is full: no room for the {_size(need)} of {what}{free}; "
            "free space there or set TMPDIR to a folder with room")


def _size(n: int) -> str:
    value, unit = float(n), "bytes"
    for unit in ("bytes", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            break
        value /= 1000
    return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"


class MeasureOps:
    """``op_bench``, ``op_stream_nll``, ``op_logits`` and ``clear_kv`` of the worker."""

    llm: Any
    vocab: Any
    n_batch: int
    cancel_ids: set[Any]
    seq: Any

    def op_bench(self, msg: dict[str, Any]) -> None:
        """llama-bench's tests: ``pp N`` (N prompt tokens in n_batch chunks on an empty cache), ``tg N``
        (N single-token decodes), ``pp N + tg M``; ``n_depth`` tokens are prefilled first, untimed.
        One ``rep`` event per repetition, then ``done``; a cancel stops within one decode."""
        import random

        import llama_cpp
        import numpy as np

        llm, rid = self.llm, msg["id"]
        ctx = llm.ctx
        n_vocab = llm.n_vocab()
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        bos = llama_cpp.llama_vocab_bos(self.vocab)
        n_prompt, n_gen, n_depth = int(msg.get("n_prompt", 0)), int(msg.get("n_gen", 0)), int(msg.get("n_depth", 0))
        if n_depth + n_prompt + n_gen > self.seq.n_ctx:
            raise ValueError(f"depth {n_depth} + {n_prompt} prompt + {n_gen} generated tokens do not fit the "
                             f"context of {self.seq.n_ctx}; load with a larger n_ctx")
        rng = random.Random(int(msg.get("seed", 0)))
        rapl = [(str(p), int(m)) for p, m in msg.get("rapl") or ()]
        token_buf = (llama_cpp.llama_token * max(self.n_batch, 1))()

        def decode(tokens: list[int]) -> None:
            for i in range(0, len(tokens), self.n_batch):
                chunk = tokens[i : i + self.n_batch]
                token_buf[: len(chunk)] = chunk
                rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(token_buf, len(chunk)))
                if rc != 0:
                    raise RuntimeError(f"llama_decode returned {rc}")
            llama_cpp.llama_synchronize(ctx)

        def prompt_tokens(n: int, first: bool) -> list[int]:
            toks = [rng.randrange(n_vocab) for _ in range(n)]
            if first and add_bos and bos >= 0 and toks:
                toks[0] = bos
            return toks

        def gen(n: int) -> None:
            tok = bos if add_bos and bos >= 0 else rng.randrange(n_vocab)
            for _ in range(n):
                if self.is_cancelled(rid):
                    return
                token_buf[0] = tok
                rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(token_buf, 1))
                if rc != 0:
                    raise RuntimeError(f"llama_decode returned {rc}")
                llama_cpp.llama_synchronize(ctx)
                tok = rng.randrange(n_vocab)

        # each test's peak is its own, not an earlier test's in this worker (where the kernel allows a reset)
        reset_peak_rss()
        if msg.get("warmup", True):
            self.clear_kv()
            if n_prompt:
                decode(prompt_tokens(min(self.n_batch, n_prompt, 32), True))
            if n_gen:
                gen(1)
        done = 0
        for rep in range(int(msg.get("reps", 1))):
            if self.is_cancelled(rid):
                break
            self.clear_kv()
            if n_depth:
                decode(prompt_tokens(n_depth, True))
            toks = prompt_tokens(n_prompt, not n_depth)
            e0 = read_rapl(rapl)
            t0 = time.perf_counter()
            ttft = None
            if n_prompt:
                decode(toks)
                if n_gen:  # TTFT includes picking the first token (greedy)
                    int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))))
                ttft = time.perf_counter() - t0
            gen(n_gen)
            seconds = time.perf_counter() - t0
            e1 = read_rapl(rapl)
            if self.is_cancelled(rid):
                break
            done += 1
            self.send(ev="rep", id=rid, rep=rep, seconds=seconds, ttft=ttft, peak_rss=peak_rss_bytes(),
                      joules=rapl_joules(e0, e1, rapl))
        self.clear_kv()
        self.send(ev="done", id=rid, reps=done, cancelled=self.is_cancelled(rid), peak_rss=peak_rss_bytes())
        self.cancel_ids.discard(rid)

    def op_stream_nll(self, msg: dict[str, Any]) -> None:
        """Negative log-likelihood of each token of a long text evaluated in ``chunk``-token steps through the
        loaded KV window (or the plain context): how a long chat sees its history. Written to ``path``."""
        from edgekit.runtime.sampling import next_token_nll

        tokens = [int(t) for t in msg["tokens"]]
        chunk = max(1, int(msg.get("chunk", 64)))
        rid = msg.get("id")
        self.seq.clear()
        nll = open_npy(msg["path"], (max(len(tokens) - 1, 0),), "per-token losses")
        peak_cells = 0
        try:
            for i in range(0, len(tokens) - 1, chunk):
                if self.is_cancelled(rid):
                    break
                part = tokens[i : i + chunk]
                rows = self.seq.extend(part, "all")
                peak_cells = max(peak_cells, self.seq.cells)
                nxt = tokens[i + 1 : i + 1 + len(part)]
                m = len(nxt)
                nll[i : i + m] = next_token_nll(rows, nxt)
                if (i // chunk) % 16 == 0:
                    self.send(ev="progress", id=rid, done=i + m, total=len(tokens) - 1)
            nll.flush()
        finally:
            del nll
            state = self.kv_state()
            self.seq.clear()
        self.send(ev="result", id=rid, value={"path": msg["path"], "peak_cells": peak_cells, "kv": state,
                                               "peak_rss": peak_rss_bytes()})

    def op_logits(self, msg: dict[str, Any]) -> None:
        import llama_cpp
        import numpy as np
        from llama_cpp import _internals

        llm = self.llm
        tokens = [int(t) for t in msg["tokens"]]
        n, n_vocab, n_ctx = len(tokens), llm.n_vocab(), self.seq.n_ctx
        if n == 0:
            raise ValueError("no tokens to evaluate")
        if n > n_ctx:
            raise ValueError(f"{n} tokens do not fit the context of {n_ctx}; load with a larger n_ctx")
        self.clear_kv()
        out = open_npy(msg["path"], (n, n_vocab), "logits")
        batch = _internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False)
        try:
            for i in range(0, n, self.n_batch):
                chunk = tokens[i : i + self.n_batch]
                batch.set_batch(batch=chunk, n_past=i, logits_all=True)
                llm._ctx.decode(batch)
                ptr = llama_cpp.llama_get_logits(llm.ctx)
                out[i : i + len(chunk)] = np.ctypeslib.as_array(ptr, shape=(len(chunk), n_vocab))
            out.flush()
        finally:
            del out
            batch.close()
            self.clear_kv()
        self.send(ev="result", id=msg.get("id"), value={"path": msg["path"], "shape": [n, n_vocab]})

    def clear_kv(self) -> None:
        """Empty the KV cache and make the next generate start from scratch."""
        import llama_cpp

        llm = self.llm
        seq = getattr(self, "seq", None)
        if seq is not None:
            seq.clear()
            return
        if hasattr(llama_cpp, "llama_memory_clear"):
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
        elif hasattr(llama_cpp, "llama_kv_self_clear"):  # older llama-cpp-python
            llama_cpp.llama_kv_self_clear(llm.ctx)
        else:
            llama_cpp.llama_kv_cache_clear(llm.ctx)
        llm.n_tokens = 0
        if hasattr(llm, "_requires_eval"):
            llm._requires_eval = True
