"""Below 4 bits: edgekit's i-quant encoders against llama.cpp with its importance matrix, on SmolLM2-135M
and on its function-identical copy padded to hidden 768 (every row a multiple of 256).

    python bench/low_bit.py [--presets IQ4_XS,IQ3_XXS,IQ2_M] [--edgekit real:IQ4_XS,padded:IQ3_XXS:gptq,...]
                            [--chunks 8]

For each model (``real``: SmolLM2-135M-Instruct, 576-wide rows, so llama.cpp falls back to IQ4_NL for all
but ffn_down; ``padded``: :func:`edgekit.converters.structure.pad.pad_hidden` to 768, checked here to give
the same F32 perplexity): edgekit writes the F32 GGUF (the KL / top-1 reference); ``llama-imatrix`` runs
on the FIRST half of the text (WikiText-2 valid), and ``llama-quantize --imatrix`` writes each preset.
Then, per preset:

* ``bytes``: edgekit's numpy encoders re-encode ``--check-tensors`` of llama.cpp's quantized tensors from
  the F32 GGUF with the same importance matrix: how many are byte-identical, and the encode speed;
* ``edgekit imatrix`` rows (``--edgekit MODEL:PRESET``): ``api.convert(method="imatrix")`` with edgekit's
  own importance matrix from the same first half (its calibration pipeline, first-position weighting),
  encoded by the same encoders; ``MODEL:PRESET:gptq`` converts with ``method="gptq"`` instead (GPTQ onto
  the same grids, the lattice i-quants included), same calibration;
* ``MODEL:@PRESET[:METHOD]`` rows are edgekit's size budget (``--size``) at the byte size of llama.cpp's
  imatrix PRESET file of this run: every type the rows can hold (i-quants included) is a candidate, less
  Q4_1 (``--exclude-types``: the source weights were dequantized from a Q4_1 GGUF, so Q4_1 re-encodes
  them almost losslessly, an accident of this test model). The targets of issue 18 are checked on them:
  at a file no larger than Q2_K's (IQ2_M's), at most half of its perplexity increase.

Perplexity on ``--chunks`` chunks of 512 tokens of the SECOND half, KL and top-1 on ``--kl-chunks``.
Writes ``bench/results/low_bit.{json,txt}``; while it runs, ``OUT.partial.json`` holds every row measured so
far, and ``--publish-partial`` prints and writes the report from it (a run stopped early keeps its rows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import gguf  # noqa: E402
import llamacpp_imatrix as peer  # noqa: E402
import numpy as np  # noqa: E402
from common import cpu_model, get_model, log, pkg_version, publish  # noqa: E402
from gguf_quality import evaluate, gguf_bpw, halves  # noqa: E402
from rich.table import Table  # noqa: E402

from edgekit import api  # noqa: E402
from edgekit.converters.formats.gguf.budget import candidates  # noqa: E402
from edgekit.converters.quantize import ggml  # noqa: E402
from edgekit.converters.structure.pad import pad_hidden  # noqa: E402
from edgekit.evaluate import read_text  # noqa: E402
from edgekit.fsutil import atomic_file  # noqa: E402
from edgekit.model import HFCheckpoint  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"
PADDED_HIDDEN = 768


def byte_check(f32: Path, theirs: Path, imatrix: dict[str, np.ndarray], limit: int) -> dict[str, Any]:
    """Re-encode up to ``limit`` of llama.cpp's quantized tensors (i-quants first) with edgekit's encoders."""
    src = {t.name: t for t in gguf.GGUFReader(f32).tensors}
    out = [t for t in gguf.GGUFReader(theirs).tensors if t.tensor_type in ggml.SUPPORTED_TYPES
           and t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)]
    out.sort(key=lambda t: (not t.tensor_type.name.startswith("IQ") or t.tensor_type.name == "IQ4_NL", t.name))
    same, checked, weights, secs, by_type = 0, 0, 0, 0.0, {}
    for t in out[:limit]:
        x = np.asarray(src[t.name].data, dtype=np.float32)
        x = x.reshape(-1, x.shape[-1])
        t0 = time.perf_counter()
        ours = ggml.quantize(x, t.tensor_type, imatrix.get(t.name))
        secs += time.perf_counter() - t0
        ok = bool(np.array_equal(ours.reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1)))
        same += ok
        checked += 1
        weights += x.size
        k = t.tensor_type.name
        by_type[k] = [by_type.get(k, [0, 0])[0] + ok, by_type.get(k, [0, 0])[1] + 1]
    return {"identical": same, "checked": checked, "by_type": by_type,
            "encode_us_per_weight": 1e6 * secs / weights if weights else None}


def one_model(name: str, hf: Path, tmp: Path, text: str, calib_file: Path, args: argparse.Namespace,
              edgekit_presets: list[tuple[str, str]], res: dict[str, Any], save: Callable[[], None]) -> None:
    """Fill ``res`` with the model's rows, calling ``save()`` after each (a long run keeps what it measured)."""
    log(f"{name}: F32 GGUF")
    f32 = api.convert(hf, "gguf", output=tmp / f"{name}-F32", recipe=api.ConvertRecipe(bits=None, preset="F32"),
                      force=True).model_file
    res.update(f32={"mb": f32.stat().st_size / 1e6, **evaluate(f32, text, args.chunks, 0, None)},
               llamacpp={}, edgekit={})
    save()
    f32_ppl = res["f32"]["ppl"]
    log(f"{name}: F32 ppl {f32_ppl:.4f}; llama-imatrix on {args.imatrix_chunks} chunks")
    imat = tmp / f"{name}-imatrix.gguf"
    res["imatrix"] = peer.make_imatrix(f32, calib_file, imat, args.imatrix_chunks)
    importance = peer.load_imatrix(imat)
    for preset in args.presets:
        dst = tmp / f"{name}-{preset}.gguf"
        try:
            row: dict[str, Any] = peer.quantize(f32, dst, preset, imat)
            row.update(size_bytes=dst.stat().st_size, mb=dst.stat().st_size / 1e6, bpw=gguf_bpw(dst))
            log(f"{name} llama.cpp imatrix {preset}: {row['mb']:.2f} MB; byte check, evaluating")
            row["bytes"] = byte_check(f32, dst, importance, args.check_tensors)
            row.update(evaluate(dst, text, args.chunks, args.kl_chunks, f32))
            row["increase_pct"] = 100 * (row["ppl"] / f32_ppl - 1)
            log(f"{name} llama.cpp imatrix {preset}: ppl {row['ppl']:.4f} ({row['increase_pct']:+.2f}%), "
                f"bytes {row['bytes']['identical']}/{row['bytes']['checked']}")
        except Exception as exc:  # noqa: BLE001 - report it and go on
            log(f"{name} llama.cpp {preset}: FAILED: {exc}")
            row = {"error": f"{type(exc).__name__}: {exc}"}
        dst.unlink(missing_ok=True)
        res["llamacpp"][preset] = row
        save()
    for preset, method in edgekit_presets:
        key = preset if method == "imatrix" else f"{preset}:{method}"
        try:
            calib = api.CalibConfig(source=str(calib_file), samples=args.calib_samples)
            if preset.startswith("@"):  # a size budget at the size of llama.cpp's file of that preset
                ref = res["llamacpp"].get(preset[1:], {})
                if "size_bytes" not in ref:
                    raise ValueError(f"no llama.cpp {preset[1:]} file in this run (add it to --presets)")
                types = tuple(t.name for t in budget_types() if t.name not in args.exclude_types)
                recipe = api.ConvertRecipe(bits=None, size=ref["size_bytes"], method=method, calib=calib,
                                           bpw_types=types)
            else:
                recipe = api.ConvertRecipe(bits=None, preset=preset, method=method, calib=calib)
            log(f"{name} edgekit {method} {preset}: convert")
            t0 = time.perf_counter()
            art = api.convert(hf, "gguf", output=tmp / f"{name}-ek-{preset}-{method}", recipe=recipe, force=True)
            row = {"method": method, "convert_s": time.perf_counter() - t0, "size_bytes": art.manifest["size_bytes"],
                   "mb": art.manifest["size_bytes"] / 1e6, "bpw": gguf_bpw(art.model_file),
                   "types": dict(Counter(t["type"] for t in art.manifest["tensors"].values()))}
            row.update(evaluate(art.model_file, text, args.chunks, args.kl_chunks, f32))
            row["increase_pct"] = 100 * (row["ppl"] / f32_ppl - 1)
            log(f"{name} edgekit {method} {preset}: ppl {row['ppl']:.4f} ({row['increase_pct']:+.2f}%)")
        except Exception as exc:  # noqa: BLE001
            log(f"{name} edgekit {method} {preset}: FAILED: {exc}")
            row = {"method": method, "error": f"{type(exc).__name__}: {exc}"}
        res["edgekit"][key] = row
        save()


def build_table(report: dict[str, Any]) -> Table:
    cfg = report["config"]
    table = Table(title=f"i-quants, llama.cpp imatrix vs edgekit: SmolLM2-135M-Instruct real (576) and padded "
                        f"({PADDED_HIDDEN}); ppl on {cfg['chunks']} x 512 tokens, KL/top-1 on {cfg['kl_chunks']}, "
                        f"second half of {Path(cfg['text']).name}; imatrix from its first half")
    for col in ("model", "row", "MB", "bpw", "ppl", "vs F32", "KL", "top-1", "bytes = ggml", "time s"):
        table.add_column(col, justify="left" if col in ("model", "row") else "right")
    for model, res in report["models"].items():
        if "f32" not in res:  # a stopped run's model that had not begun
            continue
        f = res["f32"]
        table.add_row(model, "F32", f"{f['mb']:.1f}", "32", f"{f['ppl']:.4f}", "", "", "", "", "")
        for kind, rows in (("llama.cpp imatrix", res["llamacpp"]), ("edgekit imatrix", res["edgekit"])):
            for preset, r in rows.items():
                label = f"{kind} {preset}" if r.get("method", "imatrix") == "imatrix" else \
                    f"edgekit {r['method']} {preset.split(':')[0]}"
                if preset.startswith("@"):
                    label = f"edgekit {r.get('method', 'imatrix')} size {preset.split(':')[0]}"
                if "error" in r:
                    table.add_row(model, label, *[""] * 7, r["error"][:40])
                    continue
                b = r.get("bytes")
                table.add_row(model, label, f"{r['mb']:.1f}", f"{r['bpw']:.3f}", f"{r['ppl']:.4f}",
                              f"{r['increase_pct']:+.2f}%", f"{r['kl_mean']:.4f}", f"{r['top1']:.3f}",
                              f"{b['identical']}/{b['checked']}" if b else "",
                              f"{r.get('quantize_s', r.get('convert_s', 0)):.1f}")
    table.caption = ("bytes = ggml: of llama.cpp's quantized tensors, how many edgekit's numpy encoders reproduce "
                     "byte for byte from the F32 weights and llama-imatrix's importance (i-quants first). time: "
                     "llama-quantize wall time, or edgekit's api.convert (calibration + encoding). Shared 2-core "
                     "machine: times are noisy.")
    return table


def budget_types() -> list[gguf.GGMLQuantizationType]:
    """Every quantized type a --size budget may pick on rows that hold 256-weight super-blocks."""
    return candidates(256)


def targets(report: dict[str, Any]) -> list[str]:
    """Issue 18's size targets: at a file no larger than llama.cpp's imatrix Q2_K (IQ2_M), edgekit's best
    has at most half of its perplexity increase."""
    lines = []
    for model, res in report["models"].items():
        for ref in ("Q2_K", "IQ2_M"):
            r = res["llamacpp"].get(ref, {})
            if "increase_pct" not in r:
                continue
            fits = [(k, e) for k, e in res["edgekit"].items() if "increase_pct" in e and e["size_bytes"] <= r["size_bytes"]]
            bar = r["increase_pct"] / 2
            if not fits:
                lines.append(f"{model}: file <= llama.cpp imatrix {ref} ({r['mb']:.2f} MB), increase <= half of "
                             f"{r['increase_pct']:+.2f}% = {bar:+.2f}%: NOT MEASURED (no edgekit row fits)")
                continue
            k, e = min(fits, key=lambda kv: kv[1]["increase_pct"])
            verdict = "HOLDS" if e["increase_pct"] <= bar else "MISSED"
            lines.append(f"{model}: file <= llama.cpp imatrix {ref} ({r['mb']:.2f} MB), increase <= half of "
                         f"{r['increase_pct']:+.2f}% = {bar:+.2f}%: {verdict} (best edgekit {k}: {e['mb']:.2f} MB, "
                         f"{e['increase_pct']:+.2f}%, KL {e['kl_mean']:.4f} vs {r['kl_mean']:.4f})")
    for model, res in report["models"].items():
        for k, e in res["edgekit"].items():
            if "types" in e and k.startswith("@"):
                mix = ", ".join(f"{t} {n}" for t, n in sorted(e["types"].items(), key=lambda kv: -kv[1]))
                lines.append(f"{model} edgekit {k} tensor types: {mix}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--presets", default="IQ4_XS,IQ3_S,IQ3_XXS,IQ2_M,IQ2_XS,IQ2_XXS")
    ap.add_argument("--edgekit", default="real:IQ4_XS,real:IQ3_XXS,real:IQ2_M,padded:IQ4_XS",
                    help="MODEL:PRESET[:METHOD] rows converted by edgekit (METHOD imatrix, the default, "
                         "or gptq) with its own calibration ('' for none)")
    ap.add_argument("--models", default="real,padded")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--kl-chunks", type=int, default=4)
    ap.add_argument("--imatrix-chunks", type=int, default=32, help="llama-imatrix chunks of 512 tokens")
    ap.add_argument("--calib-samples", type=int, default=32, help="edgekit's calibration sequences")
    ap.add_argument("--check-tensors", type=int, default=6, help="tensors re-encoded per preset for the byte check")
    ap.add_argument("--exclude-types", default="Q4_1",
                    help="types the @PRESET size budgets may not use (default Q4_1: see the module's docstring)")
    ap.add_argument("--out", type=Path, default=RESULTS / "low_bit")
    ap.add_argument("--publish-partial", action="store_true",
                    help="print and write the report from OUT.partial.json of a run that was stopped")
    args = ap.parse_args(argv)
    if args.publish_partial:
        partial = args.out.with_suffix(".partial.json")
        if not partial.exists():
            ap.error(f"no {partial}: nothing to publish")
        report = json.loads(partial.read_text())
        report["stopped_early"] = True
        publish(report, build_table(report), [*targets(report), "stopped early: the rows above are all it measured"],
                args.out)
        return 0
    args.presets = [p.strip().upper() for p in args.presets.split(",") if p.strip()]
    args.exclude_types = {t.strip().upper() for t in args.exclude_types.split(",") if t.strip()}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    ek = [s.split(":") for s in args.edgekit.split(",") if s.strip()]
    if peer.tools() is None:
        ap.error("llama-imatrix / llama-quantize are not built: run bash .ci/setup.sh --bench")
    calib_text, text = halves(read_text(args.text))
    start = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "low_bit", "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "config": {"text": str(args.text.resolve()), "chunks": args.chunks, "kl_chunks": args.kl_chunks,
                   "imatrix_chunks": args.imatrix_chunks, "presets": args.presets, "edgekit": args.edgekit,
                   "calib_samples": args.calib_samples, "check_tensors": args.check_tensors, "ctx": 512,
                   "exclude_types": sorted(args.exclude_types),
                   "padded_hidden": PADDED_HIDDEN},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_start": os.getloadavg()},
        "versions": {n: pkg_version(n) for n in ("edgekit", "llama_cpp_python", "gguf", "numpy", "torch")},
        "models": {}}
    hf = get_model()
    partial = args.out.with_suffix(".partial.json")

    def save() -> None:
        report["total_s"] = time.perf_counter() - start
        partial.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(partial) as tmp_file:  # a run killed mid-write keeps the previous rows whole
            tmp_file.write_text(json.dumps(report, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="edgekit-lowbit-") as tmpdir:
        tmp = Path(tmpdir)
        calib_file = tmp / "calib.txt"
        calib_file.write_text(calib_text, encoding="utf-8")
        for model in models:
            path = hf if model == "real" else pad_hidden(HFCheckpoint.open(hf), PADDED_HIDDEN, tmp / "padded-hf")
            presets = [(e[1].upper(), e[2].lower() if len(e) > 2 else "imatrix") for e in ek if e[0] == model]
            report["models"][model] = {}
            one_model(model, path, tmp, text, calib_file, args, presets, report["models"][model], save)
    report["total_s"] = time.perf_counter() - start
    report["machine"]["loadavg_end"] = os.getloadavg()
    publish(report, build_table(report), targets(report), args.out)
    partial.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
