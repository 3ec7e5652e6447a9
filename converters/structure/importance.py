"""How much each decoder block changes the hidden state, measured on calibration data.

* block influence (ShortGPT, Men et al. 2024): ``BI_l = 1 - mean_t cos(x_l, x_{l+1})`` over the tokens,
  with ``x_l`` block ``l``'s input; a block whose output equals its input scores 0;
* angular distance (Gromov et al. 2024): ``arccos(cos(x_l, x_{l+n})) / pi`` for every window of ``n``
  consecutive blocks; the smallest marks the ``n`` consecutive blocks that change the state least.

Both are taken on the float model, one forward pass per calibration batch, with hooks on the blocks
(HF's ``output_hidden_states`` applies the final norm to its last entry, which would skew the last block).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable

    from edgekit.calibration import CalibConfig
    from edgekit.model import HFCheckpoint


@dataclass
class LayerImportance:
    """``influence[l]``: block influence of block ``l``; ``angular[n][l]``: angular distance of blocks
    ``l .. l+n-1`` (for the window sizes asked for)."""

    influence: list[float]
    angular: dict[int, list[float]] = field(default_factory=dict)

    def least_influential(self, k: int) -> list[int]:
        """The ``k`` blocks of lowest influence, in layer order."""
        return sorted(int(i) for i in np.argsort(self.influence, kind="stable")[:k])

    def best_window(self, n: int) -> list[int]:
        """The ``n`` consecutive blocks of smallest angular distance."""
        d = self.angular[n]
        start = int(np.argmin(d))
        return list(range(start, start + n))


def block_stats(model: Any, ids: Any, batch: int, windows: tuple[int, ...] = (),
                progress: Callable[[str, int, int], None] | None = None) -> LayerImportance:
    """Influence (and angular distances for ``windows``) of every block of a loaded HF causal LM."""
    import torch

    layers = model.model.layers
    n = len(layers)
    sums = np.zeros(n)
    ang = {w: np.zeros(n - w + 1) for w in windows if 0 < w <= n}
    count = 0
    bounds: list[Any] = [None] * (n + 1)

    def hook(i: int) -> Any:
        def fn(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            bounds[i] = x.detach().float().reshape(-1, x.shape[-1])
            bounds[i + 1] = y.detach().float().reshape(-1, y.shape[-1])
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            for b0 in range(0, ids.shape[0], batch):
                if progress:
                    progress("measuring block importance", b0, ids.shape[0])
                model(ids[b0:b0 + batch], use_cache=False)
                unit = [torch.nn.functional.normalize(b, dim=-1) for b in bounds]
                for i in range(n):
                    sums[i] += float((unit[i] * unit[i + 1]).sum(-1).sum())
                for w, acc in ang.items():
                    for i in range(n - w + 1):
                        cos = (unit[i] * unit[i + w]).sum(-1).clamp(-1.0, 1.0)
                        acc[i] += float(torch.arccos(cos).sum() / np.pi)
                count += bounds[0].shape[0]
    finally:
        for h in handles:
            h.remove()
    return LayerImportance([round(1.0 - s / count, 6) for s in sums],
                           {w: [round(a / count, 6) for a in acc] for w, acc in ang.items()})


def layer_importance(ckpt: HFCheckpoint, calib: CalibConfig, windows: tuple[int, ...] = (), batch: int = 8,
                     progress: Callable[[str, int, int], None] | None = None) -> LayerImportance:
    """:func:`block_stats` on the checkpoint's float model and its calibration tokens."""
    from edgekit.converters.quantize.pipeline import LayerPipeline

    model, ids = LayerPipeline(calib, batch=batch).load(ckpt, progress)
    return block_stats(model, ids, batch, windows, progress)
