"""Round-to-nearest QuantWeights made in numpy and the shared tiny pipeline at 16x16: what the diffusion export,
runtime and CLI tests build on (seconds, no trained weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.converters.diffusion.tiny import TINY_UNET, tiny_pipeline


def tiny_unet(conditional: bool = True, seed: int = 0):
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**{**TINY_UNET, "sample_size": 16, "num_class_embeds": 10 if conditional else None}).eval()


def pipeline16(path: Path, conditional: bool = True, seed: int = 0) -> Path:
    """The shared tiny pipeline at 16x16 (conditional or not) that says it samples 4 DDIM steps."""
    return tiny_pipeline(path, seed, {"sampler": "ddim", "steps": 4}, sample_size=16,
                         num_class_embeds=10 if conditional else None)


def rtn(w: np.ndarray, bits: int, block: int | None = None, signed: bool = True, lowrank: int = 0,
        fp16_scale: bool = True):
    """``w`` rounded to nearest on a ``bits``-bit grid, ``block`` inputs per scale (None: one per row), scales
    rounded to float16 (as edgekit's grids do) unless not ``fp16_scale``; ``lowrank``: add a random rank-r
    float branch (the export must carry it, whatever its values)."""
    from edgekit.converters.diffusion.qweights import QuantWeight

    out = w.shape[0]
    m = w.reshape(out, -1).astype(np.float32)
    cols = m.shape[1]
    block = block if block and cols % block == 0 else cols
    blk = m.reshape(out, cols // block, block)
    if signed:
        qmax = (1 << (bits - 1)) - 1
        scale = np.abs(blk).max(-1) / qmax
        scale[scale == 0] = 1
        q = np.clip(np.round(blk / scale[..., None]), -qmax - 1, qmax).astype(np.int8)
        zero = None
    else:
        qmax = (1 << bits) - 1
        lo, hi = blk.min(-1), blk.max(-1)
        scale = (hi - lo) / qmax
        scale[scale == 0] = 1
        zero = np.clip(np.round(-lo / scale), 0, qmax).astype(np.uint8)
        q = np.clip(np.round(blk / scale[..., None]) + zero[..., None], 0, qmax).astype(np.uint8)
    lr = None
    if lowrank:
        rng = np.random.default_rng(0)
        # float16 values: the factors are stored in float16
        lr = ((rng.standard_normal((out, lowrank)) * 0.05).astype(np.float16).astype(np.float32),
              rng.standard_normal((lowrank, cols)).astype(np.float16).astype(np.float32))
    scale = scale.astype(np.float16 if fp16_scale else np.float32).astype(np.float32)
    return QuantWeight(q.reshape(out, cols), scale, zero, bits, block, signed, tuple(w.shape), lr)


def rtn_weights(unet, bits: int, block: int | None = None, signed: bool = True, lowrank: int = 0,
                fp16_scale: bool = True) -> dict:
    """Every conv and linear weight of ``unet`` (not the embeddings), keyed by parameter name."""
    return {k: rtn(v.numpy(), bits, block, signed, lowrank, fp16_scale) for k, v in unet.state_dict().items()
            if k.endswith(".weight") and v.ndim in (2, 4) and "embedding" not in k}


def dequantized_unet(unet, weights: dict):
    """A copy of ``unet`` whose weights are ``weights`` dequantized (the reference for a quantized graph)."""
    import copy

    import torch

    ref = copy.deepcopy(unet)
    state = ref.state_dict()
    for k, qw in weights.items():
        state[k] = torch.from_numpy(qw.dequantize().astype(np.float32))
    ref.load_state_dict(state)
    return ref


def install_rtn_quantizer(monkeypatch) -> None:
    """Stand in for edgekit.converters.diffusion.quantize (its own helper writes it) with numpy RTN."""
    import sys
    import types

    mod = types.ModuleType("edgekit.converters.diffusion.quantize")

    def quantize_unet(pipe, unet, bits, method="rtn", lowrank=0, progress=None, block_size=None):
        return rtn_weights(unet, bits, block_size or (None if bits == 8 else 8), signed=True, lowrank=lowrank)

    mod.quantize_unet = quantize_unet
    monkeypatch.setitem(sys.modules, "edgekit.converters.diffusion.quantize", mod)
