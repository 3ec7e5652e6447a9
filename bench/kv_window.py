"""Long text in a bounded KV cache: attention-sink windows against full context, on SmolLM2-135M-Instruct.

    python bench/kv_window.py [--tokens 16384] [--window 1024] [--sinks 4] [--chunk 32] [--type Q8_0]
                              [--onnx] [--text valid.txt]

The text: the first ``--tokens`` tokens of WikiText-2 valid. Rows (perplexity over the same tokens):

* full context, in 4k pieces: each 4096-token piece evaluated from an empty context (``logits``), the
  reference the issue names;
* edgekit window + sinks: the whole text streamed ``--chunk`` tokens at a time through a KV cache of
  ``--window`` tokens keeping the first ``--sinks`` (llama.cpp: ``llama_memory_seq_rm`` + ``seq_add`` shift;
  positions stay contiguous), i.e. how a long chat sees its history;
* the same window without sinks (sinks 0): a plain sliding window;
* llama.cpp's context shift as its tools do it (keep nothing, drop half the window when full);
* with ``--onnx``, the window + sinks through the onnxruntime backend (edgekit's fp32 graph).

Memory: the worker's peak RSS and the cache cells while streaming a quarter, half and all of the text
(flat for a window). Writes ``bench/results/kv_window.json``, ``.txt`` and ``.png`` (NLL along the text).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

# OpenMP threads spin between ops, as with OpenMP's defaults in a user's shell (gguf_rtn sets a passive wait
# for shared CI cores, which adds a wake-up to every op of a one-token step)
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")

import numpy as np  # noqa: E402
from gguf_rtn import cpu_model, get_model, log, pkg_version  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from edgekit import api  # noqa: E402
from edgekit.artifact import Artifact  # noqa: E402
from edgekit.converters.formats.base import ConvertRecipe  # noqa: E402
from edgekit.evaluate import read_text  # noqa: E402
from edgekit.fsutil import edgekit_home  # noqa: E402
from edgekit.runtime.llamacpp import LlamaCppBackend  # noqa: E402
from edgekit.runtime.sampling import next_token_nll  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"
PIECE = 4096
TOLERANCE = 0.10


def artifact(hf: Path, fmt: str, kind: str) -> Path:
    out = edgekit_home() / "bench-kv" / f"{fmt}-{kind.lower()}"
    if not (out / "edgekit.json").exists():
        log(f"converting {fmt} {kind} -> {out}")
        recipe = ConvertRecipe(preset=kind) if fmt == "gguf" else ConvertRecipe(bits=int(kind))
        api.convert(hf, fmt, output=out, recipe=recipe, force=True)
    return out


def ppl(nll: np.ndarray) -> float:
    return float(np.exp(np.mean(nll)))


def full_context(model: Path, tokens: list[int], threads: int) -> np.ndarray:
    parts = []
    with LlamaCppBackend(Artifact.open(model).model_file, n_ctx=PIECE, n_threads=threads) as b:
        for i in range(0, len(tokens), PIECE):
            piece = tokens[i : i + PIECE]
            parts.append(next_token_nll(b.logits(piece), piece[1:]))
            if i + PIECE < len(tokens):  # the piece's last token predicts the next piece's first
                parts.append(np.array([np.nan]))
    out = np.concatenate(parts)[: len(tokens) - 1]
    return out


def streamed(model: Path, tokens: list[int], threads: int, window: int, sinks: int, chunk: int,
             backend: str = "llamacpp", evict_step: int | None = None) -> tuple[np.ndarray, dict[str, Any], float]:
    opts: dict[str, Any] = {"n_threads": threads, "kv_window": window, "kv_sinks": sinks}
    if evict_step is not None:  # llama.cpp's context shift: drop half the window at once
        opts["kv_evict_step"] = evict_step
    t0 = time.perf_counter()
    with api.open_backend(model, backend=backend, **opts) as b:
        nll, info = b.stream_nll(tokens, chunk=chunk)
    return nll, info, time.perf_counter() - t0


def plot(curves: dict[str, np.ndarray], path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, nll in curves.items():
        x = np.asarray(nll, dtype=np.float64)
        good = np.where(np.isnan(x), np.nanmean(x), x)
        k = 512
        smooth = np.convolve(good, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(smooth)) + k, np.exp(smooth), label=name, lw=1.2)
    ax.axvline(window, color="grey", ls=":", lw=1)
    ax.set_xlabel("token position in the text")
    ax.set_ylabel("perplexity (512-token moving window)")
    ax.set_yscale("log")
    ax.set_title(f"SmolLM2-135M-Instruct: KV window {window} against full context")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--type", default="Q8_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--onnx", action="store_true", help="also stream through the onnxruntime backend (fp32)")
    ap.add_argument("--out", type=Path, default=RESULTS / "kv_window")
    args = ap.parse_args(argv)

    hf = get_model()
    model = artifact(hf, "gguf", args.type)
    with LlamaCppBackend(Artifact.open(model).model_file, n_ctx=512, n_threads=args.threads) as b:
        tokens = b.tokenize(read_text(args.text))[: args.tokens]
    if len(tokens) < args.tokens:
        raise SystemExit(f"the text has only {len(tokens)} tokens")
    log(f"{len(tokens)} tokens; full context in {PIECE}-token pieces")
    t0 = time.perf_counter()
    ref = full_context(model, tokens, args.threads)
    rows: list[dict[str, Any]] = [{"row": f"full context, {PIECE // 1024}k pieces", "ppl": float(np.exp(np.nanmean(ref))),
                                   "seconds": time.perf_counter() - t0,
                                   "cells": min(PIECE, len(tokens))}]  # a piece holds at most the text's tokens
    curves = {rows[0]["row"]: ref}
    variants = [(f"window {args.window} + {args.sinks} sinks", args.sinks, None),
                (f"window {args.window}, no sinks", 0, None),
                (f"window {args.window}, llama.cpp context shift (drop half, keep 0)", 0, args.window // 2)]
    for name, sinks, step in variants:
        log(name)
        nll, info, secs = streamed(model, tokens, args.threads, args.window, sinks, args.chunk, evict_step=step)
        rows.append({"row": name, "ppl": ppl(nll), "seconds": secs, "cells": info["peak_cells"],
                     "evicted": info["kv"]["evicted"], "peak_rss": info.get("peak_rss")})
        curves[name] = nll
    if args.onnx:
        onnx_model = artifact(hf, "onnx", "32")
        name = f"onnxruntime window {args.window} + {args.sinks} sinks"
        log(name)
        nll, info, secs = streamed(onnx_model, tokens, args.threads, args.window, args.sinks, args.chunk,
                                   backend="onnxruntime")
        rows.append({"row": name, "ppl": ppl(nll), "seconds": secs, "cells": info["peak_cells"],
                     "evicted": info["kv"]["evicted"], "peak_rss": None})
        curves[name] = nll
    memory = []
    for frac in (4, 2, 1):
        n = len(tokens) // frac
        log(f"memory while streaming {n} tokens")
        _, info, _ = streamed(model, tokens[:n], args.threads, args.window, args.sinks, args.chunk)
        memory.append({"tokens": n, "peak_cells": info["peak_cells"], "peak_rss": info.get("peak_rss")})

    console = Console(record=True, width=140)
    table = Table(title=f"{len(tokens)} tokens of WikiText-2 valid, SmolLM2-135M-Instruct {args.type}, "
                        f"chunk {args.chunk}, {args.threads} threads")
    for col in ("row", "ppl", "vs full", "peak cells", "evicted", "seconds"):
        table.add_column(col, justify="left" if col == "row" else "right")
    base = rows[0]["ppl"]
    for r in rows:
        r["vs_full"] = r["ppl"] / base - 1
        table.add_row(r["row"], f"{r['ppl']:.3f}", f"{100 * r['vs_full']:+.2f}%", str(r["cells"]),
                      f"{r.get('evicted', 0):,}", f"{r['seconds']:.0f}")
    console.print(table)
    mem = Table(title="memory while the text grows (window + sinks)")
    for col in ("tokens streamed", "peak cells", "worker peak RSS MB"):
        mem.add_column(col, justify="right")
    for m in memory:
        mem.add_row(f"{m['tokens']:,}", str(m["peak_cells"]), f"{(m['peak_rss'] or 0) / 2**20:.1f}")
    console.print(mem)
    sink, nosink = rows[1], rows[2]
    verdicts = [
        f"window + sinks ppl {sink['ppl']:.3f} within {100 * TOLERANCE:.0f}% of full context {base:.3f} "
        f"({100 * sink['vs_full']:+.2f}%): {'HOLDS' if sink['vs_full'] <= TOLERANCE else 'MISSED'}",
        f"the same window without sinks is worse: {nosink['ppl']:.3f} vs {sink['ppl']:.3f} "
        f"({'HOLDS' if nosink['ppl'] > sink['ppl'] * 1.01 else 'MISSED'})",
    ]
    rss = [m["peak_rss"] for m in memory if m["peak_rss"]]
    if rss:
        growth = max(rss) / min(rss) - 1
        verdicts.append(f"memory flat as the text grows 4x: peak RSS {min(rss) / 2**20:.1f}-{max(rss) / 2**20:.1f} MB "
                        f"(+{100 * growth:.1f}%), cells <= {args.window}: "
                        f"{'HOLDS' if growth < 0.05 and all(m['peak_cells'] <= args.window for m in memory) else 'MISSED'}")
    for v in verdicts:
        console.print(v)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(curves, args.out.with_suffix(".png"), args.window)
    report = {"date": dt.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(), "machine": platform.machine(),
              "llama_cpp_python": pkg_version("llama_cpp_python"), "onnxruntime": pkg_version("onnxruntime"),
              "tokens": len(tokens), "window": args.window, "sinks": args.sinks, "chunk": args.chunk,
              "type": args.type, "rows": rows, "memory": memory, "verdicts": verdicts}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    args.out.with_suffix(".txt").write_text(console.export_text())
    print(f"wrote {args.out.with_suffix('.json')}, .txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
