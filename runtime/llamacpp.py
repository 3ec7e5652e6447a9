"""Run GGUF artifacts with llama.cpp (through llama-cpp-python), in a child process.

llama.cpp is native code, and a native crash (a SIGSEGV from a CPU-feature fault, an abort on a bad
tensor) would take the whole CLI down with no message. So the model lives in a worker process
(``_llamacpp_worker.py``) and this side only talks to it over pipes: JSON lines for control and
streamed text, ``.npy`` files for logits. If the worker dies, :class:`BackendCrashed` says which
signal, while doing what, and how to fix it: a SIGILL names the instructions the build uses that this
CPU lacks (``llamacpp_build.explain_sigill``); a protection fault (SIGSEGV/SIGBUS) while loading or on
the first decode is retried once in safe CPU mode (no repacked/AMX weight buffers) with a warning.
``EDGEKIT_LLAMACPP_LOG=1`` shows llama.cpp's log; ``EDGEKIT_LLAMACPP_WRAPPER`` runs the worker under
another program (``qemu-x86_64 -cpu Haswell``, ``valgrind``).

One call at a time per backend (with ``n_seq`` > 1, that many generations): a call from another thread while
one is running raises :class:`BackendError`.
"""

from __future__ import annotations

import collections
import importlib.util
import itertools
import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import (
    BackendCrashed,
    InputError,
    MissingDependencyError,
)
from edgekit.runtime import hostinfo, llamacpp_build
from edgekit.runtime._llamacpp_process import EOF as _EOF
from edgekit.runtime._llamacpp_process import WorkerProcess
from edgekit.runtime.base import (
    Backend,
    GenerationStats,
    SamplingConfig,
    check_whole_numbers,
    register_backend,
    token_ids,
)
from edgekit.runtime.llamacpp_decoding import check_window_trained, decoding_options
from edgekit.runtime.llamacpp_errors import LOG_ENV
from edgekit.runtime.llamacpp_memory import LlamaCppMemory


@register_backend("llamacpp")
class LlamaCppBackend(WorkerProcess, LlamaCppMemory, Backend):
    """A GGUF model loaded by llama.cpp in a worker process.

    ``n_ctx``: context length in tokens. ``n_threads``: CPU threads (None: the physical cores, fewer when
    other programs keep them busy; :func:`.hostinfo.pick_threads`).
    ``n_gpu_layers``: layers to offload (-1: all). ``n_batch``: prompt/logits batch size.
    ``verbose``: show llama.cpp's log on stderr (otherwise only its last lines appear in errors; None:
    as ``EDGEKIT_LLAMACPP_LOG`` says).
    ``safe_cpu``: load without the extra (repacked, AMX) weight buffers - slower, avoids CPU-feature
    faults. ``retry_safe``: after a crash while loading or on the first decode, retry once with
    ``safe_cpu``. ``on_warning``: called with one-line warnings (default: :func:`warnings.warn`).
    ``tensor_overrides``: ``(regex, buffer type)`` pairs, llama.cpp's ``-ot`` (e.g. ``("ffn_.*", "CPU")``
    keeps matching tensors in host memory when layers are offloaded).
    ``draft``: a smaller GGUF (artifact folder or file) with the same vocabulary: speculative decoding,
    lossless (:mod:`.speculative`). ``speculative``: ``"draft"`` (implied by ``draft``) or ``"ngram"``
    (prompt lookup, no second model). ``n_draft``: a fixed draft length (default: adaptive).
    ``kv_window`` / ``kv_sinks``: keep at most ``kv_window`` tokens in the KV cache, the first ``kv_sinks``
    always (attention sinks) and the most recent ones: generation and chats go on past the window in
    bounded memory; the context allocated is the window. ``kv_evict_step``: tokens dropped at once when
    the window is full (default window/32; llama.cpp's own context shift drops half).
    ``n_seq``: generations decoded together in one batch (continuous batching, as llama-server's parallel
    slots; each has ``n_ctx`` tokens of its own). With ``n_seq`` > 1, ``generate`` may be called from up to
    that many threads at once (more wait in the worker's queue); the other calls stay one at a time.
    ``exact_batch``: each sequence in a KV stream of its own, so that with flash attention a batched greedy
    answer is the answer decoded alone (bit for bit where the weights' kernels allow); about half the speed
    of the default shared (unified) cache once sequences come and go, as a server's do.
    ``experts``: experts run per token by a mixture-of-experts file (a count or ``"all"``; a ``--sparse-ffn``
    file's cold clusters), instead of the file's own count (:func:`.llamacpp_decoding.experts_options`).
    Other keyword arguments go to ``llama_cpp.Llama`` unchanged (JSON-serialisable values only).
    """

    name = "llamacpp"
    formats = ("gguf",)
    preference = 0
    incremental = True

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        n_batch: int = 512,
        verbose: bool | None = None,
        safe_cpu: bool = False,
        retry_safe: bool = True,
        on_warning: Callable[[str], None] | None = None,
        tensor_overrides: Sequence[tuple[str, str]] = (),
        draft: str | Path | None = None,
        speculative: str | None = None,
        n_draft: int | None = None,
        kv_window: int | None = None,
        kv_sinks: int = 4,
        kv_evict_step: int | None = None,
        n_seq: int = 1,
        exact_batch: bool = False,
        experts: int | str | None = None,
        **extra: Any,
    ) -> None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise MissingDependencyError(
                "llama-cpp-python is not installed (needed to run GGUF files); "
                f"install it with: {llamacpp_build.rebuild_command()}"
            )
        check_whole_numbers({"n_ctx": n_ctx, "n_threads": n_threads, "n_gpu_layers": n_gpu_layers, "n_batch": n_batch,
                             "n_draft": n_draft, "kv_window": kv_window, "kv_sinks": kv_sinks,
                             "kv_evict_step": kv_evict_step, "n_seq": n_seq})
        self.model_path = Path(model_path)
        if not self.model_path.exists():
            raise InputError(f"model file not found: {self.model_path}")
        if not self.model_path.is_file():
            raise InputError(f"expected a .gguf file, got a directory: {self.model_path}")
        if n_ctx <= 0 or n_batch <= 0 or n_seq <= 0:
            raise InputError("n_ctx, n_batch and n_seq must be > 0")
        if experts is not None:  # run -O experts=8, edgekit chat --experts: as run --experts
            from edgekit.runtime.llamacpp_decoding import experts_options

            over = experts_options(self.model_path, experts)["kv_overrides"]
            extra = {**extra, "kv_overrides": {**(extra.get("kv_overrides") or {}), **over}}
        try:
            json.dumps(extra)
        except TypeError as exc:
            raise InputError(f"llama.cpp options must be plain values: {exc}") from None
        from edgekit.runtime.llamacpp_decoding import check_llama_options

        extra = check_llama_options(extra)
        self._on_warning = on_warning
        self._config = {
            "model_path": str(self.model_path.resolve()),
            "n_ctx": int(n_ctx),
            # llama-cpp-python's own default is half the logical CPUs for generation and all of them for
            # prompts: on a busy machine the prompt's threads take turns and stall (TTFT of seconds).
            "n_threads": hostinfo.thread_count(n_threads, self._warn),
            "n_gpu_layers": int(n_gpu_layers),
            "n_batch": int(n_batch),
            "tensor_overrides": [[str(p), str(b)] for p, b in tensor_overrides],
            "extra": extra,
            "speculative": decoding_options(draft, speculative, n_draft, kv_window, kv_sinks, kv_evict_step),
            "n_seq": int(n_seq),
            "exact_batch": bool(exact_batch),
        }
        spec = self._config["speculative"]
        check_window_trained([self.model_path, *([Path(spec["draft_path"])] if "draft_path" in spec else [])],
                             kv_window)
        self.slots = int(n_seq)  # generations this instance decodes at once
        self._routes: dict[int, queue.Queue[Any]] = {}  # n_seq > 1: each generation's own messages
        self._routes_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self.verbose = verbose if verbose is not None else os.environ.get(LOG_ENV, "") not in ("", "0")
        self.safe_cpu = safe_cpu
        self.retry_safe = retry_safe
        self._proc: subprocess.Popen[bytes] | None = None
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=60)
        self._threads: list[threading.Thread] = []
        self._ids = itertools.count(1)
        self._active: int | None = None  # id of the generation now streaming (paused or not)
        self._busy: threading.Thread | None = None  # the thread inside a call (or a generation's next()) now
        self._claim_lock = threading.Lock()  # checks and sets the two above in one step
        self._decoded = False  # a decode has succeeded in this worker (no more safe-mode retries)
        self._tmpdir: str | None = None
        self._info: dict[str, Any] = {}
        self._gone = "it is closed"  # why there is no worker, for calls made after close or a crash
        self.load_time = 0.0
        try:
            self._start_with_retry()
        except BaseException:
            self.close()
            raise

    # -- public API ---------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return int(self._info["n_vocab"])

    @property
    def n_ctx(self) -> int:
        return int(self._info["n_ctx"])

    @property
    def info(self) -> dict[str, Any]:
        """What the worker reported on load: llama.cpp version, system info, safe mode, BOS/EOS ids, ..."""
        return {k: v for k, v in self._info.items() if k != "metadata"}

    @property
    def pid(self) -> int | None:
        """The worker process's id (its memory is the model's), or None when it is not running."""
        return self._proc.pid if self._proc is not None else None

    def memory(self) -> dict[str, int]:
        """The worker's resident set size now and its peak (bytes) since it started or, where the kernel allows
        it, since its last ``bench`` began (each test's peak is its own)."""
        return dict(self._call("memory", "reading memory use"))

    def reset(self) -> None:
        self._call("reset", "clearing the KV cache")

    def decode(self, tokens: list[int]) -> None:
        self._call("decode", "decoding", tokens=[int(t) for t in tokens])
        self._decoded = True

    def bench(
        self,
        n_prompt: int,
        n_gen: int,
        n_depth: int = 0,
        *,
        reps: int = 5,
        warmup: bool = True,
        seed: int = 0,
        rapl: Sequence[tuple[str, int]] = (),
        on_rep: Callable[[dict[str, Any]], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """Run llama-bench's timing loop inside the worker (no IPC inside a timed region).

        Returns ``{"reps": [{"seconds", "ttft", "peak_rss", "joules"}...], "cancelled": bool,
        "peak_rss": int}``; ``on_rep`` sees each repetition as it ends; ``cancel()`` returning True
        stops the worker within one decode.
        """
        with self._exclusive():
            return self._bench(n_prompt, n_gen, n_depth, reps, warmup, seed, rapl, on_rep, cancel)

    def _bench(self, n_prompt: int, n_gen: int, n_depth: int, reps: int, warmup: bool, seed: int,
               rapl: Sequence[tuple[str, int]], on_rep: Callable[[dict[str, Any]], None] | None,
               cancel: Callable[[], bool] | None) -> dict[str, Any]:
        rid = next(self._ids)
        self._send({"op": "bench", "id": rid, "n_prompt": int(n_prompt), "n_gen": int(n_gen),
                    "n_depth": int(n_depth), "reps": int(reps), "warmup": bool(warmup), "seed": int(seed),
                    "rapl": [[str(p), int(m)] for p, m in rapl]})
        reps_out: list[dict[str, Any]] = []
        cancel_sent = False
        try:
            while True:
                try:
                    msg = self._inbox.get(timeout=0.1)
                except queue.Empty:
                    if cancel is not None and not cancel_sent and cancel():
                        self._send({"op": "cancel", "id": rid})
                        cancel_sent = True
                    continue
                if msg is _EOF:
                    raise self._crashed("profiling")
                if msg.get("id") not in (rid, None):
                    continue
                if msg["ev"] == "rep":
                    self._decoded = True
                    rep = {k: msg.get(k) for k in ("seconds", "ttft", "peak_rss", "joules")}
                    reps_out.append(rep)
                    if on_rep is not None:
                        on_rep(rep)
                elif msg["ev"] == "done":
                    return {"reps": reps_out, "cancelled": bool(msg.get("cancelled")),
                            "peak_rss": msg.get("peak_rss")}
                elif msg["ev"] == "error":
                    raise self._error_from(msg, "profiling")
        except KeyboardInterrupt:
            # Ctrl-C: stop the worker's loop, then let the caller keep what finished.
            self._send({"op": "cancel", "id": rid})
            raise

    def metadata(self) -> dict[str, str]:
        """The GGUF metadata as llama.cpp reads it (values as strings; arrays summarised)."""
        return dict(self._info.get("metadata", {}))

    def tokenize(self, text: str, add_special: bool = True, special: bool = True) -> list[int]:
        return list(self._call("tokenize", "tokenizing", text=text, add_special=add_special, special=special))

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt ids ``generate(messages)`` evaluates: the GGUF's chat template with its own markers
        as control tokens and the messages' text tokenized as plain text (special tokens typed in a
        message stay text)."""
        return list(self._call("chat_tokens", "applying the chat template", messages=_messages(messages)))

    def detokenize(self, tokens: list[int], special: bool = False) -> str:
        """Text of ``tokens``; ``special`` also renders control tokens such as ``<|im_end|>``."""
        return str(self._call("detokenize", "detokenizing", tokens=token_ids(tokens, self.n_vocab), special=special))

    def logits(self, tokens: list[int]) -> np.ndarray:
        tokens = token_ids(tokens, self.n_vocab)
        if not tokens:
            raise InputError("logits() needs at least one token")
        if len(tokens) > self.n_ctx:
            raise InputError(
                f"{len(tokens)} tokens do not fit the context of {self.n_ctx}; load with a larger n_ctx"
            )
        while True:
            path = os.path.join(self._tempdir(), f"logits-{next(self._ids)}.npy")
            try:
                self._call("logits", "computing logits", tokens=tokens, path=path)
                arr = np.load(path)
                self._decoded = True
                return np.ascontiguousarray(arr, dtype=np.float32)
            except BackendCrashed as exc:
                if not self._can_retry_safe(exc):
                    raise
                self._restart_safe(exc)
            finally:
                if os.path.exists(path):
                    os.unlink(path)

    def stream_nll(self, tokens: list[int], chunk: int = 64,
                   progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Per-token negative log-likelihood of a long token sequence fed ``chunk`` tokens at a time through
        this backend's KV cache (with ``kv_window``, the window evicts as it goes): (nll of tokens 1..n-1,
        {peak_cells, kv, peak_rss})."""
        with self._exclusive():
            return self._stream_nll(tokens, chunk, progress)

    def _stream_nll(self, tokens: list[int], chunk: int,
                    progress: Callable[[int, int], None] | None) -> tuple[np.ndarray, dict[str, Any]]:
        path = os.path.join(self._tempdir(), f"nll-{next(self._ids)}.npy")
        rid = next(self._ids)
        self._send({"op": "stream_nll", "id": rid, "tokens": [int(t) for t in tokens], "chunk": int(chunk),
                    "path": path})
        try:
            while True:
                msg = self._recv("evaluating a long text", rid)
                if msg["ev"] == "progress":
                    if progress is not None:
                        progress(int(msg["done"]), int(msg["total"]))
                    continue
                if msg["ev"] == "error":
                    raise self._error_from(msg, "evaluating a long text")
                value = msg["value"]
                nll = np.load(path)
                return np.array(nll), {k: v for k, v in value.items() if k != "path"}
        except KeyboardInterrupt:
            self._send({"op": "cancel", "id": rid})
            raise
        finally:
            if os.path.exists(path):
                os.unlink(path)

    def generate(
        self,
        prompt: str | list[dict[str, str]],
        sampling: SamplingConfig,
        stats: GenerationStats | None = None,
    ) -> Iterator[str]:
        """Stream text pieces; a list of messages goes through the GGUF's own chat template.

        Nothing runs until the first piece is asked for. Closing the iterator early stops the
        generation in the worker, which is then ready for the next call. With ``n_seq`` 1 a backend runs
        one call at a time: another call, from any thread, ends a generation still streaming whose consumer is
        not pulling it (paused or abandoned; its ``stats.stop_reason`` is ``"cancelled"`` and its next
        ``next()`` ends it); a call from another thread while a call runs, or while a consumer is inside
        ``next()``, raises :class:`BackendError`.
        """
        if isinstance(prompt, str):
            request: dict[str, Any] = {"prompt": prompt}
        else:
            request = {"messages": _messages(prompt)}
        request["sampling"] = {**asdict(sampling), "stop": list(sampling.stop)}
        return self._stream(request, stats if stats is not None else GenerationStats())

    def _stream(self, request: dict[str, Any], stats: GenerationStats) -> Iterator[str]:
        while True:
            inner = self._generate_once(request, stats)
            yielded = False
            try:
                for piece in inner:
                    yielded = True
                    yield piece
                return
            except BackendCrashed as exc:
                if yielded or not self._can_retry_safe(exc):
                    raise
                self._restart_safe(exc)
            finally:
                inner.close()

    # -- generation -----------------------------------------------------------------------------

    def _generate_once(self, request: dict[str, Any], stats: GenerationStats) -> Iterator[str]:
        stats.prompt_tokens = stats.generated_tokens = 0
        stats.time_to_first_token = stats.total_time = 0.0
        stats.stop_reason = ""
        if self.slots > 1:
            yield from self._generate_batched(request, stats)
            return
        rid, t0 = 0, 0.0
        finished = False
        try:
            self._take_over()  # this thread is busy until the yield: another one is refused meanwhile
            rid, t0 = next(self._ids), time.perf_counter()
            self._send({"op": "generate", "id": rid, **request})
            self._active = rid
            while True:
                msg = self._recv("generating text", rid)
                finished = self._on_event(msg, stats, t0)
                if finished:
                    self._active = None
                if msg["ev"] == "error":
                    raise self._error_from(msg, "generating text")
                if msg["ev"] in ("token", "done") and msg["t"]:
                    self._release()  # paused: a call from any thread may now cancel this generation
                    yield msg["t"]
                    if finished:
                        return
                    if not self._resume(rid):  # another call took the worker while we were paused
                        stats.stop_reason = stats.stop_reason or "cancelled"
                        finished = True
                        return
                if finished:
                    return
        finally:
            if not finished and rid and self._active == rid:
                stats.total_time = time.perf_counter() - t0
                stats.stop_reason = stats.stop_reason or "cancelled"
                try:
                    self._take_over(rid)
                except BackendCrashed:
                    pass  # reported by the next call; do not mask the consumer's own exit
            self._release()

    def _generate_batched(self, request: dict[str, Any], stats: GenerationStats) -> Iterator[str]:
        """One of several concurrent generations: its messages come through its own route."""
        rid = next(self._ids)
        route = self._route(rid)
        t0 = time.perf_counter()
        self._send({"op": "generate", "id": rid, **request})
        finished = False
        try:
            while True:
                msg = self._recv_route(route, "generating text")
                finished = self._on_event(msg, stats, t0)
                if msg["ev"] == "error":
                    raise self._error_from(msg, "generating text")
                if msg["ev"] in ("token", "done") and msg["t"]:
                    yield msg["t"]
                if finished:
                    return
        finally:
            if not finished and self._proc is not None:
                stats.total_time = time.perf_counter() - t0
                stats.stop_reason = stats.stop_reason or "cancelled"
                self._send({"op": "cancel", "id": rid})
                try:
                    while self._recv_route(route, "stopping a generation")["ev"] not in ("done", "error"):
                        pass
                except BackendCrashed:
                    pass
            with self._routes_lock:
                self._routes.pop(rid, None)

    def _on_event(self, msg: dict[str, Any], stats: GenerationStats, t0: float) -> bool:
        """Record a generation event in ``stats``; True when it ends the generation."""
        ev = msg["ev"]
        if ev == "start":
            stats.prompt_tokens = int(msg["prompt_tokens"])
            if msg.get("template"):
                stats.extra["chat_template"] = msg["template"]
        elif ev == "token":
            if stats.generated_tokens == 0:
                stats.time_to_first_token = time.perf_counter() - t0
                self._decoded = True
            stats.generated_tokens = int(msg["n"])
        elif ev == "done":
            self._decoded = True
            stats.generated_tokens = int(msg["n"])
            stats.total_time = time.perf_counter() - t0
            stats.stop_reason = msg["stop_reason"]
            stats.extra["worker_time_to_first_token"] = msg["time_to_first_token"]
            stats.extra["worker_total_time"] = msg["total_time"]
            for key in ("speculative", "kv", "batch"):
                if msg.get(key):
                    stats.extra[key] = msg[key]
            if "prompt_cached" in msg:
                stats.extra["prompt_cached"] = int(msg["prompt_cached"])
            if msg.get("context_full"):
                stats.extra["context_full"] = True
        return ev in ("done", "error")


def _messages(prompt: list[dict[str, str]]) -> list[dict[str, str]]:
    messages = [dict(m) for m in prompt]
    if not all(isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
        raise InputError('chat messages must be {"role": str, "content": str} dicts')
    return messages
