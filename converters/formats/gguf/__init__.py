"""The GGUF format's home: writer, vocabulary, reader/describe, and its policy (llama.cpp's preset
mixes and the size budget)."""

from edgekit.converters.formats.gguf.options import GGUFOptions
from edgekit.converters.formats.gguf.writer import GGUFFormat, PlannedTensor, plan_tensors, to_gguf_layout

__all__ = ["GGUFFormat", "GGUFOptions", "PlannedTensor", "plan_tensors", "to_gguf_layout"]
