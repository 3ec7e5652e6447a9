"""ONNX's mixed precision to a size budget (``--bpw X``) and per-tensor grid overrides
(``--tensor-type REGEX=GRID``), over the MatMulNBits grids (4 or 8 bits, symmetric or with zero points,
block sizes), through the format-neutral allocator (:mod:`edgekit.converters.quantize.allocate`).

Tensors fused into one ``MatMulNBits`` (q/k/v, gate/up) share one grid, so they are allocated as one
group. Errors start as GGUF's budget measures them: the Hessian-weighted output error of importance-weighted
rounding onto each candidate grid, on calibration activations of the float model, per output channel.
By default (``sensitivity=fisher``) each channel's error is then weighted by the loss's sensitivity to that
channel (the empirical Fisher diagonal of the linear's output, one backward pass over the calibration
text), so that the head's logit errors and the layers' hidden-state errors, otherwise on unrelated scales,
become comparable estimates of the loss increase; a tied embedding also pays for its errors where it is
looked up. On SmolLM2 at the onnxruntime-genai file size this moved the budget's perplexity increase from
+10.15% to +9.03% (``bench/onnx_vs_peers.py``). Costs are the bytes the file will hold: packed codes,
scales in the graph's float type, packed zero points.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit.converters.quantize.allocate import Item, allocate
from edgekit.converters.quantize.nbits import NBitsType
from edgekit.converters.structure.width import own_shape
from edgekit.errors import InputError

if TYPE_CHECKING:
    from edgekit.calibration import CalibConfig
    from edgekit.converters.formats.onnx.options import OnnxOptions
    from edgekit.converters.formats.onnx.weights import _Planned
    from edgekit.model import HFCheckpoint

#: What a budget chooses from unless told otherwise (16-wide and 256-wide 4-bit blocks and 8-bit zero
#: points are left out by default: rarely on the hull, and each candidate costs a measurement).
DEFAULT_GRIDS = ("UINT4_B32", "UINT4_B64", "UINT4_B128", "INT4_B32", "INT4_B64", "INT8_B32", "INT8_B64",
                 "INT8_B128")
_FUSED = (re.compile(r"^(blk\.\d+\.)attn_[qkv]\.weight$"), re.compile(r"^(blk\.\d+\.)ffn_(gate|up)\.weight$"))


def grid_parts(grid: NBitsType, shape: tuple[int, ...], scale_bytes: int = 4, explicit_zp: bool = False) -> list[int]:
    """Bytes of the tensors a ``(rows, cols)`` weight on ``grid`` is stored as: packed codes, scales
    (``scale_bytes`` each: 4 in an fp32 graph, 2 in an fp16 one) and, for an asymmetric grid or with
    ``explicit_zp`` (GatherBlockQuantized needs them even for a symmetric grid), packed zero points."""
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    nb = cols // grid.block
    parts = [rows * nb * grid.blob, rows * nb * scale_bytes]
    if not grid.symmetric or explicit_zp:
        parts.append(rows * (-(-nb * grid.bits // 8)))
    return parts


def grid_bytes(grid: NBitsType, shape: tuple[int, ...], scale_bytes: int = 4, explicit_zp: bool = False,
               padded: bool = True) -> int:
    """Bytes of a ``(rows, cols)`` weight on ``grid`` in the file (:func:`grid_parts`), each of its tensors
    padded as the external data file aligns it (``padded=False``: the tensors' own bytes, as bpw counts)."""
    return sum(_stored(p, padded) for p in grid_parts(grid, shape, scale_bytes, explicit_zp))


def _stored(nbytes: int, padded: bool = True) -> int:
    """Bytes one initializer takes: inline in the graph when small, else page-aligned in the data file."""
    from edgekit.converters.formats.onnx.graph import _ALIGN, _INLINE_MAX

    return nbytes if nbytes <= _INLINE_MAX or not padded else -(-nbytes // _ALIGN) * _ALIGN


def groups(names: list[str]) -> dict[str, list[str]]:
    """Allocation units: tensors one MatMulNBits reads together share a group."""
    out: dict[str, list[str]] = {}
    for n in names:
        key = n
        for pat in _FUSED:
            m = pat.match(n)
            if m:
                key = m.group(1) + ("attn_qkv" if "attn" in n else "ffn_gate_up")
        out.setdefault(key, []).append(n)
    return out


def parse_grids(names: tuple[str, ...] | list[str]) -> list[NBitsType]:
    return [NBitsType.parse(n) for n in names]


def apply(ckpt: HFCheckpoint, plan: dict[str, _Planned], opts: OnnxOptions, *, bpw: float | None,
          size: int | None = None, grids: tuple[str, ...], tensor_types: tuple[tuple[str, str], ...], calib: CalibConfig,
          progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Re-grid the plan's MatMulNBits tensors: overrides first, then (with ``bpw``) the allocator on the
    rest so the weights land at ``bpw`` bits per weight (their stored bytes over all parameters, as inspect
    and GGUF count), or the files at ``size`` bytes (the graph and its data file together, rotary tables
    included). Returns a report for the manifest."""
    scale_bytes = 4 if opts.graph_dtype == "fp32" else 2
    # what MatMulNBits reads (a lookup-only embedding table keeps its int8 grid: no activations to weigh)
    quantized = [g for g, p in plan.items() if isinstance(p.qtype, NBitsType)
                 and (g != "token_embd.weight" or opts.embed_mode == "shared")]
    units = groups(quantized)
    shapes = {g: own_shape(ckpt.hparams, g, tuple(ckpt.tensors[plan[g].hf].shape)) for g in quantized}
    fixed_units: dict[str, NBitsType] = {}
    for pattern, grid_name in tensor_types:
        grid = NBitsType.parse(grid_name)
        hits = [u for u, members in units.items() if any(re.search(pattern, m) for m in members)]
        if not hits:
            raise InputError(f"--tensor-type {pattern}={grid_name} matches no quantized tensor (names like "
                             f"blk.0.ffn_down.weight, token_embd.weight)")
        for u in hits:
            _check_fits(grid, u, units[u], shapes)
            fixed_units[u] = grid
    report: dict[str, Any] = {"overrides": {u: g.name for u, g in fixed_units.items()}} if fixed_units else {}
    chosen = dict(fixed_units)
    if bpw is not None or size is not None:
        free = {u: m for u, m in units.items() if u not in fixed_units}
        allowed = parse_grids(grids or DEFAULT_GRIDS)
        n_params = sum(int(np.prod(ckpt.tensors[p.hf].shape)) for p in plan.values()
                       if p.gguf != "output.weight" or not ckpt.hparams.tie_embeddings)
        # --bpw counts the weights' own bytes (as inspect's bpw and GGUF's); --size the whole files: the
        # data file's alignment, the rotary tables and the graph too
        padded = size is not None
        fixed = _fixed_bytes(ckpt, plan, quantized, scale_bytes, padded) + sum(
            grid_bytes(fixed_units[u], _stacked(shapes, units[u]), scale_bytes, u == "token_embd.weight", padded)
            for u in fixed_units)
        extra = _graph_bytes(ckpt, scale_bytes) if padded else 0
        if size is not None:
            bpw = 8 * (size - extra) / n_params
        budget_bytes = int(bpw * n_params / 8) - fixed
        floor = 0
        for u, members in free.items():
            fits = [g for g in allowed if all(shapes[m][-1] % g.block == 0 for m in members)]
            if not fits:
                raise InputError(f"none of the allowed grids fits {u} (rows of {shapes[members[0]][-1]}); "
                                 "allow grids with smaller blocks")
            floor += min(grid_bytes(g, _stacked(shapes, members), scale_bytes, u == "token_embd.weight", padded)
                         for g in fits)
        if floor > budget_bytes:
            what = f"--size {size / 1e6:.4g}MB" if size is not None else f"--bpw {bpw}"
            raise InputError(f"{what} is below the smallest file possible here ({(floor + fixed + extra) / 1e6:.1f} MB, "
                             f"{8 * (floor + fixed) / n_params:.2f} bpw); raise it or allow smaller grids")
        items = _measure(ckpt, plan, free, shapes, allowed, scale_bytes, calib, progress, weighting=opts.sensitivity,
                         padded=padded)
        picked = allocate(items, budget_bytes)
        chosen.update(picked)
        spent = sum(o[1] for it in items for o in it.options if o[0] == picked[it.name])
        report.update(bpw_target=round(bpw, 4), **({"size_target": size} if size is not None else {}),
                      bpw_planned=round(8 * (spent + fixed) / n_params, 4), sensitivity=opts.sensitivity,
                      grids={u: g.name for u, g in sorted(picked.items())},
                      errors={it.name: {g.name: e for g, _, e in it.options} for it in items})
    for u, grid in chosen.items():
        for m in units[u]:
            plan[m].qtype = grid
    return report


def _stacked(shapes: dict[str, tuple[int, ...]], members: list[str]) -> tuple[int, int]:
    """The shape of the one weight a fused group's members make (rows concatenated)."""
    return sum(int(np.prod(shapes[m][:-1])) for m in members), shapes[members[0]][-1]


def _check_fits(grid: NBitsType, unit: str, members: list[str], shapes: dict[str, tuple[int, ...]]) -> None:
    for m in members:
        if shapes[m][-1] % grid.block:
            raise InputError(f"{m} has rows of {shapes[m][-1]} weights, not a multiple of {grid.name}'s block "
                             f"{grid.block}; pick a block that divides it")


def _fixed_bytes(ckpt: HFCheckpoint, plan: dict[str, _Planned], quantized: list[str], scale_bytes: int,
                 padded: bool = True) -> int:
    """The weights the budget does not choose: float tensors, a float or int8 embedding table."""
    total = 0
    for g, p in plan.items():
        if g in quantized:
            continue
        shape = ckpt.tensors[p.hf].shape
        if isinstance(p.qtype, NBitsType):  # the int8 lookup table, with explicit zero points
            total += grid_bytes(p.qtype, tuple(shape), scale_bytes, padded=padded) + \
                _stored(int(np.prod(shape)) // p.qtype.block, padded)
        else:
            total += _stored(int(np.prod(shape)) * scale_bytes, padded)
    return total


def _graph_bytes(ckpt: HFCheckpoint, scale_bytes: int) -> int:
    """What the files hold besides weights: the rotary caches and the graph itself."""
    from edgekit.converters.formats.onnx.graph import rotary_tables

    cos, _ = rotary_tables(ckpt.hparams)
    return 2 * _stored(cos.size * scale_bytes) + (8192 + 6144 * ckpt.hparams.n_layer)


def _measure(ckpt: HFCheckpoint, plan: dict[str, _Planned], units: dict[str, list[str]],
             shapes: dict[str, tuple[int, ...]], allowed: list[NBitsType], scale_bytes: int, calib: CalibConfig,
             progress: Callable[[str, int, int], None] | None, weighting: str = "fisher", padded: bool = True) -> list[Item]:
    from edgekit.converters.quantize import gptq_kernel
    from edgekit.converters.quantize.pipeline import LayerPipeline

    pipe = LayerPipeline(calib)
    hessians = pipe.float_hessians(ckpt, progress)
    head_h = hessians.get("output.weight", hessians.get("token_embd.weight"))
    fisher, lookup = pipe.output_fisher(ckpt, progress) if weighting == "fisher" else ({}, (None, None))
    n_tokens = calib.samples * calib.seqlen  # what H sums over; the lookup term is per position
    items = []
    for i, (unit, members) in enumerate(units.items()):
        if progress:
            progress(f"measuring sensitivity of {unit}", i, len(units))
        options = {g: [0, 0.0] for g in allowed if all(shapes[m][-1] % g.block == 0 for m in members)}
        for g, acc in options.items():
            acc[0] = grid_bytes(g, _stacked(shapes, members), scale_bytes, unit == "token_embd.weight", padded)
        for m in members:
            H = hessians.get(m, head_h) if m in ("output.weight", "token_embd.weight") else hessians[m]
            W = ckpt.load(plan[m].hf).astype(np.float32)
            f = fisher.get(m)
            if W.shape != shapes[m]:  # per-block FFN widths: the zero padding is not stored, so not measured
                r, c = shapes[m]
                W, H = np.ascontiguousarray(W[:r, :c]), np.ascontiguousarray(H[:c, :c])
                f = None if f is None else f[:r]
            imatrix = np.diag(H).astype(np.float32)
            for g, acc in options.items():
                Wq = gptq_kernel.rtn(W, g, imatrix=imatrix).weight
                rows = gptq_kernel.hessian_row_errors(W, Wq, H)
                acc[1] += float(rows.sum() if f is None else f @ rows)
                if f is not None and m == "token_embd.weight":  # also looked up: its rows feed layer 0
                    ids, g2 = lookup
                    acc[1] += n_tokens * float((g2 * (W[ids] - Wq[ids]) ** 2).sum())
        items.append(Item(unit, [(g, b, e) for g, (b, e) in options.items()]))
    return items
