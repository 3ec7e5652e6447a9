"""DeepCache for diffusers UNet2DModel: the network split into a full pass that also returns the deep
feature entering the last up block, and a shallow pass (conv_in, the first down block, the last up block,
the output convolution) that reuses that feature.

DeepCache (Ma et al., 2023) rests on the observation that a UNet's deep features change slowly between
sampling steps while the outermost level carries the detail: recomputing only the outer level on most steps
and the whole network every ``cache_interval`` steps trades a little quality for speed. Both passes are
built from the diffusers module's own submodules, so with a fresh cache the shallow pass gives exactly what
the full pass gives; the exporters trace them into graphs and the torch runtime calls them directly.
"""

from __future__ import annotations

from typing import Any


def _modules() -> tuple[Any, Any]:
    """The two traced forwards, built on first use (torch is imported only when exporting)."""
    import torch

    def embed(u: Any, timestep: Any, labels: Any) -> Any:
        emb = u.time_embedding(u.time_proj(timestep).to(u.dtype))
        return emb if u.class_embedding is None else emb + u.class_embedding(labels).to(u.dtype)

    def head(u: Any, x: Any) -> Any:
        return u.conv_out(u.conv_act(u.conv_norm_out(x)))

    class Full(torch.nn.Module):
        """UNet2DModel.forward, also returning the input of the last up block when ``cache``."""

        def __init__(self, unet: Any, cache: bool) -> None:
            super().__init__()
            self.u, self.cache = unet, cache

        def forward(self, sample: Any, timestep: Any, class_labels: Any = None) -> Any:
            u = self.u
            if u.config.center_input_sample:
                sample = 2 * sample - 1.0
            emb = embed(u, timestep, class_labels)
            x = u.conv_in(sample)
            res: tuple[Any, ...] = (x,)
            for block in u.down_blocks:
                x, r = block(hidden_states=x, temb=emb)
                res += r
            if u.mid_block is not None:
                x = u.mid_block(x, emb)
            deep = x
            for block in u.up_blocks:
                deep = x
                n = len(block.resnets)
                x, res = block(x, res[-n:], emb), res[:-n]
            return (head(u, x), deep) if self.cache else head(u, x)

    class Shallow(torch.nn.Module):
        """The outermost level only, from ``cache`` (the input of the last up block, from a full step)."""

        def __init__(self, unet: Any) -> None:
            super().__init__()
            self.u = unet

        def forward(self, sample: Any, timestep: Any, *rest: Any) -> Any:
            u = self.u
            class_labels, cache = rest if len(rest) == 2 else (None, rest[0])
            if u.config.center_input_sample:
                sample = 2 * sample - 1.0
            emb = embed(u, timestep, class_labels)
            x = u.conv_in(sample)
            _, r = u.down_blocks[0](hidden_states=x, temb=emb)
            last = u.up_blocks[-1]
            return head(u, last(cache, ((x,) + r)[: len(last.resnets)], emb))

    return Full, Shallow


def split_modules(unet: Any, deepcache: bool) -> tuple[Any, Any | None]:
    """``(full, shallow)``: torch modules with the graphs' signatures (shallow None without DeepCache)."""
    Full, Shallow = _modules()
    return Full(unet, deepcache).eval(), (Shallow(unet).eval() if deepcache else None)


def deepcache_default(unet: Any) -> bool:
    """DeepCache pays when there is a deep part to skip: two or more up blocks."""
    return len(unet.up_blocks) >= 2
