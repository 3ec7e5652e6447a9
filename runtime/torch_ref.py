"""PyTorch reference backend: a Hugging Face safetensors checkpoint run by transformers.

It is the ground truth that quantized artifacts are measured against (``eval --ref``) and it runs
source checkpoints directly. No remote code, safetensors only.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import BackendError, InputError, quiet_transformers, require
from edgekit.runtime.base import Backend, GenerationStats, SamplingConfig, register_backend
from edgekit.runtime.sampling import TextStream, decode_loop


@register_backend("torch")
class TorchBackend(Backend):
    """transformers ``AutoModelForCausalLM`` in float32 on the CPU."""

    name = "torch"
    formats = ("hf",)

    def __init__(self, model_path: str | Path, *, n_ctx: int = 2048, n_threads: int | None = None):
        torch = require("torch", "torch")
        transformers = require("transformers", "torch")
        from edgekit.model import HFCheckpoint

        ckpt = HFCheckpoint.open(model_path)  # validates: safetensors only, supported architecture
        ckpt.require_tokenizer()
        from edgekit.runtime import hostinfo

        self._torch = torch
        self.n_ctx = n_ctx
        # transformers' logging and torch's one thread pool are process-wide: the caller's come back on close
        with contextlib.ExitStack() as scope:
            scope.enter_context(quiet_transformers(transformers))
            scope.enter_context(hostinfo.torch_threads(torch, hostinfo.check_threads(n_threads)
                                                       or hostinfo.physical_cores()))
            try:
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                    str(ckpt.path), trust_remote_code=False, local_files_only=True)
                self.model = transformers.AutoModelForCausalLM.from_pretrained(
                    str(ckpt.path), dtype=torch.float32, trust_remote_code=False, use_safetensors=True,
                    local_files_only=True).eval()
            except (OSError, ValueError) as exc:
                raise BackendError(f"transformers could not load {ckpt.path}: {exc}") from exc
            self._restore = scope.pop_all()

    def close(self) -> None:
        """Give the caller's transformers logging and PyTorch thread count back (the model goes with the
        object)."""
        restore = getattr(self, "_restore", None)
        if restore is not None:
            restore.close()

    @property
    def n_vocab(self) -> int:
        return int(self.model.config.vocab_size)

    def tokenize(self, text: str, add_special: bool = True, special: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special, split_special_tokens=not special)["input_ids"])

    def logits(self, tokens: list[int]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(torch.tensor([tokens]), use_cache=False)
        return out.logits[0].float().numpy()

    def _prompt_ids(self, prompt: str | list[dict[str, str]]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        return hf_chat_ids(self.tokenizer, prompt)

    def _pick(self, logits, sampling: SamplingConfig, gen):
        torch = self._torch
        if sampling.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / sampling.temperature, -1)
        if sampling.top_k:
            kth = torch.topk(probs, min(sampling.top_k, probs.numel())).values[-1]
            probs = torch.where(probs >= kth, probs, 0)
        if sampling.min_p:
            probs = torch.where(probs >= sampling.min_p * probs.max(), probs, 0)
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < sampling.top_p * sorted_p.sum()
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
        return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))

    def generate(
        self, prompt: str | list[dict[str, str]], sampling: SamplingConfig, stats: GenerationStats | None = None
    ) -> Iterator[str]:
        torch = self._torch
        stats = stats if stats is not None else GenerationStats()
        ids = self._prompt_ids(prompt)
        if not ids:  # the model cannot predict from nothing (torch fails on an empty float tensor)
            raise InputError("the prompt is empty")
        stats.prompt_tokens = len(ids)
        gen = torch.Generator().manual_seed(sampling.seed)
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = {self.tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None}
        t0 = time.perf_counter()
        stream = TextStream(lambda t: self.tokenizer.decode(t, skip_special_tokens=True), sampling.stop)
        past = None

        def forward(inp: Any) -> Any:
            nonlocal past
            with torch.inference_mode():
                res = self.model(inp, past_key_values=past, use_cache=True)
            past = res.past_key_values
            return res.logits[0, -1]

        def choose(logits: Any, previous: list[int]) -> int:
            with torch.inference_mode():  # the logits are inference tensors: edit them in that mode
                if sampling.repeat_penalty != 1.0 and previous:
                    prev = torch.tensor(sorted(set(previous)))
                    vals = logits[prev]
                    logits[prev] = torch.where(vals > 0, vals / sampling.repeat_penalty,
                                               vals * sampling.repeat_penalty)
                return self._pick(logits, sampling, gen)

        yield from decode_loop(forward(torch.tensor([ids])), lambda tok: forward(torch.tensor([[tok]])), choose, eos,
                               stream, stats, sampling.max_tokens, t0)
        stats.total_time = time.perf_counter() - t0


def hf_chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """A transformers tokenizer's chat-template ids with the messages' text never parsed for special tokens
    (``apply_chat_template(tokenize=True)`` would read ``<|im_start|>`` typed in a message as a turn)."""
    from edgekit.chat_template import NO_CHAT_TEMPLATE
    from edgekit.runtime.chat_tokens import chat_segments, tokenize_segments

    if not tokenizer.chat_template:  # transformers would raise a ValueError that reads as edgekit's own failure
        raise InputError(NO_CHAT_TEMPLATE)

    def render(msgs: list[dict[str, str]]) -> str:
        from jinja2.exceptions import TemplateError, TemplateSyntaxError

        try:
            return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except TemplateSyntaxError as exc:
            raise InputError(f"the chat template could not be read ({exc.message}, line {exc.lineno}); fix the "
                             "model's chat template or pass raw text (--raw)") from exc
        except TemplateError as exc:
            if type(exc) is TemplateError:  # what transformers' raise_exception raises
                raise InputError(f"the chat template refused these messages: {exc}") from exc
            raise InputError(f"the chat template could not render these messages ({type(exc).__name__}: "
                             f"{str(exc)[:200]}); fix the model's chat template or pass raw text (--raw)") from exc

    def encode(text: str, split: bool) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False, split_special_tokens=split)["input_ids"])

    specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    return tokenize_segments(chat_segments(render, list(messages), specials),
                             lambda t: encode(t, True), lambda t: encode(t, False))
