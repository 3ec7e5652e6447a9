"""Pure kernels of the hot/cold sparse FFN: arrays in, arrays out (no files, no models).

A SwiGLU FFN is ``down @ (silu(gate @ x) * (up @ x))``; each of its ``n_ff`` intermediate neurons
contributes ``a_n * down[:, n]`` to the output. Reordering the neurons (rows of gate/up, columns of
down) leaves the function unchanged, which is what lets a hot set and cold clusters be cut out of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def contributions(acts: np.ndarray, down: np.ndarray) -> np.ndarray:
    """``|a_n(t)| * ||down[:, n]||``: how much each neuron moves each token's output (tokens x n_ff)."""
    return np.abs(acts) * np.linalg.norm(down, axis=0)[None, :]


def layer_threshold(values: np.ndarray, sparsity: float, max_entries: int = 1 << 20) -> float:
    """The magnitude under which ``sparsity`` of all entries of ``values`` fall (TEAL/CATS thresholds),
    estimated on an even subsample of at most ``max_entries`` entries (a quantile's error is ~1/sqrt(n))."""
    flat = np.abs(values).reshape(-1)
    return float(np.quantile(flat[:: max(1, flat.size // max_entries)], sparsity))


@dataclass(frozen=True)
class NeuronStats:
    """Per-neuron statistics of one FFN layer over calibration tokens.

    freq: fraction of tokens in which the neuron's contribution is above the layer's median (the neuron
        is "active" at 50% activation sparsity). mean_abs: mean ``|a_n|``. importance: mean contribution.
    """

    freq: np.ndarray
    mean_abs: np.ndarray
    importance: np.ndarray

    def power_law(self) -> dict[str, float]:
        """Fit ``log freq = c + slope * log rank`` (neurons sorted hot first): a power law is a straight
        line (R^2 near 1); also the share of all activations that the hottest 20% of neurons carry."""
        f = np.sort(self.freq)[::-1]
        f = f[f > 0]
        rank = np.arange(1, f.size + 1, dtype=np.float64)
        x, y = np.log(rank), np.log(f)
        slope, c = np.polyfit(x, y, 1)
        r2 = 1 - np.sum((y - (c + slope * x)) ** 2) / max(np.sum((y - y.mean()) ** 2), 1e-30)
        top = max(1, int(round(0.2 * self.freq.size)))
        share = float(np.sort(self.freq)[::-1][:top].sum() / max(self.freq.sum(), 1e-30))
        return {"slope": float(slope), "r2": float(r2), "top20_share": share}


def neuron_stats(acts: np.ndarray, down: np.ndarray) -> NeuronStats:
    contrib = contributions(acts, down)
    tau = float(np.median(contrib))
    return NeuronStats(freq=(contrib > tau).mean(axis=0), mean_abs=np.abs(acts).mean(axis=0),
                       importance=contrib.mean(axis=0))


def balanced_clusters(profiles: np.ndarray, n_clusters: int, *, iters: int = 12, seed: int = 0) -> np.ndarray:
    """Split neurons into ``n_clusters`` equal groups of neurons that are active on the same tokens.

    ``profiles``: one row per neuron (its contribution on each calibration token). Balanced k-means on
    the normalised profiles: each round assigns neurons greedily, most confident first, to the nearest
    centre that still has room. Returns ``(n_clusters, size)`` neuron indices.
    """
    n = profiles.shape[0]
    if n % n_clusters:
        raise ValueError(f"{n} neurons do not split into {n_clusters} equal clusters")
    size = n // n_clusters
    p = profiles / np.maximum(np.linalg.norm(profiles, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    centres = p[rng.choice(n, n_clusters, replace=False)]
    assign = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        sim = p @ centres.T
        order = np.argsort(-sim.max(axis=1))
        room = np.full(n_clusters, size)
        for i in order:
            for c in np.argsort(-sim[i]):
                if room[c]:
                    assign[i], room[c] = c, room[c] - 1
                    break
        new = np.stack([p[assign == c].mean(axis=0) for c in range(n_clusters)])
        new /= np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
        if np.allclose(new, centres):
            break
        centres = new
    return np.stack([np.sort(np.flatnonzero(assign == c)) for c in range(n_clusters)])


def cluster_scores(acts: np.ndarray, down: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """``||down[:, c] @ a_c(t)||``: each cluster's contribution to each token's output (tokens x clusters)."""
    out = np.empty((acts.shape[0], clusters.shape[0]), dtype=np.float32)
    for c, idx in enumerate(clusters):
        out[:, c] = np.linalg.norm(acts[:, idx] @ down[:, idx].T, axis=1)
    return out


def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of each row's ``k`` largest entries."""
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    mask = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask


def cluster_mask(hot: np.ndarray, clusters: np.ndarray, chosen: np.ndarray, n_ff: int) -> np.ndarray:
    """Which neurons each token computes (tokens x n_ff): the hot set and its ``chosen`` clusters
    (tokens x clusters, boolean)."""
    mask = np.zeros((chosen.shape[0], n_ff), dtype=bool)
    mask[:, hot] = True
    mask[:, clusters.reshape(-1)] = np.repeat(chosen, clusters.shape[1], axis=1)
    return mask


def output_error(acts: np.ndarray, down: np.ndarray, keep: np.ndarray) -> float:
    """How far the FFN output moves when each token computes only its ``keep`` neurons:
    ``||down @ (a * ~keep)|| / ||down @ a||`` over all tokens (Frobenius norms)."""
    lost = np.linalg.norm(np.where(keep, 0, acts) @ down.T)
    return float(lost / max(float(np.linalg.norm(acts @ down.T)), 1e-30))


def recall(pred_scores: np.ndarray, true_scores: np.ndarray, k: int) -> float:
    """Share of each token's ``k`` truly largest clusters that the predictor's top ``k`` also picks."""
    return float((top_k_mask(pred_scores, k) & top_k_mask(true_scores, k)).sum() / (true_scores.shape[0] * k))


def train_router(x: np.ndarray, scores: np.ndarray, k: int, *, steps: int = 300, lr: float = 0.02,
                 weight_decay: float = 1e-4, seed: int = 0) -> np.ndarray:
    """A linear router ``W`` (clusters x d) whose top-``k`` logits ``W @ x`` pick the clusters with the
    largest contributions: a multi-label logistic regression on the calibration tokens' true top-``k``
    sets (full-batch Adam, a few hundred steps: seconds per layer on 2 cores)."""
    import torch

    # Small matrices: one thread (a pool of spinning threads on shared, busy cores made this 10x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode(False), torch.enable_grad():  # the layer pipeline runs under inference_mode
            return _fit_router(torch, x, scores, k, steps, lr, weight_decay, seed)
    finally:
        torch.set_num_threads(threads)


def _fit_router(torch, x, scores, k, steps, lr, weight_decay, seed) -> np.ndarray:  # noqa: ANN001
    torch.manual_seed(seed)
    X = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    Y = torch.from_numpy(top_k_mask(scores, k).astype(np.float32))
    scale = X.pow(2).mean().sqrt().clamp_min(1e-6)
    # No bias: the runtime's router (llama.cpp's ffn_gate_inp) is a bare matrix.
    W = torch.zeros(scores.shape[1], x.shape[1], requires_grad=True)
    opt = torch.optim.Adam([W], lr=lr, weight_decay=weight_decay)
    pos = Y.mean(0).clamp(1e-3, 1 - 1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=(1 - pos) / pos)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn((X / scale) @ W.T, Y)
        loss.backward()
        opt.step()
    return (W.detach() / scale).numpy().astype(np.float32)


def hot_first_order(importance: np.ndarray) -> np.ndarray:
    """Neuron order, most important (hottest) first."""
    return np.argsort(-importance, kind="stable")


def permute_ffn(gate: np.ndarray, up: np.ndarray, down: np.ndarray, order: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same FFN with its neurons in ``order`` (function-preserving)."""
    return gate[order], up[order], down[:, order]


def swiglu_ffn(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """Reference SwiGLU FFN on rows of ``x`` (float64 for tests)."""
    g = x @ gate.T
    return ((g / (1 + np.exp(-g))) * (x @ up.T)) @ down.T
