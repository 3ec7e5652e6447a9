"""Does edgekit's profiler add overhead, and does its memory model predict peak RSS?

1. Overhead: the same tests (pp N, tg N) measured by ``edgekit.runtime.profile`` and by a bare
   llama-cpp-python loop (low-level ``llama_decode`` on ``llama_batch_get_one``, as llama-bench does,
   in its own process), interleaved round by round in one run, alternating which goes first.
   Target: edgekit's median tokens/s within 3% of the bare loop's.
2. Memory model: predicted peak RSS (``estimate_memory`` + this host's cached baseline) against the
   measured peak RSS of the llama.cpp worker filling the context (pp512 at depth ctx-512), for the real
   SmolLM2-135M-Instruct in Q8_0, Q4_K_M, Q4_0 and Q4_1 at ctx 512 and 4096. Target: within 10%.

    .venv/bin/python bench/profile_overhead.py            # writes bench/results/profile_overhead.{json,txt}
    .venv/bin/python bench/profile_overhead.py --rounds 3 --quick --out /tmp/profile_overhead
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("results")


def bare_loop(model: str, n_prompt: int, n_gen: int, reps: int, threads: int, n_ctx: int) -> list[float]:
    """llama-bench's loop written directly on llama-cpp-python, nothing of edgekit: seconds per rep."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    ctx, n_vocab = llm.ctx, llm.n_vocab()
    rng = random.Random(0)
    buf = (llama_cpp.llama_token * 512)()
    mem = llama_cpp.llama_get_memory(ctx)

    def run(n_p: int, n_g: int) -> float:
        llama_cpp.llama_memory_clear(mem, True)
        toks = [rng.randrange(n_vocab) for _ in range(n_p)]
        t0 = time.perf_counter()
        for i in range(0, n_p, 512):
            chunk = toks[i : i + 512]
            buf[: len(chunk)] = chunk
            llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(buf, len(chunk)))
        llama_cpp.llama_synchronize(ctx)
        for _ in range(n_g):
            buf[0] = rng.randrange(n_vocab)
            llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(buf, 1))
            llama_cpp.llama_synchronize(ctx)
        return time.perf_counter() - t0

    run(min(32, n_prompt), 0) if n_prompt else run(0, 1)  # warm-up, as edgekit's
    return [run(n_prompt, n_gen) for _ in range(reps)]


def _bare(model: str, n_prompt: int, n_gen: int, reps: int, threads: int, n_ctx: int) -> list[float]:
    cmd = [sys.executable, __file__, "--bare", model, str(n_prompt), str(n_gen), str(reps), str(threads), str(n_ctx)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def overhead(model: Path, rounds: int, reps: int, threads: int) -> list[dict]:
    from edgekit.runtime.profile import ProfileConfig, TestSpec, profile

    tests = [TestSpec(n_prompt=128), TestSpec(n_gen=32)]
    n_ctx = 256
    samples: dict[str, dict[str, list[float]]] = {t.name: {"edgekit": [], "bare": []} for t in tests}
    for r in range(rounds):
        order = ["edgekit", "bare"] if r % 2 == 0 else ["bare", "edgekit"]
        for who in order:
            for t in tests:
                if who == "edgekit":
                    run = profile([model], ProfileConfig(tests=(t,), reps=reps, threads=(threads,), ctx=(n_ctx,),
                                                         energy=False, roofline=False))
                    secs = run.rows[0].samples_s
                else:
                    secs = _bare(str(model), t.n_prompt, t.n_gen, reps, threads, n_ctx)
                samples[t.name][who] += [t.n_tokens / s for s in secs]
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    out = []
    for name, d in samples.items():
        e, b = statistics.median(d["edgekit"]), statistics.median(d["bare"])
        out.append({"test": name, "edgekit_tps_median": e, "bare_tps_median": b, "ratio": e / b,
                    "edgekit_samples": d["edgekit"], "bare_samples": d["bare"]})
    return out


def memory_check(models: dict[str, Path], ctxs: list[int], threads: int) -> list[dict]:
    from edgekit.runtime import hostinfo
    from edgekit.runtime.memory import MemoryConfig, estimate_memory, read_shape
    from edgekit.runtime.profile import ProfileConfig, TestSpec, profile

    baseline = hostinfo.baseline_rss()
    out = []
    for name, path in models.items():
        shape = read_shape(path)
        for c in ctxs:
            test = TestSpec(n_prompt=512, n_depth=c - 512)
            run = profile([path], ProfileConfig(tests=(test,), reps=1, warmup=False, threads=(threads,), ctx=(c,),
                                                energy=False, roofline=False))
            measured = run.rows[0].peak_rss_bytes
            est = estimate_memory(shape, MemoryConfig(n_ctx=c), baseline_bytes=baseline)
            out.append({"type": name, "ctx": c, "measured_peak_rss": measured, "predicted": est.ram_bytes,
                        "error": est.ram_bytes / measured - 1, "parts": est.parts})
            print(f"{name} ctx {c}: measured {measured / 1e6:.1f} MB, predicted {est.ram_bytes / 1e6:.1f} MB",
                  file=sys.stderr)
    return out


def _models(quick: bool) -> dict[str, Path]:
    from edgekit import api
    from edgekit.fsutil import edgekit_home
    from edgekit.quickstart import fetch_default_gguf

    q41 = fetch_default_gguf()
    hf = edgekit_home() / "SmolLM2-135M-Instruct"
    if not (hf / "config.json").exists():
        api.import_gguf(q41, hf, force=True)
    models = {"Q4_1": q41}
    for t in (["Q4_0"] if quick else ["Q8_0", "Q4_K_M", "Q4_0"]):
        out = edgekit_home() / "bench" / f"smol-{t}"
        if not (out / "edgekit.json").exists():
            api.convert(hf, "gguf", output=out, recipe=api.ConvertRecipe(bits=None, preset=t), force=True)
        models[t] = out / "model.gguf"
    return models


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--bare":
        m, n_p, n_g, reps, threads, n_ctx = sys.argv[2], *map(int, sys.argv[3:8])
        print(json.dumps(bare_loop(m, n_p, n_g, reps, threads, n_ctx)))
        return
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="one converted type only")
    ap.add_argument("--out", type=Path, default=RESULTS / "profile_overhead",
                    help="writes OUT.json and OUT.txt (default: bench/results/profile_overhead)")
    args = ap.parse_args()
    from edgekit.runtime import hostinfo

    models = _models(args.quick)
    over = overhead(models["Q4_1"], args.rounds, args.reps, args.threads)
    mem = memory_check(models, [512, 4096], args.threads)
    host = hostinfo.host_fingerprint()
    lines = [f"host: {host['cpu']}, {host['cores']} cores, {host['ram_bytes'] / 2**30:.0f} GiB, GPUs: "
             f"{host['gpus'] or 'none'}; llama-cpp-python {host['llama_cpp_python']}; threads {args.threads}",
             "", f"1. profiler overhead (SmolLM2-135M Q4_1, {args.rounds} interleaved rounds x {args.reps} reps, "
             "median tokens/s; target ratio within 3%)",
             f"{'test':<8}{'edgekit':>10}{'bare loop':>11}{'ratio':>8}"]
    for o in over:
        lines.append(f"{o['test']:<8}{o['edgekit_tps_median']:>10.1f}{o['bare_tps_median']:>11.1f}{o['ratio']:>8.3f}")
    lines += ["", "2. memory model: predicted vs measured peak RSS of the worker filling the context "
              "(pp512 at depth ctx-512; target within 10%)",
              f"{'type':<8}{'ctx':>6}{'measured MB':>13}{'predicted MB':>14}{'error':>8}"]
    for m in mem:
        lines.append(f"{m['type']:<8}{m['ctx']:>6}{m['measured_peak_rss'] / 1e6:>13.1f}{m['predicted'] / 1e6:>14.1f}"
                     f"{100 * m['error']:>+7.1f}%")
    lines += ["", "No GPU on this host: the --offload auto target (>= 90% of the best -ngl sweep) was not measured."]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".txt").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(
        {"host": host, "threads": args.threads, "overhead": over, "memory": mem,
         "baseline_rss": hostinfo.baseline_rss()}, indent=1) + "\n")
    print(f"wrote {args.out.with_suffix('.json')}, .txt")


if __name__ == "__main__":
    main()
