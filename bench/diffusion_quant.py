"""Quantization of a diffusion UNet: W8/W4, RTN/GPTQ, the low-rank branch, and coremltools' own weight
quantization as the peer, on the same UNet in the same run.

    python bench/diffusion_quant.py [--pipe edgekit/data/digits-unet] [--calib-images 64] [--timesteps 8]
                                    [--heldout-images 32] [--coreml-samples 64] [--no-coreml]

The UNet: ``--pipe`` (a diffusers pipeline folder; default the shipped digits teacher, edgekit/data/digits-unet
when it exists, else the 30-iteration miniature trained here in seconds, which says so in the title).

* (a) every quantizer row of :func:`edgekit.converters.diffusion.quantize.quantize_with`, calibrated once
  (Q-Diffusion: the pipeline's own DDIM trajectory, ``--timesteps`` steps of it, all classes): seconds (the
  calibration reported apart), stored bytes (integers, fp16 scales, zero points, fp16 low-rank factors),
  the UNet's output error against float32 as MSE on the calibration inputs and on HELD-OUT inputs (other
  noise, another trajectory: what GPTQ did not see), relative MSE (MSE / mean square of the output), and
  each layer's relative output error over the calibration inputs, ``tr(dW H dW^T) / tr(W H W^T)``;
* (b) per layer, the W4 rows side by side (the worst layers of RTN first; every layer in the JSON);
* (c) the peer: coremltools' ``linear_quantize_weights`` (int8 per channel; int4 per block of 32 with an
  offset -- on a conv its default block is 32 input channels times the whole kernel, 288 weights a scale on
  3x3 convs, so it is also run with ``[1, 32, 1, 1]`` blocks, 32 weights a scale like edgekit's --;
  ``conv_in``/``conv_out`` at int8 per channel as edgekit's W4 keeps them, the time-embedding table
  and the class embedding left in fp16 as edgekit leaves them) applied to edgekit's fp16 program, against
  edgekit's quantized programs; every program run by edgekit's numpy MIL evaluator on held-out inputs
  (Core ML predicts only on macOS), output MSE against PyTorch float32, package bytes.

Writes ``bench/results/diffusion_quant.json`` and ``.txt``. The machine is shared: seconds are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

# coremltools draws a tqdm progress bar per compression and MIL pass, hundreds of lines in a log: off by default
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
TEACHER = ROOT / "edgekit" / "data" / "digits-unet"  # the shipped digits teacher

ROWS: list[tuple[str, dict[str, Any]]] = [
    ("W8-RTN", {"bits": 8}),
    ("W8-GPTQ", {"bits": 8, "method": "gptq"}),
    ("W4-RTN", {"bits": 4}),
    ("W4-GPTQ", {"bits": 4, "method": "gptq"}),
    ("W4-GPTQ+LR8", {"bits": 4, "method": "gptq", "lowrank": 8}),
    ("W4-GPTQ+LR16", {"bits": 4, "method": "gptq", "lowrank": 16}),
    ("W4-RTN+LR16", {"bits": 4, "lowrank": 16}),
    # ablations of the defaults
    ("W4-GPTQ zero-points", {"bits": 4, "method": "gptq", "symmetric": False}),
    ("W4-GPTQ edges@4", {"bits": 4, "method": "gptq", "edge_bits": 0}),
]
COREML_ROWS = ("W8-RTN", "W8-GPTQ", "W4-RTN", "W4-GPTQ", "W4-GPTQ+LR16")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def get_pipe(arg: Path | None, scratch: Path) -> tuple[Any, str]:
    from edgekit.converters.diffusion.miniature import TrainConfig, train_teacher
    from edgekit.converters.diffusion.pipeline import open_pipeline

    if arg is not None:
        return open_pipeline(arg), str(arg)
    if TEACHER.is_dir():
        return open_pipeline(TEACHER), f"{TEACHER} (trained digits teacher)"
    path = scratch / "mini30"
    train_teacher(path, TrainConfig(iters=30))
    return open_pipeline(path), "digits miniature, 30 training iterations (the teacher was not ready)"


def coreml_rows(pipe: Any, unet: Any, quantized: dict[str, Any], inputs: list, scratch: Path) -> list[dict[str, Any]]:
    """(c): edgekit's programs and coremltools' compression of edgekit's fp16 program, one evaluator."""
    import torch

    from edgekit.converters.diffusion.export import EXPORTERS
    from edgekit.converters.formats.coreml.package import coremltools, package_bytes
    from edgekit.runtime.coreml_mil import MILEvaluator

    ct = coremltools()
    opt = ct.optimize.coreml
    exporter = EXPORTERS.get("coreml")()

    def export(name: str, weights: Any) -> Path:
        out = scratch / name.replace("+", "_").replace(" ", "_")
        out.mkdir()
        exporter.export(pipe, unet, weights, out, {}, lambda *a: None)
        return out / "unet.mlpackage"

    def score(path: Path) -> tuple[float, float]:
        ev = MILEvaluator(path)
        se = ss = 0.0
        n = 0
        for x, t, labels in inputs:
            feeds = {"sample": x, "timestep": np.full(len(x), t, np.int32)}
            if labels is not None:
                feeds["class_labels"] = labels.astype(np.int32)
            got = ev.run(feeds, {})["out"]
            with torch.no_grad():
                ref = unet(torch.from_numpy(x), torch.full((len(x),), t, dtype=torch.long),
                           class_labels=None if labels is None else torch.from_numpy(labels)).sample.numpy()
            se += float(((got - ref) ** 2).sum())
            ss += float((ref**2).sum())
            n += ref.size
        return se / n, se / ss

    rows = []
    f16 = export("fp16", None)
    mse, rel = score(f16)
    rows.append({"row": "edgekit fp16", "bytes": package_bytes(f16), "mse": mse, "rel_mse": rel, "seconds": None})
    int8_pc = opt.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                          weight_threshold=1)
    int4_b32 = opt.OpLinearQuantizerConfig(mode="linear", dtype="int4", granularity="per_block", block_size=32,
                                           weight_threshold=1)
    # a conv's blocks: coremltools' block_size=32 spans 32 input channels times the whole kernel (288 weights a
    # scale on a 3x3 conv); [1, 32, 1, 1] is 32 channels at one kernel position, edgekit's 32 weights a scale
    int4_b32_pos = opt.OpLinearQuantizerConfig(mode="linear", dtype="int4", granularity="per_block",
                                               block_size=[1, 32, 1, 1], weight_threshold=1)
    keep = {"time_proj_table": None, "class_embedding_weight": None}
    edges = {**keep, "conv_in_weight": int8_pc, "conv_out_weight": int8_pc}
    peers = (("coremltools int8 per-channel", opt.OptimizationConfig(global_config=int8_pc, op_name_configs=keep)),
             ("coremltools int4 b32 (conv: 32 ch x kernel)",
              opt.OptimizationConfig(global_config=int4_b32, op_name_configs=edges)),
             ("coremltools int4 b32 (conv: 32 ch per kernel position)",
              opt.OptimizationConfig(global_config=int4_b32, op_type_configs={"conv": int4_b32_pos},
                                     op_name_configs=edges)))
    for label, cfg in peers:
        t0 = time.perf_counter()
        model = ct.models.MLModel(str(f16), skip_model_load=True)
        q = opt.linear_quantize_weights(model, cfg)
        secs = time.perf_counter() - t0
        path = scratch / (label.split(" (")[0].replace(" ", "_") + str(len(rows)) + ".mlpackage")
        q.save(str(path))
        mse, rel = score(path)
        rows.append({"row": label, "bytes": package_bytes(path), "mse": mse, "rel_mse": rel, "seconds": secs})
        log(f"(c) {label}: rel MSE {rel:.3e}")
    for name in COREML_ROWS:
        path = export(name, quantized[name])
        mse, rel = score(path)
        rows.append({"row": f"edgekit {name}", "bytes": package_bytes(path), "mse": mse, "rel_mse": rel, "seconds": None})
        log(f"(c) edgekit {name}: rel MSE {rel:.3e}")
    return rows


def main(argv: list[str] | None = None) -> int:
    import torch

    from edgekit.converters.diffusion.calibrate import calibrate, quantizable_layers
    from edgekit.converters.diffusion.quantize import DiffusionQuantConfig, measure, quantize_with

    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--pipe", type=Path)
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--timesteps", type=int, default=8)
    ap.add_argument("--heldout-images", type=int, default=32)
    ap.add_argument("--coreml-samples", type=int, default=64, help="held-out UNet inputs the numpy evaluator runs")
    ap.add_argument("--no-coreml", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "diffusion_quant")
    args = ap.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="diffusion-quant-"))
    pipe, source = get_pipe(args.pipe, scratch)
    unet = pipe.load_unet()
    layers = quantizable_layers(unet)
    n_params = sum(p.numel() for p in unet.parameters())
    log(f"{source}: {n_params} parameters, {len(layers)} conv/linear layers")
    t0 = time.perf_counter()
    cal = calibrate(pipe, unet, layers, args.calib_images, args.timesteps, seed=0)
    calib_s = time.perf_counter() - t0
    log(f"calibration: {calib_s:.1f} s, {len(cal.inputs)} input batches")
    held = calibrate(pipe, unet, {}, args.heldout_images, args.timesteps, seed=1000)  # inputs only: no layers
    held.hessians = {}
    rows, quantized = [], {}
    for name, kw in ROWS:
        cfg = DiffusionQuantConfig(calib_images=args.calib_images, timesteps=args.timesteps, **kw)
        t0 = time.perf_counter()
        w = quantize_with(pipe, unet, cfg, calibration=cal)
        secs = time.perf_counter() - t0
        quantized[name] = w
        on_cal, on_held = measure(unet, w, cal, secs), measure(unet, w, held, secs)
        layer = list(on_cal.layer_rel.values())
        rows.append({"row": name, "config": asdict(cfg), "seconds": secs,
                     "calib_seconds": calib_s if cfg.calibrated else 0.0, "bytes": on_cal.nbytes,
                     "float_bytes": on_cal.float_bytes, "mse_calib": on_cal.mse, "mse_heldout": on_held.mse,
                     "rel_mse_heldout": on_held.rel_mse, "layer_rel_mean": float(np.mean(layer)),
                     "layer_rel_max": float(np.max(layer)), "layer_rel": on_cal.layer_rel})
        log(f"(a) {name}: {secs:.1f} s, held-out rel MSE {on_held.rel_mse:.3e}")
    console = Console(record=True, width=150)
    title = (f"Diffusion UNet weights: {source}; {n_params / 1e6:.2f}M parameters; calibration {args.calib_images} "
             f"images x {args.timesteps} timesteps ({calib_s:.0f} s); held-out {args.heldout_images} images")
    t = Table(title=title)
    for col in ("quantizer", "bytes", "vs fp32", "MSE calib", "MSE held-out", "rel MSE held-out", "layer rel mean",
                "layer rel max", "seconds"):
        t.add_column(col, justify="left" if col == "quantizer" else "right")
    fbytes = rows[0]["float_bytes"]
    t.add_row("fp32 (conv/linear weights)", f"{fbytes:,}", "1.00", "0", "0", "0", "0", "0", "")
    for r in rows:
        secs = f"{r['seconds']:.1f}" + (f" (+{r['calib_seconds']:.0f} calib)" if r["calib_seconds"] else "")
        t.add_row(r["row"], f"{r['bytes']:,}", f"{r['bytes'] / fbytes:.3f}", f"{r['mse_calib']:.3e}",
                  f"{r['mse_heldout']:.3e}", f"{r['rel_mse_heldout']:.3e}", f"{r['layer_rel_mean']:.2e}",
                  f"{r['layer_rel_max']:.2e}", secs)
    console.print(t)
    by = {r["row"]: r["layer_rel"] for r in rows}
    per = Table(title="(b) per-layer relative output error tr(dW H dW^T)/tr(W H W^T), W4 rows (worst 15 of RTN)")
    cols = ("W4-RTN", "W4-GPTQ", "W4-GPTQ+LR16", "W8-RTN", "W8-GPTQ")
    per.add_column("layer")
    for c in cols:
        per.add_column(c, justify="right")
    for name in sorted(by["W4-RTN"], key=lambda n: -by["W4-RTN"][n])[:15]:
        per.add_row(name, *(f"{by[c][name]:.2e}" for c in cols))
    console.print(per)
    cm: list[dict[str, Any]] = []
    if not args.no_coreml:
        inputs, n = [], 0
        for x, tt, lab in held.inputs:
            if n >= args.coreml_samples:
                break
            k = min(len(x), args.coreml_samples - n)
            inputs.append((x[:k], tt, None if lab is None else lab[:k]))
            n += k
        cm = coreml_rows(pipe, unet, quantized, inputs, scratch)
        c = Table(title=f"(c) Core ML packages, numpy MIL evaluator vs PyTorch float32 on {n} held-out inputs")
        for col in ("program", "package bytes", "MSE", "rel MSE", "compress s"):
            c.add_column(col, justify="left" if col == "program" else "right")
        for r in cm:
            c.add_row(r["row"], f"{r['bytes']:,}", f"{r['mse']:.3e}", f"{r['rel_mse']:.3e}",
                      "" if r["seconds"] is None else f"{r['seconds']:.1f}")
        console.print(c)
    report = {"source": source, "n_params": n_params, "calib_seconds": calib_s, "args": vars(args),
              "rows": rows, "coreml": cm, "torch": torch.__version__, "machine": platform.platform(),
              "note": "shared 2-core machine: seconds are noisy"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    args.out.with_suffix(".txt").write_text(console.export_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
