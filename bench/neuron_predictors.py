"""Could a runtime that skips single FFN neurons (not clusters) keep SmolLM2's quality? Neuron predictors against
the top-k bound, through the PyTorch reference.

    python bench/neuron_predictors.py [--sparsity 0.4,0.5] [--rank 128]

``edgekit neurons`` shows that each token's least useful neurons can go almost for free (the top-k bound: half
of them for +3-4% perplexity) while the ``--sparse-ffn`` cluster layout costs +160% there even with a perfect
router. A neuron-granular kernel would need to know which neurons to skip before computing them. This measures
the two usual ways to guess, each keeping the same number of neurons per token as the bound:

  * gate first (CATS-style, per token): compute the gate projection, rank neurons by
    ``|silu(g_n)| * ||down[:, n]|| * mean|up_n|`` (the mean over calibration tokens), compute up and down for
    the kept ones;
  * a predictor (Deja Vu-style): a two-layer MLP of rank ``--rank`` per layer from the FFN input to each
    neuron's odds of being in the token's top set, trained on calibration tokens, run before the FFN;
  * per sequence (Griffin-style "flocking"): the prompt (each window's first half, run dense) picks one set
    of neurons per layer, those whose unit-normalised activations are largest over the prompt's tokens, and
    the continuation runs on that narrower FFN. A runtime would gather the kept rows once per prompt and
    decode on a dense, smaller FFN: no predictor and no per-token gather.

Calibration is the last ``--calib-chunks`` 512-token windows of WikiText-2 valid, perplexity the first
``--chunks`` (disjoint). "FFN work" is the share of the dense FFN's multiply-adds a token costs. Writes
``bench/results/neuron_predictors.{json,txt}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import cpu_model, get_model, log, pkg_version, publish
from rich.table import Table

from edgekit.evaluate import log_softmax, read_text
from edgekit.runtime.activation_sparsity import chunks_of
from edgekit.runtime.torch_ref import TorchBackend

RESULTS = Path(__file__).resolve().parent / "results"
WIKI = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsity", default="0.25,0.4,0.5", help="Shares of each token's neurons skipped.")
    p.add_argument("--train-sparsity", type=float, default=0.5, help="The top set the predictors learn.")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--steps", type=int, default=400, help="Adam steps per layer's predictor (batches of 1024).")
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--calib-chunks", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--text", type=Path, default=WIKI)
    p.add_argument("--out", type=Path, default=RESULTS / "neuron_predictors")
    return p.parse_args()


def capture(torch: Any, be: TorchBackend, windows: list[list[int]]) -> tuple[dict, dict]:
    """Each layer's FFN input and intermediate activation on ``windows`` (dense model)."""
    xs: dict[int, list] = {}
    acts: dict[int, list] = {}
    hooks = []
    for i, layer in enumerate(be.model.model.layers):
        hooks.append(layer.mlp.gate_proj.register_forward_hook(
            lambda m, inp, out, i=i: xs.setdefault(i, []).append(inp[0].detach().reshape(-1, inp[0].shape[-1]))))
        hooks.append(layer.mlp.down_proj.register_forward_hook(
            lambda m, inp, out, i=i: acts.setdefault(i, []).append(inp[0].detach().reshape(-1, inp[0].shape[-1]))))
    try:
        for w in windows:
            be.logits(w)
    finally:
        for h in hooks:
            h.remove()
    return ({i: torch.cat(v).float() for i, v in xs.items()}, {i: torch.cat(v).float() for i, v in acts.items()})


def train_predictor(torch: Any, x: Any, target: Any, rank: int, steps: int) -> tuple[Any, float, dict]:
    """An MLP ``x -> logits`` over neurons fitted to ``target`` (0/1: the token's top set) on 90% of the
    tokens; recall of the top set and the share of the top set's contribution mass kept, on the other 10%."""
    n = int(0.9 * x.shape[0])
    scale = float(x[:n].pow(2).mean().sqrt())
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], rank, bias=False), torch.nn.ReLU(),
                              torch.nn.Linear(rank, target.shape[1]))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, n, (1024,))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x[idx] / scale), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval(), scale, {"n_train": n}


def main() -> int:
    args = parse()
    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    levels = [float(s) for s in args.sparsity.split(",")]
    be = TorchBackend(get_model())
    layers = be.model.model.layers
    n_ff, hidden = layers[0].mlp.down_proj.weight.shape[1], layers[0].mlp.down_proj.weight.shape[0]
    ids = be.tokenize(read_text(args.text))
    bos = be.tokenizer.bos_token_id
    evals = chunks_of(ids, 512, args.chunks, bos)  # as edgekit neurons scores
    tail = ids[len(ids) - 511 * args.calib_chunks:]
    windows = [[bos, *tail[i * 511:(i + 1) * 511]] for i in range(args.calib_chunks)]
    assert len(ids) - 511 * args.calib_chunks >= 512 * args.chunks, "calibration and evaluation text overlap"
    report: dict[str, Any] = {
        "benchmark": "neuron_predictors", "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_start": os.getloadavg()},
        "versions": {n: pkg_version(n) for n in ("edgekit", "torch", "transformers")},
        "args": {k: str(v) for k, v in vars(args).items()}, "rows": []}
    log(f"capturing activations on {args.calib_chunks} x 512 calibration tokens")
    xs, acts = capture(torch, be, windows)  # concatenated outside inference mode: the predictors train on them
    keep_train = int(round(n_ff * (1 - args.train_sparsity)))
    preds, recall, mass, gate_scale = {}, [], [], {}
    t0 = time.perf_counter()
    for i, layer in enumerate(layers):
        mlp = layer.mlp
        norms = mlp.down_proj.weight.detach().float().norm(dim=0)
        contrib = acts[i].abs() * norms
        top = torch.zeros_like(contrib).scatter_(-1, contrib.topk(keep_train, -1).indices, 1.0)
        net, scale, info = train_predictor(torch, xs[i], top, args.rank, args.steps)
        with torch.inference_mode():
            held = slice(info["n_train"], None)
            p = net(xs[i][held] / scale)
            kept = torch.zeros_like(p).scatter_(-1, p.topk(keep_train, -1).indices, 1.0)
            recall.append(float((kept * top[held]).sum() / top[held].sum()))
            mass.append(float((kept * contrib[held]).sum() / (top[held] * contrib[held]).sum()))
            gate_scale[i] = norms * mlp.up_proj(xs[i]).abs().mean(0)
        preds[i] = (net, scale)
        log(f"layer {i}: predictor recall {recall[-1]:.3f}, top-set mass kept {mass[-1]:.3f}")
    train_s = time.perf_counter() - t0

    mode: list[Any] = [None]

    def patch(i: int, mlp: Any) -> None:
        orig = mlp.forward
        norms = mlp.down_proj.weight.detach().float().norm(dim=0)

        def forward(x: Any) -> Any:
            if mode[0] is None:
                return orig(x)
            kind, s = mode[0]
            g = mlp.act_fn(mlp.gate_proj(x))
            a = g * mlp.up_proj(x)
            keep = int(round(n_ff * (1 - s)))
            if kind == "per sequence":
                half = x.shape[1] // 2  # the prompt: its own FFN stays dense
                z = a[:, :half]
                chosen = (z / z.norm(dim=-1, keepdim=True).clamp_min(1e-9)).norm(dim=1)  # (batch, n_ff)
                m = torch.zeros_like(chosen).scatter_(-1, chosen.topk(keep, -1).indices, 1.0)
                m = m[:, None, :].expand(-1, a.shape[1], -1).clone()
                m[:, :half] = 1.0
                return mlp.down_proj(a * m)
            score = {"top-k (bound)": lambda: a.abs() * norms, "gate first": lambda: g.abs() * gate_scale[i],
                     "predictor": lambda: preds[i][0](x / preds[i][1])}[kind]()
            return mlp.down_proj(a * torch.zeros_like(a).scatter_(-1, score.topk(keep, -1).indices, 1.0))

        mlp.forward = forward

    for i, layer in enumerate(layers):
        patch(i, layer.mlp)

    def score(m: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
        mode[0] = m
        try:
            with torch.inference_mode():
                return [log_softmax(be.logits(c)[len(c) // 2:-1]) for c in evals], [np.asarray(c[len(c) // 2 + 1:])
                                                                                     for c in evals]
        finally:
            mode[0] = None

    ref, targets = score(None)

    def ppl(lps: list[np.ndarray]) -> float:
        return float(np.exp(np.concatenate([-lp[np.arange(len(t)), t] for lp, t in zip(lps, targets, strict=True)]).mean()))

    dense = ppl(ref)
    work = {"top-k (bound)": lambda s: 1.0, "gate first": lambda s: 1 / 3 + 2 / 3 * (1 - s),
            "predictor": lambda s: args.rank * (hidden + n_ff) / (3 * hidden * n_ff) + (1 - s),
            "per sequence": lambda s: 1 - s}
    for kind in work:
        for s in levels:
            lps, _ = score((kind, s))
            p = ppl(lps)
            kl = float(np.concatenate([(np.exp(r) * (r - q)).sum(-1) for r, q in zip(ref, lps, strict=True)]).mean())
            row = {"method": kind, "sparsity": s, "ppl": p, "ppl_increase": p / dense - 1, "kl_mean": kl,
                   "ffn_work": work[kind](s)}
            report["rows"].append(row)
            log(f"{kind} at {s:.0%}: ppl {p:.3f} ({100 * row['ppl_increase']:+.1f}%)")
    report.update(dense_ppl=dense, predictor={"rank": args.rank, "recall": float(np.mean(recall)),
                  "top_set_mass_kept": float(np.mean(mass)), "train_s": train_s})
    report["total_s"] = time.perf_counter() - start
    report["machine"]["loadavg_end"] = os.getloadavg()
    table = Table(title=f"SmolLM2-135M-Instruct, neuron-level FFN skipping, PyTorch F32: dense ppl {dense:.3f} "
                        f"on {args.chunks} x 512 WikiText-2 tokens")
    for col in ("method", "sparsity", "ppl", "ppl +%", "KL", "FFN work"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in report["rows"]:
        table.add_row(r["method"], f"{r['sparsity']:.0%}", f"{r['ppl']:.3f}", f"{100 * r['ppl_increase']:+.1f}",
                      f"{r['kl_mean']:.4f}", "needs the whole FFN" if r["method"].startswith("top-k")
                      else f"{r['ffn_work']:.0%}")
    pr = report["predictor"]
    lines = [f"predictor: rank {args.rank}, trained on each token's top {1 - args.train_sparsity:.0%} "
             f"({args.steps} steps per layer, {train_s:.0f} s for {len(layers)} layers); held-out recall "
             f"{pr['recall']:.3f}, share of the top set's contribution kept {pr['top_set_mass_kept']:.3f}"]
    publish(report, table, lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
