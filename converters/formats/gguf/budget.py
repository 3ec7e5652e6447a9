"""GGUF's mixed precision to a size budget (``--bpw X``): each tensor's ggml type chosen by measured
sensitivity, through the format-neutral allocator (:mod:`edgekit.converters.quantize.allocate`).

For every quantizable tensor and every ggml type its rows can hold, the error is measured as the
Hessian-weighted output error ``trace((W - Q(W)) H (W - Q(W))^T)`` on calibration activations of the
float model (H from the same hooks the calibrated methods use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from edgekit.converters.quantize.allocate import Item, allocate
from edgekit.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Callable

    from edgekit.calibration import CalibConfig
    from edgekit.model import HFCheckpoint

T = gguf.GGMLQuantizationType
# Candidate types, cheapest first; K-quants only where a row holds whole 256-weight super-blocks.
_K = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
_LEGACY = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)


def candidates(row_width: int, allowed: frozenset[gguf.GGMLQuantizationType] | None = None,
               ) -> list[gguf.GGMLQuantizationType]:
    """Types a row of ``row_width`` weights can hold, restricted to ``allowed`` when given."""
    out = [t for t in _LEGACY if row_width % 32 == 0]
    if row_width % 256 == 0:
        out += list(_K)
    return [t for t in out if allowed is None or t in allowed]


def type_bytes(qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1])) * (shape[-1] // block) * size


def measure(ckpt: HFCheckpoint, quantizable: dict[str, tuple[int, ...]], calib: CalibConfig,
            progress: Callable[[str, int, int], None] | None = None,
            allowed: frozenset[gguf.GGMLQuantizationType] | None = None) -> list[Item]:
    """Errors of every candidate type for every quantizable tensor (GGUF names -> numpy shapes)."""
    from edgekit.converters.quantize import gptq_kernel
    from edgekit.converters.quantize.pipeline import LayerPipeline

    hessians = LayerPipeline(calib).float_hessians(ckpt, progress)
    hf_of = {ckpt.spec.gguf_name(h): h for h in ckpt.tensors}
    items = []
    for i, (name, shape) in enumerate(quantizable.items()):
        if progress:
            progress(f"measuring sensitivity of {name}", i, len(quantizable))
        H = hessians[name]
        W = ckpt.load(hf_of[name])
        imatrix = np.diag(H).astype(np.float32)
        item = Item(name)
        for t in candidates(shape[-1], allowed):
            # importance-weighted RTN: closer to what the calibrated methods will store than plain RTN
            err = gptq_kernel.hessian_error(W, gptq_kernel.rtn(W, t, imatrix=imatrix).weight, H)
            item.options.append((t, type_bytes(t, shape), err))
        items.append(item)
    return items


def assign(ckpt: HFCheckpoint, quantizable: dict[str, tuple[int, ...]], fixed_bytes: int, n_params: int,
           bpw: float, calib: CalibConfig, progress: Callable[[str, int, int], None] | None = None,
           allowed: frozenset[gguf.GGMLQuantizationType] | None = None, what: str | None = None,
           metadata_bytes: int = 0) -> tuple[dict[str, gguf.GGMLQuantizationType], dict[str, Any]]:
    """Types for the quantizable tensors so the whole file lands at ``bpw`` bits per weight. ``what``: the
    option that set the budget, for the error (default ``--bpw X``); ``metadata_bytes``: what the file
    holds besides tensors, for the smallest file size the error names."""
    budget = int(bpw * n_params / 8) - fixed_bytes
    for name, shape in quantizable.items():
        if not candidates(shape[-1], allowed):
            raise InputError(f"none of the allowed types fits {name} (rows of {shape[-1]}); allow more types")
    floor = fixed_bytes + sum(type_bytes(candidates(s[-1], allowed)[0], s) for s in quantizable.values())
    if budget + fixed_bytes < floor:
        raise InputError(f"{what or f'--bpw {bpw:g}'} is below the smallest file possible here "
                         f"({(floor + metadata_bytes) / 1e6:.1f} MB, {8 * floor / n_params:.2f} bpw); raise it or "
                         "allow more types")
    items = measure(ckpt, quantizable, calib, progress, allowed)
    types = allocate(items, budget)
    spent = sum(type_bytes(types[it.name], quantizable[it.name]) for it in items)
    return types, {"bpw_target": round(bpw, 4), "bpw_planned": round(8 * (spent + fixed_bytes) / n_params, 4),
                   "errors": {it.name: {t.name: e for t, _, e in it.options} for it in items}}
