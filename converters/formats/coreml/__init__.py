"""The Core ML format's home: options, the MIL program builder, writer, reader."""

from edgekit.converters.formats.coreml.format import CoreMLFormat
from edgekit.converters.formats.coreml.options import CoreMLOptions

__all__ = ["CoreMLFormat", "CoreMLOptions"]
