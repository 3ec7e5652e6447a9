"""The MLC-LLM format's home: options and modes, parameter layout, tensor cache, chat config, writer, reader."""

from edgekit.converters.formats.mlc.format import MLCFormat
from edgekit.converters.formats.mlc.options import MLCOptions

__all__ = ["MLCFormat", "MLCOptions"]
