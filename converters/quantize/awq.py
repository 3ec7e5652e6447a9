"""AWQ (activation-aware weight quantization, Lin et al. 2023) for decoder layers, onto ggml grids.

A weight column that meets large activations matters more than its neighbours in the same block. AWQ
multiplies such columns by a per-input-channel scale ``s`` before quantizing and divides the op that
produces the input (an RMSNorm, or a Linear's output rows) by ``s``, so the float layer is unchanged and
the important columns take a larger share of each block's range. Candidate scales are ``mean|x| ** alpha``
over a grid of ``alpha`` in [0, 1); ``alpha = 0`` (``s = 1``, plain round-to-nearest) is always a
candidate and wins ties, so the search never makes the calibration error of plain round-to-nearest
worse. A clip search then shrinks each ggml block's max magnitude where that lowers the block's output
error.

Which ops can absorb a scale is per-architecture data (:data:`edgekit.arch.AWQ_LAYOUTS`). Errors are
measured on the linears' outputs against the float weights, through the input Gram matrix
``G = X^T X / n`` (float64): ``||X W^T - (X/s) Q(W s)^T||^2 / n = tr(D G D^T)`` with
``D = W - Q(W s) / s``, the same quantity as GPTQ's Hessian-weighted error. Quantization goes through
:func:`ggml.quantize_roundtrip` onto each linear's own target type, unweighted: the values llama.cpp
decodes when plain RTN follows. The rounding that follows by default is importance-weighted (imatrix)
RTN or GPTQ, which the search does not model: under it a chosen scale is not always the best (QA
measured one SmolLM2 gate/up group 5.6% worse than alpha = 0, others 1-4% off), though AWQ + imatrix
still beats imatrix alone end to end (Q4_0: ppl 23.28 against 23.69, KL 0.090 against 0.164).

The functions work in place on torch modules; a calibration driver calls :func:`awq_layer` on a layer
before quantizing its linears and then feeds GPTQ (or RTN) the rescaled inputs
(:meth:`AWQReport.rescale_inputs`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import gguf
import numpy as np

from edgekit.arch import AWQLayout, ScaleGroup, awq_layout
from edgekit.converters.quantize.grids import as_grid
from edgekit.converters.quantize.steps.base import RESHAPE, StepConfig
from edgekit.errors import InputError, require

if TYPE_CHECKING:
    import torch

QType = gguf.GGMLQuantizationType | int | str
#: Maps a linear's module name inside the layer (``"mlp.down_proj"``) to its target ggml type.
QTypeOf = Callable[[str], QType]

_MIN_STAT = 1e-4  # floor on mean|x|: a dead channel would otherwise get scale 0 (AutoAWQ's clamp)


@dataclass(frozen=True)
class AWQConfig(StepConfig):
    """Settings of the AWQ searches (the config of the ``awq`` layer step).

    n_grid: number of scale exponents tried: ``alpha = i / n_grid`` for ``i < n_grid`` (AutoAWQ's
        grid, 0 to 0.95 by default). 1 tries only ``alpha = 0``, which is plain round-to-nearest.
    clip: run the per-block clip search after the scales are applied.
    clip_grid: number of clip ratios tried, evenly from 1.0 down to ``clip_min_ratio``.
    clip_min_ratio: the smallest fraction of a block's max magnitude the clip search tries.
    n_samples: token rows of the captured inputs used by the searches (a fixed random subset when there
        are more); 0 uses all of them. The cost is one Gram matrix per input, ``n_samples * in^2``.
    seed: seed of that subset, so a conversion is repeatable.
    """

    step: ClassVar[str] = "awq"
    stage: ClassVar[int] = RESHAPE
    n_grid: int = 20
    clip: bool = True
    clip_grid: int = 11
    clip_min_ratio: float = 0.5
    n_samples: int = 8192
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_grid < 1:
            raise InputError(f"AWQ n_grid is {self.n_grid}; it needs at least 1 (alpha = 0 alone is RTN)")
        if self.clip_grid < 1:
            raise InputError(f"AWQ clip_grid is {self.clip_grid}; it needs at least 1 (ratio 1.0 alone)")
        if not 0.0 < self.clip_min_ratio <= 1.0:
            raise InputError(f"AWQ clip_min_ratio is {self.clip_min_ratio}; pick a value in (0, 1], e.g. 0.5")
        if self.n_samples < 0:
            raise InputError(f"AWQ n_samples is {self.n_samples}; use a positive count, or 0 for all tokens")

    @property
    def alphas(self) -> tuple[float, ...]:
        return tuple(i / self.n_grid for i in range(self.n_grid))

    @property
    def clip_ratios(self) -> tuple[float, ...]:
        if self.clip_grid == 1:
            return (1.0,)
        step = (1.0 - self.clip_min_ratio) / (self.clip_grid - 1)
        return tuple(1.0 - i * step for i in range(self.clip_grid))


@dataclass(frozen=True)
class GroupResult:
    """Outcome of one scale group. Errors are mean squared output errors per token, summed over the
    group's linears, with each linear quantized to its own type.

    alpha: chosen exponent; None when the group was skipped (``skipped`` says why).
    scales: the per-input-channel scale applied (None when skipped or when ``alpha`` is 0).
    error_rtn: error with ``s = 1``, i.e. round-to-nearest of the weights as they were.
    error: error with the chosen scales (equal to ``error_rtn`` when ``alpha`` is 0).
    """

    prev: str
    linears: tuple[str, ...]
    alpha: float | None
    scales: torch.Tensor | None
    error_rtn: float
    error: float
    skipped: str | None = None

    @property
    def reduction(self) -> float:
        """Fraction of the round-to-nearest error removed (0 when nothing changed)."""
        return 1.0 - self.error / self.error_rtn if self.error_rtn > 0 else 0.0


@dataclass(frozen=True)
class ClipResult:
    """Outcome of the clip search on one linear (errors as in :class:`GroupResult`).

    ratios: the clip ratio kept for each (row, block), 1.0 where the weights were left alone.
    """

    linear: str
    error_before: float
    error_after: float
    ratios: np.ndarray

    @property
    def clipped_fraction(self) -> float:
        return float(np.mean(self.ratios < 1.0)) if self.ratios.size else 0.0


@dataclass
class AWQReport:
    """What :func:`awq_layer` did to one layer."""

    groups: list[GroupResult] = field(default_factory=list)
    clips: list[ClipResult] = field(default_factory=list)

    @property
    def input_scales(self) -> dict[str, torch.Tensor]:
        """Linear name -> the per-channel scale its input is now divided by (only scaled linears)."""
        return {name: g.scales for g in self.groups if g.scales is not None for name in g.linears}

    def rescale_inputs(self, captured: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The captured inputs as the scaled float layer now produces them (``x / s``), for GPTQ; the
        same, up to float rounding, as capturing them again by running the layer."""
        scales = self.input_scales
        return {name: x / scales[name].to(x.device, x.dtype) if name in scales else x
                for name, x in captured.items()}

    def to_json(self) -> dict[str, Any]:
        """A summary for manifests and logs: chosen alpha and errors per group, errors per clipped linear."""
        return {
            "groups": [{"prev": g.prev, "alpha": g.alpha, "error_rtn": round(g.error_rtn, 6),
                        "error": round(g.error, 6), **({"skipped": g.skipped} if g.skipped else {})}
                       for g in self.groups],
            "clip": [{"linear": c.linear, "error_before": round(c.error_before, 6),
                      "error_after": round(c.error_after, 6), "clipped": round(c.clipped_fraction, 4)}
                     for c in self.clips],
        }


# ---- statistics and errors ------------------------------------------------------------------


@dataclass(frozen=True)
class _Stats:
    # numpy float64: torch's float64 GEMM is several times slower than numpy's at these shapes
    gram: np.ndarray  # (in, in), X^T X / n over the sampled tokens
    mean_abs: np.ndarray  # (in,), mean |x| per input channel

    def scaled(self, s: torch.Tensor) -> _Stats:
        """The statistics of ``x / s``."""
        inv = 1.0 / s.double().numpy()
        return _Stats(self.gram * inv[:, None] * inv[None, :], self.mean_abs * inv)


def _stats(x: torch.Tensor, config: AWQConfig, width: int, what: str) -> _Stats:
    torch = require("torch", "torch")
    if x.shape[-1] != width:
        raise InputError(f"captured inputs of {what} have {x.shape[-1]} channels; the layer expects {width}")
    x = x.detach().cpu().reshape(-1, width)
    n = x.shape[0]
    if n == 0:
        raise InputError(f"no captured inputs for {what}; AWQ needs calibration tokens")
    if config.n_samples and n > config.n_samples:
        gen = torch.Generator().manual_seed(config.seed)
        x = x[torch.randperm(n, generator=gen)[: config.n_samples].sort().values]
    x = x.double()
    return _Stats((x.T @ x / x.shape[0]).numpy(), x.abs().mean(0).numpy())


def _weight(module: torch.nn.Module) -> np.ndarray:
    return module.weight.detach().float().cpu().numpy()


def _quantized(w: np.ndarray, qtype: QType) -> np.ndarray:
    return as_grid(qtype).quantize_roundtrip(np.ascontiguousarray(w, dtype=np.float32))[1]


def _row_errors(delta: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """``diag(D G D^T)``: each output channel's mean squared error over the sample."""
    d = np.asarray(delta, dtype=np.float64)
    return ((d @ gram) * d).sum(1)


def output_error(weight: np.ndarray, effective: np.ndarray, inputs: torch.Tensor) -> float:
    """Mean squared output error per token, ``||X W^T - X E^T||^2 / n``, of a linear whose float weight
    ``weight`` is replaced by ``effective`` (for scaled weights ``Q(W s) / s``), on inputs (..., in).
    The searches compute this quantity through the Gram matrix; exposed to check them against."""
    x = inputs.detach().reshape(-1, weight.shape[1]).double().cpu().numpy()
    d = np.asarray(weight, np.float64) - np.asarray(effective, np.float64)
    return float(((x @ d.T) ** 2).sum() / x.shape[0])


# ---- scales ---------------------------------------------------------------------------------


def _candidate_scales(mean_abs: np.ndarray, alpha: float) -> torch.Tensor:
    torch = require("torch", "torch")
    if alpha == 0.0:
        return torch.ones(mean_abs.shape, dtype=torch.float32)  # exactly 1, so alpha = 0 is RTN bit for bit
    s = np.maximum(mean_abs, _MIN_STAT) ** alpha
    return torch.from_numpy((s / np.sqrt(s.max() * s.min())).astype(np.float32))


def _group_error(weights: dict[str, np.ndarray], qtypes: dict[str, QType], s: torch.Tensor,
                 gram: np.ndarray) -> float:
    s_np = s.numpy()
    total = 0.0
    for name, w in weights.items():
        q = _quantized(w * s_np, qtypes[name])
        total += float(_row_errors(w.astype(np.float64) - q.astype(np.float64) / s_np, gram).sum())
    return total


def _search(group: ScaleGroup, layer: torch.nn.Module, stats: _Stats, qtype_of: QTypeOf,
            config: AWQConfig) -> GroupResult:
    weights = {name: _weight(layer.get_submodule(name)) for name in group.linears}
    qtypes = {name: qtype_of(name) for name in group.linears}
    error_rtn = _group_error(weights, qtypes, _candidate_scales(stats.mean_abs, 0.0), stats.gram)
    reason = _skip_reason(group, layer)
    if reason:
        return GroupResult(group.prev, group.linears, None, None, error_rtn, error_rtn, skipped=reason)
    best_alpha, best_s, best_error = 0.0, None, error_rtn
    for alpha in config.alphas[1:]:
        s = _candidate_scales(stats.mean_abs, alpha)
        err = _group_error(weights, qtypes, s, stats.gram)
        if err < best_error:  # strict: ties keep the smaller alpha, down to RTN
            best_alpha, best_s, best_error = alpha, s, err
    return GroupResult(group.prev, group.linears, best_alpha, best_s, error_rtn, best_error)


def _skip_reason(group: ScaleGroup, layer: torch.nn.Module) -> str | None:
    torch = require("torch", "torch")
    prev = layer.get_submodule(group.prev)
    width = prev.out_features if isinstance(prev, torch.nn.Linear) else prev.weight.shape[0]
    for name in group.linears:
        lin = layer.get_submodule(name)
        if lin.in_features != width:
            return (f"{group.prev} has {width} output channels and {name} reads {lin.in_features}: they do "
                    "not map one to one (grouped-query attention), so no scale can move between them")
    return None


def search_scales(group: ScaleGroup, layer: torch.nn.Module, inputs: torch.Tensor, qtype_of: QTypeOf,
                  config: AWQConfig | None = None) -> GroupResult:
    """Find the AWQ scale of one group without changing the layer.

    ``inputs`` are the captured inputs of the group's linears, shape (..., in) (they share one input);
    ``qtype_of(name)`` gives each linear's target ggml type. Tries ``s = mean|x| ** alpha`` (normalized
    by ``sqrt(max * min)``) for every alpha of the config, quantizes ``W diag(s)`` onto each linear's
    grid and keeps the alpha with the lowest summed output error. A group whose ``prev`` does not map
    one to one onto the linears' inputs comes back skipped, with ``alpha`` None.
    """
    config = config or AWQConfig()
    width = layer.get_submodule(group.linears[0]).in_features
    return _search(group, layer, _stats(inputs, config, width, group.linears[0]), qtype_of, config)


def apply_scales(group: ScaleGroup, layer: torch.nn.Module, s: torch.Tensor) -> None:
    """Scale the group's linears' input columns by ``s`` and divide ``prev`` by ``s``, in place.

    ``prev`` is an RMSNorm (its weight is divided) or a Linear (its output rows and bias are divided).
    The float layer computes the same function afterwards, up to float32 rounding.
    """
    torch = require("torch", "torch")
    with torch.no_grad():
        reason = _skip_reason(group, layer)
        if reason:
            raise InputError(f"cannot apply AWQ scales: {reason}")
        s = s.detach().float().cpu()
        if s.ndim != 1 or not bool(torch.all(s > 0)) or not bool(torch.all(torch.isfinite(s))):
            raise InputError("AWQ scales must be a 1-D tensor of finite positive values, one per channel")
        prev = layer.get_submodule(group.prev)
        if isinstance(prev, torch.nn.Linear):
            _set(prev.weight, prev.weight.float() / s[:, None])
            if prev.bias is not None:
                _set(prev.bias, prev.bias.float() / s)
        else:
            if getattr(prev, "weight", None) is None or prev.weight.ndim != 1:
                raise InputError(f"{group.prev} has no per-channel weight to absorb AWQ scales")
            _set(prev.weight, prev.weight.float() / s)
        for name in group.linears:
            lin = layer.get_submodule(name)
            _set(lin.weight, lin.weight.float() * s[None, :])


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(device=param.device, dtype=param.dtype))


# ---- clipping -------------------------------------------------------------------------------


def _clip(linear: torch.nn.Module, stats: _Stats, qtype: QType, config: AWQConfig,
          name: str = "") -> ClipResult:
    torch = require("torch", "torch")
    w = _weight(linear)
    rows, width = w.shape
    bs = as_grid(qtype).block
    if bs == 1:  # float types: nothing to clip
        err = float(_row_errors(w.astype(np.float64) - _quantized(w, qtype), stats.gram).sum())
        return ClipResult(name, err, err, np.ones((rows, 0)))
    nb = -(-width // bs)  # a grid that pads a row's last block (MLC's groups) clips that block's real weights
    wide = nb * bs
    idx = np.arange(nb)

    def widen(a: np.ndarray) -> np.ndarray:  # zero padding: no error, no say in a block's max
        if wide == width:
            return a
        out = np.zeros((a.shape[0], wide), dtype=a.dtype)
        out[:, :width] = a
        return out

    gram = widen(widen(stats.gram).T).T if wide != width else stats.gram
    # A block's own output error ignores cross-block terms (AWQ's per-group loss); diag blocks of G.
    g_blocks = gram.reshape(nb, bs, nb, bs)[idx, :, idx, :]  # (nb, bs, bs)
    blocks = widen(w).reshape(rows, nb, bs)
    amax = np.abs(blocks).max(-1, keepdims=True)
    w64 = w.astype(np.float64)
    wide64 = widen(w64)

    def block_errors(q: np.ndarray) -> np.ndarray:
        d = (wide64 - widen(q)).reshape(rows, nb, bs).transpose(1, 0, 2)  # (nb, rows, bs)
        return ((d @ g_blocks) * d).sum(-1).T  # (rows, nb)

    best = block_errors(_quantized(w, qtype))
    best_w = blocks.copy()
    ratios = np.ones((rows, nb))
    for r in config.clip_ratios[1:]:
        lim = amax * np.float32(r)
        cand = np.clip(blocks, -lim, lim)
        err = block_errors(_quantized(cand.reshape(rows, wide)[:, :width], qtype))
        better = err < best
        best = np.where(better, err, best)
        best_w[better] = cand[better]
        ratios[better] = r

    # Blocks quantize independently, but cross-block terms of the output error do not vanish: keep a
    # row's clipping only where its full error drops, so clipping never hurts on the sample.
    clipped = np.ascontiguousarray(best_w.reshape(rows, wide)[:, :width])
    before = _row_errors(w64 - _quantized(w, qtype), stats.gram)
    after = _row_errors(w64 - _quantized(clipped, qtype), stats.gram)
    keep = after < before
    clipped = np.where(keep[:, None], clipped, w)
    ratios[~keep] = 1.0
    with torch.no_grad():
        _set(linear.weight, torch.from_numpy(clipped))
    return ClipResult(name, float(before.sum()), float(np.where(keep, after, before).sum()), ratios)


def search_clip(linear: torch.nn.Module, inputs: torch.Tensor, qtype: QType,
                config: AWQConfig | None = None) -> ClipResult:
    """AWQ's weight clipping onto ``qtype``'s grid, in place.

    For each ggml block (32 or 256 weights along the input dimension) tries clamping the weights to
    ``ratio * max|w|`` for the config's ratios (1.0 first) and keeps the ratio with the lowest output
    error of that block on ``inputs`` (..., in); a row keeps its clipping only if its full output error
    drops too. The error is measured against the float weights as they were, so it never increases.
    """
    config = config or AWQConfig()
    return _clip(linear, _stats(inputs, config, linear.in_features, "the linear"), qtype, config)


# ---- one layer ------------------------------------------------------------------------------


def awq_layer(layer: torch.nn.Module, captured_inputs: Mapping[str, torch.Tensor], qtype_of: QTypeOf,
              config: AWQConfig | None = None, arch: str | AWQLayout = "llama") -> AWQReport:
    """Run AWQ on one decoder layer in place: every scale group of the architecture in order (search,
    then apply), then the clip search on every linear not in the layout's ``no_clip``.

    ``captured_inputs`` maps each linear's module name (``"self_attn.q_proj"``) to the inputs the float
    layer gave it, shape (..., in), captured before this call; ``arch`` is a GGUF architecture, a
    Hugging Face class name or an :class:`AWQLayout`. After the call the linears' inputs are the
    captured ones divided by :attr:`AWQReport.input_scales` (see :meth:`AWQReport.rescale_inputs`).
    """
    config = config or AWQConfig()
    layout = arch if isinstance(arch, AWQLayout) else awq_layout(arch)
    missing = [g.linears[0] for g in layout.groups if not any(n in captured_inputs for n in g.linears)]
    if missing:
        raise InputError(f"AWQ needs the captured inputs of {', '.join(missing)}; capture the linears' "
                         "inputs by running the float layer before calling awq_layer")
    report = AWQReport()
    stats: dict[str, _Stats] = {}
    for group in layout.groups:
        name = next(n for n in group.linears if n in captured_inputs)  # they share one input
        st = _stats(captured_inputs[name], config, layer.get_submodule(name).in_features, name)
        result = _search(group, layer, st, qtype_of, config)
        if result.scales is not None:
            apply_scales(group, layer, result.scales)
            st = st.scaled(result.scales)
        report.groups.append(result)
        stats.update(dict.fromkeys(group.linears, st))
    if config.clip:
        for name in layout.linears:
            if name not in layout.no_clip:
                report.clips.append(_clip(layer.get_submodule(name), stats[name], qtype_of(name), config, name))
    return report
