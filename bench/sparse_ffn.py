"""Hot/cold sparse FFN (``convert --sparse-ffn``) against the dense GGUF of the same quantization, in stock
llama.cpp, in one run.

  * exactness: the sparse file with every cluster selected (``expert_used_count`` overridden to the cluster
    count) against the dense file: logits on WikiText-2 chunks;
  * the sparsity/quality/speed curve: for each number of clusters run per token, perplexity (llama-perplexity's
    protocol) and decode tokens/s (llama-bench's tg test inside the worker), dense and sparse measured
    interleaved round by round (the machine is shared: only ratios within a round are compared);
  * placement: what ``plan`` does with both files under ``--vram`` (hot parts on the GPU, cold clusters on
    the CPU via -ot); measured only when this llama.cpp build has a GPU.

    python bench/sparse_ffn.py                                  # SmolLM2-135M-Instruct, Q4_0, S=0.5
    python bench/sparse_ffn.py --model ./big-model --vram 2GiB --threads 8      # on a GPU machine
    python bench/sparse_ffn.py --out /tmp/sparse_ffn            # anywhere else than bench/results/sparse_ffn.*
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
WIKI = Path("/work/shared/data/wikitext-2/valid.txt")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path.home() / ".cache/edgekit/SmolLM2-135M-Instruct")
    p.add_argument("--type", default="Q4_0", help="Quantization of both files (a GGUF preset).")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--text", type=Path, default=WIKI if WIKI.exists() else None)
    p.add_argument("--chunks", type=int, default=8, help="512-token chunks for perplexity.")
    p.add_argument("--exact-chunks", type=int, default=2)
    p.add_argument("--used", default="16,12,8,6,4,3,2,1", help="Clusters run per token on the curve.")
    p.add_argument("--speed-used", default="16,4,2", help="Clusters run per token timed against dense.")
    p.add_argument("--gen", type=int, default=64, help="Tokens per decode timing.")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vram", default="0", help="GPU budget for the placement comparison, e.g. 2GiB.")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache/edgekit/bench-sparse-ffn")
    p.add_argument("--name", default="sparse_ffn", help="bench/results/NAME.{txt,json,png} (without --out).")
    p.add_argument("--out", type=Path, default=None,
                   help="Writes OUT.txt, OUT.json and OUT.png (default: bench/results/NAME).")
    args = p.parse_args()
    if args.out is None:
        args.out = RESULTS / args.name
    return args


def build(args: argparse.Namespace) -> tuple[object, object, float]:
    from edgekit import api

    args.work.mkdir(parents=True, exist_ok=True)
    tag = f"{args.model.name}-{args.type.lower()}"
    dense_dir = args.work / f"{tag}-dense"
    sparse_dir = args.work / f"{tag}-sparse{args.sparsity:g}-e{args.clusters}"
    t0 = time.perf_counter()
    if not (dense_dir / "edgekit.json").exists():
        api.convert(args.model, "gguf", output=dense_dir, recipe=api.ConvertRecipe(preset=args.type), force=True)
    convert_s = 0.0
    if not (sparse_dir / "edgekit.json").exists():
        t1 = time.perf_counter()
        api.convert(args.model, "gguf", output=sparse_dir, force=True, recipe=api.ConvertRecipe(
            preset=args.type, extra={"sparse_ffn": str(args.sparsity), "sparse_clusters": str(args.clusters)}))
        convert_s = time.perf_counter() - t1
    print(f"artifacts ready in {time.perf_counter() - t0:.0f} s", flush=True)
    return api.Artifact.open(dense_dir), api.Artifact.open(sparse_dir), convert_s


def build_float(args: argparse.Namespace) -> tuple[object, object]:
    """Dense and sparse files in F16 (an element-wise type: the neuron permutation regroups no block), the
    sparse one split on a small calibration set: with every cluster selected any split is the dense FFN,
    so this isolates the layout's exactness from the quantization blocks of the timed files."""
    from edgekit import api

    tag = f"{args.model.name}-f16"
    dense_dir, sparse_dir = args.work / f"{tag}-dense", args.work / f"{tag}-sparse-e{args.clusters}-exact"
    if not (dense_dir / "edgekit.json").exists():
        api.convert(args.model, "gguf", output=dense_dir, recipe=api.ConvertRecipe(preset="F16"), force=True)
    if not (sparse_dir / "edgekit.json").exists():
        api.convert(args.model, "gguf", output=sparse_dir, force=True, recipe=api.ConvertRecipe(
            preset="F16", calib=api.CalibConfig(samples=2, seqlen=128),
            extra={"sparse_ffn": str(args.sparsity), "sparse_clusters": str(args.clusters)}))
    return api.Artifact.open(dense_dir), api.Artifact.open(sparse_dir)


def backend(path: Path, threads: int, used: int | None = None, **opts: object) -> object:
    from edgekit.runtime.llamacpp import LlamaCppBackend
    from edgekit.runtime.llamacpp_decoding import experts_options

    if used is not None:  # as run/eval/profile --experts
        opts.update(experts_options(path, used))
    return LlamaCppBackend(path, n_ctx=1024, n_threads=threads, **opts)


def exactness(dense: object, sparse: object, E: int, text: str, args: argparse.Namespace) -> dict:
    from edgekit.evaluate import EvalConfig, chunk_tokens, log_softmax

    d = backend(dense.model_file, args.threads)
    s = backend(sparse.model_file, args.threads, used=E)
    try:
        chunks = chunk_tokens(d.tokenize(text), EvalConfig(ctx=512, chunks=args.exact_chunks))
        diffs, scale, agree, kls = [], [], [], []
        for c in chunks:
            a, b = d.logits(c), s.logits(c)
            diffs.append(np.abs(a - b).max())
            scale.append(np.abs(a).max())
            agree.append((a.argmax(-1) == b.argmax(-1)).mean())
            la, lb = log_softmax(a), log_softmax(b)
            kls.append((np.exp(la) * (la - lb)).sum(-1).mean())
    finally:
        d.close()
        s.close()
    return {"max_abs_logit_diff": float(max(diffs)), "max_abs_logit": float(max(scale)),
            "relative": float(max(diffs) / max(scale)), "top1_agreement": float(np.mean(agree)),
            "kl_mean": float(np.mean(kls)), "tokens": 512 * len(chunks)}


def quality(dense: object, sparse: object, used: list[int], text: str, args: argparse.Namespace) -> dict:
    from edgekit.evaluate import EvalConfig, perplexity

    cfg = EvalConfig(ctx=512, chunks=args.chunks)
    out = {}
    b = backend(dense.model_file, args.threads)
    try:
        out["dense"] = perplexity(b, text, cfg).ppl
    finally:
        b.close()
    for k in used:
        b = backend(sparse.model_file, args.threads, used=k)
        try:
            out[k] = perplexity(b, text, cfg).ppl
        finally:
            b.close()
        print(f"  k={k}: ppl {out[k]:.3f} (dense {out['dense']:.3f})", flush=True)
    return out


def speed(dense: object, sparse: object, used: list[int], args: argparse.Namespace) -> dict:
    """Decode tok/s, dense and each sparse setting interleaved within every round; per-round ratios."""
    names = ["dense", *used]
    loaded = {"dense": backend(dense.model_file, args.threads)}
    for k in used:
        loaded[k] = backend(sparse.model_file, args.threads, used=k)
    tps: dict = {n: [] for n in names}
    try:
        for n in names:  # warm-up
            loaded[n].bench(0, 8, reps=1, warmup=True)
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for n in order:
                rep = loaded[n].bench(0, args.gen, reps=1, warmup=False)["reps"][0]
                tps[n].append(args.gen / rep["seconds"])
            print(f"  round {r + 1}: " + ", ".join(f"{n}={tps[n][-1]:.1f}" for n in names), flush=True)
    finally:
        for b in loaded.values():
            b.close()
    ratios = {k: [s / d for s, d in zip(tps[k], tps["dense"], strict=True)] for k in used}
    return {"tps": {str(n): v for n, v in tps.items()},
            "median_tps": {str(n): float(np.median(v)) for n, v in tps.items()},
            "speedup_median": {str(k): float(np.median(v)) for k, v in ratios.items()}}


def placement(dense: object, sparse: object, args: argparse.Namespace) -> dict:
    from edgekit.runtime import hostinfo
    from edgekit.runtime.memory import read_shape
    from edgekit.runtime.plan import Bandwidths, Budget, parse_size, plan_offload

    vram = parse_size(args.vram)
    gpus = hostinfo.gpu_devices(strict=False)
    out = {"vram_bytes": vram, "gpu": [g.get("name") for g in gpus] or None}
    if not vram:
        return {**out, "note": "no --vram budget given"}
    bws = Bandwidths(cpu_Bps=hostinfo.memory_bandwidth())
    for name, art in (("dense", dense), ("sparse", sparse)):
        plan = plan_offload(read_shape(art.model_file), Budget(64 << 30, vram), 2048, bws)
        out[name] = {"reason": plan.reason, "n_gpu_layers": plan.n_gpu_layers,
                     "tensor_overrides": plan.tensor_overrides, "predicted_tps": plan.predicted_tps}
    best_ngl = max((c for c in out_plans(dense, vram, bws) if c["fits"] and c["label"].startswith("-ngl ")
                    and "CPU" not in c["label"]), key=lambda c: c["predicted_tps"], default=None)
    out["dense_best_ngl"] = best_ngl
    if not gpus:
        out["measured"] = "not measured: this llama.cpp build sees no GPU"
        return out
    # Hot on the GPU / cold on the CPU (the sparse file's plan) against dense's best -ngl layer split.
    ngl = int(best_ngl["label"].split()[1]) if best_ngl else 0
    runs = {"dense_ngl": (dense, {"n_gpu_layers": ngl, "offload_kqv": "--no-kv-offload" not in (best_ngl or {}).get(
        "label", "")}), "sparse_plan": (sparse, {k: v for k, v in plan_options(sparse, vram, bws).items()
                                                 if k != "n_ctx"})}
    tps: dict = {n: [] for n in runs}
    loaded = {n: backend(a.model_file, args.threads, **o) for n, (a, o) in runs.items()}
    try:
        for r in range(args.rounds):
            for n in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                rep = loaded[n].bench(0, args.gen, reps=1, warmup=r == 0)["reps"][0]
                tps[n].append(args.gen / rep["seconds"])
    finally:
        for b in loaded.values():
            b.close()
    out["measured_tps"] = {n: float(np.median(v)) for n, v in tps.items()}
    out["gpu_speedup"] = out["measured_tps"]["sparse_plan"] / out["measured_tps"]["dense_ngl"]
    return out


def out_plans(art: object, vram: int, bws: object) -> list[dict]:
    from edgekit.runtime.memory import read_shape
    from edgekit.runtime.plan import Budget, plan_offload

    return plan_offload(read_shape(art.model_file), Budget(64 << 30, vram), 2048, bws).candidates


def plan_options(art: object, vram: int, bws: object) -> dict:
    from edgekit.runtime.memory import read_shape
    from edgekit.runtime.plan import Budget, plan_offload

    return plan_offload(read_shape(art.model_file), Budget(64 << 30, vram), 2048, bws).backend_options()


def plot(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [c["sparsity"] for c in curve]
    ax.plot(xs, [100 * c["ppl_increase"] for c in curve], "o-", label="perplexity increase (%)")
    ax.axhline(5, ls=":", c="grey")
    ax.set(xlabel="FFN activation sparsity (share of neurons skipped)", ylabel="perplexity over dense (%)")
    sp = [(c["sparsity"], c["speedup"]) for c in curve if c.get("speedup")]
    if sp:
        ax2 = ax.twinx()
        ax2.plot(*zip(*sp, strict=True), "s--", c="tab:red", label="decode speed-up (x)")
        ax2.axhline(1.25, ls=":", c="tab:red")
        ax2.set_ylabel("decode tok/s over dense (x)")
    ax.set_title("hot/cold sparse FFN in stock llama.cpp")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    args = parse()
    t0 = time.perf_counter()
    from edgekit.evaluate import read_text

    text = read_text(args.text) if args.text else read_text(Path(__file__).parents[1] / "edgekit/data/sample.txt")
    dense, sparse, convert_s = build(args)
    info = sparse.manifest["sparse_ffn"]
    E, n_ff = info["clusters"], info["hot"] + info["clusters"] * info["cluster_size"]
    used = [int(u) for u in args.used.split(",") if int(u) <= E]
    speed_used = [int(u) for u in args.speed_used.split(",") if int(u) <= E]
    print("exactness (all clusters selected vs dense)...", flush=True)
    exact = exactness(dense, sparse, E, text, args)
    print(f"  {args.type}: {exact}", flush=True)
    exact_f16 = exactness(*build_float(args), E, text, args)
    print(f"  F16: {exact_f16}", flush=True)
    print("speed (interleaved)...", flush=True)
    spd = speed(dense, sparse, speed_used, args)
    print("quality...", flush=True)
    q = quality(dense, sparse, used, text, args)
    place = placement(dense, sparse, args)
    curve = []
    for k in used:
        sparsity = 1 - (info["hot"] + k * info["cluster_size"]) / n_ff
        curve.append({"used": k, "sparsity": round(sparsity, 4), "ppl": q[k], "ppl_increase": q[k] / q["dense"] - 1,
                      "speedup": spd["speedup_median"].get(str(k)), "tps": spd["median_tps"].get(str(k))})
    target = next((c for c in curve if c["used"] == info["used"]), None)
    holds = bool(target and target["speedup"] and target["speedup"] >= 1.25 and target["ppl_increase"] <= 0.05)
    lines = [
        f"sparse FFN bench: {args.model.name}, {args.type} both files, --sparse-ffn {args.sparsity} "
        f"({info['hot']} hot neurons + {E} clusters of {info['cluster_size']}, {info['used']} run per token), "
        f"llama.cpp threads={args.threads}, shared 2-core machine",
        f"files: dense {dense.manifest['size_bytes'] / 1e6:.1f} MB, sparse {sparse.manifest['size_bytes'] / 1e6:.1f} MB "
        f"(untied output head: qwen2moe needs its own); sparse convert {convert_s:.0f} s (calibration, clustering, "
        f"routers)",
        f"router recall of each token's true top-{info['used']} clusters (held-out calibration tokens, mean of layers): "
        f"{info['recall_mean']:.3f}; static best-{info['used']} clusters: {info['static_recall_mean']:.3f}",
        *[f"exactness, all {E} clusters selected vs dense, {name}: max |dlogit| {e['max_abs_logit_diff']:.2e} of max "
          f"|logit| {e['max_abs_logit']:.1f} (relative {e['relative']:.1e}), top-1 agreement {e['top1_agreement']:.4f}, "
          f"KL {e['kl_mean']:.2e}, {e['tokens']} tokens" for name, e in (("F16", exact_f16), (args.type, exact))],
        f"  ({args.type}'s blocks of 32 neurons in ffn_down are regrouped by the permutation, so its sparse file is a "
        "different quantization of the same weights; F16 is element-wise)",
        "",
        f"{'used':>4} {'sparsity':>8} {'ppl':>9} {'ppl +%':>7} {'tok/s':>7} {'x dense':>8}",
        f"{'dense':>4} {0:>8.3f} {q['dense']:>9.3f} {0:>+7.1f} {spd['median_tps']['dense']:>7.1f} {1:>8.2f}",
    ]
    for c in curve:
        sp = f"{c['tps']:>7.1f} {c['speedup']:>8.2f}" if c["speedup"] else f"{'':>7} {'':>8}"
        lines.append(f"{c['used']:>4} {c['sparsity']:>8.3f} {c['ppl']:>9.3f} {100 * c['ppl_increase']:>+7.1f} {sp}")
    lines += ["", f"target (>= 1.25x decode at <= +5% perplexity, at --sparse-ffn {args.sparsity}): "
              + ("HOLDS" if holds else "MISSED"),
              f"placement at --vram {args.vram}: " + json.dumps(place), f"total {time.perf_counter() - t0:.0f} s"]
    text_out = "\n".join(lines)
    print(text_out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".txt").write_text(text_out + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(
        {"model": str(args.model), "type": args.type, "sparse_ffn": info, "exactness": exact, "exactness_f16": exact_f16, "speed": spd,
         "ppl": {str(k): v for k, v in q.items()}, "curve": curve, "placement": place, "target_holds": holds,
         "threads": args.threads, "seconds": time.perf_counter() - t0}, indent=1))
    plot(curve, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.txt')}, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
