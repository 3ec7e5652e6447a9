"""Diffusion UNets as Core ML programs: ``unet.mlpackage``, built with the MIL builder from the diffusers
module's own weights (as the decoder programs are, :mod:`.program`: no torch front end, no re-tracing).

The iOS18 / macOS15 ``main`` function takes ``sample`` float32 ``(n, c, h, w)`` (``n`` from 1 to
:data:`MAX_BATCH`), ``timestep`` int32 ``(n,)`` (an integer training timestep, ``0 .. T-1``) and, for a
class-conditional UNet, ``class_labels`` int32 ``(n,)``; it returns ``out`` float32, the network's
prediction (the scheduler stays in edgekit's runtime, as with ONNX). Inside, everything is fp16, Core ML's
GPU / Neural Engine precision:

* the sinusoidal time embedding is a table over the ``T`` training timesteps, computed by the module's own
  ``time_proj`` in float32 and looked up by ``timestep``: ``sin(999 * f)`` computed in fp16 would be noise;
* group norm is ``layer_norm`` over each group's ``(C/G, h, w)`` values (a reshape), then the affine
  as a ``batch_norm`` of mean 0 and variance 1;
* quantized weights are ``constexpr_blockwise_shift_scale`` of the quantizer's own integers, seen as
  ``[out, in]`` (a conv's ``[out, cin*kh*kw]``, reshaped to the kernel for ``conv``): the blocks of 32
  inputs run across kernel positions and channels, which a 4-D per-axis block could not express;
* a low-rank branch (SVDQuant) runs on the activations, ``conv(conv(x, b), a)``: folding ``a @ b`` into
  the weight would store a dense fp16 matrix and undo the integers.

Predictions need macOS; on Linux the package is checked by loading its program back, reading its weights,
and evaluating it with edgekit's numpy MIL evaluator (:mod:`edgekit.runtime.coreml_mil`).
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.converters.diffusion.export import register_exporter
from edgekit.converters.formats.coreml.package import (
    coremltools,
    fresh_op_names,
    interruptible,
    package_bytes,
    save_package,
    scratch_in,
)
from edgekit.converters.formats.coreml.program import Blockwise, weight_var
from edgekit.errors import InputError, UnsupportedError
from edgekit.progress import ProgressFn

PACKAGE = "unet.mlpackage"
MAX_BATCH = 64


def blockwise(qw: Any) -> Blockwise:
    """A :class:`~edgekit.converters.diffusion.qweights.QuantWeight`'s integers as Core ML blockwise data
    (edgekit's unsigned codes: a signed ``q`` is stored as ``q + 2**(bits-1)``)."""
    if qw.signed:
        codes = (qw.q.astype(np.int16) + (1 << (qw.bits - 1))).astype(np.uint8)
        return Blockwise(qw.bits, codes, qw.scale.astype(np.float16), None)
    return Blockwise(qw.bits, qw.q.astype(np.uint8), qw.scale.astype(np.float16), qw.zero.astype(np.uint8))


def op_name(param: str) -> str:
    """The MIL name of a UNet parameter's weight op (``down_blocks.0.resnets.0.conv1.weight`` ->
    ``down_blocks_0_resnets_0_conv1_weight``)."""
    return param.replace(".", "_")


class _UNet:
    """The ops of one UNet program; ``mb`` is coremltools' builder, shapes are tracked as ``(c, h, w)``."""

    def __init__(self, mb: Any, unet: Any, weights: dict[str, Any] | None) -> None:
        self.mb, self.unet, self.q = mb, unet, dict(weights or {})
        self.used: set[str] = set()

    def const(self, value: Any, name: str) -> Any:
        return self.mb.const(val=np.asarray(value.detach().float().numpy(), np.float16), name=name)

    def weight(self, module: Any, prefix: str) -> Any:
        mb = self.mb
        key = f"{prefix}.weight"
        shape = [int(s) for s in module.weight.shape]
        qw = self.q.get(key)
        if qw is None:
            return self.const(module.weight, op_name(key))
        if tuple(qw.shape) != tuple(shape):
            raise InputError(f"the quantized {key} has shape {qw.shape}, the UNet's has {tuple(shape)}; "
                             "quantize the same UNet you export")
        self.used.add(key)
        w = weight_var(mb, op_name(key), blockwise(qw))
        return w if len(shape) == 2 else mb.reshape(x=w, shape=shape, name=op_name(key) + "_kernel")

    def lowrank(self, prefix: str, shape: list[int]) -> tuple[Any, Any] | None:
        qw = self.q.get(f"{prefix}.weight")
        if qw is None or qw.lowrank is None:
            return None
        a, b = qw.lowrank
        mb, r = self.mb, a.shape[1]
        tail = [1] * (len(shape) - 2)
        a_var = mb.const(val=a.astype(np.float16).reshape([shape[0], r, *tail]), name=op_name(prefix) + "_lora_a")
        b_var = mb.const(val=b.astype(np.float16).reshape([r, *shape[1:]]), name=op_name(prefix) + "_lora_b")
        return a_var, b_var

    def bias(self, module: Any, prefix: str) -> Any:
        return None if module.bias is None else self.const(module.bias, op_name(prefix + ".bias"))

    def conv(self, x: Any, module: Any, prefix: str) -> Any:
        mb = self.mb
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise UnsupportedError(f"{prefix}: only ungrouped convolutions with zero padding export to Core ML")
        ph, pw = module.padding
        args = {"strides": list(module.stride), "dilations": list(module.dilation), "pad_type": "custom",
                "pad": [ph, ph, pw, pw]}
        y = mb.conv(x=x, weight=self.weight(module, prefix), bias=self.bias(module, prefix), **args)
        lr = self.lowrank(prefix, [int(s) for s in module.weight.shape])
        if lr is not None:
            a, b = lr
            y = mb.add(x=y, y=mb.conv(x=mb.conv(x=x, weight=b, **args), weight=a))
        return y

    def linear(self, x: Any, module: Any, prefix: str) -> Any:
        mb = self.mb
        w, b = self.weight(module, prefix), self.bias(module, prefix)
        y = mb.linear(x=x, weight=w, bias=b) if b is not None else mb.linear(x=x, weight=w)
        lr = self.lowrank(prefix, [int(s) for s in module.weight.shape])
        if lr is not None:
            a, bb = lr
            y = mb.add(x=y, y=mb.linear(x=mb.linear(x=x, weight=bb), weight=a))
        return y

    def group_norm(self, x: Any, gn: Any, prefix: str, chw: tuple[int, int, int]) -> Any:
        mb = self.mb
        c, h, w = chw
        g = gn.num_groups
        y = mb.reshape(x=x, shape=[-1, g, c // g * h * w])
        y = mb.layer_norm(x=y, axes=[2], epsilon=np.float16(max(gn.eps, 1e-7)))
        y = mb.reshape(x=y, shape=[-1, c, h, w])
        if gn.affine:
            # the per-channel affine as a batch_norm of mean 0, variance 1: coremltools' own pass would fuse a
            # mul + add into one, with fp32 statistics beside fp16 gamma that its validation then refuses
            # (coremltools 9.0), also when a user later runs its optimize APIs on the package
            zeros, ones = np.zeros(c, np.float16), np.ones(c, np.float16)
            y = mb.batch_norm(x=y, mean=zeros, variance=ones, gamma=self.const(gn.weight, op_name(prefix + ".weight")),
                              beta=self.const(gn.bias, op_name(prefix + ".bias")), epsilon=np.float16(0))
        return y

    def resnet(self, x: Any, emb: Any, r: Any, p: str, chw: tuple[int, int, int]) -> tuple[Any, tuple[int, int, int]]:
        mb = self.mb
        if r.upsample is not None or r.downsample is not None or r.time_embedding_norm != "default" \
                or r.skip_time_act or type(r.nonlinearity).__name__ != "SiLU":
            raise UnsupportedError(f"{p}: only diffusers' default resnets (SiLU, additive time embedding, no "
                                   "resampling inside) export to Core ML")
        out_c = int(r.conv1.weight.shape[0])
        h = self.conv(mb.silu(x=self.group_norm(x, r.norm1, p + ".norm1", chw)), r.conv1, p + ".conv1")
        if r.time_emb_proj is not None:
            t = self.linear(mb.silu(x=emb), r.time_emb_proj, p + ".time_emb_proj")
            h = mb.add(x=h, y=mb.expand_dims(x=t, axes=[2, 3]))
        new = (out_c, chw[1], chw[2])
        h = self.conv(mb.silu(x=self.group_norm(h, r.norm2, p + ".norm2", new)), r.conv2, p + ".conv2")
        skip = x if r.conv_shortcut is None else self.conv(x, r.conv_shortcut, p + ".conv_shortcut")
        y = mb.add(x=skip, y=h)
        if r.output_scale_factor != 1:
            y = mb.mul(x=y, y=np.float16(1.0 / r.output_scale_factor))
        return y, new

    def attention(self, x: Any, a: Any, p: str, chw: tuple[int, int, int]) -> Any:
        mb = self.mb
        c, h, w = chw
        if a.spatial_norm is not None or a.norm_q is not None or a.norm_k is not None or a.is_cross_attention \
                or a.group_norm is None:
            raise UnsupportedError(f"{p}: only self-attention with a group norm (UNet2DModel's) exports to Core ML")
        n = self.group_norm(x, a.group_norm, p + ".group_norm", chw)
        seq = mb.transpose(x=mb.reshape(x=n, shape=[-1, c, h * w]), perm=[0, 2, 1])  # (n, hw, c)
        heads = a.heads
        inner = int(a.to_q.weight.shape[0])
        d = inner // heads

        def split(t: Any) -> Any:
            return mb.transpose(x=mb.reshape(x=t, shape=[-1, h * w, heads, d]), perm=[0, 2, 1, 3])

        q = split(mb.mul(x=self.linear(seq, a.to_q, p + ".to_q"), y=np.float16(a.scale)))
        k = split(self.linear(seq, a.to_k, p + ".to_k"))
        v = split(self.linear(seq, a.to_v, p + ".to_v"))
        probs = mb.softmax(x=mb.matmul(x=q, y=k, transpose_y=True), axis=-1)
        o = mb.reshape(x=mb.transpose(x=mb.matmul(x=probs, y=v), perm=[0, 2, 1, 3]), shape=[-1, h * w, inner])
        o = self.linear(o, a.to_out[0], p + ".to_out.0")
        y = mb.reshape(x=mb.transpose(x=o, perm=[0, 2, 1]), shape=[-1, c, h, w])
        if a.residual_connection:
            y = mb.add(x=y, y=x)
        if a.rescale_output_factor != 1:
            y = mb.mul(x=y, y=np.float16(1.0 / a.rescale_output_factor))
        return y

    def downsample(self, x: Any, d: Any, p: str, chw: tuple[int, int, int]) -> tuple[Any, tuple[int, int, int]]:
        if not d.use_conv or d.norm is not None:
            raise UnsupportedError(f"{p}: only conv downsamplers export to Core ML")
        pad = int(d.padding)
        if pad == 0:  # diffusers pads right and bottom by one, then convolves unpadded
            x = self.mb.pad(x=x, pad=[0, 1, 0, 1])
        y = self.conv(x, d.conv, p + ".conv")
        c = int(d.conv.weight.shape[0])
        s = d.conv.stride[0]
        k = d.conv.kernel_size[0]
        hh = (chw[1] + (2 * pad if pad else 1) - k) // s + 1
        ww = (chw[2] + (2 * pad if pad else 1) - k) // s + 1
        return y, (c, hh, ww)

    def upsample(self, x: Any, u: Any, p: str, chw: tuple[int, int, int]) -> tuple[Any, tuple[int, int, int]]:
        if u.use_conv_transpose or not u.interpolate or u.norm is not None or not u.use_conv:
            raise UnsupportedError(f"{p}: only nearest-neighbour upsamplers with a conv export to Core ML")
        y = self.mb.upsample_nearest_neighbor(x=x, scale_factor_height=2, scale_factor_width=2)
        conv = u.conv
        y = self.conv(y, conv, p + ".conv")
        return y, (int(conv.weight.shape[0]), chw[1] * 2, chw[2] * 2)


def build(pipe: Any, unet: Any, weights: dict[str, Any] | None, progress: ProgressFn) -> Any:
    """The MIL program (``coremltools.converters.mil.Program``) of ``unet`` with ``weights`` stored as ints."""
    import torch

    ct = coremltools()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program, get_new_symbol, types

    fresh_op_names(mb)
    cfg = unet.config
    c, s = int(cfg.in_channels), pipe.sample_size
    n = get_new_symbol()
    specs = {"sample": mb.TensorSpec((n, c, s, s), dtype=types.fp32), "timestep": mb.TensorSpec((n,), dtype=types.int32)}
    if unet.class_embedding is not None:
        specs["class_labels"] = mb.TensorSpec((n,), dtype=types.int32)
    T = int(pipe.scheduler_config.get("num_train_timesteps", 1000))
    with torch.no_grad():
        table = unet.time_proj(torch.arange(T)).float()
    total = len(unet.down_blocks) + len(unet.up_blocks) + 2
    with Function(specs, ct.target.iOS18) as fn:
        g = _UNet(mb, unet, weights)
        progress("building the Core ML program", 0, total)
        x = mb.cast(x=fn.inputs["sample"], dtype="fp16")
        if cfg.center_input_sample:
            x = mb.sub(x=mb.mul(x=x, y=np.float16(2)), y=np.float16(1))
        t_emb = mb.gather(x=g.const(table, "time_proj_table"), indices=fn.inputs["timestep"], axis=0)
        te = unet.time_embedding
        if te.cond_proj is not None or te.post_act is not None or type(te.act).__name__ != "SiLU":
            raise UnsupportedError("only a SiLU time-embedding MLP exports to Core ML")
        emb = g.linear(mb.silu(x=g.linear(t_emb, te.linear_1, "time_embedding.linear_1")), te.linear_2,
                       "time_embedding.linear_2")
        if unet.class_embedding is not None:
            table_c = g.const(unet.class_embedding.weight, "class_embedding_weight")
            emb = mb.add(x=emb, y=mb.gather(x=table_c, indices=fn.inputs["class_labels"], axis=0))
        h = g.conv(x, unet.conv_in, "conv_in")
        chw = (int(unet.conv_in.weight.shape[0]), s, s)
        skips = [(h, chw)]
        for i, blk in enumerate(unet.down_blocks):
            progress(f"down block {i}", 1 + i, total)
            attns = getattr(blk, "attentions", None) or [None] * len(blk.resnets)
            for j, (r, a) in enumerate(zip(blk.resnets, attns, strict=True)):
                h, chw = g.resnet(h, emb, r, f"down_blocks.{i}.resnets.{j}", chw)
                if a is not None:
                    h = g.attention(h, a, f"down_blocks.{i}.attentions.{j}", chw)
                skips.append((h, chw))
            for j, d in enumerate(blk.downsamplers or []):
                h, chw = g.downsample(h, d, f"down_blocks.{i}.downsamplers.{j}", chw)
                skips.append((h, chw))
        if unet.mid_block is not None:
            m = unet.mid_block
            h, chw = g.resnet(h, emb, m.resnets[0], "mid_block.resnets.0", chw)
            for j, (a, r) in enumerate(zip(m.attentions, m.resnets[1:], strict=True)):
                if a is not None:
                    h = g.attention(h, a, f"mid_block.attentions.{j}", chw)
                h, chw = g.resnet(h, emb, r, f"mid_block.resnets.{j + 1}", chw)
        for i, blk in enumerate(unet.up_blocks):
            progress(f"up block {i}", 1 + len(unet.down_blocks) + i, total)
            attns = getattr(blk, "attentions", None) or [None] * len(blk.resnets)
            for j, (r, a) in enumerate(zip(blk.resnets, attns, strict=True)):
                skip, schw = skips.pop()
                h = mb.concat(values=[h, skip], axis=1)
                h, chw = g.resnet(h, emb, r, f"up_blocks.{i}.resnets.{j}", (chw[0] + schw[0], chw[1], chw[2]))
                if a is not None:
                    h = g.attention(h, a, f"up_blocks.{i}.attentions.{j}", chw)
            for j, u in enumerate(blk.upsamplers or []):
                h, chw = g.upsample(h, u, f"up_blocks.{i}.upsamplers.{j}", chw)
        h = mb.silu(x=g.group_norm(h, unet.conv_norm_out, "conv_norm_out", chw))
        h = g.conv(h, unet.conv_out, "conv_out")
        fn.set_outputs([mb.cast(x=h, dtype="fp32", name="out")])
    missing = sorted(set(g.q) - g.used)
    if missing:
        raise InputError(f"quantized weight {missing[0]} is not a conv/linear weight of the UNet's program; "
                         "quantize the same UNet you export")
    prog = Program()
    prog.add_function("main", fn)
    return prog


@register_exporter("coreml")
class CoreMLUNetExporter:
    """The UNet as an iOS18 / macOS15 ML program: fp16, quantized weights as blockwise ints."""

    name = "coreml"

    def export(self, pipe: Any, unet: Any, weights: dict[str, Any] | None, out_dir: Path,
               options: dict[str, Any], progress: ProgressFn) -> dict[str, Any]:
        if options:
            raise InputError(f"-O {sorted(options)[0]} is not an option of diffusion Core ML export (it has none)")
        ct = coremltools()
        t0 = time.perf_counter()
        prog = interruptible(build, pipe, unet, weights, progress)  # coremltools' MIL builder
        c, s = pipe.in_channels, pipe.sample_size
        batch = ct.RangeDim(1, MAX_BATCH)
        inputs = [ct.TensorType("sample", shape=(batch, c, s, s), dtype=np.float32),
                  ct.TensorType("timestep", shape=(batch,), dtype=np.int32)]
        if unet.class_embedding is not None:
            inputs.append(ct.TensorType("class_labels", shape=(batch,), dtype=np.int32))
        progress("writing the ML program (coremltools)", 1, 1)
        path = out_dir / PACKAGE
        # coremltools' pass pipelines draw tqdm bars; its temporary package lives in the output (scratch_in)
        with scratch_in(out_dir), contextlib.redirect_stderr(io.StringIO()):
            model = interruptible(ct.convert, prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                                  compute_precision=ct.precision.FLOAT16, skip_model_load=True, inputs=inputs,
                                  outputs=[ct.TensorType("out", dtype=np.float32)])
            model.user_defined_metadata.update({
                "edgekit.task": "diffusion", "edgekit.source": pipe.path.name,
                "edgekit.num_train_timesteps": str(pipe.schedule().num_train_timesteps)})
            model.short_description = f"{pipe.path.name} UNet for Core ML (edgekit)"
            interruptible(save_package, model, path)
        names = [i.name for i in inputs]
        ops = sorted({op.op_type for op in prog.functions["main"].operations})
        return {
            "files": {"model": PACKAGE},
            "graphs": {"unet": {"file": PACKAGE, "inputs": names, "outputs": ["out"]}},
            "coreml": {"deployment_target": "iOS18", "compute_precision": "fp16", "inputs": names,
                       "input_dtypes": {"sample": "float32", "timestep": "int32", "class_labels": "int32"},
                       "max_batch": MAX_BATCH, "ops": ops, "build_s": round(time.perf_counter() - t0, 1),
                       "weight_storage": _storage(weights)},
            "size_bytes": package_bytes(path),
        }


def _storage(weights: dict[str, Any] | None) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(f"{'INT' if qw.signed else 'UINT'}{qw.bits}_B{qw.block}" + ("+LR" if qw.lowrank else "")
                        for qw in (weights or {}).values()))
