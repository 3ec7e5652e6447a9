"""Artifact formats (one file each): gguf, and the ones later issues add."""
