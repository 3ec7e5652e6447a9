"""Hot on the GPU, cold on the CPU: the sparse-FFN artifact (``convert --sparse-ffn``) placed by edgekit's planner
against llama.cpp's best ``-ngl`` layer split of the dense artifact, under one VRAM budget, timed with llama-bench
built for CUDA.

The artifacts are larger than what travels to a lent GPU machine, so this runs in two steps:

  prepare (where the model is): converts it to both artifacts with edgekit's converter and writes each file's
      skeleton: its header bytes (metadata and tensor table, as written) and, per tensor, its first rows (the
      whole tensor when it is small);
  run (on the GPU machine): rebuilds each file at its full size (every tensor's stored rows repeated to its row
      count: the same tensor names, types, shapes and metadata, so llama.cpp does the same work), plans both with
      edgekit's planner under ``--vram``, and times with llama-bench (decode, tg): the dense file at every
      ``-ngl`` layer split that fits the budget (the best measured one is llama.cpp's best), and the sparse file
      at its plan (``-ot`` on the expert tensors) and at the other placements that fit.

    python bench/sparse_ffn_gpu.py prepare --model ~/.cache/edgekit/SmolLM2-135M-Instruct --out .gpu/skel/smollm2
    python bench/sparse_ffn_gpu.py prepare --model synthetic:hidden=2048,ffn=5632,layers=22,heads=32,kv=4 \\
        --calib-samples 2 --out .gpu/skel/tinyllama
    python bench/sparse_ffn_gpu.py run --skeletons .gpu/skel --vram tinyllama=720MiB,smollm2=160MiB \\
        --llama-bench /path/llama-bench --out $OUT

Decode speed does not depend on the weights' values (dense kernels; the router's choice picks which k experts
run, not how many), so repeated rows time like the real file; quality is measured by bench/sparse_ffn.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WHOLE_BYTES = 8 << 10  # tensors up to this size are stored whole (norms, small vectors)
TILE_BYTES = 4 << 10  # otherwise at least one row and about this many bytes of leading rows
KEEP_WHOLE = ("ffn_gate_inp.weight",)  # the routers, stored whole: which clusters run varies token by token


# -- skeleton ---------------------------------------------------------------------------------------------------

def skeleton(gguf_path: Path, out: Path) -> dict:
    """Write ``out``.header (the file's bytes before its data section), ``out``.tiles (each tensor's stored rows,
    concatenated) and ``out``.json (the tensor table: offset, size, row size and stored bytes of each)."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    data_start = int(reader.data_offset)
    raw = np.memmap(gguf_path, dtype=np.uint8, mode="r")
    tensors, tiles, at = [], [], 0
    for t in reader.tensors:
        n_bytes, ne0 = int(t.n_bytes), int(t.shape[0])
        rows = int(t.n_elements) // ne0
        row_bytes = n_bytes // rows
        if row_bytes * rows != n_bytes:
            raise ValueError(f"{t.name}: {n_bytes} bytes is not {rows} rows")
        whole = n_bytes <= WHOLE_BYTES or t.name.endswith(KEEP_WHOLE)
        keep = n_bytes if whole else row_bytes * max(1, TILE_BYTES // row_bytes)
        start = int(t.data_offset)
        tiles.append(np.asarray(raw[start:start + keep]))
        tensors.append({"name": t.name, "type": t.tensor_type.name, "offset": start - data_start,
                        "n_bytes": n_bytes, "row_bytes": row_bytes, "stored": keep, "at": at})
        at += keep
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".header").write_bytes(bytes(raw[:data_start]))
    with open(out.with_suffix(".tiles"), "wb") as f:
        for tile in tiles:
            f.write(tile.tobytes())
    end = max(t["offset"] + t["n_bytes"] for t in tensors)
    info = {"source": gguf_path.name, "file_bytes": gguf_path.stat().st_size, "data_start": data_start,
            "data_bytes": end, "tensors": tensors}
    out.with_suffix(".json").write_text(json.dumps(info))
    return info


def fill(skel: Path, dest: Path) -> Path:
    """Rebuild the full-size GGUF of skeleton ``skel`` (path without suffix) at ``dest``."""
    info = json.loads(skel.with_suffix(".json").read_text())
    header = skel.with_suffix(".header").read_bytes()
    tiles = np.fromfile(skel.with_suffix(".tiles"), dtype=np.uint8)
    tmp = dest.with_suffix(".part")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for t in info["tensors"]:
                tile = tiles[t["at"]:t["at"] + t["stored"]]
                f.seek(info["data_start"] + t["offset"])
                if t["stored"] == t["n_bytes"]:
                    f.write(tile.tobytes())
                    continue
                reps = -(-t["n_bytes"] // t["stored"])
                f.write(np.tile(tile, reps)[:t["n_bytes"]].tobytes())
            f.truncate(max(info["file_bytes"], info["data_start"] + info["data_bytes"]))
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)  # a failed or interrupted rebuild leaves nothing behind
    return dest


def synthetic_model(spec: str, dest: Path, tokenizer_from: Path) -> Path:
    """A Llama checkpoint of the shape ``spec`` ("hidden=2048,ffn=5632,layers=22,heads=32,kv=4") with random
    weights and the tokenizer of ``tokenizer_from``: a model of a size the real one is not, to time placements."""
    import shutil

    import torch
    import transformers

    if (dest / "model.safetensors").exists():
        return dest
    kw = {k: int(v) for k, v in (x.split("=") for x in spec.split(","))}
    dest.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(f, dest / f.name)
    src_cfg = json.loads((tokenizer_from / "config.json").read_text())
    cfg = transformers.LlamaConfig(
        vocab_size=src_cfg["vocab_size"], hidden_size=kw["hidden"], intermediate_size=kw["ffn"],
        num_hidden_layers=kw["layers"], num_attention_heads=kw["heads"], num_key_value_heads=kw["kv"],
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=src_cfg.get("bos_token_id"), eos_token_id=src_cfg.get("eos_token_id"))
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for prm in model.parameters():
            prm.copy_(torch.ones_like(prm) if prm.ndim == 1 else torch.randn_like(prm) * 0.02)
    model.save_pretrained(dest, safe_serialization=True)
    return dest


def prepare(args: argparse.Namespace) -> int:
    """Convert MODEL to the dense and the sparse artifact (edgekit's converter) and write both skeletons."""
    from edgekit import api

    model = args.model
    if str(model).startswith("synthetic:"):
        sys.path.insert(0, str(Path(__file__).parent))
        from common import get_model

        model = synthetic_model(str(model).split(":", 1)[1], args.work / f"{args.out.name}-hf", get_model())
    calib = api.CalibConfig(samples=args.calib_samples, seqlen=args.calib_seqlen) if args.calib_samples else None
    arts = {}
    for kind in ("dense", "sparse"):
        d = args.work / f"{args.out.name}-{args.type.lower()}-{kind}"
        if not (d / "edgekit.json").exists():
            t0 = time.perf_counter()
            extra = {"sparse_ffn": str(args.sparsity), "sparse_clusters": str(args.clusters)} if kind == "sparse" else {}
            recipe = api.ConvertRecipe(preset=args.type, extra=extra, **({"calib": calib} if calib else {}))
            api.convert(model, "gguf", output=d, recipe=recipe, force=True)
            print(f"{kind}: converted in {time.perf_counter() - t0:.0f} s", flush=True)
        arts[kind] = api.Artifact.open(d)
    for kind, art in arts.items():
        info = skeleton(art.model_file, Path(f"{args.out}-{kind}"))
        stored = sum(t["stored"] for t in info["tensors"])
        print(f"{kind}: {art.model_file} ({info['file_bytes'] / 1e6:.1f} MB) -> {args.out}-{kind}.* "
              f"({stored / 1e6:.1f} MB of rows)")
    (Path(f"{args.out}-sparse_ffn.json")).write_text(json.dumps(arts["sparse"].manifest.get("sparse_ffn", {})))
    return 0


# -- run ---------------------------------------------------------------------------------------------------------

def gpu_bandwidth() -> float | None:
    """Device-to-device copy bandwidth (bytes read + written per second), or None without torch/CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    bps = 2 * 10 * a.numel() / (time.perf_counter() - t0)
    del a, b
    torch.cuda.empty_cache()
    return bps


_BUF_RE = re.compile(r"(CUDA\d+|CPU)\w*\s+(model|KV|compute)\s+buffer size\s*=\s*([\d.]+)\s*MiB")


def llama_bench(exe: str, model: Path, *, ngl: int, kqv: bool, overrides: list, threads: int, gen: int,
                reps: int, env: dict) -> dict:
    cmd = [exe, "-m", str(model), "-ngl", str(ngl), "-nkvo", "0" if kqv else "1", "-t", str(threads),
           "-p", "0", "-n", str(gen), "-r", str(reps), "-o", "json", "-v"]
    if overrides:
        cmd += ["-ot", ";".join(f"{p}={b}" for p, b in overrides)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 180 s", "rc": None, "cmd": cmd}
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:300], "rc": p.returncode, "cmd": cmd}
    rows = json.loads(p.stdout)
    r = rows[-1]
    bufs: dict = {}
    for dev, kind, mib in _BUF_RE.findall(p.stderr):
        key = f"{'gpu' if dev.startswith('CUDA') else 'cpu'}_{kind}_MiB"
        bufs[key] = max(bufs.get(key, 0.0), float(mib))  # each context logs its buffers once; take the largest
    gpu_mib = sum(v for k, v in bufs.items() if k.startswith("gpu_"))
    return {"tps": float(r["avg_ts"]), "tps_std": float(r["stddev_ts"]), "samples_ts": r.get("samples_ts"),
            "gpu_buffers_MiB": round(gpu_mib, 1), "buffers": bufs, "wall_s": round(time.perf_counter() - t0, 1),
            "cmd": " ".join(cmd)}


def configs_for(model: Path, vram: int, bws, n_ctx: int, pick) -> tuple[list[dict], dict]:
    """Placements to time: the planner's choice and those ``pick`` keeps of the fitting candidates (sorted by
    predicted speed)."""
    from edgekit.runtime.memory import read_shape
    from edgekit.runtime.plan import Budget, _candidates, plan_offload

    shape = read_shape(model)
    plan = plan_offload(shape, Budget(512 << 30, vram), n_ctx, bws, n_batch=min(512, n_ctx))
    by_label = {c["label"]: c for c in plan.candidates}
    options = {label: (ngl, kqv, list(ov)) for ngl, kqv, ov, label in _candidates(shape, True)}
    fitting = sorted((c for c in plan.candidates if c["fits"] and c["label"] != "CPU only"),
                     key=lambda c: -c["predicted_tps"])
    chosen = pick([c["label"] for c in fitting])
    plan_label = next((label for label, (ngl, kqv, ov) in options.items()
                       if ngl == plan.n_gpu_layers and kqv == plan.offload_kqv
                       and [tuple(o) for o in ov] == [tuple(o) for o in plan.tensor_overrides]), None)
    if plan_label and plan_label not in chosen:
        chosen.insert(0, plan_label)
    out = []
    for label in chosen:
        ngl, kqv, ov = options[label]
        c = by_label[label]
        out.append({"label": label, "ngl": ngl, "kqv": kqv, "overrides": ov, "plan": label == plan_label,
                    "layer_split": not ov, "predicted_tps": c["predicted_tps"],
                    "est_vram_MiB": round(c["vram_bytes"] / 2**20, 1)})
    return out, {"reason": plan.reason, "label": plan_label}


def run(args: argparse.Namespace) -> int:
    from edgekit.runtime import hostinfo
    from edgekit.runtime.plan import DEFAULT_GPU_BPS, Bandwidths, parse_size

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    threads = args.threads or hostinfo.physical_cores()
    args.ctx = args.ctx or args.gen  # llama-bench -p 0 -n GEN runs a context of GEN tokens (and ubatches of it)
    env = dict(os.environ)
    gbps = gpu_bandwidth()
    bws = Bandwidths(cpu_Bps=hostinfo.measure_bandwidth(), gpu_Bps=gbps or DEFAULT_GPU_BPS)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        smi = "none (no nvidia-smi)"
    report = {"gpu": smi, "threads": threads, "cpu_Bps": bws.cpu_Bps, "gpu_Bps": bws.gpu_Bps,
              "cpu": hostinfo.cpu_name(), "nproc": os.cpu_count(), "models": {}}
    print(f"GPU {smi}; {report['cpu']} x{os.cpu_count()} (threads {threads}); bandwidth CPU "
          f"{bws.cpu_Bps / 1e9:.0f} GB/s, GPU {bws.gpu_Bps / 1e9:.0f} GB/s", flush=True)
    lines: list[str] = []
    filled: dict[str, Path] = {}
    t_start = time.perf_counter()
    for item in args.vram.split(","):
        name, budget = item.split("=")
        if time.perf_counter() - t_start > args.deadline:
            print(f"  {item}: skipped, past --deadline {args.deadline} s", flush=True)
            continue
        vram = parse_size(budget)
        files = {}
        for kind in ("dense", "sparse"):
            key = f"{name}-{kind}"
            if key not in filled:
                filled[key] = fill(args.skeletons / key, work / f"{key}.gguf")
            files[kind] = filled[key]
        m = {"model": name, "vram": budget, "vram_bytes": vram,
             "files_MB": {k: round(v.stat().st_size / 1e6, 1) for k, v in files.items()}}

        def pick_dense(labels: list[str]) -> list[str]:  # the fastest predicted layer splits, and tensor splits
            split = [lb for lb in labels if "layer(s) on CPU" not in lb]
            return split[:args.max_ngl] + [lb for lb in labels if lb not in split][:1]

        def pick_sparse(labels: list[str]) -> list[str]:  # the fastest predicted, and the fastest layer split
            split = next((lb for lb in labels if "on CPU" not in lb), None)
            return labels[:args.top] + ([split] if split and split not in labels[:args.top] else [])

        for kind, path in files.items():
            cfgs, plan = configs_for(path, vram, bws, args.ctx, pick_dense if kind == "dense" else pick_sparse)
            m[kind] = {"plan": plan, "runs": cfgs}
        for rnd in range(args.rounds):
            jobs = [(k, c) for k in ("dense", "sparse") for c in m[k]["runs"]]
            for kind, c in (jobs if rnd % 2 == 0 else jobs[::-1]):
                r = llama_bench(args.llama_bench, files[kind], ngl=c["ngl"], kqv=c["kqv"], overrides=c["overrides"],
                                threads=threads, gen=args.gen, reps=args.reps, env=env)
                c.setdefault("measured", []).append(r)
                print(f"  {item} {kind:6} {c['label']:40} " + (f"{r['tps']:8.1f} tok/s  GPU buffers "
                      f"{r['gpu_buffers_MiB']:.0f} MiB (est {c['est_vram_MiB']:.0f})" if "tps" in r
                      else f"FAILED {r['error']}"), flush=True)
        m["references"] = {}
        for label, (kind, ngl) in {"dense all on GPU (no budget)": ("dense", 999), "dense CPU only": ("dense", 0),
                                   "sparse CPU only": ("sparse", 0)}.items():
            r = llama_bench(args.llama_bench, files[kind], ngl=ngl, kqv=True, overrides=[], threads=threads,
                            gen=args.gen, reps=args.reps, env=env)
            m["references"][label] = r
            print(f"  {item} {label:47} " + (f"{r['tps']:8.1f} tok/s" if "tps" in r else f"FAILED {r['error']}"),
                  flush=True)
        for kind in ("dense", "sparse"):
            for c in m[kind]["runs"]:
                ok = [r["tps"] for r in c.get("measured", []) if "tps" in r]
                c["tps"] = float(np.median(ok)) if ok else None
        best = max((c for c in m["dense"]["runs"] if c["tps"] and c["layer_split"]), key=lambda c: c["tps"],
                   default=None)
        best_any = max((c for c in m["dense"]["runs"] if c["tps"]), key=lambda c: c["tps"], default=None)
        plan_run = next((c for c in m["sparse"]["runs"] if c["plan"]), None)
        best_sparse = max((c for c in m["sparse"]["runs"] if c["tps"]), key=lambda c: c["tps"], default=None)
        for key, c in (("dense_best_ngl", best), ("dense_best_any", best_any), ("sparse_plan", plan_run),
                       ("sparse_best", best_sparse)):
            m[key] = c and {k: c[k] for k in ("label", "tps", "est_vram_MiB")}
        if best and plan_run and plan_run["tps"]:
            m["speedup_plan_vs_best_ngl"] = plan_run["tps"] / best["tps"]
        report["models"][item] = m
        lines.append(f"{name} at --vram {budget}: files dense {m['files_MB']['dense']} MB, sparse "
                     f"{m['files_MB']['sparse']} MB")
        lines.append(f"  {'file':6} {'placement':46} {'pred tok/s':>10} {'tok/s':>8} {'est VRAM':>9} {'GPU buf':>8}")
        for kind in ("dense", "sparse"):
            for c in m[kind]["runs"]:
                gb = max((r.get("gpu_buffers_MiB", 0) for r in c.get("measured", [])), default=0)
                lines.append(f"  {kind:6} {c['label'] + (' [plan]' if c['plan'] else ''):46} "
                             f"{c['predicted_tps']:>10.1f} {(c['tps'] or float('nan')):>8.1f} "
                             f"{c['est_vram_MiB']:>7.0f}Mi {gb:>6.0f}Mi")
        for label, r in m["references"].items():
            lines.append(f"  {'ref':6} {label:46} {'':>10} {r.get('tps', float('nan')):>8.1f}")
        if "speedup_plan_vs_best_ngl" in m:
            lines.append(f"  sparse at its plan vs dense at its best measured -ngl layer split: "
                         f"{m['speedup_plan_vs_best_ngl']:.2f}x ({plan_run['tps']:.1f} vs {best['tps']:.1f} tok/s, "
                         f"{best['label']})")
            if best_any is not best:
                lines.append(f"  ... vs dense at its best measured placement of any kind ({best_any['label']}): "
                             f"{plan_run['tps'] / best_any['tps']:.2f}x")
        text = "\n".join([f"GPU {smi}; {report['cpu']}, {threads} threads; llama-bench tg{args.gen} x{args.reps}, "
                          f"{args.rounds} rounds interleaved; CPU {bws.cpu_Bps / 1e9:.0f} GB/s, GPU "
                          f"{bws.gpu_Bps / 1e9:.0f} GB/s (copy)", *lines])
        (args.out / f"{args.name}.txt").write_text(text + "\n")  # after each budget: a cut-off run keeps its rows
        (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    for f in filled.values():
        f.unlink()
    print("\n" + (args.out / f"{args.name}.txt").read_text() if lines else "nothing measured")
    return 0


def fidelity(args: argparse.Namespace) -> int:
    """Decode speed of each real artifact against its rebuilt twin on this machine (llama-bench, interleaved):
    the check behind timing rebuilt files on the GPU machine."""
    lines, report = [], {}
    for skel in sorted(args.skeletons.glob("*.json")):
        if skel.stem.endswith("_ffn"):
            continue
        real = Path(args.work) / f"{skel.stem.rsplit('-', 1)[0]}-{args.type.lower()}-{skel.stem.rsplit('-', 1)[1]}" \
            / "model.gguf"
        if not real.exists():
            continue
        twin = fill(skel.with_suffix(""), Path("/tmp") / f"{skel.stem}-twin.gguf")
        tps: dict = {"real": [], "rebuilt": []}
        for r in range(args.rounds):
            for name, path in ((("real", real), ("rebuilt", twin)) if r % 2 == 0 else (("rebuilt", twin), ("real", real))):
                m = llama_bench(args.llama_bench, path, ngl=0, kqv=True, overrides=[], threads=args.threads,
                                gen=args.gen, reps=args.reps, env=dict(os.environ))
                tps[name].append(m["tps"])
        twin.unlink()
        ratio = float(np.median(tps["rebuilt"]) / np.median(tps["real"]))
        report[skel.stem] = {"tps": tps, "rebuilt_over_real": ratio}
        lines.append(f"{skel.stem:18} real {np.median(tps['real']):7.1f} tok/s  rebuilt {np.median(tps['rebuilt']):7.1f} "
                     f"tok/s  ratio {ratio:.3f}  ({args.rounds} rounds x tg{args.gen} x{args.reps}, {args.threads} threads)")
        print(lines[-1], flush=True)
    (args.out / "sparse_ffn_gpu_fidelity.txt").write_text("\n".join(lines) + "\n")
    (args.out / "sparse_ffn_gpu_fidelity.json").write_text(json.dumps(report, indent=1))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("prepare", help="convert a model to both artifacts and write their skeletons")
    s.add_argument("--model", required=True, help="a checkpoint folder, or synthetic:hidden=H,ffn=F,layers=L,heads=A,kv=K")
    s.add_argument("--type", default="Q4_0")
    s.add_argument("--sparsity", type=float, default=0.5)
    s.add_argument("--clusters", type=int, default=16)
    s.add_argument("--calib-samples", type=int, default=0, help="calibration samples (default: the converter's)")
    s.add_argument("--calib-seqlen", type=int, default=128)
    s.add_argument("--work", type=Path, default=Path.home() / ".cache/edgekit/bench-sparse-ffn")
    s.add_argument("--out", type=Path, required=True, help="path prefix: OUT-dense.*, OUT-sparse.*")
    f = sub.add_parser("fill", help="rebuild one file from its skeleton")
    f.add_argument("skeleton", type=Path)
    f.add_argument("dest", type=Path)
    r = sub.add_parser("run", help="time the placements on this (GPU) machine")
    r.add_argument("--skeletons", type=Path, required=True)
    r.add_argument("--vram", required=True, help="NAME=BUDGET[,NAME=BUDGET]: skeleton name and its VRAM budget")
    r.add_argument("--llama-bench", required=True)
    r.add_argument("--threads", type=int, default=0, help="CPU threads (default: physical cores)")
    r.add_argument("--gen", type=int, default=128)
    r.add_argument("--reps", type=int, default=3)
    r.add_argument("--rounds", type=int, default=2)
    r.add_argument("--ctx", type=int, default=0, help="context the plan is sized for (default: --gen, llama-bench's)")
    r.add_argument("--top", type=int, default=3, help="sparse placements timed besides the plan")
    r.add_argument("--max-ngl", type=int, default=4, help="dense layer splits timed (fastest predicted first)")
    r.add_argument("--deadline", type=float, default=420, help="seconds after which no further budget is started")
    r.add_argument("--work", type=Path, default=Path("/tmp/sparse-ffn-gpu"))
    r.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    r.add_argument("--name", default="sparse_ffn_gpu")
    d = sub.add_parser("fidelity", help="time real artifacts against their rebuilt twins on this machine (CPU)")
    d.add_argument("--skeletons", type=Path, required=True)
    d.add_argument("--llama-bench", required=True)
    d.add_argument("--type", default="Q4_0")
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--gen", type=int, default=64)
    d.add_argument("--reps", type=int, default=3)
    d.add_argument("--rounds", type=int, default=4)
    d.add_argument("--work", type=Path, default=Path.home() / ".cache/edgekit/bench-sparse-ffn")
    d.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    if args.what == "fidelity":
        return fidelity(args)
    if args.what == "prepare":
        if not str(args.model).startswith("synthetic:"):
            args.model = Path(args.model)
        return prepare(args)
    if args.what == "fill":
        fill(args.skeleton, args.dest)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
