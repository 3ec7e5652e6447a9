"""``edgekit distill``: a diffusion pipeline distilled into a few-step student."""

from __future__ import annotations

from pathlib import Path

import typer

from edgekit.cli.ui import handle_errors, out, print_json, progress_bar, progress_unless_piped, say


@handle_errors
def distill_cmd(
    pipeline: Path = typer.Argument(..., help="A diffusers pipeline folder (UNet2DModel; model_index.json, unet/, "
                                    "scheduler/), or digits-unet: the built-in teacher."),
    steps: int = typer.Option(4, "--steps", help="Sampling steps the student is for (1-8)."),
    method: str = typer.Option("trajectory", "--method", help="trajectory (learns the teacher's ODE solutions "
                               "between its steps, samples with DDIM), lcm (skipping-step consistency, "
                               "pseudo-Huber loss) or consistency (finer grid, L2 loss)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Student pipeline folder (default "
                                       "PIPELINE-<steps>step beside it)."),
    iters: int = typer.Option(4000, "--iters", help="Optimizer steps."),
    minutes: float = typer.Option(0.0, "--minutes", help="Stop after this long and keep a state that a rerun "
                                  "resumes from (0: no limit)."),
    batch: int = typer.Option(64, "--batch", help="Images per step."),
    lr: float = typer.Option(1e-4, "--lr", help="Learning rate."),
    data: str | None = typer.Option(None, "--data", help="lcm/consistency: training images: 'digits', 'teacher' "
                                    "(sampled by the teacher first) or a folder of images (default: digits for "
                                    "the built-in model, else teacher)."),
    trajectories: int = typer.Option(16000, "--trajectories", help="trajectory: ODE solutions the teacher "
                                     "computes first (saved, so a rerun reuses them)."),
    substeps: int = typer.Option(12, "--substeps", help="trajectory: the teacher's DDIM steps per student step."),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force", help="Replace an existing student edgekit wrote."),
    threads: int | None = typer.Option(None, "--threads", "-t", help="CPU threads for PyTorch."),
    as_json: bool = typer.Option(False, "--json", help="Print the distillation record as JSON."),
) -> None:
    """Distill a diffusion pipeline to 1-8 sampling steps (trajectory, LCM or consistency distillation).

    Interrupted (Ctrl-C) or stopped by --minutes, a rerun with the same arguments resumes.

    Examples:
      edgekit distill digits-unet --steps 4 -o ./digits-4step
      edgekit distill digits-unet --steps 4 --method lcm -o ./digits-4step-lcm
      edgekit distill ./my-ddpm --steps 2 --method lcm --data ./images --minutes 60
    """
    from edgekit.converters.diffusion.distill import DistillConfig, distill
    from edgekit.runtime.hostinfo import use_torch_threads

    cfg = DistillConfig(steps=steps, method=method, iters=iters, minutes=minutes, batch=batch, lr=lr, data=data,
                        trajectories=trajectories, substeps=substeps, seed=seed)
    use_torch_threads(threads)
    dest = output or pipeline.parent / f"{pipeline.name}-{steps}step"
    with progress_bar(progress_unless_piped(as_json)) as progress:  # Ctrl-C: one "interrupted" line says what was kept (exit 130)
        rec = distill(pipeline, dest, cfg, force=force, progress=progress)
    if as_json:
        print_json(rec)
        return
    if not rec["finished"]:
        say(out, f"stopped at step {rec['step']}/{rec['iters']} after {rec['seconds']:.0f} s (--minutes); run the "
                 "same command again to go on", "paused", "yellow")
        return
    d = rec["distilled"]
    last = d["losses"][-1][1] if d["losses"] else float("nan")
    say(out, f"{dest}: a {rec['steps']}-step {method} student ({d['iters']} steps, {d['seconds']:.0f} s, final loss "
             f"{last:.5f}); sample it with 'edgekit run {dest} --class 7'", "wrote", "green")


def register(app: typer.Typer) -> None:
    app.command("distill")(distill_cmd)
