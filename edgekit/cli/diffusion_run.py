"""The diffusion side of ``run``, ``profile`` and ``inspect``: chosen by the artifact's task, not a flag.

``run``, ``profile`` and ``inspect`` call :func:`is_diffusion` on their target first and hand a diffusion
artifact (or a diffusers pipeline folder) to the functions here; heavy imports stay inside them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edgekit.cli.flags import typed_flags
from edgekit.cli.ui import out, print_json, progress_bar, progress_unless_piped, say
from edgekit.errors import InputError

IMAGE_OPTIONS = ("--class", "--output/-o", "--steps", "--cache-interval")


def is_diffusion(target: Path) -> bool:
    from edgekit.evaluate import is_diffusion as check

    return check(target)


def refuse_image_options(target: Path, given: dict[str, Any]) -> None:
    """An LLM given ``run``'s image options is refused by name."""
    from edgekit import library

    bad = [flag for flag, value in given.items() if value is not None]
    if bad and not library.resolve(target).exists():
        raise InputError(f"{target} does not exist; give a diffusion artifact (made by 'edgekit convert PIPELINE "
                         f"--to onnx') or a diffusers pipeline folder{library.not_found_hint(target)}")
    if bad:
        raise InputError(f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} for diffusion models; {target} is a "
                         f"language model: drop {'it' if len(bad) == 1 else 'them'}")


# ``run``'s parameters that a diffusion model uses; any other one given on the command line is refused.
IMAGE_RUN_PARAMS = ("artifact", "seed", "max_tokens", "threads", "stats", "option", "as_json", "class_", "image_out",
                    "steps", "cache_interval")


def _command_line() -> tuple[list[str], list[str]]:
    """The language-model flags given to the running ``run`` command, and its ``-O`` pairs (empty outside a
    command, as when called from Python)."""
    try:  # recent typer carries its own copy of click
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover - older typer
        from click import get_current_context  # type: ignore[no-redef]

    ctx = get_current_context(silent=True)
    if ctx is None:
        return [], []
    typed = typed_flags(ctx, *(p.name for p in ctx.command.params if p.name not in IMAGE_RUN_PARAMS and p.name))
    given = [p for p in ctx.command.params if p.name in typed]
    flags = ["/".join(p.opts) for p in given]
    return flags, list(ctx.params.get("option") or [])


def run_images(target: Path, *, cls: int | None, n: int | None, output: Path | None, steps: int | None, seed: int,
               cache_interval: int | None, threads: int | None, as_json: bool) -> None:
    """``edgekit run ART --class 7 -n 16 -o grid.png``: sample a PNG grid and say what it cost."""
    from edgekit.api import format_options
    from edgekit.converters.diffusion.sampler import SampleTrace, grid_png
    from edgekit.fsutil import atomic_file
    from edgekit.runtime.diffusion import open_diffusion

    text_flags, pairs = _command_line()
    if text_flags:
        one = len(text_flags) == 1
        raise InputError(f"{', '.join(text_flags)} {'is' if one else 'are'} for language models; {target} is a "
                         f"diffusion model: drop {'it' if one else 'them'} (it samples images: --class N, -n IMAGES)")
    if steps is not None and steps < 1:
        raise InputError(f"--steps {steps}: give at least 1 sampling step (or leave it out for the model's own)")
    if cache_interval is not None and cache_interval < 1:
        raise InputError(f"--cache-interval {cache_interval}: give 1 (DeepCache off) or more")
    n = 16 if n is None else n
    output = output or Path("grid.png")
    if output.is_dir() or output.suffix.lower() != ".png":
        raise InputError(f"-o {output}: give a PNG file name such as grid.png")
    if not output.parent.exists():
        raise InputError(f"-o {output}: the folder {output.parent} does not exist")
    with open_diffusion(target, threads=threads, **format_options(pairs)) as model:
        labels = model.labels(n, cls)
        cfg = model.config(steps, seed, cache_interval or 1)
        trace = SampleTrace()
        with progress_bar(progress_unless_piped(as_json)) as progress:
            t0 = time.perf_counter()
            images = model.generate(n, labels, cfg, trace, lambda i, total: progress("sampling", i, total))
            seconds = time.perf_counter() - t0
        with atomic_file(output) as tmp:
            grid_png(images, tmp)
    full = [s for s, f in zip(trace.step_seconds, trace.full, strict=True) if f]
    shallow = [s for s, f in zip(trace.step_seconds, trace.full, strict=True) if not f]
    report = {"output": str(output), "images": n, "labels": None if labels is None else labels.tolist(),
              "sampler": cfg.sampler, "steps": cfg.steps, "cache_interval": cfg.cache_interval, "seed": seed,
              "runtime": model.name, "load_s": round(model.load_time, 4), "seconds": round(seconds, 4),
              "s_per_image": round(seconds / n, 5), "ms_per_step": round(1000 * seconds / cfg.steps, 3),
              "ms_full_step": round(1000 * sum(full) / len(full), 3) if full else None,
              "ms_shallow_step": round(1000 * sum(shallow) / len(shallow), 3) if shallow else None}
    if as_json:
        print_json(report, indent=None)
        return
    what = f"class {cls}" if cls is not None else ("one of each class" if labels is not None else "unconditional")
    cache = f", DeepCache every {cfg.cache_interval} steps" if cfg.cache_interval > 1 else ""
    say(out, f"{output}: {n} images ({what}), {cfg.steps} {cfg.sampler} steps{cache}, {report['s_per_image']:.4f} s "
             f"per image, {report['ms_per_step']:.1f} ms per step (batch {n}, {model.name})", "wrote", "green")


def profile_images(targets: list[Path], *, reps: int, steps: int | None, images: int, cache_interval: int | None,
                   threads: str, as_json: bool) -> None:
    """``edgekit profile ART`` for diffusion artifacts: a table (or JSON) per target."""
    from rich.table import Table
    from rich.text import Text

    from edgekit.runtime.diffusion_profile import profile_diffusion

    t = None if threads in ("auto", "default") else _int(threads, "--threads")
    intervals = (1,) if not cache_interval or cache_interval == 1 else (1, cache_interval)
    batches = (1,) if images == 1 else (1, images)
    results = []
    with progress_bar(progress_unless_piped(as_json)) as progress:
        for target in targets:
            results.append(profile_diffusion(target, batches=batches, reps=reps, steps=steps,
                                             cache_intervals=intervals, threads=t, progress=progress))
    if as_json:
        print_json(results if len(results) > 1 else results[0], indent=1)
        return
    for r in results:
        threads = f"{r['threads']} threads" if r.get("threads") else "numpy's own threads"  # the Core ML evaluator's
        table = Table(title=Text(f"{r['artifact']}: {r['runtime']}, {threads}, load {r['load_s']:.2f} s, "
                                 f"peak RSS {_mb(r['peak_rss_bytes'])}"))
        for col in ("batch", "cache", "steps", "s/image", "ms/step", "full ms", "shallow ms", "images/s"):
            table.add_column(col, justify="right")
        for row in r["rows"]:
            table.add_row(str(row["batch"]), str(row["cache_interval"]), str(row["steps"]), f"{row['s_per_image']:.4f}",
                          f"{row['ms_per_step']:.2f}", _ms(row["ms_full_step"]), _ms(row["ms_shallow_step"]),
                          f"{row['images_per_s']:.1f}")
        out.print(table)


def render_inspect(info: dict[str, Any]) -> None:
    """``edgekit inspect`` of a diffusion artifact: what it samples with, and each graph."""
    from rich.text import Text

    u, s = info.get("unet") or {}, info.get("sampler") or {}
    say(out, Text.assemble((str(info["path"]), "bold"), f"  {info['format']} diffusion UNet "
                           f"({(info.get('source') or {}).get('architecture', '?')}, "
                           f"{(info.get('source') or {}).get('n_params', 0):,} parameters)"))
    say(out, f"  input {u.get('in_channels')}x{u.get('sample_size')}x{u.get('sample_size')}, "
             f"{u.get('num_classes') or 'no'} classes, predicts {u.get('prediction_type')}; sampler {s.get('sampler')} "
             f"{s.get('steps')} steps; weights {info.get('preset')} ({_mb(info.get('size_bytes'))})")
    dc = info.get("deepcache")
    if dc:
        say(out, f"  DeepCache: cache = {dc['cache']} {dc.get('cache_shape')}; shallow graph: {', '.join(dc['shallow'])}")
    for key, g in info["graphs"].items():
        io = lambda vs: ", ".join(f"{v['name']} {v['type']}[{','.join(map(str, v['shape']))}]" for v in vs)  # noqa: E731
        data = f" + {', '.join(g['external_data'])}" if g.get("external_data") else ""
        say(out, Text.assemble(("  " + key, "bold"), f"  {g['file']}{data}  {_mb(g['bytes'])}, {g['params']:,} "
                               f"parameters, {g['ops']} ops, opset {g['opset']}"))
        say(out, f"    in:  {io(g['inputs'])}")
        say(out, f"    out: {io(g['outputs'])}")
        types = ", ".join(f"{k} {v['params']:,} ({v['tensors']} tensors)" for k, v in sorted(g["initializers"].items()))
        say(out, f"    stored as: {types}")


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{flag} takes one integer for a diffusion artifact (got {text!r})") from None


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"
