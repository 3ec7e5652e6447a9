"""The built-in miniature: a class-conditional diffusers UNet2DModel on scikit-learn's 8x8 digits.

No pretrained diffusion weights can be fetched offline, so edgekit proves its diffusion path on a model it
trains itself: 1,797 digit images (scaled to 16x16), a ~1.1M-parameter UNet with MobileDiffusion's habits
(attention only at the lowest resolution, few blocks), v-prediction on a cosine schedule. Its weights ship
in ``edgekit/data/digits-unet`` and are reproduced by::

    python -m edgekit.converters.diffusion.miniature -o ./digits-unet --iters 3000 --seed 0 --threads 1

(one thread: summation order, hence the weights' last bits, depends on the thread count).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import MissingDependencyError
from edgekit.progress import ProgressFn, no_progress

SIZE = 16
UNET_CONFIG: dict[str, Any] = {
    "sample_size": SIZE, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "num_class_embeds": 10, "norm_num_groups": 8, "attention_head_dim": 32, "add_attention": True,
}
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction", "clip_sample": True, "clip_sample_range": 1.0,
    "set_alpha_to_one": True, "timestep_spacing": "trailing", "steps_offset": 0,
}


def digits(size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``[n, 1, size, size]`` float32 in ``[-1, 1]`` and their labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise MissingDependencyError("the digits miniature needs scikit-learn: pip install 'edgekit[diffusion]'") from exc
    import torch

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).numpy(), d.target.astype(np.int64)


@dataclass(frozen=True)
class TrainConfig:
    """Training of the miniature teacher.

    iters: optimizer steps (the shipped weights: 3000); batch: images per step; lr: peak learning rate
    (cosine decay after a warmup); ema: decay of the weight average that is saved; seed: everything random.
    minutes: stop early after this long (0: no limit), saving a state that a rerun resumes from.
    save_every: steps between resumable saves.
    """

    iters: int = 3000
    batch: int = 128
    lr: float = 1e-3
    ema: float = 0.999
    seed: int = 0
    minutes: float = 0.0
    save_every: int = 250

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch < 1:
            raise ValueError("iters and batch must be positive")


def new_unet(seed: int = 0, config: dict[str, Any] | None = None) -> Any:
    import torch

    from edgekit.converters.diffusion.pipeline import require_diffusers

    torch.manual_seed(seed)
    return require_diffusers().UNet2DModel(**(config or UNET_CONFIG))


def lr_at(step: int, cfg: TrainConfig) -> float:
    warm = min(200, cfg.iters // 10 + 1)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.iters - warm)))


def train_teacher(out: Path, cfg: TrainConfig = TrainConfig(), state_dir: Path | None = None,
                  progress: ProgressFn = no_progress) -> dict[str, Any]:
    """Train the miniature and write it as a pipeline folder ``out`` (which must not exist yet).

    ``state_dir`` keeps a resumable state (default: ``out`` + ``.train``): a rerun with the same config goes
    on from the last save. Returns the training record (also in the pipeline's edgekit_diffusion.json);
    ``{"finished": False}`` when ``minutes`` ran out first (nothing written to ``out`` then)."""
    import copy

    import torch

    from edgekit.converters.diffusion.pipeline import save_pipeline
    from edgekit.converters.diffusion.schedule import NoiseSchedule
    from edgekit.converters.diffusion.trainstate import clear_state, load_state, save_state

    out = Path(out)
    state_dir = state_dir or out.with_name(out.name + ".train")
    x_all, y_all = digits()
    x_all, y_all = torch.from_numpy(x_all), torch.from_numpy(y_all)
    sched = NoiseSchedule.from_config(SCHEDULER_CONFIG)
    abar = torch.tensor(sched.alphas_cumprod, dtype=torch.float32)
    model = new_unet(cfg.seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    step, losses = 0, []
    restored = load_state(state_dir, model, ema, opt)
    if restored is not None:
        step, extra = restored
        losses = list(extra.get("losses", []))
    t_start, running = time.monotonic(), []
    model.train()
    while step < cfg.iters:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # the batch is a function of the step
        idx = torch.randint(0, len(x_all), (cfg.batch,), generator=g)
        x0, y = x_all[idx], y_all[idx]
        t = torch.randint(0, sched.num_train_timesteps, (cfg.batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = torch.nn.functional.mse_loss(model(xt, t, class_labels=y).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - cfg.ema)
        step += 1
        running.append(float(loss.detach()))
        if step % 50 == 0:
            losses.append([step, round(float(np.mean(running)), 5)])
            running = []
        progress("training the digits UNet", step, cfg.iters)
        if step % cfg.save_every == 0 or step == cfg.iters:
            save_state(state_dir, step, model, ema, opt, {"losses": losses})
        if cfg.minutes and time.monotonic() - t_start > cfg.minutes * 60 and step < cfg.iters:
            save_state(state_dir, step, model, ema, opt, {"losses": losses})
            return {"finished": False, "step": step}
    record = {"sampler": "ddim", "steps": 50, "dataset": "sklearn.datasets.load_digits (16x16)",
              "train": {"iters": cfg.iters, "batch": cfg.batch, "lr": cfg.lr, "ema": cfg.ema, "seed": cfg.seed,
                        "final_loss": losses[-1][1] if losses else None, "torch": torch.__version__}}
    from edgekit.fsutil import atomic_dir

    with atomic_dir(out) as tmp:
        save_pipeline(tmp, ema, SCHEDULER_CONFIG, record)
    clear_state(state_dir)
    state_dir.rmdir() if state_dir.is_dir() and not any(state_dir.iterdir()) else None
    return {"finished": True, **record}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from rich.progress import Progress

    ap = argparse.ArgumentParser(description="Train edgekit's digits UNet (the built-in diffusion model).")
    ap.add_argument("-o", "--out", required=True, type=Path)
    ap.add_argument("--iters", type=int, default=TrainConfig.iters)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1, help="PyTorch threads (1 reproduces the shipped weights)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    cfg = TrainConfig(iters=args.iters, seed=args.seed, minutes=args.minutes)
    with Progress() as bar:
        task = bar.add_task("training", total=cfg.iters)
        rec = train_teacher(args.out, cfg, progress=lambda d, n, t: bar.update(task, completed=n, description=d))
    print(rec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
