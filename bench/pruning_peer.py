"""Unstructured pruning against llm-compressor: edgekit's Wanda and SparseGPT next to llm-compressor's
``WandaPruningModifier`` and ``SparseGPTModifier`` (and edgekit's magnitude pruning as the floor), at 50%
and 2:4, on SmolLM2-135M-Instruct with the same calibration tokens.

    python bench/pruning_peer.py [--samples 128] [--seqlen 512] [--chunks 8] [--kl-chunks 4]
                                 [--patterns 0.5,2:4] [--peer-python PATH]

llm-compressor pins its own transformers, so it runs in a bench-only venv
(``$EDGEKIT_HOME/bench-venvs/llmcompressor``, made on first use: CPU torch first, then ``llmcompressor``
from the package index) through ``bench/pruning_peer_driver.py``, which never imports edgekit.

Calibration: ``--samples`` windows of ``--seqlen`` tokens from the FIRST half of WikiText-2 valid, cut by
edgekit's :func:`edgekit.calibration.from_text` (seed 0) and handed to both tools as the same token ids.
Every row is written as an F16 GGUF by edgekit (so only the pruning differs) and measured by llama.cpp:
perplexity on ``--chunks`` x 512 tokens of the SECOND half, KL and top-1 against the unpruned F16 on
``--kl-chunks``, and the zero fraction of the blocks' linear weights read back from the file.

Targets (issue 15): edgekit's perplexity within 2% of llm-compressor's for each method and pattern, and
both far below magnitude pruning. Writes ``bench/results/pruning_peer.{json,txt}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
from common import cpu_model, get_model, log, pkg_version, publish  # noqa: E402
from gguf_quality import halves  # noqa: E402
from rich.table import Table  # noqa: E402

from edgekit import api  # noqa: E402
from edgekit.evaluate import EvalConfig, perplexity, read_text  # noqa: E402
from edgekit.fsutil import edgekit_home  # noqa: E402
from edgekit.runtime.llamacpp import LlamaCppBackend  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"
DRIVER = Path(__file__).resolve().parent / "pruning_peer_driver.py"
PEER_PACKAGES = ("torch==2.13.0", "llmcompressor==0.14.0.1")  # CPU torch first: a bare resolve pulls CUDA
CTX, THREADS = 512, 2
WITHIN = 0.02  # edgekit's perplexity at most this much above llm-compressor's
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def peer_python(path: Path | None) -> Path:
    """llm-compressor's venv interpreter, made on first use."""
    if path is not None:
        return path
    venv = edgekit_home() / "bench-venvs" / "llmcompressor"
    py = venv / "bin" / "python"
    if not py.exists():
        log(f"making llm-compressor's venv in {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        for pkg in PEER_PACKAGES:
            subprocess.run([str(py), "-m", "pip", "install", "-q", pkg], check=True)
    return py


def zero_fraction(path: Path) -> float:
    """Zeros among the decoder blocks' linear weights of a GGUF (F16/F32 tensors)."""
    zeros = total = 0
    for t in gguf.GGUFReader(path).tensors:
        if t.name.startswith("blk.") and t.name.split(".")[2] in LINEARS:
            data = np.asarray(t.data)
            zeros += int((data == 0).sum())
            total += data.size
    return zeros / total


def measure(path: Path, ref: Path, text: str, args: argparse.Namespace) -> dict[str, Any]:
    with LlamaCppBackend(path, n_ctx=CTX, n_threads=THREADS) as be:
        res = perplexity(be, text, EvalConfig(ctx=CTX, chunks=args.chunks))
        with LlamaCppBackend(ref, n_ctx=CTX, n_threads=THREADS) as rb:
            kl = perplexity(be, text, EvalConfig(ctx=CTX, chunks=args.kl_chunks), ref=rb)
    return {"ppl": res.ppl, "ppl_stderr": res.ppl_stderr, "kl": kl.kl_mean, "top1": kl.top1_agreement,
            "zeros": zero_fraction(path)}


def f16(hf: Path, out: Path, quantize: Any = None) -> Path:
    return api.convert(hf, "gguf", output=out, recipe=api.ConvertRecipe(bits=None, preset="F16"),
                       quantize=quantize, force=True).model_file


def build_table(report: dict[str, Any]) -> Table:
    cfg = report["config"]
    table = Table(title=f"unstructured pruning, edgekit vs llm-compressor {report['versions'].get('llmcompressor')}: "
                        f"SmolLM2-135M-Instruct, F16 files, calibration {cfg['samples']} x {cfg['seqlen']} tokens "
                        f"(first half), ppl on {cfg['chunks']} x 512 (second half), KL/top-1 vs F16 on "
                        f"{cfg['kl_chunks']}")
    for col in ("pattern", "row", "zeros", "ppl", "vs llm-compressor", "KL", "top-1", "prune s"):
        table.add_column(col, justify="left" if col in ("pattern", "row") else "right")
    f = report["f16"]
    table.add_row("-", "unpruned F16", f"{f['zeros']:.4f}", f"{f['ppl']:.3f}", "", "", "", "")
    for r in report["rows"]:
        if "error" in r:
            table.add_row(r["pattern"], r["row"], *[""] * 5, r["error"][:50])
            continue
        peer = next((p for p in report["rows"] if p["pattern"] == r["pattern"] and p["method"] == r["method"]
                     and p["tool"] == "llm-compressor" and "ppl" in p), None)
        vs = f"{r['ppl'] / peer['ppl']:.3f}x" if peer and r["tool"] == "edgekit" else ""
        table.add_row(r["pattern"], r["row"], f"{r['zeros']:.4f}", f"{r['ppl']:.3f}", vs, f"{r['kl']:.4f}",
                      f"{r['top1']:.3f}", f"{r['seconds']:.0f}")
    table.caption = ("prune s: edgekit's api.convert to F16 (calibration + pruning + writing); llm-compressor's "
                     "oneshot (its own timing, in its venv). Shared 2-core machine: times are noisy.")
    return table


def targets(report: dict[str, Any]) -> list[str]:
    lines = []
    rows = [r for r in report["rows"] if "ppl" in r]
    for pattern in report["config"]["patterns"]:
        mag = next((r for r in rows if r["pattern"] == pattern and r["method"] == "magnitude"), None)
        for method in report["config"].get("methods", ["wanda", "sparsegpt"]):
            ours = next((r for r in rows if r["pattern"] == pattern and r["method"] == method
                         and r["tool"] == "edgekit"), None)
            peer = next((r for r in rows if r["pattern"] == pattern and r["method"] == method
                         and r["tool"] == "llm-compressor"), None)
            if ours is None or peer is None:
                lines.append(f"{method} {pattern}: NOT MEASURED (a row failed)")
                continue
            ratio = ours["ppl"] / peer["ppl"]
            verdict = "HOLDS" if ratio <= 1 + WITHIN else "MISSED"
            far = f"; magnitude {mag['ppl']:.2f} ({mag['ppl'] / ours['ppl']:.1f}x edgekit's)" if mag else ""
            lines.append(f"{method} {pattern}: edgekit ppl {ours['ppl']:.3f} vs llm-compressor {peer['ppl']:.3f} "
                         f"= {ratio:.3f}x (within {100 * WITHIN:.0f}%: {verdict}){far}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--kl-chunks", type=int, default=4)
    ap.add_argument("--patterns", default="0.5,2:4")
    ap.add_argument("--methods", default="wanda,sparsegpt", help="the methods compared (magnitude is always run)")
    ap.add_argument("--peer-python", type=Path, default=None, help="an interpreter with llmcompressor installed")
    ap.add_argument("--out", type=Path, default=RESULTS / "pruning_peer")
    args = ap.parse_args(argv)
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    start = time.perf_counter()
    py = peer_python(args.peer_python)
    peer_versions = subprocess.run(
        [str(py), "-c", "from importlib.metadata import version as v; "
                        "print(v('llmcompressor'), v('transformers'), v('torch'))"],
        check=True, capture_output=True, text=True).stdout.split()
    calib_text, text = halves(read_text(args.text))
    hf = get_model()

    from transformers import AutoTokenizer

    from edgekit.calibration import CalibConfig, from_text
    from edgekit.converters.quantize.gptq import ImatrixConfig
    from edgekit.converters.quantize.steps.prune import from_spec

    report: dict[str, Any] = {
        "benchmark": "pruning_peer", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": {"text": str(args.text.resolve()), "samples": args.samples, "seqlen": args.seqlen,
                   "chunks": args.chunks, "kl_chunks": args.kl_chunks, "patterns": patterns, "ctx": CTX,
                   "methods": [m.strip() for m in args.methods.split(",") if m.strip()],
                   "threads": THREADS},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_start": os.getloadavg()},
        "versions": {"edgekit": pkg_version("edgekit"), "llama_cpp_python": pkg_version("llama_cpp_python"),
                     "transformers": pkg_version("transformers"), "llmcompressor": peer_versions[0],
                     "peer_transformers": peer_versions[1], "peer_torch": peer_versions[2]},
        "rows": []}
    with tempfile.TemporaryDirectory(prefix="edgekit-pruning-peer-") as tmpdir:
        tmp = Path(tmpdir)
        calib_file = tmp / "first-half.txt"
        calib_file.write_text(calib_text, encoding="utf-8")
        calib = CalibConfig(source=str(calib_file), samples=args.samples, seqlen=args.seqlen)
        ids = from_text(AutoTokenizer.from_pretrained(hf), calib).numpy()
        np.save(tmp / "ids.npy", ids, allow_pickle=False)
        ref = f16(hf, tmp / "f16")
        log(f"F16 reference: {ref.stat().st_size / 1e6:.1f} MB")
        with LlamaCppBackend(ref, n_ctx=CTX, n_threads=THREADS) as be:
            report["f16"] = {"ppl": perplexity(be, text, EvalConfig(ctx=CTX, chunks=args.chunks)).ppl,
                             "zeros": zero_fraction(ref)}
        for pattern in patterns:
            structure = pattern if ":" in pattern else "0:0"
            sparsity = "0.5" if ":" in pattern else pattern
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            for tool, method in [("edgekit", "magnitude"), *[(t, m) for m in methods
                                                             for t in ("edgekit", "llm-compressor")]]:
                row: dict[str, Any] = {"pattern": pattern, "tool": tool, "method": method, "row": f"{tool} {method}"}
                slug = f"{tool}-{method}-{pattern.replace(':', 'of')}"
                log(f"{pattern} {tool} {method}: pruning")
                try:
                    t0 = time.perf_counter()
                    if tool == "edgekit":
                        path = f16(hf, tmp / slug, ImatrixConfig(calib=calib,
                                                                  extra_steps=(from_spec(f"{method}:{pattern}"),)))
                        row["seconds"] = time.perf_counter() - t0
                    else:
                        out = tmp / f"{slug}-hf"
                        subprocess.run([str(py), str(DRIVER), str(hf), str(tmp / "ids.npy"), method, structure,
                                        sparsity, str(out)], check=True, capture_output=True, text=True)
                        peer = json.loads((out / "peer.json").read_text())
                        row.update(seconds=peer["seconds"], peer=peer)
                        path = f16(out, tmp / slug)
                    row.update(measure(path, ref, text, args))
                    log(f"{pattern} {tool} {method}: ppl {row['ppl']:.3f} KL {row['kl']:.4f} zeros {row['zeros']:.4f}")
                except subprocess.CalledProcessError as exc:
                    row["error"] = f"driver failed: {(exc.stderr or '').strip().splitlines()[-1:]}"
                    log(f"{pattern} {tool} {method}: FAILED {row['error']}")
                except Exception as exc:  # noqa: BLE001 - one failed row must not lose the others
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    log(f"{pattern} {tool} {method}: FAILED {row['error']}")
                report["rows"].append(row)
    report["targets"] = targets(report)
    report["total_s"] = time.perf_counter() - start
    report["machine"]["loadavg_end"] = os.getloadavg()
    publish(report, build_table(report), report["targets"], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
