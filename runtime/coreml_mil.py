"""A reference evaluator of Core ML ML programs in numpy: the saved program, op by op, on Linux.

Core ML's own prediction library exists only on macOS, so on Linux nothing else can run a ``.mlpackage``.
This evaluator loads the program coremltools saved (:func:`edgekit.converters.formats.coreml.read.
load_program`), decodes every ``const`` and ``constexpr_*`` weight once, and then runs the remaining ops
in program order for each call, states (the KV cache) included: ``read_state`` gives the held tensor,
``coreml_update_state`` replaces it.

Numerics follow Core ML's fp16 programs on the GPU: tensors typed fp16 are stored as fp16 after every op,
while each op computes in float32 (matmul and linear accumulate in float32; softmax and layer_norm reduce
in float32). The evaluator covers the ops edgekit's programs use after coremltools' passes, and those
coremltools' own compression inserts; any other op is an error that names it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import UnsupportedError

F32 = np.float32
_STATE_OPS = ("read_state", "coreml_update_state")  # evaluated by MILEvaluator.run against the held states
_DTYPES = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int16": np.int16, "uint16": np.uint16,
           "int8": np.int8, "uint8": np.uint8, "bool": np.bool_, "fp64": np.float64, "int64": np.int64}


def _dtype_of(var: Any) -> Any:
    from coremltools.converters.mil.mil import types

    t = var.dtype
    return _DTYPES.get(types.builtin_to_string(t), None)


def _f(x: np.ndarray) -> np.ndarray:
    return x.astype(F32) if x.dtype in (np.float16, np.float64) else x


def _blockwise(data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
    d = data.astype(F32)
    if offset is not None:
        d = d - _expand(offset.astype(F32), d.shape)
    return d * _expand(scale.astype(F32), d.shape)


def _expand(p: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A per-block parameter broadcast over the blocks it covers (each axis cut into equal blocks)."""
    for ax, (n, m) in enumerate(zip(shape, p.shape, strict=True)):
        if m != n:
            p = np.repeat(p, n // m, axis=ax)
    return p


def _lut(indices: np.ndarray, lut: np.ndarray, vector_axis: Any) -> np.ndarray:
    rank = indices.ndim
    if lut.shape[-1] != 1:
        raise UnsupportedError("vector palettes (lut with VECTOR_SIZE > 1) are not supported by the evaluator")
    groups = []
    for ax in range(rank):
        size = indices.shape[ax] // lut.shape[ax]
        shape = [1] * rank
        shape[ax] = indices.shape[ax]
        groups.append((np.arange(indices.shape[ax]) // size).reshape(shape))
    return lut[(*groups, indices.astype(np.intp), 0)].astype(F32)


def _slice_args(x: np.ndarray, op: dict[str, Any]) -> tuple[tuple[slice, ...], list[int]]:
    rank = x.ndim
    begin = np.asarray(op["begin"]).tolist()
    end = np.asarray(op["end"]).tolist()
    stride = np.asarray(op.get("stride") if op.get("stride") is not None else [1] * rank).tolist()
    bm = op.get("begin_mask")
    em = op.get("end_mask")
    sq = op.get("squeeze_mask")
    bm = [False] * rank if bm is None else list(bm)
    em = [False] * rank if em is None else list(em)
    sl = []
    for i in range(rank):
        s = int(stride[i])
        b = None if bm[i] else int(begin[i])
        e = None if em[i] else int(end[i])
        if sq is not None and sq[i]:
            b = int(begin[i])
            e = b + 1 if b != -1 else None
        sl.append(slice(b, e, s))
    squeeze = [i for i in range(rank) if sq is not None and sq[i]]
    return tuple(sl), squeeze


def _slice_by_index(a: dict[str, Any]) -> np.ndarray:
    x = a["x"]
    sl, squeeze = _slice_args(x, a)
    out = x[sl]
    return np.squeeze(out, axis=tuple(squeeze)) if squeeze else out


def _slice_update(a: dict[str, Any]) -> np.ndarray:
    x = a["x"].copy()
    sl, _ = _slice_args(x, a)
    x[sl] = a["update"].reshape(x[sl].shape)
    return x


def _layer_norm(a: dict[str, Any]) -> np.ndarray:
    x = _f(a["x"])
    axes = tuple(int(v) for v in np.atleast_1d(a.get("axes") if a.get("axes") is not None else [-1]))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + F32(a.get("epsilon", 1e-5)))
    if a.get("gamma") is not None:
        y = y * _f(a["gamma"])
    if a.get("beta") is not None:
        y = y + _f(a["beta"])
    return y


def _softmax(a: dict[str, Any]) -> np.ndarray:
    x = _f(a["x"])
    ax = int(a.get("axis", -1))
    z = np.exp(x - x.max(axis=ax, keepdims=True))
    return z / z.sum(axis=ax, keepdims=True)


def _matmul(a: dict[str, Any]) -> np.ndarray:
    x, y = _f(a["x"]), _f(a["y"])
    if a.get("transpose_x"):
        x = np.swapaxes(x, -1, -2)
    if a.get("transpose_y"):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _conv(a: dict[str, Any]) -> np.ndarray:
    """2-D convolution (NCHW, weight ``(out, in/groups, kh, kw)``), as a sum over kernel positions of
    strided views times the kernel's slice: float32 accumulation."""
    x, w = _f(a["x"]), _f(a["weight"])
    if x.ndim != 4:
        raise UnsupportedError("the reference evaluator convolves 2-D images (NCHW) only")
    sh, sw = (int(v) for v in (a.get("strides") if a.get("strides") is not None else [1, 1]))
    dh, dw = (int(v) for v in (a.get("dilations") if a.get("dilations") is not None else [1, 1]))
    pad_type = str(a.get("pad_type", "valid"))
    kh, kw = w.shape[2:]
    if pad_type == "custom":
        pt, pb, pl, pr = (int(v) for v in a["pad"])
    elif pad_type == "valid":
        pt = pb = pl = pr = 0
    else:
        raise UnsupportedError(f"the reference evaluator has no conv pad_type {pad_type!r}")
    x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    groups = int(a.get("groups", 1))
    n, c, h, wd = x.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (wd - dw * (kw - 1) - 1) // sw + 1
    cin, cout = c // groups, w.shape[0] // groups
    out = np.zeros((n, w.shape[0], oh, ow), F32)
    for g in range(groups):
        xs, ws = x[:, g * cin:(g + 1) * cin], w[g * cout:(g + 1) * cout]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
                out[:, g * cout:(g + 1) * cout] += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j], optimize=True)
    if a.get("bias") is not None:
        out += _f(a["bias"]).reshape(1, -1, 1, 1)
    return out


def _pad(a: dict[str, Any]) -> np.ndarray:
    x = a["x"]
    p = [int(v) for v in np.asarray(a["pad"])]
    if str(a.get("mode", "constant")) != "constant":
        raise UnsupportedError("the reference evaluator pads with a constant only")
    widths = [(0, 0)] * (x.ndim - len(p) // 2) + [(p[2 * i], p[2 * i + 1]) for i in range(len(p) // 2)]
    return np.pad(x, widths, constant_values=float(a.get("constant_val", 0.0)))


def _batch_norm(a: dict[str, Any]) -> np.ndarray:
    x = _f(a["x"])
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - _f(a["mean"]).reshape(shape)) / np.sqrt(_f(a["variance"]).reshape(shape) + F32(a.get("epsilon", 1e-5)))
    if a.get("gamma") is not None:
        y = y * _f(a["gamma"]).reshape(shape)
    if a.get("beta") is not None:
        y = y + _f(a["beta"]).reshape(shape)
    return y


def _cast(a: dict[str, Any]) -> np.ndarray:
    return a["x"].astype(_DTYPES[str(a["dtype"])])


OPS: dict[str, Callable[[dict[str, Any]], np.ndarray]] = {
    "add": lambda a: _f(a["x"]) + _f(a["y"]),
    "sub": lambda a: _f(a["x"]) - _f(a["y"]),
    "mul": lambda a: _f(a["x"]) * _f(a["y"]),
    "real_div": lambda a: _f(a["x"]) / _f(a["y"]),
    "maximum": lambda a: np.maximum(_f(a["x"]), _f(a["y"])),
    "minimum": lambda a: np.minimum(_f(a["x"]), _f(a["y"])),
    "greater_equal": lambda a: a["x"] >= a["y"],
    "greater": lambda a: a["x"] > a["y"],
    "less": lambda a: a["x"] < a["y"],
    "select": lambda a: np.where(a["cond"], a["a"], a["b"]),
    "shape": lambda a: np.asarray(a["x"].shape, np.int32),
    "cast": _cast,
    "gather": lambda a: np.take(a["x"], a["indices"].astype(np.intp), axis=int(a.get("axis", 0))),
    "reshape": lambda a: a["x"].reshape([int(v) for v in np.asarray(a["shape"])]),
    "transpose": lambda a: np.transpose(a["x"], [int(v) for v in a["perm"]]),
    "concat": lambda a: np.concatenate([np.asarray(v) for v in a["values"]], axis=int(a["axis"])),
    "expand_dims": lambda a: np.expand_dims(a["x"], tuple(int(v) for v in a["axes"])),
    "squeeze": lambda a: np.squeeze(a["x"], tuple(int(v) for v in a["axes"])) if a.get("axes") is not None
    else np.squeeze(a["x"]),
    "slice_by_index": _slice_by_index,
    "slice_update": _slice_update,
    "layer_norm": _layer_norm,
    "softmax": _softmax,
    "matmul": _matmul,
    "linear": lambda a: _f(a["x"]) @ a["weight"].T + (0 if a.get("bias") is None else _f(a["bias"])),
    "silu": lambda a: _f(a["x"]) / (1 + np.exp(-_f(a["x"]))),
    "rsqrt": lambda a: 1 / np.sqrt(_f(a["x"]) + F32(a.get("epsilon", 1e-12))),
    "sqrt": lambda a: np.sqrt(_f(a["x"])),
    "reduce_mean": lambda a: _f(a["x"]).mean(axis=tuple(int(v) for v in a["axes"]), keepdims=bool(a.get("keep_dims"))),
    "pow": lambda a: np.power(_f(a["x"]), _f(a["y"])),
    "exp": lambda a: np.exp(_f(a["x"])),
    "tile": lambda a: np.tile(a["x"], [int(v) for v in a["reps"]]),
    "identity": lambda a: a["x"],
    "range_1d": lambda a: np.arange(a["start"], a["end"], a["step"]),
    "conv": _conv,
    "batch_norm": _batch_norm,
    "pad": _pad,
    "upsample_nearest_neighbor": lambda a: np.repeat(np.repeat(a["x"], int(a.get("scale_factor_height", 1)), axis=-2),
                                                     int(a.get("scale_factor_width", 1)), axis=-1),
}


class MILEvaluator:
    """The ``main`` function of a saved Core ML program, runnable with numpy.

    ``states`` (name -> array) is what the caller holds between calls (:meth:`new_state`); :meth:`run`
    takes the feeds and updates the states in place, like ``MLModel.predict(..., state=...)``.
    """

    def __init__(self, path: Path) -> None:
        from edgekit.converters.formats.coreml.read import load_program

        prog, self.metadata = load_program(path)
        fn = prog.functions["main"]
        self.input_names = [n for n in fn.inputs if not self._is_state(fn.inputs[n])]
        self.state_specs = {n: (tuple(int(d) for d in v.shape), np.float16)
                            for n, v in fn.inputs.items() if self._is_state(v)}
        self.output_names = [v.name for v in fn.outputs]
        self.consts: dict[str, np.ndarray] = {}
        self.steps: list[tuple[str, Callable | None, dict[str, Any], list[str], list[Any]]] = []
        for op in fn.operations:
            self._prepare(op)
        unknown = sorted({s[0] for s in self.steps if s[1] is None and s[0] not in _STATE_OPS})
        if unknown:
            raise UnsupportedError(f"the reference evaluator has no numpy kernel for op(s) {', '.join(unknown)}")

    @staticmethod
    def _is_state(var: Any) -> bool:
        from coremltools.converters.mil.mil import types

        return types.is_state(var.sym_type)

    def _prepare(self, op: Any) -> None:
        out = op.outputs[0].name if op.outputs else None
        if op.op_type == "const":
            v = op.outputs[0].val
            self.consts[out] = np.asarray(v) if not isinstance(v, str) else v
            return
        if op.op_type == "constexpr_blockwise_shift_scale":
            off = op.inputs.get("offset")
            data = op.inputs["data"]  # a const, or the output of another constexpr op (a palette's look-up)
            w = _blockwise(self.consts[data.name] if data.name in self.consts else np.asarray(data.val),
                           np.asarray(op.inputs["scale"].val),
                           None if off is None else np.asarray(off.val))
            self.consts[out] = w.astype(np.float16)
            return
        if op.op_type == "constexpr_lut_to_dense":
            va = op.inputs.get("vector_axis")
            self.consts[out] = _lut(np.asarray(op.inputs["indices"].val), np.asarray(op.inputs["lut"].val),
                                    None if va is None else va.val).astype(np.float16)
            return
        if op.op_type == "constexpr_sparse_to_dense":
            mask = np.asarray(op.inputs["mask"].val) != 0
            dense = np.zeros(mask.shape, np.asarray(op.inputs["nonzero_data"].val).dtype)
            dense[mask] = np.asarray(op.inputs["nonzero_data"].val)  # row-major order, as Core ML fills it
            self.consts[out] = dense
            return
        args = {k: ([x.name for x in v] if isinstance(v, (list, tuple)) else v.name) for k, v in op.inputs.items()}
        fn = OPS.get(op.op_type)
        if op.op_type == "add" and args["x"] in self.consts and args["y"] in self.consts:
            # a dense-and-sparse weight: its palette plus its outliers, summed once as a load would
            dt = _dtype_of(op.outputs[0])
            self.consts[out] = np.asarray(fn({"x": self.consts[args["x"]], "y": self.consts[args["y"]]})).astype(dt)
            return
        self.steps.append((op.op_type, fn, args, [o.name for o in op.outputs], [_dtype_of(o) for o in op.outputs]))

    def new_state(self) -> dict[str, np.ndarray]:
        """Zeroed states, as ``MLModel.make_state()`` gives them."""
        return {n: np.zeros(shape, dt) for n, (shape, dt) in self.state_specs.items()}

    def run(self, feeds: dict[str, np.ndarray], states: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        env: dict[str, Any] = dict(self.consts)
        env.update(feeds)
        env.update({n: s for n, s in states.items()})
        weights32 = self._weights32
        for op_type, fn, args, outs, dts in self.steps:
            a = {k: ([env[x] for x in v] if isinstance(v, list) else env[v]) for k, v in args.items()}
            if op_type == "linear":
                a["weight"] = weights32(args["weight"], a["weight"])
            elif op_type == "matmul" and args["y"] in self.consts:  # a linear whose weight is computed (outliers)
                a["y"] = weights32(args["y"], a["y"])
            elif op_type == "coreml_update_state":
                states[args["state"]] = a["value"].astype(np.float16)
                env[args["state"]] = states[args["state"]]
                env[outs[0]] = a["value"]
                continue
            elif op_type == "read_state":
                env[outs[0]] = env[args["input"]]
                continue
            y = fn(a)
            dt = dts[0]
            env[outs[0]] = np.asarray(y).astype(dt, copy=False) if dt is not None else y
        return {n: env[n] for n in self.output_names}

    def _weights32(self, name: str, value: np.ndarray) -> np.ndarray:
        if name not in self.consts:
            return _f(value)
        cache = self.__dict__.setdefault("_w32", {})
        if name not in cache:
            cache[name] = value.astype(F32)
        return cache[name]

