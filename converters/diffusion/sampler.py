"""Sampling loops over any denoiser: a PyTorch UNet, an onnxruntime session, a Core ML model.

A denoiser is a callable ``model(x, t, labels) -> output`` on numpy arrays (``x``: ``[n, c, h, w]``
float32, ``t``: an int timestep, ``labels``: ``[n]`` int64 or None). One that also has
``full(x, t, labels) -> (output, cache)`` and ``shallow(x, t, labels, cache) -> output`` can be sampled
with DeepCache-style feature caching: the deep part of the network runs every ``cache_interval``-th step
and its features are reused by the shallow steps in between.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekit.converters.diffusion.schedule import NoiseSchedule

SAMPLERS = ("ddim", "consistency")


@dataclass(frozen=True)
class SampleConfig:
    """How to sample.

    sampler: "ddim" (deterministic DDIM, any diffusion model) or "consistency" (multistep consistency
        sampling, for a distilled few-step student).
    steps: network evaluations per image.
    spacing: DDIM's timestep spacing ("trailing" suits few steps).
    origin_steps: the grid a consistency model was distilled on.
    cache_interval: DeepCache: the deep features are recomputed every this many steps (1: no caching).
    seed: the starting noise (and the noise a consistency sampler adds between steps).
    """

    sampler: str = "ddim"
    steps: int = 50
    spacing: str = "trailing"
    origin_steps: int = 50
    cache_interval: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}")
        if self.steps < 1:
            raise ValueError("steps must be at least 1")
        if self.cache_interval < 1:
            raise ValueError("cache_interval must be at least 1")

    def timesteps(self, schedule: NoiseSchedule) -> list[int]:
        if self.sampler == "consistency":
            return schedule.consistency_timesteps(self.steps, self.origin_steps)
        return schedule.timesteps(self.steps, self.spacing)

    def full_steps(self) -> list[int]:
        """The step indices that run the whole network (the rest reuse cached deep features)."""
        return [i for i in range(self.steps) if i % self.cache_interval == 0]


@dataclass
class SampleTrace:
    """What a sampling run did: the timesteps, which steps ran the whole network, seconds per step."""

    timesteps: list[int] = field(default_factory=list)
    full: list[bool] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)


def sample(model: Callable[..., np.ndarray], schedule: NoiseSchedule, shape: tuple[int, ...],
           cfg: SampleConfig, labels: np.ndarray | None = None, trace: SampleTrace | None = None,
           progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Images ``[n, c, h, w]`` in ``[-1, 1]`` sampled from noise with ``model``."""
    import time

    rng = np.random.default_rng(cfg.seed)
    x = rng.standard_normal(shape).astype(np.float32)
    ts = cfg.timesteps(schedule)
    caching = cfg.cache_interval > 1
    if caching and not (hasattr(model, "full") and hasattr(model, "shallow")):
        raise ValueError("this model has no shallow graph: DeepCache needs one (export it with caching)")
    cache: Any = None
    for i, t in enumerate(ts):
        t0 = time.perf_counter()
        full = not caching or i % cfg.cache_interval == 0
        if not caching:
            out = model(x, t, labels)
        elif full:
            out, cache = model.full(x, t, labels)  # type: ignore[attr-defined]
        else:
            out = model.shallow(x, t, labels, cache)  # type: ignore[attr-defined]
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        if cfg.sampler == "ddim":
            x = schedule.ddim_step(x, out, t, t_prev).astype(np.float32)
        else:
            x0, _ = schedule.split(x, out, t)
            c_skip, c_out = schedule.boundary(t)
            x0 = c_skip * x + c_out * x0
            x = (x0 if t_prev < 0 else schedule.add_noise(x0, rng.standard_normal(shape), t_prev)).astype(np.float32)
        if trace is not None:
            trace.timesteps.append(t)
            trace.full.append(full)
            trace.step_seconds.append(time.perf_counter() - t0)
        if progress is not None:
            progress(i + 1, len(ts))
    return x.clip(-1.0, 1.0)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``[n, c, h, w]`` in ``[-1, 1]`` to ``[n, h, w, c]`` uint8."""
    return ((images.transpose(0, 2, 3, 1) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def grid_png(images: np.ndarray, path: Any, scale: int = 4, cols: int | None = None) -> None:
    """Write images ``[n, c, h, w]`` in ``[-1, 1]`` as one PNG grid, each pixel ``scale`` wide (PNG whatever
    ``path``'s suffix: it may be a temporary name)."""
    from PIL import Image

    u8 = to_uint8(images)
    n, h, w, c = u8.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    canvas = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        canvas[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + k * (w + 1): 1 + k * (w + 1) + w] = u8[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path, format="PNG")
