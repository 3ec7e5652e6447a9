"""How fast are edgekit's numpy ggml kernels and its GPTQ sweep, next to llama.cpp's C quantizer?

On SmolLM2-135M's matrix shapes (576x1536 ffn_up/gate, 1536x576 ffn_down, 576x576 attn_q/o, 192x576
attn_k/v), best of ``--reps`` wall times (the numpy kernels' elementwise work runs on one thread; GPTQ's
matrix products use torch's threads):

1. ``ggml.quantize`` (round to nearest, no importance matrix) per type, against llama.cpp's
   ``ggml_quantize_chunk`` on the same rows, called in-process from llama-cpp-python's libggml-base
   (one thread; skipped without llama-cpp-python). Target: Q4_K of 576x1536 under 1 s (the bound the
   kernel tests used to assert; it moved here because a loaded test machine cannot keep it).
2. ``gptq`` with ``imatrix = diag(H)`` (as the converter calls it) per type.

    .venv/bin/python bench/kernels.py               # writes bench/results/kernels.{json,txt}
    .venv/bin/python bench/kernels.py --reps 1 --no-gptq --out /tmp/kernels   # a quick check elsewhere
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

RESULTS = Path(__file__).with_name("results")
SHAPES = [(576, 1536), (1536, 576), (576, 576), (192, 576)]
TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL]
GPTQ_TYPES = [T.Q4_0, T.Q8_0, T.Q4_K, T.Q6_K]
TARGET = ("Q4_K", (576, 1536), 1.0)


def best_of(reps: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def c_quantizer() -> Callable[[np.ndarray, T], np.ndarray] | None:
    """llama.cpp's ggml_quantize_chunk (the per-tensor call inside llama_model_quantize), or None."""
    try:
        import llama_cpp
    except Exception:  # noqa: BLE001 - not installed, or its library does not load
        return None
    path = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    if not path.exists():
        return None
    fn = ctypes.CDLL(str(path)).ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]

    def run(x: np.ndarray, qtype: T) -> np.ndarray:
        bs, ts = GGML_QUANT_SIZES[qtype]
        out = np.empty((x.shape[0], x.shape[1] // bs * ts), dtype=np.uint8)
        fn(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        return out

    return run


def kernel_rows(reps: int) -> list[dict]:
    from edgekit.converters.quantize import ggml

    c = c_quantizer()
    rows = []
    for shape in SHAPES:
        x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
        for qt in TYPES:
            if shape[1] % GGML_QUANT_SIZES[qt][0]:
                continue
            ours = best_of(reps, lambda: ggml.quantize(x, qt))  # noqa: B023 - called at once
            theirs = best_of(reps, lambda: c(x, qt)) if c else None  # noqa: B023
            same = bool(np.array_equal(ggml.quantize(x, qt), c(x, qt))) if c else None
            rows.append({"shape": list(shape), "type": qt.name, "edgekit_s": ours, "llamacpp_s": theirs,
                         "ratio": ours / theirs if theirs else None, "bytes_identical": same})
            print(f"quantize {shape[0]}x{shape[1]} {qt.name}: {ours:.3f}s", file=sys.stderr)
    return rows


def gptq_rows(reps: int) -> list[dict]:
    from edgekit.converters.quantize.gptq_kernel import gptq

    rows = []
    for shape in SHAPES:
        rng = np.random.default_rng(6)
        X = rng.standard_normal((1024, shape[1])).astype(np.float32)
        H = (X.T @ X).astype(np.float64)
        W = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        for qt in GPTQ_TYPES:
            if shape[1] % GGML_QUANT_SIZES[qt][0]:
                continue
            secs = best_of(reps, lambda: gptq(W, H, qt, imatrix=np.diag(H)))  # noqa: B023 - called at once
            rows.append({"shape": list(shape), "type": qt.name, "gptq_s": secs})
            print(f"gptq {shape[0]}x{shape[1]} {qt.name}: {secs:.2f}s", file=sys.stderr)
    return rows


def _table(kernels: list[dict], sweeps: list[dict], reps: int) -> str:
    from edgekit.runtime import hostinfo

    host = hostinfo.host_fingerprint()
    lines = [f"host: {host['cpu']}, {host['cores']} cores; numpy {np.__version__}; best of {reps}", "",
             "1. round to nearest: edgekit's numpy kernels vs llama.cpp's ggml_quantize_chunk (1 thread)",
             f"{'shape':<10}{'type':<8}{'edgekit s':>10}{'llama.cpp s':>12}{'ratio':>8}{'bytes':>11}"]
    for r in kernels:
        c = "n/a" if r["llamacpp_s"] is None else f"{r['llamacpp_s']:.4f}"
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.1f}x"
        same = {True: "identical", False: "DIFFER", None: "n/a"}[r["bytes_identical"]]
        lines.append(f"{'x'.join(map(str, r['shape'])):<10}{r['type']:<8}{r['edgekit_s']:>10.4f}{c:>12}"
                     f"{ratio:>8}{same:>11}")
    name, shape, limit = TARGET
    hit = next(r for r in kernels if r["type"] == name and tuple(r["shape"]) == shape)
    verdict = "holds" if hit["edgekit_s"] < limit else "MISSED"
    lines += ["", f"target: {name} of {shape[0]}x{shape[1]} under {limit:.0f} s: {hit['edgekit_s']:.3f} s, {verdict}"]
    if sweeps:
        lines += ["", "2. GPTQ (imatrix = diag(H), 128-column lazy batches)",
                  f"{'shape':<10}{'type':<8}{'gptq s':>10}"]
        lines += [f"{'x'.join(map(str, r['shape'])):<10}{r['type']:<8}{r['gptq_s']:>10.2f}" for r in sweeps]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-gptq", action="store_true", help="the round-to-nearest kernels only")
    ap.add_argument("--out", type=Path, default=RESULTS / "kernels",
                    help="writes OUT.json and OUT.txt (default: bench/results/kernels)")
    args = ap.parse_args()
    kernels = kernel_rows(args.reps)
    sweeps = [] if args.no_gptq else gptq_rows(args.reps)
    text = _table(kernels, sweeps, args.reps)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".txt").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(
        {"reps": args.reps, "machine": platform.machine(), "numpy": np.__version__, "quantize": kernels,
         "gptq": sweeps, "target": {"type": TARGET[0], "shape": list(TARGET[1]), "max_s": TARGET[2]}},
        indent=1) + "\n")
    print(f"wrote {args.out.with_suffix('.json')}, .txt")


if __name__ == "__main__":
    main()
