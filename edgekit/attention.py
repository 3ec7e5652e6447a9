"""What transformers computes around attention that edgekit's formats reproduce: which layers attend through a
sliding window (and how wide), and the rotary inverse frequencies. The ONNX and Core ML graphs build both
themselves; GGUF stores llama3's frequencies as factors and can only warn about a window (edgekit.arch).

Both follow the installed transformers' configuration and modeling code, not the raw config keys:

* Mistral (``MistralConfig``, default ``sliding_window`` 4096): every layer slides when ``sliding_window``
  is set; ``layer_types`` is not read.
* Qwen2 (``Qwen2Config``): ``sliding_window`` counts only with ``use_sliding_window`` (default false, and
  released Qwen2/2.5 configs carry ``sliding_window`` 32768 or 131072 with it off). Which layers slide is
  ``layer_types`` when the config has it, else layers ``i >= max_window_layers`` (default 28).
* Qwen3 (``Qwen3Config``): Qwen2's rule, with no default ``sliding_window``.
* Llama: no window.
"""

from __future__ import annotations

import math
from typing import Any

from edgekit.errors import UnsupportedError

#: model_type -> (how its layers slide, transformers' default sliding_window)
_WINDOW_RULES: dict[str, tuple[str, int | None]] = {
    "mistral": ("every_layer", 4096),
    "qwen2": ("qwen2", 4096),
    "qwen3": ("qwen2", None),  # Qwen3Config: Qwen2's rule, no default window
}


def layer_windows(config: dict[str, Any], n_layer: int) -> list[int]:
    """The attention window of each layer as transformers builds the model from ``config`` (config.json's
    dict): a query at ``q`` sees keys ``k`` with ``q - window < k <= q``; 0 is full causal attention."""
    rule, default = _WINDOW_RULES.get(str(config.get("model_type", "")), (None, None))
    if rule is None:
        return [0] * n_layer
    window = config.get("sliding_window", default)
    if rule == "every_layer":
        return [int(window or 0)] * n_layer
    if not config.get("use_sliding_window", False):
        window = None
    types = config.get("layer_types")
    if types is None:
        start = int(config.get("max_window_layers", 28))
        types = ["sliding_attention" if window is not None and i >= start else "full_attention"
                 for i in range(n_layer)]
    if len(types) < n_layer:
        raise UnsupportedError(f"config.json's layer_types lists {len(types)} layers for {n_layer}; "
                               "fix layer_types (one entry per layer)")
    return [int(window) if t == "sliding_attention" and window else 0 for t in types[:n_layer]]


def uniform_window(windows: list[int]) -> int:
    """The window every layer shares (0 when none slides or when the layers differ)."""
    return windows[0] if windows and len(set(windows)) == 1 else 0


def inv_freq(hp: Any, dtype: Any = None) -> Any:
    """Rotary inverse frequencies ``(head_dim / 2,)`` with the rope scalings Llama-family checkpoints use, as
    transformers' ``ROPE_INIT_FUNCTIONS`` computes them: default, linear (positions / factor, folded into
    the frequencies) and llama3 (low frequencies divided by ``factor``, high ones kept, smooth between).

    ``dtype`` float32 repeats transformers' arithmetic (base frequencies in float32); float64 gives the exact
    values for tables stored in fp16."""
    import numpy as np

    dim = hp.head_dim
    f = np.dtype(dtype or np.float64).type
    inv = (f(1.0) / (f(hp.rope_theta) ** (np.arange(0, dim, 2).astype(f) / f(dim)))).astype(f)
    sc = hp.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "linear":
        return (inv / f(sc["factor"])).astype(f)
    if kind == "llama3":
        factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old = float(sc["original_max_position_embeddings"])
        inv64 = inv.astype(np.float64)
        wavelen = 2 * math.pi / inv64
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = np.where(wavelen > old / lo, inv64 / factor, inv64)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        return np.where(mid, (1 - smooth) * inv64 / factor + smooth * inv64, scaled).astype(f)
    if kind not in (None, "default"):
        raise UnsupportedError(f"rope scaling {kind!r} is not supported by the ONNX and Core ML exporters yet "
                               "(supported: default, linear, llama3)")
    return inv
