"""AQLM on the CPU: edgekit's kernels against the aqlm package's own, on SmolLM2-135M-Instruct as AQLM 2x8.

    python bench/aqlm_kernels.py [--threads 1,2] [--tokens 64]

The 2x8 checkpoint is converted (the layer-wise encoding comes from edgekit's cache when
``bench/aqlm_quality.py`` made it with the same calibration). Both kernels run in the same transformers model
through :class:`edgekit.runtime.aqlm.AQLMBackend` (``kernel="edgekit"``: look-up tables and a numba
gather-and-sum parallel over output rows; ``kernel="aqlm"``: the package's numba kernel, parallel over input
groups, adding into shared outputs without atomics, Vahe1994/AQLM#86). Per thread count: decode tok/s
(``--tokens`` one-token steps after a 64-token prompt), prefill tok/s (512 tokens), and how far two runs of the
same 64-token input, and the two kernels, are apart (max |logit difference|, top-1 agreement). Writes
``bench/results/aqlm_kernels.{json,txt}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# OMP_WAIT_POLICY is PASSIVE unless set (gguf_quality, imported below, sets that default); the package's
# kernel collapses with spinning OpenMP threads (ACTIVE), so bench/README runs the script under both and
# the policy is recorded.
import numpy as np  # noqa: E402
from common import cpu_model, get_model, log, pkg_version, publish  # noqa: E402
from gguf_quality import halves  # noqa: E402
from rich.table import Table  # noqa: E402

from edgekit import api  # noqa: E402
from edgekit.converters.quantize.aqlm import AQLMConfig  # noqa: E402
from edgekit.evaluate import read_text  # noqa: E402
from edgekit.fsutil import edgekit_home  # noqa: E402
from edgekit.runtime.aqlm import AQLMBackend  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"


def measure(folder: Path, ids: list[int], kernel: str, threads: int, tokens: int) -> dict[str, Any]:
    import numba

    numba.set_num_threads(threads)
    with AQLMBackend(folder, n_ctx=1024, n_threads=threads, kernel=kernel) as b:
        b.logits(ids[:8])  # numba compiles on first use
        first, second = b.logits(ids[:64]), b.logits(ids[:64])
        b.reset()
        b.decode(ids[:64])
        b.decode([ids[64]])
        t0 = time.perf_counter()
        for t in ids[65:65 + tokens]:
            b.decode([t])
        decode = tokens / (time.perf_counter() - t0)
        b.reset()
        t0 = time.perf_counter()
        b.decode(ids[:512])
        prefill = 512 / (time.perf_counter() - t0)
    return {"kernel": kernel, "threads": threads, "decode_tok_s": decode, "prefill_tok_s": prefill,
            "run_to_run_max_abs": float(np.abs(first - second).max()), "logits": first}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--out", type=Path, default=RESULTS / "aqlm_kernels")
    args = ap.parse_args(argv)
    calib_text, text = halves(read_text(args.text))
    calib_file = edgekit_home() / "bench" / "wikitext2-valid-first-half.txt"  # as aqlm_quality.py writes it
    calib_file.parent.mkdir(parents=True, exist_ok=True)
    if not calib_file.exists() or calib_file.read_text(encoding="utf-8") != calib_text:
        calib_file.write_text(calib_text, encoding="utf-8")
    start = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "aqlm_kernels", "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_start": os.getloadavg()},
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "unset",
        "versions": {n: pkg_version(n) for n in ("edgekit", "aqlm", "numba", "torch", "transformers")}, "rows": []}
    with tempfile.TemporaryDirectory(prefix="edgekit-aqlmk-") as tmpdir:
        log("AQLM 2x8 (the encoding from the cache when there)")
        quant = AQLMConfig(calib=api.CalibConfig(source=str(calib_file), samples=args.calib_samples))
        art = api.convert(get_model(), "aqlm", output=Path(tmpdir) / "aqlm", recipe=api.ConvertRecipe(bits=2),
                          quantize=quant)
        with AQLMBackend(art.path) as b:
            ids = b.tokenize(text)[:1024]
        logits: dict[tuple[str, int], np.ndarray] = {}
        for threads in [int(t) for t in args.threads.split(",")]:
            for kernel in ("edgekit", "aqlm"):
                row = measure(art.path, ids, kernel, threads, args.tokens)
                logits[(kernel, threads)] = row.pop("logits")
                log(f"{kernel} x{threads}: decode {row['decode_tok_s']:.1f} tok/s, prefill {row['prefill_tok_s']:.0f}")
                report["rows"].append(row)
            e, a = logits[("edgekit", threads)], logits[("aqlm", threads)]
            report.setdefault("agreement", {})[str(threads)] = {"max_abs": float(np.abs(e - a).max()),
                                                               "top1": float((e.argmax(-1) == a.argmax(-1)).mean())}
    report["total_s"] = time.perf_counter() - start
    table = Table(title="AQLM 2x8 SmolLM2-135M on the CPU: edgekit's kernels vs the aqlm package's (numba), "
                        f"same transformers model, OMP_WAIT_POLICY {report['omp_wait_policy']}")
    for col in ("kernel", "threads", "decode tok/s", "prefill tok/s", "run-to-run max |dlogit|"):
        table.add_column(col, justify="left" if col == "kernel" else "right")
    for r in report["rows"]:
        table.add_row(r["kernel"], str(r["threads"]), f"{r['decode_tok_s']:.1f}", f"{r['prefill_tok_s']:.0f}",
                      f"{r['run_to_run_max_abs']:.3g}")
    lines = []
    for threads, agree in report["agreement"].items():
        ek = next(r for r in report["rows"] if r["kernel"] == "edgekit" and r["threads"] == int(threads))
        aq = next(r for r in report["rows"] if r["kernel"] == "aqlm" and r["threads"] == int(threads))
        lines.append(f"{threads} thread(s): edgekit / aqlm decode {ek['decode_tok_s'] / aq['decode_tok_s']:.2f}x, "
                     f"prefill {ek['prefill_tok_s'] / aq['prefill_tok_s']:.2f}x; kernels apart by max |dlogit| "
                     f"{agree['max_abs']:.3g}, top-1 agreement {agree['top1']:.3f}")
    report["machine"]["loadavg_end"] = os.getloadavg()
    publish(report, table, lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
