"""Quantization methods (one file each) and the ggml block kernels they encode with."""
