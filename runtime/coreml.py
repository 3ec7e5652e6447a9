"""Run Core ML artifacts: Core ML itself on macOS, edgekit's numpy reference evaluator elsewhere.

The program is the one :mod:`edgekit.converters.formats.coreml.program` writes: ``input_ids`` and a
``causal_mask`` in, ``logits`` out, the KV cache held as Core ML state. Each call feeds the tokens after
those already in the state and a mask of shape ``(1, 1, L, E)`` whose ``E`` says how many cache positions
are valid; the mask also carries the model's sliding window when it has one.

Engines: ``coreml`` (macOS 15+: ``MLModel.predict`` with ``make_state()``; written against coremltools'
documented API, not exercised on Linux) and ``numpy`` (:class:`.coreml_mil.MILEvaluator`: runs the saved
program op by op, slowly; what makes ``eval`` and ``run`` work on Linux and what the tests check against
PyTorch). ``auto`` picks Core ML on macOS.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import BackendError, InputError
from edgekit.native_path import check_utf8_path
from edgekit.runtime.base import Backend, GenerationStats, SamplingConfig, register_backend
from edgekit.runtime.sampling import TextStream, decode_loop, next_token_nll, pick

ENGINES = ("auto", "numpy", "coreml")


def causal_mask(start: int, n: int, window: int = 0) -> np.ndarray:
    """fp16 ``(1, 1, n, start+n)``: query ``start+q`` sees keys ``<= start+q`` (and, with a sliding window,
    only the last ``window`` of them, as transformers masks them)."""
    q = np.arange(start, start + n)[:, None]
    k = np.arange(start + n)[None, :]
    ok = k <= q
    if window:
        ok &= k > q - window
    return np.where(ok, 0.0, -np.inf).astype(np.float16)[None, None]


class _NumpyEngine:
    def __init__(self, path: Path) -> None:
        from edgekit.runtime.coreml_mil import MILEvaluator

        self.ev = MILEvaluator(path)
        self.metadata = self.ev.metadata
        self.state = self.ev.new_state()

    def reset(self) -> None:
        self.state = self.ev.new_state()

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.ev.run({"input_ids": ids, "causal_mask": mask}, self.state)["logits"]


class _CoreMLEngine:
    """Core ML's own prediction (macOS 15 / iOS 18 runtime)."""

    def __init__(self, path: Path, compute_units: str) -> None:
        from edgekit.converters.formats.coreml.package import coremltools

        ct = coremltools()
        units = {"all": ct.ComputeUnit.ALL, "cpu": ct.ComputeUnit.CPU_ONLY,
                 "gpu": ct.ComputeUnit.CPU_AND_GPU, "ane": ct.ComputeUnit.CPU_AND_NE}[compute_units]
        check_utf8_path(path, "Core ML")  # it keeps the path and reads the package again after loading
        try:
            self.model = ct.models.MLModel(str(path), compute_units=units)
        except Exception as exc:  # Core ML's errors are its own types
            raise BackendError(f"Core ML cannot load {path.name}: {str(exc)[:300]}") from exc
        self.metadata = dict(self.model.user_defined_metadata)
        self.state = self.model.make_state()

    def reset(self) -> None:
        self.state = self.model.make_state()

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = self.model.predict({"input_ids": ids, "causal_mask": mask}, state=self.state)
        return np.asarray(out["logits"], dtype=np.float32)


@dataclass
class CoreMLMemoryEstimate:
    ram_bytes: int
    parts: dict[str, int] = field(default_factory=dict)
    n_ctx: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"ram_bytes": self.ram_bytes, "ram_required_bytes": self.ram_bytes, "vram_bytes": 0,
                "parts": self.parts, "n_ctx": self.n_ctx, "runtime": "Core ML (unified memory, estimated)"}


@register_backend("coreml")
class CoreMLBackend(Backend):
    """A Core ML program with its KV cache as state.

    ``n_ctx``: most tokens a sequence may hold (at most the program's context). ``engine``: auto, numpy or
    coreml (see the module). ``compute_units``: Core ML's all, cpu, gpu or ane. ``n_batch``: prompt tokens
    per call. ``n_threads`` is taken for the CLI's sake and not used: Core ML schedules its own work, and
    numpy's BLAS follows ``OMP_NUM_THREADS``.
    """

    name = "coreml"
    formats = ("coreml",)
    preference = 0
    incremental = True

    @classmethod
    def memory_estimate(cls, model_file: Path, n_ctx: int, n_batch: int = 512) -> CoreMLMemoryEstimate:
        """On the device: the weights (Core ML maps the blob), the whole state (allocated at the program's
        context whatever ``n_ctx``), one chunk's logits and hidden activations. A model, not a measurement."""
        meta, shapes = _read_shapes(model_file)
        weights = sum(f.stat().st_size for f in Path(model_file).rglob("*.bin"))
        state = sum(int(np.prod(s)) * 2 for s in shapes["states"])
        logits = n_batch * shapes["vocab"] * 4
        acts = n_batch * shapes["hidden"] * 2 * 16
        parts = {"weights": weights, "kv_state": state, "logits": logits, "activations": acts}
        return CoreMLMemoryEstimate(sum(parts.values()), parts, min(n_ctx, int(meta.get("edgekit.context", n_ctx))))

    @classmethod
    def decode_bytes_per_token(cls, model_file: Path, depth: int, n_ctx: int, type_k: str = "f16",
                               type_v: str = "f16") -> int:
        _, shapes = _read_shapes(model_file)
        weights = sum(f.stat().st_size for f in Path(model_file).rglob("*.bin"))
        per_pos = sum(int(np.prod(s)) // s[2] * 2 for s in shapes["states"])
        return int(weights + per_pos * depth)

    def __init__(self, model_path: str | Path, *, n_ctx: int = 2048, engine: str = "auto",
                 compute_units: str = "all", n_batch: int = 512, n_threads: int | None = None) -> None:
        from edgekit.runtime.tokenizer import FolderTokenizer, eos_ids

        path = Path(model_path)
        if not path.exists():
            raise InputError(f"{path} does not exist")
        if engine not in ENGINES:
            raise InputError(f"engine must be one of {', '.join(ENGINES)}")
        if compute_units not in ("all", "cpu", "gpu", "ane"):
            raise InputError("compute_units must be all, cpu, gpu or ane")
        if n_ctx <= 0 or n_batch <= 0:
            raise InputError("n_ctx and n_batch must be > 0")
        if engine == "coreml" and sys.platform != "darwin":
            raise InputError("engine=coreml needs macOS 15+ (Core ML); on this system use engine=numpy")
        use_coreml = engine == "coreml" or (engine == "auto" and sys.platform == "darwin")
        t0 = time.perf_counter()
        self.engine = _CoreMLEngine(path, compute_units) if use_coreml else _NumpyEngine(path)
        self.engine_name = "coreml" if use_coreml else "numpy"
        self.load_time = time.perf_counter() - t0
        context = int(self.engine.metadata.get("edgekit.context", n_ctx))
        self.window = int(self.engine.metadata.get("edgekit.sliding_window", 0) or 0)
        self.path, self.n_ctx, self.n_batch = path, min(n_ctx, context), n_batch
        self.tokenizer = FolderTokenizer(path.parent)
        self._eos = eos_ids(path.parent, self.tokenizer)
        cfg = path.parent / "config.json"
        vocab = json.loads(cfg.read_text()).get("vocab_size") if cfg.exists() else None
        self._n_vocab: int | None = int(vocab) if vocab else None
        self.reset()

    @property
    def n_vocab(self) -> int:
        if self._n_vocab is None:  # the program's output width, when config.json does not say
            self._n_vocab = int(self.logits([0]).shape[-1])
        return self._n_vocab

    @property
    def info(self) -> dict[str, Any]:
        return {"n_ctx": self.n_ctx, "engine": self.engine_name, "load_time_s": self.load_time}

    def tokenize(self, text: str, add_special: bool = True, special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special, special)

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt ids ``generate(messages)`` evaluates, as the ONNX backend makes them (special tokens
        typed in a message stay text)."""
        return self.tokenizer.encode_chat(messages)

    def prompt_ids(self, prompt: str | list[dict[str, str]]) -> list[int]:
        """What ``generate`` feeds the program: raw text with the tokenizer's specials, or the chat's ids."""
        return self.tokenize(prompt) if isinstance(prompt, str) else self.chat_tokens(prompt)

    def reset(self) -> None:
        self.engine.reset()
        self._pos = 0

    def decode(self, tokens: list[int]) -> None:
        for i in range(0, len(tokens), self.n_batch):
            self._run(tokens[i: i + self.n_batch])

    def logits(self, tokens: list[int]) -> np.ndarray:
        if len(tokens) > self.n_ctx:
            raise InputError(f"{len(tokens)} tokens do not fit the context of {self.n_ctx}; load with a larger n_ctx")
        self.reset()
        parts = [self._run(tokens[i: i + self.n_batch]) for i in range(0, len(tokens), self.n_batch)]
        self.reset()
        return np.concatenate(parts).astype(np.float32, copy=False)

    def stream_nll(self, tokens: list[int], chunk: int = 64, progress: Any = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Per-token NLL of ``tokens`` fed ``chunk`` at a time through the state (no window: up to ``n_ctx``)."""
        if len(tokens) > self.n_ctx:
            raise InputError(f"{len(tokens)} tokens exceed the program's context of {self.n_ctx}")
        self.reset()
        nll = np.zeros(max(len(tokens) - 1, 0), np.float32)
        for i in range(0, len(tokens) - 1, chunk):
            part = tokens[i: i + chunk]
            z = self._run(part)
            nxt = tokens[i + 1: i + 1 + len(part)]
            nll[i: i + len(nxt)] = next_token_nll(z, nxt)
            if progress is not None:
                progress(i + len(nxt), len(tokens) - 1)
        peak = self._pos
        self.reset()
        return nll, {"peak_cells": peak, "kv": {"cells": peak, "evicted": 0, "n_ctx": self.n_ctx}}

    def generate(self, prompt: str | list[dict[str, str]], sampling: SamplingConfig,
                 stats: GenerationStats | None = None) -> Iterator[str]:
        stats = stats if stats is not None else GenerationStats()
        ids = self.prompt_ids(prompt)
        if not ids:
            raise InputError("the prompt is empty")
        if len(ids) >= self.n_ctx:
            raise InputError(f"the prompt has {len(ids)} tokens; the context holds {self.n_ctx}: raise --ctx "
                             "(up to the program's -O context)")
        stats.prompt_tokens = len(ids)
        rng = np.random.default_rng(sampling.seed)
        t0 = time.perf_counter()
        self.reset()
        logits = None
        for i in range(0, len(ids), self.n_batch):
            logits = self._run(ids[i: i + self.n_batch])[-1].copy()  # not a view that keeps the chunk's logits
        stream = TextStream(self.tokenizer.decode, sampling.stop)
        budget = min(sampling.max_tokens, self.n_ctx - len(ids))
        yield from decode_loop(logits, lambda tok: self._run([tok])[-1],
                               lambda lg, prev: pick(lg, sampling, rng, prev), self._eos, stream, stats, budget, t0)
        stats.total_time = time.perf_counter() - t0
        stats.extra["engine"] = self.engine_name

    def close(self) -> None:
        self.engine = None  # type: ignore[assignment]

    def _run(self, tokens: list[int]) -> np.ndarray:
        n = len(tokens)
        if self._pos + n > self.n_ctx:
            raise InputError(f"the context of {self.n_ctx} tokens is full; raise --ctx")
        ids = np.asarray([tokens], dtype=np.int32)
        try:
            out = self.engine(ids, causal_mask(self._pos, n, self.window))
        except (InputError, BackendError):
            raise
        except Exception as exc:
            raise BackendError(f"the {self.engine_name} engine failed on {n} tokens: {str(exc)[:300]}") from exc
        self._pos += n
        return np.asarray(out[0], dtype=np.float32)


def _read_shapes(model_file: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """User metadata, state shapes, vocabulary and hidden size from the package's description (no weights)."""
    from edgekit.converters.formats.coreml.package import coremltools

    ct = coremltools()
    spec = ct.utils.load_spec(str(model_file))
    states = [tuple(s.type.stateType.arrayType.shape) for s in spec.description.state]
    cfg_file = Path(model_file).parent / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    return dict(spec.description.metadata.userDefined), {
        "states": states, "vocab": int(cfg.get("vocab_size", 0)), "hidden": int(cfg.get("hidden_size", 0))}


