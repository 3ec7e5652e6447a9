"""The backend interface and its registry.

A backend runs one artifact format. ``run``, ``eval`` (and later ``profile`` and ``chat``) only
talk to this interface, so a new format's runtime is one file with ``@register_backend``.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekit.errors import InputError, UnsupportedError
from edgekit.registry import Registry

BACKENDS: Registry[type[Backend]] = Registry("backend", ["edgekit.runtime.llamacpp", "edgekit.runtime.onnx", "edgekit.runtime.torch_ref"])
register_backend = BACKENDS.register


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens.

    temperature: 0 means greedy decoding. top_k / top_p / min_p: the usual truncations (0 / 1 / 0 turn
    them off). repeat_penalty: 1.0 is off. seed: for reproducible sampling. max_tokens: upper bound on
    generated tokens. stop: strings that end generation (not included in the output).
    """

    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int = 0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise InputError("--temperature must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise InputError("--top-p must be in (0, 1]")
        if self.top_k < 0 or self.max_tokens <= 0:
            raise InputError("--top-k must be >= 0 and --max-tokens > 0")
        if not 0 <= self.min_p < 1:
            raise InputError("--min-p must be in [0, 1)")


@dataclass
class GenerationStats:
    """Filled in as a generation runs: counts and timings (seconds)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token: float = 0.0
    total_time: float = 0.0
    stop_reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        decode = self.total_time - self.time_to_first_token
        return (self.generated_tokens - 1) / decode if self.generated_tokens > 1 and decode > 0 else 0.0


class Backend(abc.ABC):
    """A loaded model. Use as a context manager; ``close`` frees it.

    formats: the artifact formats this backend runs.
    """

    name: str = ""
    formats: tuple[str, ...] = ()

    @abc.abstractmethod
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds BOS when the model's vocabulary asks for it."""

    @abc.abstractmethod
    def generate(
        self,
        prompt: str | list[dict[str, str]],
        sampling: SamplingConfig,
        stats: GenerationStats | None = None,
    ) -> Iterator[str]:
        """Stream text pieces. A list of ``{"role", "content"}`` messages goes through the chat template."""

    @abc.abstractmethod
    def logits(self, tokens: list[int]) -> np.ndarray:
        """Float32 logits (len(tokens), n_vocab) of one sequence evaluated from an empty context."""

    @property
    @abc.abstractmethod
    def n_vocab(self) -> int: ...

    # Incremental evaluation: the profiler's primitives (pp = decode(N tokens) on an empty cache,
    # tg = N x decode(1 token)). A backend that cannot evaluate incrementally leaves them unsupported.
    def reset(self) -> None:
        """Empty the KV cache: the next :meth:`decode` starts from position 0."""
        raise UnsupportedError(f"the {self.name} backend cannot evaluate incrementally")

    def decode(self, tokens: list[int]) -> None:
        """Evaluate ``tokens`` after what is already in the KV cache (logits of the last one are computed
        and discarded). Raises when the context would overflow."""
        raise UnsupportedError(f"the {self.name} backend cannot evaluate incrementally")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def backend_for_format(fmt: str) -> type[Backend]:
    """The registered backend that runs artifacts of format ``fmt``."""
    for name in BACKENDS.names():
        cls = BACKENDS.get(name)
        if fmt in cls.formats:
            return cls
    have = ", ".join(f"{f} ({n})" for n in BACKENDS.names() for f in BACKENDS.get(n).formats)
    hint = _RUNTIME_HINTS.get(fmt, "convert the model to a format edgekit runs (edgekit convert MODEL --to gguf)")
    raise UnsupportedError(f"no runtime for {fmt!r} artifacts in this edgekit ({hint}); it runs: {have}")


# What a user can do about a format edgekit writes or knows but cannot run here.
_RUNTIME_HINTS = {
    "coreml": "Core ML models run on macOS/iOS only: run it there with coremltools, or convert --to gguf/onnx here",
    "mlc": "MLC models run with mlc-llm: pip install mlc-llm, or convert --to gguf/onnx",
}
