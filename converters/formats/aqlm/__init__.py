"""Hugging Face AQLM checkpoints (transformers + the ``aqlm`` package run them): writer, reader, options."""

from edgekit.converters.formats.aqlm.format import AQLMFormat

__all__ = ["AQLMFormat"]
