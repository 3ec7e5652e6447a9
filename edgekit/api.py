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
    MANIFEST_NAME,
    SCHEMA,
    Artifact,
    checksum_files,
    is_artifact_folder,
    now_iso,
    remember_checksums,
    tool_versions,
    write_manifest,
)
from edgekit.calibration import CalibConfig
from edgekit.converters.diffusion.pipeline import is_pipeline
from edgekit.converters.formats.base import FORMATS, ConvertRecipe, ProgressFn, no_progress
from edgekit.converters.quantize.base import QUANTIZERS, QuantizeConfig, Quantizer
from edgekit.errors import DiskFullError, InputError, OutputExistsError, notice
from edgekit.evaluate import (
    EvalConfig,
    EvalResult,
    evaluate_diffusion,
    is_diffusion,
    perplexity,
    read_text,
    text_identity,
)
from edgekit.fsutil import atomic_dir, check_not_inside, check_output, sha256_files, temp_dir
from edgekit.importer import import_gguf
from edgekit.model import HFCheckpoint
from edgekit.runtime.base import (
    Backend,
    GenerationStats,
    SamplingConfig,
    StreamsLongText,
    is_checkpoint_folder,
)
from edgekit.runtime.base import open_backend as _open_backend
from edgekit.runtime.plan import offload_options
from edgekit.runtime.plan import plan_artifact as plan
from edgekit.validate import check_path, check_stream_tokens, check_type

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
        raise InputError(f"--method {method} writes GGUF's {default_preset(method)}; use --to gguf")
    if default_preset(method) and recipe.budgeted:  # a budget would store the trits in Q2_K/IQ3_S: lossy, bigger
        raise InputError(f"--method {method} stores -1/0/+1 exactly in TQ2_0 (the default) or TQ1_0 (smaller, "
                         "slower); choose with --type, not --bpw or --size")
    if getattr(QUANTIZERS.get(method), "palette_only", False) and to.lower() != "coreml":
        raise InputError(f"--method {method} fits palettes, which only Core ML stores: use --to coreml --palettize 4")
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
        _check_same_source(out, gguf_src or ckpt.path, force, notes)
        _write(fmt, ckpt, out, gguf_src, recipe, quantizer, force, notes, progress)
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
                         "block_size); drop --type/--bpw/--size/--prune and method configs")
    return convert_pipeline(model, to, output=output, bits=recipe.bits, method=recipe.method, options=recipe.extra,
                            force=force, progress=progress)


def _check_same_source(out: Path, source: Path, force: bool, notes: list[str]) -> None:
    """An existing artifact at ``out`` converted from another source (two models in folders of one name share
    a default name) is named as such: refused without ``force``, and its replacement said with it."""
    try:
        made_from = json.loads((out / MANIFEST_NAME).read_text())["source"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if not isinstance(made_from, str) or made_from == str(source.resolve()):
        return
    if not force:
        raise OutputExistsError(f"{out} already exists and holds a conversion of {made_from}, not of {source}; "
                                "choose another -o (output=), or pass --force (force=True) to replace it")
    notes.append(f"the artifact replaced at {out} was a conversion of {made_from}")


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


def _write(fmt: Any, ckpt: HFCheckpoint, out: Path, gguf_src: Path | None, recipe: ConvertRecipe,
           quantizer: Quantizer, force: bool, notes: list[str], progress: ProgressFn) -> None:
    per_block = ckpt.hparams.ffn_widths is not None or (recipe.prune or "").startswith("width:auto")
    if per_block and fmt.name not in ("gguf", "onnx"):
        raise InputError(f"per-block FFN widths (width:auto) are written to GGUF (llama.cpp's deci) and ONNX; "
                         f"--to {fmt.name} takes uniform width pruning (width:ffn=N) instead")
    with atomic_dir(out, force=force, replaceable=is_artifact_folder, notes=notes) as tmp:
        source = ckpt
        with _structured(ckpt, recipe, quantizer, out, progress) as (ckpt, pruned):
            fields = fmt.convert(ckpt, tmp, recipe, quantizer, progress)
        notes.extend(fields.pop("notes", []))  # what the format warns about (--bits far from its bpw)
        if pruned:
            fields["pruned"] = pruned
        sparsity = getattr(quantizer, "report", {}).get("sparsity")
        if sparsity:
            steps = [c for c in quantizer.config.steps() if hasattr(c, "sparsity")]  # type: ignore[attr-defined]
            values = [v for layer in sparsity.values() for v in layer.values()]
            fields["sparsity"] = {"steps": [f"{c.step}:{c.sparsity}" for c in steps],
                                  "mean": round(sum(values) / len(values), 4), "linears": len(values)}
            kept = getattr(quantizer, "report", {}).get("zeros_kept", {})
            pruned = {(i, n): v for i, layer in sparsity.items() for n, v in layer.items()}
            stored = [pruned[i, n] * kept.get(i, {}).get(n, 1.0) for i, n in pruned]  # unrounded (float): all kept
            # the share of weights the file stores as exact zeros: below "mean" where a grid with a minimum
            # (Q4_1, Q4_K, Q5_K, Q2_K) rounds a pruned weight to its nearest value, within half a step of 0
            fields["sparsity"]["stored"] = round(sum(stored) / len(stored), 4)
        ternary = getattr(quantizer, "report", {}).get("ternary")
        if ternary:
            fields["ternary"] = ternary
        # a format corrects the recipe where its options decide (MLC's --quant picks the bits)
        corrections = fields.pop("recipe", {})
        manifest: dict[str, Any] = {
            "schema": SCHEMA,
            "format": fmt.name,
            "created": now_iso(),
            "source": {
                "path": str((gguf_src or source.path).resolve()),
                "sha256": sha256_files([gguf_src] if gguf_src else source.weight_files),
                **({"imported_from": "gguf"} if gguf_src else {}),
                "architecture": (source.config.get("architectures") or ["?"])[0],
                "n_params": source.n_params,
            },
            "recipe": {**recipe.to_json(), "quantizer": quantizer.config.to_json(), **corrections},
            "tools": tool_versions("gguf", "numpy", "safetensors", "torch", "transformers"),
            **fields,
        }
        manifest["sha256"] = checksum_files(tmp)  # checked before each use: a changed file is caught
        write_manifest(tmp, manifest)


@contextlib.contextmanager
def _structured(ckpt: HFCheckpoint, recipe: ConvertRecipe, quantizer: Quantizer, out: Path,
                progress: ProgressFn) -> Iterator[tuple[HFCheckpoint, dict[str, Any] | None]]:
    """The checkpoint to convert: ``ckpt`` itself, or (``recipe.prune``) a pruned copy in a scratch folder
    beside the output, removed afterwards whatever happens."""
    if not recipe.prune:
        yield ckpt, None
        return
    from edgekit.converters import structure

    calib = recipe.calib or getattr(quantizer.config, "calib", None) or CalibConfig()
    with temp_dir(out.parent, out.name, "prune") as scratch:
        path, info = structure.apply(ckpt, recipe.prune, calib, scratch / ckpt.path.name, progress)  # keeps its name
        if recipe.heal is not None:
            from edgekit.converters.structure.heal import heal

            info["heal"] = heal(ckpt, path, recipe.prune, recipe.heal, calib, progress)
        yield HFCheckpoint.open(path), info


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
                         f"{config.method} has none")
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
            raise InputError(f"--steps and --prune need a calibrated method (imatrix, gptq, awq...); {method} "
                             "has no layer steps")
        return cls.config_class()
    extra = tuple(STEPS.get(n.strip()).config_class() for n in steps if n.strip())
    if prune:
        from edgekit.converters.quantize.steps.prune import from_spec

        extra += (from_spec(prune),)
    if "extra_steps" not in fields:
        if extra:
            raise InputError(f"--steps and --prune run in the layer pipeline; {method} does not use it")
        return cls.config_class(calib=calib or CalibConfig())
    return cls.config_class(calib=calib or CalibConfig(), extra_steps=extra)


def open_backend(target: str | Path | Artifact, backend: str | None = None, **options: Any) -> Backend:
    """Load an artifact (or a bare model file, or a Hugging Face folder) with ``backend`` (default: the
    preferred one for its format), after checking the artifact's files against the sha256 its manifest
    recorded: a file corrupted or edited since convert is a one-line :class:`CorruptFileError`, not garbage
    output. Checksums are remembered by size and mtime, so only a changed file is read twice."""
    if not isinstance(target, Artifact):
        check_path(target)
        p = Path(target).expanduser()
        if is_checkpoint_folder(p):
            return _open_backend(p, backend, **options)  # a checkpoint folder: no manifest to check against
        target = Artifact.open(p)
    if target.manifest.get("task") == "diffusion":
        raise InputError(f"{target.name} is a diffusion model (it makes images, not text): sample it with "
                         f"'edgekit run {target.name} --class 7 -n 16 -o grid.png' (SDK: edgekit.runtime.diffusion)")
    target.verify()
    return _open_backend(target, backend, **options)


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
    ``speculative="ngram"`` as without; ``flash_attn=False`` turns it off)."""
    from edgekit.runtime.llamacpp_decoding import interactive_defaults

    raw = options.pop("raw", False)
    messages = prompt if raw or not isinstance(prompt, str) else [{"role": "user", "content": prompt}]
    if isinstance(target, (str, Path, Artifact)):  # anything else is open_backend's one-line error
        options = {**interactive_defaults(target), **options}
    with open_backend(target, **options) as backend:
        yield from backend.generate(messages, sampling or SamplingConfig(), stats)


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
    with open_backend(target, **options) as backend:
        if ref is None:
            result = perplexity(backend, text, cfg, progress=progress)
        else:
            with open_backend(ref, n_ctx=cfg.ctx, n_threads=options.get("n_threads")) as ref_backend:
                result = perplexity(backend, text, cfg, ref=ref_backend, progress=progress)
    result.text_name, result.text_sha256 = text_name, text_sha
    result.ref = str(Path(ref).resolve()) if ref is not None else None
    record_as = {**result.to_json(), "text": str(Path(text_file).expanduser().resolve())}
    try:
        if record and not isinstance(target, Artifact):
            p = library.resolve(target)
            if (p / "edgekit.json").exists():
                Artifact.open(p).record_eval(record_as)
        elif record and isinstance(target, Artifact):
            target.record_eval(record_as)
    except (InputError, DiskFullError, OSError) as exc:  # a read-only artifact: the measurement still counts
        notice(f"{exc}; the result was not recorded in its manifest (--no-record skips recording)", stacklevel=2)
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

    check_stream_tokens(max_tokens)
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

    return inspect_target(target, ctx)
