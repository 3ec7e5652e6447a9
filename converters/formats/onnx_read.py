"""Read an edgekit ONNX graph's weights back as float32 Hugging Face tensors (tests and benchmarks load
them into PyTorch to check the graph against the reference model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgekit.converters.quantize import nbits
from edgekit.converters.quantize.nbits import NBitsType
from edgekit.errors import require


def read_weights(model_path: str | Path) -> dict[str, np.ndarray]:
    """The float32 weights an edgekit ONNX graph computes with, under their Hugging Face names: each
    MatMulNBits / GatherBlockQuantized tensor decoded from the graph's own initializers (fused
    projections split back). Tests and benchmarks load these into PyTorch to check the graph."""
    onnx = require("onnx", "onnx")
    from onnx import numpy_helper

    path = Path(model_path)
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
    for node in model.graph.node:
        name = node.name
        if node.op_type in ("MatMulNBits", "MatMul") and "/" in name:
            base = name.split("/")[0]  # layers.{i}.attn.qkv_proj or lm_head
            w = decode(node) if node.op_type == "MatMulNBits" else init[node.input[1]].T.astype(np.float32)
            if base == "lm_head":
                out["lm_head.weight"] = w
                continue
            i, kind = base.split(".")[1], base.split(".")[-1]
            r0 = 0
            for hf, rows in splits[kind]:
                out[f"model.layers.{i}.{hf}.weight"] = w[r0 : r0 + rows]
                r0 += rows
        elif node.op_type == "GatherBlockQuantized" and node.input[0] in init:
            out["model.embed_tokens.weight"] = decode(node)
        elif node.op_type == "Gather" and node.input[0] in init and init[node.input[0]].ndim == 2:
            out["model.embed_tokens.weight"] = init[node.input[0]].astype(np.float32)
        elif node.op_type == "Gemm" and name.startswith("lm_head"):
            out["lm_head.weight"] = init[node.input[1]].astype(np.float32)
    if "model.embed_tokens.weight" not in out:  # embed=shared: the table is the lm_head's tensor
        out["model.embed_tokens.weight"] = out["lm_head.weight"]
    for t_name, arr in init.items():
        if t_name.endswith("layernorm.weight") or t_name == "norm.weight":
            out["model." + t_name] = arr.astype(np.float32)
        elif t_name.endswith(".bias") and ".attn.qkv_proj" in t_name:
            i = t_name.split(".")[1]
            r0 = 0
            for hf, rows in splits["qkv_proj"]:
                out[f"model.layers.{i}.{hf}.bias"] = arr[r0 : r0 + rows].astype(np.float32)
                r0 += rows
    return out
