"""``edgekit convert``: a checkpoint (or a GGUF) into an artifact of any registered format, with its method,
budget, pruning, healing and format options; registered on the main app by :mod:`edgekit.cli.main`. Heavy
imports stay inside the function."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from edgekit.cli import size_opts
from edgekit.cli.flags import check_calib_seqlen, typed_flags
from edgekit.cli.ui import (
    err,
    handle_errors,
    out,
    print_json,
    progress_bar,
    progress_unless_piped,
    say,
    shown_when_started,
)
from edgekit.errors import InputError


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)


def _parse_tensor_types(values: list[str]) -> tuple[tuple[str, str], ...]:
    from edgekit.errors import InputError

    pairs = []
    for v in values:
        if "=" not in v:
            raise InputError(f"--tensor-type {v!r} must look like REGEX=TYPE, e.g. 'ffn_down=Q6_K'")
        pattern, _, qtype = v.rpartition("=")
        pairs.append((pattern, qtype.strip()))
    return tuple(pairs)


@handle_errors
def convert(
    cli: typer.Context,
    model: Path = typer.Argument(..., help="Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer), "
                                 "or a .gguf file (imported on the way)."),
    to: str = typer.Option("gguf", "--to", help="Output format: gguf, onnx, coreml, mlc or aqlm."),
    bits: int | None = typer.Option(4, "--bits", help="GGUF: 2, 3, 4, 5, 6 or 8 (a llama.cpp-style _M mix); "
                                    "ONNX: 4 or 8 (MatMulNBits), 16 or 32 (float); Core ML: 4 or 8 (blockwise), "
                                    "16 (fp16); AQLM: 2 (2x8 codebooks, its default), 1, 3, 4."),
    type_: str | None = typer.Option(None, "--type", help="A preset by name (Q4_K_M, Q4_0, Q8_0, F16...)."),
    bpw: float | None = typer.Option(None, "--bpw", help="Size budget in bits per weight: types per tensor by "
                                     "measured sensitivity."),
    size: str | None = typer.Option(None, "--size", help=size_opts.SIZE_HELP, show_default=False),
    fit: str | None = typer.Option(None, "--fit", help=size_opts.FIT_HELP, show_default=False),
    ctx: int = typer.Option(4096, "--ctx", "-c", help=size_opts.CTX_HELP),
    bpw_types: str = typer.Option("", "--bpw-types", help="Comma-separated types --bpw may use (default: all)."),
    tensor_type: list[str] = typer.Option([], "--tensor-type", help="REGEX=TYPE override; repeatable."),
    method: str = typer.Option("rtn", "--method", "-m", help="rtn, imatrix, gptq, awq, awq+gptq; squeezellm "
                               "(sensitivity-weighted palettes, with --palettize); ternary (-1/0/+1 linears, "
                               "TQ2_0 unless --type)."),
    palettize: int | None = typer.Option(None, "--palettize", help="Core ML: 2, 3, 4, 6 or 8-bit palettes "
                                         "(k-means; sensitivity-weighted with --method squeezellm)."),
    prune: str | None = typer.Option(None, "--prune", help="depth:K drops the K least influential blocks "
                                     "(faster: depth:K:angular, depth:layers=3,7); wanda:0.5, sparsegpt:2:4, "
                                     "magnitude:0.5 prune weights before rounding (quality per parameter; no "
                                     "CPU runtime skips zeros)."),
    params: str | None = typer.Option(None, "--params", help="With --prune width:auto: the parameter budget (100M, "
                                      "1.5B); every block gets its own FFN width."),
    heal: str | None = typer.Option(None, "--heal", help="With --prune depth/width: distil the pruned model from "
                                    "the unpruned one for this long (20m, 1h; at most 7d); Ctrl-C and re-run "
                                    "resume it."),
    distill: str | None = typer.Option(None, "--distill", help="With --method ternary: train the ternary model by "
                                       "distillation from the float one for this long (60m, 2h; at most 7d); "
                                       "Ctrl-C and re-run resume it."),
    steps: str = typer.Option("", "--steps", help="More layer steps by name, comma-separated (see 'edgekit "
                              "registry'), run with the method's in stage order; e.g. --method imatrix --steps awq."),
    imatrix: Path | None = typer.Option(None, "--imatrix", help="A llama.cpp importance matrix (llama-imatrix's "
                                        ".gguf or legacy .dat) to round with instead of calibrating: "
                                        "llama-quantize --imatrix's rounding, for any --to."),
    calib: str = typer.Option("self", "--calib", help="Calibration data: 'self' (sampled from the model) or a text file."),
    calib_samples: int = typer.Option(32, "--calib-samples", help="Calibration sequences."),
    calib_seqlen: int = typer.Option(512, "--calib-seqlen", help="Tokens per calibration sequence."),
    block_size: int | None = typer.Option(None, "--block-size", help="ONNX, Core ML: weights per quantization block "
                                          "(32 default, 16..256)."),
    sym: bool | None = typer.Option(None, "--sym/--asym", help="ONNX: symmetric grid or zero points per block "
                                    "(default: asymmetric 4-bit, symmetric 8-bit)."),
    dtype: str | None = typer.Option(None, "--dtype", help="ONNX: fp32 or fp16 activations."),
    quant: str | None = typer.Option(None, "--quant", help="MLC: q4f16_1 (default), q4f16_0, q4f32_1, q3f16_1, "
                                     "q3f16_0, q0f16, q0f32."),
    compile_target: str | None = typer.Option(None, "--compile", help="MLC: build the model library for this device "
                                              "with mlc_llm compile (android, iphone, webgpu, ...; needs mlc_llm)."),
    option: list[str] = typer.Option([], "--option", "-O", help="Format option KEY=VALUE; repeatable (GGUF: "
                                     "output_type=Q8_0, embed_type=Q6_K, name=...; ONNX: "
                                     "embed=float|int8|shared, lm_head=int4|int8|float|tied, accuracy_level=0..4, "
                                     "opset=17..23, external_data=true|false; AQLM: scheme=2x8|1x16, "
                                     "embedding=f16|fp8)."),
    draft_for: Path | None = typer.Option(None, "--draft-for", help="Make a speculative-decoding draft for this "
                                          "target (checkpoint or artifact): GGUF, a third of the blocks, distilled "
                                          "(--heal, default 20m), Q4_0 (--type); ONNX, the whole model at 8 bits "
                                          "(--bits); use it with run --draft."),
    sparse_ffn: float | None = typer.Option(None, "--sparse-ffn", help="GGUF: skip this share of FFN neurons per "
                                            "token, 0 < S < 1 (hot set always, cold clusters picked by a trained "
                                            "router; a Qwen2-MoE file stock llama.cpp runs), e.g. 0.5."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Artifact folder (default: MODEL-FORMAT-QUANT "
                                       "in the model library, see 'edgekit ls')."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
    threads: int | None = typer.Option(None, "--threads", "-t", help="CPU threads for calibration and other "
                                       "PyTorch work (default: the physical cores)."),
) -> None:
    """Convert a checkpoint into an artifact folder.

    Examples:
      edgekit convert ./SmolLM2-135M --to gguf --bits 4    # -> the library: smollm2-135m-gguf-q4_k_m
      edgekit convert ./SmolLM2-135M --size 90MB           # types per tensor to a file size
      edgekit convert ./SmolLM2-135M --fit android:R58M12345 --ctx 4096   # the best that fits the phone
      edgekit convert ./SmolLM2-135M --type Q4_0 -o ./smol-q4_0
      edgekit convert ./SmolLM2-135M --bits 4 --method gptq -t 1        # one thread on a busy machine
      edgekit convert ./SmolLM2-135M --bits 4 --imatrix imatrix.gguf   # from llama-imatrix
      edgekit convert ./SmolLM2-135M --bits 4 --tensor-type 'ffn_down=Q6_K'
      edgekit convert ./SmolLM2-135M --bits 4 --method gptq                # calibrates on its own samples
      edgekit convert ./SmolLM2-135M --bits 4 --method awq+gptq --calib corpus.txt
      edgekit convert ./SmolLM2-135M --bpw 3.5 --method gptq               # mixed precision to a budget
      edgekit convert ./SmolLM2-135M --bits 4 --method gptq --steps awq    # a recipe of layer steps
      edgekit convert ./SmolLM2-135M --bits 4 --method gptq --prune sparsegpt:0.5
      edgekit convert ./SmolLM2-135M --bits 4 --prune depth:6               # 6 fewer blocks: faster
      edgekit convert ./SmolLM2-135M --bits 4 --prune width:ffn=1024 --heal 20m
      edgekit convert ./SmolLM2-135M --bits 4 --prune width:auto --params 100M --heal 30m   # per-block widths
      edgekit convert ./SmolLM2-135M --to onnx --bits 4 --method gptq      # MatMulNBits, block 32
      edgekit convert ./SmolLM2-135M --to onnx --bits 32                   # float graph with KV cache
      edgekit convert ./SmolLM2-135M --to coreml --bits 4 --method gptq    # Core ML, stateful KV cache
      edgekit convert ./SmolLM2-135M --to coreml --palettize 4 --method squeezellm
      edgekit convert ./SmolLM2-135M --to mlc --quant q4f16_1 --method gptq   # MLC-LLM weights + chat config
      edgekit convert ./model.Q4_K_M.gguf --to mlc                          # any GGUF in (imported on the way)
      edgekit convert ./SmolLM2-135M --to aqlm --bits 2                    # AQLM 2x8: transformers + aqlm run it
      edgekit convert ./SmolLM2-135M --to aqlm --size 86MB                 # as many 8-bit codebooks as fit: 2x8
      edgekit convert ./SmolLM2-135M --to aqlm --size 86MB -O embedding=fp8  # fp8 embedding: 4x8 in the same 86 MB
      edgekit convert ./SmolLM2-135M --draft-for ./SmolLM2-135M -o ./smol-draft   # then: run --draft ./smol-draft
      edgekit convert ./SmolLM2-135M --to onnx --draft-for ./smol-onnx16 -o ./smol-onnx-draft   # 8-bit ONNX draft
      edgekit convert ./SmolLM2-135M --method ternary                      # post-hoc ternary (TQ2_0)
      edgekit convert ./SmolLM2-135M --method ternary --distill 60m --calib self   # ternary QAT by distillation
      edgekit convert ./bitnet-b1.58-model --type TQ2_0                    # a BitNet b1.58 checkpoint
      edgekit convert ./SmolLM2-135M --bits 4 --sparse-ffn 0.5    # hot/cold FFN: half the neurons skipped
      edgekit convert ./digits-4step --to onnx --bits 8 --method gptq   # a diffusers pipeline: UNet graphs
      edgekit convert ./digits-4step --to onnx --bits 4 -O lowrank=16 -O deepcache=false
    """
    from edgekit import api
    from edgekit.runtime.hostinfo import check_threads

    check_threads(threads)  # before any work, whether or not PyTorch runs
    check_calib_seqlen(calib_seqlen)  # and the model's trained context once calibration is known to run
    step_names = tuple(n.strip() for n in steps.split(",") if n.strip())
    structural = prune if prune and prune.startswith(("depth:", "width:")) else None
    if structural:
        prune = None
    if params is not None:
        if not (structural or "").startswith("width:auto"):
            raise InputError("--params is the budget of --prune width:auto; add it (--prune width:auto --params 100M)")
        structural = f"{structural},params={params}"
    if imatrix is not None:
        method = _imatrix_method(imatrix, method, step_names, prune, structural, sparse_ffn, draft_for, distill)
    if method == "rtn" and api.default_method(to):
        method = api.default_method(to)  # --to aqlm encodes with AQLM
    typed = typed_flags(cli, "bits", "ctx", "calib", "calib_samples", "calib_seqlen")
    _check_ignored_flags(typed, bits, type_, bpw, size, fit, bpw_types)
    if "bits" not in typed:
        bits = api.default_bits(to)  # AQLM's is 2 (2x8), the others' 4
    if (step_names or prune) and method == "rtn":
        method = "imatrix"  # steps run in the calibrated pipeline; its default rounding is imatrix RTN
    size_bytes, fit_target = size_opts.size_target(model, to, size, fit, ctx, quiet=as_json)
    calibrated = (api.calibration_applies(method, bpw, size_bytes) or bool(structural)
                  or (draft_for is not None and to == "gguf")  # the GGUF draft recipe distils
                  or sparse_ffn is not None)
    if calibrated:  # only calibration, pruning and healing run PyTorch; importing torch costs seconds
        check_calib_seqlen(calib_seqlen, model)
    elif typed & {"calib", "calib_samples", "calib_seqlen"} and not as_json:
        flags = ", ".join("--" + n.replace("_", "-") for n in sorted(typed & {"calib", "calib_samples", "calib_seqlen"}))
        how = ("--imatrix FILE takes its importances from the file, not from calibration data"  # the flag given
               if method == "imatrix-file" else f"--method {method} rounds without calibration data")
        say(err, f"{flags}: {how}: no effect (calibrated: "
                 "--method gptq, awq or imatrix, or --bpw/--size)", "note:", "dim")
    if palettize is not None and "bits" in typed:
        raise InputError(f"--palettize {palettize} sets the bits (palettes of 2^{palettize} values); drop --bits")
    extra = api.format_options(option, block_size=block_size, symmetric=sym, dtype=dtype, palettize=palettize,
                               quant=quant, compile=compile_target,
                               sparse_ffn=None if sparse_ffn is None else str(sparse_ffn))
    _check_sparse_ffn(extra.get("sparse_ffn"), f"--sparse-ffn {sparse_ffn:g}" if sparse_ffn is not None
                      else f"-O sparse_ffn={extra.get('sparse_ffn')}")
    _check_format_flags(to, {"--block-size": ("block_size", block_size), "--sym/--asym": ("symmetric", sym),
                             "--dtype": ("dtype", dtype), "--palettize": ("palettize", palettize),
                             "--quant": ("quant", quant), "--compile": ("compile", compile_target),
                             "--sparse-ffn": ("sparse_ffn", sparse_ffn)})
    type_ = type_ or (None if bpw or size_bytes else api.default_preset(method))
    recipe = api.ConvertRecipe(extra=extra, bits=None if type_ or bpw or size_bytes else bits, preset=type_, bpw=bpw,
                               size=size_bytes, method=method,
                               bpw_types=tuple(t.strip() for t in bpw_types.split(",") if t.strip()),
                               tensor_types=_parse_tensor_types(tensor_type),
                               calib=api.CalibConfig(source=calib, samples=calib_samples, seqlen=calib_seqlen)
                               if calibrated else None, prune=structural,
                               heal=_heal_config(heal) if draft_for is None else None)
    if draft_for is not None:
        from edgekit.converters.draft import DEFAULT_HEAL, DEFAULT_TYPE, ONNX_DRAFT_BITS, draft_recipe

        if to == "onnx":
            import dataclasses

            from edgekit.converters.draft import onnx_draft_recipe

            given = "bits" in typed or bpw or size_bytes
            recipe = onnx_draft_recipe(model, draft_for, dataclasses.replace(recipe, heal=_heal_config(heal)),
                                       bits=None if given else ONNX_DRAFT_BITS)
        elif to != "gguf":
            raise InputError("--draft-for makes GGUF drafts (llama.cpp) and ONNX drafts (onnxruntime); use --to gguf "
                             "or --to onnx")
        else:
            recipe = draft_recipe(model, draft_for, recipe, heal=heal or DEFAULT_HEAL,
                                  preset=None if type_ or bpw else DEFAULT_TYPE)
    quantize = api.method_config(method, recipe.calib, step_names, prune) if step_names or prune else None
    if imatrix is not None:
        from edgekit.converters.quantize.imatrix_file import ImatrixFileConfig

        quantize = ImatrixFileConfig(file=str(imatrix))
    if distill is not None:
        quantize = api.distill_config(quantize or api.method_config(method, recipe.calib),
                                      _heal_config(distill, "--distill"))
    held: list[warnings.WarningMessage] = []
    if calibrated:  # its note on the CPUs' load waits for the job to start: a refused flag comes alone
        from edgekit.runtime.hostinfo import use_torch_threads

        with warnings.catch_warnings(record=True) as held:
            warnings.simplefilter("always")
            use_torch_threads(threads)
    with progress_bar(progress_unless_piped(as_json)) as progress, size_opts.explain_fit(fit_target):
        progress = shown_when_started(said_once(progress), held)
        art = api.convert(model, to, output=output, recipe=recipe, quantize=quantize, force=force, progress=progress)
    for note in art.notes:  # on stderr, so --json output stays a manifest
        warn = note.startswith("warning: ")
        say(err, note.removeprefix("warning: "), "warning:" if warn else "", "yellow" if warn else "")
    m = art.manifest
    if m.get("task") == "diffusion" and not as_json:
        graphs = ", ".join(g["file"] for g in m["graphs"].values())
        say(out, f"{art.path}  ({m['size_bytes'] / 1e6:.2f} MB, {m['preset']}: {graphs})", "wrote", "green")
        return
    if fit_target is not None:
        size_opts.report_fit(art, fit_target)
    if as_json:
        print_json(m)
        return
    fallbacks = sum(1 for t in m.get("tensors", {}).values() if "wanted" in t)
    fell = (f", {fallbacks} tensor{'s' if fallbacks != 1 else ''} fell back to another type: see 'edgekit inspect'"
            if fallbacks else "")
    say(out, f"{art.path}  ({m['size_bytes'] / 1e6:.1f} MB, {m['bpw']:.2f} bpw, {m['preset']}{fell})", "wrote", "green")


def said_once(progress: Callable[[str, int, int], None]) -> Callable[[str, int, int], None]:
    """``progress`` where a ``note: ...`` description (a resumed training, a reused one) is said once as a line
    of its own on stderr (with --json too, as the other notes) instead of a bar's label, which the next step
    would overwrite at once."""
    said: set[str] = set()

    def report(desc: str, done: int, total: int) -> None:
        if not desc.startswith("note: "):
            progress(desc, done, total)
        elif desc not in said:
            said.add(desc)
            say(err, desc.removeprefix("note: "), "note:", "dim")
    return report


def _imatrix_method(path: Path, method: str, steps: tuple[str, ...], prune: str | None, structural: str | None,
                    sparse_ffn: float | None, draft_for: Path | None, distill: str | None) -> str:
    """``--imatrix FILE``: the method that rounds with it, after reading the file (a wrong one fails before any
    work) and refusing what it cannot go with."""
    from edgekit.converters.quantize.imatrix_file import read_imatrix

    if method not in ("rtn", "imatrix"):
        raise InputError(f"--imatrix FILE weights round-to-nearest as llama-quantize does; --method {method} does not "
                         "use it: drop one of them")
    other = next((flag for flag, given in (("--steps", steps), ("--prune", prune or structural),
                                           ("--sparse-ffn", sparse_ffn is not None), ("--draft-for", draft_for),
                                           ("--distill", distill)) if given), None)
    if other:
        raise InputError(f"{other} runs edgekit's calibration, which measures its own importances; drop --imatrix "
                         "FILE (or the other flag)")
    read_imatrix(path)
    return "imatrix-file"


def _check_sparse_ffn(value: Any, given: str) -> None:
    """The share of FFN neurons to skip is above 0. At 0 every cluster runs: the router has nothing to learn
    to pick (its --experts N would choose blindly) and the file is the dense model in a slower layout."""
    try:
        share = float(value)
    except (TypeError, ValueError):
        return  # not given, or not a number: the format's options say what is wrong
    if share == 0:
        raise InputError(f"{given} would skip no FFN neuron: every cluster runs, the router learns nothing, and the "
                         "file is the dense model in a slower layout; give the share to skip, 0 < S < 1 (e.g. 0.5), "
                         "or drop it for a dense file")
    if share < 0:
        raise InputError(f"{given}: give the share of FFN neurons to skip per token, 0 < S < 1 (e.g. 0.5)")


def _check_ignored_flags(typed: set[str], bits: int | None, type_: str | None, bpw: float | None, size: str | None,
                         fit: str | None, bpw_types: str) -> None:
    """Flags another flag overrides are refused, not dropped: --bits beside a preset or a budget, --bpw-types
    without a budget, --ctx without --fit."""
    if "bits" in typed:
        other = next((f"{f} {v:g}" if isinstance(v, float) else f"{f} {v}"
                      for f, v in (("--type", type_), ("--bpw", bpw), ("--size", size), ("--fit", fit)) if v), None)
        if other:
            raise InputError(f"--bits {bits} and {other} both choose the types; give one of them")
    if bpw_types.strip() and bpw is None and size is None and fit is None:
        raise InputError("--bpw-types lists the types a --bpw or --size budget may choose from; add the budget, or "
                         "drop it")
    if "ctx" in typed and fit is None:
        raise InputError("--ctx is the context --fit sizes the model for; add --fit DEVICE, or drop it "
                         "(run, eval and plan take their own --ctx)")


def _check_format_flags(to: str, flags: dict[str, tuple[str, Any]]) -> None:
    """A format option given on the command line that ``--to``'s format does not have is an error."""
    from dataclasses import fields

    from edgekit.converters.formats.base import FORMATS

    cls = FORMATS.get(to).options_class
    takes = {f.name for f in fields(cls)} if cls is not None else set()
    bad = [flag for flag, (key, value) in flags.items() if value is not None and key not in takes]
    if bad:
        raise InputError(f"{', '.join(bad)} {'is not an option' if len(bad) == 1 else 'are not options'} of "
                         f"--to {to}; drop {'it' if len(bad) == 1 else 'them'}")


def _heal_config(text: str | None, flag: str = "--heal") -> Any:
    if text is None:
        return None
    from edgekit.converters.structure.heal import HealConfig

    return HealConfig(minutes=HealConfig.parse_minutes(text, flag))
