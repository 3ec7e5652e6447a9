"""Run MLC artifacts: edgekit's PyTorch reference of MLC's weights, or MLC's own engine where installed.

``reference`` (the default, and what ``eval`` uses): the tensor cache is read with TVM's own reader
(``tvm.contrib.tvmjs.load_tensor_cache``, apache-tvm installed: ``pip install edgekit[mlc]``) or edgekit's
numpy reader, every ``q_weight`` / ``q_scale`` pair is dequantized exactly as MLC's kernels decode it
(``(code - max_int) * scale`` rounded to the model dtype), the fused projections are split back, and the
model runs in transformers in float32. Chat prompts are assembled by the artifact's own conversation
template (mlc-chat-config.json), as MLC's engine assembles them. This measures the quality of the
artifact's numbers; it does not measure MLC's kernels or speed.

``mlc``: ``mlc_llm.MLCEngine`` on the artifact with its compiled model library (``convert --compile``),
for generation; written against mlc_llm's documented Python API, not exercised here (mlc_llm does not
install on this machine). Without mlc_llm the engine is refused with how to get it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import BackendError, InputError, UnsupportedError, quiet_transformers, require
from edgekit.native_path import check_utf8_path
from edgekit.runtime.base import GenerationStats, SamplingConfig, register_backend
from edgekit.runtime.torch_ref import TorchBackend

ENGINES = ("reference", "mlc")


@dataclass
class MLCMemoryEstimate:
    ram_bytes: int
    parts: dict[str, int] = field(default_factory=dict)
    n_ctx: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"ram_bytes": self.ram_bytes, "ram_required_bytes": self.ram_bytes, "vram_bytes": 0,
                "parts": self.parts, "n_ctx": self.n_ctx, "runtime": "MLC (weights + fp16 KV cache, estimated)"}


def _shape(model_file: Path) -> tuple[dict[str, Any], int]:
    from edgekit.converters.formats.mlc.cache import read_cache_json
    from edgekit.converters.formats.mlc.read import read_chat_config

    folder = Path(model_file).parent
    cfg = read_chat_config(folder)
    weights = sum(int(s["nbytes"]) for s in read_cache_json(folder)["records"])
    return cfg, weights


def _kv_bytes(mc: dict[str, Any], tokens: int) -> int:
    n_kv = int(mc.get("num_key_value_heads") or mc["num_attention_heads"])
    head_dim = int(mc.get("head_dim") or mc["hidden_size"] // mc["num_attention_heads"])
    return 2 * int(mc["num_hidden_layers"]) * n_kv * head_dim * tokens * 2


@register_backend("mlc")
class MLCBackend(TorchBackend):
    """An MLC artifact (mlc-chat-config.json + tensor cache).

    ``n_ctx``: most tokens a sequence may hold. ``n_threads``: PyTorch threads. ``engine``: reference
    (PyTorch on the dequantized weights) or mlc (MLC's engine; needs mlc_llm and a compiled library).
    ``reader``: auto (TVM's tensor-cache reader when apache-tvm is installed, else numpy), tvm or numpy.
    """

    name = "mlc"
    formats = ("mlc",)
    preference = 0

    @classmethod
    def memory_estimate(cls, model_file: Path, n_ctx: int, n_batch: int = 512) -> MLCMemoryEstimate:
        """On the device: the weights, MLC's fp16 KV cache for ``n_ctx`` tokens (at most the context window),
        one prefill chunk's logits (float32) and activations. A model, not a measurement."""
        cfg, weights = _shape(model_file)
        mc = cfg["model_config"]
        ctx = min(n_ctx, int(cfg.get("context_window_size") or n_ctx))
        chunk = min(n_batch, int(cfg.get("prefill_chunk_size") or n_batch))
        parts = {"weights": weights, "kv_cache": _kv_bytes(mc, ctx), "logits": chunk * int(mc["vocab_size"]) * 4,
                 "activations": chunk * int(mc["intermediate_size"]) * 2 * 4}
        return MLCMemoryEstimate(sum(parts.values()), parts, ctx)

    @classmethod
    def decode_bytes_per_token(cls, model_file: Path, depth: int, n_ctx: int, type_k: str = "f16",
                               type_v: str = "f16") -> int:
        """Every weight once plus the KV cache up to ``depth``."""
        cfg, weights = _shape(model_file)
        return weights + _kv_bytes(cfg["model_config"], min(depth, n_ctx))

    def __init__(self, model_path: str | Path, *, n_ctx: int = 2048, n_threads: int | None = None,
                 engine: str = "reference", reader: str = "auto"):
        if engine not in ENGINES:
            raise InputError(f"engine {engine!r}: use one of {', '.join(ENGINES)}")
        if reader not in ("auto", "tvm", "numpy"):
            raise InputError(f"reader {reader!r}: use auto, tvm or numpy")
        folder = Path(model_path)
        folder = folder if folder.is_dir() else folder.parent
        self.folder, self.n_ctx, self.engine = folder, n_ctx, engine
        if engine == "mlc":
            self._open_mlc_engine(folder)
            return
        torch = require("torch", "torch")
        transformers = require("transformers", "torch")
        from edgekit.converters.formats.mlc.read import load_weights
        from edgekit.runtime import hostinfo

        if reader == "tvm":
            try:
                import tvm  # noqa: F401
            except ImportError:
                raise UnsupportedError("reader=tvm needs apache-tvm: pip install 'edgekit[mlc]'") from None
        cfg, weights, self.reader = load_weights(folder, None if reader == "auto" else reader == "tvm")
        self.chat_config = cfg
        self._torch = torch
        # process-wide settings (transformers' logging, torch's thread pool): close() gives the caller's back
        with contextlib.ExitStack() as scope:
            scope.enter_context(quiet_transformers(transformers))
            scope.enter_context(hostinfo.torch_threads(torch, hostinfo.check_threads(n_threads)
                                                       or hostinfo.physical_cores()))
            self._build(transformers, folder, cfg, weights)
            self._restore = scope.pop_all()
        gen = self.model.generation_config
        stops = cfg.get("conv_template", {}).get("stop_token_ids") or []
        if stops:
            gen.eos_token_id = list(stops)

    def _build(self, transformers: Any, folder: Path, cfg: dict[str, Any], weights: dict[str, Any]) -> None:
        import edgekit.converters.formats.mlc.layout as layout

        torch = self._torch
        hf = layout.hf_config(cfg["model_type"], cfg["model_config"])
        try:
            config = transformers.AutoConfig.for_model(**hf)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [m for m in missing if not (m == "lm_head.weight" and hf["tie_word_embeddings"])]
            if missing or unexpected:
                raise BackendError(f"the MLC weights do not fit the model: missing {missing[:3]}, extra {unexpected[:3]}")
            if hf["tie_word_embeddings"]:
                model.tie_weights()
            self.model = model.eval()
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False,
                                                                        local_files_only=True)
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot build the reference model of {folder}: {exc}") from exc

    def _open_mlc_engine(self, folder: Path) -> None:
        from edgekit.converters.formats.mlc.options import MLC_INSTALL, mlc_llm_available

        if not mlc_llm_available():
            raise UnsupportedError(f"engine=mlc: {MLC_INSTALL}")
        manifest = json.loads((folder / "edgekit.json").read_text()) if (folder / "edgekit.json").exists() else {}
        lib = (manifest.get("files") or {}).get("library")
        if not lib:
            raise UnsupportedError("engine=mlc needs a compiled model library: convert with --compile TARGET")
        import mlc_llm

        from edgekit.converters.formats.mlc.read import read_chat_config

        self.chat_config = read_chat_config(folder)
        check_utf8_path(folder / lib, "MLC's engine")  # it reads the folder from its own threads, as it goes
        self._mlc = mlc_llm.MLCEngine(str(folder), model_lib=str(folder / lib))

    def _check_template(self) -> None:
        """Refuse chat messages for an artifact whose checkpoint had no chat template: convert writes MLC's
        plain ``LM`` conversation then, which would pass the message on as raw text."""
        from edgekit.chat_template import NO_CHAT_TEMPLATE

        conv = self.chat_config.get("conv_template")
        if isinstance(conv, dict) and conv.get("name") == "LM":
            raise InputError(NO_CHAT_TEMPLATE)

    def _prompt_ids(self, prompt: str | list[dict[str, str]]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        from edgekit.converters.formats.mlc.chat_config import render
        from edgekit.runtime.chat_tokens import chat_segments, tokenize_segments

        self._check_template()
        conv = self.chat_config["conv_template"]
        specials = [t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special]

        def encode(text: str, split: bool) -> list[int]:
            return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=split)["input_ids"])

        return tokenize_segments(chat_segments(lambda m: render(conv, m), list(prompt), specials),
                                 lambda t: encode(t, True), lambda t: encode(t, False))

    def generate(self, prompt: str | list[dict[str, str]], sampling: SamplingConfig,
                 stats: GenerationStats | None = None) -> Iterator[str]:
        if self.engine == "mlc":
            if isinstance(prompt, list):
                self._check_template()
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            for chunk in self._mlc.chat.completions.create(messages=messages, stream=True,
                                                           temperature=sampling.temperature, top_p=sampling.top_p,
                                                           max_tokens=sampling.max_tokens, seed=sampling.seed):
                for choice in chunk.choices:
                    if choice.delta.content:
                        yield choice.delta.content
            return
        yield from super().generate(prompt, sampling, stats)

    def close(self) -> None:
        if getattr(self, "_mlc", None) is not None:
            self._mlc.terminate()
        super().close()
