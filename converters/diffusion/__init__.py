"""Diffusion models: diffusers pipelines read, trained, distilled to few steps, compressed and exported."""
