"""The diffusion exporters: one per format, living in that format's home, registered here by name.

An exporter writes a pipeline's UNet (float, or with quantized weights) into an artifact folder in its
format; the scheduler and the sampler stay in edgekit's runtime, so a graph takes ``(sample, timestep,
class_labels)`` and returns the network output. ``convert`` of a diffusers pipeline finds the exporter of
``--to`` here, so nothing outside a format's home asks which format it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from edgekit.progress import ProgressFn
from edgekit.registry import Registry

__all__ = ["EXPORTERS", "UNetExporter", "register_exporter"]


class UNetExporter(Protocol):
    """Writes a UNet into ``out_dir`` (a fresh temporary folder that becomes the artifact).

    ``unet``: the diffusers module (float32, eval mode). ``weights``: name -> QuantWeight for the weights
    stored on an integer grid (None: all float). ``options``: the format's options (e.g. DeepCache graphs).
    Returns the manifest fields that describe what was written (files, inputs, sizes)."""

    name: str

    def export(self, pipe: Any, unet: Any, weights: dict[str, Any] | None, out_dir: Path,
               options: dict[str, Any], progress: ProgressFn) -> dict[str, Any]: ...


EXPORTERS: Registry[type[UNetExporter]] = Registry("diffusion format", ["edgekit.converters.formats.onnx.unet",
                                                                        "edgekit.converters.formats.coreml.unet"])
register_exporter = EXPORTERS.register
