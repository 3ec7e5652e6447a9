"""The layer-sequential driver shared by calibrated methods (GPTQ, AWQ, importance matrices).

The float model runs on calibration sequences one decoder layer at a time. Each layer sees the
outputs of the already-quantized layers before it; hooks on its linears accumulate the Hessian proxy
``H = sum_t w_t x_t x_t^T`` of their inputs; the method then puts every linear onto the exact grid of
its planned type (the bytes, in the checkpoint's own layout, are kept for the writer; the dequantized
weights go back into the model) and the quantized layer produces the next layer's inputs. Memory stays at one layer's
activations plus the layer's Hessians.

Why positions are weighted: the first position of every sequence is the attention sink. Its
activations are massive and every later token attends to it, so its errors cost far more than its
share of tokens; leaving it out of H is catastrophic and weighting it ~10x helps (FINDINGS.md).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from edgekit.calibration import CalibConfig, calibration_tokens
from edgekit.converters.quantize import gptq_kernel
from edgekit.converters.quantize.base import QuantizeConfig, Quantizer
from edgekit.converters.quantize.grids import as_grid
from edgekit.errors import InputError, quiet_transformers, require

if TYPE_CHECKING:
    from collections.abc import Callable

    from edgekit.model import HFCheckpoint

_FLOAT = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}


@dataclass(frozen=True)
class CalibratedConfig(QuantizeConfig):
    """Shared settings of calibrated methods.

    calib: where calibration activations come from (default: sampled from the model itself).
    gptq: run GPTQ onto the target grid (else round-to-nearest with the importance matrix).
    awq: search activation-aware per-channel scales and clipping before quantizing each layer.
    imatrix: weight the scale/min searches by activation second moments (llama.cpp's imatrix idea).
    damp: GPTQ dampening, as a fraction of the mean Hessian diagonal.
    sink_weight: weight of each sequence's first position in H (see module docstring).
    batch: sequences per forward pass (memory vs. speed).
    """

    method: str = "gptq"
    calib: CalibConfig = field(default_factory=CalibConfig)
    gptq: bool = True
    awq: bool = False
    imatrix: bool = True
    damp: float = 0.01
    sink_weight: float = 10.0
    batch: int = 8
    awq_config: Any = None  # an awq.AWQConfig; None means its defaults

    def __post_init__(self) -> None:
        if not 0 <= self.damp < 1:
            raise InputError("GPTQ dampening must be in [0, 1)")
        if self.sink_weight < 0 or self.batch < 1:
            raise InputError("sink_weight must be >= 0 and batch >= 1")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["calib"] = self.calib.describe()
        return d


class _Stats:
    """Per-linear Hessian accumulation through forward hooks; inputs shared by several linears
    (q/k/v, gate/up) are multiplied out once."""

    def __init__(self, linears: dict[str, Any], sink_weight: float, keep_samples: bool) -> None:
        self.H: dict[str, Any] = {}
        self.samples: dict[str, list[Any]] = {}
        self._last: tuple[Any, Any, Any] | None = None
        self._keep = keep_samples
        self._sink = float(sink_weight) ** 0.5
        self._handles = [lin.register_forward_hook(self._hook(name)) for name, lin in linears.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            x = args[0]
            if self._last is not None and self._last[0] is x:
                h, sub = self._last[1], self._last[2]
            else:
                x2 = x.detach().reshape(-1, x.shape[-1]).float()
                if self._sink != 1.0 and x.dim() == 3:
                    x2 = x2.reshape(x.shape[0], x.shape[1], -1).clone()
                    x2[:, 0] *= self._sink
                    x2 = x2.reshape(-1, x.shape[-1])
                h = (x2.T @ x2).double()
                sub = x.detach().reshape(-1, x.shape[-1])[:: max(1, x2.shape[0] // 512)].float()
                self._last = (x, h, sub)
            self.H[name] = self.H[name] + h if name in self.H else h.clone()
            if self._keep:
                self.samples.setdefault(name, []).append(sub)

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._last = None


class CalibratedQuantizer(Quantizer):
    """Runs the calibration pipeline in :meth:`prepare`; :meth:`quantize` hands out its bytes."""

    config_class = CalibratedConfig

    def __init__(self, config: QuantizeConfig | None = None) -> None:
        super().__init__(config)
        self._bytes: dict[str, np.ndarray] = {}
        self.report: dict[str, Any] = {}

    @property
    def cfg(self) -> CalibratedConfig:
        assert isinstance(self.config, CalibratedConfig)
        return self.config

    # -- the writer's side ------------------------------------------------------------------------

    def quantize(self, name: str, weight: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
        if name in self._bytes:
            return self._bytes.pop(name)
        weight = np.ascontiguousarray(weight, dtype=np.float32)
        if weight.ndim == 1 or qtype in _FLOAT:
            return as_grid(qtype).quantize(weight)
        return gptq_kernel.rtn(weight, qtype).data

    # -- the pipeline -----------------------------------------------------------------------------

    def prepare(self, checkpoint: HFCheckpoint, plan: dict[str, gguf.GGMLQuantizationType],
                progress: Callable[[str, int, int], None] | None = None) -> None:
        torch = require("torch", "torch")
        progress = progress or (lambda d, a, b: None)
        t0 = time.perf_counter()
        model, ids = self._load_and_calibrate(checkpoint, progress)
        t_calib = time.perf_counter() - t0
        with torch.inference_mode():
            hidden, kwargs = self._first_layer_inputs(torch, model, ids)
            layers = model.model.layers
            t1 = time.perf_counter()
            for i, layer in enumerate(layers):
                progress(f"layer {i + 1}/{len(layers)}: calibrating", i, len(layers))
                hidden = self._quantize_layer(torch, checkpoint, plan, i, layer, hidden, kwargs)
            self.report["layers_s"] = round(time.perf_counter() - t1, 1)
            self._output_head(torch, checkpoint, plan, model, hidden)
        progress("calibrated quantization done", len(layers), len(layers))
        self.model = model  # the PyTorch model carrying exactly the quantized weights (tests compare it)
        self.report.update(calib_s=round(t_calib, 1), total_s=round(time.perf_counter() - t0, 1))

    def float_hessians(self, ckpt: HFCheckpoint, progress: Callable[[str, int, int], None] | None = None,
                       ) -> dict[str, np.ndarray]:
        """H of every linear's inputs in the float model (GGUF names), plus the output head's."""
        torch = require("torch", "torch")
        model, ids = self._load_and_calibrate(ckpt, progress)
        out: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            hidden, kwargs = self._first_layer_inputs(torch, model, ids)
            for i, layer in enumerate(model.model.layers):
                if progress:
                    progress(f"layer {i + 1}: activation statistics", i, len(model.model.layers))
                linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
                stats = _Stats(linears, self.cfg.sink_weight, keep_samples=False)
                try:
                    hidden = self._run_layer(layer, hidden, kwargs)
                finally:
                    stats.close()
                for n, h in stats.H.items():
                    out[ckpt.spec.gguf_name(f"model.layers.{i}.{n}.weight")] = h.float().numpy()
            head = "output.weight" if "lm_head.weight" in ckpt.tensors and not ckpt.hparams.tie_embeddings \
                else "token_embd.weight"
            out[head] = self._head_hessian(model, hidden)
        return out

    @staticmethod
    def _head_hessian(model: Any, hidden: list[Any]) -> np.ndarray:
        x = [model.model.norm(h).reshape(-1, h.shape[-1]) for h in hidden]
        return sum((xx.T @ xx).double() for xx in x).numpy()

    def _load_and_calibrate(self, ckpt: HFCheckpoint, progress: Callable[[str, int, int], None] | None) -> Any:
        torch = require("torch", "torch")
        transformers = require("transformers", "torch")
        quiet_transformers(transformers)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(ckpt.path), dtype=torch.float32, trust_remote_code=False, use_safetensors=True).eval()
        tok = transformers.AutoTokenizer.from_pretrained(str(ckpt.path), trust_remote_code=False)
        torch.manual_seed(self.cfg.calib.seed)
        from edgekit.fsutil import sha256_files

        key = sha256_files(ckpt.weight_files)
        return model, calibration_tokens(model, tok, self.cfg.calib, progress, cache_key=key)

    def _first_layer_inputs(self, torch: Any, model: Any, ids: Any) -> tuple[list[Any], list[dict[str, Any]]]:
        """Catch what the model passes to its first decoder layer, one entry per batch."""

        class _Stop(Exception):
            pass

        caught: list[tuple[Any, dict[str, Any]]] = []

        def catch(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hs = args[0] if args else kwargs.pop("hidden_states")
            caught.append((hs, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
            raise _Stop

        handle = model.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for b0 in range(0, ids.shape[0], self.cfg.batch):
                try:
                    model(ids[b0:b0 + self.cfg.batch], use_cache=False)
                except _Stop:
                    pass
        finally:
            handle.remove()
        return [c[0] for c in caught], [c[1] for c in caught]

    @staticmethod
    def _run_layer(layer: Any, hidden: list[Any], kwargs: list[dict[str, Any]]) -> list[Any]:
        outs = []
        for h, kw in zip(hidden, kwargs, strict=True):
            out = layer(h, **kw)
            outs.append(out[0] if isinstance(out, tuple) else out)
        return outs

    def _quantize_layer(self, torch: Any, ckpt: HFCheckpoint, plan: dict[str, gguf.GGMLQuantizationType],
                        i: int, layer: Any, hidden: list[Any], kwargs: list[dict[str, Any]]) -> list[Any]:
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        gguf_names = {n: ckpt.spec.gguf_name(f"model.layers.{i}.{n}.weight") for n in linears}
        stats = _Stats(linears, self.cfg.sink_weight, keep_samples=self.cfg.awq)
        try:
            self._run_layer(layer, hidden, kwargs)
        finally:
            stats.close()
        if self.cfg.awq:
            self._awq(torch, ckpt, plan, i, layer, linears, gguf_names, stats)
        layer_report = {}
        for name, lin in linears.items():
            gname = gguf_names[name]
            qtype = plan[gname]
            W = lin.weight.detach().float().numpy()
            H = stats.H[name].numpy()
            imatrix = np.diag(H).astype(np.float32) if self.cfg.imatrix else None
            if qtype in _FLOAT:
                res = gptq_kernel.rtn(W, qtype)
            elif self.cfg.gptq:
                res = gptq_kernel.gptq(W, H, qtype, damp=self.cfg.damp, imatrix=imatrix)
            else:
                res = gptq_kernel.rtn(W, qtype, imatrix=imatrix)
            layer_report[name] = round(gptq_kernel.hessian_error(W, res.weight, H), 4)
            lin.weight.data = torch.from_numpy(np.ascontiguousarray(res.weight))
            self._bytes[gname] = res.data
        self.report.setdefault("hessian_error", {})[str(i)] = layer_report
        return self._run_layer(layer, hidden, kwargs)

    def _awq(self, torch: Any, ckpt: HFCheckpoint, plan: dict[str, gguf.GGMLQuantizationType], i: int,
             layer: Any, linears: dict[str, Any], gguf_names: dict[str, str], stats: _Stats) -> None:
        """AWQ scales and clipping, then the Hessians of the rescaled inputs (``x / s``)."""
        from edgekit.converters.quantize import awq

        samples = {n: torch.cat(v) for n, v in stats.samples.items()}
        report = awq.awq_layer(layer, samples, lambda n: plan[gguf_names[n]],
                               self.cfg.awq_config or awq.AWQConfig(), ckpt.spec.gguf_arch)
        self.report.setdefault("awq", {})[str(i)] = report.to_json()
        for name, s in report.input_scales.items():  # the linears now see x / s
            s = torch.as_tensor(s, dtype=torch.float64)
            stats.H[name] = stats.H[name] / torch.outer(s, s)
        self._keep_changed_small_tensors(ckpt, plan, i, layer, linears)

    def _keep_changed_small_tensors(self, ckpt: HFCheckpoint, plan: dict[str, gguf.GGMLQuantizationType], i: int,
                                    layer: Any, linears: dict[str, Any]) -> None:
        """AWQ folded 1/s into norms (and biases): the file must carry them as the model now has them."""
        weights = {f"{n}.weight" for n in linears}
        for pname, param in layer.named_parameters():
            gname = None if pname in weights else ckpt.spec.gguf_name(f"model.layers.{i}.{pname}")
            if gname in plan:
                w = param.detach().float().numpy()
                self._bytes[gname] = gptq_kernel.rtn(w.reshape(1, -1), plan[gname]).data.reshape(-1)

    def _output_head(self, torch: Any, ckpt: HFCheckpoint, plan: dict[str, gguf.GGMLQuantizationType],
                     model: Any, hidden: list[Any]) -> None:
        """The output head by GPTQ when it is its own tensor; a tied embedding (also a lookup table,
        which GPTQ's output-only objective would neglect) by importance-weighted RTN. Either way the
        model keeps exactly the weights the file gets."""
        H = self._head_hessian(model, hidden)
        imatrix = np.diag(H).astype(np.float32) if self.cfg.imatrix else None
        heads = [("output.weight", model.lm_head), ("token_embd.weight", model.model.embed_tokens)]
        for name, module in heads:
            if name not in plan:
                continue
            W = module.weight.detach().float().numpy()
            qtype = plan[name]
            if qtype in _FLOAT:
                res = gptq_kernel.rtn(W, qtype)
            elif name == "output.weight" and self.cfg.gptq:
                res = gptq_kernel.gptq(W, H, qtype, damp=self.cfg.damp, imatrix=imatrix)
            else:  # the lookup table alone, or tied: importance from the head's inputs
                tied = "output.weight" not in plan
                res = gptq_kernel.rtn(W, qtype, imatrix=imatrix if (tied or name == "output.weight") else None)
            module.weight.data = torch.from_numpy(np.ascontiguousarray(res.weight))
            self._bytes[name] = res.data
