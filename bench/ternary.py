"""Ternary SmolLM2-135M-Instruct: post-hoc ternarization against edgekit's ternary distillation, in one run.

    python bench/ternary.py [--minutes 25] [--snapshots 5,12] [--lr 1e-3] [--batch 2] [--seqlen 128] [--calib-samples 32]
                            [--chunks 8] [--kl-chunks 4]
                            [--reps 3] [--skip-peers]

Every decoder linear of every row is ternary (-1/0/+1 times one fp16 scale per group) except where a row
says otherwise; the embedding (tied head) is Q8_0 in every ternary row, as llama.cpp's TQ presets choose for
a 576-wide tied head. Reference: edgekit's F16 GGUF of the float checkpoint (KL and top-1 are against it).

* ``Q4_0``: round-to-nearest, byte-identical with llama-quantize (the size/speed yardstick);
* ``llama.cpp TQ2_0``: ``llama_model_quantize`` to its TQ2_0 preset from edgekit's F32 GGUF: absmax ternary
  where rows are multiples of 256 (ffn_down only), its Q4_0 fallback everywhere else -- what llama.cpp's own
  tools give for this model;
* ``llama.cpp Q2_0``: ``llama_model_quantize`` to Q2_0 (block 64, levels -1/0/1/2 x amax): every linear
  rounded by llama.cpp's absmax rule, which uses only the ternary levels -- llama.cpp's own post-hoc ternary
  for 576-wide rows (``gguf`` 0.19 cannot write Q2_0, so edgekit does not emit it);
* ``ternary-quant g64``: the PyPI ``ternary-quant`` package's groupwise ternary fit (``alpha * T + mu`` per
  64 weights, 10 fitting iterations, weight-only), its values stored F16 (its offset ``mu`` fits no ternary
  ggml type), embedding Q8_0;
* ``edgekit post-hoc``: ``--method ternary`` (least-squares scale per 64, TQ2_0 where rows allow, exact
  Q4_0 elsewhere) and the same with BitNet's absmean scale;
* ``edgekit distilled N min``: ``--method ternary --distill`` (QAT, KD from the float model on self-generated
  text, ``--minutes`` of wall time); snapshots of the same run at ``--snapshots`` minutes give the curve (their
  learning rate had not yet decayed: a run budgeted to end there would do at least as well).

Per row: file MB, perplexity on the SECOND half of WikiText-2 valid (ctx 512, ``--chunks``), KL and top-1
against F16 on the first ``--kl-chunks`` chunks, decode tokens/s (llama.cpp in-process bench, 64 tokens, 2
threads, median of ``--reps``), the worker's peak resident memory, and the bytes each decoded token reads.

Writes ``bench/results/ternary.json``, ``.txt`` and ``.png`` (perplexity against distillation minutes).
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

from gguf_quality import evaluate, halves  # noqa: E402
from gguf_rtn import cpu_model, get_model, log, pkg_version  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from edgekit import api  # noqa: E402
from edgekit.calibration import CalibConfig  # noqa: E402
from edgekit.converters.quantize.ternary import TernaryConfig  # noqa: E402
from edgekit.converters.structure.heal import HealConfig  # noqa: E402
from edgekit.evaluate import read_text  # noqa: E402
from edgekit.fsutil import edgekit_home  # noqa: E402
from edgekit.runtime.llamacpp import LlamaCppBackend  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"
CTX, N_THREADS, N_GEN = 512, 2, 64
FTYPE = {"TQ2_0": 37, "Q2_0": 41}  # llama.h's llama_ftype values
TERNARY = api.ConvertRecipe(bits=None, preset="TQ2_0")  # token_embd (tied head, 576 wide) lands on Q8_0


def work_dir() -> Path:
    d = edgekit_home() / "bench-ternary"
    d.mkdir(parents=True, exist_ok=True)
    return d


def convert(hf: Path, name: str, recipe: api.ConvertRecipe, quantize: Any = None) -> tuple[Path, float, dict]:
    t0 = time.perf_counter()
    art = api.convert(hf, "gguf", output=work_dir() / name, recipe=recipe, quantize=quantize, force=True,
                      progress=lambda d, a, b: log(d) if "distillation: step" in d else None)
    return art.model_file, time.perf_counter() - t0, art.manifest


def llamacpp_quantize(f32: Path, name: str, ftype: int, requantize: bool = False) -> tuple[Path, float, dict]:
    import llama_cpp

    out = work_dir() / f"{name}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = requantize
    params.nthread = N_THREADS
    t0 = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize to ftype {ftype} failed")
    return out, time.perf_counter() - t0, {"types": type_counts(out)}


def type_counts(path: Path) -> dict[str, int]:
    import gguf

    counts: dict[str, int] = {}
    try:
        tensors = gguf.GGUFReader(path).tensors
    except ValueError:  # a type the gguf library does not know (Q2_0 in gguf 0.19)
        return {"(gguf cannot read)": 0}
    for t in tensors:
        if len(t.shape) > 1:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def folder_with(hf: Path, weights: dict[str, Any] | Path, name: str) -> Path:
    """A checkpoint folder: ``hf``'s config and tokenizer with other weights (a dict or a safetensors file)."""
    out = work_dir() / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in hf.iterdir():
        if not f.name.endswith(".safetensors") and f.is_file():
            shutil.copy2(f, out / f.name)
    if isinstance(weights, Path):
        shutil.copy2(weights, out / "model.safetensors")
    else:
        from safetensors.torch import save_file

        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def ternary_quant_folder(hf: Path) -> Path:
    """The float checkpoint with every decoder linear replaced by ternary-quant's groupwise ternary fit."""
    import torch
    from safetensors.torch import load_file
    from ternary_quant.quantizer_groupwise import GroupwiseAsymmetricTernaryQuantizer

    from edgekit.model import HFCheckpoint

    suffixes = HFCheckpoint.open(hf).spec.linear_suffixes
    sd = load_file(str(hf / "model.safetensors"))
    q = GroupwiseAsymmetricTernaryQuantizer(group_size=64, n_iter=10, use_activation_aware=False)
    for name in list(sd):
        if any(name.endswith("." + s) for s in suffixes):
            sd[name] = q.quantize(sd[name].float()).dequantize().to(torch.float32).contiguous()
    return folder_with(hf, sd, "ternary-quant-hf")


class RawLlama:
    """llama-cpp-python's ``Llama`` as the two calls ``perplexity`` makes: for files edgekit's backend refuses
    because the gguf library cannot read them (Q2_0), which llama.cpp itself runs."""

    def __init__(self, path: Path) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(str(path), n_ctx=CTX, n_threads=N_THREADS, logits_all=True, verbose=False)

    def tokenize(self, text: str, add_special: bool = True, special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=add_special, special=special)

    def logits(self, tokens: list[int]) -> Any:
        import numpy as np

        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)


def measure_raw(path: Path, text: str, ref: Path, args: argparse.Namespace) -> dict[str, Any]:
    from edgekit.evaluate import EvalConfig, perplexity

    raw = RawLlama(path)
    out: dict[str, Any] = {"mb": path.stat().st_size / 1e6, "peak_rss_mb": float("nan"), "bytes_per_token": None,
                           "via": "llama-cpp-python Llama (edgekit's backend reads files with gguf 0.19)"}
    res = perplexity(raw, text, EvalConfig(ctx=CTX, chunks=args.chunks))
    out.update(ppl=res.ppl, ppl_stderr=res.ppl_stderr)
    with LlamaCppBackend(ref, n_ctx=CTX, n_threads=N_THREADS) as rb:
        kl = perplexity(raw, text, EvalConfig(ctx=CTX, chunks=args.kl_chunks), ref=rb)
    out.update(kl=kl.kl_mean, top1=kl.top1_agreement)
    return out


def measure(name: str, path: Path, text: str, ref: Path | None, args: argparse.Namespace) -> dict[str, Any]:
    """gguf_quality's perplexity and KL, then decode speed and the worker's peak memory in a fresh load."""
    if "Q2_0" in name and ref is not None:
        return measure_raw(path, text, ref, args)
    out: dict[str, Any] = {"mb": path.stat().st_size / 1e6}
    out.update(evaluate(path, text, args.chunks, args.kl_chunks, ref))
    if "kl_mean" in out:
        out["kl"] = out.pop("kl_mean")
    with LlamaCppBackend(path, n_ctx=CTX, n_threads=N_THREADS) as be:
        if args.reps and (not args.speed_rows or name.startswith(tuple(args.speed_rows.split(",")))):
            tps = [N_GEN / r["seconds"] for r in be.bench(0, N_GEN, reps=args.reps)["reps"]]
            out.update(tps=statistics.median(tps), tps_all=tps)
        out["peak_rss_mb"] = be.memory()["peak_rss"] / 1e6
    try:
        out["bytes_per_token"] = LlamaCppBackend.decode_bytes_per_token(path, 0, CTX)
    except ValueError:  # edgekit's memory model reads the file with the gguf library
        out["bytes_per_token"] = None
    return out


def target_lines(report: dict[str, Any]) -> list[str]:
    rows = {r["name"]: r for r in report["rows"] if "error" not in r}
    lines = []
    # post-hoc peers: llama.cpp's TQ2_0 preset (absmax ternary where rows allow -- only ffn_down here -- and its
    # Q4_0 fallback elsewhere), llama.cpp's Q2_0 (absmax ternary everywhere) and ternary-quant
    peers = [r for n, r in rows.items() if n.startswith(("llama.cpp", "ternary-quant"))]
    ours = rows.get("edgekit post-hoc ternary (best)")
    if peers and ours:
        best = min(peers, key=lambda r: r["ppl"])
        lines.append(f"post-hoc: edgekit (least-squares scale) ppl {ours['ppl']:.1f} vs the best post-hoc peer "
                     f"({best['name']}) {best['ppl']:.1f}")
    dist = sorted((r for r in rows.values() if r.get("minutes") is not None), key=lambda r: r["minutes"])
    if peers and dist:
        best = min(peers, key=lambda r: r["ppl"])
        last = dist[-1]
        ok = last["ppl"] <= best["ppl"] / 5
        lines.append(f"goal (120 min): distilled ppl <= 1/5 of the better post-hoc peer ({best['name']}: "
                     f"{best['ppl']:.1f} -> {best['ppl'] / 5:.1f}); after {last['minutes']:g} min"
                     f"{'' if last['minutes'] >= 120 else ' (not 120)'}: "
                     f"{last['ppl']:.2f}, {best['ppl'] / last['ppl']:.1f}x lower: {'HOLDS' if ok else 'MISSED'}")
    q4 = rows.get("Q4_0")
    if q4 and dist:
        lines.append(f"absolute: the distilled model is not usable yet: ppl {dist[-1]['ppl']:.0f} against Q4_0's "
                     f"{q4['ppl']:.2f} (KL {dist[-1]['kl']:.2f} vs {q4['kl']:.2f}); the curve over "
                     + ", ".join(f"{r['minutes']:g} min {r['ppl']:.0f}" for r in dist))
    q2 = rows.get(f"edgekit distilled {dist[-1]['minutes']:g} min -> Q2_0 (llama-quantize)") if dist else None
    if q2:
        lines.append(f"576-wide rows: the same distilled model re-encoded by llama-quantize to Q2_0 is {q2['mb']:.1f} MB "
                     f"instead of {dist[-1]['mb']:.1f} MB (Q4_0 fallback), ppl {q2['ppl']:.1f} vs {dist[-1]['ppl']:.1f}, "
                     f"KL {q2['kl']:.4f} vs {dist[-1]['kl']:.4f} (lossless up to activation rounding)")
    for name, r in rows.items():
        if q4 and name.startswith("edgekit") and "tps" in r and "tps" in q4:
            lines.append(f"{name}: {r['mb']:.1f} MB vs Q4_0 {q4['mb']:.1f} MB; decode {r['tps']:.1f} vs "
                         f"{q4['tps']:.1f} tok/s ({r['tps'] / q4['tps']:.2f}x); peak RSS {r['peak_rss_mb']:.0f} vs "
                         f"{q4['peak_rss_mb']:.0f} MB")
            break
    return lines


_COLUMNS = {  # header -> cell of a measured row
    "MB": lambda r: f"{r['mb']:.1f}",
    "ppl": lambda r: f"{r['ppl']:.2f}",
    "KL": lambda r: f"{r['kl']:.4f}" if "kl" in r else "-",
    "top-1": lambda r: f"{r['top1']:.3f}" if "top1" in r else "-",
    "tok/s": lambda r: f"{r['tps']:.1f}" if "tps" in r else "-",
    "peak MB": lambda r: f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] == r["peak_rss_mb"] else "-",
    "MB/token": lambda r: f"{r['bytes_per_token'] / 1e6:.1f}" if r.get("bytes_per_token") else "-",
    "linears stored as": lambda r: ", ".join(f"{k} x{v}" for k, v in r.get("types", {}).items()),
}


def build_table(report: dict[str, Any]) -> Table:
    c = report["config"]
    t = Table(title=f"Ternary SmolLM2-135M-Instruct: ppl on {c['chunks']} chunks of the second half of WikiText-2 "
                    f"valid, KL/top-1 vs F16 on {c['kl_chunks']}, decode {N_GEN} tokens, {N_THREADS} threads")
    t.add_column("row")
    for col in _COLUMNS:
        t.add_column(col, justify="left" if col == "linears stored as" else "right")
    for r in report["rows"]:
        cells = [r["error"][:60]] if "error" in r else [f(r) for f in _COLUMNS.values()]
        t.add_row(r["name"], *cells)
    return t


def plot(report: dict[str, Any], path: Path) -> bool:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = [r for r in report["rows"] if "error" not in r]
    dist = sorted((r for r in rows if r.get("minutes") is not None), key=lambda r: r["minutes"])
    fig, ax = plt.subplots(figsize=(8, 5))
    if dist:
        ax.plot([r["minutes"] for r in dist], [r["ppl"] for r in dist], "o-", color="tab:green",
                label="edgekit ternary distillation")
    others = [r for r in rows if r.get("minutes") is None and r["name"] != "F16"]
    colours = ["tab:blue", "tab:red", "tab:orange", "tab:purple", "tab:gray", "tab:brown", "k"]
    for r, colour in zip(others, colours, strict=False):
        ax.axhline(r["ppl"], color=colour, ls="--", lw=1, label=f"{r['name']} ({r['ppl']:.0f})")
    ax.set(xlabel="distillation minutes (2 shared cores)", ylabel="perplexity (log)", yscale="log",
           title="SmolLM2-135M-Instruct ternary: perplexity against distillation time")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return True


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--minutes", type=float, default=25.0, help="distillation budget (the issue asks 30 and 120)")
    ap.add_argument("--snapshots", default="5,12", help="minutes at which the distilled student is also measured")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=128, help="tokens per training window (of the 512-token samples)")
    ap.add_argument("--calib-samples", type=int, default=32, help="self-generated 512-token sequences to distil on")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--kl-chunks", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--speed-rows", default="", help="comma-separated row-name prefixes whose decode speed is "
                                                       "measured (default: all)")
    ap.add_argument("--skip-peers", action="store_true", help="only the distilled rows (and the references)")
    ap.add_argument("--only", default="", help="comma-separated row-name prefixes to run (with --append)")
    ap.add_argument("--append", action="store_true", help="keep the rows of the existing results, replacing "
                                                         "those run again")
    ap.add_argument("--render", action="store_true", help="only rewrite the .txt and .png from the .json")
    ap.add_argument("--out", type=Path, default=RESULTS / "ternary")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.render:
        write(json.loads(args.out.with_suffix(".json").read_text()), args)
        print(args.out.with_suffix(".txt").read_text())
        return 0
    t_start = time.perf_counter()
    text = halves(read_text(args.text))[1]  # a one-line error when it is missing
    hf = get_model()
    import llama_cpp  # noqa: F401 - fail early when the runtime is missing

    rows: list[dict[str, Any]] = []
    only = tuple(p.strip() for p in args.only.split(",") if p.strip())
    kept = json.loads(args.out.with_suffix(".json").read_text())["rows"] if args.append else []

    def row(name: str, make, **extra: Any) -> None:  # noqa: ANN001
        if only and not name.startswith(only):
            return
        log(f"{name}: converting")
        try:
            path, secs, info = make()
            log(f"{name}: measuring")
            against = None if path == ref else ref
            rows.append({"name": name, "convert_s": secs, **extra, **info, **measure(name, path, text, against, args)})
            r = rows[-1]
            log(f"{name}: {r['mb']:.1f} MB ppl {r['ppl']:.2f} KL {r.get('kl', 0):.4f} {r.get('tps', 0):.1f} tok/s")
        except Exception as exc:  # noqa: BLE001 - one failed row must not lose the others
            rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}", **extra})
            log(f"{name}: FAILED {exc}")
        write(report(), args)

    def report() -> dict[str, Any]:
        return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": {
            "cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "shared": "2 cores shared with other engineers' jobs: timings are noisy, compare ratios"},
            "versions": {p: pkg_version(p) for p in ("edgekit", "llama_cpp_python", "gguf", "torch", "transformers",
                                                        "ternary-quant")},
            "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}},
            "rows": [*(r for r in kept if r["name"] not in {n["name"] for n in rows}), *rows],
            "wall_s": time.perf_counter() - t_start}

    def types_of(manifest: dict) -> dict[str, Any]:
        t = manifest.get("ternary", {})
        return {"types": t.get("stored_as", {}), "share": t.get("share")}

    ref = work_dir() / "f16" / "model.gguf"
    if not ref.exists() or not args.append:
        ref, _, _ = convert(hf, "f16", api.ConvertRecipe(bits=None, preset="F16"))
    row("F16", lambda: (ref, 0.0, {}))
    row("Q4_0", lambda: (*convert(hf, "q4_0", api.ConvertRecipe(bits=None, preset="Q4_0"))[:2], {}))
    snaps = tuple(float(s) for s in args.snapshots.split(",") if s.strip() and float(s) < args.minutes)
    heal_cfg = HealConfig(minutes=args.minutes, lr=args.lr, batch=args.batch, snapshots=snaps, checkpoint_s=120,
                          seqlen=args.seqlen, eval_seqs=1)
    cfg = TernaryConfig(distill=heal_cfg, calib=CalibConfig(samples=args.calib_samples))
    holder: dict[str, Any] = {}

    def distilled() -> tuple[Path, float, dict]:
        path, secs, m = convert(hf, f"distilled-{args.minutes:g}m", TERNARY, cfg)
        holder["manifest"] = m
        d = m["ternary"]["distill"]
        return path, secs, {**types_of(m), "steps": d["steps"], "kl_before": d["kl_before"],
                            "kl_after": d["kl_after"], "curve": d.get("curve", [])}

    row(f"edgekit distilled {args.minutes:g} min", distilled, minutes=args.minutes)
    done = work_dir() / f"distilled-{args.minutes:g}m" / "edgekit.json"  # an earlier run's, for --append
    m = holder.get("manifest") or (json.loads(done.read_text()) if done.exists() else None)
    if m:
        state = Path(m["ternary"]["distill"]["state"])
        for s in snaps:
            def snap(s: float = s) -> tuple[Path, float, dict]:
                folder = folder_with(hf, state / f"snapshot_{s:g}m.safetensors", f"snapshot-{s:g}m-hf")
                path, secs, man = convert(folder, f"distilled-snapshot-{s:g}m", TERNARY, TernaryConfig(scale="absmean"))
                return path, secs, types_of(man)

            row(f"edgekit distilled, snapshot at {s:g} min", snap, minutes=s)

        def as_q2_0() -> tuple[Path, float, dict]:
            # the honest answer for 576-wide rows: Q2_0 (64-weight blocks, d = block amax) holds edgekit's ternary
            # groups exactly, so llama.cpp's own quantizer re-encodes the distilled file into it losslessly
            return llamacpp_quantize(done.parent / "model.gguf", "distilled-q2_0", FTYPE["Q2_0"], requantize=True)

        row(f"edgekit distilled {args.minutes:g} min -> Q2_0 (llama-quantize)", as_q2_0)
    if not args.skip_peers:
        f32 = work_dir() / "f32" / "model.gguf"
        if not f32.exists() or not args.append:
            f32, _, _ = convert(hf, "f32", api.ConvertRecipe(bits=None, preset="F32"))
        for t in ("TQ2_0", "Q2_0"):
            row(f"llama.cpp {t} (llama-quantize)", lambda t=t: llamacpp_quantize(f32, f"llamacpp-{t}", FTYPE[t]))
        try:
            import ternary_quant  # noqa: F401

            tq = api.ConvertRecipe(bits=None, preset="F16", tensor_types=(("token_embd", "Q8_0"),))
            row("ternary-quant g64 (F16 storage)", lambda: (*convert(ternary_quant_folder(hf), "ternary-quant", tq)[:2],
                                                            {"types": {"F16": 210}}))
        except ImportError:
            rows.append({"name": "ternary-quant g64", "error": "ternary-quant is not installed (pip install "
                                                               "ternary-quant --no-deps)"})
        for scale in ("best", "absmean"):
            def posthoc(scale: str = scale) -> tuple[Path, float, dict]:
                path, secs, m = convert(hf, f"posthoc-{scale}", TERNARY, TernaryConfig(scale=scale))
                return path, secs, types_of(m)

            row(f"edgekit post-hoc ternary ({scale})", posthoc)

    final = report()
    write(final, args)
    Console(width=170).print(build_table(final))
    for line in target_lines(final):
        print(line)
    return 0


def write(rep: dict[str, Any], args: argparse.Namespace) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rep, indent=1))
    console = Console(record=True, width=170, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(build_table(rep))
    for line in target_lines(rep):
        console.print(line, markup=False, highlight=False)
    args.out.with_suffix(".txt").write_text(console.export_text())
    plot(rep, args.out.with_suffix(".png"))


if __name__ == "__main__":
    sys.exit(main())
