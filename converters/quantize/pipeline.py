"""The layer-sequential pipeline that calibrated methods run (GPTQ, AWQ, importance matrices, and the
steps that later issues add: pruning, codebooks, ternary).

The float model runs on calibration sequences one decoder layer at a time. Each layer sees the
outputs of the already-processed layers before it; hooks on its linears accumulate the Hessian proxy
``H = sum_t w_t x_t x_t^T`` of their inputs once; the recipe's steps (:mod:`.steps`) then work on the
layer in stage order, the last one putting every linear onto the exact grid of its planned type (the
bytes, in the checkpoint's own layout, are kept for the writer; the dequantized weights go back into
the model), and the processed layer produces the next layer's inputs. Memory stays at one layer's
activations plus the layer's Hessians.

Why positions are weighted: the first position of every sequence is the attention sink. Its
activations are massive and every later token attends to it, so its errors cost far more than its
share of tokens; leaving it out of H is catastrophic and weighting it ~10x helps (FINDINGS.md).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit.calibration import CalibConfig, calibration_tokens
from edgekit.converters.quantize.steps.base import F8_E4M3, HeadState, LayerState, Step
from edgekit.errors import quiet_transformers, require

if TYPE_CHECKING:
    import gguf

    from edgekit.model import HFCheckpoint

Progress = Callable[[str, int, int], None]


def round_stored_floats(torch: Any, model: Any, plan: dict[str, Any]) -> None:
    """Give ``model`` the values the file stores where ``plan`` keeps the embedding or the output head in float8
    e4m3, so that calibration, each layer's encoding and any fine-tuning see what the stored model computes with
    (a tied head is the embedding's own parameter)."""
    for name, module in (("token_embd.weight", model.get_input_embeddings()),
                         ("output.weight", model.get_output_embeddings())):
        if plan.get(name) == F8_E4M3 and module is not None:
            w = module.weight.data
            w.copy_(w.to(torch.float8_e4m3fn).to(w.dtype))


class _Stats:
    """Per-linear Hessian accumulation through forward hooks; inputs shared by several linears
    (q/k/v, gate/up) are multiplied out once."""

    def __init__(self, linears: dict[str, Any], sink_weight: float, keep_samples: bool, hessians: bool = True) -> None:
        self.H: dict[str, Any] = {}
        self.D: dict[str, Any] = {}  # per-column sums of squared inputs, every position alike
        self._hessians = hessians
        self.samples: dict[str, list[Any]] = {}
        self._last: tuple[Any, Any, Any] | None = None
        self._keep = keep_samples
        self._sink = float(sink_weight) ** 0.5
        self._handles = [lin.register_forward_hook(self._hook(name)) for name, lin in linears.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            x = args[0]
            if self._last is not None and self._last[0] is x:
                h, sub, d = self._last[1], self._last[2], self._last[3]
            else:
                x2 = x.detach().reshape(-1, x.shape[-1]).float()
                d = (x2 * x2).sum(0).double() if self._hessians else None
                if self._sink != 1.0 and x.dim() == 3:
                    x2 = x2.reshape(x.shape[0], x.shape[1], -1).clone()
                    x2[:, 0] *= self._sink
                    x2 = x2.reshape(-1, x.shape[-1])
                h = (x2.T @ x2).double() if self._hessians else None
                sub = x.detach().reshape(-1, x.shape[-1])[:: max(1, x2.shape[0] // 512)].float()
                self._last = (x, h, sub, d)
            if h is not None:
                self.H[name] = self.H[name] + h if name in self.H else h.clone()
                self.D[name] = self.D[name] + d if name in self.D else d.clone()
            if self._keep:
                self.samples.setdefault(name, []).append(sub)

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._last = None


class LayerPipeline:
    """Calibration data, the float model, and the layer walk; ``sink_weight`` and ``batch`` as in
    :class:`edgekit.converters.quantize.calibrated.CalibratedConfig`."""

    def __init__(self, calib: CalibConfig, sink_weight: float = 10.0, batch: int = 8) -> None:
        self.calib, self.sink_weight, self.batch = calib, sink_weight, batch

    def run(self, ckpt: HFCheckpoint, plan: dict[str, gguf.GGMLQuantizationType], steps: list[Step],
            out: dict[str, np.ndarray], report: dict[str, Any], progress: Progress | None = None) -> Any:
        """Run ``steps`` on every layer and the head; encoded tensors land in ``out`` (GGUF names),
        per-layer step reports and timings in ``report``. Returns the processed PyTorch model."""
        torch = require("torch", "torch")
        progress = progress or (lambda d, a, b: None)
        t0 = time.perf_counter()
        model, ids = self.load(ckpt, progress)
        round_stored_floats(torch, model, plan)
        t_calib = time.perf_counter() - t0
        keep = any(s.needs_samples for s in steps)
        hessians = any(s.needs_hessians for s in steps)  # the costliest part of calibration; skipped if unused
        with torch.inference_mode():
            t1 = time.perf_counter()
            hidden, kwargs = self.first_layer_inputs(torch, model, ids, self.batch)
            t_forward = time.perf_counter() - t1
            layers = model.model.layers
            for i, layer in enumerate(layers):
                def calibrating(i: int = i) -> None:
                    progress(f"layer {i + 1}/{len(layers)}: calibrating", i, len(layers))

                linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
                stats = _Stats(linears, self.sink_weight, keep_samples=keep, hessians=hessians)
                t2 = time.perf_counter()
                try:
                    self.run_layer(layer, hidden, kwargs, each=calibrating)
                finally:
                    stats.close()
                t_forward += time.perf_counter() - t2
                st = LayerState(torch, ckpt, plan, i, layer, linears,
                                {n: ckpt.spec.gguf_name(f"model.layers.{i}.{n}.weight") for n in linears},
                                stats.H, stats.samples, out, diag=stats.D,
                                tick=lambda what, i=i: progress(f"layer {i + 1}/{len(layers)}: {what}", i, len(layers)))
                for step in steps:
                    r = step.layer(st)
                    if r is not None and step.report_key:
                        report.setdefault(step.report_key, {})[str(i)] = r
                if st.zeros_kept:  # what the file keeps of a pruning: its zeros as stored
                    report.setdefault("zeros_kept", {})[str(i)] = dict(st.zeros_kept)
                t2 = time.perf_counter()
                hidden = self.run_layer(layer, hidden, kwargs,
                                        each=functools.partial(st.tick, "inputs of the next layer"))
                t_forward += time.perf_counter() - t2
            report["layers_s"] = round(time.perf_counter() - t1, 1)
            t2 = time.perf_counter()
            progress("output head", len(layers), len(layers))
            head = HeadState(torch, ckpt, plan, model, self._head_hessian(model, hidden) if hessians else None, out)
            t_forward += time.perf_counter() - t2
            # the model's passes over the calibration data (and the statistics its hooks gather): calibration,
            # as opposed to what the steps do with the statistics
            report["forward_s"] = round(t_forward, 1)
            for step in steps:
                step.head(head)
        progress("calibrated quantization done", len(layers), len(layers))
        report.update(calib_s=round(t_calib, 1), total_s=round(time.perf_counter() - t0, 1))
        return model

    def float_hessians(self, ckpt: HFCheckpoint, progress: Progress | None = None) -> dict[str, np.ndarray]:
        """H of every linear's inputs in the float model (GGUF names), plus the output head's."""
        torch = require("torch", "torch")
        model, ids = self.load(ckpt, progress)
        out: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            hidden, kwargs = self.first_layer_inputs(torch, model, ids, self.batch)
            for i, layer in enumerate(model.model.layers):
                if progress:
                    progress(f"layer {i + 1}: activation statistics", i, len(model.model.layers))
                linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
                stats = _Stats(linears, self.sink_weight, keep_samples=False)
                try:
                    hidden = self.run_layer(layer, hidden, kwargs)
                finally:
                    stats.close()
                for n, h in stats.H.items():
                    out[ckpt.spec.gguf_name(f"model.layers.{i}.{n}.weight")] = h.float().numpy()
            out[self._head_name(ckpt)] = self._head_hessian(model, hidden)
        return out

    @staticmethod
    def _head_name(ckpt: HFCheckpoint) -> str:
        """The output head's GGUF name: the embedding's when the head is tied to it."""
        untied = "lm_head.weight" in ckpt.tensors and not ckpt.hparams.tie_embeddings
        return "output.weight" if untied else "token_embd.weight"

    def output_fisher(self, ckpt: HFCheckpoint, progress: Progress | None = None, max_seqs: int = 16,
                      ) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """How much the loss cares about each output channel of every linear: the mean over positions of
        ``(d loss / d y_r)^2`` (the diagonal of the empirical Fisher of the linear's output ``y``, next-token
        cross-entropy on the calibration sequences), keyed by GGUF name (a tied head under the embedding's).
        With it, ``sum_r f_r * err_r`` (``err_r``: row ``r``'s Hessian-weighted output error) approximates the
        loss increase a rounding causes, on one scale for every tensor: the head's logits and the layers'
        hidden states are otherwise not comparable. Also ``(token ids, per-id summed squared gradients of the
        embedding's output)`` for the cost of a tied embedding's errors where it is looked up."""
        torch = require("torch", "torch")
        model, ids = self.load(ckpt, progress)
        ids = ids[:max_seqs]
        model.requires_grad_(False)
        linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        acc: dict[str, Any] = {}

        def hook(name: str) -> Callable[..., None]:
            def h(module: Any, grad_input: Any, grad_output: Any) -> None:
                g = grad_output[0].detach().reshape(-1, grad_output[0].shape[-1]).double()
                acc[name] = acc[name] + (g * g).sum(0) if name in acc else (g * g).sum(0)

            return h

        emb: dict[str, Any] = {}

        def catch_embedding(module: Any, args: Any, output: Any) -> Any:
            out = output.detach().requires_grad_(True)  # gradients flow from here (no weight gradients)
            emb["out"] = out
            return out

        handles = [m.register_full_backward_hook(hook(n)) for n, m in linears.items()]
        handles.append(model.get_input_embeddings().register_forward_hook(catch_embedding))
        uniq, inverse = torch.unique(ids, return_inverse=True)
        lookup = torch.zeros(len(uniq), model.config.hidden_size, dtype=torch.float64)
        n_pos = 0
        try:
            for b0 in range(0, ids.shape[0], 2):
                if progress:
                    progress("measuring output sensitivity", b0, ids.shape[0])
                batch = ids[b0:b0 + 2]
                logits = model(batch, use_cache=False).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         batch[:, 1:].reshape(-1), reduction="sum")
                loss.backward()
                g = emb.pop("out").grad.double()
                lookup.index_add_(0, inverse[b0:b0 + 2].reshape(-1), (g * g).reshape(-1, g.shape[-1]))
                n_pos += batch.shape[0] * (batch.shape[1] - 1)
        finally:
            for h in handles:
                h.remove()
        out: dict[str, np.ndarray] = {}
        head = self._head_name(ckpt)
        for n, v in acc.items():
            key = head if n == "lm_head" else ckpt.spec.gguf_name(f"{n}.weight")
            out[key] = (v / n_pos).numpy()
        return out, (uniq.numpy(), (lookup / n_pos).numpy())

    @staticmethod
    def _head_hessian(model: Any, hidden: list[Any]) -> np.ndarray:
        x = [model.model.norm(h).reshape(-1, h.shape[-1]) for h in hidden]
        return sum((xx.T @ xx).double() for xx in x).numpy()

    def load(self, ckpt: HFCheckpoint, progress: Progress | None) -> tuple[Any, Any]:
        """The float model (safetensors only, no remote code) and the calibration token ids."""
        from edgekit.model import check_tokenizer_files

        torch = require("torch", "torch")
        transformers = require("transformers", "torch")
        check_tokenizer_files(ckpt.path)  # a damaged file: its name and the fix, not the tokenizer library's error
        from edgekit.hashing import sha256_files

        with quiet_transformers(transformers):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(ckpt.path), dtype=torch.float32, trust_remote_code=False, use_safetensors=True,
                local_files_only=True).eval()
            tok = transformers.AutoTokenizer.from_pretrained(str(ckpt.path), trust_remote_code=False,
                                                             local_files_only=True)
            torch.manual_seed(self.calib.seed)
            key = sha256_files(ckpt.weight_files)
            return model, calibration_tokens(model, tok, self.calib, progress, cache_key=key)

    @staticmethod
    def first_layer_inputs(torch: Any, model: Any, ids: Any, batch: int) -> tuple[list[Any], list[dict[str, Any]]]:
        """Catch what the model passes to its first decoder layer, one entry per ``batch`` sequences."""

        class _Stop(Exception):
            pass

        caught: list[tuple[Any, dict[str, Any]]] = []

        def catch(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hs = args[0] if args else kwargs.pop("hidden_states")
            caught.append((hs, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
            raise _Stop

        handle = model.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for b0 in range(0, ids.shape[0], batch):
                try:
                    model(ids[b0:b0 + batch], use_cache=False)
                except _Stop:
                    pass
        finally:
            handle.remove()
        return [c[0] for c in caught], [c[1] for c in caught]

    @staticmethod
    def run_layer(layer: Any, hidden: list[Any], kwargs: list[dict[str, Any]],
                  each: Callable[[], None] | None = None) -> list[Any]:
        """The layer's outputs for each batch of ``hidden``; ``each()`` before every batch (a progress
        report, where a cancel takes effect)."""
        outs = []
        for h, kw in zip(hidden, kwargs, strict=True):
            if each is not None:
                each()
            out = layer(h, **kw)
            outs.append(out[0] if isinstance(out, tuple) else out)
        return outs
