"""How fast edgekit writes GGUF K-quants against llama.cpp's own tools, on a model whose rows hold them.

    python bench/convert_speed.py [--model DIR|synthetic:SPEC] [--types Q8_0,Q6_K,Q4_K_M,Q3_K_M,Q2_K]
                                  [--repeat 2] [--numpy-too] [--out bench/results/convert_speed]

SmolLM2's 576-wide rows make most K-quant tensors fall back to 32-wide types (``bench/gguf_rtn.py`` times
those); a model with 256-aligned rows is where the K-quant scale searches do the work. The default model is
a TinyLlama-shaped Llama (hidden 2048, FFN 5632, 22 layers, 32/4 heads, 1.1B parameters, bf16) with random
weights and SmolLM2's tokenizer, built once into edgekit's cache (``bench/sparse_ffn_gpu.py``'s builder,
same folder); encoding time does not depend on the values. ``--model`` takes any checkpoint folder, but the
time ratio compares like with like only when every tensor comes out identical: ``--outtype auto`` writes a
bf16 checkpoint as BF16 and a float16 or float32 one as F16 (llama.cpp 0.3.36's heuristic), so a float32
checkpoint's values are rounded to F16 on llama.cpp's side only. The caption names the checkpoint's dtype and the intermediate's type, and a
row whose tensors differ is marked ``*`` with a line saying so.

For each type: ``edgekit convert --type T`` (the CLI, a child process) against llama.cpp's two steps,
``convert_hf_to_gguf.py --outtype auto`` (once; the checkpoint's own 16-bit type, so a bf16 model's values
pass exactly; from the llama-cpp-python sdist, as ``gguf_rtn.py`` fetches it) and ``llama_model_quantize``
from that file (2 threads). The two files are compared tensor by tensor. (With ``--outtype f16`` a bf16
checkpoint's values below f16's normal range are rounded on the way, and llama.cpp's K-quants of them then
differ from edgekit's, which quantizes the checkpoint's exact values, in a few bytes per tensor.)
``--numpy-too``: Q4_K_M once more with edgekit's numba kernels hidden (its numpy path, same bytes), to show
what the compiled scale searches buy. Prints a table and writes ``.json`` and ``.txt``.
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads fight over 2 cores

from common import cpu_model, get_model, log, pkg_version, publish  # noqa: E402
from gguf_rtn import (  # noqa: E402
    N_THREADS,
    compare_tensors,
    edgekit_convert,
    llama_quantize,
    llamacpp_convert_f32,
    llamacpp_converter,
    timed_child,
)
from rich.table import Table  # noqa: E402
from sparse_ffn_gpu import synthetic_model  # noqa: E402

from edgekit.converters.formats.gguf.mixes import preset_from_name  # noqa: E402
from edgekit.fsutil import edgekit_home  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODEL = "synthetic:hidden=2048,ffn=5632,layers=22,heads=32,kv=4"
DEFAULT_TYPES = "Q8_0,Q6_K,Q4_K_M,Q3_K_M,Q2_K"
# edgekit's numpy path: the same convert with the numba kernels hidden (a child process, like the CLI)
_NUMPY_CHILD = r"""
import sys
import edgekit.converters.quantize.ggml._common as c
c._compiled_qkx = lambda: None
c._compiled_qx = lambda: None
from edgekit import api
api.convert(sys.argv[1], "gguf", output=sys.argv[2], recipe=api.ConvertRecipe(bits=None, preset=sys.argv[3]), force=True)
"""


def resolve_model(spec: str) -> Path:
    if spec.startswith("synthetic:"):
        dest = edgekit_home() / "bench-sparse-ffn" / "tinyllama-hf"
        if spec != DEFAULT_MODEL:
            dest = edgekit_home() / "bench-convert" / spec.split(":", 1)[1].replace(",", "_").replace("=", "")
        log(f"synthetic model {spec} in {dest}")
        return synthetic_model(spec.split(":", 1)[1], dest, get_model())
    return Path(spec).expanduser()


def checkpoint_dtype(hf: Path) -> str:
    """The checkpoint's dtype as its config.json states it (``torch_dtype``, or ``dtype`` in newer ones)."""
    import json

    try:
        cfg = json.loads((hf / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "unknown"
    return str(cfg.get("torch_dtype") or cfg.get("dtype") or "unknown")


def gguf_main_type(path: Path) -> str:
    """The type most of a GGUF's matrices are stored in (what ``--outtype auto`` chose)."""
    from collections import Counter

    import gguf

    types = Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) > 1)
    return types.most_common(1)[0][0] if types else "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint folder, or synthetic:SPEC (default: the "
                    "TinyLlama shape)")
    ap.add_argument("--types", default=DEFAULT_TYPES, help=f"comma-separated presets (default {DEFAULT_TYPES})")
    ap.add_argument("--repeat", type=int, default=2, help="time each step this many times, keep the best")
    ap.add_argument("--numpy-too", action="store_true", help="also time Q4_K_M with the numba kernels hidden")
    ap.add_argument("--out", type=Path, default=RESULTS / "convert_speed", help="results path without suffix")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    types = [preset_from_name(t).name for t in args.types.split(",") if t.strip()]
    start = time.perf_counter()
    hf = resolve_model(args.model)
    report: dict[str, Any] = {
        "benchmark": "convert_speed", "model": args.model, "checkpoint": str(hf), "types": types,
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(), "threads": N_THREADS,
        "timing": f"wall clock, best of {args.repeat}, child processes (Python start-up included)",
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_start": os.getloadavg()},
        "versions": {n: pkg_version(n) for n in ("edgekit", "llama_cpp_python", "gguf", "numpy", "numba")},
        "rows": [],
    }
    peer, peer_info = llamacpp_converter()
    if peer is None:
        raise SystemExit(f"llama.cpp's convert_hf_to_gguf.py is unavailable: {peer_info.get('error')}")
    report["llamacpp_peer"] = {"path": str(peer), **peer_info}
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmpdir:
        tmp = Path(tmpdir)
        f16 = tmp / "llama-16bit.gguf"
        log("llama.cpp: convert_hf_to_gguf.py --outtype auto")
        conv = llamacpp_convert_f32(peer, hf, f16, args.repeat, outtype="auto")
        report["llamacpp_convert_f16_s"] = conv["convert_s"]
        report["checkpoint_dtype"] = checkpoint_dtype(hf)
        report["llamacpp_outtype"] = gguf_main_type(f16)
        log(f"llama.cpp convert {conv['convert_s']:.1f} s")
        for preset in types:
            log(f"{preset}: edgekit convert")
            e_path, e = edgekit_convert(hf, preset, tmp / f"edgekit-{preset}", args.repeat)
            log(f"{preset}: edgekit {e['convert_s']:.1f} s; llama.cpp quantize")
            l_path = tmp / f"llama-{preset}.gguf"
            q = llama_quantize(f16, l_path, preset, args.repeat)
            cmp = compare_tensors(e_path, l_path)
            row = {"type": preset, "edgekit": e, "llamacpp": {**q, "convert_f16_s": conv["convert_s"]},
                   "identical": cmp["identical"], "total": cmp["total"], "differ": cmp["differ"][:5],
                   "ratio_two_steps": e["convert_s"] / (conv["convert_s"] + q["quantize_s"]),
                   "ratio_quantize_only": e["convert_s"] / q["quantize_s"]}
            if args.numpy_too and preset == "Q4_K_M":
                log("Q4_K_M: edgekit with the numba kernels hidden (numpy path)")
                out = tmp / "edgekit-numpy"
                wall, _ = timed_child([sys.executable, "-c", _NUMPY_CHILD, str(hf), str(out), preset], "numpy path")
                row["edgekit_numpy_s"] = wall
                row["numpy_identical"] = compare_tensors(out / "model.gguf", e_path)["identical"]
            log(f"{preset}: quantize {q['quantize_s']:.1f} s; identical tensors {cmp['identical']}/{cmp['total']}")
            report["rows"].append(row)
            for p in (l_path,):
                p.unlink(missing_ok=True)
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["total_s"] = time.perf_counter() - start

    table = Table(title=f"GGUF conversion time: edgekit convert vs llama.cpp convert_hf_to_gguf (auto) + "
                        f"llama_model_quantize ({N_THREADS} threads), {hf.name}")
    for col in ("type", "identical tensors", "edgekit s", "llama.cpp convert + quantize s", "ratio e/l",
                "llama.cpp quantize alone s", "ratio e/quantize", "edgekit numpy path s"):
        table.add_column(col, justify="left" if col == "type" else "right")
    for r in report["rows"]:
        r["like_for_like"] = r["identical"] == r["total"]
        star = "" if r["like_for_like"] else " *"
        table.add_row(r["type"], f"{r['identical']}/{r['total']}", f"{r['edgekit']['convert_s']:.1f}",
                      f"{r['llamacpp']['convert_f16_s']:.1f} + {r['llamacpp']['quantize_s']:.1f}",
                      f"{r['ratio_two_steps']:.2f}{star}", f"{r['llamacpp']['quantize_s']:.1f}",
                      f"{r['ratio_quantize_only']:.2f}{star}",
                      f"{r['edgekit_numpy_s']:.1f}" if "edgekit_numpy_s" in r else "-")
    lines = [f"edgekit: `edgekit convert {hf.name} --type T` (checkpoint straight to the type); llama.cpp: "
             f"convert_hf_to_gguf.py --outtype auto ({report['llamacpp_outtype']} here, from a "
             f"{report['checkpoint_dtype']} checkpoint) once, then llama_model_quantize from it. "
             f"Times: {report['timing']}. edgekit {report['versions']['edgekit']}, numba "
             f"{report['versions']['numba']}, llama-cpp-python {report['versions']['llama_cpp_python']}"]
    lines += [f"{r['type']}: numpy path {r['edgekit_numpy_s']:.1f} s -> {r['edgekit']['convert_s']:.1f} s compiled "
              f"({r['edgekit_numpy_s'] / r['edgekit']['convert_s']:.1f}x), {r['numpy_identical']}/{r['total']} tensors "
              "identical between the two" for r in report["rows"] if "edgekit_numpy_s" in r]
    rounded = report["llamacpp_outtype"].lower() not in report["checkpoint_dtype"].lower().replace("float", "f")
    why = (f"llama.cpp quantized the values its {report['llamacpp_outtype']} intermediate rounded, edgekit the "
           f"checkpoint's {report['checkpoint_dtype']} values" if rounded else "see \"differ\" in the JSON")
    lines += [f"* {r['type']}: only {r['identical']}/{r['total']} tensors identical, so the two sides did NOT do the "
              f"same work ({why}): the time ratios of this row are not a like-for-like comparison"
              for r in report["rows"] if not r["like_for_like"]]
    publish(report, table, lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
