"""``edgekit neurons``: hot and cold neurons of a SwiGLU model, and what activation sparsity costs.

Calibration runs the neuron-statistics step (:mod:`edgekit.converters.quantize.steps.neuron_stats`) over
every layer: each FFN neuron's activation frequency and magnitude, a power-law fit of the frequencies,
and per-layer thresholds at the asked sparsities. The quality of two training-free sparsifiers is then
measured through the PyTorch reference (perplexity, and KL divergence from the dense model):

* TEAL: zero the FFN's input entries and intermediate activations whose magnitude is below the layer's
  threshold (the share ``s`` of calibration entries below it);
* CATS: zero the neurons whose gate activation ``|silu(gate x)|`` is below the layer's threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.calibration import CalibConfig
from edgekit.model import HFCheckpoint

METHODS = ("teal", "cats")


@dataclass
class NeuronReport:
    layers: list[dict[str, Any]]
    quality: list[dict[str, Any]]
    dense_ppl: float
    freq: dict[int, list[float]] = field(default_factory=dict)  # sorted frequencies of a few layers, for the plot

    def to_json(self) -> dict[str, Any]:
        fits = [x for x in self.layers]
        return {"layers": fits, "dense_ppl": self.dense_ppl, "quality": self.quality,
                "summary": {k: float(np.mean([f[k] for f in fits])) for k in ("slope", "r2", "top20_share")}}


class _Sparsified:
    """The torch reference with each MLP's forward replaced by a sparsified one while ``mode`` is set."""

    def __init__(self, backend: Any, thresholds: dict[int, dict[str, dict[float, float]]]) -> None:
        self.inner, self.mode = backend, None
        self._cache: dict[tuple[int, ...], np.ndarray] = {}
        torch = backend._torch
        for i, layer in enumerate(backend.model.model.layers):
            layer.mlp.forward = self._forward(torch, layer.mlp, thresholds[i])

    def _forward(self, torch: Any, mlp: Any, th: dict[str, dict[float, float]]) -> Any:
        orig = mlp.forward

        def forward(x: Any) -> Any:
            if self.mode is None:
                return orig(x)
            kind, s = self.mode
            if kind == "teal":
                x = x * (x.abs() > th["teal_in"][s])
                a = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
                return mlp.down_proj(a * (a.abs() > th["teal_act"][s]))
            g = mlp.act_fn(mlp.gate_proj(x))
            return mlp.down_proj(g * (g.abs() > th["cats"][s]) * mlp.up_proj(x))

        return forward

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.inner.tokenize(text, add_special)

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


def analyze(model: str | Path, text: str, *, sparsities: tuple[float, ...] = (0.25, 0.4, 0.5, 0.6),
            calib: CalibConfig | None = None, ctx: int = 512, chunks: int = 8,
            progress: Any = None) -> NeuronReport:
    """Neuron statistics of every FFN of ``model`` and the TEAL/CATS quality table on ``text``."""
    from edgekit.converters.quantize.pipeline import LayerPipeline
    from edgekit.converters.quantize.steps.neuron_stats import NeuronStatsConfig, NeuronStatsStep
    from edgekit.runtime.torch_ref import TorchBackend

    ckpt = HFCheckpoint.open(model)
    step = NeuronStatsStep(NeuronStatsConfig(sparsities=tuple(sparsities)))
    report: dict[str, Any] = {}
    LayerPipeline(calib or CalibConfig()).run(ckpt, {}, [step], {}, report, progress)
    layers = [{"layer": i, **{k: round(v, 4) for k, v in s.power_law().items()},
               "mean_abs": round(float(s.mean_abs.mean()), 5)} for i, s in sorted(step.stats.items())]
    n = len(step.stats)
    freq = {i: np.sort(step.stats[i].freq)[::-1].round(5).tolist() for i in sorted({0, n // 2, n - 1})}
    sparse = _Sparsified(TorchBackend(ckpt.path), step.thresholds)
    tok = sparse.inner.tokenizer
    pieces = chunks_of(sparse.tokenize(text), ctx, chunks, tok.bos_token_id)
    dense = _score(sparse, pieces, None)
    quality = []
    for method in METHODS:
        for s in sparsities:
            if progress:
                progress(f"{method.upper()} at {s:.0%} sparsity", len(quality), len(METHODS) * len(sparsities))
            r = _score(sparse, pieces, (method, s))
            quality.append({"method": method, "sparsity": s, "ppl": round(r["ppl"], 4),
                            "ppl_increase": round(r["ppl"] / dense["ppl"] - 1, 4), "kl_mean": round(r["kl_mean"], 5),
                            "top1_agreement": round(r["top1_agreement"], 4)})
    return NeuronReport(layers=layers, quality=quality, dense_ppl=round(dense["ppl"], 4), freq=freq)


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
        b.plot([q["sparsity"] for q in rows], [100 * q["ppl_increase"] for q in rows], marker="o",
               label=method.upper())
    b.set(xlabel="activation sparsity", ylabel="perplexity increase (%)", title="quality cost")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
