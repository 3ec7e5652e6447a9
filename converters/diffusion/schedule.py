"""Noise schedules and sampler steps of discrete-time diffusion models, as plain array maths.

One implementation serves training (torch tensors), distillation and the runtime (numpy arrays with
onnxruntime or Core ML): every function takes arrays of either kind and scalars. The formulas are the
ones diffusers' ``DDPMScheduler``/``DDIMScheduler`` (eta 0) and ``LCMScheduler`` use, so a pipeline folder's
``scheduler_config.json`` means the same here as there (tests compare step by step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgekit.errors import UnsupportedError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("trailing", "leading", "linspace")


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], dtype=np.float64)


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete noise schedule: ``alphas_cumprod[t]`` for ``t`` in ``0..num_train_timesteps-1``.

    prediction_type: what the network predicts (epsilon, v_prediction or sample).
    set_alpha_to_one: the last DDIM step lands on a clean image (alpha 1) rather than on ``t=0``.
    clip_sample: predicted clean images are clipped to ``[-clip_sample_range, clip_sample_range]``.
    sigma_data, timestep_scaling: the consistency-model boundary scalings (LCM's defaults).
    """

    alphas_cumprod: np.ndarray
    prediction_type: str = "epsilon"
    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NoiseSchedule:
        """The schedule a diffusers ``scheduler_config.json`` describes; unsupported settings are refused."""
        n = int(config.get("num_train_timesteps", 1000))
        kind = config.get("beta_schedule", "linear")
        start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
        if config.get("trained_betas") is not None:
            betas = np.asarray(config["trained_betas"], dtype=np.float64)
        elif kind == "linear":
            betas = np.linspace(start, end, n, dtype=np.float64)
        elif kind == "scaled_linear":
            betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
        elif kind == "squaredcos_cap_v2":
            betas = _cosine_betas(n)
        else:
            raise UnsupportedError(f"beta_schedule {kind!r} is not supported (supported: {', '.join(BETA_SCHEDULES)})")
        pred = config.get("prediction_type", "epsilon")
        if pred not in PREDICTION_TYPES:
            raise UnsupportedError(f"prediction_type {pred!r} is not supported ({', '.join(PREDICTION_TYPES)})")
        if config.get("rescale_betas_zero_snr"):
            raise UnsupportedError("rescale_betas_zero_snr schedules are not supported; convert the scheduler "
                                   "config without it")
        # float32 like diffusers, so that a step here and there round alike
        abar = np.cumprod(1.0 - betas.astype(np.float32), dtype=np.float32).astype(np.float64)
        return cls(alphas_cumprod=abar, prediction_type=pred,
                   set_alpha_to_one=bool(config.get("set_alpha_to_one", True)),
                   clip_sample=bool(config.get("clip_sample", False)),
                   clip_sample_range=float(config.get("clip_sample_range", 1.0)),
                   timestep_scaling=float(config.get("timestep_scaling", 10.0)))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def alpha(self, t: int) -> float:
        """``alphas_cumprod[t]``; ``t < 0`` is the clean end (1, or ``alphas_cumprod[0]``)."""
        if t < 0:
            return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])
        return float(self.alphas_cumprod[t])

    def timesteps(self, n: int, spacing: str = "trailing") -> list[int]:
        """The ``n`` timesteps a DDIM sampler visits, high to low (diffusers' ``timestep_spacing``)."""
        T = self.num_train_timesteps
        if not 1 <= n <= T:
            raise ValueError(f"steps must be between 1 and {T}")
        if spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        elif spacing == "leading":
            ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64)
        elif spacing == "linspace":
            ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        else:
            raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}")
        return [int(t) for t in ts]

    def alphas(self, t: Any, like: Any) -> Any:
        """:meth:`alpha` of a scalar ``t``, or of one timestep per batch item (an array/tensor, ``-1`` the
        clean end) shaped to broadcast against the batch ``like``."""
        if np.isscalar(t) or getattr(t, "ndim", 1) == 0:
            return self.alpha(int(t))
        return _gather(np.concatenate([[self.alpha(-1)], self.alphas_cumprod]), t + 1, like)

    def split(self, x: Any, out: Any, t: Any) -> tuple[Any, Any]:
        """The clean image and the noise that the network output ``out`` at ``(x, t)`` stands for (``t`` a
        scalar or one timestep per batch item)."""
        a = self.alphas(t, x)
        sa, sb = a**0.5, (1 - a) ** 0.5
        if self.prediction_type == "epsilon":
            x0, eps = (x - sb * out) / sa, out
        elif self.prediction_type == "sample":
            x0, eps = out, (x - sa * out) / sb
        else:  # v_prediction
            x0, eps = sa * x - sb * out, sa * out + sb * x
        if self.clip_sample:
            r = self.clip_sample_range
            x0 = x0.clip(-r, r)
        return x0, eps

    def add_noise(self, x0: Any, noise: Any, t: Any) -> Any:
        """``x_t`` from a clean ``x0``; ``t`` a scalar or one timestep per batch item (a tensor/array)."""
        if np.isscalar(t) or getattr(t, "ndim", 1) == 0:
            a = self.alpha(int(t))
            return a**0.5 * x0 + (1 - a) ** 0.5 * noise
        a = _gather(self.alphas_cumprod, t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise if hasattr(a, "sqrt") else np.sqrt(a) * x0 + np.sqrt(1 - a) * noise

    def ddim_step(self, x: Any, out: Any, t: Any, t_prev: Any) -> Any:
        """One deterministic DDIM step (eta 0) from ``t`` to ``t_prev`` (``t_prev < 0``: to the clean end);
        scalars, or one timestep per batch item."""
        x0, eps = self.split(x, out, t)
        a = self.alphas(t_prev, x)
        return a**0.5 * x0 + (1 - a) ** 0.5 * eps

    def boundary(self, t: int) -> tuple[float, float]:
        """``(c_skip, c_out)`` of a consistency model at ``t``: ``f(x, t) = c_skip x + c_out x0_pred``, equal to
        the identity at ``t = 0`` (LCM's scalings)."""
        s = t * self.timestep_scaling
        d = s * s + self.sigma_data**2
        return self.sigma_data**2 / d, s / d**0.5

    def consistency_timesteps(self, n: int, origin_steps: int = 50) -> list[int]:
        """The ``n`` timesteps a consistency (LCM) sampler visits, high to low: every ``k``-th point of the
        ``origin_steps`` grid it was distilled on (``k = origin_steps // n``), starting from the noisiest."""
        T = self.num_train_timesteps
        if not 1 <= n <= origin_steps:
            raise ValueError(f"steps must be between 1 and {origin_steps} (the distillation grid)")
        grid = np.arange(1, origin_steps + 1) * (T // origin_steps) - 1
        idx = np.floor(np.linspace(0, origin_steps, n, endpoint=False)).astype(np.int64)
        return [int(t) for t in grid[::-1][idx]]


def _gather(table: np.ndarray, t: Any, like: Any) -> Any:
    """``table[t]`` shaped to broadcast against a batch ``like`` (torch tensor or numpy array)."""
    shape = (-1,) + (1,) * (like.ndim - 1)
    if isinstance(like, np.ndarray):
        return table[np.asarray(t)].astype(like.dtype).reshape(shape)
    import torch

    return torch.as_tensor(table, dtype=like.dtype, device=like.device)[t.long()].reshape(shape)
