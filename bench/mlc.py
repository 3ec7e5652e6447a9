"""MLC artifacts from edgekit's quantizers against MLC's own round-to-nearest, same model, same evaluator.

    python bench/mlc.py [--chunks 16] [--runs rtn,gptq[,awq+gptq]] [--calib-samples 32] [--calib-seqlen 512]

Model: SmolLM2-135M-Instruct (imported once into edgekit's cache). Every artifact is a real MLC artifact
(``edgekit convert --to mlc``: tensor cache + mlc-chat-config.json) and every row is evaluated by the MLC
reference backend (shards read with TVM's own tensor-cache reader when apache-tvm is installed, decoded as
MLC's kernels decode them, run in PyTorch float32), so rows differ only in their stored numbers:

* ``F16 (q0f16)``: MLC's unquantized fp16 mode, the baseline;
* ``MLC RTN q4f16_1``: ``--quant q4f16_1 --method rtn``, byte for byte MLC's own quantizer (max|w|/7 per
  group of 32, fp16 arithmetic; the tests check the bytes against that algorithm and TVM running it);
* ``GPTQ q4f16_1`` and ``AWQ+GPTQ q4f16_1``: ``--method gptq`` / ``awq+gptq`` onto the same grid (same
  file size), calibrated on the FIRST half of the text (``--calib-samples`` x ``--calib-seqlen`` tokens).

Perplexity: llama-perplexity's protocol (ctx 512, non-overlapping chunks, second half of each chunk
scored) on the first ``--chunks`` chunks of the SECOND half of WikiText-2 valid (cut at the first line
break after the middle); KL and top-1 against the F16 row on the first ``--kl-chunks``.

Also timed: the one-command conversion of the user's GGUF (``edgekit convert
~/.cache/edgekit/SmolLM2-135M-Instruct.Q4_1.gguf --to mlc``, a child process, Python start-up included).

Target: at equal size, GPTQ's (or AWQ+GPTQ's) perplexity increase over F16 at most half of MLC RTN's.
Writes ``bench/results/mlc.json`` and ``bench/results/mlc.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gguf_quality import halves
from gguf_rtn import cpu_model, get_model, log, pkg_version
from rich.console import Console
from rich.table import Table

from edgekit import api
from edgekit.calibration import CalibConfig
from edgekit.evaluate import EvalConfig, perplexity, read_text
from edgekit.fsutil import edgekit_home

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"
CTX = 512
ROWS = {"f16": ("F16 (q0f16)", "q0f16", "rtn"), "rtn": ("MLC RTN q4f16_1", "q4f16_1", "rtn"),
        "gptq": ("GPTQ q4f16_1", "q4f16_1", "gptq"), "awq+gptq": ("AWQ+GPTQ q4f16_1", "q4f16_1", "awq+gptq")}


def work_dir() -> Path:
    d = edgekit_home() / "bench" / "mlc"
    d.mkdir(parents=True, exist_ok=True)
    return d


def convert(hf: Path, out: Path, quant: str, method: str, calib: CalibConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    quantize = api.method_config(method, calib) if method != "rtn" else None
    art = api.convert(hf, "mlc", output=out, recipe=api.ConvertRecipe(method=method, extra={"quant": quant}),
                      quantize=quantize, force=True)
    m = art.manifest
    rep = m.get("quantizer_report", {})
    return {"path": str(art.path), "size_bytes": m["size_bytes"], "bpw": m["bpw"],
            "convert_s": round(time.perf_counter() - t0, 1), "calib_s": rep.get("calib_s")}


def evaluate(art: Path, text: str, chunks: int, kl_chunks: int, ref: Path | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    with api.open_backend(art, "mlc", n_ctx=CTX) as be:
        res = perplexity(be, text, EvalConfig(ctx=CTX, chunks=chunks))
        out: dict[str, Any] = {"ppl": res.ppl, "ppl_stderr": res.ppl_stderr, "chunks": res.chunks,
                               "tokens_scored": res.tokens_scored, "reader": be.reader}
        if ref is not None and kl_chunks:
            with api.open_backend(ref, "mlc", n_ctx=CTX) as rb:
                kl = perplexity(be, text, EvalConfig(ctx=CTX, chunks=kl_chunks), ref=rb)
            out.update(kl_mean=kl.kl_mean, top1=kl.top1_agreement, kl_chunks=kl.chunks)
    out["eval_s"] = round(time.perf_counter() - t0, 1)
    return out


def time_gguf_conversion(gguf: Path, out: Path) -> dict[str, Any]:
    """``edgekit convert GGUF --to mlc`` as a user runs it (a child process)."""
    exe = Path(sys.executable).with_name("edgekit")
    t0 = time.perf_counter()
    r = subprocess.run([str(exe), "convert", str(gguf), "--to", "mlc", "-o", str(out), "--force", "--json"],
                       capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        return {"ok": False, "error": (r.stderr or r.stdout).strip().splitlines()[-1:]}
    m = json.loads(r.stdout)
    return {"ok": True, "seconds": round(dt, 1), "size_bytes": m["size_bytes"], "bpw": m["bpw"],
            "source": m["source"], "files": sorted(p.name for p in out.iterdir())}


def target_line(report: dict[str, Any]) -> str:
    rows = report["rows"]
    base = rows["f16"]["ppl"]
    rtn = rows["rtn"]["ppl"] - base
    best = min((k for k in ("gptq", "awq+gptq") if k in rows), key=lambda k: rows[k]["ppl"])
    inc = rows[best]["ppl"] - base
    same = rows[best]["size_bytes"] == rows["rtn"]["size_bytes"]
    ok = inc <= rtn / 2 and same
    report["target"] = {"best": best, "increase": inc, "rtn_increase": rtn, "ratio": inc / rtn if rtn else None,
                        "equal_size": same, "holds": ok}
    return (f"target (at equal size, {ROWS[best][0]}'s perplexity increase <= 1/2 of MLC RTN's): "
            f"+{inc:.4f} vs +{rtn:.4f} ({inc / rtn:.2f}x) -> {'HOLDS' if ok else 'MISSED'}")


def build_table(report: dict[str, Any]) -> Table:
    cfg = report["config"]
    t = Table(title=f"SmolLM2-135M-Instruct as MLC artifacts, MLC reference backend (shards via "
                    f"{report['rows']['f16'].get('reader', '?')}), ctx {CTX}, ppl on {cfg['chunks']} chunks of the second "
                    f"half of WikiText-2 valid, KL/top-1 vs F16 on {cfg['kl_chunks']}")
    for col in ("row", "MB", "bpw", "ppl", "±", "Δppl vs F16", "KL", "top-1", "convert s"):
        t.add_column(col, justify="left" if col == "row" else "right")
    base = report["rows"]["f16"]["ppl"]
    for key, r in report["rows"].items():
        t.add_row(ROWS[key][0], f"{r['size_bytes'] / 1e6:.1f}", f"{r['bpw']:.3f}", f"{r['ppl']:.4f}",
                  f"{r['ppl_stderr']:.3f}", "-" if key == "f16" else f"+{r['ppl'] - base:.4f} "
                  f"({100 * (r['ppl'] / base - 1):+.1f}%)", f"{r.get('kl_mean', 0):.4f}" if "kl_mean" in r else "-",
                  f"{r['top1']:.3f}" if "top1" in r else "-", f"{r['convert_s']:.0f}")
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="text; its second half is evaluated")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--kl-chunks", type=int, default=4)
    ap.add_argument("--runs", default="rtn,gptq", help="rows besides F16: rtn, gptq, awq+gptq (AWQ+GPTQ: over 15 "
                    "minutes more on a busy 2-core machine)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--gguf", type=Path, default=edgekit_home() / "SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", type=Path, default=RESULTS / "mlc")
    args = ap.parse_args(argv)

    hf = get_model()
    calib_text, eval_text = halves(read_text(args.text))
    wd = work_dir()
    (wd / "calib.txt").write_text(calib_text)
    calib = CalibConfig(source=str(wd / "calib.txt"), samples=args.calib_samples, seqlen=args.calib_seqlen)
    report: dict[str, Any] = {
        "config": {"chunks": args.chunks, "kl_chunks": args.kl_chunks, "ctx": CTX, "text": str(args.text.resolve()),
                   "eval_text": "second half (cut at the first line break after the middle)",
                   "calib": calib.describe() | {"text": "first half"}},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_start": os.getloadavg(), "shared": "yes: ~5 engineers on 2 cores"},
        "versions": {p: pkg_version(p) for p in ("edgekit", "torch", "transformers", "apache-tvm", "numpy")},
        "rows": {},
    }
    t_all = time.perf_counter()
    keys = ["f16", *[k.strip() for k in args.runs.split(",") if k.strip()]]
    for key in keys:
        label, quant, method = ROWS[key]
        log(f"{label}: converting")
        row = convert(hf, wd / f"smol-{key.replace('+', '_')}", quant, method, calib)
        log(f"{label}: evaluating ({row['size_bytes'] / 1e6:.1f} MB)")
        ref = None if key == "f16" else Path(report["rows"]["f16"]["path"])
        row.update(evaluate(Path(row["path"]), eval_text, args.chunks, args.kl_chunks, ref))
        report["rows"][key] = row
        log(f"{label}: ppl {row['ppl']:.4f}")
    if args.gguf.exists():
        log(f"timing: edgekit convert {args.gguf.name} --to mlc")
        report["gguf_to_mlc"] = {"command": f"edgekit convert {args.gguf} --to mlc",
                                 **time_gguf_conversion(args.gguf, wd / "from-gguf")}
    report["total_s"] = round(time.perf_counter() - t_all, 1)
    report["machine"]["load_avg_end"] = os.getloadavg()

    console = Console(record=True, width=150)
    console.print(build_table(report))
    lines = [target_line(report)] if "rtn" in report["rows"] and len(report["rows"]) > 2 else []
    g = report.get("gguf_to_mlc")
    if g:
        lines.append(f"GGUF -> MLC in one command: {g['command']}: "
                     + (f"{g['seconds']:.1f} s, {g['size_bytes'] / 1e6:.1f} MB, files {', '.join(g['files'])}"
                        if g["ok"] else f"FAILED: {g['error']}"))
    lines.append(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores shared with other "
                 f"engineers (load {report['machine']['load_avg_start'][0]:.1f} at start); total {report['total_s']:.0f} s")
    for line in lines:
        console.print(line, markup=False, highlight=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".txt").write_text(console.export_text())
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out.with_suffix('.json')}, .txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
