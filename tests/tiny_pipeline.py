"""A tiny class-conditional diffusers pipeline built in the test (random weights, 16x16 one channel, the
miniature's block layout at a fraction of its width): seconds to build and to sample from."""

from __future__ import annotations

from pathlib import Path

TINY_UNET = {
    "sample_size": 16, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
    "block_out_channels": [8, 16, 16],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "num_class_embeds": 10, "norm_num_groups": 4, "attention_head_dim": 8, "add_attention": True,
}


def make_tiny_pipeline(out: Path, seed: int = 0) -> Path:
    """Write the tiny pipeline into ``out`` (with the miniature's scheduler) and return ``out``."""
    from edgekit.converters.diffusion.miniature import SCHEDULER_CONFIG, new_unet
    from edgekit.converters.diffusion.pipeline import save_pipeline

    save_pipeline(out, new_unet(seed, TINY_UNET), SCHEDULER_CONFIG, {"sampler": "ddim", "steps": 50})
    return out
