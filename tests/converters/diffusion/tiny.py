"""Tiny diffusers pipelines built in the test (seconds to make, a few thousand parameters)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_UNET: dict[str, Any] = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
    "block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "num_class_embeds": 10, "norm_num_groups": 4,
    "attention_head_dim": 8,
}
SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
             "prediction_type": "v_prediction", "clip_sample": True}


def tiny_pipeline(path: Path, seed: int = 0, info: dict[str, Any] | None = None, **overrides: Any) -> Path:
    """A random class-conditional UNet2DModel pipeline folder at ``path``."""
    import torch
    from diffusers import UNet2DModel

    from edgekit.converters.diffusion.pipeline import save_pipeline

    torch.manual_seed(seed)
    unet = UNet2DModel(**{**TINY_UNET, **overrides})
    save_pipeline(path, unet, SCHEDULER, info)
    return path
