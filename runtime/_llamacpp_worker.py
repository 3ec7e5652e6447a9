"""The child process that hosts llama.cpp for :class:`edgekit.runtime.llamacpp.LlamaCppBackend`.

llama.cpp is native code: a bad build (e.g. native CPU flags on a VM that faults on AMX), a bad
file or a bug can kill the process with a signal. Running it here keeps the CLI alive to report it.

Protocol (one JSON object per line):
  * requests come on stdin: ``{"op": ..., "id": ..., ...}``; the first one is ``load``.
  * replies go to the process's original stdout, which is reserved for them: fd 1 is pointed at
    stderr so nothing native can corrupt the stream. Replies carry ``"ev"``: ``ready``, ``result``,
    ``start``, ``token``, ``done`` or ``error``.
  * bulk arrays (logits) are written to the ``.npy`` path the parent names, never sent as JSON.
  * ``{"op": "cancel", "id": N}`` may arrive while generation ``N`` streams; it ends it early.
  * stdin EOF means the parent is gone: the worker exits at once, even mid-generation.
llama.cpp's log goes to stderr; the parent shows it (verbose) or keeps its tail for error messages.

Started by path, this file imports from edgekit only light modules: the token loop of
:mod:`edgekit.runtime.speculative`, the KV context of :mod:`edgekit.runtime._llamacpp_context`, and the
process / ggml helpers of :mod:`edgekit.runtime._llamacpp_native`; it is not a public API. Load options ``draft`` (a second GGUF sharing the vocabulary), ``speculative``
(``draft``/``ngram``), ``n_draft`` (fixed draft length; default adaptive) and ``kv_window``/``kv_sinks``
(an attention-sink window over the KV cache) shape how ``generate`` decodes.
"""

from __future__ import annotations

import os
import sys

# Started as a script: drop its own folder from the import path so sibling modules cannot shadow others.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import ctypes  # noqa: E402
import faulthandler  # noqa: E402
import json  # noqa: E402
import queue  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from edgekit.runtime._llamacpp_measure import MeasureOps  # noqa: E402
from edgekit.runtime._llamacpp_native import (  # noqa: E402
    devices,
    install_overrides,
    peak_rss_bytes,
    rss_bytes,
)
from edgekit.runtime._llamacpp_text import TextOut  # noqa: E402


class DecodingOptionError(ValueError):
    """A draft or KV-window option this model cannot take (the parent reports it as the user's input)."""


class PromptTooLongError(ValueError):
    """A prompt the context cannot hold (the parent reports it as the user's input)."""


class NoChatTemplateError(ValueError):
    """Chat messages for a GGUF without ``tokenizer.chat_template`` (the parent reports it as the user's input)."""


class Worker(MeasureOps):
    def __init__(self, out: Any) -> None:
        self.out = out
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self.cancel_ids: set[Any] = set()  # requests cancelled and not yet ended (several when batching)
        self.batcher: Any = None
        self.batch_out: dict[Any, TextOut] = {}
        self.llm: Any = None
        self.safe_cpu = False
        self.n_batch = 512
        self._control_tokens: list[str] | None = None
        self._renderer: tuple[Any, str] | None = None

    # -- plumbing -------------------------------------------------------------------------------

    def send(self, **msg: Any) -> None:
        self.out.write(json.dumps(msg) + "\n")
        self.out.flush()

    def read_stdin(self) -> None:
        for line in sys.stdin:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("op") == "cancel":
                self.cancel_ids.add(msg.get("id"))
            else:
                self.inbox.put(msg)
        os._exit(0)  # the parent is gone (or closed us): leave now, whatever the main thread does

    def serve(self) -> None:
        threading.Thread(target=self.read_stdin, daemon=True).start()
        while True:
            if self.batcher is not None and self.batcher.active():
                try:
                    msg = self.inbox.get_nowait()
                except queue.Empty:
                    self.batch_step()
                    continue
            else:
                msg = self.inbox.get()
            op = msg.get("op", "")
            rid = msg.get("id")
            handler = getattr(self, "op_" + op, None)
            if handler is None:
                self.send(ev="error", id=rid, type="ValueError", message=f"unknown op {op!r}")
                continue
            try:
                handler(msg)
            except Exception as exc:  # noqa: BLE001 - every Python error goes back as one line
                text = str(exc).strip().splitlines()
                self.send(ev="error", id=rid, type=type(exc).__name__, message=text[0] if text else "")
                if op == "load":
                    return

    # -- ops ------------------------------------------------------------------------------------

    def op_load(self, msg: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        import llama_cpp
        import llama_cpp.llama as llama_mod

        self.safe_cpu = bool(msg.get("safe_cpu"))
        params_fields = {f[0] for f in llama_cpp.llama_model_params._fields_}
        has_extra_bufts = "use_extra_bufts" in params_fields
        rss_before = rss_bytes()
        if self.safe_cpu and has_extra_bufts:
            default_params = llama_mod.llama_cpp.llama_model_default_params

            def safe_params() -> Any:
                params = default_params()
                params.use_extra_bufts = False  # no repacked (AMX, ...) weight buffers
                return params

            llama_mod.llama_cpp.llama_model_default_params = safe_params
        overrides = [(str(p), str(b)) for p, b in msg.get("tensor_overrides") or ()]
        if overrides:
            self._overrides = install_overrides(llama_mod, overrides)  # alive as long as the model
        self.n_batch = int(msg.get("n_batch") or 512)
        kwargs = dict(msg.get("extra") or {})
        kwargs.update(
            n_ctx=int(msg["n_ctx"]),
            n_batch=self.n_batch,
            n_threads=msg.get("n_threads"),
            n_gpu_layers=int(msg.get("n_gpu_layers") or 0),
            verbose=True,  # everything goes to stderr; the parent decides what to show
        )
        kwargs.setdefault("n_threads_batch", kwargs["n_threads"])  # --threads caps prompt batches too
        # llama_cpp.Llama swallows unknown keywords: a misspelt option must fail, naming the valid ones.
        import inspect

        known = {n for n, p in inspect.signature(llama_cpp.Llama.__init__).parameters.items()
                 if p.kind is not p.VAR_KEYWORD and n not in ("self", "model_path")}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown llama.cpp option(s) {', '.join(unknown)}; it takes: {', '.join(sorted(known))}")
        spec = msg.get("speculative") or {}
        if spec.get("mode"):
            # Flash attention when drafting: on CPUs its results for a verification batch of a few tokens
            # equal those of one-token steps (the default attention's differ by up to ~0.5 in a logit for
            # Q8_0), so the drafted tokens are checked as decoding them one by one would. Bit for bit only
            # where the matrix kernels are batch-invariant too (Q8_0 and Q4_0 are; F16 is within ~0.1 of a
            # logit; repacked Q4_K changes kernel from 4 tokens) and while the cache view is under 512
            # cells (256 tokens with flash attention's padding): from there its one-token kernel splits
            # the cache across threads and sums in another order.
            kwargs.setdefault("flash_attn", True)
        window = spec.get("kv_window")
        if window:
            kwargs["n_ctx"] = max(int(window), 32)
        n_seq, n_ctx_seq = int(msg.get("n_seq") or 1), kwargs["n_ctx"]
        if n_seq > 1:
            if spec.get("mode") or window:
                raise DecodingOptionError("speculative decoding and the KV window decode one sequence at a time; "
                                          "they cannot be combined with batched sequences (n_seq > 1)")
            # the batch context holds the generations; the model's own context only serves the other ops
            kwargs["n_ctx"] = min(n_ctx_seq, 512)
            # Flash attention: with it a sequence's attention does not depend on the other sequences' cells
            # (a tiny Q8_0 model's concurrent greedy answers equal each one alone; without it they differ
            # after a few tokens). The matrix products of a batch still round differently from one row's for
            # some weight types (the real Q4 model), so near-ties can go the other way.
            kwargs.setdefault("flash_attn", True)
        self.llm = llama_cpp.Llama(model_path=msg["model_path"], **kwargs)
        llm = self.llm
        self.vocab = llm._model.vocab
        self.n_batch = llm.n_batch
        self.setup_decoding(llama_cpp, kwargs, spec, n_ctx_seq)
        if n_seq > 1:
            from edgekit.runtime._llamacpp_batch import Batcher

            self.batcher = Batcher(llm.model, n_seq=n_seq, n_ctx_seq=n_ctx_seq, n_batch=self.n_batch,
                                   n_threads=kwargs.get("n_threads"), flash_attn=kwargs.get("flash_attn"),
                                   unified=not msg.get("exact_batch"))
        metadata = dict(llm.metadata)
        self.send(
            ev="ready",
            id=msg.get("id"),
            n_vocab=llm.n_vocab(),
            n_ctx=self.batcher.n_ctx_seq if self.batcher is not None else self.seq.n_ctx,
            n_seq=n_seq,
            n_batch=llm.n_batch,
            add_bos=bool(llm._model.add_bos_token()),
            bos=llm.token_bos(),
            eos=llm.token_eos(),
            metadata=metadata,
            llama_cpp_version=getattr(llama_cpp, "__version__", "?"),
            safe_cpu=self.safe_cpu,
            has_extra_bufts=has_extra_bufts,
            system_info=llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
            load_time=time.perf_counter() - t0,
            rss_before_load=rss_before,
            rss_after_load=rss_bytes(),
            tensor_overrides=[list(o) for o in overrides],
            pid=os.getpid(),
            speculative=self.spec_info,
        )

    def setup_decoding(self, llama_cpp: Any, kwargs: dict[str, Any], spec: dict[str, Any], n_ctx: int) -> None:
        """The target's KV context (with its window) and the drafter ``spec`` asks for."""
        from edgekit.runtime._llamacpp_context import LlamaContext, vocab_fingerprint
        from edgekit.runtime.speculative import ModelDrafter, NgramDrafter

        window, sinks = spec.get("kv_window"), int(spec.get("kv_sinks", 4))
        step = spec.get("kv_evict_step")
        try:
            self.seq = LlamaContext(self.llm, window=int(window) if window else None, sinks=sinks, evict_step=step,
                                    n_ctx=n_ctx)
        except ValueError as exc:
            raise DecodingOptionError(str(exc)) from None
        self.drafter: Any = None
        self.draft_llm: Any = None
        self.n_draft = spec.get("n_draft")
        mode = spec.get("mode")
        info: dict[str, Any] = {"mode": mode or "none", "kv_window": window, "kv_sinks": sinks if window else None}
        if mode == "ngram":
            self.drafter = NgramDrafter()
        elif mode == "draft":
            t0 = time.perf_counter()
            dk = {k: v for k, v in kwargs.items() if k in ("n_ctx", "n_batch", "n_threads", "n_threads_batch", "verbose")}
            try:
                self.draft_llm = llama_cpp.Llama(model_path=spec["draft_path"], **dk)
            except ValueError as exc:
                raise DecodingOptionError(f"llama.cpp cannot load the draft {spec['draft_path']}: {exc}; convert it "
                                          "again (edgekit convert MODEL --draft-for MODEL)") from None
            if vocab_fingerprint(self.draft_llm) != vocab_fingerprint(self.llm):
                raise DecodingOptionError("the draft model's vocabulary differs from the target's; a draft must share the "
                                 "target's tokenizer (make one with: edgekit convert MODEL --draft-for MODEL)")
            self.draft_seq = LlamaContext(self.draft_llm, window=self.seq.window, sinks=sinks, evict_step=step)
            self.drafter = ModelDrafter(self.draft_seq)
            info.update(draft_path=spec["draft_path"], draft_load_time=time.perf_counter() - t0)
        elif mode:
            raise DecodingOptionError(f"unknown speculative mode {mode!r}: use draft or ngram")
        self.costs = None
        if self.drafter is not None:
            info["costs"] = self.measure_costs().to_json()
        self.spec_info = info

    def measure_costs(self, prompt: list[int] | None = None) -> Any:
        """Time the target's steps by width (and the draft model's step): what the adaptive draft length
        weighs. After ``prompt`` where it fits (left in the cache for its request), else after random ids
        (the cache is cleared)."""
        from edgekit.runtime.draft_length import measure_for

        self.costs = measure_for(self.seq, getattr(self, "draft_seq", None), prompt or [],
                                 self.seq.window or self.seq.n_ctx, self.llm.n_vocab())
        return self.costs

    # -- profiling: timing loops run here, next to the model, so no IPC is inside a timed region --

    def op_reset(self, msg: dict[str, Any]) -> None:
        self.clear_kv()
        self.send(ev="result", id=msg.get("id"), value=None)

    def op_decode(self, msg: dict[str, Any]) -> None:
        """Evaluate tokens after what the cache holds (the generic profiler's primitive)."""
        import llama_cpp

        tokens = [int(t) for t in msg["tokens"]]
        if self.seq.window is None and self.seq.cells + len(tokens) > self.seq.n_ctx:
            raise ValueError(f"{self.seq.cells + len(tokens)} tokens do not fit the context of {self.seq.n_ctx}")
        self.seq.extend(tokens, "none")
        llama_cpp.llama_synchronize(self.llm.ctx)
        self.send(ev="result", id=msg.get("id"), value={"peak_rss": peak_rss_bytes()})

    def op_memory(self, msg: dict[str, Any]) -> None:
        self.send(ev="result", id=msg.get("id"), value={"rss": rss_bytes(), "peak_rss": peak_rss_bytes()})

    def op_tokenize(self, msg: dict[str, Any]) -> None:
        add, special = bool(msg.get("add_special", True)), bool(msg.get("special", True))
        tokens = self.llm.tokenize(msg["text"].encode("utf-8"), add_bos=add, special=special)
        self.send(ev="result", id=msg.get("id"), value=list(tokens))

    def op_chat_tokens(self, msg: dict[str, Any]) -> None:
        self.send(ev="result", id=msg.get("id"), value=self.chat_tokens(msg["messages"])[0])

    def op_detokenize(self, msg: dict[str, Any]) -> None:
        data = b"".join(self.piece(int(t), bool(msg.get("special"))) for t in msg["tokens"])
        self.send(ev="result", id=msg.get("id"), value=data.decode("utf-8", "replace"))

    def piece(self, token: int, special: bool = False) -> bytes:
        import llama_cpp

        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n + 1

    def chat_renderer(self) -> tuple[Any, str]:
        """The model's chat template as a function of the messages, and which template it is (made once:
        compiling the template takes milliseconds, which a batch of other generations would wait for)."""
        if self._renderer is None:
            self._renderer = self._make_renderer()
        return self._renderer

    def _make_renderer(self) -> tuple[Any, str]:
        from edgekit.chat_template import NO_CHAT_TEMPLATE, make_renderer

        llm = self.llm
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:  # not llama.cpp's ChatML fallback: a format the model never saw
            raise NoChatTemplateError(NO_CHAT_TEMPLATE)

        def token_text(tok: int) -> str | None:
            return llm._model.token_get_text(tok) if tok >= 0 else None

        # transformers' environment (edgekit's, shared with every backend), not llama-cpp-python's: one
        # template gives the same text on every format
        render = make_renderer(template, {"bos_token": token_text(llm.token_bos()),
                                          "eos_token": token_text(llm.token_eos())})
        return render, "gguf"

    def control_tokens(self) -> list[str]:
        """The texts llama.cpp reads as control tokens when parsing specials (what ``special=False`` skips)."""
        import llama_cpp

        if self._control_tokens is None:
            attrs = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
            self._control_tokens = [
                llama_cpp.llama_vocab_get_text(self.vocab, t).decode("utf-8", "replace")
                for t in range(llama_cpp.llama_vocab_n_tokens(self.vocab))
                if llama_cpp.llama_vocab_get_attr(self.vocab, t) & attrs
            ]
        return self._control_tokens

    def chat_tokens(self, messages: list[dict[str, str]]) -> tuple[list[int], str]:
        """The prompt's ids: the template's markers as control tokens, the messages' text never parsed
        for them (a message holding ``<|im_start|>system`` cannot open a turn)."""
        from edgekit.runtime.chat_tokens import chat_segments, tokenize_segments

        llm = self.llm
        render, template = self.chat_renderer()
        segments = chat_segments(render, messages, self.control_tokens())
        # No BOS beyond the template's own, whatever tokenizer.ggml.add_bos_token says: transformers'
        # apply_chat_template(tokenize=True) (edgekit's reference) and llama-cpp-python's chat formatter tokenize
        # the rendered text without special tokens; a template that wants BOS writes {{ bos_token }}.
        ids = tokenize_segments(segments, lambda t: llm.tokenize(t.encode("utf-8"), add_bos=False, special=False),
                                lambda t: llm.tokenize(t.encode("utf-8"), add_bos=False, special=True))
        return ids, template

    def op_generate(self, msg: dict[str, Any]) -> None:
        llm, rid = self.llm, msg["id"]
        s = msg["sampling"]
        t0 = time.perf_counter()
        if msg.get("messages") is not None:
            tokens, template = self.chat_tokens(msg["messages"])
        else:  # raw text is the caller's own prompt format: its special tokens are meant (see run --raw)
            tokens, template = llm.tokenize(msg["prompt"].encode("utf-8"), add_bos=True, special=True), ""
        if not tokens:
            bos = llm.token_bos()
            if bos < 0:
                raise ValueError("the prompt is empty")
            tokens = [bos]
        n_ctx = self.batcher.n_ctx_seq if self.batcher is not None else self.seq.n_ctx
        if len(tokens) >= n_ctx and not self.seq.window:
            raise PromptTooLongError(
                f"the prompt is {len(tokens)} tokens but the context holds {n_ctx}; shorten it, raise --ctx, or "
                "keep a window of the history with --kv-window"
            )
        self.send(ev="start", id=rid, prompt_tokens=len(tokens), template=template)
        if self.batcher is not None:
            self.batch_admit(rid, tokens, s, t0)
            return
        window = self.seq.window
        max_new = int(s["max_tokens"]) if window else min(int(s["max_tokens"]), n_ctx - len(tokens))
        gen, spec_stats = self.token_loop(tokens, s, max_new, rid)
        out = TextOut(self, rid, s, max_new, t0)
        reason = "length"
        try:
            for tok in gen:
                end = out.push(tok)
                if end:
                    reason = end
                    break
            else:
                reason = "cancelled" if self.is_cancelled(rid) else "length"
        finally:
            gen.close()
        out.done(reason, speculative=spec_stats.to_json() if spec_stats.mode != "none" else None, kv=self.kv_state(),
                 prompt_cached=spec_stats.prompt_cached)

    def is_cancelled(self, rid: Any) -> bool:
        return rid in self.cancel_ids

    # -- continuous batching (load option n_seq > 1; see _llamacpp_batch) --------------------------

    def batch_admit(self, rid: Any, tokens: list[int], s: dict[str, Any], t0: float) -> None:
        import numpy as np

        from edgekit.runtime._llamacpp_batch import Sequence
        from edgekit.runtime.base import SamplingConfig

        sampling = SamplingConfig(**{**s, "stop": tuple(s.get("stop") or ())})
        seq = Sequence(rid, tokens, sampling, np.random.default_rng(int(s["seed"]) & 0xFFFFFFFF))
        self.batcher.admit(seq)
        max_new = min(int(s["max_tokens"]), self.batcher.room(rid))
        self.batch_out[rid] = TextOut(self, rid, s, max_new, t0)

    def batch_step(self) -> None:
        b = self.batcher
        for rid in [r for r in self.batch_out if self.is_cancelled(r)]:
            b.release(rid)
            self.batch_out.pop(rid).done("cancelled")
        if not b.active():
            return
        try:
            sampled = b.step()
        except Exception as exc:  # noqa: BLE001 - every running generation ends with it, the worker lives on
            text = str(exc).strip().splitlines()
            for rid in list(self.batch_out):
                b.release(rid, keep=False)
                del self.batch_out[rid]
                self.send(ev="error", id=rid, type=type(exc).__name__, message=text[0] if text else "")
            return
        for rid, tok in sampled:
            out = self.batch_out[rid]
            end = out.push(tok)
            if end:
                reused = b.running[rid].reused
                b.release(rid)
                del self.batch_out[rid]
                out.done(end, batch={"sequences": b.n_seq, "prompt_cached": reused, "steps": b.steps,
                                      "decode_s": round(b.decode_seconds, 4), "sample_s": round(b.sample_seconds, 4)})

    def token_loop(self, tokens: list[int], s: dict[str, Any], max_new: int, rid: Any) -> tuple[Any, Any]:
        """The generator of token ids for ``generate`` (speculative when a drafter is loaded), and its stats."""
        import llama_cpp
        import numpy as np

        from edgekit.runtime.base import SamplingConfig
        from edgekit.runtime.speculative import SpecStats, control_for, for_prediction, generate_tokens

        sampling = SamplingConfig(**{**s, "stop": tuple(s.get("stop") or ())})
        stats = SpecStats()
        fixed = int(self.n_draft) if self.n_draft else None
        drafter, control = self.drafter, control_for(self.drafter, self.costs, fixed)
        if sampling.prediction:  # drafts from the request's predicted output, whatever the load options
            predicted = self.llm.tokenize(sampling.prediction.encode("utf-8"), add_bos=False, special=False)
            drafter, control = for_prediction(predicted, self.costs or self.measure_costs(tokens), fixed)  # once
        gen = generate_tokens(self.seq, tokens, sampling, np.random.default_rng(int(s["seed"]) & 0xFFFFFFFF),
                              max_new, lambda t: bool(llama_cpp.llama_vocab_is_eog(self.vocab, t)),
                              drafter=drafter, control=control, cancelled=lambda: self.is_cancelled(rid),
                              stats=stats)
        return gen, stats

    def kv_state(self) -> dict[str, Any]:
        seq = self.seq
        return {"cells": seq.cells, "window": seq.window, "sinks": seq.sinks if seq.window else None,
                "evicted": seq.dropped, "tokens": len(seq.tokens), "n_ctx": seq.n_ctx}

def main() -> None:
    if sys.argv[1:] == ["--devices"]:  # a one-shot query, isolated like everything else native
        result = {"devices": devices(), "baseline_rss": rss_bytes()}
        sys.__stdout__.write(json.dumps(result) + "\n")
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it cancels)
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)  # anything native that prints to stdout lands in stderr, not in the protocol
    sys.stdout = sys.stderr
    faulthandler.enable()  # a Python-side stack in the stderr tail when a signal hits
    Worker(proto).serve()


if __name__ == "__main__":
    main()
