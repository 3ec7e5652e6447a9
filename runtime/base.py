"""The backend interface, its registry, and the capabilities a backend may declare.

A backend runs artifact formats. ``run``, ``eval``, ``chat``, ``profile``, ``plan`` and ``push`` only talk
to this interface, so a new format's runtime is one file with ``@register_backend``. What a backend can
do beyond loading and generating it declares by implementing a Protocol below (callers check the
capability with ``isinstance``, never the class or the format): :class:`MemoryModel` (memory at a context
length and bytes read per decoded token: fit checks, plans, rooflines), :class:`OffloadPlanner` (a
CPU/GPU split for this host), :class:`InProcessBench` (a timed loop inside the runtime, no IPC in it),
:class:`ReportsMemory` (peak RSS of the process that holds the model), :class:`StreamsLongText` (per-token
NLL of a long text through the KV cache or its window), and incremental decoding
(``incremental = True``: :meth:`Backend.reset` / :meth:`Backend.decode`).
"""

from __future__ import annotations

import abc
import functools
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from edgekit.artifact import plain_json
from edgekit.errors import InputError, UnsupportedError
from edgekit.registry import Registry

if TYPE_CHECKING:
    from edgekit.artifact import Artifact

BACKENDS: Registry[type[Backend]] = Registry(
    "backend", ["edgekit.runtime.llamacpp", "edgekit.runtime.onnx", "edgekit.runtime.torch_ref", "edgekit.runtime.coreml",
                "edgekit.runtime.mlc", "edgekit.runtime.aqlm"])
register_backend = BACKENDS.register


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens.

    temperature: 0 means greedy decoding. top_k / top_p / min_p: the usual truncations (0 / 1 / 0 turn
    them off). repeat_penalty: 1.0 is off. seed: for reproducible sampling. max_tokens: upper bound on
    generated tokens. stop: strings that end generation (not included in the output). prediction: text
    the answer is expected to repeat much of (OpenAI's Predicted Outputs: a file being edited, say); it is
    drafted from by lookup (speculative decoding), so the answer is the same with it, only sooner where it
    matches.
    """

    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int = 0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    prediction: str = ""

    def __post_init__(self) -> None:
        from edgekit.validate import check_number

        check_text(self.prediction, "the prediction")
        # check_number refuses NaN and infinities, which slip past comparisons such as `x < 0`
        check_number(self.temperature, "--temperature", at_least=0, note=" (0 is greedy)")
        check_number(self.top_p, "--top-p", above=0, at_most=1, note=" (1 is off)")
        check_number(self.min_p, "--min-p", at_least=0, below=1, note=" (0 is off)")
        check_number(self.repeat_penalty, "--repeat-penalty", above=0, note=" (1.0 is off)")
        for name, value in (("top_k", self.top_k), ("max_tokens", self.max_tokens), ("seed", self.seed)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise InputError(f"--{name.replace('_', '-')} must be a whole number, got {value!r}")
        if self.top_k < 0:
            raise InputError(f"--top-k must be >= 0 (0 is off), got {self.top_k}")
        if self.max_tokens <= 0:
            raise InputError(f"--max-tokens must be > 0, got {self.max_tokens}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop  # one string is one stop string
        if isinstance(stop, (tuple, list)) and all(isinstance(x, str) for x in stop) and "" in stop:
            raise InputError("--stop (stop=) takes non-empty text: an empty stop string would end every reply at "
                             "once; drop it")
        if not isinstance(stop, (tuple, list)) or not all(isinstance(x, str) and x for x in stop):
            raise InputError(f"stop must be a string or a list of non-empty strings, got {self.stop!r:.60}")
        object.__setattr__(self, "stop", tuple(stop))


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

    def to_dict(self) -> dict[str, Any]:
        """The stats as plain JSON types (``json.dumps`` takes it as is): each field, ``tokens_per_second``, and
        ``extra`` as the backend filled it (``speculative``, ``kv``...) with numpy numbers as Python's."""
        return plain_json({**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"},
                           "tokens_per_second": self.tokens_per_second, "extra": self.extra})


def check_text(text: Any, what: str = "the prompt") -> None:
    """Raise :class:`InputError` unless ``text`` is a str that encodes as UTF-8.

    Bytes that are not UTF-8 reach Python as lone surrogates (``sys.argv`` and file names decode with
    ``surrogateescape``); tokenizers then fail each in their own way, so they are refused here, once,
    naming the offending byte and its byte offset."""
    if not isinstance(text, str):
        raise InputError(f"{what} must be text (str), got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        pos = len(text[: exc.start].encode("utf-8"))
        bad = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise InputError(f"{what} is not valid UTF-8 ({bad} at position {pos}); give UTF-8 text "
                         "(check the terminal's or the file's encoding)") from None


def check_prompt(prompt: Any) -> None:
    """A prompt is UTF-8 text or a list of ``{"role", "content"}`` messages whose fields are UTF-8 text."""
    if isinstance(prompt, str):
        check_text(prompt)
        return
    if not isinstance(prompt, (list, tuple)):
        raise InputError(f"the prompt must be text or a list of {{'role', 'content'}} messages, "
                         f"got {type(prompt).__name__}")
    if not prompt:
        raise InputError("the list of messages is empty; give at least one {'role': 'user', 'content': ...}")
    for i, msg in enumerate(prompt):
        if not isinstance(msg, Mapping) or "content" not in msg or "role" not in msg:
            raise InputError(f"message {i} of the prompt must be a {{'role': ..., 'content': ...}} mapping")
        check_text(msg["role"], f"the role of message {i}")
        check_text(msg["content"], f"message {i} ({msg['role']})" if len(prompt) > 1 else "the prompt")


def token_ids(tokens: Any, n_vocab: int | None = None) -> list[int]:
    """``tokens`` as a list of ids, each a whole number below ``n_vocab``; else an :class:`InputError`
    (text is tokenized with ``tokenize`` first)."""
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, (list, tuple, np.ndarray)):
        raise InputError(f"expected a list of token ids, got {type(tokens).__name__}; tokenize text first")
    out = []
    for t in tokens:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise InputError(f"token ids are whole numbers, got {t!r:.40}")
        if t < 0 or (n_vocab is not None and t >= n_vocab):
            raise InputError(f"token id {t} is outside the vocabulary (0..{(n_vocab or 1) - 1})")
        out.append(int(t))
    return out


def check_generate_args(prompt: Any, sampling: Any = None, stats: Any = None) -> None:
    """``generate``'s arguments are what they say: a prompt (:func:`check_prompt`), and a dict is not a
    SamplingConfig."""
    check_prompt(prompt)
    if sampling is not None and not isinstance(sampling, SamplingConfig):
        raise InputError(f"sampling must be a SamplingConfig (e.g. SamplingConfig(max_tokens=64)), "
                         f"got {type(sampling).__name__}")
    if stats is not None and not isinstance(stats, GenerationStats):
        raise InputError(f"stats must be a GenerationStats to fill in, got {type(stats).__name__}")


def _checking(fn: Any, check: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(self: Backend, text: Any, *args: Any, **kwargs: Any) -> Any:
        check(text, *args, **kwargs)
        return fn(self, text, *args, **kwargs)

    wrapper._checks_text = True  # type: ignore[attr-defined]
    return wrapper


class Backend(abc.ABC):
    """A loaded model. Use as a context manager; ``close`` frees it.

    formats: the artifact formats this backend runs. preference: which backend a format gets when none
    is named (lowest first). incremental: :meth:`reset` / :meth:`decode` work. The keyword-only
    parameters of ``__init__`` are the options it takes; :func:`open_backend` refuses others by name.
    """

    name: str = ""
    formats: tuple[str, ...] = ()
    preference: int = 100
    incremental: bool = False

    @abc.abstractmethod
    def tokenize(self, text: str, add_special: bool = True, special: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds BOS when the model's vocabulary asks for it. ``special``:
        typed special-token text (``<|im_end|>``, ``<unk>``) becomes control tokens; False keeps it plain text,
        as llama-perplexity tokenizes (``parse_special=false``). Every backend gives the same ids either way."""

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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every backend's public entries check their text here, so none can forget it or word it its own
        # way; the backends' own code then only ever sees valid UTF-8.
        super().__init_subclass__(**kwargs)
        for name, check in (("generate", check_generate_args),
                            ("tokenize", lambda t, *_a, **_k: check_text(t, "the text"))):
            fn = cls.__dict__.get(name)
            if fn is not None and not getattr(fn, "_checks_text", False) and not getattr(fn, "__isabstractmethod__", False):
                setattr(cls, name, _checking(fn, check))

    def __enter__(self) -> Backend:
        """``with backend:`` closes it at the end of the outermost block: a nested ``with`` on the same backend
        (a helper that takes a loaded backend and uses it as a context) leaves it loaded for the outer one."""
        self._with_depth = getattr(self, "_with_depth", 0) + 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._with_depth = max(0, getattr(self, "_with_depth", 1) - 1)
        if not self._with_depth:
            self.close()


@runtime_checkable
class MemoryModel(Protocol):
    """Knows what its format costs: resident bytes at a context length (by part: ``memory_estimate``
    returns an object with ``ram_bytes``, ``parts`` and ``to_json()``), bytes read per decoded token."""

    @classmethod
    def memory_estimate(cls, model_file: Path, n_ctx: int, n_batch: int = 512) -> Any: ...

    @classmethod
    def decode_bytes_per_token(cls, model_file: Path, depth: int, n_ctx: int, type_k: str = "f16",
                               type_v: str = "f16") -> int: ...


@runtime_checkable
class SizesWeights(Protocol):
    """Inverts its memory model before a model file exists: ``weight_room(hparams, n_ctx, ram_bytes)`` gives
    the bytes of weights that fit ``ram_bytes`` at ``n_ctx`` and the other parts it counted (``convert --fit``)."""

    @classmethod
    def weight_room(cls, hparams: Any, n_ctx: int, ram_bytes: int) -> tuple[int, dict[str, int]]: ...


@runtime_checkable
class OffloadPlanner(Protocol):
    """Plans a CPU/GPU split (an ``OffloadPlan``): for this host's GPUs, free RAM and measured bandwidth
    when ``budget`` is None (``run --offload auto``), else for that budget (``plan``); a ``draft``'s memory
    (``DraftMemory``) comes out of the RAM first; ``n_expert_used``: the experts run per token when
    ``--experts`` overrides the file's count (they set the bytes each token reads)."""

    @classmethod
    def offload_plan(cls, model_file: Path, n_ctx: int, n_batch: int = 512, *, budget: Any = None,
                     bandwidths: Any = None, cache_type: str = "f16", vram_bytes: int | None = None,
                     draft: Any = None, n_expert_used: int | None = None) -> Any: ...


@runtime_checkable
class InProcessBench(Protocol):
    """Runs llama-bench's tests inside the runtime, so no IPC falls inside a timed region."""

    def bench(self, *args: Any, **kwargs: Any) -> Any: ...


@runtime_checkable
class ReportsMemory(Protocol):
    """Reports the resident memory of the process holding the model (``{"rss", "peak_rss"}``)."""

    def memory(self) -> dict[str, int]: ...


@runtime_checkable
class StreamsLongText(Protocol):
    """Streams a long token sequence through its KV cache (its window, when loaded with one) and returns each
    token's negative log-likelihood: ``stream_nll(tokens, chunk, progress) -> (nll, info)``."""

    def stream_nll(self, tokens: list[int], chunk: int = 64, progress: Any = None) -> tuple[np.ndarray, dict[str, Any]]: ...


def capabilities(cls: type[Backend]) -> list[str]:
    """The capabilities a backend declares, by name (what ``edgekit registry`` shows)."""
    caps = [name for name, proto in (("memory-model", MemoryModel), ("sizes-weights", SizesWeights),
                                     ("offload-plan", OffloadPlanner),
                                     ("in-process-bench", InProcessBench), ("reports-memory", ReportsMemory),
                                     ("streams-long-text", StreamsLongText))
            if isinstance(cls, proto)]
    return caps + (["incremental-decode"] if cls.incremental else [])


def backend_options(cls: type[Backend]) -> list[str]:
    """The options a backend takes: the keyword-only parameters of its ``__init__``."""
    params = inspect.signature(cls.__init__).parameters.values()
    return sorted(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def backend_by_name(name: str, fmt: str | None = None) -> type[Backend]:
    """The backend registered as ``name``; with ``fmt``, one that runs that format (else a clear error)."""
    cls = BACKENDS.get(name)
    if fmt is not None and fmt not in cls.formats:
        runs = [n for n in BACKENDS.names() if fmt in BACKENDS.get(n).formats]
        raise UnsupportedError(f"the {name} backend does not run {fmt!r} artifacts; "
                               + (f"use {', '.join(runs)}" if runs else "no backend here runs them"))
    return cls


def backend_for_format(fmt: str, backend: str | None = None) -> type[Backend]:
    """The backend that runs artifacts of format ``fmt``: ``backend`` when named, else the preferred one."""
    if backend is not None:
        return backend_by_name(backend, fmt)
    runs = sorted((BACKENDS.get(n) for n in BACKENDS.names() if fmt in BACKENDS.get(n).formats),
                  key=lambda c: (c.preference, c.name))
    if runs:
        return runs[0]
    have = ", ".join(f"{f} ({n})" for n in BACKENDS.names() for f in BACKENDS.get(n).formats)
    hint = _RUNTIME_HINTS.get(fmt, "convert the model to a format edgekit runs (edgekit convert MODEL --to gguf)")
    raise UnsupportedError(f"no runtime for {fmt!r} artifacts in this edgekit ({hint}); it runs: {have}")


def memory_to_run(fmt: str, model_file: Path, ctx: int) -> tuple[str, int] | None:
    """(backend name, predicted peak resident bytes at ``ctx`` on the CPU) from the memory model of the
    backend that runs format ``fmt``: weights, KV cache, compute buffers and the runtime's own. None when
    no backend here runs the format or its backend declares no memory model."""
    try:
        backend = backend_for_format(fmt)
    except UnsupportedError:
        return None
    if not isinstance(backend, MemoryModel):
        return None
    return backend.name, int(backend.memory_estimate(model_file, ctx).ram_bytes)


# What a user can do about a format edgekit writes or knows but cannot run here.
_RUNTIME_HINTS: dict[str, str] = {}


def is_checkpoint_folder(path: Path) -> bool:
    """A Hugging Face checkpoint folder (run by the PyTorch reference), not an artifact edgekit wrote."""
    return path.is_dir() and (path / "config.json").exists() and not (path / "edgekit.json").exists()


def open_backend(target: str | Path | Artifact, backend: str | None = None, **options: Any) -> Backend:
    """Load an artifact (or a bare model file, or a Hugging Face folder) with ``backend`` (default: the
    preferred one for its format). An option the backend does not take is an error that lists those it
    does (a misspelt option is never silently ignored)."""
    from edgekit.artifact import Artifact

    if isinstance(target, Artifact):
        art: Artifact | None = target
        path = target.model_file
        fmt = target.format
    else:
        p = Path(target).expanduser()
        if is_checkpoint_folder(p):
            art, path, fmt = None, p, "hf"
        else:
            art = Artifact.open(p)
            path, fmt = art.model_file, art.format
    cls = backend_for_format(fmt, backend)
    known = backend_options(cls)
    if not _takes_any(cls):
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise InputError(_no_option(cls, unknown, known))
    check_whole_numbers(options)
    return cls(path, **options)


#: backend options that count something (tokens, threads, layers): whole numbers, whichever backend takes them
WHOLE_NUMBER_OPTIONS = ("n_ctx", "n_batch", "n_threads", "n_gpu_layers", "n_seq", "n_draft", "kv_window", "kv_sinks",
                        "kv_evict_step")


def check_whole_numbers(options: Mapping[str, Any]) -> None:
    """Refuse a counting option given as anything but a whole number (``kv_window="abc"`` from the SDK or
    ``-O kv_window=abc``), in the words of its flag, before a backend turns it into a bare ValueError."""
    for name in WHOLE_NUMBER_OPTIONS:
        value = options.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise InputError(f"{_as_flags(name)} must be a whole number, got {value!r:.40}, a {type(value).__name__}")


#: how to make a draft for a target of each format that decodes speculatively
_DRAFT_RECIPES = {"gguf": "edgekit convert MODEL --draft-for MODEL",
                  "onnx": "edgekit convert MODEL --to onnx --draft-for MODEL"}


def draft_model_file(draft: str | Path, fmt: str) -> Path:
    """The model file of the speculative-decoding ``draft`` (an artifact folder or a model file) of a target of
    format ``fmt``. An artifact folder's files are checked against the sha256 its manifest recorded, as the
    target's are: verification rejects what a corrupted draft drafts, so at best it would run slower, silently.
    A bare model file has nothing to check against. A draft of another format is a one-line error saying
    that a draft is of the target's format."""
    from edgekit.artifact import FORMAT_SUFFIXES, Artifact

    p = Path(draft).expanduser()
    if not p.exists():
        raise InputError(f"draft model not found: {p}")
    want = fmt.upper()
    fix = (f"a draft must be {want} like the target, with the same tokenizer (make one with: "
           f"{_DRAFT_RECIPES.get(fmt, 'edgekit convert MODEL --draft-for MODEL')})")
    if p.is_file() and p.suffix.lower() not in FORMAT_SUFFIXES:
        raise InputError(f"the draft {p.name} is not a {want} model file; {fix}")
    art = Artifact.open(p)
    if art.format != fmt:
        raise InputError(f"the draft {p} is {art.format.upper()}, not {want}; {fix}")
    art.verify()
    return art.model_file.resolve()


def _no_option(cls: type[Backend], unknown: list[str], known: list[str]) -> str:
    """What a backend refusing ``unknown`` options says: for an option other backends take (``draft`` on Core
    ML), the formats that have it, which is the fix; for a misspelling, the options this one takes."""
    elsewhere = {}
    for name in unknown:
        takers = [BACKENDS.get(n) for n in BACKENDS.names() if n != cls.name]
        formats = sorted({f.upper() for c in takers if name in backend_options(c) for f in c.formats})
        if formats:
            elsewhere[name] = formats
    if elsewhere and len(elsewhere) == len(unknown):
        what = "; ".join(f"{_as_flags(name)} works with {' and '.join(fmts)} artifacts"
                         for name, fmts in elsewhere.items())
        return f"the {cls.name} backend ({', '.join(cls.formats)} artifacts) cannot do that: {what}"
    return f"the {cls.name} backend has no option {', '.join(unknown)}; its options: {', '.join(known)}"


#: backend options whose CLI flag is not ``--`` plus the name with dashes
_FLAGS = {"n_ctx": "--ctx", "n_threads": "--threads", "n_gpu_layers": "--gpu-layers", "n_batch": "--batch"}


def _as_flags(option: str) -> str:
    """An option as the SDK keyword and the CLI flag that set it: ``draft= (--draft)``."""
    return f"{option}= ({_FLAGS.get(option, '--' + option.replace('_', '-'))})"


def _takes_any(cls: type[Backend]) -> bool:
    """A backend whose ``__init__`` passes other keywords on to its runtime (llama.cpp's ``Llama``)."""
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())
