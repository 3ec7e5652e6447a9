"""edgekit's Core ML export against coremltools' own weight compression, same model, same evaluator, same run.

    python bench/coreml_vs_coremltools.py [--chunks 8] [--ctx 256] [--calib-samples 32] [--calib-seqlen 512]

Model: SmolLM2-135M-Instruct (imported once into edgekit's cache). Every program is run by edgekit's numpy
reference evaluator of saved Core ML programs (:mod:`edgekit.runtime.coreml_mil`): Core ML itself only
predicts on macOS, and one evaluator for every row means the rows differ only in their weights.

* (a) ``edgekit fp16``: ``convert --to coreml --bits 16``; its logits against PyTorch (fp32) over a prompt
  and ten greedy decode steps through the state (max abs difference);
* (b) perplexity on the SECOND half of WikiText-2 valid (``--chunks`` x ``--ctx`` tokens; the numpy evaluator
  is slow) of:
  - ``coremltools linear_quantize_weights``: ``OpLinearQuantizerConfig(mode="linear", dtype="int4",
    granularity="per_block", block_size=32)`` applied to edgekit's fp16 program (rotary tables left alone);
    ``edgekit gptq int4 b32``: ``--bits 4 --method gptq --block-size 32`` (the same grid: uint4 data,
    fp16 scale and uint4 offset per block of 32), calibrated on the FIRST half of the text;
  - ``coremltools palettize_weights``: ``OpPalettizerConfig(mode="kmeans", nbits=4,
    granularity="per_grouped_channel", group_size=16)`` on the fp16 program; ``edgekit squeezellm lut4
    g16``: ``--palettize 4 --method squeezellm`` (the same palette shape);
  - controls: ``edgekit rtn int4 b32`` and ``edgekit rtn lut4 g16`` (plain k-means, no calibration), and
    ``edgekit squeezellm lut4 g1``: a table per row (32 bytes a row more: not at equal size);
* (c) conversion time of the 135M model: every row end to end, and the calibrated rows also less their
  calibration: reading the calibration text and the model's passes over it (the layer walk's forwards of
  each layer on the calibration batches and the statistics their hooks gather: ``forward_s`` in the
  quantizer's report). What remains is the quantization itself (GPTQ's sweeps, k-means fits) and the program.
* dense-and-sparse rows: SqueezeLLM palettes with 0.45% of the weights kept as fp16 outliers (a one-bit mask
  per weight, so larger than the plain palettes).

Targets: edgekit's perplexity increase over the fp16 program at most half of coremltools' for both kinds;
(a) within fp16 tolerance; (c) under 2 minutes. Writes ``bench/results/coreml_vs_coremltools.json`` and
``.txt``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
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
CONVERT_TARGET_S = 120.0


def work_dir() -> Path:
    d = edgekit_home() / "bench" / "coreml"
    d.mkdir(parents=True, exist_ok=True)
    return d


def convert_edgekit(hf: Path, out: Path, recipe: api.ConvertRecipe, calib: CalibConfig | None) -> dict[str, Any]:
    if (out / "edgekit.json").exists():
        art = api.Artifact.open(out)
    else:
        t0 = time.perf_counter()
        quantize = api.method_config(recipe.method, calib) if calib is not None else None
        art = api.convert(hf, "coreml", output=out, recipe=recipe, quantize=quantize, force=True)
        art.manifest["bench_convert_s"] = time.perf_counter() - t0
        art.save_manifest()
    m = art.manifest
    rep = m.get("quantizer_report", {})
    total = m["bench_convert_s"]
    # calibration: reading the calibration text and the model's passes over it that gather the statistics
    calib_total = (rep.get("calib_s") or 0.0) + (rep.get("forward_s") or 0.0)
    return {"path": art.model_file, "size_bytes": m["size_bytes"], "convert_s": total,
            "calib_s": rep.get("calib_s"), "forward_s": rep.get("forward_s"), "layers_s": rep.get("layers_s"),
            "calibration_s": calib_total, "convert_wo_calib_s": total - calib_total, "peer": False}


def coremltools_row(fp16: Path, out: Path, kind: str) -> dict[str, Any]:
    from edgekit.converters.formats.coreml.package import coremltools, package_bytes

    ct = coremltools()
    target = out / "model.mlpackage"
    if not target.exists():
        import contextlib
        import io
        import shutil

        opt = ct.optimize.coreml
        model = ct.models.MLModel(str(fp16), skip_model_load=True)
        keep = {"rope_cos": None, "rope_sin": None}  # rotary tables are not weights: edgekit keeps them fp16 too
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            if kind == "linear":
                cfg = opt.OptimizationConfig(global_config=opt.OpLinearQuantizerConfig(
                    mode="linear", dtype="int4", granularity="per_block", block_size=32), op_name_configs=keep)
                q = opt.linear_quantize_weights(model, cfg)
            else:
                cfg = opt.OptimizationConfig(global_config=opt.OpPalettizerConfig(
                    mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=16), op_name_configs=keep)
                q = opt.palettize_weights(model, cfg)
        secs = time.perf_counter() - t0
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        q.save(str(tmp / "model.mlpackage"))
        for f in fp16.parent.iterdir():  # tokenizer, config
            if f.is_file() and f.name != "edgekit.json":
                shutil.copy2(f, tmp / f.name)
        (tmp / "convert_s").write_text(str(secs))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return {"path": target, "size_bytes": package_bytes(target), "convert_s": float((out / "convert_s").read_text()),
            "peer": True}


def parity(fp16: Path, hf: Path) -> dict[str, Any]:
    """The fp16 program's logits against PyTorch over a prompt and ten greedy decode steps."""
    import torch
    import transformers

    from edgekit.runtime.coreml import causal_mask
    from edgekit.runtime.coreml_mil import MILEvaluator

    tok = transformers.AutoTokenizer.from_pretrained(str(hf))
    ids = tok("The capital of France is Paris. It is known for", add_special_tokens=True)["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(11):  # the prompt's last logits pick the first; ten decode steps follow
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        ref = model(torch.tensor([seq])).logits[0].numpy()
    ev = MILEvaluator(fp16)
    state = ev.new_state()
    out = [ev.run({"input_ids": np.array([ids], np.int32), "causal_mask": causal_mask(0, len(ids))}, state)["logits"][0]]
    for i, t in enumerate(seq[len(ids):-1]):
        out.append(ev.run({"input_ids": np.array([[t]], np.int32), "causal_mask": causal_mask(len(ids) + i, 1)},
                          state)["logits"][0])
    got = np.concatenate(out)
    want = ref[: got.shape[0]]
    n = len(ids)
    return {"prompt_tokens": n, "decode_steps": len(seq) - n - 1,
            "max_abs": float(np.abs(got - want).max()), "max_abs_prefill": float(np.abs(got[:n] - want[:n]).max()),
            "max_abs_decode": float(np.abs(got[n:] - want[n:]).max()), "ref_max_abs_logit": float(np.abs(want).max()),
            "argmax_agreement": float((got.argmax(-1) == want.argmax(-1)).mean())}


def evaluate(path: Path, text: str, cfg: EvalConfig) -> dict[str, Any]:
    from edgekit.runtime.coreml import CoreMLBackend

    t0 = time.perf_counter()
    with CoreMLBackend(path, n_ctx=cfg.ctx, engine="numpy") as be:
        res = perplexity(be, text, cfg)
    return {"ppl": res.ppl, "ppl_stderr": res.ppl_stderr, "tokens_scored": res.tokens_scored,
            "eval_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--out", type=Path, default=RESULTS / "coreml_vs_coremltools")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    hf = get_model()
    calib_text, text = halves(read_text(args.text))
    wd = work_dir()
    calib_file = wd / "calib.txt"  # the first half, for --calib (a path); never evaluated on
    if not calib_file.exists() or calib_file.read_text() != calib_text:
        calib_file.write_text(calib_text)
    calib = CalibConfig(source=str(calib_file), samples=args.calib_samples, seqlen=args.calib_seqlen)
    R = api.ConvertRecipe
    models: dict[str, dict[str, Any]] = {}
    log("edgekit fp16")
    models["edgekit fp16"] = convert_edgekit(hf, wd / "edgekit-fp16", R(bits=16), None)
    fp16 = models["edgekit fp16"]["path"]
    for label, recipe, cal in [
        ("edgekit rtn int4 b32", R(bits=4, extra={"block_size": 32}), None),
        ("edgekit gptq int4 b32", R(bits=4, method="gptq", extra={"block_size": 32}), calib),
        ("edgekit rtn lut4 g16 (k-means)", R(bits=16, extra={"palettize": 4, "lut_group": 16}), None),
        ("edgekit squeezellm lut4 g16", R(bits=16, method="squeezellm", extra={"palettize": 4, "lut_group": 16}), calib),
        ("edgekit squeezellm lut4 g1 (larger)", R(bits=16, method="squeezellm", extra={"palettize": 4, "lut_group": 1}),
         calib),
        ("edgekit squeezellm lut4 g16 + 0.45% outliers (larger)",
         R(bits=16, method="squeezellm", extra={"palettize": 4, "lut_group": 16, "outliers": 0.45}), calib),
        ("edgekit squeezellm lut3 g16 + 0.45% outliers", R(bits=16, method="squeezellm",
                                                           extra={"palettize": 3, "lut_group": 16, "outliers": 0.45}),
         calib),
    ]:
        log(label)
        slug = label.split(" (")[0].replace(" ", "-")
        models[label] = convert_edgekit(hf, wd / slug, recipe, cal)
    log("coremltools linear_quantize_weights int4 b32")
    models["coremltools linear_quantize int4 b32"] = coremltools_row(fp16, wd / "ct-linear-int4-b32", "linear")
    log("coremltools palettize_weights kmeans 4-bit g16")
    models["coremltools palettize kmeans lut4 g16"] = coremltools_row(fp16, wd / "ct-kmeans-lut4-g16", "palettize")

    log("parity of the fp16 program with PyTorch")
    checks = parity(fp16, hf)
    cfg = EvalConfig(ctx=args.ctx, chunks=args.chunks)
    rows: dict[str, dict[str, Any]] = {}
    log("PyTorch fp32 reference perplexity")
    with api.open_backend(hf, n_ctx=args.ctx) as be:
        torch_ppl = perplexity(be, text, cfg).ppl
    for name, m in models.items():
        log(f"perplexity: {name}")
        rows[name] = {**{k: v for k, v in m.items() if k != "path"}, **evaluate(m["path"], text, cfg)}
    base = rows["edgekit fp16"]["ppl"]
    for r in rows.values():
        r["ppl_delta"] = r["ppl"] / base - 1

    targets = []
    for ours, peer in (("edgekit gptq int4 b32", "coremltools linear_quantize int4 b32"),
                       ("edgekit squeezellm lut4 g16", "coremltools palettize kmeans lut4 g16")):
        o, p = rows[ours]["ppl_delta"], rows[peer]["ppl_delta"]
        ok = o <= p / 2
        targets.append(f"{ours}: ppl {100 * o:+.2f}% vs {peer} {100 * p:+.2f}% (target <= half = {50 * p:+.2f}%): "
                       f"{'HOLDS' if ok else 'MISSED'}")
    for name, r in rows.items():
        if r["peer"]:
            continue
        t = r.get("convert_wo_calib_s", r["convert_s"])
        whole = f" ({r['convert_s']:.0f} s end to end, {r['calibration_s']:.0f} s calibration)" \
            if r.get("calibration_s") else ""
        targets.append(f"{name}: conversion {t:.0f} s without calibration{whole} (target < {CONVERT_TARGET_S:.0f} s): "
                       f"{'HOLDS' if t < CONVERT_TARGET_S else 'MISSED'}")
    tol = 8 * float(np.spacing(np.float16(checks["ref_max_abs_logit"])))
    targets.append(f"fp16 program vs PyTorch: max abs {checks['max_abs']:.4f} over {checks['prompt_tokens']} prompt tokens "
                   f"and 10 decode steps (|logit| up to {checks['ref_max_abs_logit']:.1f}; 8 fp16 ulps there = {tol:.4f}): "
                   f"{'HOLDS' if checks['max_abs'] <= tol else 'MISSED'}")

    report = {"date": time.strftime("%Y-%m-%d %H:%M"),
              "host": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
              "versions": {p: pkg_version(p) for p in ("edgekit", "coremltools", "numpy", "torch", "scikit-learn")},
              "config": {"text": str(args.text), "eval_text_sha256": hashlib.sha256(text.encode()).hexdigest(),
                         "ctx": args.ctx, "chunks": args.chunks, "calib": calib.describe(),
                         "evaluator": "edgekit.runtime.coreml_mil (numpy)"},
              "torch_fp32_ppl": torch_ppl, "rows": rows, "parity": checks, "targets": targets,
              "wall_s": time.perf_counter() - start}
    table = Table(title=f"Core ML weights on SmolLM2-135M-Instruct, coremltools {pkg_version('coremltools')} "
                        f"(ppl: {args.chunks} x {args.ctx} tokens of the second half of {Path(args.text).name}, "
                        f"sha256:{hashlib.sha256(text.encode()).hexdigest()[:8]}, numpy evaluator)")
    for col in ("model", "MB", "ppl", "vs fp16", "convert s", "calibration s", "w/o calib s"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, r in rows.items():
        table.add_row(name, f"{r['size_bytes'] / 1e6:.1f}", f"{r['ppl']:.3f}", f"{100 * r['ppl_delta']:+.2f}%",
                      f"{r['convert_s']:.0f}", f"{r.get('calibration_s', 0.0):.0f}",
                      f"{r.get('convert_wo_calib_s', r['convert_s']):.0f}")
    console = Console(record=True, width=150)
    console.print(table)
    console.print(f"PyTorch fp32 perplexity on the same chunks: {torch_ppl:.3f}")
    console.print("parity: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in checks.items()))
    for t in targets:
        console.print(t)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    args.out.with_suffix(".txt").write_text(console.export_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
