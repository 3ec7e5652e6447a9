"""W8 and W4 weights for a diffusion UNet: RTN, GPTQ calibrated across timesteps (Q-Diffusion), and an
SVDQuant-style low-rank float branch.

Every ``Conv2d`` and ``Linear`` of the UNet (resnets, attention, time embedding, down/upsamplers, the first
and last convs) is stored on an integer grid as a :class:`~.qweights.QuantWeight`, the weight seen as
``[out, in]`` (a conv's ``[out, cin*kh*kw]``):

* W8: int8 with one scale per output channel, symmetric (a per-row grid, :mod:`..quantize.grids.rowwise`);
* W4: signed 4 bits in blocks of 32 inputs (onnxruntime's / Core ML's ``INT4_B32`` grids) where the row
  width is a multiple of 32, else one scale per row. Symmetric because on the trained digits teacher it
  matched a zero point per block (GPTQ: 3.7e-4 vs 3.8e-4 relative output MSE held out; RTN: equal) in 3%
  fewer bytes, and every runtime takes signed int4 without zero points. Q-Diffusion's habit is kept: the
  first and last convs (``conv_in``, ``conv_out``) stay at 8 bits under W4 (``edge_bits``): they touch the
  pixels directly, hold well under 1% of the weights, and at 4 bits the teacher's output error grew 6.4x.

The class embedding (a lookup table, not a matmul) and the norms stay in float. The rounding is
edgekit's: the grids' own parameter search (RTN) or GPTQ (:mod:`..quantize.gptq_kernel`) against each
layer's Hessian from :func:`.calibrate.calibrate`. With ``lowrank = r`` each weight first gives a rank-``r``
float branch (its truncated SVD, :mod:`..quantize.lowrank`) that takes its largest directions, the residual
is quantized, and the branch is then refitted to what the integers missed (the SVD weighted by the layer's
inputs when calibrated).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgekit.converters.diffusion.qweights import QuantWeight
from edgekit.errors import InputError
from edgekit.progress import ProgressFn, no_progress

METHODS = ("rtn", "gptq")
EDGE_LAYERS = ("conv_in", "conv_out")


@dataclass(frozen=True)
class DiffusionQuantConfig:
    """How a UNet's weights are quantized.

    bits: 8 (int8 per output channel) or 4 (blocks of ``block`` inputs).
    method: "rtn" (no calibration) or "gptq" (Hessians from the pipeline's own sampling trajectory).
    lowrank: rank of the float branch kept beside each weight (0: none).
    block: inputs per scale for 4-bit weights (rows not a multiple of it get one scale per row).
    symmetric: signed codes without zero points (else unsigned codes and a zero point per block).
    edge_bits: bits of ``conv_in``/``conv_out`` when ``bits`` is lower (0: the same as every layer).
    calib_images: images sampled for calibration (the pipeline's classes in turn).
    timesteps: steps of each sampling trajectory at which the layers' inputs are gathered.
    seed: the calibration noise.
    damp: GPTQ's dampening of the Hessian diagonal.
    """

    bits: int = 8
    method: str = "rtn"
    lowrank: int = 0
    block: int = 32
    symmetric: bool = True
    edge_bits: int = 8
    calib_images: int = 64
    timesteps: int = 8
    seed: int = 0
    damp: float = 0.01

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise InputError(f"diffusion UNets are quantized to 4 or 8 bits; got --bits {self.bits}")
        if self.method not in METHODS:
            raise InputError(f"method {self.method!r} cannot quantize a UNet; use one of {', '.join(METHODS)}")
        if self.lowrank < 0:
            raise InputError(f"the low-rank branch's rank must be 0 (none) or positive; got {self.lowrank}")
        if self.block < 16 or self.block > 256 or self.block & (self.block - 1):
            raise InputError(f"block {self.block} is not supported; use 16, 32, 64, 128 or 256")
        if self.edge_bits not in (0, 4, 8):
            raise InputError(f"edge_bits must be 0, 4 or 8; got {self.edge_bits}")
        if self.method == "gptq" and (self.calib_images < 1 or self.timesteps < 1):
            raise InputError("GPTQ needs calibration: give calib_images and timesteps of at least 1")

    @property
    def calibrated(self) -> bool:
        return self.method != "rtn"

    def layer_bits(self, name: str) -> int:
        if name in EDGE_LAYERS and self.edge_bits > self.bits:
            return self.edge_bits
        return self.bits

    def grid(self, name: str, width: int) -> Any:
        """The storage grid of layer ``name`` whose rows hold ``width`` weights."""
        from edgekit.converters.quantize.grids import as_grid
        from edgekit.converters.quantize.grids.rowwise import rowwise

        bits = self.layer_bits(name)
        if bits == 4 and width % self.block == 0:
            return as_grid(f"{'INT' if self.symmetric else 'UINT'}4_B{self.block}")
        return rowwise(bits, width, self.symmetric)


def quantize_unet(pipe: Any, unet: Any, bits: int, method: str = "rtn", lowrank: int = 0, calib_images: int = 64,
                  timesteps: int = 8, seed: int = 0, progress: ProgressFn = no_progress,
                  block_size: int = 32) -> dict[str, QuantWeight]:
    """Weight name (``"down_blocks.0.resnets.0.conv1.weight"``) -> its :class:`QuantWeight`, for every
    ``Conv2d``/``Linear`` of ``unet`` (see the module's docstring and :class:`DiffusionQuantConfig`;
    ``block_size`` is its ``block``)."""
    cfg = DiffusionQuantConfig(bits=bits, method=method, lowrank=lowrank, calib_images=calib_images,
                               timesteps=timesteps, seed=seed, block=block_size)
    return quantize_with(pipe, unet, cfg, progress)


def quantize_with(pipe: Any, unet: Any, cfg: DiffusionQuantConfig, progress: ProgressFn = no_progress,
                  calibration: Any = None) -> dict[str, QuantWeight]:
    """:func:`quantize_unet` with a whole config; ``calibration`` (a :class:`.calibrate.Calibration` of these
    layers) is reused rather than gathered again."""
    from edgekit.converters.diffusion.calibrate import calibrate, quantizable_layers

    layers = quantizable_layers(unet)
    hessians: dict[str, np.ndarray] = {}
    if cfg.calibrated:
        if calibration is None:
            calibration = calibrate(pipe, unet, layers, cfg.calib_images, cfg.timesteps, cfg.seed, progress)
        hessians = calibration.hessians
    out: dict[str, QuantWeight] = {}
    for i, (name, module) in enumerate(layers.items()):
        progress(f"quantizing {name}", i, len(layers))
        w = module.weight.detach().float().cpu().numpy().copy()  # never the module's own memory
        grouped = getattr(module, "groups", 1) != 1  # a grouped conv's rows see different inputs: no one H
        H = None if grouped else hessians.get(name)
        out[name + ".weight"] = quantize_weight(w, cfg.grid(name, int(np.prod(w.shape[1:]))), H, cfg.lowrank, cfg.damp)
    progress("quantized", len(layers), len(layers))
    return out


def quantize_weight(w: np.ndarray, grid: Any, H: np.ndarray | None = None, lowrank: int = 0,
                    damp: float = 0.01) -> QuantWeight:
    """One weight (any shape, seen as ``[out, in]``) on ``grid``: GPTQ against ``H`` when given, else the
    grid's round-to-nearest; with ``lowrank`` a float branch fitted before (SVDQuant) and refitted after."""
    from edgekit.converters.quantize import lowrank as lr
    from edgekit.converters.quantize import nbits
    from edgekit.converters.quantize.gptq_kernel import gptq, rtn

    shape = tuple(int(s) for s in w.shape)
    W = np.ascontiguousarray(w.reshape(shape[0], -1), dtype=np.float32)
    # the branch first takes the weight's own largest directions (SVDQuant's SVD; weights only: no activations
    # to smooth into it), so the integers hold a residual of smaller range; after rounding it is refitted to
    # what the integers missed, weighted by the layer's inputs. Measured on the digits UNet: better than a
    # first fit weighted by H (which leaves the outliers to the integers) or a refit alone (LoRC).
    C = lr.whitener(H, damp) if lowrank and H is not None else None
    branch = lr.fit(W, lowrank) if lowrank else None
    R = W if branch is None else W - branch[0] @ branch[1]
    if H is not None:
        res = gptq(R, H, grid, damp=damp, imatrix=np.diag(H).astype(np.float32))
        codes, params = res.codes, res.params
    else:
        res = rtn(R, grid)
        codes, params = nbits.unpack(grid, res.data.reshape(-1, grid.record))
    if branch is not None:
        branch = lr.fit(W - res.weight, lowrank, C, damp)
    out, nb = W.shape[0], W.shape[1] // grid.block
    scale = params.d.astype(np.float32).reshape(out, nb)
    codes = codes.reshape(W.shape)
    if grid.symmetric:
        q = (codes.astype(np.int16) - grid.default_zp).astype(np.int8)
        zero = None
    else:
        q, zero = codes.astype(np.uint8), params.zp.astype(np.uint8).reshape(out, nb)
    return QuantWeight(q=q, scale=scale, zero=zero, bits=grid.bits, block=grid.block, signed=grid.symmetric,
                       shape=shape, lowrank=branch)


def dequantized_unet(unet: Any, weights: dict[str, QuantWeight]) -> Any:
    """A copy of ``unet`` whose quantized weights hold what the integers (and low-rank branches) decode to:
    the PyTorch reference of an exported quantized UNet."""
    import torch

    q = copy.deepcopy(unet)
    params = dict(q.named_parameters())
    with torch.no_grad():
        for name, qw in weights.items():
            if name not in params:
                raise InputError(f"{name} is not a weight of this UNet; quantize the same UNet you export")
            params[name].copy_(torch.from_numpy(qw.dequantize()))
    return q


@dataclass(frozen=True)
class QuantReport:
    """What a quantization did: output MSE of the UNet vs float over the calibration inputs, its relative
    value (MSE / mean square of the float output), per-layer relative Hessian errors, bytes, seconds."""

    mse: float
    rel_mse: float
    layer_rel: dict[str, float]
    nbytes: int
    float_bytes: int
    seconds: float


def measure(unet: Any, weights: dict[str, QuantWeight], calibration: Any, seconds: float = 0.0) -> QuantReport:
    """Output error of the quantized UNet on ``calibration.inputs`` and each layer's Hessian-weighted error
    ``tr(dW H dW^T) / tr(W H W^T)`` (its output error relative to its output, over the calibration inputs)."""
    import torch

    from edgekit.converters.quantize.gptq_kernel import hessian_error

    qu = dequantized_unet(unet, weights)
    se = ss = 0.0
    with torch.no_grad():
        for x, t, labels in calibration.inputs:
            tt = torch.full((x.shape[0],), t, dtype=torch.long)
            lab = None if labels is None else torch.from_numpy(labels)
            ref = unet(torch.from_numpy(x), tt, class_labels=lab).sample
            got = qu(torch.from_numpy(x), tt, class_labels=lab).sample
            se += float(((got - ref) ** 2).sum())
            ss += float((ref**2).sum())
    n = sum(x.size for x, _, _ in calibration.inputs)
    params = dict(unet.named_parameters())
    layer_rel = {}
    for name, qw in weights.items():
        H = calibration.hessians.get(name.removesuffix(".weight"))
        if H is None:
            continue
        W = params[name].detach().float().numpy().reshape(qw.q.shape[0], -1)
        layer_rel[name] = hessian_error(W, qw.dequantize().reshape(W.shape), H) / max(
            hessian_error(W, np.zeros_like(W), H), 1e-30)
    fbytes = sum(int(np.prod(qw.shape)) * 4 for qw in weights.values())
    return QuantReport(se / n, se / max(ss, 1e-30), layer_rel, sum(qw.nbytes for qw in weights.values()), fbytes,
                       seconds)

