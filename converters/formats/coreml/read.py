"""Reading a Core ML package back: its MIL program (from the protobuf and weight blob, with coremltools'
own MIL loader: no Core ML runtime needed), the stored form of each weight, and ``edgekit inspect``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.converters.formats.base import tensor_summary
from edgekit.converters.formats.coreml.program import SPLIT_SUFFIXES, Blockwise, Dense, Palette, Weight
from edgekit.errors import CorruptFileError


def load_program(path: Path) -> Any:
    """The ``coremltools.converters.mil.Program`` saved in the ``.mlpackage`` at ``path``, and the model's
    user metadata."""
    from edgekit.converters.formats.coreml.package import coremltools

    ct = coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load

    try:
        model = ct.models.MLModel(str(path), skip_model_load=True)
        spec = model.get_spec()
        prog = load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir)
    except Exception as exc:  # coremltools raises protobuf and its own errors for a damaged package
        raise CorruptFileError(f"coremltools cannot read {path.name}: {str(exc)[:200]}; the package is damaged or "
                               "incomplete: re-run 'edgekit convert'") from exc
    return prog, dict(spec.description.metadata.userDefined)


def _bits(dtype: Any) -> tuple[int, bool]:
    """Bits and signedness of a constexpr input's element type (sub-byte types ride on uint8/int8 arrays)."""
    meta = getattr(np.dtype(dtype), "metadata", None) or {}
    true = meta.get("true_dtype")
    if true is not None:
        from coremltools.converters.mil.mil import types

        name = types.builtin_to_string(true)
        return int(name.lstrip("uint")), not name.startswith("u")
    d = np.dtype(dtype)
    return 8 * d.itemsize, d.kind == "i"


def read_weights(path: Path, prog: Any = None) -> dict[str, Weight]:
    """Every weight of the program by op name: consts as :class:`Dense`, the constexpr ops as the codes,
    scales, offsets, indices and tables they store (sub-byte values unpacked to one per byte; signed data
    back to edgekit's unsigned codes)."""
    if prog is None:
        prog, _ = load_program(path)
    ops = list(prog.functions["main"].operations)
    # a constexpr op's scales, offsets, indices and tables are part of its weight, not weights of their own
    parts = {v.name for op in ops if op.op_type.startswith("constexpr_") for v in op.inputs.values()}
    out: dict[str, Weight] = {}
    for op in ops:
        if op.op_type == "constexpr_blockwise_shift_scale":
            data = op.inputs["data"].val
            bits, signed = _bits(data.dtype)
            offset = op.inputs.get("offset")
            codes = np.asarray(data).astype(np.int16) + ((1 << (bits - 1)) if signed else 0)
            out[op.outputs[0].name] = Blockwise(bits, codes.astype(np.uint8), np.asarray(op.inputs["scale"].val),
                                                None if offset is None else np.asarray(offset.val).astype(np.uint8))
        elif op.op_type == "constexpr_lut_to_dense":
            idx = op.inputs["indices"].val
            bits, _ = _bits(idx.dtype)
            lut = np.asarray(op.inputs["lut"].val)
            out[op.outputs[0].name] = Palette(bits, np.asarray(idx).astype(np.uint8),
                                              lut.reshape(lut.shape[0], lut.shape[-2]))
        elif op.op_type == "constexpr_sparse_to_dense":
            mask = np.asarray(op.inputs["mask"].val) != 0
            dense = np.zeros(mask.shape, np.float16)
            dense[mask] = np.asarray(op.inputs["nonzero_data"].val)
            out[op.outputs[0].name] = Dense(dense)
        elif op.op_type == "add" and op.outputs[0].name + SPLIT_SUFFIXES[0] in out:
            name = op.outputs[0].name
            pal, sparse = out.pop(name + SPLIT_SUFFIXES[0]), out.pop(name + SPLIT_SUFFIXES[1], None)
            if not isinstance(pal, Palette) or not isinstance(sparse, Dense):
                raise CorruptFileError(f"{name} is not a palette plus its outliers; the package was not written by "
                                       "edgekit: re-run 'edgekit convert'")
            out[name] = Palette(pal.bits, pal.indices, pal.lut, sparse.value)
        elif op.op_type == "const":
            val = op.outputs[0].val
            # coremltools adds zero biases to bias-free linears: they hold nothing of the model's
            if (isinstance(val, np.ndarray) and val.dtype == np.float16 and val.size >= 16
                    and op.outputs[0].name not in parts and np.any(val)):
                out[op.outputs[0].name] = Dense(val)
    return out


def _grid_name(w: Weight) -> str:
    if isinstance(w, Dense):
        return "F16"
    if isinstance(w, Blockwise):
        block = w.data.shape[-1] // w.scale.shape[-1]
        return f"COREML_{'UINT' if w.offset is not None else 'INT'}{w.bits}_B{block}"
    sparse = "" if w.sparse is None else f"_S{100 * np.count_nonzero(w.sparse) / w.sparse.size:.2g}"
    return f"COREML_LUT{w.bits}_G{w.indices.shape[0] // w.lut.shape[0]}{sparse}"


def _stored_bytes(w: Weight) -> int:
    if isinstance(w, Dense):
        return w.value.size * 2
    if isinstance(w, Blockwise):
        return (w.data.size * w.bits + (0 if w.offset is None else w.offset.size * w.bits)) // 8 + 2 * w.scale.size
    outliers = 0 if w.sparse is None else w.sparse.size // 8 + 2 * np.count_nonzero(w.sparse)  # mask bits, values
    return w.indices.size * w.bits // 8 + 2 * w.lut.size + outliers


def describe_coreml(art: Any, ctx: int = 4096) -> dict[str, Any]:
    """What ``edgekit inspect`` shows, read from the package: per-tensor grids (from the constexpr ops
    themselves), size, bits per weight, and memory at ``ctx``: weights plus the KV-cache state, which Core ML
    allocates whole at the program's context (``ctx`` only says how much of it is used)."""
    from collections import Counter

    from edgekit.converters.formats.coreml.package import package_bytes

    path = Path(art.model_file)
    prog, meta = load_program(path)
    weights = read_weights(path, prog)
    fn = prog.functions["main"]
    states = [v for n, v in fn.inputs.items() if n.startswith(("k_cache_", "v_cache_"))]
    context = int(meta.get("edgekit.context", 0))
    size = package_bytes(path)
    tensors = [{"name": n, "type": _grid_name(w), "shape": list(_shape(w)), "bytes": _stored_bytes(w)}
               for n, w in weights.items() if not n.startswith("rope_")]
    n_params = sum(int(np.prod(t["shape"])) for t in tensors)
    state_bytes = sum(int(np.prod(s.shape)) * 2 for s in states)
    weight_bytes = sum(t["bytes"] for t in tensors)
    cfg_file = art.path / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    n_head = int(cfg.get("num_attention_heads", 1))
    return {
        "path": str(path),
        "format": "coreml",
        "architecture": (cfg.get("architectures") or ["?"])[0],
        "name": art.name,
        "hparams": {"block_count": cfg.get("num_hidden_layers"), "embedding_length": cfg.get("hidden_size"),
                    "feed_forward_length": cfg.get("intermediate_size"), "attention.head_count": n_head,
                    "attention.head_count_kv": int(cfg.get("num_key_value_heads") or n_head),
                    "vocab_size": cfg.get("vocab_size"), "context_length": cfg.get("max_position_embeddings")},
        **tensor_summary(tensors, n_params, size, weight_bytes),
        "memory": {"ctx": min(ctx, context) if context else ctx, "weights": weight_bytes, "kv_cache": state_bytes,
                   "kv_type": f"f16 state, allocated at the program's context {context}",
                   "total": weight_bytes + state_bytes},
        "coreml": {"context": context, "states": len(states), "sliding_window": int(meta.get("edgekit.sliding_window", 0)),
                   "ops": dict(Counter(op.op_type for op in fn.operations if op.op_type != "const").most_common())},
        "preset": art.manifest.get("preset"),
        "recipe": art.manifest.get("recipe"),
        "pruned": art.manifest.get("pruned"),
        "sparsity": art.manifest.get("sparsity"),
        "eval": art.manifest.get("eval", []),
        "tensors": tensors,
    }


def _shape(w: Weight) -> tuple[int, ...]:
    return (w.value if isinstance(w, Dense) else w.data if isinstance(w, Blockwise) else w.indices).shape
