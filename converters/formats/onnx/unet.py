"""Diffusion UNets as ONNX graphs: ``unet.onnx`` (+ ``unet_shallow.onnx`` for DeepCache).

``unet.onnx`` takes ``sample [n, c, h, w]`` float32, ``timestep [n]`` int64 and, for a class-conditional
UNet, ``class_labels [n]`` int64, and returns ``out`` (what the network predicts; the scheduler stays in
edgekit's runtime). With DeepCache it also returns ``cache``: the feature entering the last up block.
``unet_shallow.onnx`` recomputes only the outermost level (conv_in, the first down block, the last up block
and the output convolution) from a fresh input and that cached feature; with a fresh cache it gives exactly
the full graph's output, and in between full steps it reuses the deep features (DeepCache).

Both graphs are traced from the diffusers module's own submodules (TorchScript exporter: onnxscript, which
the dynamo exporter needs, is not a dependency). Quantized weights are stored as integers with
``DequantizeLinear`` (:mod:`.qdq`).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

from edgekit.converters.diffusion.deepcache import deepcache_default, split_modules
from edgekit.converters.diffusion.export import register_exporter
from edgekit.errors import CorruptFileError, InputError, UnsupportedError, require
from edgekit.progress import ProgressFn

GRAPH = "unet.onnx"
SHALLOW = "unet_shallow.onnx"
DATA = "unet.onnx.data"  # the weights, read by both graphs when there is a shallow one
OPSET = 21
PROTOBUF_LIMIT = (2 << 30) - (64 << 20)
_DIMS = {"sample": {0: "n"}, "timestep": {0: "n"}, "class_labels": {0: "n"}, "cache": {0: "n"},
         "out": {0: "n"}}


@register_exporter("onnx")
class OnnxUNetExporter:
    """The UNet as onnxruntime graphs (float32, or int8/int4 weights with DequantizeLinear)."""

    name = "onnx"

    def export(self, pipe: Any, unet: Any, weights: dict[str, Any] | None, out_dir: Path,
               options: dict[str, Any], progress: ProgressFn) -> dict[str, Any]:
        onnx = require("onnx", "onnx")
        import torch

        from edgekit.converters.formats.onnx.qdq import store_quantized

        unknown = sorted(set(options) - {"deepcache", "lowrank_graph"})
        if unknown:
            raise InputError(f"-O {unknown[0]} is not an option of diffusion ONNX export (options: deepcache=true|false, "
                             "lowrank_graph=merged|branch)")
        float_bytes = sum(p.numel() * 4 for p in unet.parameters())
        if float_bytes > PROTOBUF_LIMIT:  # traced in float32 first, whatever the bits stored afterwards
            raise UnsupportedError(f"this UNet has {float_bytes / 2**30:.1f} GiB of float32 weights, over the 2 GiB "
                                   "one ONNX protobuf file holds; edgekit's diffusion export writes a single file")
        deepcache = bool(options.get("deepcache", deepcache_default(unet)))
        if deepcache and len(unet.up_blocks) < 2:
            raise InputError("-O deepcache=true needs a UNet with two or more up blocks; drop it")
        full, shallow = split_modules(unet, deepcache)
        n, c, s = 2, pipe.in_channels, pipe.sample_size
        sample = torch.randn(n, c, s, s)
        timestep = torch.tensor([999, 10], dtype=torch.long)
        labels = torch.zeros(n, dtype=torch.long) if pipe.num_classes else None
        names = ["sample", "timestep"] + (["class_labels"] if labels is not None else [])
        args: tuple[Any, ...] = (sample, timestep) + ((labels,) if labels is not None else ())
        graphs: dict[str, dict[str, Any]] = {}
        cache_shape = None
        with torch.no_grad():
            if deepcache:
                cache_shape = list(full(*args)[1].shape[1:])
            progress("exporting the UNet to ONNX", 0, 2 if deepcache else 1)
            _trace(full, args, names, ["out"] + (["cache"] if deepcache else []), out_dir / GRAPH)
            graphs["unet"] = {"file": GRAPH, "inputs": names, "outputs": ["out"] + (["cache"] if deepcache else [])}
            if shallow is not None:
                progress("exporting the DeepCache shallow graph", 1, 2)
                sargs = (*args, torch.randn(n, *cache_shape))
                _trace(shallow, sargs, [*names, "cache"], ["out"], out_dir / SHALLOW)
                graphs["shallow"] = {"file": SHALLOW, "inputs": [*names, "cache"], "outputs": ["out"]}
        storage: dict[str, int] = {}
        if weights:
            floats = {k: v.detach().numpy() for k, v in unet.state_dict().items()}
            wanted = {_param(k, floats): qw for k, qw in weights.items()}
            for key, g in graphs.items():
                path = out_dir / g["file"]
                model = onnx.load(str(path))
                before = {t.name for t in model.graph.initializer}
                counts = store_quantized(model, wanted, floats, prefix="u.",
                                         lowrank_graph=str(options.get("lowrank_graph", "merged")))
                if key == "unet" and len(before - {t.name for t in model.graph.initializer}) < len(wanted):
                    raise InputError("some quantized weights are not Conv/Gemm/MatMul weights of the exported "
                                     "graph; quantize only the UNet's conv and linear weights")
                onnx.save_model(model, str(path))
                storage = counts if key == "unet" else storage
        else:
            from collections import Counter

            from edgekit.converters.formats.onnx.qdq import type_name

            storage = dict(Counter(type_name(t.data_type) for t in onnx.load(str(out_dir / GRAPH)).graph.initializer))
        files = {"model": GRAPH, **({"shallow": SHALLOW} if deepcache else {})}
        if deepcache:
            shared = share_weights(onnx, out_dir / GRAPH, out_dir / SHALLOW, DATA)
            files["data"] = DATA
            graphs["shallow"]["shared_tensors"] = shared
        for g in graphs.values():
            g["bytes"] = os.path.getsize(out_dir / g["file"])
        if deepcache:
            graphs["unet"]["bytes"] += os.path.getsize(out_dir / DATA)
        progress("exported the UNet to ONNX", len(graphs), len(graphs))
        return {
            "files": files,
            "graphs": graphs,
            "opset": OPSET,
            "deepcache": {"split": f"up_blocks.{len(unet.up_blocks) - 1}", "cache": "input of the last up block",
                          "cache_shape": cache_shape,
                          "shallow": ["conv_in", "down_blocks.0", f"up_blocks.{len(unet.up_blocks) - 1}",
                                      "conv_norm_out", "conv_out"]} if deepcache else None,
            "weight_storage": storage,
            "size_bytes": sum(g["bytes"] for g in graphs.values()),
        }

    def describe(self, art: Any) -> dict[str, Any]:
        """inspect: each graph's inputs, outputs, parameters and bytes, and how its weights are stored."""
        return describe_graphs(art.path, art.manifest)


def share_weights(onnx: Any, main: Path, shallow: Path, data: str) -> int:
    """Move ``main``'s larger tensors into the external file ``data`` and point ``shallow``'s identical tensors
    at the same bytes, so the weights both graphs use are stored once. Returns how many the shallow graph
    shares."""
    from onnx import TensorProto

    model = onnx.load(str(main))
    raw = {t.name: t.raw_data for t in model.graph.initializer if t.raw_data}
    onnx.save_model(model, str(main), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024)
    where = {t.name: list(t.external_data) for t in onnx.load(str(main), load_external_data=False).graph.initializer
             if t.data_location == TensorProto.EXTERNAL}
    small = onnx.load(str(shallow))
    n = 0
    for t in small.graph.initializer:
        if t.name in where and t.raw_data and t.raw_data == raw.get(t.name):
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            t.external_data.extend(where[t.name])
            n += 1
    onnx.save_model(small, str(shallow))
    os.chmod(main.parent / data, os.stat(main).st_mode & 0o777)  # onnx creates it private; the graphs are not
    return n


def _param(key: str, floats: dict[str, Any]) -> str:
    """A quantizer's key (``down_blocks.0.resnets.0.conv1`` or ``...conv1.weight``) as the parameter's name."""
    for name in (key, key + ".weight"):
        if name in floats:
            return name
    raise InputError(f"quantized weight {key!r} is not a parameter of this UNet")


def _trace(module: Any, args: tuple[Any, ...], inputs: list[str], outputs: list[str], path: Path) -> None:
    import torch

    with warnings.catch_warnings(), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, input_names=inputs, output_names=outputs,
                          dynamic_axes={k: v for k, v in _DIMS.items() if k in inputs + outputs},
                          opset_version=OPSET, do_constant_folding=True)


def describe_graphs(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Inputs, outputs, parameter count, bytes and initializer types of each graph of a diffusion artifact."""
    onnx = require("onnx", "onnx")
    import numpy as np
    from onnx import TensorProto

    graphs = {}
    counted: set[str] = set()  # external data files already counted (the shallow graph shares the main one's)
    for key, g in (manifest.get("graphs") or {}).items():
        path = folder / str(g.get("file", ""))
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # protobuf raises its own DecodeError
            raise CorruptFileError(f"{path} is not a readable ONNX graph ({exc}); re-run 'edgekit convert'") from exc
        types: dict[str, dict[str, int]] = {}
        params = 0
        external = sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
        size = path.stat().st_size + sum((folder / f).stat().st_size for f in external if f not in counted)
        counted.update(external)
        for t in model.graph.initializer:
            n = int(np.prod(t.dims)) if t.dims else 1
            entry = types.setdefault(TensorProto.DataType.Name(t.data_type), {"tensors": 0, "params": 0})
            entry["tensors"] += 1
            entry["params"] += n
            params += n
        graphs[key] = {
            "file": path.name, "bytes": size, "external_data": external, "params": params,
            "inputs": [_io(v) for v in model.graph.input], "outputs": [_io(v) for v in model.graph.output],
            "ops": len(model.graph.node), "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            "initializers": types,
        }
    return graphs


def _io(value: Any) -> dict[str, Any]:
    from onnx import TensorProto

    t = value.type.tensor_type
    dims = [d.dim_param or d.dim_value for d in t.shape.dim]
    return {"name": value.name, "type": TensorProto.DataType.Name(t.elem_type).lower(), "shape": dims}
