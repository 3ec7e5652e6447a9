"""Few-step diffusion on this CPU: the digits teacher against its distilled students, their quantized ONNX
artifacts and DeepCache, in one run (issue 20's targets).

Every row samples the same N images (N/10 per class, the same seed) with onnxruntime and scores them with
edgekit's digits-FID (``edgekit.imagemetrics``: features of a digits CNN, the whole dataset as reference),
precision/recall (k-NN manifolds, k=3) and label agreement. Latency per image is timed separately at batch 1
(median of repeats), and per step.

    python bench/diffusion.py                                   # shipped teacher and 4-step student
    python bench/diffusion.py --student-lcm /tmp/digits-4step-lcm --student-consistency /tmp/digits-4step-cd
    python bench/diffusion.py --distill-iters 3000              # distil the LCM and consistency students here

The targets are checked on ``--student`` (default: the shipped one, a ``trajectory`` student); the other
students add their own rows (consistency samplers at 4, 2 and 1 steps).

Writes bench/results/diffusion.{txt,json,png} (``--out PATH``: ``PATH.txt``, ``.json``, ``.png``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"


def shipped(name: str = "digits-unet") -> Path:
    from importlib import resources

    return Path(str(resources.files("edgekit") / "data" / name))


def method_of(student: Path) -> str:
    """How a student pipeline was distilled (its ``edgekit_diffusion.json``)."""
    from edgekit.converters.diffusion.pipeline import open_pipeline

    return str(open_pipeline(student).info.get("distilled", {}).get("method", "student"))


def convert(src: Path, work: Path, name: str, bits: int, method: str = "rtn", lowrank: int = 0) -> Path:
    from edgekit.converters.diffusion.convert import convert_pipeline

    out = work / name
    if (out / "edgekit.json").exists():
        return out
    t0 = time.perf_counter()
    convert_pipeline(src, "onnx", output=out, bits=bits, method=method, options={"lowrank": lowrank} if lowrank else None)
    print(f"  converted {name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def quality(art: Path, n: int, steps: int | None, cache_interval: int = 1, threads: int | None = None,
            seeds: int = 3) -> dict[str, Any]:
    """Sample ``n`` images (balanced classes) per seed and score each seed's set on its own: FID of 1000
    generated digits moves by several points from one seed to the next (measured: the 50-step teacher gave
    13.6 to 20.5), so a row is the mean over ``seeds`` sets, with their standard deviation."""
    from edgekit.imagemetrics import score
    from edgekit.runtime.diffusion import open_diffusion

    labels = np.arange(n, dtype=np.int64) % 10
    scores, secs, first = [], 0.0, None
    with open_diffusion(art, threads=threads) as model:
        cfg = model.config(steps=steps, cache_interval=cache_interval)
        for seed in range(seeds):
            t0 = time.perf_counter()
            imgs = np.concatenate([model.generate(len(labels[i:i + 250]), labels[i:i + 250],
                                                  model.config(steps=steps, seed=seed * 100_003 + i,
                                                               cache_interval=cache_interval))
                                   for i in range(0, n, 250)])
            secs += time.perf_counter() - t0
            scores.append(score(imgs, labels))
            first = imgs[:20] if first is None else first
    fids = [s["fid"] for s in scores]

    def mean(key: str) -> float:
        return round(float(np.mean([s[key] for s in scores])), 4)

    return {"steps": cfg.steps, "sampler": cfg.sampler, "cache_interval": cache_interval, "n": n, "seeds": seeds,
            "fid": round(float(np.mean(fids)), 3), "fid_sd": round(float(np.std(fids, ddof=1)) if seeds > 1 else 0.0, 3),
            "fids": [round(f, 3) for f in fids], "precision": mean("precision"), "recall": mean("recall"),
            "label_agreement": mean("label_agreement"), "batch_s_per_image": round(secs / (n * seeds), 5),
            "images": first}


def latency(art: Path, steps: int | None, cache_interval: int = 1, threads: int | None = None,
            repeats: int = 5) -> dict[str, float]:
    """Seconds for one image at batch 1 (median of ``repeats``), and per network evaluation."""
    from edgekit.converters.diffusion.sampler import SampleTrace
    from edgekit.runtime.diffusion import open_diffusion

    with open_diffusion(art, threads=threads) as model:
        cfg = model.config(steps=steps, cache_interval=cache_interval)
        lab = model.labels(1, 3)
        model.generate(1, lab, cfg)  # warm
        times, per_step = [], []
        for r in range(repeats):
            trace = SampleTrace()
            t0 = time.perf_counter()
            model.generate(1, lab, model.config(steps=steps, seed=r, cache_interval=cache_interval), trace)
            times.append(time.perf_counter() - t0)
            per_step.extend(trace.step_seconds)
    return {"image_s": statistics.median(times), "step_ms": 1000 * statistics.median(per_step)}


def size_of(art: Path) -> int:
    return int(json.loads((art / "edgekit.json").read_text()).get("size_bytes", 0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", type=Path, default=None, help="teacher pipeline (default: the shipped digits UNet)")
    ap.add_argument("--student", type=Path, default=None,
                    help="the 4-step student the targets are checked on (default: the shipped one)")
    ap.add_argument("--student-lcm", type=Path, default=None, help="an LCM-distilled student (more rows)")
    ap.add_argument("--student-consistency", type=Path, default=None, help="a consistency-distilled student")
    ap.add_argument("--distill-iters", type=int, default=0,
                    help="distil the missing lcm and consistency students here (0: skip them)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgekit-bench-diffusion"))
    ap.add_argument("-n", type=int, default=1000, help="images per seed and row")
    ap.add_argument("--seeds", type=int, default=3, help="independent sets of n images per row (FID: mean, sd)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="fewer rows, n=200 (a smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS / "diffusion",
                    help="writes OUT.txt, OUT.json and OUT.png (default: bench/results/diffusion)")
    args = ap.parse_args(argv)
    from edgekit.converters.diffusion.pipeline import open_pipeline
    from edgekit.runtime.hostinfo import use_torch_threads

    use_torch_threads(args.threads)
    n, seeds = (200, 1) if args.quick else (args.n, args.seeds)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    teacher = args.teacher or shipped()
    primary = args.student or shipped("digits-unet-4step")
    lead = method_of(primary)
    students: dict[str, Path | None] = {lead: primary}
    for method, path in (("lcm", args.student_lcm), ("consistency", args.student_consistency)):
        students.setdefault(method, path)
    for method, path in list(students.items()):
        if path is None and args.distill_iters:
            from edgekit.converters.diffusion.distill import DistillConfig, distill

            path = work / f"digits-4step-{method}"
            if not path.exists():
                t0 = time.perf_counter()
                distill(teacher, path, DistillConfig(steps=4, method=method, iters=args.distill_iters))
                print(f"  distilled {method} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            students[method] = path
    t32 = convert(teacher, work, "teacher-fp32", 32)
    rows: list[dict[str, Any]] = []

    def row(name: str, art: Path, steps: int | None, ci: int = 1, **extra: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        r = {"row": name, "artifact": art.name, "bytes": size_of(art), **quality(art, n, steps, ci, args.threads, seeds),
             **extra}
        print(f"  {name}: FID {r['fid']:.2f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        rows.append(r)
        return r

    row("teacher DDIM 50", t32, 50)
    for s in (8, 4, 2, 1) if not args.quick else (4, 2):
        row(f"teacher DDIM {s}", t32, s)
    for ci in (2, 3, 5):
        row(f"teacher DDIM 50 DeepCache {ci}", t32, 50, ci)
    for method, path in students.items():
        if path is None:
            continue
        s32 = convert(path, work, f"student-{method}-fp32", 32)
        # a consistency student samples with any step count of its grid; a trajectory student is made for its own
        for s in (4, 2, 1) if open_pipeline(path).sampler == "consistency" else (4,):
            row(f"{method} student {s}-step", s32, s)
        if method != lead:
            continue
        for bits, qm, lr in ((8, "rtn", 0), (8, "gptq", 0), (4, "rtn", 0), (4, "gptq", 0), (4, "gptq", 16)):
            label = f"w{bits}-{qm}" + (f"-lr{lr}" if lr else "")
            art = convert(path, work, f"student-{lead}-{label}", bits, qm, lr)
            row(f"{lead} student 4-step {label}", art, 4)
    if not args.quick:
        for bits, qm in ((8, "gptq"), (4, "gptq")):
            art = convert(teacher, work, f"teacher-w{bits}-{qm}", bits, qm)
            row(f"teacher DDIM 50 w{bits}-{qm}", art, 50)

    lat = {"teacher DDIM 50": latency(t32, 50, threads=args.threads)}
    for ci in (2, 3, 5):
        lat[f"teacher DDIM 50 DeepCache {ci}"] = latency(t32, 50, ci, threads=args.threads)
    lat[f"{lead} student 4-step"] = latency(work / f"student-{lead}-fp32", 4, threads=args.threads)
    lat[f"{lead} student 4-step w8-gptq"] = latency(work / f"student-{lead}-w8-gptq", 4, threads=args.threads)
    for method in students:
        if find(rows, f"{method} student 1-step"):
            lat[f"{method} student 1-step"] = latency(work / f"student-{method}-fp32", 1, threads=args.threads)
    for r in rows:
        if r["row"] in lat:
            r.update({k: round(v, 5) for k, v in lat[r["row"]].items()})
    report(rows, lat, n, seeds, teacher, students, lead, args.out)
    return 0


def find(rows: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["row"] == name), None)


def targets(rows: list[dict[str, Any]], lat: dict[str, dict[str, float]], lead: str
            ) -> list[tuple[str, str, bool | None]]:
    out: list[tuple[str, str, bool | None]] = []
    t50, t4, t2 = find(rows, "teacher DDIM 50"), find(rows, "teacher DDIM 4"), find(rows, "teacher DDIM 2")
    s4 = find(rows, f"{lead} student 4-step")
    ones = [r for r in rows if r["row"].endswith("student 1-step")]
    s1 = min(ones, key=lambda r: r["fid"]) if ones else None
    if t50 and s4:
        ratio = s4["fid"] / t50["fid"]
        out.append(("4-step student FID within 10% of the 50-step teacher's",
                    f"{s4['fid']:.2f} vs {t50['fid']:.2f} ({ratio:.2f}x)", ratio <= 1.10))
    if t4 and s4:
        out.append(("4-step student better than teacher DDIM 4", f"{s4['fid']:.2f} vs {t4['fid']:.2f}",
                    s4["fid"] < t4["fid"]))
    if t2 and s1:
        out.append((f"1-step student better than teacher DDIM 2 ({s1['row'].split()[0]})",
                    f"{s1['fid']:.2f} vs {t2['fid']:.2f}", s1["fid"] < t2["fid"]))
    elif t2:
        out.append(("1-step student better than teacher DDIM 2", "not measured: no student samples in 1 step "
                    "(give --student-lcm)", None))
    if "teacher DDIM 50" in lat and f"{lead} student 4-step" in lat:
        sp = lat["teacher DDIM 50"]["image_s"] / lat[f"{lead} student 4-step"]["image_s"]
        out.append(("4-step student >= 10x faster per image than the 50-step teacher (onnxruntime, batch 1)",
                    f"{sp:.1f}x", sp >= 10))
    w8, f32 = find(rows, f"{lead} student 4-step w8-gptq"), s4
    if w8 and f32:
        d = w8["fid"] / f32["fid"] - 1
        out.append(("W8 within 5% FID of fp32 (4-step student)", f"{w8['fid']:.2f} vs {f32['fid']:.2f} ({d:+.1%})",
                    d <= 0.05))
    tw8 = find(rows, "teacher DDIM 50 w8-gptq")
    if tw8 and t50:
        d = tw8["fid"] / t50["fid"] - 1
        out.append(("W8 within 5% FID of fp32 (teacher, 50 steps)", f"{tw8['fid']:.2f} vs {t50['fid']:.2f} ({d:+.1%})",
                    d <= 0.05))
    for name in (f"{lead} student 4-step w4-gptq", f"{lead} student 4-step w4-gptq-lr16"):
        r = find(rows, name)
        if r and f32:
            out.append((f"{name.split()[-1].upper()} reported", f"FID {r['fid']:.2f} vs fp32 {f32['fid']:.2f}", None))
    return out


def report(rows: list[dict[str, Any]], lat: dict[str, dict[str, float]], n: int, seeds: int, teacher: Path,
           students: dict[str, Path | None], lead: str, out: Path = RESULTS / "diffusion") -> None:
    from edgekit.imagemetrics import FeatureNet

    floor = json.loads(FeatureNet.load().meta.get("record", "{}")).get("fid_floor_heldout")
    lines = [f"# bench/diffusion.py: digits miniature, {seeds} seeds x {n} images per row (N/10 per class), each set "
             "scored on its own (FID: mean and sd over the seeds), onnxruntime on this CPU",
             f"# teacher {teacher}; students {', '.join(f'{k}={v}' for k, v in students.items() if v)}",
             *([f"# digits-FID floor (1000 real held-out digits against the reference): {floor}"] if floor else []), "",
             f"{'row':<36} {'steps':>5} {'FID':>8} {'sd':>5} {'prec':>6} {'recall':>6} {'labels':>6} {'KB':>7} "
             f"{'ms/img b250':>11} {'s/img b1':>9} {'ms/step':>8}"]
    for r in rows:
        lines.append(f"{r['row']:<36} {r['steps']:>5} {r['fid']:>8.2f} {r['fid_sd']:>5.2f} {r['precision']:>6.3f} {r['recall']:>6.3f} "
                     f"{r['label_agreement']:>6.3f} {r['bytes'] / 1024:>7.0f} {1000 * r['batch_s_per_image']:>11.2f} "
                     + (f"{r['image_s']:>9.4f} {r['step_ms']:>8.2f}" if "image_s" in r else f"{'':>9} {'':>8}"))
    lines += noise_notes(rows, lead, seeds, n)
    lines += ["", "targets:"]
    for what, fig, ok in targets(rows, lat, lead):
        lines.append(f"  {'HOLDS ' if ok else 'MISSED' if ok is False else '      '} {what}: {fig}")
    text = "\n".join(lines) + "\n"
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text(text)
    clean = [{k: v for k, v in r.items() if k != "images"} for r in rows]
    out.with_suffix(".json").write_text(json.dumps({"n": n, "seeds": seeds, "rows": clean, "latency": lat,
                                                        "targets": [list(t) for t in targets(rows, lat, lead)]},
                                                       indent=1))
    plot(rows, lead, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.txt')}, .json, .png")


def noise_notes(rows: list[dict[str, Any]], lead: str, seeds: int, n: int) -> list[str]:
    """How far apart the seeds put one row's FID, and every quantized row of the lead student that scores
    below its fp32 row: FID compares the samples' feature distribution with real digits, not the samples
    with fp32's, so a quantizer can lower it by moving the samples, not by being closer to the model."""
    sds = [r["fid_sd"] for r in rows if r.get("fid_sd")]
    out = [""]
    if sds and seeds > 1:
        out.append(f"noise: FID sd over the {seeds} seeds of {n} images is {min(sds):.2f}-{max(sds):.2f} per row; every "
                   "row uses the same seeds, so compare rows seed by seed (the 'fids' lists in the JSON)")
    f32 = find(rows, f"{lead} student 4-step")
    for r in rows:
        if not r["row"].startswith(f"{lead} student 4-step w") or not f32 or r["fid"] >= f32["fid"]:
            continue
        pairs = list(zip(r.get("fids", []), f32.get("fids", []), strict=False))
        below = sum(a < b for a, b in pairs)
        out.append(f"NOTE {r['row']}: FID {r['fid']:.2f} below fp32's {f32['fid']:.2f} (in {below} of {len(pairs)} "
                   "seeds): a lower FID than the unquantized model is not a quality gain; judge a quantizer by its "
                   "output error against fp32 (bench/diffusion_quant.py)")
    return out


def plot(rows: list[dict[str, Any]], lead: str, png: Path = RESULTS / "diffusion.png") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgekit.converters.diffusion.sampler import to_uint8

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    for r in rows:
        x = r.get("image_s", r["batch_s_per_image"])
        ax.scatter(x, r["fid"], s=25)
        ax.annotate(r["row"].replace("teacher ", "T ").replace("student ", "S "), (x, r["fid"]), fontsize=6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("seconds per image (batch 1 where timed, else batch 250)")
    ax.set_ylabel("digits-FID (lower is better)")
    ax.set_title("quality vs speed, onnxruntime on this CPU")
    picks = [r for r in rows if r["row"] in ("teacher DDIM 50", "teacher DDIM 4", f"{lead} student 4-step",
                                             "lcm student 4-step", "lcm student 1-step",
                                             f"{lead} student 4-step w8-gptq", f"{lead} student 4-step w4-gptq")]
    tiles = [np.concatenate(list(to_uint8(r["images"][:10])[..., 0]), axis=1) for r in picks]
    if tiles:
        ax2.imshow(np.concatenate(tiles, axis=0), cmap="gray")
        ax2.set_yticks([8 + 16 * i for i in range(len(picks))], [r["row"] for r in picks], fontsize=7)
        ax2.set_xticks([])
        ax2.set_title("samples, classes 0-9")
    fig.tight_layout()
    fig.savefig(png, dpi=130)


if __name__ == "__main__":
    raise SystemExit(main())
