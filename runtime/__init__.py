"""edgekit.runtime: one backend per file (llama.cpp, PyTorch reference, ...), chosen by artifact format."""
