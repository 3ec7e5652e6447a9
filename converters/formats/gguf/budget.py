"""GGUF's mixed precision to a size budget (``--bpw X``): each tensor's ggml type chosen by measured
sensitivity, through the format-neutral allocator (:mod:`edgekit.converters.quantize.allocate`).

For every quantizable tensor and every ggml type its rows can hold, the error is measured as the
Hessian-weighted output error ``trace((W - Q(W)) H (W - Q(W))^T)`` on calibration activations of the
float model (H from the same hooks the calibrated methods use).

The candidates are every type llama.cpp runs that a tensor's rows can hold: the 32-weight types (Q4_0 ..
Q8_0 and IQ4_NL) for any row width that is a multiple of 32, and where rows hold whole 256-weight
super-blocks also the K-quants and the i-quants (IQ1_S .. IQ4_XS). Rows that hold no block at all (a width
that is not a multiple of 32) are written F16, as llama.cpp's fallback writes them under any preset: that
is their only candidate, and its bytes count in the budget. The lattice i-quants' encoders search
codebooks and cost seconds per million weights, so on a tensor of more than ``2 * SAMPLE_ROWS`` rows they
are measured on ``SAMPLE_ROWS`` evenly spaced rows, scaled to the whole tensor by the ratio of Q3_K's exact
error to its error on the same rows (a control variate: rows that round badly on one grid round badly on
all; on SmolLM2's ffn_down this keeps the estimate within 2.5% of the exact error). Without an importance
matrix (``imatrix=False``: the method rounds unweighted) the types llama.cpp refuses to write unweighted
are left out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from edgekit.converters.formats.gguf.mix_rules import LAST_RESORT
from edgekit.converters.formats.gguf.mixes import NEEDS_IMATRIX
from edgekit.converters.quantize.allocate import Item, allocate
from edgekit.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Callable

    from edgekit.calibration import CalibConfig
    from edgekit.model import HFCheckpoint

T = gguf.GGMLQuantizationType
# Candidate types: 32-weight blocks, and (where a row holds whole 256-weight super-blocks) K- and i-quants.
_BLOCK32 = (T.Q4_0, T.IQ4_NL, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
_K = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
_LATTICE = (T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S)
_IQ = (*_LATTICE, T.IQ4_XS)
MAX_BPW = 16  # the largest --bpw (ConvertRecipe's check)
SAMPLE_ROWS = 128  # rows a lattice type is measured on, on larger tensors (see the module's docstring)
_REFERENCE = T.Q3_K  # the control variate for those samples


def type_bpw(t: gguf.GGMLQuantizationType) -> float:
    """Bits per weight of ``t``'s blocks."""
    block, size = gguf.GGML_QUANT_SIZES[t]
    return 8 * size / block


def candidates(row_width: int, allowed: frozenset[gguf.GGMLQuantizationType] | None = None,
               imatrix: bool = True) -> list[gguf.GGMLQuantizationType]:
    """Types a row of ``row_width`` weights can hold, cheapest first, restricted to ``allowed`` when given;
    without ``imatrix``, less the types llama.cpp only writes with an importance matrix. A row no block type
    holds has one candidate whatever is allowed: F16, the type ``--bits`` and ``--type`` fall back to."""
    if row_width % 32:
        return [LAST_RESORT]
    out = list(_BLOCK32)
    if row_width % 256 == 0:
        out += [*_K, *_IQ]
    out = [t for t in out if (allowed is None or t in allowed) and (imatrix or t not in NEEDS_IMATRIX)]
    return sorted(out, key=lambda t: (type_bpw(t), out.index(t)))


def type_bytes(qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1])) * (shape[-1] // block) * size


def tensor_errors(W: np.ndarray, H: np.ndarray, types: list[gguf.GGMLQuantizationType]) -> dict[Any, float]:
    """The Hessian-weighted error of importance-weighted rounding of ``W`` to each of ``types`` (lattice
    types on a row sample of larger tensors, see the module's docstring)."""
    from edgekit.converters.quantize import gptq_kernel

    imatrix = np.diag(H).astype(np.float32)

    def err(w: np.ndarray, t: gguf.GGMLQuantizationType) -> float:
        # importance-weighted RTN: closer to what the calibrated methods will store than plain RTN
        return gptq_kernel.hessian_error(w, gptq_kernel.rtn(w, t, imatrix=imatrix).weight, H)

    out = {t: err(W, t) for t in types if t not in _LATTICE}
    lattice = [t for t in types if t in _LATTICE]
    if lattice and W.shape[0] > 2 * SAMPLE_ROWS:
        rows = W[np.linspace(0, W.shape[0] - 1, SAMPLE_ROWS).round().astype(np.int64)]
        full = out[_REFERENCE] if _REFERENCE in out else err(W, _REFERENCE)
        scale = full / max(err(rows, _REFERENCE), 1e-30)
        out.update({t: err(rows, t) * scale for t in lattice})
    else:
        out.update({t: err(W, t) for t in lattice})
    return out


def measure(ckpt: HFCheckpoint, quantizable: dict[str, tuple[int, ...]], calib: CalibConfig,
            progress: Callable[[str, int, int], None] | None = None,
            allowed: frozenset[gguf.GGMLQuantizationType] | None = None, imatrix: bool = True) -> list[Item]:
    """Errors of every candidate type for every quantizable tensor (GGUF names -> numpy shapes); a tensor
    with one candidate (rows only F16 holds) has nothing to choose, so its error is not measured (0)."""
    from edgekit.converters.quantize.pipeline import LayerPipeline

    types_of = {name: candidates(shape[-1], allowed, imatrix) for name, shape in quantizable.items()}
    items = [Item(name, [(types_of[name][0], type_bytes(types_of[name][0], shape), 0.0)])
             for name, shape in quantizable.items() if len(types_of[name]) == 1]
    chosen = {name: shape for name, shape in quantizable.items() if len(types_of[name]) > 1}
    if not chosen:
        return items
    hessians = LayerPipeline(calib).float_hessians(ckpt, progress)
    hf_of = {ckpt.spec.gguf_name(h): h for h in ckpt.tensors}
    for i, (name, shape) in enumerate(chosen.items()):
        if progress:
            progress(f"measuring sensitivity of {name}", i, len(chosen))
        types = types_of[name]
        W, H = ckpt.load(hf_of[name]), hessians[name]
        if W.shape != shape:  # per-block FFN widths: the zero padding is not written, so not measured
            W, H = W[: shape[0], : shape[1]], H[: shape[1], : shape[1]]
        errors = tensor_errors(np.ascontiguousarray(W), np.ascontiguousarray(H), types)
        items.append(Item(name, [(t, type_bytes(t, shape), errors[t]) for t in types]))
    return items


def floor_bytes(quantizable: dict[str, tuple[int, ...]], fixed_bytes: int,
                allowed: frozenset[gguf.GGMLQuantizationType] | None = None, imatrix: bool = True) -> int:
    """Tensor bytes of the smallest file a budget can write: ``fixed_bytes`` plus each quantizable tensor in
    its cheapest candidate (a tensor without one raises, naming what would give it one)."""
    for name, shape in quantizable.items():
        if not candidates(shape[-1], allowed, imatrix):
            why = " without an importance matrix (use --method imatrix, gptq or awq)" \
                if candidates(shape[-1], allowed) else ""
            more = " or allow more types in --bpw-types" if why else "; allow more types in --bpw-types"
            raise InputError(f"none of the allowed types fits {name} (rows of {shape[-1]}){why}{more}")
    return fixed_bytes + sum(type_bytes(candidates(s[-1], allowed, imatrix)[0], s) for s in quantizable.values())


def assign(ckpt: HFCheckpoint, quantizable: dict[str, tuple[int, ...]], fixed_bytes: int, n_params: int,
           bpw: float, calib: CalibConfig, progress: Callable[[str, int, int], None] | None = None,
           allowed: frozenset[gguf.GGMLQuantizationType] | None = None, what: str | None = None,
           metadata_bytes: int = 0, imatrix: bool = True,
           ) -> tuple[dict[str, gguf.GGMLQuantizationType], dict[str, Any]]:
    """Types for the quantizable tensors so the whole file lands at ``bpw`` bits per weight. ``what``: the
    option that set the budget, for the error (default ``--bpw X``); ``metadata_bytes``: what the file
    holds besides tensors, for the smallest file size the error names; ``imatrix``: the method rounds
    with an importance matrix (else the types that need one are not candidates)."""
    budget = int(bpw * n_params / 8) - fixed_bytes
    floor = floor_bytes(quantizable, fixed_bytes, allowed, imatrix)
    if budget + fixed_bytes < floor:
        floor_bpw = 8 * floor / n_params
        fix = "raise it" if what is not None or floor_bpw <= MAX_BPW else \
            f"--bpw stops at {MAX_BPW:g}: give --size instead"
        raise InputError(f"{what or f'--bpw {bpw:g}'} is below the smallest file possible here "
                         f"({(floor + metadata_bytes) / 1e6:.1f} MB, {floor_bpw:.2f} bpw); {fix}"
                         f"{' or allow more types in --bpw-types' if allowed is not None else ''}")
    items = measure(ckpt, quantizable, calib, progress, allowed, imatrix)
    types = allocate(items, budget)
    spent = sum(type_bytes(types[it.name], quantizable[it.name]) for it in items)
    return types, {"bpw_target": round(bpw, 4), "bpw_planned": round(8 * (spent + fixed_bytes) / n_params, 4),
                   "errors": {it.name: {t.name: e for t, _, e in it.options} for it in items if len(it.options) > 1}}
