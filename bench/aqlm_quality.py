"""AQLM near 2 bits: edgekit's AQLM checkpoints against llama.cpp's low-bit mixes made with its importance
matrix, on SmolLM2-135M-Instruct.

    python bench/aqlm_quality.py [--presets Q2_K,IQ2_M,padded:IQ1_S,...] [--aqlm 2x8,2x8+ft,size:Q2_K,4x8+fp8]
                         [--chunks 8 --kl-chunks 4] [--rounds 3 --beam 4] [--calib-samples 32] [--ft-minutes 15]

The text (WikiText-2 valid) is cut in two: ``llama-imatrix`` and edgekit's calibration read the FIRST half;
perplexity (``--chunks`` x 512 tokens) and KL / top-1 against the F32 GGUF run by llama.cpp (``--kl-chunks``)
are measured on the SECOND half. llama.cpp rows: ``llama-quantize --imatrix`` of each preset, run by
llama.cpp. A ``padded:PRESET`` row quantizes instead the model's function-identical copy padded to hidden 768
(:func:`pad_hidden`, as ``bench/low_bit.py`` does; its own F32 GGUF and its own imatrix from the same first
half), where every row but ``attn_output``'s is a multiple of 256, so llama.cpp's 1- and 2-bit types apply
instead of falling back to 4.5-bit ones: the only way llama.cpp writes this model below 83.8 MB. Its KL is
measured against the real model's F32 GGUF (the same function; the padded F32's perplexity is reported as
the check). AQLM rows: ``api.convert(MODEL, "aqlm")`` (``2x8``: two 256-entry codebooks over groups of 8;
``size:PRESET``: the most 8-bit codebooks whose checkpoint is no larger than that preset's file), run by
edgekit's AQLM backend (transformers + the aqlm package's layers, edgekit's kernels). The AQLM checkpoints keep
the embedding in fp16, as AQLM's format does: on this model the tied 49152 x 576 embedding is 56.6 MB of
the file, so the linears get what is left of a size budget. A ``+fp8`` row stores it as float8 e4m3 instead
(``-O embedding=fp8``: 28.3 MB; transformers casts it back on load). A ``+ft`` row adds AQLM's fine-tuning
(``--distill``: codebooks, scales and norms trained against the float model's outputs for ``--ft-minutes``,
codes fixed) to the same encoding (taken from edgekit's encoding cache, so only the tuning runs again).

Also measured: conversion time per layer and in total (the kernels' speed: ``bench/aqlm_kernels.py``). Writes ``bench/results/aqlm_quality.{json,txt}``. (Not named ``aqlm.py``: run from ``bench/``, it would
shadow the aqlm package.)
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import llamacpp_imatrix as peer  # noqa: E402
from common import cpu_model, get_model, log, pkg_version, publish  # noqa: E402
from gguf_quality import evaluate, gguf_bpw, halves  # noqa: E402
from low_bit import PADDED_HIDDEN  # noqa: E402
from rich.table import Table  # noqa: E402

from edgekit import api  # noqa: E402
from edgekit.converters.quantize.aqlm import AQLMConfig  # noqa: E402
from edgekit.converters.structure.heal import HealConfig  # noqa: E402
from edgekit.converters.structure.pad import pad_hidden  # noqa: E402
from edgekit.evaluate import EvalConfig, perplexity, read_text  # noqa: E402
from edgekit.fsutil import edgekit_home  # noqa: E402
from edgekit.model import HFCheckpoint  # noqa: E402
from edgekit.runtime.aqlm import AQLMBackend  # noqa: E402
from edgekit.runtime.llamacpp import LlamaCppBackend  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"
CTX, N_THREADS = 512, 2
#: Files within this fraction of each other's bytes count as "equal bytes".
WINDOW = 0.05


def preset_name(spec: str) -> str:
    """``IQ2_M`` or ``padded:IQ1_S`` from a ``--presets`` item or a ``size:`` row's reference, any case."""
    kind, _, ptype = spec.strip().rpartition(":")
    return ("padded:" if kind.lower() == "padded" else "") + ptype.upper()


def eval_aqlm(folder: Path, text: str, chunks: int, kl_chunks: int, f32: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    with AQLMBackend(folder, n_ctx=CTX, n_threads=N_THREADS) as b, \
            LlamaCppBackend(f32, n_ctx=CTX, n_threads=N_THREADS) as ref:
        same = b.tokenize(text[:20000]) == ref.tokenize(text[:20000])
        res = perplexity(b, text, EvalConfig(ctx=CTX, chunks=chunks))
        kl = perplexity(b, text, EvalConfig(ctx=CTX, chunks=kl_chunks), ref=ref)
    return {"ppl": res.ppl, "ppl_stderr": res.ppl_stderr, "chunks": res.chunks, "kl_mean": kl.kl_mean,
            "kl_p99": kl.kl_p99, "top1": kl.top1_agreement, "kl_chunks": kl.chunks, "tokens_match_llamacpp": same,
            "eval_s": time.perf_counter() - t0}


def build_table(report: dict[str, Any]) -> Table:
    cfg = report["config"]
    table = Table(title=f"AQLM vs llama.cpp imatrix, SmolLM2-135M-Instruct: ppl on {cfg['chunks']} x 512 tokens, "
                        f"KL/top-1 vs F32 on {cfg['kl_chunks']}, second half of {Path(cfg['text']).name}; "
                        "calibration and imatrix from its first half")
    for col in ("row", "MB", "bpw", "ppl", "vs F32", "KL", "top-1", "convert s"):
        table.add_column(col, justify="left" if col == "row" else "right")
    f = report["f32"]
    table.add_row("F32", f"{f['mb']:.1f}", "32", f"{f['ppl']:.4f}", "", "", "", "")
    if "padded_f32" in report:
        p = report["padded_f32"]
        table.add_row(f"F32 padded to {PADDED_HIDDEN}", f"{p['mb']:.1f}", "32", f"{p['ppl']:.4f}", "", "", "", "")
    for kind, rows in (("llama.cpp imatrix", report["llamacpp"]), ("edgekit AQLM", report["aqlm"])):
        for name, r in rows.items():
            label = f"{kind} {name.split(':', 1)[1]} (padded)" if name.startswith("padded:") else f"{kind} {name}"
            if "error" in r:
                table.add_row(label, *[""] * 6, r["error"][:60])
                continue
            table.add_row(label, f"{r['mb']:.1f}", f"{r['bpw']:.3f}", f"{r['ppl']:.4f}",
                          f"{r['increase_pct']:+.2f}%", f"{r['kl_mean']:.4f}", f"{r['top1']:.3f}",
                          f"{r.get('quantize_s', r.get('convert_s', 0)):.0f}")
    return table


def targets(report: dict[str, Any]) -> list[str]:
    lines = []
    cpp = {k: v for k, v in report["llamacpp"].items() if "error" not in v}
    for name, r in report["aqlm"].items():
        if "error" in r:
            continue
        # "at equal total bytes": against llama.cpp's best mix whose file is within WINDOW of the AQLM file's
        near = {k: v for k, v in cpp.items() if abs(v["size_bytes"] / r["size_bytes"] - 1) <= WINDOW}
        if near:
            best = min(near.items(), key=lambda kv: kv[1]["kl_mean"])
            verdict = "HOLDS" if r["kl_mean"] < best[1]["kl_mean"] else "MISSED"
            lines.append(f"AQLM {name} ({r['mb']:.1f} MB) KL {r['kl_mean']:.4f} vs the best llama.cpp imatrix mix "
                         f"within {WINDOW:.0%} of its bytes ({len(near)} of them), {best[0]} ({best[1]['mb']:.1f} MB) "
                         f"KL {best[1]['kl_mean']:.4f}: {verdict}")
        elif cpp:
            # no llama.cpp file of its size: measure it against those no larger than the smallest larger one
            # and everything below; if it beats all of them, llama.cpp needs more bytes to do as well
            larger = sorted((v["size_bytes"], k) for k, v in cpp.items() if v["size_bytes"] > r["size_bytes"])
            cap = larger[0][0] if larger else r["size_bytes"]
            pool = {k: v for k, v in cpp.items() if v["size_bytes"] <= cap}
            best = min(pool.items(), key=lambda kv: kv[1]["kl_mean"])
            verdict = "HOLDS" if r["kl_mean"] < best[1]["kl_mean"] else "MISSED"
            upto = None  # the largest size up to which every llama.cpp file has a higher KL
            for v in sorted(cpp.values(), key=lambda v: v["size_bytes"]):
                if v["kl_mean"] <= r["kl_mean"]:
                    break
                upto = v["size_bytes"]
            lines.append(f"AQLM {name} ({r['mb']:.1f} MB) KL {r['kl_mean']:.4f}: no llama.cpp mix within {WINDOW:.0%} "
                         f"of its bytes; the best of those no larger than the next larger llama.cpp file "
                         f"({cap / 1e6:.1f} MB, {len(pool)} of them), {best[0]} ({best[1]['mb']:.1f} MB), has KL "
                         f"{best[1]['kl_mean']:.4f}: {verdict}"
                         + (f"; every llama.cpp file up to {upto / 1e6:.1f} MB has a higher KL" if upto else ""))
        for ref in ("Q2_K", "IQ2_M"):
            if ref in cpp and r["size_bytes"] <= cpp[ref]["size_bytes"]:
                ok = r["increase_pct"] <= cpp[ref]["increase_pct"] / 2
                lines.append(f"AQLM {name} ppl increase {r['increase_pct']:+.2f}% vs half of {ref}'s "
                             f"{cpp[ref]['increase_pct']:+.2f}%: {'HOLDS' if ok else 'MISSED'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--presets", default="IQ2_XXS,IQ2_XS,IQ2_S,IQ2_M,IQ3_XXS,IQ3_XS,IQ3_S,IQ3_M,Q3_K_S,Q2_K",
                    help="llama.cpp presets (with its importance matrix); on SmolLM2 these files are 84-89 MB; "
                         "padded:PRESET quantizes the copy padded to hidden 768 (60-80 MB for IQ1_S-IQ2_M)")
    ap.add_argument("--aqlm", default="2x8,2x8+ft", help="SCHEME (2x8, 1x16...) or size:PRESET rows; +fp8: "
                    "the embedding in float8 e4m3; +ft: with fine-tuning (in that order)")
    ap.add_argument("--ft-minutes", type=float, default=15.0)
    ap.add_argument("--ft-lr", type=float, default=2e-4)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--kl-chunks", type=int, default=4)
    ap.add_argument("--imatrix-chunks", type=int, default=32)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--out", type=Path, default=RESULTS / "aqlm_quality")
    args = ap.parse_args(argv)
    presets = [preset_name(p) for p in args.presets.split(",") if p.strip()]
    rows = [s.strip() for s in args.aqlm.split(",") if s.strip()]
    if peer.tools() is None:
        ap.error("llama-imatrix / llama-quantize are not built: run bash .ci/setup.sh --bench")
    calib_text, text = halves(read_text(args.text))
    start = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "aqlm", "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "config": {"text": str(args.text.resolve()), "chunks": args.chunks, "kl_chunks": args.kl_chunks,
                   "imatrix_chunks": args.imatrix_chunks, "presets": presets, "aqlm": rows,
                   "calib_samples": args.calib_samples, "rounds": args.rounds, "beam": args.beam, "ctx": CTX,
                   "ft_minutes": args.ft_minutes, "ft_lr": args.ft_lr},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_start": os.getloadavg()},
        "versions": {n: pkg_version(n) for n in ("edgekit", "llama_cpp_python", "aqlm", "numba", "torch",
                                                 "transformers")},
        "llamacpp": {}, "aqlm": {}}
    hf = get_model()
    with tempfile.TemporaryDirectory(prefix="edgekit-aqlm-") as tmpdir:
        tmp = Path(tmpdir)
        # at a fixed place, so that edgekit's caches (the AQLM encoding, the fine-tuning state) serve reruns
        calib_file = edgekit_home() / "bench" / "wikitext2-valid-first-half.txt"
        calib_file.parent.mkdir(parents=True, exist_ok=True)
        if not calib_file.exists() or calib_file.read_text(encoding="utf-8") != calib_text:
            calib_file.write_text(calib_text, encoding="utf-8")
        f32 = api.convert(hf, "gguf", output=tmp / "F32", recipe=api.ConvertRecipe(bits=None, preset="F32"),
                          force=True).model_file
        report["f32"] = {"mb": f32.stat().st_size / 1e6, **evaluate(f32, text, args.chunks, 0, None)}
        f32_ppl = report["f32"]["ppl"]
        log(f"F32 ppl {f32_ppl:.4f}; llama-imatrix on {args.imatrix_chunks} chunks")
        imat = tmp / "imatrix.gguf"
        report["imatrix"] = peer.make_imatrix(f32, calib_file, imat, args.imatrix_chunks)
        padded_f32 = padded_imat = None
        if any(p.startswith("padded:") for p in presets):
            log(f"padding to hidden {PADDED_HIDDEN}: F32 GGUF and llama-imatrix")
            padded_hf = pad_hidden(HFCheckpoint.open(hf), PADDED_HIDDEN, tmp / "padded-hf")
            padded_f32 = api.convert(padded_hf, "gguf", output=tmp / "padded-F32",
                                     recipe=api.ConvertRecipe(bits=None, preset="F32"), force=True).model_file
            report["padded_f32"] = {"mb": padded_f32.stat().st_size / 1e6,
                                    **evaluate(padded_f32, text, args.chunks, args.kl_chunks, f32)}
            log(f"padded F32 ppl {report['padded_f32']['ppl']:.4f} (real {f32_ppl:.4f}), "
                f"KL to the real F32 {report['padded_f32']['kl_mean']:.2e}")
            padded_imat = tmp / "padded-imatrix.gguf"
            report["padded_imatrix"] = peer.make_imatrix(padded_f32, calib_file, padded_imat, args.imatrix_chunks)
        for name in presets:
            src, src_imat = (padded_f32, padded_imat) if name.startswith("padded:") else (f32, imat)
            dst = tmp / f"{name.replace(':', '-')}.gguf"
            try:
                row: dict[str, Any] = peer.quantize(src, dst, name.split(":")[-1], src_imat)
                row.update(size_bytes=dst.stat().st_size, mb=dst.stat().st_size / 1e6, bpw=gguf_bpw(dst))
                row.update(evaluate(dst, text, args.chunks, args.kl_chunks, f32))
                row["increase_pct"] = 100 * (row["ppl"] / f32_ppl - 1)
                log(f"llama.cpp imatrix {name}: {row['mb']:.1f} MB ppl {row['ppl']:.4f} "
                    f"({row['increase_pct']:+.2f}%) KL {row['kl_mean']:.4f}")
            except Exception as exc:  # noqa: BLE001 - report it and go on
                log(f"llama.cpp {name}: FAILED: {exc}")
                row = {"error": f"{type(exc).__name__}: {exc}"}
            dst.unlink(missing_ok=True)
            report["llamacpp"][name] = row
        calib = api.CalibConfig(source=str(calib_file), samples=args.calib_samples)
        for spec_ft in rows:
            spec, *flags = spec_ft.split("+")
            if set(flags) - {"fp8", "ft"}:
                ap.error(f"--aqlm {spec_ft}: the suffixes are +fp8 and +ft")
            tune = HealConfig(minutes=args.ft_minutes, lr=args.ft_lr, batch=2) if "ft" in flags else None
            quant = AQLMConfig(calib=calib, rounds=args.rounds, beam=args.beam, distill=tune)
            extra = {"embedding": "fp8"} if "fp8" in flags else {}
            try:
                if spec.startswith("size:"):
                    ref = report["llamacpp"][preset_name(spec.split(":", 1)[1])]
                    recipe = api.ConvertRecipe(bits=None, size=int(ref["size_bytes"]), extra=extra)
                else:
                    recipe = api.ConvertRecipe(bits=2, extra={"scheme": spec, **extra}) if "x" in spec \
                        else api.ConvertRecipe(bits=int(spec), extra=extra)
                log(f"AQLM {spec_ft}: convert")
                t0 = time.perf_counter()
                art = api.convert(hf, "aqlm", output=tmp / f"aqlm-{spec_ft.replace(':', '-')}", recipe=recipe,
                                  quantize=quant, force=True)
                m = art.manifest
                row = {"scheme": m["aqlm"]["scheme"], "embedding": m["aqlm"].get("embedding", "f16"),
                       "convert_s": time.perf_counter() - t0,
                       "size_bytes": m["size_bytes"], "mb": m["size_bytes"] / 1e6, "bpw": m["bpw"],
                       "layer_s": m["aqlm"]["layer_s"], "mean_rel_error": m["aqlm"]["mean_rel_error"],
                       "quantizer_report": m.get("quantizer_report"), "distill": m["aqlm"].get("distill")}
                log(f"AQLM {spec} ({row['scheme']}): {row['mb']:.1f} MB in {row['convert_s']:.0f} s; evaluating")
                row.update(eval_aqlm(art.path, text, args.chunks, args.kl_chunks, f32))
                row["increase_pct"] = 100 * (row["ppl"] / f32_ppl - 1)
                log(f"AQLM {spec_ft}: ppl {row['ppl']:.4f} ({row['increase_pct']:+.2f}%) KL {row['kl_mean']:.4f}")
            except Exception as exc:  # noqa: BLE001
                log(f"AQLM {spec}: FAILED: {exc}")
                row = {"error": f"{type(exc).__name__}: {exc}"}
            report["aqlm"][spec_ft] = row
    report["total_s"] = time.perf_counter() - start
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["targets"] = targets(report)
    lines = list(report["targets"])
    for name, r in report["aqlm"].items():
        if r.get("layer_s"):
            lines.append(f"AQLM {name}: encoding {sum(r['layer_s']):.0f} s over {len(r['layer_s'])} layers "
                         f"({min(r['layer_s']):.0f}-{max(r['layer_s']):.0f} s each), conversion {r['convert_s']:.0f} s")
        if r.get("distill"):
            d = r["distill"]
            lines.append(f"AQLM {name}: fine-tuning {d['steps']} steps in {d['minutes']:.1f} min, held-out KL "
                         f"{d['kl_before']:.4f} -> {d['kl_after']:.4f}")
    publish(report, build_table(report), lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
