"""Run diffusion models: an artifact's UNet graphs in onnxruntime, or a diffusers pipeline folder in PyTorch.

A loaded model is a sampler denoiser (:mod:`edgekit.converters.diffusion.sampler`): ``model(x, t, labels)``
gives the network output, and ``model.full`` / ``model.shallow`` exist when it can be sampled with DeepCache
(an artifact with a shallow graph, or any PyTorch UNet with two or more up blocks). It knows its schedule
and sampling defaults, and :meth:`DiffusionModel.generate` samples images. The scheduler is numpy, so the
onnxruntime path never imports torch.

Text models go through :mod:`.base`'s backends; these are kept apart because nothing here tokenizes or
generates text, and a diffusion model has no place in the LLM commands (they refuse it by name).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.converters.diffusion.sampler import SampleConfig, SampleTrace, sample
from edgekit.errors import CorruptFileError, InputError, UnsupportedError, require
from edgekit.native_path import utf8_path_to_load
from edgekit.registry import Registry
from edgekit.runtime import hostinfo

TASK = "diffusion"
DEQUANTIZE = ("load", "step")
RUNTIMES: Registry[type[DiffusionModel]] = Registry("diffusion runtime", ["edgekit.runtime.diffusion",
                                                                         "edgekit.runtime.diffusion_coreml"])
register_runtime = RUNTIMES.register


class DiffusionModel:
    """A loaded diffusion model. ``schedule``: its NoiseSchedule; ``defaults``: the SampleConfig it was
    made for (sampler, steps, origin grid); ``num_classes`` (0: unconditional), ``in_channels``,
    ``sample_size``; ``load_time`` in seconds."""

    name = ""
    schedule: Any
    defaults: SampleConfig
    num_classes: int
    in_channels: int
    sample_size: int
    load_time: float = 0.0
    threads: int | None = None
    # why ``--cache-interval`` cannot work here (a model without ``full``/``shallow``), and its fix
    no_cache = "this UNet has fewer than two up blocks, too shallow for DeepCache: drop --cache-interval"

    def __call__(self, x: np.ndarray, t: int, labels: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    @property
    def sampler(self) -> str:
        return self.defaults.sampler

    @property
    def steps(self) -> int:
        return self.defaults.steps

    @property
    def origin_steps(self) -> int:
        return self.defaults.origin_steps

    @property
    def shape(self) -> tuple[int, int, int]:
        """One image: ``(channels, height, width)``."""
        return (self.in_channels, self.sample_size, self.sample_size)

    @property
    def caches(self) -> bool:
        """Whether DeepCache sampling works (``cache_interval > 1``)."""
        return hasattr(self, "full") and hasattr(self, "shallow")

    def labels(self, n: int, cls: int | None) -> np.ndarray | None:
        """``n`` class labels: all ``cls``, or one of each class in turn; None for an unconditional model."""
        if not self.num_classes:
            if cls is not None:
                raise InputError("this model is unconditional: drop --class")
            return None
        if cls is not None and not 0 <= cls < self.num_classes:
            raise InputError(f"--class must be between 0 and {self.num_classes - 1}")
        return np.full(n, cls, np.int64) if cls is not None else np.arange(n, dtype=np.int64) % self.num_classes

    def config(self, steps: int | None = None, seed: int = 0, cache_interval: int = 1) -> SampleConfig:
        """The model's sampling defaults with the given overrides, checked."""
        if steps is not None and steps < 1:
            raise InputError(f"--steps {steps}: give at least 1 sampling step (or leave it out for the model's "
                             f"{self.defaults.steps})")
        if cache_interval > 1 and not self.caches:
            raise InputError(f"--cache-interval needs DeepCache graphs; {self.no_cache}")
        try:
            return replace(self.defaults, steps=steps or self.defaults.steps, seed=seed, cache_interval=cache_interval)
        except ValueError as exc:
            raise InputError(f"{exc}") from None

    def generate(self, n: int, labels: np.ndarray | None, cfg: SampleConfig, trace: SampleTrace | None = None,
                 progress: Any = None) -> np.ndarray:
        """``n`` images ``[n, c, h, w]`` in ``[-1, 1]``."""
        if n < 1:
            raise InputError("-n must be at least 1 image")
        shape = (n, self.in_channels, self.sample_size, self.sample_size)
        try:
            cfg.timesteps(self.schedule)
        except ValueError as exc:
            raise InputError(f"--steps: {exc}") from None
        return sample(self, self.schedule, shape, cfg, labels, trace, progress)

    def read_manifest(self, art: Any) -> None:
        """Shape, schedule and sampling defaults of an artifact (its edgekit.json and scheduler config)."""
        from edgekit.converters.diffusion.schedule import NoiseSchedule

        m = art.manifest
        unet = m.get("unet") or {}
        try:
            self.num_classes = int(unet.get("num_classes", 0))
            self.in_channels, self.sample_size = int(unet["in_channels"]), int(unet["sample_size"])
        except (KeyError, TypeError, ValueError):
            raise CorruptFileError(f"{art.path}/edgekit.json lacks the UNet's shape; re-run 'edgekit convert'") from None
        sched_file = art.path / m["files"].get("scheduler", "scheduler_config.json")
        try:
            self.schedule = NoiseSchedule.from_config(json.loads(sched_file.read_text()))
        except (OSError, ValueError) as exc:
            raise CorruptFileError(f"{sched_file} is missing or not JSON ({exc}); re-run 'edgekit convert'") from None
        self.defaults = _defaults(m.get("sampler") or {})

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model."""

    def __enter__(self) -> DiffusionModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _defaults(sampler: dict[str, Any]) -> SampleConfig:
    try:
        return SampleConfig(sampler=str(sampler.get("sampler", "ddim")), steps=int(sampler.get("steps", 50)),
                            origin_steps=int(sampler.get("origin_steps", 50)))
    except (TypeError, ValueError) as exc:
        raise CorruptFileError(f"edgekit.json: sampler defaults are invalid ({exc}); re-run 'edgekit convert'") from None


@register_runtime("onnx")
class OrtDiffusion(DiffusionModel):
    """An artifact's UNet graphs in onnxruntime. ``threads``: intra-op threads (None: the physical cores).

    ``dequantize``: when integer weights become float. "load" (default): onnxruntime folds each
    DequantizeLinear (and a low-rank branch) into a float weight when the session is created, so a
    quantized artifact is small on disk and samples as fast as a float one, with float weights in memory.
    "step": the integers stay in memory and are dequantized at every step (measured 1.6x-3.5x slower per
    step on a small UNet; onnxruntime then also runs int8 MatMuls as MatMulNBits with 8-bit activations)."""

    name = "onnxruntime"

    def __init__(self, art: Any, threads: int | None = None, dequantize: str = "load") -> None:

        ort = require("onnxruntime", "onnx")
        m = art.manifest
        self.read_manifest(art)
        so = ort.SessionOptions()
        so.intra_op_num_threads = hostinfo.thread_count(threads)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        if dequantize not in DEQUANTIZE:
            raise InputError(f"dequantize must be one of {', '.join(DEQUANTIZE)}")
        if dequantize == "load":  # the QDQ transformers keep DequantizeLinear out of constant folding
            so.add_session_config_entry("session.disable_quant_qdq", "1")
        self.threads = so.intra_op_num_threads
        t0 = time.perf_counter()
        self.session = _session(ort, art.model_file, so)
        self._names = {i.name for i in self.session.get_inputs()}
        self._outs = [o.name for o in self.session.get_outputs()]
        if ((m.get("recipe") or {}).get("options") or {}).get("deepcache") is False:
            self.no_cache = "this artifact was converted with -O deepcache=false: convert again without it"
        shallow = m["files"].get("shallow")
        if shallow:
            self.shallow_session = _session(ort, art.path / shallow, so)
            self.full, self.shallow = self._full, self._shallow
        self.load_time = time.perf_counter() - t0

    def _feed(self, x: np.ndarray, t: int, labels: np.ndarray | None) -> dict[str, np.ndarray]:
        feed = {"sample": np.ascontiguousarray(x, np.float32), "timestep": np.full(x.shape[0], int(t), np.int64)}
        if "class_labels" in self._names:
            if labels is None:
                raise InputError("this model is class-conditional: give class labels (--class)")
            feed["class_labels"] = np.asarray(labels, np.int64)
        return feed

    def __call__(self, x: np.ndarray, t: int, labels: np.ndarray | None) -> np.ndarray:
        return self.session.run(["out"], self._feed(x, t, labels))[0]

    def _full(self, x: np.ndarray, t: int, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        out, cache = self.session.run(["out", "cache"], self._feed(x, t, labels))
        return out, cache

    def _shallow(self, x: np.ndarray, t: int, labels: np.ndarray | None, cache: np.ndarray) -> np.ndarray:
        return self.shallow_session.run(["out"], {**self._feed(x, t, labels), "cache": cache})[0]


def _session(ort: Any, path: Path, so: Any) -> Any:
    with utf8_path_to_load(path, "onnxruntime") as native:
        try:
            return ort.InferenceSession(native, so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CorruptFileError(f"onnxruntime cannot load {path.name}: {first[:200]}; the file is damaged or "
                                   "incomplete: re-run 'edgekit convert'") from None


@register_runtime("torch")
class TorchDiffusion(DiffusionModel):
    """A diffusers pipeline folder in PyTorch (float32), DeepCache included when the UNet has the depth."""

    name = "torch"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import torch

        from edgekit.converters.diffusion.deepcache import deepcache_default, split_modules
        from edgekit.converters.diffusion.pipeline import open_pipeline, torch_denoiser

        # Sampling is many small ops: unlike calibration, PyTorch's pool does stall on a busy machine
        # (digits UNet, batch 4, 2 busy cores: 1 thread 16 ms per step, 2 threads 68 ms), so adapt.
        self.threads = hostinfo.thread_count(threads)
        t0 = time.perf_counter()
        pipe = open_pipeline(path)
        with contextlib.ExitStack() as scope:  # torch's pool is process-wide: close() gives the caller's back
            scope.enter_context(hostinfo.torch_threads(torch, self.threads))
            self.unet = pipe.load_unet()
            self.load_time = time.perf_counter() - t0
            self.schedule, self.num_classes = pipe.schedule(), pipe.num_classes
            self.in_channels, self.sample_size = pipe.in_channels, pipe.sample_size
            self.defaults = SampleConfig(sampler=pipe.sampler, steps=pipe.default_steps,
                                         origin_steps=pipe.origin_steps)
            self._model = torch_denoiser(self.unet)
            self._torch = torch
            if deepcache_default(self.unet):
                self._full_m, self._shallow_m = split_modules(self.unet, True)
                self.full, self.shallow = self._full, self._shallow
            self._restore = scope.pop_all()

    def __call__(self, x: np.ndarray, t: int, labels: np.ndarray | None) -> np.ndarray:
        return self._model(x, t, labels)

    def close(self) -> None:
        """Give the caller's PyTorch thread count back."""
        restore = getattr(self, "_restore", None)
        if restore is not None:
            restore.close()

    def _args(self, x: np.ndarray, t: int, labels: np.ndarray | None) -> tuple[Any, ...]:
        torch = self._torch
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
        lab = () if labels is None else (torch.as_tensor(labels, dtype=torch.long),)
        return (torch.from_numpy(np.ascontiguousarray(x)), tt, *lab)

    def _full(self, x: np.ndarray, t: int, labels: np.ndarray | None) -> tuple[np.ndarray, Any]:
        with self._torch.no_grad():
            out, cache = self._full_m(*self._args(x, t, labels))
        return out.numpy(), cache

    def _shallow(self, x: np.ndarray, t: int, labels: np.ndarray | None, cache: Any) -> np.ndarray:
        with self._torch.no_grad():
            return self._shallow_m(*self._args(x, t, labels), cache).numpy()


def open_diffusion(target: str | Path, threads: int | None = None, **options: Any) -> DiffusionModel:
    """Load a diffusion artifact (checked against its manifest's sha256) or a diffusers pipeline folder."""
    from edgekit import library
    from edgekit.artifact import Artifact
    from edgekit.converters.diffusion.pipeline import is_pipeline

    p = library.resolve(target)
    if p.is_dir() and is_pipeline(p):  # a pipeline folder (one edgekit evaluated has a manifest to check too)
        if (p / "edgekit.json").exists():
            Artifact.open(p).verify()
        _check_options(RUNTIMES.get("torch"), options)
        return RUNTIMES.get("torch")(p, threads=threads, **options)
    art = Artifact.open(p)
    if art.manifest.get("task") != TASK:
        raise InputError(f"{art.name} is a language model, not a diffusion artifact; drop the image options "
                         "(--class, --steps, --cache-interval, -o) or give a diffusion artifact")
    art.verify()
    if art.format not in RUNTIMES:
        raise UnsupportedError(f"no diffusion runtime for {art.format!r} artifacts here; runtimes: "
                               f"{', '.join(RUNTIMES.names())}")
    _check_options(RUNTIMES.get(art.format), options)
    return RUNTIMES.get(art.format)(art, threads=threads, **options)


def _check_options(runtime: type[DiffusionModel], options: dict[str, Any]) -> None:
    """``-O`` keys a runtime does not take are refused by name, with the ones it does."""
    import inspect

    takes = [k for k in list(inspect.signature(runtime.__init__).parameters)[2:] if k != "threads"]
    bad = sorted(set(options) - set(takes))
    if bad:
        its = f"its options: {', '.join(takes)}" if takes else "it takes none"
        raise InputError(f"-O {bad[0]} is not an option of the {runtime.name} diffusion runtime; {its}")


def open_denoiser(target: str | Path) -> DiffusionModel:
    """:func:`open_diffusion` with the defaults: what ``edgekit eval`` samples a diffusion artifact with."""
    return open_diffusion(target)
