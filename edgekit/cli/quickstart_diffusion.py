"""``edgekit quickstart --diffusion``: the built-in digits diffusion model end to end, with no arguments.

The teacher (a class-conditional UNet trained on scikit-learn's digits, shipped with edgekit) and its 4-step
trajectory-distilled student (shipped too: distilling takes about 30 minutes on 2 cores; ``--distill`` redoes it
here) are
converted to 8-bit ONNX, sampled with onnxruntime into a PNG grid, timed, and scored with the digits-FID
against the 50-step teacher and the teacher sampled in as few steps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from edgekit.fsutil import edgekit_home

TEACHER = "digits-unet"
STUDENT = "digits-unet-4step"
N_SCORE = 1000
# how the shipped student was made: 'edgekit distill digits-unet --steps 4 --iters 2000 --batch 128
# --lr 1e-4' (the trajectory method's 16,000 solved trajectories, 12 teacher steps per student step)
SHIPPED_DISTILL_ARGS = {"steps": 4, "method": "trajectory", "iters": 2000, "batch": 128, "lr": 1e-4}


def shipped(name: str) -> Path:
    """A pipeline shipped in edgekit/data (``distill`` takes these names too)."""
    from edgekit.converters.diffusion.pipeline import builtin_pipeline

    return builtin_pipeline(name)


def run_quickstart_diffusion(home: Path | None = None, force: bool = False, distill_again: bool = False,
                             threads: int | None = None, as_json: bool = False, n: int = N_SCORE) -> dict[str, Any]:
    """Every step, printed as it goes (unless ``as_json``); returns the figures."""
    from edgekit import api
    from edgekit.cli.ui import out, print_json, progress_bar, progress_unless_piped, say
    from edgekit.converters.diffusion.pipeline import open_pipeline
    from edgekit.converters.diffusion.sampler import SampleTrace, grid_png
    from edgekit.fsutil import atomic_file
    from edgekit.library import artifact_name, store_dir
    from edgekit.runtime.diffusion import open_diffusion

    base = edgekit_home(home, create=True)
    figures: dict[str, Any] = {"fid": {}, "label_agreement": {}}
    quiet = as_json

    def step(title: str, estimate: str) -> float:
        if not quiet:
            out.rule(f"[bold]{title}[/] [dim]({estimate})")
        return time.perf_counter()

    def note(msg: str) -> None:
        if not quiet:
            say(out, msg)

    teacher = open_pipeline(shipped(TEACHER))
    step("1/5 built-in model: a class-conditional UNet on scikit-learn's digits", "shipped with edgekit")
    n_params = sum(p.numel() for p in teacher.load_unet().parameters())
    figures["teacher_params"] = n_params
    note(f"{teacher.path}: {n_params / 1e6:.2f}M parameters, 16x16, 10 classes, "
         f"{teacher.info.get('train', {}).get('iters', '?')} training steps")

    student_dir = shipped(STUDENT)
    if distill_again:
        from edgekit.converters.diffusion.distill import DistillConfig, distill

        student_dir = base / STUDENT
        t = step("2/5 distill to 4 steps (the teacher's trajectories)",
                 "about 30 minutes on 2 cores; Ctrl-C and rerun resumes")
        if force or not (student_dir / "model_index.json").exists():
            with progress_bar(progress_unless_piped(quiet)) as progress:
                distill(teacher.path, student_dir, DistillConfig(**SHIPPED_DISTILL_ARGS), force=True,
                        progress=progress)
        figures["distill_s"] = round(time.perf_counter() - t, 1)
    else:
        step("2/5 distill to 4 steps (the teacher's trajectories)", "shipped; --distill redoes it here")
    student = open_pipeline(student_dir)
    d = student.info.get("distilled", {})
    note(f"{student.path}: {d.get('method', '?')} student, {d.get('iters', '?')} steps of distillation "
         f"({d.get('seconds', 0) / 60:.0f} min when made)")

    store = store_dir(home and home / "models", create=True)
    arts = {}
    t = step("3/5 quantize (GPTQ, 8-bit weights) and export to ONNX", "about 30 s")
    for name, src in (("teacher", teacher.path), ("student", student.path)):
        dest = store / artifact_name(src.name, "onnx", "w8-gptq")
        if force or not (dest / "edgekit.json").exists():
            with progress_bar(progress_unless_piped(quiet)) as progress:
                api.convert(src, "onnx", output=dest, recipe=api.ConvertRecipe(bits=8, method="gptq"), force=True,
                            progress=progress)
        arts[name] = dest
        note(f"{dest}: {json.loads((dest / 'edgekit.json').read_text())['size_bytes'] / 1e6:.2f} MB")
    figures["convert_s"] = round(time.perf_counter() - t, 1)

    step("4/5 sample with onnxruntime: one of each digit, and time one image", "a few seconds")
    grid = base / "digits-quickstart.png"
    with open_diffusion(arts["student"], threads=threads) as model:
        imgs = model.generate(10, model.labels(10, None), model.config())
        with atomic_file(grid) as part:
            grid_png(imgs, part, scale=6, cols=10)
        lat = {}
        for name, art in arts.items():
            with open_diffusion(art, threads=threads) as m:
                cfg = m.config()
                m.generate(1, m.labels(1, 3), cfg)  # warm
                trace = SampleTrace()
                t0 = time.perf_counter()
                m.generate(1, m.labels(1, 3), cfg, trace)
                lat[name] = {"steps": cfg.steps, "image_s": round(time.perf_counter() - t0, 4)}
    figures["latency"] = lat
    figures["speedup"] = round(lat["teacher"]["image_s"] / lat["student"]["image_s"], 1)
    note(f"{grid}; one image: teacher {lat['teacher']['steps']} steps {lat['teacher']['image_s'] * 1000:.0f} ms, "
         f"student {lat['student']['steps']} steps {lat['student']['image_s'] * 1000:.0f} ms "
         f"({figures['speedup']}x faster)")

    step(f"5/5 score {n} images each: digits-FID, label agreement", "about 2 minutes")
    rows = (("teacher_50", arts["teacher"], 50), ("teacher_4", arts["teacher"], 4), ("teacher_2", arts["teacher"], 2),
            (f"student_{student.default_steps}", arts["student"], student.default_steps),
            # a consistency student also samples in one step; a trajectory student is made for its own steps
            *((("student_1", arts["student"], 1),) if student.sampler == "consistency" else ()))
    with progress_bar(progress_unless_piped(quiet)) as progress:
        for key, art, steps in rows:
            r = api.evaluate_diffusion(art, n=n, steps=steps, progress=progress, record=False, threads=threads)
            figures["fid"][key] = round(r["fid"], 3)
            figures["label_agreement"][key] = round(r["label_agreement"], 4)
    figures["fid_floor"] = r.get("floor")
    figures["grid"] = str(grid)
    if as_json:
        print_json(figures)
        return figures
    from rich.table import Table

    table = Table("model", "steps", "digits-FID", "labels right", title=f"{n} images each (lower FID is better; "
                  f"real digits: {figures['fid_floor']})")
    for key, _, steps in rows:
        table.add_row(key.split("_")[0], str(steps), f"{figures['fid'][key]:.2f}",
                      f"{100 * figures['label_agreement'][key]:.1f}%")
    out.print(table)
    return figures
