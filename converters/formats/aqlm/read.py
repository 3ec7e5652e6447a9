"""Reading an AQLM checkpoint: its quantization config, the tensors' shapes and bytes (``inspect``), and the
weights its codes decode to (edgekit's own decode, against which the runtime is checked)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.converters.formats.aqlm.layout import MODEL_FILE, unpack_codes
from edgekit.converters.formats.base import tensor_summary
from edgekit.converters.quantize.aqlm_kernel import decode
from edgekit.errors import CorruptFileError, InputError

_PARTS = (".codes", ".codebooks", ".scales")


def read_config(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """config.json and its AQLM ``quantization_config``."""
    f = Path(folder) / "config.json"
    if not f.exists():
        raise InputError(f"{folder} has no config.json; is it an AQLM checkpoint folder?")
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{f} is not valid JSON ({exc}); convert the model again") from exc
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") != "aqlm":
        raise InputError(f"{f} has no AQLM quantization_config; convert with --to aqlm")
    return cfg, q


def _header(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n < 1 << 28:
                raise ValueError("bad header length")
            head = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"{path} is not a readable safetensors file ({exc}); convert the model again") from exc
    head.pop("__metadata__", None)
    return head


#: Bytes per stored value of the float dtypes a checkpoint may hold; transformers loads each as float32.
_ITEMSIZE = {"F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


def loaded_bytes(head: dict[str, Any]) -> int:
    """The bytes the weights of a checkpoint with safetensors header ``head`` take once edgekit's AQLM backend
    has loaded them: codes as stored, every float tensor (codebooks, scales, embedding, norms) as float32."""
    total = 0
    for name, info in head.items():
        n = int(info["data_offsets"][1]) - int(info["data_offsets"][0])
        total += n if name.endswith(".codes") else n * 4 // _ITEMSIZE.get(info["dtype"], 4)
    return total


def describe_aqlm(art: Any, ctx: int = 4096) -> dict[str, Any]:
    """What ``edgekit inspect`` shows: each linear (codes + codebooks + scales as one AQLM tensor) and float
    tensor with its bytes, the bits per weight counting codebooks and scales, memory at ``ctx``."""
    folder = Path(art.path)
    cfg, q = read_config(folder)
    head = _header(folder / MODEL_FILE)
    scheme = f"AQLM_{q['num_codebooks']}x{q['nbits_per_codebook']}"
    linears: dict[str, dict[str, Any]] = {}
    tensors = []
    n_params = 0
    for name, info in head.items():
        nbytes = int(info["data_offsets"][1]) - int(info["data_offsets"][0])
        base = next((name[: -len(p)] for p in _PARTS if name.endswith(p)), None)
        if base is None:
            tensors.append({"name": name, "type": info["dtype"], "shape": list(info["shape"]), "bytes": nbytes})
            n_params += int(np.prod(info["shape"]))
            continue
        entry = linears.setdefault(base, {"name": f"{base}.weight", "type": scheme, "shape": [0, 0], "bytes": 0})
        entry["bytes"] += nbytes
        if name.endswith(".codes"):
            out, groups = info["shape"][0], info["shape"][1]
            entry["shape"] = [out, groups * int(q["in_group_size"])]
            n_params += out * groups * int(q["in_group_size"])
    tensors += list(linears.values())
    size = sum(t["bytes"] for t in tensors)
    n_layer, n_kv = int(cfg["num_hidden_layers"]), int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    kv = 2 * n_layer * n_kv * head_dim * ctx * 4
    loaded = loaded_bytes(head)  # in memory the floats are float32
    return {
        "path": str(folder), "format": "aqlm", "architecture": (cfg.get("architectures") or ["?"])[0],
        "name": art.name,
        "hparams": {"block_count": n_layer, "embedding_length": cfg.get("hidden_size"),
                    "feed_forward_length": cfg.get("intermediate_size"),
                    "attention.head_count": cfg.get("num_attention_heads"), "attention.head_count_kv": n_kv,
                    "vocab_size": cfg.get("vocab_size"), "context_length": cfg.get("max_position_embeddings")},
        **tensor_summary(tensors, n_params, size, size),
        "memory": {"ctx": ctx, "weights": loaded, "kv_cache": kv, "kv_type": "f32 (transformers' cache on the CPU)",
                   "total": loaded + kv},
        "aqlm": {k: q.get(k) for k in ("num_codebooks", "nbits_per_codebook", "in_group_size", "out_group_size")},
        "preset": art.manifest.get("preset"), "recipe": art.manifest.get("recipe"),
        "eval": art.manifest.get("eval", []), "tensors": tensors,
    }


def decoded_weights(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint as float32, linears decoded from their codes by edgekit's own decode."""
    import torch  # float8 tensors have no numpy dtype
    from safetensors.torch import load_file

    _, q = read_config(folder)
    raw = {k: (v.float() if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else v).numpy()
           for k, v in load_file(str(Path(folder) / MODEL_FILE)).items()}
    out: dict[str, np.ndarray] = {}
    for name, arr in raw.items():
        if name.endswith(".codes"):
            base = name[: -len(".codes")]
            books = raw[f"{base}.codebooks"].astype(np.float32)[:, :, 0, :]
            out[f"{base}.weight"] = decode(unpack_codes(arr, int(q["nbits_per_codebook"])), books,
                                           raw[f"{base}.scales"].astype(np.float32).reshape(-1))
        elif not name.endswith((".codebooks", ".scales")):
            out[name] = arr.astype(np.float32)
    return out
