"""``edgekit eval`` on a diffusion model (a diffusers pipeline folder or a diffusion artifact): sample, then
digits-FID, precision/recall and label agreement. ``eval_cmd`` in main.py hands over here when the target
is a diffusion model; the language-model path stays there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from edgekit.errors import InputError

N_HELP = "Diffusion: images to sample (classes balanced; compare models at the same N, 1000 by default)."
STEPS_HELP = "Diffusion: sampler steps (default: what the model asks for, 50 DDIM steps for a teacher)."
SAMPLER_HELP = "Diffusion: ddim or consistency (default: the model's own)."
CACHE_HELP = "Diffusion: DeepCache, recompute the deep features every this many steps (1: off)."
SEED_HELP = "Diffusion: seed of the starting noise."


def diffusion_options(n: int | None, steps: int | None, sampler: str | None, cache_interval: int | None,
                      seed: int | None) -> dict[str, Any]:
    """The diffusion options that were given (None: not given)."""
    opts = {"n": n, "steps": steps, "sampler": sampler, "cache_interval": cache_interval, "seed": seed}
    return {k: v for k, v in opts.items() if v is not None}


def refuse_llm_options(target: Path, given: dict[str, Any]) -> None:
    """A language-model eval given a diffusion-only option: say so in one line."""
    if given:
        flags = ", ".join("--images" if k == "n" else "--" + k.replace("_", "-") for k in given)
        raise InputError(f"{flags} {'is' if len(given) == 1 else 'are'} for diffusion models; {target} is a language model: measure it with "
                         f"'edgekit eval {target} --text FILE'")


def refuse_text_options(target: Path, text: Path | None, ref: Path | None, kv_window: int | None) -> None:
    flags = [f for f, v in (("--text", text), ("--ref", ref), ("--kv-window", kv_window)) if v is not None]
    if flags:
        raise InputError(f"{', '.join(flags)} {'is' if len(flags) == 1 else 'are'} for language models; {target} is a diffusion model: drop them "
                         "(it is scored on images it samples)")


def run(target: Path, options: dict[str, Any], record: bool, as_json: bool) -> None:
    from edgekit.cli.ui import out, print_json, progress_bar, progress_unless_piped
    from edgekit.evaluate import evaluate_diffusion

    with progress_bar(progress_unless_piped(as_json)) as progress:
        res = evaluate_diffusion(target, progress=progress, record=record, **options)
    if as_json:
        print_json(res)
        return
    out.print(table(str(target), res))


def table(name: str, res: dict[str, Any]) -> Any:
    from rich.table import Table
    from rich.text import Text

    cache = f", cache every {res['cache_interval']}" if res["cache_interval"] > 1 else ""
    title = Text(f"{name}: {res['sampler']} {res['steps']} steps{cache}, {res['n']} images (classes balanced) "
                 f"in {res['seconds']:.1f} s, against {res['reference_n']} reference digits")
    t = Table(title=title)
    for col in ("digits-FID", "floor", "precision", "recall", "label agreement"):
        t.add_column(col, justify="right")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    t.add_row(f"{res['fid']:.2f}", fmt(res.get("floor"), ".2f"), f"{res['precision']:.3f}", f"{res['recall']:.3f}",
              fmt(None if res["label_agreement"] is None else 100 * res["label_agreement"], ".1f") + "%")
    return t


def check_missing(target: Path) -> None:
    """A target that is nowhere: the error names both kinds of model ``eval`` takes."""
    from edgekit import library

    p = library.resolve(target)
    if not p.exists():
        raise InputError(f"{p} does not exist; give an artifact folder, a model file or a diffusers pipeline "
                         f"folder{library.not_found_hint(target)}")


def register_options() -> dict[str, Any]:
    """The typer options ``eval`` takes for diffusion models (all default None: not given)."""
    return {
        # --images, not -n: in edgekit as in llama.cpp, -n is a number of tokens
        "n": typer.Option(None, "--images", help=N_HELP, show_default=False),
        "steps": typer.Option(None, "--steps", help=STEPS_HELP, show_default=False),
        "sampler": typer.Option(None, "--sampler", help=SAMPLER_HELP, show_default=False),
        "cache_interval": typer.Option(None, "--cache-interval", help=CACHE_HELP, show_default=False),
        "seed": typer.Option(None, "--seed", help=SEED_HELP, show_default=False),
    }
