"""``edgekit profile`` and ``edgekit plan``: measure artifacts, and plan how to fit them on a device.

Registered on the main app by :mod:`edgekit.cli.main`; heavy imports stay inside the functions.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import typer

from edgekit.cli.ui import err, handle_errors, out, print_json, say, tagged, write_stdout


def _ints(text: str, name: str, allow_none: bool = False) -> tuple[Any, ...]:
    from edgekit.errors import InputError

    vals: list[int | None] = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if allow_none and item.lower() in ("auto", "default"):
            vals.append(None)
            continue
        try:
            vals.append(int(item))
        except ValueError:
            moved = name == "threads" and item.lower().startswith(("pp", "tg"))  # `-t pp512`: -t was --tests
            raise InputError(f"--{name} takes comma-separated integers, e.g. 1,2,4 (got {item!r})"
                             + ("; -t is --threads now, as in llama.cpp: give tests as --tests" if moved else "")) from None
    if not vals:
        raise InputError(f"--{name} needs at least one value")
    return tuple(vals)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.0f} MB"


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _table(rows: list[Any], title: str) -> Any:
    """The rows as a rich table; a measure no row has (RAPL energy on a host without it, the roofline of
    prompt-only tests, TTFT of llama-bench rows) is left out rather than printed as a column of dashes, so
    the rest keeps its width in an 80-column terminal."""
    from rich.table import Table
    from rich.text import Text

    from edgekit.runtime.profile import summarize

    cols = ("artifact", "test", "config", "tokens/s", "TTFT ms", "load s", "peak RSS", "roofline", "J/tok", "status")
    optional = {"TTFT ms", "load s", "peak RSS", "roofline", "J/tok"}
    cells = []
    for s in summarize(rows):
        tps = "-" if s["tps"] is None else f"{s['tps']:.1f}±{s['tps_std']:.1f}"
        config = (f"t{s['threads']} b{s['batch']} c{s['ctx']}" + (f" ngl{s['ngl']}" if s["ngl"] else "")
                  + (f" e{s['experts']}" if s.get("experts") is not None else ""))
        roof = s["roofline_fraction"]
        cells.append([Text(s["artifact"]), s["test"], config, tps,
                      _fmt(None if s["ttft_s"] is None else s["ttft_s"] * 1000, ".0f"), _fmt(s["load_s"], ".2f"),
                      _mb(s["peak_rss_bytes"]), "-" if roof is None else f"{100 * roof:.0f}%",
                      _fmt(s["j_per_token"], ".3f"), s["status"]])
    keep = [i for i, col in enumerate(cols) if col not in optional or any(row[i] != "-" for row in cells)]
    names = {str(row[0]) for row in cells}
    if len(names) == 1:  # one artifact: its name is the title, not a column squeezed to a few letters a line
        title = f"{title}: {names.pop()}"
        keep.remove(0)
    if all(row[-1] == "ok" for row in cells) and "(ok)" in title:  # the title says so already
        keep.remove(len(cols) - 1)
    table = Table(title=Text(title))
    for i in keep:
        # measures never wrap or shorten; a long artifact name (several artifacts) folds, a config breaks at spaces
        name = cols[i]
        table.add_column(name, justify="left" if name in ("artifact", "test", "config", "status") else "right",
                         overflow="fold", no_wrap=name not in ("artifact", "config"),
                         min_width=min(12, max(len(str(row[0])) for row in cells)) if name == "artifact" else None)
    for row in cells:
        table.add_row(*(row[i] for i in keep))
    return table


#: a row whose repetitions' standard deviation exceeds this share of their mean is not a figure to compare
NOISY_CV = 0.3


def noisy_rows(rows: list[Any]) -> list[str]:
    """``"artifact test"`` of each summarized row whose tokens/s spread more than :data:`NOISY_CV` (QA s49: a
    tg32 of 7.3±7.3 tok/s on a busy 2-core machine, 83.4 with -t 1, was printed as a result)."""
    from edgekit.runtime.profile import summarize

    return [f"{s['artifact']} {s['test']}" for s in summarize(rows)
            if s["tps"] and s.get("tps_std") is not None and s["tps_std"] > NOISY_CV * s["tps"]]


def _csv(rows: list[Any]) -> str:
    from edgekit.runtime.profile import summarize

    buf = io.StringIO()
    summary = summarize(rows)
    fields = list(summary[0]) if summary else ["artifact", "test"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(summary)
    return buf.getvalue()


def _emit(run: Any, as_json: bool, as_csv: bool, plot: Path | None, terminal_plot: bool,
          device: str | None = None) -> None:
    if as_json:
        print_json(run.to_json(), indent=1)
    elif as_csv:
        write_stdout(_csv(run.rows))
    else:
        out.print(_table(run.rows, f"edgekit profile ({run.status})" + (f" on {device}" if device else "")))
        noisy = noisy_rows(run.rows)
        if noisy:
            say(err, f"{', '.join(noisy)}: tokens/s varied by more than {100 * NOISY_CV:.0f}% between repetitions "
                     "(a busy CPU?); a figure to compare wants a quiet machine, -t 1, or more -r", "note:", "dim")
    if plot is not None and run.rows:
        from edgekit.runtime.profile_plot import pareto_png

        pareto_png(run.rows, plot)
        say(err, str(plot), "wrote", "green")
    if terminal_plot and run.rows:
        from edgekit.runtime.profile_plot import terminal_bars

        sys.stderr.write(terminal_bars(run.rows) + "\n")


@handle_errors
def profile_cmd(
    artifacts: list[Path] = typer.Argument(None, help="Artifact folders or model files (several: interleaved)."),
    tests: str = typer.Option("pp512,tg128", "--tests", help="llama-bench tests: pp512, tg128, pp512+tg128, "
                              "tg128@d4096 (depth)."),
    reps: int = typer.Option(5, "--reps", "-r", help="Timed repetitions per test."),
    warmup: bool = typer.Option(True, "--warmup/--no-warmup", help="One untimed short run before each test."),
    threads: str = typer.Option("auto", "--threads", "-t", help="Sweep, e.g. 1,2 (auto: the physical cores)."),
    batch: str = typer.Option("512", "--batch", "-b", help="Sweep of n_batch, e.g. 128,512."),
    ctx: str = typer.Option("auto", "--ctx", "-c", help="Sweep of n_ctx, e.g. 512,2048 (auto: just enough)."),
    depth: str = typer.Option("0", "--depth", "-d", help="Sweep of context depth added to every test."),
    gpu_layers: str = typer.Option("0", "--gpu-layers", "--ngl", help="Sweep of n_gpu_layers."),
    offload: str = typer.Option("none", "--offload", help="'auto': GPU layers and overrides from `edgekit plan`."),
    experts: str | None = typer.Option(None, "--experts", help="Sweep of the experts a mixture-of-experts GGUF runs "
                                       "per token, e.g. 2,4,8,all (a --sparse-ffn file: its cold clusters; config "
                                       "column eN).", show_default=False, metavar="<n,...|all>"),
    method: str = typer.Option("auto", "--method", help="auto (llama.cpp in-worker loop) or generic."),
    as_json: bool = typer.Option(False, "--json", help="All rows as JSON (schema edgekit.profile/1)."),
    as_csv: bool = typer.Option(False, "--csv", help="The table as CSV."),
    plot: Path | None = typer.Option(None, "--plot", help="Write a Pareto PNG: size vs perplexity vs tokens/s."),
    terminal_plot: bool = typer.Option(False, "--terminal-plot", help="Tokens/s bars in the terminal."),
    compare: bool = typer.Option(False, "--compare", help="Show change over time from the local history."),
    history: bool = typer.Option(True, "--history/--no-history", help="Keep this run in the local history."),
    llama_bench: Path | None = typer.Option(None, "--from-llama-bench", help="Import `llama-bench -o json` output."),
    device: str | None = typer.Option(None, "--device", help="Run on a device (ssh:NAME, android:SERIAL): pushes "
                                      "the artifact, profiles there, same report."),
    runner: Path | None = typer.Option(None, "--runner", help="With --device: a llama-bench binary built for the "
                                       "device (needed on Android; otherwise edgekit installed there is used)."),
    remote_edgekit: str | None = typer.Option(None, "--remote-edgekit", help="With --device: edgekit's path there."),
    images: int = typer.Option(8, "--images", help="Diffusion: the batch timed besides batch 1."),
    steps: int | None = typer.Option(None, "--steps", help="Diffusion: sampling steps (default: the model's)."),
    cache_interval: int | None = typer.Option(None, "--cache-interval", help="Diffusion: also time DeepCache "
                                              "sampling with this interval."),
    draft: list[Path] = typer.Option(None, "--draft", help="Also time greedy generation with this draft model "
                                     "(speculative decoding), against the same generation without it.",
                                     metavar="<path>"),
    speculative: str | None = typer.Option(None, "--speculative", help="'ngram': also time prompt-lookup drafting."),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="With --draft/--speculative: the prompt to "
                                      "generate from (default: a built-in rewrite task)."),
    gen: int = typer.Option(128, "--gen", help="With --draft/--speculative: tokens generated per repetition."),
) -> None:
    """Measure prompt processing, generation, TTFT, load time, peak memory; sweep and compare.

    Examples:
      edgekit profile ./model-gguf-q4
      edgekit profile a/ b/ c/ --threads 1,2 --ctx 512,2048 --json > runs.json
      edgekit profile a/ b/ --plot pareto.png
      edgekit profile --compare
      edgekit profile ./model-gguf-q4 --device ssh:jetson
      edgekit profile ./model-q8_0 --draft ./model-draft --speculative ngram   # tg with and without drafting
      edgekit profile ./model-q4-sparse --experts 2,4,8,all   # a hot/cold file's speed curve
      edgekit profile ./pipe-4step-onnx-w8 --images 16 --cache-interval 3   # a diffusion model
    """
    from edgekit.cli import diffusion_run
    from edgekit.errors import InputError
    from edgekit.runtime.profile import ProfileConfig, ProfileInterrupted, ProfileRun, parse_tests, profile

    if experts is not None and (llama_bench is not None or device is not None or compare):
        raise InputError("--experts sweeps a profile run on this host; drop it with --from-llama-bench, --device "
                         "or --compare")
    kinds = {diffusion_run.is_diffusion(a) for a in artifacts or []}
    if experts is not None and True in kinds:
        raise InputError("--experts is for a mixture-of-experts language model; drop it for a diffusion model")
    if kinds == {True} and not compare and device is None:
        diffusion_run.profile_images(artifacts, reps=reps, steps=steps, images=images, cache_interval=cache_interval,
                                     threads=threads, as_json=as_json)
        return
    if len(kinds) > 1:
        raise InputError("profile diffusion models and language models in separate runs")

    if compare:
        _show_compare(artifacts, as_json)
        return
    if llama_bench is not None:
        run = _import_llama_bench(llama_bench)
    elif device is not None:
        run = _profile_on_device(device, artifacts, tests, reps, threads, runner, remote_edgekit,
                                 not (as_json or as_csv))
    else:
        if not artifacts:
            raise InputError("give one or more artifact folders or model files to profile (or --compare)")
        if offload not in ("none", "auto"):
            raise InputError("--offload takes 'auto' or 'none'")
        if speculative not in (None, "ngram"):
            raise InputError(f"--speculative takes 'ngram' (got {speculative!r}); a draft model is --draft PATH")
        drafters = tuple(str(d) for d in draft or ()) + ((speculative,) if speculative else ())
        if prompt is not None and not drafters:
            raise InputError("--prompt is the text drafting is timed on: add --draft PATH or --speculative ngram")
        cfg = ProfileConfig(tests=parse_tests(tests), reps=reps, warmup=warmup, threads=_ints(threads, "threads", True),
                            batch=_ints(batch, "batch"), ctx=_ints(ctx, "ctx", True), depth=_ints(depth, "depth"),
                            gpu_layers=_ints(gpu_layers, "gpu-layers"), offload_auto=offload == "auto", method=method,
                            drafters=drafters, prompt=prompt, gen_tokens=gen, experts=_experts(experts))
        interrupted: ProfileRun | None = None
        with _progress(not (as_json or as_csv), json_like=True) as progress:
            try:
                run = profile(artifacts, cfg, on_progress=progress)
            except ProfileInterrupted as exc:
                interrupted = run = exc.run
        if interrupted is not None:
            say(err, "partial results below are marked 'interrupted'", "interrupted:", "yellow")
    _emit(run, as_json, as_csv, plot, terminal_plot, device)
    if history and run.rows:
        from edgekit.errors import EdgekitError
        from edgekit.runtime.history import History

        try:
            with History() as h:
                h.save(run.rows, started=run.started, status=run.status, host=run.host)
        except EdgekitError as exc:  # a damaged, full or read-only history: what was measured is shown above
            say(err, f"{exc}; this run was not recorded in the profile history", "warning:", "yellow")
    if run.status == "interrupted":
        raise typer.Exit(130)
    errors = [r for r in run.rows if r.status == "error"]
    if errors:
        say(err, str(errors[0].error), "error:", "bold red")
        raise typer.Exit(6)


def _experts(text: str | None) -> tuple[str | None, ...]:
    """``--experts 2,4,all``: the values, checked against each file when it is profiled."""
    from edgekit.errors import InputError

    if text is None:
        return (None,)
    values = tuple(v.strip().lower() for v in text.split(","))
    if not all(v == "all" or v.isdigit() and int(v) > 0 for v in values):
        raise InputError(f"--experts takes counts and 'all', e.g. 2,4,8,all (got {text!r})")
    return values


def _progress(enabled: bool, json_like: bool = False) -> Any:
    """The progress bar; ``json_like``: ``enabled`` False means --json/--csv output, whose progress still shows
    where stderr is a terminal (:func:`progress_unless_piped`)."""
    from edgekit.cli.ui import progress_bar, progress_unless_piped

    return progress_bar(progress_unless_piped(not enabled) if json_like else enabled)


def _profile_on_device(device_id: str, artifacts: list[Path] | None, tests: str, reps: int, threads: str,
                       runner: Path | None, remote_edgekit: str | None, show_progress: bool) -> Any:
    """Push each artifact to the device and profile it there (edgekit.devices.profile)."""
    from edgekit.artifact import now_iso
    from edgekit.cli.ui import progress_bar
    from edgekit.devices import open_device
    from edgekit.devices.profile import RemoteProfileConfig, remote_profile
    from edgekit.errors import InputError
    from edgekit.runtime.profile import ProfileRun
    from edgekit.runtime.profile_schema import ProfileRow

    if not artifacts:
        raise InputError("give the artifact(s) to profile on the device")
    t = _ints(threads, "threads", True)
    if len(t) > 1:
        raise InputError("--device runs one configuration; give a single --threads value")
    dev = open_device(device_id)
    cfg = RemoteProfileConfig(tests=tests, reps=reps, threads=t[0], runner=runner, remote_edgekit=remote_edgekit)
    rows = []
    with progress_bar(show_progress) as progress:
        for art in artifacts:
            rows += [ProfileRow.from_json(r) for r in remote_profile(dev, art, cfg, progress=progress)]
    return ProfileRun(rows=rows, started=now_iso(), host={"device": device_id, **dev.info().to_json()})


def _import_llama_bench(path: Path) -> Any:
    from edgekit.errors import InputError
    from edgekit.runtime import hostinfo
    from edgekit.runtime.profile import ProfileRun, from_llama_bench

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path} as llama-bench JSON ({exc}); produce it with `llama-bench -o json`") from None
    rows = from_llama_bench(data)
    from edgekit.artifact import now_iso

    return ProfileRun(rows=rows, started=now_iso(), host={**hostinfo.host_fingerprint(), "imported_from": str(path)})


def _show_compare(artifacts: list[Path] | None, as_json: bool) -> None:
    from rich.table import Table
    from rich.text import Text

    from edgekit.runtime.history import History

    names = [p.name if p.is_dir() else p.stem for p in artifacts or []] or [None]
    with History() as h:
        data = [c for n in names for c in h.compare(n)]
    if as_json:
        print_json(data, indent=1)
        return
    if not data:
        out.print("no profile history yet: run `edgekit profile ARTIFACT` first")
        return
    table = Table(title="profile history (tokens/s, oldest to newest)")
    for col in ("artifact", "test", "threads", "ctx", "ngl", "runs", "latest", "change"):
        table.add_column(col, justify="left" if col in ("artifact", "test", "runs") else "right")
    for c in data:
        series = " → ".join(f"{r['tps']:.1f}" for r in c["runs"] if r["tps"] is not None)
        change = "-" if c["change"] is None else f"{100 * c['change']:+.1f}%"
        latest = c["runs"][-1]
        table.add_row(Text(c["artifact"]), c["test"], str(c["config"]["n_threads"]), str(c["config"]["n_ctx"]),
                      str(c["config"]["n_gpu_layers"]), series, latest["timestamp"], change)
    out.print(table)


@handle_errors
def plan_cmd(
    artifact: Path = typer.Argument(..., help="Artifact folder or GGUF file."),
    vram: str = typer.Option("0", "--vram", help="GPU memory budget, e.g. 6GiB (0: no GPU)."),
    ram: str | None = typer.Option(None, "--ram", help="Host memory budget, e.g. 8GiB (default: available now)."),
    ctx: int | None = typer.Option(None, "--ctx", "-c", help="Context length to plan for (default: 4096, or the "
                                   "artifact's own context where it holds fewer, as MLC and Core ML may).",
                                   show_default=False),
    batch: int = typer.Option(512, "--batch", "-b", help="n_batch / n_ubatch."),
    cache_type: str = typer.Option("f16", "--cache-type", help="KV cache type (f16, q8_0, q4_0...)."),
    gpu_bandwidth: float = typer.Option(300.0, "--gpu-bandwidth", help="GPU memory bandwidth in GB/s (assumed)."),
    cpu_bandwidth: float | None = typer.Option(None, "--cpu-bandwidth", help="Host bandwidth in GB/s "
                                               "(default: measured once on this host)."),
    draft: Path | None = typer.Option(None, "--draft", help="Count a speculative-decoding draft (run --draft) "
                                      "loaded beside the model: its weights, KV cache and buffers, on the CPU."),
    kv_window: int | None = typer.Option(None, "--kv-window", help="Plan for a KV window of this many tokens "
                                         "(run --kv-window): the cache holds the window, whatever the text's length."),
    experts: str | None = typer.Option(None, "--experts", help="Plan for run --experts N: the experts a "
                                       "mixture-of-experts GGUF runs per token (the bytes each token reads).",
                                       show_default=False, metavar="<n|all>"),
    as_json: bool = typer.Option(False, "--json", help="The plan as JSON."),
) -> None:
    """Does it fit, and how to split it: memory by part and a llama.cpp offload plan.

    Examples:
      edgekit plan ./model-gguf-q4 --vram 6GiB --ram 8GiB --ctx 8192
      edgekit plan ./model-gguf-q4 --ctx 4096 --json
      edgekit plan ./model-q8_0 --draft ./model-draft --kv-window 1024   # a drafted chat in a KV window
    """
    from edgekit.artifact import Artifact
    from edgekit.runtime.plan import DEFAULT_PLAN_CTX, MemoryPlan, parse_size, plan_artifact
    from edgekit.validate import check_number

    check_number(gpu_bandwidth, "--gpu-bandwidth", above=0, note=" GB/s")
    if cpu_bandwidth is not None:
        check_number(cpu_bandwidth, "--cpu-bandwidth", above=0, note=" GB/s (leave it out to measure this host's)")
    art = Artifact.open(artifact)
    p = plan_artifact(art, ram_bytes=parse_size(ram) if ram else None, vram_bytes=parse_size(vram), n_ctx=ctx,
                      n_batch=batch, cache_type=cache_type, cpu_Bps=cpu_bandwidth * 1e9 if cpu_bandwidth else None,
                      gpu_Bps=gpu_bandwidth * 1e9, draft=draft, kv_window=kv_window, experts=experts)
    if isinstance(p, MemoryPlan):
        _print_memory_plan(art, p, as_json, kv_window)
        return
    if as_json:
        print_json(p.to_json(), indent=1)
        return
    parts = p.memory.parts
    from rich.text import Text

    say(out, Text.assemble((art.name, "bold"), f" at {_ctx_words(p.n_ctx, kv_window)}: ", ("fits", "green"),
                           f" ({p.device})"))
    say(out, f"  {p.reason}")
    repacked = (f" ({_mb(parts['weights_cpu'])} mapped from the file + a {_mb(parts['weights_repacked'])} copy repacked "
                "for the CPU)") if parts["weights_repacked"] else ""
    say(out, f"  RAM  {_mb(p.memory.ram_bytes)} at peak: weights {_mb(parts['weights_cpu'] + parts['weights_repacked'])}"
              f"{repacked}, KV {_mb(parts['kv_cpu'])}, compute {_mb(parts['compute_cpu'] + parts.get('work_cpu', 0))}, baseline {_mb(parts['baseline'])}, "
              f"other {_mb(parts['overhead'] + parts['output_cpu'])}")
    if p.draft is not None:
        dp = p.draft.parts
        say(out, f"  draft {_mb(p.draft.ram_bytes)} more RAM (CPU): weights "
                  f"{_mb(dp.get('weights_cpu', 0) + dp.get('weights_repacked', 0))}, KV {_mb(dp.get('kv_cpu', 0))}, "
                  f"compute {_mb(dp.get('compute_cpu', 0) + dp.get('work_cpu', 0))}, other {_mb(dp.get('overhead', 0) + dp.get('output_cpu', 0))}"
                  f"; {_mb(p.memory.ram_bytes + p.draft.ram_bytes)} in all")
    _say_required(p)
    if p.memory.vram_bytes:
        say(out, f"  VRAM {_mb(p.memory.vram_bytes)}: weights {_mb(parts['weights_gpu'])}, KV {_mb(parts['kv_gpu'])}, "
                  f"compute {_mb(parts['compute_gpu'])} (modeled)")
    flags = [f"-ngl {p.n_gpu_layers}"] + ([] if p.offload_kqv or not p.n_gpu_layers else ["--no-kv-offload"])
    flags += [f"-ot '{pat}={buft}'" for pat, buft in p.tensor_overrides]
    # the run that uses this plan: the same budget and context (run's own defaults differ: the GPU's free
    # memory, 2048 tokens), drafting and KV window
    ours = f"run {artifact} --offload auto --vram {vram} -c {ctx if ctx is not None else DEFAULT_PLAN_CTX}"
    if kv_window:
        ours += f" --kv-window {kv_window}"
    if draft is not None:
        ours += f" --draft {draft}"
    if experts is not None:
        from edgekit.runtime.llamacpp_decoding import experts_options

        ((key, k),) = experts_options(art.bare_file or art.path, experts)["kv_overrides"].items()
        flags.append(f"--override-kv {key}=int:{k}")
        ours += f" --experts {experts}"
    say(out, f"  llama.cpp: {' '.join(flags)}    edgekit: {ours}")


def _say_required(p: Any) -> None:
    """Why the RAM a plan fits in (its reason's "needs") is less than the peak printed beside it: the file pages
    llama.cpp reads to repack weights for the CPU are page cache the kernel drops once the copy is made."""
    need = p.memory.ram_required_bytes + (p.draft.required_bytes if p.draft else 0)
    dropped = p.memory.ram_bytes + (p.draft.ram_bytes if p.draft else 0) - need
    if dropped > 0:
        say(out, f"  fits in {_mb(need)} ({need / (1 << 30):.2f} GiB) of free RAM, less than the peak: the other "
                 f"{_mb(dropped)} are file pages read once to make the repacked copy, which the kernel can drop")


def _ctx_words(n_ctx: int, kv_window: int | None) -> str:
    return f"a KV window of {n_ctx}" if kv_window else f"ctx {n_ctx}"


def _print_memory_plan(art: Any, p: Any, as_json: bool, kv_window: int | None = None) -> None:
    """A runtime with a memory model but no offload planner (onnxruntime): memory by part, fits or not."""
    from edgekit.errors import InputError

    if as_json:
        print_json(p.to_json(), indent=1)
    else:
        from rich.text import Text

        verdict = ("fits", "green") if p.fits else ("does not fit", "red")
        say(out, Text.assemble((art.name, "bold"), f" at {_ctx_words(p.n_ctx, kv_window)}: ", verdict,
                               f" in {_mb(p.ram_budget)} RAM ({p.runtime}, CPU)"))
        parts = ", ".join(f"{k.replace('_', ' ')} {_mb(v)}" for k, v in p.parts.items() if v)
        say(out, f"  RAM  {_mb(p.ram_bytes)}: {parts}")
        say(out, f"  {p.reason}")
    if not p.fits:
        raise InputError(f"{art.name} needs about {_mb(p.ram_bytes)} at ctx {p.n_ctx}"
                         + (" with its draft" if p.draft else "") + f" but the budget is {_mb(p.ram_budget)}; "
                         "lower --ctx (or keep a --kv-window) or use a smaller artifact")


def offload_options(artifact: Path, offload: str, ctx: int, vram: str | None = None,
                    draft: Path | None = None, experts: str | None = None) -> dict[str, Any]:
    """``run --offload auto``: the plan's backend options for this host (with its reason on stderr);
    ``vram`` caps the GPU budget (default: the GPU's free memory); a ``draft``'s RAM is left free."""
    from edgekit.artifact import Artifact
    from edgekit.errors import InputError
    from edgekit.runtime.plan import offload_options as plan_options
    from edgekit.runtime.plan import parse_size

    if offload == "none":
        if vram is not None:
            raise InputError("--vram is the budget of --offload auto; add --offload auto")
        return {}
    opts, reason = plan_options(Artifact.open(artifact), offload, ctx,
                                vram_bytes=None if vram is None else parse_size(vram), draft=draft, experts=experts)
    if reason:
        say(err, tagged("offload:", "dim", reason))
    return opts


def register(app: typer.Typer) -> None:
    app.command("profile")(profile_cmd)
    app.command("plan")(plan_cmd)
