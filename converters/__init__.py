"""edgekit.converters: compression methods (quantize/) and artifact formats (formats/)."""
