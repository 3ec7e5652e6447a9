"""Reading ONNX artifacts: the weights back as float32 Hugging Face tensors (tests and benchmarks load them
into PyTorch to check the graph against the reference model), and the report ``edgekit inspect`` shows."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.artifact import Artifact
from edgekit.converters.formats.base import tensor_summary
from edgekit.converters.quantize import nbits
from edgekit.converters.quantize.nbits import NBitsType
from edgekit.errors import CorruptFileError, InputError, require

# Element types stored packed (two per byte): their byte length is not dims x itemsize.
_PACKED_TYPES = {21, 22, 23}  # UINT4, INT4, FLOAT4E2M1


def load_graph(model_path: str | Path) -> Any:
    """The graph of ``model_path`` without its external data, checked: a file that is not an ONNX protobuf
    and external data that is missing, outside the model's folder or shorter than the tensors it holds
    raise :class:`CorruptFileError` (onnxruntime would fail later, or the report would count nothing)."""
    onnx = require("onnx", "onnx")
    path = Path(model_path)
    if not path.is_file():
        raise InputError(f"{path} does not exist; give an ONNX artifact folder or .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and onnx's own errors
        raise CorruptFileError(f"{path} is not a readable ONNX graph ({type(exc).__name__}); "
                               "re-run 'edgekit convert'") from exc
    if not model.ir_version or not model.graph.node:  # an empty file parses as an empty ModelProto
        raise CorruptFileError(f"{path} holds no ONNX graph (empty or truncated); re-run 'edgekit convert'")
    check_external_data(model, path)
    return model


def check_external_data(model: Any, path: Path) -> None:
    """Every initializer stored outside the graph names a file in the graph's folder that holds its bytes."""
    onnx = require("onnx", "onnx")
    folder = Path(os.path.normpath(path.parent))
    sizes: dict[Path, int] = {}
    for t in model.graph.initializer:
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, ValueError) as exc:
            raise CorruptFileError(f"{path}: tensor {t.name!r} has unknown element type {t.data_type}; "
                                   "re-run 'edgekit convert'") from exc
        if any(d < 0 for d in t.dims):
            raise CorruptFileError(f"{path}: tensor {t.name!r} has a negative dimension; re-run 'edgekit convert'")
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        try:
            if not all(isinstance(v, str) for kv in info.items() for v in kv):
                raise ValueError("not UTF-8")  # protobuf hands invalid UTF-8 strings over as bytes
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        except ValueError as exc:
            raise CorruptFileError(f"{path}: tensor {t.name!r} has a malformed external data entry") from exc
        want = int(np.prod(t.dims, dtype=np.int64)) * itemsize
        if length < 0:
            length = want
        elif t.data_type not in _PACKED_TYPES and length != want:
            raise CorruptFileError(f"{path}: tensor {t.name!r} stores {length} bytes for shape {list(t.dims)} "
                                   f"({want} needed); re-run 'edgekit convert'")
        # Lexically inside the folder: a symlinked data file is the user's choice, "../x" is not.
        file = Path(os.path.normpath(path.parent / info.get("location", "")))
        if file.parent != folder or not info.get("location"):
            raise CorruptFileError(f"{path}: tensor {t.name!r} points outside the model folder "
                                   f"({info.get('location')!r}); the graph is corrupt or hostile: re-run 'edgekit convert'")
        if file not in sizes:
            if not file.is_file():
                raise CorruptFileError(f"{path}'s external data {file.name} is missing; copy it next to "
                                       f"{path.name} or re-run 'edgekit convert'")
            sizes[file] = file.stat().st_size
        if offset < 0 or offset + length > sizes[file]:
            raise CorruptFileError(f"{file} is truncated: tensor {t.name!r} needs bytes up to {offset + length}, "
                                   f"the file has {sizes[file]}; copy it again or re-run 'edgekit convert'")


def read_weights(model_path: str | Path) -> dict[str, np.ndarray]:
    """The float32 weights an edgekit ONNX graph computes with, under their Hugging Face names: each
    MatMulNBits / GatherBlockQuantized tensor decoded from the graph's own initializers (fused
    projections split back). Tests and benchmarks load these into PyTorch to check the graph."""
    onnx = require("onnx", "onnx")
    from onnx import numpy_helper

    path = Path(model_path)
    load_graph(path)
    model = onnx.load(str(path), load_external_data=True)
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    cfg = json.loads((path.parent / "config.json").read_text())
    from edgekit.arch import HParams

    hp = HParams.from_config(cfg)
    out: dict[str, np.ndarray] = {}

    def decode(node) -> np.ndarray:
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        bits, block = int(a["bits"]), int(a["block_size"])
        data, scales = init[node.input[0 if node.op_type == "GatherBlockQuantized" else 1]], None
        if node.op_type == "GatherBlockQuantized":
            scales, zps = init[node.input[2]], init[node.input[3]] if len(node.input) > 3 else None
            n = data.shape[0]
        else:
            scales = init[node.input[2]]
            zps = init[node.input[3]] if len(node.input) > 3 and node.input[3] else None
            n = int(a["N"])
        t = NBitsType(bits, block, False)  # decoded through the asymmetric record: zp given explicitly
        blob = data.reshape(n, -1, t.blob)
        nb = blob.shape[1]
        if zps is None:
            z = np.full((n, nb), t.default_zp, np.uint8)
        elif bits == 4 and node.op_type == "MatMulNBits":
            zz = zps.reshape(n, -1)
            z = np.stack([zz & 0x0F, zz >> 4], axis=2).reshape(n, -1)[:, :nb]
        else:
            z = zps.reshape(n, nb)
        records = [blob, scales.reshape(n, nb, 1).astype(np.float16).view(np.uint8).reshape(n, nb, 2),
                   z.reshape(n, nb, 1)]
        return nbits.dequantize(t, np.concatenate(records, axis=2).reshape(n, -1))

    q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    splits = {"qkv_proj": [("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)],
              "gate_up_proj": [("mlp.gate_proj", hp.n_ff), ("mlp.up_proj", hp.n_ff)],
              "o_proj": [("self_attn.o_proj", hp.n_embd)], "down_proj": [("mlp.down_proj", hp.n_embd)]}
    # a tied head's MatMul reads the embedding table through a Transpose: the table is its weight as stored
    transposed = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in init}
    for node in model.graph.node:
        name = node.name
        if node.op_type in ("MatMulNBits", "MatMul") and "/" in name:
            base = name.split("/")[0]  # layers.{i}.attn.qkv_proj or lm_head
            if node.op_type == "MatMulNBits":
                w = decode(node)
            elif node.input[1] in transposed:
                w = init[transposed[node.input[1]]].astype(np.float32)
            else:
                w = init[node.input[1]].T.astype(np.float32)
            if base == "lm_head":
                out["lm_head.weight"] = w
                continue
            i, kind = base.split(".")[1], base.split(".")[-1]
            r0 = 0
            parts = [(hf, w.shape[0] // 2) for hf, _ in splits[kind]] if kind == "gate_up_proj" else splits[kind]
            for hf, rows in parts:
                out[f"model.layers.{i}.{hf}.weight"] = w[r0 : r0 + rows]
                r0 += rows
        elif node.op_type == "GatherBlockQuantized" and node.input[0] in init:
            out["model.embed_tokens.weight"] = decode(node)
        elif node.op_type == "Gather" and node.input[0] in init and init[node.input[0]].ndim == 2:
            out["model.embed_tokens.weight"] = init[node.input[0]].astype(np.float32)
        elif node.op_type == "Gemm" and name.startswith("lm_head"):  # tied heads of earlier edgekit versions
            out["lm_head.weight"] = init[node.input[1]].astype(np.float32)
    if hp.ffn_widths is not None:  # per-block FFN widths: back to the config's zero-padded layout
        for name, w in out.items():
            if ".mlp." in name and name.endswith(".weight"):
                axis = 1 if "down_proj" in name else 0
                pad = [(0, 0), (0, 0)]
                pad[axis] = (0, hp.n_ff - w.shape[axis])
                out[name] = np.pad(w, pad)
    if "model.embed_tokens.weight" not in out:  # embed=shared: the table is the lm_head's tensor
        out["model.embed_tokens.weight"] = out["lm_head.weight"]
    for t_name, arr in init.items():
        if t_name.endswith(("layernorm.weight", "q_norm.weight", "k_norm.weight")) or t_name == "norm.weight":
            out["model." + t_name] = arr.astype(np.float32)
        elif t_name.endswith(".bias") and ".attn.qkv_proj" in t_name:
            i = t_name.split(".")[1]
            r0 = 0
            for hf, rows in splits["qkv_proj"]:
                out[f"model.layers.{i}.{hf}.bias"] = arr[r0 : r0 + rows].astype(np.float32)
                r0 += rows
    return out


def describe_onnx(art: Artifact, ctx: int = 4096) -> dict[str, Any]:
    """``edgekit inspect``'s report for an ONNX artifact: graph facts from the model file (opset, operators, I/O),
    tensor types from the manifest, weights as the bytes the file stores for them (bits per weight = those over the
    parameters, norms included, as for GGUF), memory = weight bytes + the KV cache in the graph's dtype."""

    from edgekit.errors import MissingDependencyError

    try:
        import onnx
    except ImportError as exc:
        raise MissingDependencyError("inspecting ONNX artifacts needs onnx: pip install 'edgekit[onnx]'") from exc
    from edgekit.converters.formats.onnx.graph import ops_used

    model = load_graph(art.model_file)
    # The graph and the external data files it names (the manifest's file list is not trusted for sizes).
    data_files = {art.model_file.parent / e.value for t in model.graph.initializer for e in t.external_data
                  if e.key == "location"}
    file_bytes = sum(f.stat().st_size for f in {art.model_file, *data_files})
    cfg = _read_config(art.path / "config.json")
    past = next((i for i in model.graph.input if i.name.startswith("past_key_values.")), None)
    try:
        elem = onnx.helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type).itemsize if past else 4
    except (KeyError, ValueError) as exc:
        raise CorruptFileError(f"{art.model_file}: {past.name} has an unknown element type; "
                               "re-run 'edgekit convert'") from exc
    n_layer = cfg.get("num_hidden_layers", 0)
    n_head = cfg.get("num_attention_heads", 1)
    n_head_kv = cfg.get("num_key_value_heads") or n_head
    head_dim = cfg.get("head_dim") or cfg.get("hidden_size", 0) // n_head
    kv_bytes = 2 * n_layer * ctx * n_head_kv * head_dim * elem
    tensors = _weight_tensors(model, art)
    # tensor bytes over parameters (norms included), as GGUF's bpw; the file also holds the graph and rotary tables
    n_params = sum(int(np.prod(t["shape"], dtype=object)) for t in tensors if "tied_to" not in t)
    weight_bytes = sum(t["bytes"] for t in tensors)
    return {
        "path": str(art.model_file),
        "format": art.format,
        "architecture": (cfg.get("architectures") or ["?"])[0],
        "name": art.name,
        "hparams": {"block_count": n_layer, "embedding_length": cfg.get("hidden_size"),
                    "feed_forward_length": cfg.get("intermediate_size"), "attention.head_count": n_head,
                    "attention.head_count_kv": n_head_kv, "vocab_size": cfg.get("vocab_size"),
                    "context_length": cfg.get("max_position_embeddings")},
        **tensor_summary(tensors, n_params, file_bytes, weight_bytes),
        "bpw": round(8 * weight_bytes / n_params, 4) if n_params else 0.0,
        "memory": {"ctx": ctx, "weights": weight_bytes, "kv_cache": kv_bytes, "kv_type": "f16" if elem == 2 else "f32",
                   "total": weight_bytes + kv_bytes},
        "onnx": {"opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
                 "ir_version": model.ir_version, "ops": ops_used(model),
                 "inputs": len(model.graph.input), "outputs": len(model.graph.output)},
        "preset": art.manifest.get("preset"),
        "recipe": art.manifest.get("recipe"),
        "pruned": art.manifest.get("pruned"),
        "sparsity": art.manifest.get("sparsity"),
        "eval": art.manifest.get("eval", []),
        "tensors": tensors,
    }


def _weight_tensors(model: Any, art: Artifact) -> list[dict[str, Any]]:
    cfg = _read_config(art.path / "config.json")
    return weight_tensors(model, art.manifest.get("tensors", {}), bool(cfg.get("tie_word_embeddings")),
                          art.path / "edgekit.json")


def weight_tensors(model: Any, manifest_tensors: dict[str, Any], tied: bool, where: Path) -> list[dict[str, Any]]:
    """The model's weights with the bytes the file stores for each: the manifest's tensors (a quantized one as
    its codes, scales in the graph's float type and zero points where the graph has them, the layout
    :func:`.budget.grid_parts` sizes) and the norms and biases the manifest does not list, from the graph.
    ``tied``: the checkpoint ties its head to the embedding; ``where``: the manifest, for errors. A tied head's
    table carries ``tied_to`` (its parameters are the embedding's)."""
    import onnx

    from edgekit.converters.formats.onnx.budget import grid_parts

    init = {t.name: t for t in model.graph.initializer}
    quantized = [n for n in model.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")]
    scales = next((init[n.input[2]] for n in quantized if len(n.input) > 2 and n.input[2] in init), None)
    scale_bytes = onnx.helper.tensor_dtype_to_np_dtype(scales.data_type).itemsize if scales is not None else 4
    lookup_zp = any(n.op_type == "GatherBlockQuantized" and len(n.input) > 3 and n.input[3] for n in quantized)

    def nbytes(name: str, t: dict[str, Any]) -> int:
        shape, kind = t.get("shape"), t.get("type")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 1 << 32 for d in shape) \
                or not isinstance(kind, str):
            raise CorruptFileError(f"{where}: tensor {name!r} needs a shape (whole numbers) "
                                   "and a type name; re-run 'edgekit convert' to rebuild it")
        n = int(np.prod(shape, dtype=object))
        if kind.upper() in ("FP32", "F32"):
            return 4 * n
        if kind.upper() in ("FP16", "F16", "BF16"):
            return 2 * n
        # the looked-up table (GatherBlockQuantized) stores zero points even on a symmetric grid
        explicit = lookup_zp and name.endswith("embed_tokens.weight")
        return sum(grid_parts(NBitsType.parse(kind), tuple(shape), scale_bytes, explicit))

    listed = {**manifest_tensors, **_unlisted_head(model, manifest_tensors)}
    tensors = [{**t, "name": n, "bytes": nbytes(n, t)} for n, t in listed.items()]
    if tied and "lm_head.weight" in listed:  # a second table of the same parameters
        tensors = [{**t, "tied_to": t.get("tied_to", "model.embed_tokens.weight")} if t["name"] == "lm_head.weight"
                   else t for t in tensors]
    for name, t in init.items():  # norms and biases: float, in the graph only
        if (name.endswith("norm.weight") or name.endswith(".bias")) and t.data_type in (1, 10, 16) and t.dims:
            kind = {1: "FP32", 10: "FP16", 16: "BF16"}[t.data_type]
            shape = [int(d) for d in t.dims]
            tensors.append({"type": kind, "shape": shape, "name": "model." + name,
                            "bytes": nbytes(name, {"type": kind, "shape": shape})})
    return tensors


def _unlisted_head(model: Any, listed: dict[str, Any]) -> dict[str, Any]:
    """A float head the graph stores that the manifest does not list: earlier edgekit versions recorded a
    tied checkpoint's second float table under the embedding's name, so inspect left its bytes out."""
    if "lm_head.weight" in listed:
        return {}
    init = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.name.startswith("lm_head/") and node.input[1:2] and node.input[1] in init:
            t = init[node.input[1]]
            kind = {1: "FP32", 10: "FP16"}.get(t.data_type)
            embed = next((n for n in listed if n.endswith("embed_tokens.weight")), None)
            if kind is None or embed is None or len(t.dims) != 2:
                return {}
            return {"lm_head.weight": {"type": kind, "shape": [int(t.dims[1]), int(t.dims[0])], "tied_to": embed}}
    return {}


def _read_config(cfg_file: Path) -> dict[str, Any]:
    """The artifact's config.json, checked (an absent one reports no hyperparameters)."""
    if not cfg_file.exists():
        return {}
    from edgekit.validate import check_config

    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{cfg_file} is not valid JSON ({exc}); fix it or re-run 'edgekit convert'") from exc
    check_config(cfg, str(cfg_file))
    return cfg
