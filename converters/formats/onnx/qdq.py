"""Quantized UNet weights in an ONNX graph: integer initializers + ``DequantizeLinear`` feeding the op.

A float graph exported from PyTorch names its Conv/Gemm weights after the parameters; a Linear applied to a
3-D input becomes ``MatMul`` with a transposed copy under a generated name. :func:`store_quantized` finds
each quantized weight's initializer (by name, else by value: the transposed copy), and replaces it with a
``DequantizeLinear`` of the integers whose output takes the old name, so every consumer is unchanged.

Layouts: int8 rows with one scale each are per-axis DQ (opset 13); blocked weights are opset 21's blocked
DQ (``block_size`` along the inputs) on INT4/UINT4 (or INT8/UINT8) initializers, scales in float16 when
that holds them exactly (edgekit's grids round them so); a conv's weight is
dequantized as ``[out, cin*kh*kw]`` and reshaped. An SVDQuant low-rank branch ``a @ b`` (float16) is added
to the dequantized weight in the graph, so the file holds integers + the thin factors, never the product.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from edgekit.errors import InputError

DQ_OPSET = 21  # blocked DequantizeLinear, INT4/UINT4


def _container(bits: int, signed: bool) -> tuple[int, Any]:
    """The ONNX integer type holding ``bits``-bit values, and its numpy type (the values as stored)."""
    from onnx import TensorProto

    if bits <= 4:
        return (TensorProto.INT4, np.int8) if signed else (TensorProto.UINT4, np.uint8)
    if bits <= 8:
        return (TensorProto.INT8, np.int8) if signed else (TensorProto.UINT8, np.uint8)
    raise InputError(f"{bits}-bit weights cannot be stored as ONNX integers (at most 8 bits)")


def int_tensor(name: str, values: np.ndarray, bits: int, signed: bool) -> Any:
    """An initializer of ``values`` in the smallest ONNX integer type for ``bits``: 4-bit values two per
    byte, the first element in the low nibble (the ONNX spec's packing)."""
    from onnx import TensorProto, helper

    dtype, np_type = _container(bits, signed)
    v = np.ascontiguousarray(values).astype(np_type)
    if dtype in (TensorProto.INT4, TensorProto.UINT4):
        flat = (v.reshape(-1).astype(np.uint8) & 0x0F)
        if flat.size % 2:
            flat = np.concatenate([flat, np.zeros(1, np.uint8)])
        raw = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
        return helper.make_tensor(name, dtype, list(v.shape), raw, raw=True)
    return helper.make_tensor(name, dtype, list(v.shape), v.tobytes(), raw=True)


def type_name(dtype: int) -> str:
    from onnx import TensorProto

    return str(TensorProto.DataType.Name(dtype))


LOWRANK_GRAPHS = ("merged", "branch")


def store_quantized(model: Any, weights: dict[str, Any], floats: dict[str, np.ndarray], prefix: str = "",
                    lowrank_graph: str = "merged") -> dict[str, int]:
    """Replace the float initializer of every weight in ``weights`` (parameter name -> QuantWeight) by its
    integers and a DequantizeLinear. ``floats``: the float weights the graph was exported with (to find
    transposed copies by value). ``lowrank_graph``: a low-rank branch is added to the dequantized weight
    ("merged") or run beside the layer on its input ("branch": two thin layers, ``x b^T a^T``).
    Returns how many initializers each storage type now holds."""
    import dataclasses

    from onnx import numpy_helper

    if lowrank_graph not in LOWRANK_GRAPHS:
        raise InputError(f"lowrank_graph must be one of {', '.join(LOWRANK_GRAPHS)}")

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for t in graph.initializer:
        by_shape.setdefault(tuple(t.dims), []).append(t.name)
    new_nodes: list[Any] = []
    for pname, qw in weights.items():
        if prefix + pname in inits:
            target, transposed = prefix + pname, False
        else:
            w = floats[pname].reshape(qw.shape[0], -1).T
            target = next((n for n in by_shape.get(tuple(w.shape), [])
                           if n in inits and np.array_equal(numpy_helper.to_array(inits[n]), w)), None)
            if target is None:
                continue  # not in this graph (a DeepCache shallow graph holds only some layers)
            transposed = True
        graph.initializer.remove(inits.pop(target))
        if lowrank_graph == "branch" and qw.lowrank is not None:
            _branch(graph, target, qw.lowrank, qw.shape)
            qw = dataclasses.replace(qw, lowrank=None)
        new_nodes += _dequantize(graph, target, qw, transposed)
    for node in reversed(new_nodes):  # initializers only: they may run first
        graph.node.insert(0, node)
    model.opset_import[0].version = max(model.opset_import[0].version, DQ_OPSET)
    return dict(Counter(type_name(t.data_type) for t in graph.initializer))


def _dequantize(graph: Any, out_name: str, qw: Any, transposed: bool) -> list[Any]:
    """Nodes computing the float weight ``out_name`` from ``qw`` (its initializers are added to ``graph``)."""
    from onnx import TensorProto, helper, numpy_helper

    base = out_name.replace("::", "_") + "_q"
    q, scale, zero = qw.q, qw.scale.astype(np.float32), qw.zero
    per_row = qw.block == q.shape[1]
    if transposed:  # the graph holds W.T [in, out]: blocks run down the rows
        q, scale, zero = q.T, scale.T, None if zero is None else zero.T
    axis = (1 if transposed else 0) if per_row else (0 if transposed else 1)
    if per_row:
        scale, zero = scale.reshape(-1), None if zero is None else zero.reshape(-1)
    graph.initializer.append(int_tensor(base, q, qw.bits, qw.signed))
    nodes = []
    if np.array_equal(scale, scale.astype(np.float16).astype(np.float32)):
        # float16 holds these scales exactly: half the bytes; cast before the DQ, so q * scale stays float32
        graph.initializer.append(numpy_helper.from_array(scale.astype(np.float16), base + "_scale16"))
        nodes.append(helper.make_node("Cast", [base + "_scale16"], [base + "_scale"], to=TensorProto.FLOAT))
    else:
        graph.initializer.append(numpy_helper.from_array(scale, base + "_scale"))
    inputs = [base, base + "_scale"]
    if zero is not None:
        graph.initializer.append(int_tensor(base + "_zero", zero, qw.bits, qw.signed))
        inputs.append(base + "_zero")
    attrs = {"axis": axis} if per_row else {"axis": axis, "block_size": qw.block}
    lowrank, conv = qw.lowrank is not None, len(qw.shape) > 2 and not transposed
    dq_out = base + "_dq" if (lowrank or conv) else out_name
    nodes.append(helper.make_node("DequantizeLinear", inputs, [dq_out], name=base + "_DequantizeLinear", **attrs))
    if lowrank:
        a, b = (m.astype(np.float16) for m in qw.lowrank)
        first, second = (b.T, a.T) if transposed else (a, b)
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(first), base + "_lr_a"))
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(second), base + "_lr_b"))
        summed = base + "_sum" if conv else out_name
        nodes += [helper.make_node("Cast", [base + "_lr_a"], [base + "_lr_a32"], to=TensorProto.FLOAT),
                  helper.make_node("Cast", [base + "_lr_b"], [base + "_lr_b32"], to=TensorProto.FLOAT),
                  helper.make_node("MatMul", [base + "_lr_a32", base + "_lr_b32"], [base + "_lr"]),
                  helper.make_node("Add", [dq_out, base + "_lr"], [summed])]
        dq_out = summed
    if conv:
        graph.initializer.append(numpy_helper.from_array(np.asarray(qw.shape, np.int64), base + "_shape"))
        nodes.append(helper.make_node("Reshape", [dq_out, base + "_shape"], [out_name]))
    return nodes


def _branch(graph: Any, weight: str, lowrank: tuple[np.ndarray, np.ndarray], shape: tuple[int, ...]) -> None:
    """Beside every Conv/Gemm/MatMul reading ``weight``, the same op through the factors: a conv with ``b`` (as
    ``[r, cin, kh, kw]``, the layer's strides and pads) then a 1x1 conv with ``a``; or ``(x b^T) a^T``."""
    from onnx import TensorProto, helper, numpy_helper

    a, b = (m.astype(np.float16) for m in lowrank)
    base = weight.replace("::", "_") + "_lr"
    nodes = list(graph.node)
    for i in reversed(range(len(nodes))):
        node = nodes[i]
        if len(node.input) < 2 or node.input[1] != weight:
            continue
        x, y, tag = node.input[0], node.output[0], f"{base}{i}"
        if node.op_type == "Conv":
            attrs = {at.name: helper.get_attribute_value(at) for at in node.attribute}
            if attrs.get("group", 1) != 1:
                raise InputError(f"{weight}: a low-rank branch beside a grouped conv is not supported; use lowrank_graph=merged")
            first = b.reshape(b.shape[0], *shape[1:])
            second = a.reshape(a.shape[0], a.shape[1], 1, 1)
            ops = [("Conv", {k: v for k, v in attrs.items() if k != "kernel_shape"}), ("Conv", {})]
        elif node.op_type in ("Gemm", "MatMul"):
            first, second = np.ascontiguousarray(b.T), np.ascontiguousarray(a.T)
            ops = [("MatMul", {}), ("MatMul", {})]
        else:
            continue
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(first), tag + "_b"))
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(second), tag + "_a"))
        node.output[0] = tag + "_main"
        new = [helper.make_node("Cast", [tag + "_b"], [tag + "_b32"], to=TensorProto.FLOAT),
               helper.make_node("Cast", [tag + "_a"], [tag + "_a32"], to=TensorProto.FLOAT),
               helper.make_node(ops[0][0], [x, tag + "_b32"], [tag + "_mid"], **ops[0][1]),
               helper.make_node(ops[1][0], [tag + "_mid", tag + "_a32"], [tag + "_out"], **ops[1][1]),
               helper.make_node("Add", [tag + "_main", tag + "_out"], [y])]
        for k, n in enumerate(new):
            graph.node.insert(i + 1 + k, n)
