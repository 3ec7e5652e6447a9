"""``edgekit``: convert, run, eval, inspect, import, quickstart, list.

Every command imports its heavy machinery inside the function body, so ``--help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import typer

from edgekit.cli import (
    convert_cmd,
    devices_cmd,
    diffusion_cmd,
    library_cmd,
    neurons_cmd,
    profile_cmd,
    serve_cmd,
    tui_cmd,
)
from edgekit.cli import eval_diffusion_cmd as dx
from edgekit.cli.flags import (
    CONTEXT_SETTINGS,
    THREADS_HELP,
    EdgekitGroup,
    beyond_trained_note,
    flags_take_no_value,
    show_version,
    typed_flags,
)
from edgekit.cli.ui import (
    DRAFT_HELP,
    EXPERTS_HELP,
    NDRAFT_HELP,
    SINKS_HELP,
    SPEC_HELP,
    WINDOW_HELP,
    decoding_options,
    err,
    handle_errors,
    out,
    print_json,
    print_table,
    progress_bar,
    progress_unless_piped,
    read_stdin,
    say,
    stdin_is_tty,
    write_stdout,
)
from edgekit.errors import InputError
from edgekit.validate import check_stream_tokens

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


convert_cmd.register(app)




def _sampling(temperature: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float, seed: int,
              max_tokens: int, stop: list[str]):
    from edgekit.runtime.base import SamplingConfig

    return SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repeat_penalty=repeat_penalty, seed=seed, max_tokens=max_tokens, stop=tuple(stop))


def _read_prediction(path: Path) -> str:
    p = path.expanduser()
    if not p.is_file():
        raise InputError(f"--prediction {p} does not exist; give the text file the answer is expected to repeat")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"--prediction {p} is not UTF-8 text; give a plain-text file") from None


@app.command()
@handle_errors
def run(
    cli: typer.Context,
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
    prediction: Path | None = typer.Option(None, "--prediction", help="A text file the answer is expected to "
                                           "repeat much of (the file being edited, say): drafted from, so such an "
                                           "answer comes sooner; it is the same answer.", show_default=False),
    ctx: int = typer.Option(2048, "--ctx", "-c", help="Context length."),
    threads: int | None = typer.Option(None, "--threads", "-t", help=THREADS_HELP),
    offload: str = typer.Option("none", "--offload", help="'auto': GPU layers / tensor placement from `edgekit plan`."),
    vram: str | None = typer.Option(None, "--vram", help="With --offload auto: the GPU memory budget, e.g. 2GiB "
                                    "(default: the GPU's free memory)."),
    backend: str | None = typer.Option(None, "--backend", help="Runtime to use (see `edgekit registry`; default: the "
                                       "preferred one for the artifact's format)."),
    stats: bool = typer.Option(True, "--stats/--no-stats", help="Print tokens/s on stderr at the end."),
    draft: Path | None = typer.Option(None, "--draft", help=DRAFT_HELP),
    speculative: str | None = typer.Option(None, "--speculative", help=SPEC_HELP),
    n_draft: int | None = typer.Option(None, "--n-draft", help=NDRAFT_HELP),
    kv_window: int | None = typer.Option(None, "--kv-window", help=WINDOW_HELP),
    kv_sinks: int | None = typer.Option(None, "--kv-sinks", help=SINKS_HELP),
    experts: str | None = typer.Option(None, "--experts", help=EXPERTS_HELP, show_default=False, metavar="<n|all>"),
    option: list[str] = typer.Option([], "--option", "-O", help="Runtime option KEY=VALUE; repeatable (llama.cpp: "
                                     "flash_attn=true, type_k=q8_0, ...; a misspelt one is refused)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object when done (text, token counts, "
                                 "timings, stop reason; speculative and kv_window stats when used) instead of "
                                 "streaming."),
    class_: int | None = typer.Option(None, "--class", help="Diffusion: the class of every image (default: one of "
                                      "each class in turn)."),
    image_out: Path | None = typer.Option(None, "--output", "-o", help="Diffusion: the PNG grid to write "
                                          "(default grid.png)."),
    steps: int | None = typer.Option(None, "--steps", help="Diffusion: sampling steps (default: the model's)."),
    cache_interval: int | None = typer.Option(None, "--cache-interval", help="Diffusion: DeepCache, the whole "
                                              "UNet every K steps, its outer level in between."),
) -> None:
    """Generate a reply, streaming tokens as they come; without a prompt, chat in the terminal. A diffusion model (artifact or diffusers pipeline folder) samples a PNG grid instead.

    Examples:
      edgekit run smollm2-135m-gguf-q4_k_m -p "What is the capital of France?"
      edgekit run smollm2-135m-gguf-q4_k_m                            # chat: /exit or Ctrl-D ends
      cat question.txt | edgekit run smollm2-135m-gguf-q4_k_m -p - --json
      edgekit run ./model.gguf -p "Once upon a time" --raw --temp 0 -n 64
      edgekit run ./smol-q8_0 --draft ./smol-draft -p "..."         # speculative, lossless
      edgekit run ./smol-q8_0 --speculative ngram -p "Rewrite: ..."  # prompt lookup
      edgekit run ./smol-f16 -p "Fix the typos: $(cat a.txt)" --prediction a.txt   # drafts from a.txt
      edgekit run ./smol-q4 --kv-window 512 -n 4000 -p "..."        # past the context, bounded memory
      edgekit run ./smol-q4-sparse -p "..." --offload auto --vram 2GiB   # hot on the GPU, cold on the CPU
      edgekit run ./smol-q4-sparse -p "..." --experts 8                  # 8 cold clusters a token, not 4
      edgekit run ./pipe-4step-onnx-w8 --class 7 -n 16 -o grid.png      # a diffusion model: images
    """
    from edgekit import api
    from edgekit.cli import diffusion_run, repl
    from edgekit.runtime.base import GenerationStats, check_prompt
    from edgekit.runtime.hostinfo import check_threads

    check_threads(threads)  # in the flag's words, before any work (the SDK names its keyword)
    if diffusion_run.is_diffusion(artifact):
        if experts is not None:
            raise InputError("--experts is for a mixture-of-experts language model; drop it for a diffusion model")
        diffusion_run.run_images(artifact, cls=class_, n=max_tokens, output=image_out, steps=steps, seed=seed,
                                 cache_interval=cache_interval, threads=threads, as_json=as_json)
        return
    diffusion_run.refuse_image_options(artifact, {"--class": class_, "--output": image_out, "--steps": steps,
                                                  "--cache-interval": cache_interval})
    if max_tokens is not None and not kv_window and 0 < ctx < max_tokens:
        raise InputError(f"-n {max_tokens} can never be reached with --ctx {ctx}, which holds the prompt and the "
                         f"answer together; give -n {ctx} or less, a larger --ctx, or --kv-window N to go past the "
                         "context")
    max_tokens = 256 if max_tokens is None else max_tokens
    sampling = _sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed, max_tokens, stop)
    if prediction is not None:
        if prompt is None and stdin_is_tty():
            raise InputError("--prediction is the expected answer to one prompt: give the prompt with -p TEXT")
        sampling = dataclasses.replace(sampling, prediction=_read_prediction(prediction))
    chosen: dict = {}
    if experts is not None:  # checked before the plan, which counts the experts each token reads
        from edgekit.runtime.llamacpp_decoding import experts_options

        chosen = experts_options(artifact, experts)
    placement = profile_cmd.offload_options(artifact, offload, kv_window or ctx, vram, draft,  # a window bounds the KV
                                            experts)
    if backend:
        placement["backend"] = backend
    placement.update(decoding_options(draft, speculative, n_draft, kv_window, kv_sinks))
    placement.update(chosen)
    placement.update(api.format_options(option))
    if placement.get("n_draft") is not None and not (placement.get("draft") or placement.get("speculative")
                                                     or sampling.prediction):
        raise InputError("--n-draft is how many tokens a drafter proposes at a time: give one with it (--draft MODEL, "
                         "--speculative ngram or --prediction FILE), or drop it")
    if not backend:
        from edgekit.runtime.llamacpp_decoding import interactive_defaults

        placement = {**interactive_defaults(artifact), **placement}  # GGUF: flash attention, as drafting verifies
    if "ctx" in typed_flags(cli, "ctx") and not kv_window and (
            note := beyond_trained_note(artifact, ctx, "replies that reach past it may lose coherence")):
        say(err, note, "note:", "dim")
    if prompt is None and stdin_is_tty():
        if as_json:
            raise InputError("--json answers one prompt: give it with -p TEXT (or -p - to read stdin)")
        repl.chat_repl(lambda: api.open_backend(artifact, n_ctx=ctx, n_threads=threads, **placement), sampling,
                       system=system, raw=raw, show_stats=stats)
        return
    if prompt is None or prompt == "-":
        prompt = read_stdin()  # a closed stdin reads as empty
        if not raw:  # the newline that ends a piped line is not part of the message; raw text is kept as is
            prompt = prompt.rstrip("\n")
        if not prompt.strip():
            raise InputError("stdin is empty: pipe the prompt in, or give it with -p TEXT")
    if raw:
        message: str | list[dict[str, str]] = prompt
    else:
        message = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    check_prompt(message)  # before the model loads: a bad prompt's error comes alone, and at once
    st = GenerationStats()
    pieces = api.generate(artifact, message, sampling, st, raw=raw, n_ctx=ctx, n_threads=threads, **placement)
    text, stopped = repl.stream(pieces, None if as_json else write_stdout)
    if stopped:
        raise KeyboardInterrupt
    if as_json:
        from edgekit import library

        print_json(repl.as_json(text, st, str(library.resolve(artifact).resolve())), indent=None)
        return
    write_stdout("\n")
    if stats:
        say(err, repl.dim(repl.stats_line(st)))


@app.command("eval")
@handle_errors
def eval_cmd(
    cli: typer.Context,
    artifact: Path = typer.Argument(..., help="Artifact folder, model file, or Hugging Face folder; or a diffusion "
                                    "pipeline folder or artifact (scored on images it samples)."),
    text: Path | None = typer.Option(None, "--text", help="Plain-text file to measure on (language models; "
                                     "default: the English sample edgekit ships).", show_default=False),
    ref: Path | None = typer.Option(None, "--ref", help="Reference checkpoint folder: adds KL and top-1."),
    ctx: int = typer.Option(512, "--ctx", "-c", help="Tokens per chunk (llama-perplexity's -c)."),
    chunks: int | None = typer.Option(None, "--chunks", help="At most this many chunks."),
    threads: int | None = typer.Option(None, "--threads", "-t", help=THREADS_HELP),
    backend: str | None = typer.Option(None, "--backend", help="Runtime to use (default: the preferred one)."),
    record: bool = typer.Option(True, "--record/--no-record", help="Store the result in the manifest."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    kv_window: int | None = typer.Option(None, "--kv-window", help="Stream the whole text through a KV window of "
                                         "this many tokens instead (how a long chat sees its history)."),
    kv_sinks: int = typer.Option(4, "--kv-sinks", help="With --kv-window: first tokens always kept."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="With --kv-window: stream at most this many tokens."),
    experts: str | None = typer.Option(None, "--experts", help=EXPERTS_HELP + " Not recorded in the manifest.",
                                       show_default=False, metavar="<n|all>"),
    n: int | None = dx.register_options()["n"],
    steps: int | None = dx.register_options()["steps"],
    sampler: str | None = dx.register_options()["sampler"],
    cache_interval: int | None = dx.register_options()["cache_interval"],
    seed: int | None = dx.register_options()["seed"],
) -> None:
    """Perplexity (llama-perplexity's protocol); with --ref, KL divergence and top-1 agreement. A diffusion model: digits-FID, precision/recall and label agreement of images it samples.

    Examples:
      edgekit eval smollm2-135m-gguf-q4_k_m --text valid.txt
      edgekit eval smollm2-135m-gguf-q4_k_m --text valid.txt --ref ./SmolLM2-135M --chunks 16
      edgekit eval smollm2-135m-gguf-q4_k_m --text valid.txt --kv-window 1024 --kv-sinks 4
      edgekit eval ./smol-q4-sparse --text valid.txt --experts all   # a hot/cold file run dense
      edgekit eval ./digits-unet --steps 4 --images 1000
    """
    from edgekit import api
    from edgekit.runtime.hostinfo import check_threads

    check_threads(threads)

    if kv_window is None and max_tokens is not None:
        raise InputError("--max-tokens is for --kv-window; --chunks limits a plain perplexity run")
    typed = typed_flags(cli, "ctx", "chunks", "kv_sinks", "record")
    if kv_window is None and "kv_sinks" in typed:
        raise InputError("--kv-sinks is for --kv-window: give the window too, or drop it")
    if kv_window is not None and typed & {"ctx", "chunks"}:
        raise InputError(f"--kv-window streams the whole text through the window: drop --{sorted(typed & {'ctx', 'chunks'})[0]} "
                         "(--max-tokens limits the tokens streamed, the window is the context)")
    if kv_window is not None and record and "record" in typed:
        raise InputError("a KV-window perplexity measures the window, not the model: it is not recorded in the "
                         "manifest; drop --record")
    check_stream_tokens(max_tokens)
    diffusion_opts = dx.diffusion_options(n, steps, sampler, cache_interval, seed)
    if api.is_diffusion(artifact):
        if experts is not None:
            raise InputError("--experts is for a mixture-of-experts language model; drop it for a diffusion model")
        dx.refuse_text_options(artifact, text, ref, kv_window)
        dx.run(artifact, diffusion_opts, record, as_json)
        return
    dx.refuse_llm_options(artifact, diffusion_opts)
    options: dict = {"backend": backend} if backend else {}
    if experts is not None:
        from edgekit.runtime.llamacpp_decoding import experts_options

        options.update(experts_options(artifact, experts))
        if record and not as_json:
            say(err, "--experts measures another model than the file's own: not recorded in its manifest", "note:", "dim")
        record = False
    if text is None:  # as quickstart and neurons do: no dataset needed, and the result names the text it used
        from edgekit.quickstart import sample_text_path

        dx.check_missing(artifact)
        text = sample_text_path()
        say(err, "on the English sample edgekit ships (12 KB); --text FILE measures on your own text", "note:", "dim")

    if kv_window is not None:
        if ref is not None:
            raise InputError("--kv-window measures perplexity alone; drop --ref")
        with progress_bar(progress_unless_piped(as_json)) as progress:
            res_s = api.evaluate_streaming(artifact, text, kv_window, kv_sinks, max_tokens=max_tokens,
                                           progress=progress, n_threads=threads, **options)
        if as_json:
            print_json(res_s)
        else:
            if record:
                say(err, "a KV-window perplexity is not recorded in the manifest (it measures the window, not the "
                         "model)", "note:", "dim")
            say(out, f"perplexity {res_s['ppl']:.4f} on {res_s['text_name']} (sha256:{res_s['text_sha256'][:8]}), "
                 f"{res_s['tokens_scored']:,} tokens streamed through a KV window of {kv_window} ({kv_sinks} sinks): "
                 f"at most {res_s['peak_cells']} cells held, {res_s['evicted']:,} evicted")
        return

    if "ctx" in typed and (note := beyond_trained_note(artifact, ctx, "the perplexity measures how it copes past it")):
        say(err, note, "note:", "dim")
    with progress_bar(progress_unless_piped(as_json)) as progress:
        res = api.evaluate(artifact, text, api.EvalConfig(ctx=ctx, chunks=chunks), ref=ref, progress=progress,
                           record=record, n_threads=threads, **options)
    if as_json:
        print_json(res.to_json())
        return
    from edgekit.cli.render import eval_table

    print_table(out, eval_table(artifact, res))


@app.command("inspect")
@handle_errors
def inspect_cmd(
    artifact: Path = typer.Argument(..., help="Artifact folder or model file; or a Hugging Face checkpoint "
                                    "folder: what each 'convert --bits N' would write."),
    ctx: int | None = typer.Option(None, "--ctx", "-c", metavar="<tokens>", show_default=False,
                                   help="Context length for the memory estimate (default 4096, or the "
                                        "trained context if shorter)."),
    tensors: bool = typer.Option(False, "--tensors", help="List every tensor."),
    as_json: bool = typer.Option(False, "--json", help="Print the description as JSON."),
) -> None:
    """Architecture, parameters, per-tensor types, size, bits per weight, memory at a context length.

    Examples:
      edgekit inspect smollm2-135m-gguf-q4_k_m
      edgekit inspect ./model.gguf --tensors --json
      edgekit inspect ./SmolLM2-135M --ctx 8192     # a checkpoint: each GGUF mix's size, bpw, fallbacks, memory
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
        print_json(info)
    else:
        render_inspect(out, info, tensors)


@app.command("import")
@handle_errors
def import_cmd(
    gguf_file: Path = typer.Argument(..., help="A .gguf file of a supported architecture, or a GGUF artifact folder."),
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
    from edgekit.runtime.hostinfo import check_threads

    check_threads(threads)
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


def restore_docstrings(typer_app: typer.Typer) -> None:
    """Under ``python -OO`` docstrings are stripped, and with them the help of every command (Typer reads a
    command's help from its docstring): read them back from the source, where it is there to read."""
    import ast
    import inspect

    trees: dict[str, ast.Module | None] = {}

    def restore(fn: object) -> None:
        real = inspect.unwrap(fn) if callable(fn) else None
        code = getattr(real, "__code__", None)
        if code is None or getattr(fn, "__doc__", None):
            return
        if code.co_filename not in trees:
            try:
                trees[code.co_filename] = ast.parse(Path(code.co_filename).read_bytes())
            except (OSError, SyntaxError, ValueError):  # installed without its source
                trees[code.co_filename] = None
        for node in ast.walk(trees[code.co_filename] or ast.Module(body=[], type_ignores=[])):
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == code.co_name
                    and min([node.lineno, *(d.lineno for d in node.decorator_list)]) == code.co_firstlineno):
                fn.__doc__ = real.__doc__ = ast.get_docstring(node)  # type: ignore[union-attr]
                return

    for info in typer_app.registered_commands:
        restore(info.callback)
    restore(typer_app.registered_callback.callback if typer_app.registered_callback else None)
    for group in typer_app.registered_groups:
        restore(group.callback)
        if group.typer_instance is not None:
            restore_docstrings(group.typer_instance)


def main() -> None:
    from edgekit.cli import process

    if sys.flags.optimize >= 2:
        restore_docstrings(app)
    process.run(app)


if __name__ == "__main__":
    main()
