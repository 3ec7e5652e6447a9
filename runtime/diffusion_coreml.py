"""Core ML diffusion artifacts (``unet.mlpackage``) sampled on Linux by edgekit's numpy MIL evaluator.

Core ML's prediction library exists only on macOS, so here the saved program is run op by op by the
reference evaluator (:mod:`.coreml_mil`): the program's own integers, fp16 storage after every op. It is a
check of the package, not a fast path (numpy convolutions); Core ML itself runs the package on Apple devices.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from edgekit.errors import InputError
from edgekit.runtime.diffusion import DiffusionModel, register_runtime


@register_runtime("coreml")
class CoreMLReferenceDiffusion(DiffusionModel):
    """An artifact's Core ML UNet run by the numpy MIL evaluator (``threads`` is numpy's: not set here).
    ``engine``: auto or numpy (the LLM backend's option; Core ML's own engine is not used for diffusion)."""

    name = "coreml-reference"
    no_cache = "--to coreml makes no DeepCache graph: drop --cache-interval, or convert with --to onnx for it"

    def __init__(self, art: Any, threads: int | None = None, engine: str = "auto") -> None:
        from edgekit.runtime.coreml_mil import MILEvaluator

        if engine not in ("auto", "numpy", "coreml"):
            raise InputError(f"-O engine={engine}: give auto, numpy or coreml")
        if engine == "coreml":
            raise InputError("engine=coreml needs macOS 15+ (Core ML); on this system use engine=numpy"
                             if sys.platform != "darwin" else
                             "engine=coreml does not run diffusion artifacts yet: use engine=numpy (edgekit's evaluator)")
        self.read_manifest(art)
        t0 = time.perf_counter()
        self.evaluator = MILEvaluator(art.model_file)
        self.load_time = time.perf_counter() - t0

    def __call__(self, x: np.ndarray, t: int, labels: np.ndarray | None) -> np.ndarray:
        feeds = {"sample": np.ascontiguousarray(x, np.float32), "timestep": np.full(x.shape[0], int(t), np.int32)}
        if "class_labels" in self.evaluator.input_names:
            if labels is None:
                raise InputError("this model is class-conditional: give class labels (--class)")
            feeds["class_labels"] = np.asarray(labels, np.int32)
        return self.evaluator.run(feeds, {})["out"]
