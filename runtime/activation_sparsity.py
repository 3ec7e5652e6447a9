"""``edgekit neurons``: hot and cold neurons of a SwiGLU model, and what activation sparsity costs.

Calibration runs the neuron-statistics step (:mod:`edgekit.converters.quantize.steps.neuron_stats`) over
every layer: each FFN neuron's activation frequency and magnitude, a power-law fit of the frequencies,
and per-layer thresholds at the asked sparsities. The quality of two training-free sparsifiers is then
measured through the PyTorch reference (perplexity, and KL divergence from the dense model):

* TEAL: zero the FFN's input entries and intermediate activations whose magnitude is below the layer's
  threshold (the share ``s`` of calibration entries below it);
* CATS: zero the neurons whose gate activation ``|silu(gate x)|`` is below the layer's threshold.

Two bounds say what a runtime that skips neurons could reach at best (both pick with the true activations,
which a real predictor only estimates):

* top-k: each token keeps the share ``1 - s`` of its neurons that move its output most,
  ``|a_n| * ||down[:, n]||``: the best any neuron-granular skip can do;
* clusters: the layout ``convert --sparse-ffn`` writes (the hot set always computed, the cold neurons in
  clusters of co-active neurons), each token running the clusters that move its output most: the routed
  file with a perfect router. The gap between the two rows is what the cluster granularity costs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.calibration import CalibConfig
from edgekit.converters.sparse_ffn import kernels
from edgekit.converters.sparse_ffn.config import SparseFFNConfig
from edgekit.errors import InputError
from edgekit.model import HFCheckpoint

METHODS = ("teal", "cats", "topk", "clusters")
LABELS = {"teal": "TEAL", "cats": "CATS", "topk": "top-k (bound)", "clusters": "clusters (bound)"}


@dataclass
class NeuronReport:
    layers: list[dict[str, Any]]
    quality: list[dict[str, Any]]
    dense_ppl: float
    freq: dict[int, list[float]] = field(default_factory=dict)  # sorted frequencies of a few layers, for the plot
    layout: dict[str, Any] | None = None  # the cluster layout the "clusters" rows measured, or why there is none

    def to_json(self) -> dict[str, Any]:
        fits = [x for x in self.layers]
        return {"layers": fits, "dense_ppl": self.dense_ppl, "quality": self.quality, "layout": self.layout,
                "summary": {k: float(np.mean([f[k] for f in fits])) for k in ("slope", "r2", "top20_share")}}


class _Sparsified:
    """The torch reference with each MLP's forward replaced by a sparsified one while ``mode`` is set:
    ``(method, s)`` with ``s`` a sparsity, or for "clusters" the number of clusters each token runs."""

    def __init__(self, backend: Any, thresholds: dict[int, dict[str, dict[float, float]]],
                 layouts: dict[int, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        self.inner, self.mode = backend, None
        self._cache: dict[tuple[int, ...], np.ndarray] = {}
        torch = backend._torch
        for i, layer in enumerate(backend.model.model.layers):
            layer.mlp.forward = self._forward(torch, layer.mlp, thresholds[i], (layouts or {}).get(i))

    def _forward(self, torch: Any, mlp: Any, th: dict[str, dict[float, float]],
                 layout: tuple[np.ndarray, np.ndarray] | None) -> Any:
        orig = mlp.forward
        down = mlp.down_proj.weight.detach().float().numpy()

        def forward(x: Any) -> Any:
            if self.mode is None:
                return orig(x)
            kind, s = self.mode
            if kind == "teal":
                x = x * (x.abs() > th["teal_in"][s])
                a = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
                return mlp.down_proj(a * (a.abs() > th["teal_act"][s]))
            if kind == "cats":
                g = mlp.act_fn(mlp.gate_proj(x))
                return mlp.down_proj(g * (g.abs() > th["cats"][s]) * mlp.up_proj(x))
            a = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            rows = a.reshape(-1, a.shape[-1]).float().numpy()
            if kind == "topk":  # the converter's definitions, as its split measures them
                keep = kernels.top_k_mask(kernels.contributions(rows, down), int(round(a.shape[-1] * (1 - s))))
            else:  # clusters: the hot set and the s clusters with the largest ||down[:, c] @ a_c||
                hot, clusters = layout
                best = kernels.top_k_mask(kernels.cluster_scores(rows, down, clusters), s)
                keep = kernels.cluster_mask(hot, clusters, best, a.shape[-1])
            return mlp.down_proj(a * torch.from_numpy(keep).reshape(a.shape).to(a.dtype))

        return forward

    def tokenize(self, text: str, add_special: bool = True, special: bool = True) -> list[int]:
        return self.inner.tokenize(text, add_special, special)

    def logits(self, tokens: list[int]) -> np.ndarray:
        key = tuple(tokens)
        if self.mode is None and key in self._cache:
            return self._cache[key]
        out = self.inner.logits(tokens)
        if self.mode is None:
            self._cache[key] = out
        return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _score(model: _Sparsified, chunks: list[list[int]], mode: tuple[str, float] | None) -> dict[str, float]:
    """llama-perplexity's protocol (second half of each chunk scored): perplexity, and against the dense
    model (mode None) the mean KL divergence and top-1 agreement."""
    nll, kl, agree = [], [], []
    for chunk in chunks:
        first = len(chunk) // 2
        targets = np.asarray(chunk[first + 1:])
        model.mode = None
        ref = _log_softmax(model.logits(chunk)[first:-1])
        model.mode = mode
        lp = _log_softmax(model.logits(chunk)[first:-1]) if mode is not None else ref
        model.mode = None
        nll.append(-lp[np.arange(len(targets)), targets])
        kl.append((np.exp(ref) * (ref - lp)).sum(-1))
        agree.append(ref.argmax(-1) == lp.argmax(-1))
    return {"ppl": float(np.exp(np.concatenate(nll).mean())), "kl_mean": float(np.concatenate(kl).mean()),
            "top1_agreement": float(np.concatenate(agree).mean())}


def chunks_of(tokens: list[int], ctx: int, n: int, bos: int | None) -> list[list[int]]:
    """``n`` non-overlapping ``ctx``-token chunks, each starting with BOS when the tokenizer has one."""
    out = [tokens[i * ctx:(i + 1) * ctx] for i in range(min(n, len(tokens) // ctx))]
    if not out:
        from edgekit.errors import InputError

        raise InputError(f"the text has {len(tokens)} tokens, fewer than one chunk of {ctx}; give more text")
    return [[bos, *c[1:]] if bos is not None else c for c in out]


def _cluster_rows(cfg: SparseFFNConfig, n_ff: int, sparsities: tuple[float, ...]) -> list[tuple[float, int]]:
    """(sparsity reached, clusters run) of the layout nearest each asked sparsity that it can reach."""
    rows: dict[int, float] = {}
    for s in sparsities:
        try:
            k = replace(cfg, sparsity=s).shape(n_ff)[2]
        except InputError:  # more than the cold share: the layout cannot skip that much
            continue
        rows[k] = cfg.achieved(n_ff, k)
    return sorted((s, k) for k, s in rows.items())


def analyze(model: str | Path, text: str, *, sparsities: tuple[float, ...] = (0.25, 0.4, 0.5, 0.6),
            calib: CalibConfig | None = None, ctx: int = 512, chunks: int = 8, clusters: int = 16,
            progress: Any = None) -> NeuronReport:
    """Neuron statistics of every FFN of ``model`` and the quality table on ``text``: TEAL, CATS, the top-k
    bound, and the ``--sparse-ffn`` layout with ``clusters`` cold clusters and a perfect router."""
    from edgekit.converters.quantize.pipeline import LayerPipeline
    from edgekit.converters.quantize.steps.neuron_stats import NeuronStatsConfig, NeuronStatsStep
    from edgekit.runtime.torch_ref import TorchBackend

    ckpt = HFCheckpoint.open(model)
    n_ff = ckpt.hparams.n_ff
    layout: SparseFFNConfig | None = SparseFFNConfig(clusters=clusters)
    try:
        if ckpt.hparams.ffn_widths is not None:
            raise InputError("--sparse-ffn splits FFNs of one width; this checkpoint has per-block widths")
        about: dict[str, Any] = {"clusters": clusters, "hot_fraction": round(layout.hot_fraction, 4),
                                 "neurons_per_cluster": layout.shape(n_ff)[1]}
    except InputError as e:  # too narrow an FFN, or per-block widths: the other rows still stand
        layout, about = None, {"clusters": clusters, "skipped": str(e)}
    step = NeuronStatsStep(NeuronStatsConfig(sparsities=tuple(sparsities), layout=layout))
    report: dict[str, Any] = {}
    LayerPipeline(calib or CalibConfig()).run(ckpt, {}, [step], {}, report, progress)
    layers = [{"layer": i, **{k: round(v, 4) for k, v in s.power_law().items()},
               "mean_abs": round(float(s.mean_abs.mean()), 5)} for i, s in sorted(step.stats.items())]
    n = len(step.stats)
    freq = {i: np.sort(step.stats[i].freq)[::-1].round(5).tolist() for i in sorted({0, n // 2, n - 1})}
    with TorchBackend(ckpt.path) as inner:  # closing it gives the caller's torch threads back
        sparse = _Sparsified(inner, step.thresholds, step.layouts)
        tok = sparse.inner.tokenizer
        pieces = chunks_of(sparse.tokenize(text, special=False), ctx, chunks, tok.bos_token_id)
        dense = _score(sparse, pieces, None)
        runs = [(m, s, s) for m in METHODS[:3] for s in sparsities]
        runs += [("clusters", s, k) for s, k in (_cluster_rows(layout, n_ff, sparsities) if layout else [])]
        quality = []
        for method, s, arg in runs:
            if progress:
                progress(f"{LABELS[method]} at {s:.0%} sparsity", len(quality), len(runs))
            r = _score(sparse, pieces, (method, arg))
            quality.append({"method": method, "sparsity": round(s, 4), "ppl": round(r["ppl"], 4),
                            "ppl_increase": round(r["ppl"] / dense["ppl"] - 1, 4), "kl_mean": round(r["kl_mean"], 5),
                            "top1_agreement": round(r["top1_agreement"], 4),
                            **({"clusters_run": arg} if method == "clusters" else {})})
    return NeuronReport(layers=layers, quality=quality, dense_ppl=round(dense["ppl"], 4), freq=freq, layout=about)


def plot(rep: NeuronReport, path: Path) -> None:
    """Left: sorted neuron activation frequency (log-log) of the first, middle and last layer; right:
    perplexity increase against activation sparsity for TEAL and CATS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, f in rep.freq.items():
        f = np.asarray(f)
        f = f[f > 0]
        a.loglog(np.arange(1, f.size + 1), f, label=f"layer {i}")
    a.set(xlabel="neuron rank (hot first)", ylabel="activation frequency", title="hot and cold neurons")
    a.legend()
    for method in METHODS:
        rows = [q for q in rep.quality if q["method"] == method]
        if rows:
            b.plot([q["sparsity"] for q in rows], [100 * q["ppl_increase"] for q in rows], marker="o",
                   label=LABELS[method])
    b.set(xlabel="activation sparsity", ylabel="perplexity increase (%)", title="quality cost", yscale="symlog")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
