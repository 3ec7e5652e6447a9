"""``edgekit``: convert, run, eval, inspect, import, quickstart, list.

Every command imports its heavy machinery inside the function body, so ``--help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from edgekit.cli import (
    devices_cmd,
    diffusion_cmd,
    library_cmd,
    neurons_cmd,
    profile_cmd,
    serve_cmd,
    size_opts,
    tui_cmd,
)
from edgekit.cli import eval_diffusion_cmd as dx
from edgekit.cli.flags import CONTEXT_SETTINGS, THREADS_HELP, EdgekitGroup, flags_take_no_value, show_version
from edgekit.cli.ui import decoding_options, err, handle_errors, out, progress_bar, say
from edgekit.errors import InputError

app = typer.Typer(
    name="edgekit",
    help="Compress, convert, run and measure large models for the devices people own.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=EdgekitGroup,
    context_settings=CONTEXT_SETTINGS,
)
flags_take_no_value()


@app.callback()
def _app_options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=show_version,
                                 help="Print edgekit's version and exit (after a command too)."),
) -> None:
    """Compress, convert, run and measure large models for the devices people own."""


def _parse_tensor_types(values: list[str]) -> tuple[tuple[str, str], ...]:
    from edgekit.errors import InputError

    pairs = []
    for v in values:
        if "=" not in v:
            raise InputError(f"--tensor-type {v!r} must look like REGEX=TYPE, e.g. 'ffn_down=Q6_K'")
        pattern, _, qtype = v.rpartition("=")
        pairs.append((pattern, qtype.strip()))
    return tuple(pairs)


@app.command()
@handle_errors
def convert(
    model: Path = typer.Argument(..., help="Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer), "
                                 "or a .gguf file (imported on the way)."),
    to: str = typer.Option("gguf", "--to", help="Output format."),
    bits: int | None = typer.Option(4, "--bits", help="GGUF: 2, 3, 4, 5, 6 or 8 (a llama.cpp-style _M mix); "
                                    "ONNX: 4 or 8 (MatMulNBits), 16 or 32 (float); Core ML: 4 or 8 (blockwise), 16 (fp16)."),
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
    heal: str | None = typer.Option(None, "--heal", help="With --prune depth/width: distil the pruned model from "
                                    "the unpruned one for this long (20m, 1h); Ctrl-C and re-run resume it."),
    distill: str | None = typer.Option(None, "--distill", help="With --method ternary: train the ternary model by "
                                       "distillation from the float one for this long (60m, 2h); Ctrl-C and re-run "
                                       "resume it."),
    steps: str = typer.Option("", "--steps", help="More layer steps by name, comma-separated (see 'edgekit "
                              "list'), run with the method's in stage order; e.g. --method imatrix --steps awq."),
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
                                     "opset=17..23, external_data=true|false)."),
    draft_for: Path | None = typer.Option(None, "--draft-for", help="Make a speculative-decoding draft for this "
                                          "target (checkpoint or artifact): a third of the blocks, distilled "
                                          "(--heal, default 20m), Q4_0 (--type); use it with run --draft."),
    sparse_ffn: float | None = typer.Option(None, "--sparse-ffn", help="GGUF: skip this share of FFN neurons per "
                                            "token (hot set always, cold clusters picked by a trained router; "
                                            "a Qwen2-MoE file stock llama.cpp runs), e.g. 0.5."),
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
      edgekit convert ./SmolLM2-135M --bits 4 --tensor-type 'ffn_down=Q6_K'
      edgekit convert ./SmolLM2-135M --bits 4 --method gptq                # calibrates on its own samples
      edgekit convert ./SmolLM2-135M --bits 4 --method awq+gptq --calib corpus.txt
      edgekit convert ./SmolLM2-135M --bpw 3.5 --method gptq               # mixed precision to a budget
      edgekit convert ./SmolLM2-135M --bits 4 --method gptq --steps awq    # a recipe of layer steps
      edgekit convert ./SmolLM2-135M --bits 4 --method gptq --prune sparsegpt:0.5
      edgekit convert ./SmolLM2-135M --bits 4 --prune depth:6               # 6 fewer blocks: faster
      edgekit convert ./SmolLM2-135M --bits 4 --prune width:ffn=1024 --heal 20m
      edgekit convert ./SmolLM2-135M --to onnx --bits 4 --method gptq      # MatMulNBits, block 32
      edgekit convert ./SmolLM2-135M --to onnx --bits 32                   # float graph with KV cache
      edgekit convert ./SmolLM2-135M --to coreml --bits 4 --method gptq    # Core ML, stateful KV cache
      edgekit convert ./SmolLM2-135M --to coreml --palettize 4 --method squeezellm
      edgekit convert ./SmolLM2-135M --to mlc --quant q4f16_1 --method gptq   # MLC-LLM weights + chat config
      edgekit convert ./model.Q4_K_M.gguf --to mlc                          # any GGUF in (imported on the way)
      edgekit convert ./SmolLM2-135M --draft-for ./SmolLM2-135M -o ./smol-draft   # then: run --draft ./smol-draft
      edgekit convert ./SmolLM2-135M --method ternary                      # post-hoc ternary (TQ2_0)
      edgekit convert ./SmolLM2-135M --method ternary --distill 60m --calib self   # ternary QAT by distillation
      edgekit convert ./bitnet-b1.58-model --type TQ2_0                    # a BitNet b1.58 checkpoint
      edgekit convert ./SmolLM2-135M --bits 4 --sparse-ffn 0.5    # hot/cold FFN: half the neurons skipped
      edgekit convert ./digits-4step --to onnx --bits 8 --method gptq   # a diffusers pipeline: UNet graphs
      edgekit convert ./digits-4step --to onnx --bits 4 -O lowrank=16 -O deepcache=false
    """
    from edgekit import api

    step_names = tuple(n.strip() for n in steps.split(",") if n.strip())
    structural = prune if prune and prune.startswith(("depth:", "width:")) else None
    if structural:
        prune = None
    if (step_names or prune) and method == "rtn":
        method = "imatrix"  # steps run in the calibrated pipeline; its default rounding is imatrix RTN
    size_bytes, fit_target = size_opts.size_target(model, to, size, fit, ctx, quiet=as_json)
    calibrated = (api.calibration_applies(method, bpw, size_bytes) or bool(structural) or draft_for is not None
                  or sparse_ffn is not None)
    if calibrated:  # only calibration, pruning and healing run PyTorch; importing torch costs seconds
        from edgekit.runtime.hostinfo import use_torch_threads

        use_torch_threads(threads)
    extra = _format_options(option, block_size=block_size, symmetric=sym, dtype=dtype, palettize=palettize,
                            quant=quant, compile=compile_target,
                            sparse_ffn=None if sparse_ffn is None else str(sparse_ffn))
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
        from edgekit.converters.draft import DEFAULT_HEAL, DEFAULT_TYPE, draft_recipe

        if to != "gguf":
            raise InputError("--draft-for makes GGUF drafts (llama.cpp's speculative decoding); drop --to")
        recipe = draft_recipe(model, draft_for, recipe, heal=heal or DEFAULT_HEAL,
                              preset=None if type_ or bpw else DEFAULT_TYPE)
    quantize = api.method_config(method, recipe.calib, step_names, prune) if step_names or prune else None
    if distill is not None:
        quantize = api.distill_config(quantize or api.method_config(method, recipe.calib), _heal_config(distill))
    with progress_bar(not as_json) as progress, size_opts.explain_fit(fit_target):
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
        out.print_json(json.dumps(m))
        return
    fallbacks = sum(1 for t in m.get("tensors", {}).values() if "wanted" in t)
    say(out, f"{art.path}  ({m['size_bytes'] / 1e6:.1f} MB, {m['bpw']:.2f} bpw, {m['preset']}, "
             f"{fallbacks} tensors fell back: see 'edgekit inspect')", "wrote", "green")


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


def _heal_config(text: str | None) -> Any:
    if text is None:
        return None
    from edgekit.converters.structure.heal import HealConfig

    return HealConfig(minutes=HealConfig.parse_minutes(text))


def _format_options(pairs: list[str], **given: Any) -> dict[str, Any]:
    """``-O key=value`` pairs (values parsed as JSON scalars where they parse) plus the named options given."""
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


DRAFT_HELP = "A smaller GGUF with the same tokenizer: speculative decoding (lossless, faster)."
SPEC_HELP = "'ngram': draft from the prompt itself (prompt lookup; rewrites, extraction)."
NDRAFT_HELP = "Fixed draft length (default: adaptive to the measured acceptance)."
WINDOW_HELP = "Keep at most this many tokens in the KV cache (attention sinks + recent): unbounded text, bounded memory."
SINKS_HELP = "With --kv-window: first tokens always kept (default 4)."


def _sampling(temperature: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float, seed: int,
              max_tokens: int, stop: list[str]):
    from edgekit.runtime.base import SamplingConfig

    return SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repeat_penalty=repeat_penalty, seed=seed, max_tokens=max_tokens, stop=tuple(stop))


@app.command()
@handle_errors
def run(
    artifact: Path = typer.Argument(..., help="Artifact folder, model file, or Hugging Face folder."),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="The user message (or raw text with --raw); "
                                      "'-' reads it from stdin. Without -p: a chat in the terminal, or all "
                                      "of stdin as the prompt when it is piped."),
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    raw: bool = typer.Option(False, "--raw", help="Complete the prompt as plain text, no chat template; "
                             "special tokens written in it (<|im_start|>...) are read as the model's control "
                             "tokens. Without --raw, -p and --system are message text and never are."),
    temperature: float = typer.Option(0.7, "--temperature", "--temp", help="0 is greedy."),
    top_k: int = typer.Option(40, "--top-k"),
    top_p: float = typer.Option(0.95, "--top-p"),
    min_p: float = typer.Option(0.05, "--min-p"),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty"),
    seed: int = typer.Option(0, "--seed", "-s"),
    max_tokens: int | None = typer.Option(None, "--max-tokens", "-n", help="Tokens to generate (default 256); "
                                          "images, for a diffusion model.", show_default=False),
    stop: list[str] = typer.Option([], "--stop", help="Stop sequence; repeatable."),
    ctx: int = typer.Option(2048, "--ctx", "-c", help="Context length."),
    threads: int | None = typer.Option(None, "--threads", "-t", help=THREADS_HELP),
    offload: str = typer.Option("none", "--offload", help="'auto': GPU layers / tensor placement from `edgekit plan`."),
    vram: str | None = typer.Option(None, "--vram", help="With --offload auto: the GPU memory budget, e.g. 2GiB "
                                    "(default: the GPU's free memory)."),
    backend: str | None = typer.Option(None, "--backend", help="Runtime to use (see `edgekit list`; default: the "
                                       "preferred one for the artifact's format)."),
    stats: bool = typer.Option(True, "--stats/--no-stats", help="Print tokens/s on stderr at the end."),
    draft: Path | None = typer.Option(None, "--draft", help=DRAFT_HELP),
    speculative: str | None = typer.Option(None, "--speculative", help=SPEC_HELP),
    n_draft: int | None = typer.Option(None, "--n-draft", help=NDRAFT_HELP),
    kv_window: int | None = typer.Option(None, "--kv-window", help=WINDOW_HELP),
    kv_sinks: int | None = typer.Option(None, "--kv-sinks", help=SINKS_HELP),
    option: list[str] = typer.Option([], "--option", "-O", help="Runtime option KEY=VALUE; repeatable (llama.cpp: "
                                     "flash_attn=true, type_k=8, ...; a misspelt one is refused)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object when done (text, token counts, "
                                 "timings, stop reason) instead of streaming."),
    class_: int | None = typer.Option(None, "--class", help="Diffusion: the class of every image (default: one of "
                                      "each class in turn)."),
    image_out: Path | None = typer.Option(None, "--output", "-o", help="Diffusion: the PNG grid to write "
                                          "(default grid.png)."),
    steps: int | None = typer.Option(None, "--steps", help="Diffusion: sampling steps (default: the model's)."),
    cache_interval: int | None = typer.Option(None, "--cache-interval", help="Diffusion: DeepCache, the whole "
                                              "UNet every K steps, its outer level in between."),
) -> None:
    """Generate a reply, streaming tokens as they come; without a prompt, chat in the terminal. A diffusion
    model (artifact or diffusers pipeline folder) samples a PNG grid instead.

    Examples:
      edgekit run smollm2-135m-gguf-q4_k_m -p "What is the capital of France?"
      edgekit run smollm2-135m-gguf-q4_k_m                            # chat: /exit or Ctrl-D ends
      cat question.txt | edgekit run smollm2-135m-gguf-q4_k_m -p - --json
      edgekit run ./model.gguf -p "Once upon a time" --raw --temp 0 -n 64
      edgekit run ./smol-q8_0 --draft ./smol-draft -p "..."         # speculative, lossless
      edgekit run ./smol-q8_0 --speculative ngram -p "Rewrite: ..."  # prompt lookup
      edgekit run ./smol-q4 --kv-window 512 -n 4000 -p "..."        # past the context, bounded memory
      edgekit run ./smol-q4-sparse -p "..." --offload auto --vram 2GiB   # hot on the GPU, cold on the CPU
      edgekit run ./pipe-4step-onnx-w8 --class 7 -n 16 -o grid.png      # a diffusion model: images
    """
    from edgekit import api
    from edgekit.cli import diffusion_run, repl
    from edgekit.runtime.base import GenerationStats

    if diffusion_run.is_diffusion(artifact):
        diffusion_run.run_images(artifact, cls=class_, n=max_tokens, output=image_out, steps=steps, seed=seed,
                                 cache_interval=cache_interval, threads=threads, as_json=as_json)
        return
    diffusion_run.refuse_image_options(artifact, {"--class": class_, "--output": image_out, "--steps": steps,
                                                  "--cache-interval": cache_interval})
    max_tokens = 256 if max_tokens is None else max_tokens
    sampling = _sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed, max_tokens, stop)
    placement = profile_cmd.offload_options(artifact, offload, kv_window or ctx, vram)  # a window bounds the KV
    if backend:
        placement["backend"] = backend
    placement.update(decoding_options(draft, speculative, n_draft, kv_window, kv_sinks))
    placement.update(_format_options(option))
    if prompt is None and sys.stdin.isatty():
        if as_json:
            raise InputError("--json answers one prompt: give it with -p TEXT (or -p - to read stdin)")
        repl.chat_repl(lambda: api.open_backend(artifact, n_ctx=ctx, n_threads=threads, **placement), sampling,
                       system=system, raw=raw, show_stats=stats)
        return
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
        if not raw:  # the newline that ends a piped line is not part of the message; raw text is kept as is
            prompt = prompt.rstrip("\n")
        if not prompt.strip():
            raise InputError("stdin is empty: pipe the prompt in, or give it with -p TEXT")
    if raw:
        message: str | list[dict[str, str]] = prompt
    else:
        message = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    st = GenerationStats()
    pieces = api.generate(artifact, message, sampling, st, raw=raw, n_ctx=ctx, n_threads=threads, **placement)
    text, stopped = repl.stream(pieces, None if as_json else lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    if stopped:
        raise KeyboardInterrupt
    if as_json:
        sys.stdout.write(json.dumps(repl.as_json(text, st, str(artifact)), ensure_ascii=False) + "\n")
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stats:
        say(err, repl.dim(repl.stats_line(st)))


@app.command("eval")
@handle_errors
def eval_cmd(
    artifact: Path = typer.Argument(..., help="Artifact folder, model file, or Hugging Face folder; or a diffusion "
                                    "pipeline folder or artifact (scored on images it samples)."),
    text: Path | None = typer.Option(None, "--text", help="Plain-text file to measure on (language models).",
                                     show_default=False),
    ref: Path | None = typer.Option(None, "--ref", help="Reference checkpoint folder: adds KL and top-1."),
    ctx: int = typer.Option(512, "--ctx", "-c", help="Tokens per chunk (llama-perplexity's -c)."),
    chunks: int | None = typer.Option(None, "--chunks", help="At most this many chunks."),
    threads: int | None = typer.Option(None, "--threads", "-t", help=THREADS_HELP),
    backend: str | None = typer.Option(None, "--backend", help="Runtime to use (default: the preferred one)."),
    record: bool = typer.Option(True, "--record/--no-record", help="Store the result in the manifest."),
    as_json: bool = typer.Option(False, "--json"),
    kv_window: int | None = typer.Option(None, "--kv-window", help="Stream the whole text through a KV window of "
                                         "this many tokens instead (how a long chat sees its history)."),
    kv_sinks: int = typer.Option(4, "--kv-sinks", help="With --kv-window: first tokens always kept."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="With --kv-window: stream at most this many tokens."),
    n: int | None = dx.register_options()["n"],
    steps: int | None = dx.register_options()["steps"],
    sampler: str | None = dx.register_options()["sampler"],
    cache_interval: int | None = dx.register_options()["cache_interval"],
    seed: int | None = dx.register_options()["seed"],
) -> None:
    """Perplexity (llama-perplexity's protocol); with --ref, KL divergence and top-1 agreement. A diffusion
    model: digits-FID, precision/recall and label agreement of images it samples.

    Examples:
      edgekit eval smollm2-135m-gguf-q4_k_m --text valid.txt
      edgekit eval smollm2-135m-gguf-q4_k_m --text valid.txt --ref ./SmolLM2-135M --chunks 16
      edgekit eval smollm2-135m-gguf-q4_k_m --text valid.txt --kv-window 1024 --kv-sinks 4
      edgekit eval ./digits-unet --steps 4 --images 1000
    """
    from edgekit import api

    diffusion_opts = dx.diffusion_options(n, steps, sampler, cache_interval, seed)
    if api.is_diffusion(artifact):
        dx.refuse_text_options(artifact, text, ref, kv_window)
        dx.run(artifact, diffusion_opts, record, as_json)
        return
    dx.refuse_llm_options(artifact, diffusion_opts)
    if text is None:
        dx.check_missing(artifact)
        raise InputError("--text is required for a language model: give a plain-text file to measure on")

    if kv_window is not None:
        if ref is not None:
            raise InputError("--kv-window measures perplexity alone; drop --ref")
        with progress_bar(not as_json) as progress:
            res_s = api.evaluate_streaming(artifact, text, kv_window, kv_sinks, max_tokens=max_tokens,
                                           progress=progress, n_threads=threads,
                                           **({"backend": backend} if backend else {}))
        if as_json:
            out.print_json(json.dumps(res_s))
        else:
            say(out, f"perplexity {res_s['ppl']:.4f} on {res_s['text_name']} (sha256:{res_s['text_sha256'][:8]}), "
                 f"{res_s['tokens_scored']:,} tokens streamed through a KV window of {kv_window} ({kv_sinks} sinks): "
                 f"at most {res_s['peak_cells']} cells held, {res_s['evicted']:,} evicted")
        return

    with progress_bar(not as_json) as progress:
        res = api.evaluate(artifact, text, api.EvalConfig(ctx=ctx, chunks=chunks), ref=ref, progress=progress,
                           record=record, n_threads=threads, **({"backend": backend} if backend else {}))
    if as_json:
        out.print_json(json.dumps(res.to_json()))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"{artifact} on {res.provenance()} ({res.tokens_scored} tokens scored)"))
    for col in ("perplexity", "±", "ref perplexity", "KL mean", "KL p99", "top-1"):
        table.add_column(col, justify="right")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    table.add_row(f"{res.ppl:.4f}", f"{res.ppl_stderr:.4f}", fmt(res.ref_ppl, ".4f"), fmt(res.kl_mean, ".5f"),
                  fmt(res.kl_p99, ".4f"), fmt(None if res.top1_agreement is None else 100 * res.top1_agreement, ".2f"))
    out.print(table)


@app.command("inspect")
@handle_errors
def inspect_cmd(
    artifact: Path = typer.Argument(..., help="Artifact folder or model file."),
    ctx: int = typer.Option(4096, "--ctx", "-c", help="Context length for the memory estimate."),
    tensors: bool = typer.Option(False, "--tensors", help="List every tensor."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Architecture, parameters, per-tensor types, size, bits per weight, memory at a context length.

    Examples:
      edgekit inspect smollm2-135m-gguf-q4_k_m
      edgekit inspect ./model.gguf --tensors --json
    """
    from edgekit import api
    from edgekit.cli.render import render_inspect

    info = api.inspect(artifact, ctx)
    if info.get("task") == "diffusion" and not as_json:
        from edgekit.cli.diffusion_run import render_inspect as render_diffusion

        render_diffusion(info)
        return
    if as_json:
        if not tensors:
            info = {k: v for k, v in info.items() if k != "tensors"}
        out.print_json(json.dumps(info))
    else:
        render_inspect(out, info, tensors)


@app.command("import")
@handle_errors
def import_cmd(
    gguf_file: Path = typer.Argument(..., help="A .gguf file of a supported architecture."),
    output: Path = typer.Option(..., "--output", "-o", help="Checkpoint folder to write."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
) -> None:
    """Turn a GGUF (any ggml type) into a dequantized safetensors checkpoint with its tokenizer.

    Example:
      edgekit import SmolLM2-135M-Instruct.Q4_1.gguf -o ./SmolLM2-135M
    """
    from edgekit import api

    with progress_bar() as progress:
        path = api.import_gguf(gguf_file, output, force=force, progress=progress)
    say(out, str(path), "wrote", "green")


@app.command()
@handle_errors
def quickstart(
    bits: int = typer.Option(4, "--bits", help="GGUF bits for the conversion step."),
    home: Path | None = typer.Option(None, "--home", help="Cache folder (default ~/.cache/edgekit)."),
    force: bool = typer.Option(False, "--force", help="Redo every step even if cached."),
    threads: int | None = typer.Option(None, "--threads", "-t", help=THREADS_HELP),
    diffusion: bool = typer.Option(False, "--diffusion", help="The built-in diffusion model instead: distilled "
                                   "4-step student, 8-bit ONNX, samples, digits-FID against the teacher."),
    distill: bool = typer.Option(False, "--distill", help="With --diffusion: distill the student here (about 20 "
                                 "minutes) instead of using the shipped one."),
    as_json: bool = typer.Option(False, "--json", help="With --diffusion: print the figures as JSON."),
    n_score: int = typer.Option(1000, "--images", help="With --diffusion: images scored per model (FID is biased by "
                                "the sample size: compare at the same n)."),
) -> None:
    """The built-in default end to end: get SmolLM2-135M-Instruct, import, convert, evaluate, answer.

    Examples:
      edgekit quickstart
      edgekit quickstart --diffusion --json
    """
    if diffusion:
        from edgekit.cli.quickstart_diffusion import run_quickstart_diffusion

        run_quickstart_diffusion(home=home, force=force, distill_again=distill, threads=threads, as_json=as_json,
                                 n=n_score)
        return
    if distill or as_json or n_score != 1000:
        raise InputError("--distill, --json and --images go with --diffusion")
    from edgekit.cli.quickstart_cmd import run_quickstart

    run_quickstart(bits=bits, home=home, force=force, threads=threads)


tui_cmd.register(app)
library_cmd.register(app)
devices_cmd.register(app)
profile_cmd.register(app)
serve_cmd.register(app)
neurons_cmd.register(app)
diffusion_cmd.register(app)


def main() -> None:
    import signal

    # `kill` (SIGTERM) unwinds like Ctrl-C, so temporary outputs are removed instead of left behind.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    app()


if __name__ == "__main__":
    main()
