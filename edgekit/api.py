"""The public SDK. The CLI is a thin layer over these functions.

    from edgekit import api
    art = api.convert("./SmolLM2-135M", to="gguf", recipe=api.ConvertRecipe(bits=4))
    for piece in api.generate(art.path, "What is the capital of France?"):
        print(piece, end="")
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgekit import library
from edgekit.artifact import (
    Artifact,
    is_artifact_folder,
    remember_checksums,
    while_not_replaced,
)
from edgekit.calibration import CalibConfig
from edgekit.converters.artifact_write import check_same_source, write_artifact
from edgekit.converters.diffusion.pipeline import is_pipeline
from edgekit.converters.formats.base import FORMATS, ConvertRecipe, ProgressFn, no_progress
from edgekit.converters.quantize.base import QUANTIZERS, QuantizeConfig, Quantizer
from edgekit.errors import DiskFullError, InputError, notice
from edgekit.evaluate import (
    EvalConfig,
    EvalResult,
    evaluate_diffusion,
    is_diffusion,
    perplexity,
    read_text,
    text_identity,
)
from edgekit.fsutil import check_not_inside, check_output, temp_dir
from edgekit.importer import import_gguf
from edgekit.model import HFCheckpoint
from edgekit.runtime.base import (
    Backend,
    GenerationStats,
    SamplingConfig,
    StreamsLongText,
    check_generate_args,
    is_checkpoint_folder,
)
from edgekit.runtime.base import open_backend as _open_backend
from edgekit.runtime.plan import offload_options
from edgekit.runtime.plan import plan_artifact as plan
from edgekit.validate import check_path, check_type

__all__ = [
    "Artifact", "CalibConfig", "ConvertRecipe", "EvalConfig", "EvalResult", "GenerationStats", "SamplingConfig",
    "calibration_applies", "convert", "default_output", "default_output_suffix", "default_preset", "distill_config",
    "make_quantizer", "method_config", "evaluate", "generate", "import_gguf",
    "inspect", "evaluate_streaming", "open_backend", "plan", "offload_options",
    "evaluate_diffusion", "is_diffusion",
]


def default_output(model: str | Path, fmt: str, recipe: ConvertRecipe, quantize: QuantizeConfig | None = None) -> Path:
    """Where ``convert`` writes without ``output``: the model library (:mod:`edgekit.library`), under the
    name ``<model>-<format>-<quantization>`` in lower case: ``./SmolLM2-135M`` + gguf, 4 bits ->
    ``<store>/smollm2-135m-gguf-q4_k_m``. What else tells two conversions of one model apart follows:
    a method other than the format's default (``-gptq``, ``-awq+gptq``), per-tensor overrides
    (``-custom``), a sparse FFN (``-sparse``) and pruning: structural before the format (``-d4``,
    ``-widthffn1024``), of weights after it (``-wanda50``, ``-sparsegpt2_4``); so converting again by
    another method, or pruning otherwise, does not collide with the first."""
    import re

    pruned = ""
    if recipe.prune:
        kind, _, rest = recipe.prune.partition(":")
        pruned = f"d{rest}" if kind == "depth" and rest.isdigit() else kind + re.sub(r"[^a-z0-9.]+", "", rest.lower())
    tags = [recipe.method] if recipe.method not in ("rtn", default_method(fmt)) else []
    for step in getattr(quantize, "extra_steps", ()):
        sparsity = getattr(step, "sparsity", None)  # a weight-pruning step (wanda, sparsegpt, magnitude)
        if isinstance(sparsity, str):
            amount = sparsity.replace(":", "_") if ":" in sparsity else f"{round(float(sparsity) * 100):d}"
            tags.append(f"{type(step).step}{amount}")
    if recipe.tensor_types or any(recipe.extra.get(k) is not None for k in ("output_type", "embed_type")):
        tags.append("custom")  # types chosen per tensor, by --tensor-type or -O output_type/embed_type
    if recipe.extra.get("sparse_ffn") is not None or recipe.extra.get("sparse_clusters") is not None:
        tags.append("sparse")
    # a model given as '.' or './' is named by its folder (Path('.').name is empty)
    return library.store_dir(create=True) / library.artifact_name(Path(model).absolute().resolve().name, pruned, default_output_suffix(fmt, recipe),
                                                                  *tags)


def default_output_suffix(fmt: str, recipe: ConvertRecipe) -> str:
    """``<format>-<quantization>`` of an artifact's name: ``gguf-q4_k_m``, ``onnx-uint4_b32``, ``gguf-90mb``."""
    return FORMATS.get(fmt)().default_output_suffix(recipe)


def convert(
    model: str | Path,
    to: str = "gguf",
    *,
    output: str | Path | None = None,
    recipe: ConvertRecipe | None = None,
    quantize: QuantizeConfig | None = None,
    options: Any = None,
    force: bool = False,
    progress: ProgressFn = no_progress,
) -> Artifact:
    """Convert a Hugging Face checkpoint folder (or a ``.gguf`` file, imported on the way) into an artifact
    folder (model file + edgekit.json).

    ``recipe``: what to produce (bits, preset, size budget, per-tensor types). ``quantize``: a method's
    own config (``GPTQConfig(damp=0.05, sink_weight=4)``, ``AWQGPTQConfig(awq_config=AWQConfig(...))``):
    every setting of the method, which then replaces ``recipe.method``. ``options``: the format's typed
    options (``OnnxOptions(block_size=128, lm_head="int8")``), the SDK's form of the CLI's ``-O``.
    Nothing is left under ``output`` if anything fails; an existing ``output`` needs ``force``, and must be
    an edgekit artifact. The returned artifact's ``notes`` say what else was done (an earlier artifact
    replaced, leftovers of killed conversions removed).
    """
    import dataclasses

    check_path(model, "the model")
    if output is not None:
        check_path(output, "output")
    check_type(to, str, "to", 'a format name such as "gguf" or "onnx"')
    recipe = recipe or ConvertRecipe()
    check_type(recipe, ConvertRecipe, "recipe", "a ConvertRecipe (e.g. ConvertRecipe(bits=4))")
    if quantize is not None:
        check_type(quantize, QuantizeConfig, "quantize", "a method's config such as GPTQConfig()")
    progress = progress or no_progress
    if not callable(progress):
        raise InputError(f"progress must be a function (description, done, total), got {type(progress).__name__}")
    if quantize is None and recipe.method == "rtn" and default_method(to):
        recipe = dataclasses.replace(recipe, method=default_method(to))  # --to aqlm: its own encoder
    if is_pipeline(Path(model).expanduser()):
        return _convert_pipeline(model, to, output, recipe, quantize, options, force, progress)
    fmt = FORMATS.get(to)()
    method = quantize.method if quantize is not None else recipe.method
    if default_preset(method) and to.lower() != "gguf":  # ternary: TQ1_0/TQ2_0 exist in GGUF alone
        raise InputError(f"--method {method} writes GGUF's {default_preset(method)}; use --to gguf (to=\"gguf\")")
    if default_preset(method) and recipe.budgeted:  # a budget would store the trits in Q2_K/IQ3_S: lossy, bigger
        raise InputError(f"--method {method} stores -1/0/+1 exactly in TQ2_0 (the default) or TQ1_0 (smaller, "
                         "slower); choose with --type, not --bpw or --size (ConvertRecipe's preset=, not bpw= or "
                         "size=)")
    if getattr(QUANTIZERS.get(method), "palette_only", False) and to.lower() != "coreml":
        raise InputError(f"--method {method} fits palettes, which only Core ML stores: use --to coreml --palettize 4 "
                         "(to=\"coreml\", options=CoreMLOptions(palettize=4))")
    if options is not None:
        if not dataclasses.is_dataclass(options) or type(options) is not getattr(fmt, "options_class", None):
            want = getattr(getattr(fmt, "options_class", None), "__name__", None)
            raise InputError(f"options for {to} must be {want}" if want else f"the {to} format takes no options")
        given = dataclasses.asdict(options)
        recipe = dataclasses.replace(recipe, bits=given.pop("bits", recipe.bits), extra={**recipe.extra, **given})
    if quantize is not None:
        recipe = dataclasses.replace(recipe, method=quantize.method, calib=getattr(quantize, "calib", recipe.calib))
        quantizer = QUANTIZERS.get(quantize.method)(quantize)
    else:
        quantizer = make_quantizer(recipe.method, recipe.calib)
    fmt.default_output_suffix(recipe)  # the format's options are checked before any work (an import, say)
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        ckpt, out, gguf_src = _open_source(Path(model).expanduser(), output, to, recipe, force, stack, progress,
                                           quantize)
        check_same_source(out, gguf_src or ckpt.path, force, notes)
        write_artifact(fmt, ckpt, out, gguf_src, recipe, quantizer, force, notes, progress)
    art = Artifact.open(out, verify=False)
    remember_checksums(art)
    art.notes = notes
    return art


def _convert_pipeline(model: str | Path, to: str, output: str | Path | None, recipe: ConvertRecipe,
                      quantize: QuantizeConfig | None, options: Any, force: bool, progress: ProgressFn) -> Artifact:
    """A diffusers pipeline: its UNet exported by the diffusion exporter of ``to`` (:mod:`..diffusion.convert`)."""
    from edgekit.converters.diffusion.convert import convert_pipeline

    if quantize is not None or options is not None or recipe.preset or recipe.bpw or recipe.size or recipe.prune:
        raise InputError("a diffusion pipeline takes --bits, --method and -O options (deepcache, lowrank, "
                         "block_size); drop --type/--bpw/--size/--prune and method configs (ConvertRecipe's bits=, "
                         "method= and extra= only; no quantize= or options=)")
    return convert_pipeline(model, to, output=output, bits=recipe.bits, method=recipe.method, options=recipe.extra,
                            force=force, progress=progress)


def _open_source(src: Path, output: str | Path | None, to: str, recipe: ConvertRecipe, force: bool,
                 stack: contextlib.ExitStack, progress: ProgressFn,
                 quantize: QuantizeConfig | None = None) -> tuple[HFCheckpoint, Path, Path | None]:
    """The checkpoint to convert, the output folder, and the GGUF it was imported from: a ``.gguf`` input
    is imported (dequantized, :func:`import_gguf`) into a scratch folder beside the output, removed when
    ``stack`` closes whatever happens."""
    if not (src.is_file() and src.suffix.lower() == ".gguf"):
        ckpt = HFCheckpoint.open(src)
        out = Path(output).expanduser() if output else default_output(ckpt.path, to, recipe, quantize)
        check_not_inside(ckpt.path, out)
        return ckpt, out, None
    out = Path(output).expanduser() if output else default_output(src.with_suffix(""), to, recipe, quantize)
    check_not_inside(src, out)
    check_output(out, force, is_artifact_folder)  # before the import, which takes a while
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {out.parent}: {exc.strerror or exc}; choose a writable -o") from exc
    scratch = stack.enter_context(temp_dir(out.parent, out.name, "import"))
    # the folder's name is the model's in what it converts to (GGUF's general.name): the file's, not "model"
    import_gguf(src, scratch / src.stem, progress=progress)
    return HFCheckpoint.open(scratch / src.stem), out, src


def calibration_applies(method: str, bpw: float | None = None, size: int | None = None) -> bool:
    """Whether calibration data matters for a conversion: a method that calibrates (its config has a
    ``calib`` field), or a size budget, ``bpw`` or ``size`` (it measures each tensor's sensitivity)."""
    cls = QUANTIZERS.get(method)
    return bpw is not None or size is not None or "calib" in getattr(cls.config_class, "__dataclass_fields__", {})


def default_method(to: str) -> str | None:
    """The method a format encodes with when none is named (``aqlm``: AQLM), or None."""
    return getattr(FORMATS.get(to), "default_method", None) if to in FORMATS.names() else None


def default_bits(to: str) -> int:
    """The ``--bits`` a format is converted at when none is given: 4, or the format's own (``aqlm``: 2)."""
    return getattr(FORMATS.get(to), "default_bits", 4) if to in FORMATS.names() else 4


def format_options(pairs: list[str], **given: Any) -> dict[str, Any]:
    """Options from ``key=value`` pairs (``-O`` of ``convert`` and ``run``, the TUI's options field; values parsed
    as JSON scalars where they parse) plus the named options given; the format or backend checks the names."""
    opts: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"-O {item!r}: expected KEY=VALUE")
        try:
            parsed = json.loads(value.strip().lower() if value.strip().lower() in ("true", "false") else value)
        except json.JSONDecodeError:
            parsed = value.strip()
        opts[key.strip().replace("-", "_")] = parsed
    return opts


def make_quantizer(method: str, calib: CalibConfig | None = None) -> Quantizer:
    """The registered quantizer ``method``, with ``calib`` for methods that calibrate."""
    return QUANTIZERS.get(method)(method_config(method, calib))


def default_preset(method: str) -> str | None:
    """The preset a method writes unless told otherwise (``ternary``: TQ2_0), or None."""
    return getattr(QUANTIZERS.get(method), "default_preset", None)


def distill_config(config: QuantizeConfig, heal: Any) -> QuantizeConfig:
    """``config`` with a distillation budget (a ``HealConfig``): for methods that train their student."""
    import dataclasses

    if "distill" not in getattr(config, "__dataclass_fields__", {}):
        raise InputError(f"--distill trains the student of --method ternary or of --to aqlm (AQLM's fine-tuning); "
                         f"{config.method} has none (distill= is a field of TernaryConfig and AQLMConfig)")
    return dataclasses.replace(config, distill=heal)


def method_config(method: str, calib: CalibConfig | None = None, steps: tuple[str, ...] = (),
                  prune: str | None = None) -> QuantizeConfig:
    """The config of the registered ``method`` with its defaults, ``calib`` for methods that calibrate,
    and more layer steps by name (``("awq",)``: each with its default config), run in stage order with
    the method's own (``imatrix`` + ``awq`` is AWQ; ``imatrix`` + ``gptq`` is GPTQ), and ``prune``, an
    unstructured pruning step (``"wanda:0.5"``, ``"sparsegpt:2:4"``, ``"magnitude:0.5"``)."""
    from edgekit.converters.quantize.steps import STEPS

    cls = QUANTIZERS.get(method)
    fields = getattr(cls.config_class, "__dataclass_fields__", {})
    if "calib" not in fields:
        if steps or prune:
            raise InputError(f"--steps and --prune (steps=, prune=) need a calibrated method (imatrix, gptq, "
                             f"awq...); {method} has no layer steps")
        return cls.config_class()
    extra = tuple(STEPS.get(n.strip()).config_class() for n in steps if n.strip())
    if prune:
        from edgekit.converters.quantize.steps.prune import from_spec

        extra += (from_spec(prune),)
    if "extra_steps" not in fields:
        if extra:
            raise InputError(f"--steps and --prune (steps=, prune=) run in the layer pipeline; {method} does not "
                             "use it")
        return cls.config_class(calib=calib or CalibConfig())
    return cls.config_class(calib=calib or CalibConfig(), extra_steps=extra)


def open_backend(target: str | Path | Artifact, backend: str | None = None, **options: Any) -> Backend:
    """Load an artifact (or a bare model file, or a Hugging Face folder) with ``backend`` (default: the
    preferred one for its format), after checking the artifact's files against the sha256 its manifest
    recorded: a file corrupted or edited since convert is a one-line :class:`CorruptFileError`, not garbage
    output. Checksums are remembered by size and mtime, so only a changed file is read twice. An artifact
    that another ``convert --force`` replaces while it loads is loaded again, as it now is."""
    return _load(target, backend, options)[1]


def _load(target: str | Path | Artifact, backend: str | None, options: dict[str, Any]) -> tuple[Artifact | None,
                                                                                                  Backend]:
    """:func:`open_backend`, and the artifact it loaded (None for a checkpoint folder)."""
    from edgekit.runtime.hostinfo import check_threads

    check_threads(options.get("n_threads"), "n_threads=")  # in the SDK's words (the CLI checks its -t first)
    if isinstance(target, Artifact):
        where = target.bare_file or target.path
    else:
        check_path(target)
        p = Path(target).expanduser()
        if is_checkpoint_folder(p):
            return None, _open_backend(p, backend, **options)  # a checkpoint folder: no manifest to check against
        where = library.resolve(p)

    def attempt(again: bool) -> tuple[Artifact, Backend]:
        # an Artifact given is used as it is unless its folder holds another conversion by now
        art = target if isinstance(target, Artifact) and not again and target.on_disk() else Artifact.open(where)
        if art.manifest.get("task") == "diffusion":
            raise InputError(f"{art.name} is a diffusion model (it makes images, not text): sample it with "
                             f"'edgekit run {art.name} --class 7 -n 16 -o grid.png' (SDK: edgekit.runtime.diffusion)")
        art.verify()
        return art, _open_backend(art, backend, **options)

    return while_not_replaced(where, attempt)


def generate(
    target: str | Path | Artifact,
    prompt: str | list[dict[str, str]],
    sampling: SamplingConfig | None = None,
    stats: GenerationStats | None = None,
    **options: Any,
) -> Iterator[str]:
    """Stream text from ``target``, as ``edgekit run`` does. A str prompt is sent as one user message through
    the chat template unless ``raw=True`` is in ``options``. A GGUF artifact decodes with ``edgekit run``'s
    defaults (flash attention, which drafting verifies with: greedy text is the same with ``draft=`` or
    ``speculative="ngram"`` as without; ``flash_attn=False`` turns it off).

    The model loads at the call, so a missing or corrupt artifact, a bad option or prompt raises here (an
    :class:`~edgekit.errors.EdgekitError`), not at the first piece. The pieces come as they are decoded; the
    model is freed when they run out, on ``close()`` (or leaving a ``with`` block on the result), or when the
    result is dropped. Each call loads the model again: to ask it more than once, keep it loaded with
    :func:`open_backend` and call its ``generate`` with messages::

        with api.open_backend(art, flash_attn=True) as backend:   # flash_attn=True: as generate decodes GGUF
            for q in questions:
                answer = "".join(backend.generate([{"role": "user", "content": q}], api.SamplingConfig()))
    """
    from edgekit.runtime.llamacpp_decoding import interactive_defaults

    raw = options.pop("raw", False)
    messages = prompt if raw or not isinstance(prompt, str) else [{"role": "user", "content": prompt}]
    check_generate_args(messages, sampling, stats)  # before a load is spent on them
    if isinstance(target, (str, Path, Artifact)):  # anything else is open_backend's one-line error
        options = {**interactive_defaults(target), **options}
    backend = open_backend(target, **options)
    try:
        pieces = backend.generate(messages, sampling or SamplingConfig(), stats)
    except BaseException:
        backend.close()
        raise
    return _Reply(backend, pieces)


class _Reply(Iterator[str]):
    """What :func:`generate` returns: the text pieces of one generation, and the backend loaded for it, closed
    when they run out, on :meth:`close` (a ``with`` block's end) or when this is dropped unfinished."""

    def __init__(self, backend: Backend, pieces: Iterator[str]) -> None:
        self._backend: Backend | None = backend
        self._pieces = pieces

    def __iter__(self) -> _Reply:
        return self

    def __next__(self) -> str:
        if self._backend is None:
            raise StopIteration
        try:
            return next(self._pieces)
        except BaseException:  # the end, an error or Ctrl-C: the model is freed at once, as a with block would
            self.close()
            raise

    def close(self) -> None:
        """Stop the generation (the backend cancels it) and free the model; closing again does nothing."""
        backend, self._backend = self._backend, None
        if backend is None:
            return
        try:
            getattr(self._pieces, "close", lambda: None)()
        finally:
            backend.close()

    def __enter__(self) -> _Reply:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


def evaluate(
    target: str | Path | Artifact,
    text_file: str | Path,
    cfg: EvalConfig | None = None,
    ref: str | Path | None = None,
    progress: ProgressFn | None = None,
    record: bool = True,
    **options: Any,
) -> EvalResult:
    """Perplexity of an artifact on a text file; with ``ref`` (a checkpoint folder) also KL and top-1.

    The result is added to the artifact's manifest when ``record`` and the target is an artifact folder.
    """
    cfg = cfg or EvalConfig()
    check_type(cfg, EvalConfig, "cfg", "an EvalConfig (e.g. EvalConfig(ctx=512))")
    check_path(text_file, "the text file")
    text = read_text(text_file)
    text_name, text_sha = text_identity(text_file)
    options.setdefault("n_ctx", cfg.ctx)
    if ref is not None:
        ref = library.resolve(ref)
    if ref is not None and is_artifact_folder(ref):
        Artifact.open(ref).verify()  # a corrupt reference is refused before the target spends a load
    measured, loaded = _load(target, options.pop("backend", None), options)
    with loaded as backend:
        if ref is None:
            result = perplexity(backend, text, cfg, progress=progress)
        else:
            with open_backend(ref, n_ctx=cfg.ctx, n_threads=options.get("n_threads")) as ref_backend:
                result = perplexity(backend, text, cfg, ref=ref_backend, progress=progress)
    result.text_name, result.text_sha256 = text_name, text_sha
    result.ref = str(Path(ref).resolve()) if ref is not None else None
    record_as = {**result.to_json(), "text": str(Path(text_file).expanduser().resolve())}
    try:
        if record and measured is not None:  # the artifact measured, if its folder still holds it
            measured.record_eval(record_as)
    except (InputError, DiskFullError, OSError) as exc:  # a read-only artifact: the measurement still counts
        notice(f"{exc}; the result was not recorded in its manifest (record=False, --no-record, skips recording)",
               stacklevel=2)
    return result


def evaluate_streaming(
    target: str | Path | Artifact,
    text_file: str | Path,
    kv_window: int,
    kv_sinks: int = 4,
    chunk: int = 32,
    max_tokens: int | None = None,
    progress: ProgressFn | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Perplexity of a long text streamed ``chunk`` tokens at a time through a KV window of ``kv_window``
    tokens keeping the first ``kv_sinks``: what a long chat sees of its history. Returns the perplexity,
    tokens scored, the most cache cells held and the tokens evicted."""
    import math

    # in the SDK's words: `eval --max-tokens` checks its flag before it calls this
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2):
        raise InputError(f"max_tokens= must be None (the whole text) or a whole number >= 2 (a token is scored from "
                         f"the ones before it), got {max_tokens!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise InputError(f"chunk must be a whole number of tokens >= 1, got {chunk!r}")
    text = read_text(text_file)
    with open_backend(target, kv_window=kv_window, kv_sinks=kv_sinks, **options) as backend:
        if not isinstance(backend, StreamsLongText):
            raise InputError(f"the {backend.name} backend cannot stream a text through a KV window")
        tokens = backend.tokenize(text, special=False)[: max_tokens or None]  # plain text, as eval reads it
        if len(tokens) < 2:
            raise InputError(f"{text_file} has fewer than 2 tokens")
        report = (lambda done, total: progress("streaming", done, total)) if progress else None
        nll, info = backend.stream_nll(tokens, chunk=chunk, progress=report)
    mean = float(nll.mean())
    text_name, text_sha = text_identity(text_file)
    return {"ppl": math.exp(mean), "text_name": text_name, "text_sha256": text_sha,
            "tokens_scored": int(nll.size), "kv_window": kv_window, "kv_sinks": kv_sinks,
            "chunk": chunk, "peak_cells": int(info["peak_cells"]), "evicted": int(info["kv"]["evicted"])}


def inspect(target: str | Path, ctx: int | None = None) -> dict[str, Any]:
    """Architecture, parameters, per-tensor types, size, bits per weight and memory at ``ctx`` (by default
    4096 tokens, or the model's trained context where that is shorter). A Hugging Face checkpoint folder is
    described as it stands, with what each ``convert --bits N`` would make of it (``gguf``: tensor bytes,
    bits per weight and fallbacks of each mix)."""
    from edgekit.describe import inspect_target

    check_path(target)
    # read again where another convert --force swapped the folder mid-read (two artifacts' files look corrupt)
    return while_not_replaced(library.resolve(target), lambda _again: inspect_target(target, ctx))
