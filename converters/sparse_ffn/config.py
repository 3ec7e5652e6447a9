"""The sparse FFN's shape: how many neurons are hot, how many cold clusters, how many of them run."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from edgekit.errors import InputError

# How a fix names the cluster count: the flag of the command that is running (convert's -O by default).
_CLUSTERS_FLAG: ContextVar[str] = ContextVar("sparse_clusters_flag", default="-O sparse_clusters={}")


@contextmanager
def clusters_flag(template: str) -> Iterator[None]:
    """Within the block, fixes name the cluster count as ``template`` (``"--clusters {}"`` for neurons)."""
    token = _CLUSTERS_FLAG.set(template)
    try:
        yield
    finally:
        _CLUSTERS_FLAG.reset(token)


@dataclass(frozen=True)
class SparseFFNConfig:
    """A hot/cold split of every FFN.

    sparsity: the share of FFN neurons left out per token (0.5: half the FFN is computed). It is reached
        by running ``k`` of the ``clusters`` cold clusters beside the hot set; the nearest ``k`` is used.
    clusters: cold clusters per layer (a power of two: the router's 1/clusters weight is compensated
        in the weights, exactly for a power of two).
    hot_fraction: share of the neurons that are always computed (rounded so that every cold cluster is a
        whole number of quantization blocks).
    block: neurons per cluster are a multiple of this (32: every ggml block type but the K-quants).
    router_steps: optimizer steps of each layer's router. router_scale: the largest router logit the
        file carries; llama.cpp's softmax then gives each cluster 1/clusters to within ~2x this, so the
        all-clusters output equals the dense one to that tolerance, while top-k still ranks by the logits.
    seed: clustering and router initialisation.
    """

    sparsity: float = 0.5
    clusters: int = 16
    hot_fraction: float = 1 / 3
    block: int = 32
    router_steps: int = 300
    router_scale: float = 1e-5
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.sparsity < 1:  # at 0 every cluster runs: the router has nothing to learn
            raise InputError("--sparse-ffn takes the share of FFN neurons to skip, 0 < S < 1 (e.g. 0.5)")
        if self.clusters < 2 or self.clusters & (self.clusters - 1):
            raise InputError("sparse FFN clusters must be a power of two >= 2 (e.g. 16)")
        if not 0 <= self.hot_fraction < 1 or self.block < 1 or self.router_steps < 1:
            raise InputError("sparse FFN: 0 <= hot_fraction < 1, block >= 1, router_steps >= 1")
        if not 0 < self.router_scale <= 1e-3:
            raise InputError("sparse FFN router_scale must be in (0, 1e-3]")

    def shape(self, n_ff: int) -> tuple[int, int, int]:
        """(hot neurons, neurons per cluster, clusters run per token) for an FFN of ``n_ff`` neurons."""
        unit = self.clusters * self.block
        cold = int((n_ff * (1 - self.hot_fraction)) // unit) * unit
        if cold == 0:
            fits = 1 << max(0, (int(n_ff * (1 - self.hot_fraction)) // self.block).bit_length() - 1)
            fix = f"use {_CLUSTERS_FLAG.get().format(fits)}" if fits >= 2 else "this model is too narrow for a sparse FFN"
            raise InputError(f"an FFN of {n_ff} neurons cannot hold {self.clusters} cold clusters of "
                             f"{self.block}-neuron blocks; {fix}")
        if self.sparsity > cold / n_ff:
            raise InputError(f"--sparse-ffn {self.sparsity}: at most {cold / n_ff:.2f} of this FFN is cold; "
                             f"use --sparse-ffn {int(cold / n_ff * 100) / 100:g} or less")
        k = round(self.clusters * (1 - self.sparsity * n_ff / cold))
        if k >= self.clusters:  # skips less than half a cluster: the dense model in a slower layout
            one = math.ceil(cold / self.clusters / n_ff * 100) / 100
            raise InputError(f"--sparse-ffn {self.sparsity:g} skips no cold cluster of this FFN ({self.clusters} "
                             f"clusters of {cold // self.clusters} neurons in {n_ff}); use --sparse-ffn {one:g} or "
                             "more to skip at least one")
        return n_ff - cold, cold // self.clusters, max(1, k)

    def achieved(self, n_ff: int, k: int | None = None) -> float:
        """The sparsity actually reached with ``k`` clusters run (default: this config's)."""
        hot, size, kk = self.shape(n_ff)
        return 1 - (hot + size * (kk if k is None else k)) / n_ff
