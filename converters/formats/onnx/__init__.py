"""The ONNX format's home: options (``-O``), graph builder, weight encoding, writer, reader."""

from edgekit.converters.formats.onnx.format import OnnxFormat
from edgekit.converters.formats.onnx.options import OnnxOptions
from edgekit.converters.formats.onnx.read import read_weights

__all__ = ["OnnxFormat", "OnnxOptions", "read_weights"]
