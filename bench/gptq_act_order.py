"""GPTQ's activation order on ggml grids, end to end: SmolLM2-135M-Instruct converted with ``--method gptq``
onto each ``--types`` preset with the left-to-right sweep and with act-order (whole ggml blocks swept in
decreasing order of their inputs' second moments, :func:`edgekit.converters.quantize.gptq_kernel.gptq`),
perplexity of each GGUF on the first ``--chunks`` chunks of 512 tokens of WikiText-2 valid, beside the F16 file
and plain RTN of the same type. Calibration is the default (self-generated text, none of WikiText-2).

    python bench/gptq_act_order.py [--types Q4_0,IQ4_NL] [--chunks 16] [--work DIR]

``--work`` keeps the converted folders: a second run reuses them (only the evaluations run again). Writes
``bench/results/gptq_act_order.{json,txt}`` (``--out``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from common import cpu_model, get_model, log, pkg_version, publish
from rich.table import Table

from edgekit import api
from edgekit.converters.quantize.gptq import GPTQConfig
from edgekit.evaluate import EvalConfig

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"


def build(hf: Path, dst: Path, preset: str, quantize: Any = None, method: str | None = None) -> float:
    """Convert unless ``dst`` is there; the seconds it took (0 when reused)."""
    if dst.exists():
        return 0.0
    t0 = time.perf_counter()
    recipe = api.ConvertRecipe(bits=None, preset=preset, **({"method": method} if method else {}))
    api.convert(hf, "gguf", output=dst, recipe=recipe, quantize=quantize)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q4_0,IQ4_NL")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgekit-bench-act-order"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gptq_act_order")
    args = ap.parse_args()
    t_start, load0 = time.time(), os.getloadavg()
    hf = get_model()
    cfg = EvalConfig(ctx=512, chunks=args.chunks)
    rows: list[dict[str, Any]] = []

    def measure(name: str, folder: Path, secs: float, preset: str) -> dict[str, Any]:
        log(f"evaluating {name}")
        r = api.evaluate(folder, TEXT, cfg, record=False, n_threads=2)
        row = {"row": name, "type": preset, "ppl": round(r.ppl, 4), "stderr": round(r.ppl_stderr, 4),
               "convert_s": round(secs, 1)}
        rows.append(row)
        return row

    base = measure("F16", args.work / "F16", build(hf, args.work / "F16", "F16"), "F16")
    for preset in [t.strip() for t in args.types.split(",") if t.strip()]:
        d = args.work / f"{preset}-rtn"
        measure(f"{preset} RTN", d, build(hf, d, preset, method="rtn"), preset)
        for ao, tag in ((False, "plain"), (True, "ao")):
            d = args.work / f"{preset}-{tag}"
            log(f"converting {preset} GPTQ act_order={ao}")
            secs = build(hf, d, preset, quantize=GPTQConfig(act_order=ao))
            measure(f"{preset} GPTQ" + (" act-order" if ao else ""), d, secs, preset)

    table = Table(title=f"GPTQ act-order on SmolLM2-135M-Instruct: ppl on the first {args.chunks} chunks of 512 "
                        "tokens of WikiText-2 valid (calibration: self-generated)")
    for col in ("row", "ppl", "± stderr", "vs F16", "convert s"):
        table.add_column(col, justify="left" if col == "row" else "right")
    for r in rows:
        r["vs_f16"] = round(100 * (r["ppl"] / base["ppl"] - 1), 2)
        table.add_row(r["row"], f"{r['ppl']:.4f}", f"{r['stderr']:.3f}", "" if r is base else f"{r['vs_f16']:+.2f}%",
                      f"{r['convert_s']:.0f}" if r["convert_s"] else "reused")
    lines = []
    for preset in {r["type"] for r in rows if r["type"] != "F16"}:
        plain = next(r for r in rows if r["row"] == f"{preset} GPTQ")
        ao = next(r for r in rows if r["row"] == f"{preset} GPTQ act-order")
        lines.append(f"{preset}: act-order {ao['vs_f16']:+.2f}% against the left-to-right sweep's {plain['vs_f16']:+.2f}% "
                     f"over F16 ({'better' if ao['ppl'] < plain['ppl'] else 'not better'})")
    report = {"rows": rows, "chunks": args.chunks, "total_s": time.time() - t_start,
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_start": load0,
                          "loadavg_end": os.getloadavg()},
              "versions": {"llama-cpp-python": pkg_version("llama-cpp-python"), "edgekit": pkg_version("edgekit")}}
    publish(report, table, sorted(lines), args.out)


if __name__ == "__main__":
    main()
