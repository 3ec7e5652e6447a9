"""Run ONNX decoder artifacts with onnxruntime: KV-cache generation, chat template, streaming.

The graph is the one :mod:`edgekit.converters.formats.onnx.graph` writes (the Optimum / onnxruntime-
genai input names: ``input_ids``, ``attention_mask``, ``past_key_values.{i}.key/value``; outputs
``logits``, ``present.{i}.key/value``), so other exporters' decoders with those names run too. The
tokenizer and chat template come from the files beside the graph (``tokenizer.json``,
``tokenizer_config.json``); the template is rendered in a sandboxed Jinja environment, as transformers
does. Sampling is numpy (:mod:`.sampling`): no torch at run time.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import BackendError, CorruptFileError, InputError, UnsupportedError, require
from edgekit.native_path import utf8_path_to_load
from edgekit.runtime import hostinfo
from edgekit.runtime._onnx_kv import (
    BoundKV,
    FedKV,
    KVWindow,
    kv_in_place,
    kv_shape,
    rotary_positions,
    rotary_tables,
)
from edgekit.runtime.base import (
    Backend,
    GenerationStats,
    SamplingConfig,
    check_whole_numbers,
    register_backend,
)
from edgekit.runtime.sampling import TextStream, next_token_nll, stream_tokens
from edgekit.runtime.tokenizer import FolderTokenizer, eos_ids

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
GRAPH_OPT = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
             "none": "ORT_DISABLE_ALL"}


@register_backend("onnxruntime")
class OnnxBackend(Backend):
    """An ONNX decoder in an onnxruntime CPU session.

    ``n_ctx``: most tokens the KV cache may hold. ``n_threads``: intra-op threads (None: the physical
    cores, fewer when other programs keep them busy). ``graph_opt``: onnxruntime's graph optimisation level (all, extended, basic, none).
    ``n_batch``: prompt tokens evaluated per run (longer prompts go in chunks).
    ``kv_window`` / ``kv_sinks``: an attention-sink window over the KV cache, as the llama.cpp backend
    keeps it: when a run would exceed ``kv_window`` tokens, the oldest tokens after the first ``kv_sinks``
    leave the cache and the later keys are rotated back by the number removed (the graph's own rotary
    tables), so positions stay contiguous and generation goes on in bounded memory. ``kv_evict_step``:
    tokens dropped at once (default window/32).
    ``speculative="ngram"`` / ``draft`` (an ONNX artifact with the same tokenizer) / ``n_draft``: speculative
    decoding through :mod:`.speculative`'s loop, lossless as in the llama.cpp backend (a graph with int8
    activations, MatMulNBits accuracy level 4, rounds a batch differently from one row, so a near-tie can
    go the other way). ``spin``: whether onnxruntime's threads spin waiting for work: True between runs,
    ``"run"`` only within a run, False never (default: True alone, ``"run"`` with a draft model, whose
    session shares the cores).
    """

    name = "onnxruntime"
    formats = ("onnx",)

    preference = 0
    incremental = True

    @classmethod
    def weight_room(cls, hparams: Any, n_ctx: int, ram_bytes: int) -> tuple[int, dict[str, int]]:
        """Bytes of weights that fit ``ram_bytes`` at ``n_ctx`` (:func:`.memory_onnx.onnx_weight_room`)."""
        from edgekit.runtime.memory_onnx import onnx_weight_room

        return onnx_weight_room(hparams, n_ctx, ram_bytes)

    @classmethod
    def memory_estimate(cls, model_file: Path, n_ctx: int, n_batch: int = 512) -> Any:
        """An onnxruntime CPU session at ``n_ctx`` by part (see :mod:`.memory_onnx`)."""
        from edgekit.runtime.memory_onnx import estimate_onnx_memory

        return estimate_onnx_memory(model_file, n_ctx, n_batch=n_batch)

    @classmethod
    def decode_bytes_per_token(cls, model_file: Path, depth: int, n_ctx: int, type_k: str = "f16",
                               type_v: str = "f16") -> int:
        from edgekit.runtime.memory_onnx import onnx_decode_bytes_per_token

        return int(onnx_decode_bytes_per_token(model_file, depth))

    def __init__(self, model_path: str | Path, *, n_ctx: int = 2048, n_threads: int | None = None,
                 graph_opt: str = "all", n_batch: int = 512, kv_window: int | None = None,
                 kv_sinks: int = 4, kv_evict_step: int | None = None, speculative: str | None = None,
                 draft: str | Path | None = None, n_draft: int | None = None, spin: bool | str | None = None) -> None:
        check_whole_numbers({"n_ctx": n_ctx, "n_threads": n_threads, "n_batch": n_batch, "n_draft": n_draft,
                             "kv_window": kv_window, "kv_sinks": kv_sinks, "kv_evict_step": kv_evict_step})
        ort = require("onnxruntime", "onnx")
        path = Path(model_path)
        if not path.exists():
            raise InputError(f"{path} does not exist")
        if graph_opt not in GRAPH_OPT:
            raise InputError(f"graph_opt must be one of {', '.join(GRAPH_OPT)}")
        if n_ctx <= 0 or n_batch <= 0:
            raise InputError("n_ctx and n_batch must be > 0")
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPT[graph_opt])
        so.intra_op_num_threads = hostinfo.thread_count(n_threads)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        # onnxruntime's worker threads spin between runs: 3-20% faster one-token steps alone. Beside a draft
        # model's session each pool spun while the other worked (2 cores: a 4-token verification 49 ms against
        # 28 ms), and not spinning at all made every run wake its threads for each of its hundreds of parallel
        # ops; so a pair spins within a run and stops when the run ends (session.force_spinning_stop): a
        # drafting cycle of 4 draft steps and a 5-token check 57-61 ms against 67-83 ms without spinning.
        if spin not in (True, False, None, "run"):
            raise InputError(f"spin takes true, false or 'run' (spin within a run only), not {spin!r}")
        paired = spin == "run" or (spin is None and draft is not None)
        if spin is False:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        elif paired:
            so.add_session_config_entry("session.force_spinning_stop", "1")
        t0 = time.perf_counter()
        with utf8_path_to_load(path, "onnxruntime") as native:
            try:
                self.session = ort.InferenceSession(native, so, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own pybind exception types
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CorruptFileError(f"onnxruntime cannot load {path.name}: {first[:300]}; the file is damaged "
                                       "or incomplete: re-run 'edgekit convert'") from exc
        self.load_time = time.perf_counter() - t0
        from edgekit.converters.formats.onnx.read import load_graph

        graph = load_graph(path)
        positions = rotary_positions(graph)
        if positions and n_ctx > positions:  # GroupQueryAttention refuses positions past its rotary tables
            n_ctx = positions
        self.path, self.n_ctx, self.n_batch, self.n_threads = path, n_ctx, n_batch, so.intra_op_num_threads
        inputs = {i.name: i for i in self.session.get_inputs()}
        if "input_ids" not in inputs or "attention_mask" not in inputs:
            raise UnsupportedError(f"{path.name} is not a decoder with input_ids/attention_mask inputs")
        self._past_names = sorted((n for n in inputs if n.startswith("past_key_values.")),
                                  key=lambda n: (int(n.split(".")[1]), n.endswith("value")))
        if not self._past_names:
            raise UnsupportedError(f"{path.name} has no past_key_values inputs; edgekit runs KV-cache decoders")
        self._kv_heads, self._head_dim = kv_shape(inputs[self._past_names[0]].shape, path.parent)
        self._kv_dtype = _ORT_TYPES.get(inputs[self._past_names[0]].type, np.float32)
        self.tokenizer = FolderTokenizer(path.parent)
        self._n_vocab = int(self.session.get_outputs()[0].shape[-1])
        self._eos = self._eos_ids(path.parent)
        self._bos_in_template = False
        self.window: KVWindow | None = None
        if kv_window is not None:
            if positions and int(kv_window) > positions:
                raise InputError(f"--kv-window {kv_window} is longer than the {positions} positions {path.name} covers; "
                                 f"use at most {positions}")
            self.window = KVWindow(int(kv_window), int(kv_sinks), *rotary_tables(path, graph), step=kv_evict_step)
            self.n_ctx = int(kv_window)
            self.n_batch = min(self.n_batch, self.window.size - self.window.sinks)
        # One sequence: a step runs under the lock, and a request that starts (generate, logits, stream_nll)
        # takes the cache over; the generation it replaces ends at its next step (stop_reason "cancelled"), or
        # raises BackendError when another thread replaced it. Two threads on one backend crashed onnxruntime.
        self._lock = threading.Lock()
        self._turn = 0  # bumped by every request that takes the cache over
        self._turn_thread = 0
        self._closed = False
        kv_args = (self.session, self._past_names, self._kv_heads, self._head_dim, self._kv_dtype)
        self._kv: FedKV | BoundKV = (BoundKV(*kv_args, limit=self.n_ctx) if kv_in_place(graph) else FedKV(*kv_args))
        self.reset()
        self._setup_drafting(speculative, draft, n_draft, kv_window, kv_sinks, kv_evict_step, graph_opt)

    # -- Backend API ----------------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def info(self) -> dict[str, Any]:
        info = {"n_ctx": self.n_ctx, "n_threads": self.n_threads, "load_time_s": self.load_time,
                "kv_dtype": np.dtype(self._kv_dtype).name, "n_layer": len(self._past_names) // 2}
        if self.spec_info:
            info["speculative"] = self.spec_info
        return info

    def tokenize(self, text: str, add_special: bool = True, special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special, special)

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt ids ``generate(messages)`` evaluates (special tokens typed in a message stay text)."""
        return self.tokenizer.encode_chat(messages)

    @property
    def _pos(self) -> int:
        return self._kv.pos

    def reset(self) -> None:
        self._kv.reset()
        if self.window is not None:
            self.window.evicted = 0
        if hasattr(self, "_ctx"):  # the cache is empty: a next request has no prefix to reuse
            self._ctx.logical = []

    def decode(self, tokens: list[int]) -> None:
        with self._use():
            self._ctx.extend(list(tokens), logits="none")

    def logits(self, tokens: list[int]) -> np.ndarray:
        if len(tokens) > self.n_ctx:
            raise InputError(f"{len(tokens)} tokens do not fit the context of {self.n_ctx}; load with a larger n_ctx")
        with self._use():
            self.reset()
            parts = [self._run(tokens[i : i + self.n_batch], last_only=False) for i in range(0, len(tokens), self.n_batch)]
            self.reset()
        return np.concatenate(parts).astype(np.float32, copy=False)

    def generate(self, prompt: str | list[dict[str, str]], sampling: SamplingConfig,
                 stats: GenerationStats | None = None) -> Iterator[str]:
        stats = stats if stats is not None else GenerationStats()
        if isinstance(prompt, str):
            ids = self.tokenize(prompt)
        else:
            ids = self.chat_tokens(prompt)
        if not ids:
            raise InputError("the prompt is empty")
        if len(ids) >= self.n_ctx and self.window is None:
            raise InputError(f"the prompt is {len(ids)} tokens but the context holds {self.n_ctx}; shorten it, raise "
                             "--ctx, or keep a window of the history with --kv-window")
        stats.prompt_tokens = len(ids)
        rng = np.random.default_rng(sampling.seed)
        t0 = time.perf_counter()
        stream = TextStream(self.tokenizer.decode, sampling.stop)
        budget = sampling.max_tokens if self.window else min(sampling.max_tokens, self.n_ctx - len(ids))
        yield from self._generate_tokens(ids, sampling, rng, stream, stats, budget, t0)
        stats.total_time = time.perf_counter() - t0
        stats.extra["kv"] = self.kv_state()
        if stats.stop_reason == "length" and budget < sampling.max_tokens:  # the context, not max_tokens, cut it
            stats.extra["context_full"] = True

    def kv_state(self) -> dict[str, Any]:
        w = self.window
        return {"cells": self._pos, "window": w.size if w else None, "sinks": w.sinks if w else None,
                "evicted": w.evicted if w else 0, "n_ctx": self.n_ctx}

    def stream_nll(self, tokens: list[int], chunk: int = 64,
                   progress: Any = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Per-token negative log-likelihood of a long sequence fed ``chunk`` tokens at a time (through the
        KV window when there is one), as :meth:`LlamaCppBackend.stream_nll`."""
        with self._use():
            self.reset()
            nll = np.zeros(max(len(tokens) - 1, 0), np.float32)
            peak = 0
            for i in range(0, len(tokens) - 1, chunk):
                part = tokens[i : i + chunk]
                z = np.concatenate([self._run(part[j : j + self.n_batch], last_only=False)
                                    for j in range(0, len(part), self.n_batch)])
                peak = max(peak, self._pos)
                nxt = tokens[i + 1 : i + 1 + len(part)]
                nll[i : i + len(nxt)] = next_token_nll(z, nxt)
                if progress is not None:
                    progress(i + len(nxt), len(tokens) - 1)
            state = self.kv_state()
            self.reset()
        return nll, {"peak_cells": peak, "kv": state}

    def close(self) -> None:
        """Free the session and the cache (a generation still open ends with a BackendError at its next step)."""
        with self._lock:
            self._closed = True
            self._turn += 1
            self._kv.close()
            self.session = None  # type: ignore[assignment]
            if self.draft_backend is not None:
                self.draft_backend.close()
                self.draft_backend = None

    @contextlib.contextmanager
    def _use(self) -> Iterator[None]:
        """Run a request that takes the cache over (logits, stream_nll, decode), one at a time."""
        with self._lock:
            self._take_over()
            yield

    def _take_over(self) -> int:
        """(Under the lock.) The cache is this request's now: the turn it holds."""
        if self._closed:
            raise BackendError(f"{self.path.name} is closed; open it again (api.open_backend) to use it")
        self._turn += 1
        self._turn_thread = threading.get_ident()
        return self._turn

    def _steps(self, gen: Iterator[int], turn: int, ended: list[str]) -> Iterator[int]:
        """``gen``'s tokens, each step run under the lock while ``turn`` still holds the cache: a request that
        took it over ends this one (``ended``: "cancelled"), with a BackendError when another thread took it."""
        while True:
            with self._lock:
                if self._turn != turn:
                    if self._closed:
                        raise BackendError(f"{self.path.name} was closed while it was generating text")
                    if self._turn_thread != threading.get_ident():
                        raise BackendError("another thread started a request on this backend, which ended this "
                                           "generation: a backend decodes one sequence at a time; give each thread "
                                           "its own backend")
                    ended.append("cancelled")
                    return
                try:
                    tok = next(gen)
                except StopIteration:
                    return
            yield tok

    # -- speculative decoding -------------------------------------------------------------------------

    def _setup_drafting(self, speculative: str | None, draft: str | Path | None, n_draft: int | None,
                        kv_window: int | None, kv_sinks: int, kv_evict_step: int | None, graph_opt: str) -> None:
        """Prompt lookup (``speculative="ngram"``) or a draft ONNX model sharing the tokenizer (``draft``):
        the loop of :mod:`.speculative`, as in the llama.cpp worker. onnxruntime verifies a few tokens for
        little more than one (its per-call cost dominates a small model's step), so drafting pays more
        here than on llama.cpp's CPU kernels. The costs are measured once, at load."""
        from edgekit.runtime.speculative import ModelDrafter, NgramDrafter, drafting_mode

        self.drafter: Any = None
        self.draft_backend: OnnxBackend | None = None
        self.spec_info: dict[str, Any] = {}
        self.costs: Any = None
        mode = drafting_mode(draft, speculative, n_draft)
        self.n_draft = int(n_draft) if n_draft is not None else None
        self._ctx = OnnxContext(self)
        if mode is None:
            return
        if mode == "ngram":
            self.drafter = NgramDrafter()
        else:
            if draft is None:
                raise InputError("speculative decoding with a draft model needs --draft MODEL (a smaller ONNX "
                                 "artifact with the same tokenizer)")
            self.draft_backend = OnnxBackend(draft_model_file(draft), n_ctx=self.n_ctx,
                                             n_threads=self.n_threads, graph_opt=graph_opt, n_batch=self.n_batch,
                                             kv_window=kv_window, kv_sinks=kv_sinks, kv_evict_step=kv_evict_step,
                                             spin="run")
            if _vocab_fingerprint(self.draft_backend) != _vocab_fingerprint(self):
                self.draft_backend.close()
                raise InputError("the draft model's vocabulary differs from the target's; a draft must share the "
                                 "target's tokenizer (convert it from the same checkpoint)")
            self.drafter = ModelDrafter(self.draft_backend._ctx)
            self.spec_info["draft_path"] = str(draft)
        self.spec_info.update(mode=self.drafter.name, costs=self._measure_costs().to_json())

    def _measure_costs(self, prompt: list[int] | None = None) -> Any:
        """Time the graph's steps by width (and the draft model's step), for the adaptive draft length:
        after ``prompt`` where it fits (left in the cache for its request), else after random ids."""
        from edgekit.runtime.draft_length import measure_for

        self.costs = measure_for(self._ctx, self.draft_backend._ctx if self.draft_backend is not None else None,
                                 prompt or [], self.window.size if self.window is not None else self.n_ctx, self.n_vocab)
        return self.costs

    def _generate_tokens(self, ids: list[int], sampling: SamplingConfig, rng: np.random.Generator,
                         stream: TextStream, stats: GenerationStats, budget: int, t0: float) -> Iterator[str]:
        """The token loop of :mod:`.speculative` over the cache, as the llama.cpp worker runs it: one target step
        per token, or drafted; the cache keeps what the last request evaluated, so a chat turn whose prompt
        repeats the history evaluates only the new message. Plain and drafted decoding fill and evict the KV
        window at the same points, so with a window too drafting gives plain decoding's greedy text."""
        from edgekit.runtime.speculative import SpecStats, control_for, for_prediction, generate_tokens

        spec = SpecStats()
        drafter, control = self.drafter, control_for(self.drafter, self.costs, self.n_draft)
        with self._lock:
            turn = self._take_over()
            if sampling.prediction:  # drafts from the request's predicted output, whatever the load options
                drafter, control = for_prediction(self.tokenize(sampling.prediction, add_special=False),
                                                  self.costs or self._measure_costs(ids), self.n_draft)
        gen = generate_tokens(self._ctx, ids, sampling, rng, budget, lambda t: t in self._eos,
                              drafter=drafter, control=control, stats=spec)
        ended: list[str] = []
        try:
            yield from stream_tokens(self._steps(gen, turn, ended), self._eos, stream, stats, budget, t0)
        finally:
            gen.close()
            if ended:
                stats.stop_reason = ended[0]
            stats.extra["prompt_cached"] = spec.prompt_cached
            if spec.mode != "none":
                stats.extra["speculative"] = spec.to_json()

    # -- internals ------------------------------------------------------------------------------------

    def _run(self, tokens: list[int], last_only: bool) -> np.ndarray:
        n = len(tokens)
        if self.window is not None and self._pos + n > self.window.size:
            self._kv.replace(self.window.evict(self._kv.views(), self._pos + n - self.window.size))
        if self._pos + n > self.n_ctx:
            raise InputError(f"the context of {self.n_ctx} tokens is full; raise --ctx")
        try:
            logits = self._kv.run(tokens)
        except Exception as exc:
            raise BackendError(f"onnxruntime failed while evaluating {n} tokens: {str(exc).splitlines()[0][:300]}") from exc
        # a copy: a view of the last row would keep the whole chunk's logits (n_batch x vocab floats, 100 MB for
        # SmolLM2 at 512) alive while the next chunk computes its own
        return logits[-1:].copy() if last_only else logits

    def _eos_ids(self, folder: Path) -> set[int]:
        return eos_ids(folder, self.tokenizer)


class OnnxContext:
    """The speculative loop's view of an :class:`OnnxBackend`'s KV cache (:class:`.speculative.Context`):
    the tokens it holds, evaluating more, and rewinding (rejected drafts) by slicing the past key/values."""

    def __init__(self, backend: OnnxBackend) -> None:
        self.backend = backend
        self.logical: list[int] = []
        self.reused = 0  # the prefix the last sync kept

    @property
    def tokens(self) -> list[int]:
        return self.logical

    def _evicted(self) -> tuple[int, int]:
        w = self.backend.window
        return (w.evicted, w.sinks) if w is not None else (0, 0)

    def clear(self) -> None:
        self.backend.reset()
        self.logical = []

    def truncate(self, n: int) -> None:
        if n >= len(self.logical):
            return
        dropped, sinks = self._evicted()
        if dropped and n < sinks + dropped:
            raise InputError("cannot rewind into tokens the KV window has evicted")
        self.backend._kv.truncate(n - dropped)
        self.logical = self.logical[:n]

    def room(self) -> int | None:
        w = self.backend.window
        if w is None:
            return None
        cells = len(self.logical) - w.evicted
        left = w.size - cells
        return left if left > 0 else max(1, min(w.step, cells - w.sinks))

    def extend(self, tokens: list[int], logits: str = "all") -> np.ndarray | None:
        b = self.backend
        if not tokens:
            return np.zeros((0, b.n_vocab), np.float32) if logits == "all" else None
        rows = []
        for i in range(0, len(tokens), b.n_batch):
            chunk = [int(t) for t in tokens[i : i + b.n_batch]]
            rows.append(b._run(chunk, last_only=logits != "all"))
            self.logical.extend(chunk)
        if logits == "all":
            return np.concatenate(rows).astype(np.float32, copy=False)
        return rows[-1][-1].astype(np.float32, copy=False) if logits == "last" else None

    def sync(self, tokens: list[int], logits: bool = False) -> np.ndarray | None:
        from edgekit.runtime.speculative import sync_context

        dropped, sinks = self._evicted()
        return sync_context(self, tokens, logits, sinks + dropped if dropped else 0)


def draft_model_file(path: str | Path) -> Path:
    """The .onnx graph of a draft: an artifact folder (checked against its manifest's sha256) or the file itself."""
    from edgekit.runtime.base import draft_model_file as checked_draft

    return checked_draft(path, "onnx")


def _vocab_fingerprint(b: OnnxBackend, samples: int = 512) -> tuple[int, list[str]]:
    """(n_vocab, the text of an even sample of tokens): two models can draft for each other only when these agree."""
    ids = np.linspace(0, b.n_vocab - 1, num=min(samples, b.n_vocab)).astype(int).tolist()
    return b.n_vocab, [b.tokenizer.decode([i]) for i in ids]
