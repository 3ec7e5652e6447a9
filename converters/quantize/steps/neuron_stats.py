"""Neuron statistics: per-neuron activation frequency and magnitude of each SwiGLU FFN, the TEAL and CATS
thresholds at given activation sparsities, and (when a split is asked for) the hot/cold split of the FFN
into an always-computed hot set and cold clusters with a trained router (:mod:`..sparse_ffn`).

It changes no weight: it reads the calibration activations the pipeline captured (the FFN's input, the
rows ``gate_proj`` sees, and its intermediate activation, the rows ``down_proj`` sees: the same tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from edgekit.converters.quantize.steps.base import RESHAPE, LayerState, Step, StepConfig, register_step
from edgekit.converters.sparse_ffn import kernels
from edgekit.converters.sparse_ffn.config import SparseFFNConfig

FFN_IN, FFN_ACT = "mlp.gate_proj", "mlp.down_proj"


@dataclass(frozen=True)
class NeuronStatsConfig(StepConfig):
    """sparsities: activation sparsities whose TEAL (FFN input and intermediate magnitudes) and CATS (gate
    activation magnitude) thresholds are recorded. split: also cut each FFN into hot set and routed cold
    clusters as this config says (None: statistics only). layout: with statistics only, the hot set and
    clusters (no router) of this split, for measuring what that layout costs with a perfect router."""

    step: ClassVar[str] = "neurons"
    stage: ClassVar[int] = RESHAPE
    sparsities: tuple[float, ...] = (0.25, 0.4, 0.5, 0.6)
    split: SparseFFNConfig | None = None
    layout: SparseFFNConfig | None = None


@dataclass
class LayerSplit:
    """One layer's hot/cold split: ``hot`` and ``clusters`` index the original neurons; ``router`` is
    (clusters x hidden) over the FFN's normalised input; recall on held-out calibration tokens. ``errors``:
    on those tokens, the relative error of the FFN output (:func:`kernels.output_error`) with the router's
    clusters ("router"), each token's best clusters ("perfect_router"), and as many of each token's most
    useful neurons, unclustered ("top_k")."""

    hot: np.ndarray
    clusters: np.ndarray
    router: np.ndarray
    recall: float
    static_recall: float
    router_max_logit: float
    errors: dict[str, float]


@register_step("neurons")
class NeuronStatsStep(Step):
    config_class = NeuronStatsConfig
    needs_samples = True
    needs_hessians = False
    report_key = "neurons"

    def __init__(self, config: StepConfig | None = None) -> None:
        super().__init__(config)
        self.stats: dict[int, kernels.NeuronStats] = {}
        self.thresholds: dict[int, dict[str, dict[float, float]]] = {}
        self.splits: dict[int, LayerSplit] = {}
        self.layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # layer -> (hot, clusters), original indices

    def layer(self, st: LayerState) -> dict[str, Any]:
        c = self.config
        assert isinstance(c, NeuronStatsConfig)
        x = np.concatenate([s.numpy() for s in st.samples[FFN_IN]]).astype(np.float32)
        a = np.concatenate([s.numpy() for s in st.samples[FFN_ACT]]).astype(np.float32)
        gate = st.linears[FFN_IN].weight.detach().float().numpy()
        down = st.linears[FFN_ACT].weight.detach().float().numpy()
        stats = kernels.neuron_stats(a, down)
        self.stats[st.index] = stats
        if c.split is None:  # thresholds are for the TEAL/CATS measurements, not for a split
            g = x @ gate.T
            silu = g / (1 + np.exp(-g))
            self.thresholds[st.index] = {
                "teal_in": {s: kernels.layer_threshold(x, s) for s in c.sparsities},
                "teal_act": {s: kernels.layer_threshold(a, s) for s in c.sparsities},
                "cats": {s: kernels.layer_threshold(silu, s) for s in c.sparsities},
            }
            if c.layout is not None:
                self.layouts[st.index] = self._layout(c.layout, a, down)
        report: dict[str, Any] = {k: round(v, 4) for k, v in stats.power_law().items()}
        if c.split is not None:
            split = self._split(c.split, x, a, down)
            self.splits[st.index] = split
            report.update(recall=round(split.recall, 4), static_recall=round(split.static_recall, 4),
                          **{f"error_{name}": round(e, 4) for name, e in split.errors.items()})
        return report

    @staticmethod
    def _layout(cfg: SparseFFNConfig, a: np.ndarray, down: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The hot set (the most important neurons) and the cold clusters of co-active neurons."""
        hot_n = cfg.shape(a.shape[1])[0]
        order = kernels.hot_first_order(kernels.neuron_stats(a, down).importance)
        hot, cold = np.sort(order[:hot_n]), order[hot_n:]
        contrib = kernels.contributions(a[:, cold], down[:, cold])
        return hot, cold[kernels.balanced_clusters(contrib.T, cfg.clusters, seed=cfg.seed)]

    @classmethod
    def _split(cls, cfg: SparseFFNConfig, x: np.ndarray, a: np.ndarray, down: np.ndarray) -> LayerSplit:
        k = cfg.shape(a.shape[1])[2]
        hot, clusters = cls._layout(cfg, a, down)
        scores = kernels.cluster_scores(a, down, clusters)
        n_train = int(0.8 * x.shape[0])
        router = kernels.train_router(x[:n_train], scores[:n_train], k, steps=cfg.router_steps, seed=cfg.seed)
        held_x, held_s, held_a = x[n_train:], scores[n_train:], a[n_train:]
        static = np.broadcast_to(kernels.top_k_mask(scores[:n_train], k).mean(0), held_s.shape)
        n_ff, kept, pred = a.shape[1], hot.size + k * clusters.shape[1], held_x @ router.T
        masks = {"router": kernels.cluster_mask(hot, clusters, kernels.top_k_mask(pred, k), n_ff),
                 "perfect_router": kernels.cluster_mask(hot, clusters, kernels.top_k_mask(held_s, k), n_ff),
                 "top_k": kernels.top_k_mask(kernels.contributions(held_a, down), kept)}
        return LayerSplit(hot=hot, clusters=clusters, router=router, recall=kernels.recall(pred, held_s, k),
                          static_recall=kernels.recall(np.ascontiguousarray(static), held_s, k),
                          router_max_logit=float(np.abs(x @ router.T).max()),
                          errors={name: kernels.output_error(held_a, down, m) for name, m in masks.items()})
