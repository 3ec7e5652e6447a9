"""GPTQ onto llama.cpp's i-quant lattices at layer level: the Hessian-weighted output error
``trace(dW H dW^T)`` of edgekit's GPTQ against llama.cpp's importance-matrix quantisation of the same
type (edgekit's byte-identical encoder with ``diag(H)`` as the importance), tensor by tensor on
SmolLM2-135M-Instruct with real activations.

    python bench/gptq_lattice.py [--model padded|real] [--layers 0,15] [--tensors attn_q,attn_v,ffn_up,ffn_down]
                                 [--types IQ3_S,IQ3_XXS,IQ2_S,IQ2_XS,IQ2_XXS,IQ1_M,IQ1_S] [--samples 16]

H is each linear's ``sum x x^T`` over ``--samples`` sequences of 512 tokens of the first half of
WikiText-2 valid, in the float model (the sensitivity measure ``--bpw`` budgets use). ``padded``: the
function-identical copy of the model widened to hidden 768 (every row a multiple of 256,
:mod:`edgekit.converters.structure.pad`); ``real``: 576-wide rows, so only ``ffn_down`` holds
256-weight super-blocks. Both errors are for the same bytes (same type, same row count). The
end-to-end KL against llama.cpp is ``bench/low_bit.py --edgekit MODEL:PRESET:gptq``. Writes
``bench/results/gptq_lattice_layers.{json,txt}`` (``--out``); ``results/gptq_lattice.txt`` collects both.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf_quality import halves
from gguf_rtn import get_model, log
from rich.console import Console
from rich.table import Table

from edgekit.calibration import CalibConfig
from edgekit.converters.quantize import gptq_kernel
from edgekit.converters.quantize.pipeline import LayerPipeline
from edgekit.converters.structure.pad import pad_hidden
from edgekit.evaluate import read_text
from edgekit.model import HFCheckpoint

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"


def measure(ckpt: HFCheckpoint, names: list[str], types: list[T], calib: CalibConfig) -> list[dict[str, Any]]:
    hessians = LayerPipeline(calib).float_hessians(ckpt)
    hf_of = {ckpt.spec.gguf_name(h): h for h in ckpt.tensors}
    rows = []
    for name in names:
        H = hessians[name].astype(np.float64)
        W = np.asarray(ckpt.load(hf_of[name]), dtype=np.float32)
        if W.shape[1] % 256:
            log(f"{name}: rows of {W.shape[1]} hold no 256-weight super-blocks; skipped")
            continue
        im = np.diag(H).astype(np.float32)
        ih = gptq_kernel.inverse_hessian(H)
        for t in types:
            t0 = time.perf_counter()
            base = gptq_kernel.rtn(W, t, imatrix=im)
            t1 = time.perf_counter()
            res = gptq_kernel.gptq(W, ih, t, imatrix=im)
            t2 = time.perf_counter()
            e_rtn = gptq_kernel.hessian_error(W, base.weight, H)
            e_gptq = gptq_kernel.hessian_error(W, res.weight, H)
            assert res.data.shape == base.data.shape  # the same bytes
            rows.append({"tensor": name, "shape": list(W.shape), "type": t.name, "imatrix_err": e_rtn,
                         "gptq_err": e_gptq, "ratio": e_gptq / e_rtn, "rtn_s": t1 - t0, "gptq_s": t2 - t1})
            log(f"{name} {t.name}: gptq/imatrix {e_gptq / e_rtn:.3f} ({t2 - t1:.1f} s)")
    return rows


def build_table(report: dict[str, Any]) -> Table:
    cfg = report["config"]
    table = Table(title=f"GPTQ onto the i-quant lattices vs llama.cpp imatrix quantisation, layer level: SmolLM2-135M "
                        f"{cfg['model']}, H from {cfg['samples']} x 512 tokens of {Path(cfg['text']).name} (first half)")
    for col in ("tensor", "type", "imatrix err", "gptq err", "gptq / imatrix", "gptq s"):
        table.add_column(col, justify="left" if col in ("tensor", "type") else "right")
    for r in report["rows"]:
        table.add_row(r["tensor"], r["type"], f"{r['imatrix_err']:.4g}", f"{r['gptq_err']:.4g}",
                      f"{r['ratio']:.3f}", f"{r['gptq_s']:.1f}")
    for t, g in report["geomean"].items():
        table.add_row("geometric mean", t, "", "", f"{g:.3f}", "")
    table.caption = ("err: trace((W - Q) H (W - Q)^T), the summed squared output error of the linear on the "
                     "calibration inputs. imatrix: llama.cpp's own quantisation (edgekit's byte-identical encoder) "
                     "with diag(H) as the importance matrix; gptq: edgekit's GPTQ onto the same type (same bytes).")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("padded", "real"), default="padded")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--layers", default="0,15")
    ap.add_argument("--tensors", default="attn_q,attn_v,ffn_up,ffn_down")
    ap.add_argument("--types", default="IQ3_S,IQ3_XXS,IQ2_S,IQ2_XS,IQ2_XXS,IQ1_M,IQ1_S")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--out", type=Path, default=RESULTS / "gptq_lattice_layers")
    args = ap.parse_args(argv)
    types = [T[t.strip().upper()] for t in args.types.split(",") if t.strip()]
    names = [f"blk.{i}.{t}.weight" for i in args.layers.split(",") for t in args.tensors.split(",")]
    calib_text, _ = halves(read_text(args.text))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgekit-gptq-lattice-") as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "calib.txt").write_text(calib_text, encoding="utf-8")
        calib = CalibConfig(source=str(tmp / "calib.txt"), samples=args.samples, seqlen=512)
        hf = get_model()
        ckpt = HFCheckpoint.open(hf)
        if args.model == "padded":
            ckpt = HFCheckpoint.open(pad_hidden(ckpt, 768, tmp / "padded-hf"))
        rows = measure(ckpt, names, types, calib)
    geo = {t.name: float(np.exp(np.mean([np.log(r["ratio"]) for r in rows if r["type"] == t.name])))
           for t in types if any(r["type"] == t.name for r in rows)}
    report = {"benchmark": "gptq_lattice", "config": {"model": args.model, "text": str(args.text.resolve()),
                                                      "samples": args.samples, "layers": args.layers,
                                                      "tensors": args.tensors},
              "rows": rows, "geomean": geo, "total_s": time.perf_counter() - start}
    console = Console(record=True, width=160)
    console.print(build_table(report))
    console.print(f"total {report['total_s'] / 60:.1f} min", highlight=False, markup=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".txt").write_text(console.export_text())
    print(f"wrote {args.out.with_suffix('.json')}, .txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
