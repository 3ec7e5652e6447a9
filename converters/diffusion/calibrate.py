"""Calibration of a UNet's quantizers across the timesteps of its own sampler (Q-Diffusion).

A diffusion UNet's activations change with the timestep, so inputs from one ``t`` (or from noised training
images) calibrate badly. Here the pipeline samples from noise with its own sampler (DDIM for a teacher,
consistency sampling for a distilled student) and every quantized layer's inputs are gathered at
``timesteps`` steps spread evenly over the trajectory, for all the pipeline's classes in turn. What is kept
per layer is GPTQ's Hessian proxy ``H = sum x x^T`` (a conv's inputs are its unfolded patches, so ``H`` is
``(cin*kh*kw)^2``), plus the UNet inputs of those steps, on which a quantized UNet's output error is measured.

Layers fed by the embeddings alone (the time-embedding MLP, each resnet's ``time_emb_proj``) see every step
of the trajectory instead: their input is a function of ``(t, class)`` only, so a handful of timesteps would
leave their Hessian of rank ``timesteps`` and GPTQ would fit those ``t`` at the others' expense.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekit.progress import ProgressFn, no_progress

#: patches (rows of a layer's unfolded input) kept per layer per network call: a random subset beyond this
MAX_ROWS = 4096
#: DDIM steps of a calibration trajectory at most: the states a 50-step trajectory visits, at half the cost
DDIM_STEPS = 25
#: images sampled per trajectory (a larger calibration set runs several)
BATCH = 32


@dataclass
class Calibration:
    """hessians: layer name -> ``sum x x^T`` float64 ``(in, in)``; rows: how many input rows each summed.
    inputs: the UNet's inputs ``(x_t, t, labels)`` at the calibrated steps (labels None: unconditional)."""

    hessians: dict[str, np.ndarray] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    inputs: list[tuple[np.ndarray, int, np.ndarray | None]] = field(default_factory=list)


def quantizable_layers(unet: Any) -> dict[str, Any]:
    """Every ``Conv2d`` and ``Linear`` of the UNet by module name (the weight is ``name + ".weight"``)."""
    import torch

    return {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


def layer_rows(module: Any, x: Any) -> Any:
    """The rows a layer multiplies by its weight ``[out, in]``: a conv's unfolded patches, a linear's inputs."""
    import torch

    if isinstance(module, torch.nn.Conv2d):
        cols = torch.nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def calibrate(pipe: Any, unet: Any, layers: dict[str, Any], images: int = 64, timesteps: int = 8, seed: int = 0,
              progress: ProgressFn = no_progress) -> Calibration:
    """Sample ``images`` images with the pipeline's own sampler and ``unet``, gathering each of ``layers``'
    Hessian at ``timesteps`` steps of the trajectory (see the module's docstring)."""
    import torch

    from edgekit.converters.diffusion.pipeline import torch_denoiser
    from edgekit.converters.diffusion.sampler import SampleConfig, sample

    schedule = pipe.schedule()
    steps = pipe.default_steps if pipe.sampler != "ddim" else min(pipe.default_steps, max(DDIM_STEPS, timesteps))
    cfg = SampleConfig(sampler=pipe.sampler, steps=steps, seed=seed,
                       origin_steps=int(pipe.info.get("origin_steps", 50)))
    n_steps = len(cfg.timesteps(schedule))
    chosen = set(np.linspace(0, n_steps - 1, min(timesteps, n_steps)).round().astype(int).tolist())
    cal = Calibration()
    acc = {n: torch.zeros(_width(m), _width(m), dtype=torch.float64) for n, m in layers.items()}
    state = {"active": False, "step": 0}
    gen = torch.Generator().manual_seed(seed)

    def hook(name: str):
        def pre(module: Any, args: tuple) -> None:
            x = args[0].detach().float()
            if not (state["active"] or x.dim() == 2):
                return
            per_image = layer_rows(module, x[:1]).shape[0]
            keep = -(-MAX_ROWS // per_image)
            if x.shape[0] > keep:  # unfold only the images whose patches can be kept
                x = x[torch.randperm(x.shape[0], generator=gen)[:keep]]
            rows = layer_rows(module, x)
            if rows.shape[0] > MAX_ROWS:
                rows = rows[torch.randperm(rows.shape[0], generator=gen)[:MAX_ROWS]]
            acc[name].add_(rows.T @ rows)
            cal.rows[name] = cal.rows.get(name, 0) + rows.shape[0]
        return pre

    denoise = torch_denoiser(unet)

    def model(x: np.ndarray, t: int, labels: np.ndarray | None) -> np.ndarray:
        state["active"] = state["step"] in chosen
        if state["active"]:
            cal.inputs.append((x.copy(), int(t), None if labels is None else labels.copy()))
        state["step"] += 1
        return denoise(x, t, labels)

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    shape = (pipe.in_channels, pipe.sample_size, pipe.sample_size)
    runs = [(i, min(BATCH, images - i)) for i in range(0, images, BATCH)]
    try:
        for k, (start, n) in enumerate(runs):
            labels = (np.arange(start, start + n) % pipe.num_classes).astype(np.int64) if pipe.num_classes else None
            state["step"] = 0
            run_cfg = SampleConfig(sampler=cfg.sampler, steps=cfg.steps, seed=seed + k, origin_steps=cfg.origin_steps)

            def step_progress(done: int, total: int, k: int = k) -> None:
                progress("calibrating: sampling with the UNet", k * total + done, len(runs) * total)

            sample(model, schedule, (n, *shape), run_cfg, labels, progress=step_progress)
    finally:
        for h in handles:
            h.remove()
    cal.hessians = {n: a.numpy() for n, a in acc.items()}
    return cal


def _width(module: Any) -> int:
    w = module.weight
    return int(np.prod(w.shape[1:]))
