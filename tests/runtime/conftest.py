"""Fixtures of the serve tests (test_serve.py, test_serve_lifecycle.py): tiny artifacts built here."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def artifacts(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    import shutil

    from edgekit import api
    from edgekit.converters.formats.base import ConvertRecipe

    root = tmp_path_factory.mktemp("serve")
    gguf = api.convert(tiny_llama, "gguf", output=root / "tiny-gguf", recipe=ConvertRecipe(preset="Q8_0")).path
    broken = shutil.copytree(gguf, root / "tiny-broken")
    with open(broken / "model.gguf", "r+b") as fh:  # one byte of a weight changed after convert
        fh.seek(-100, 2)
        byte = fh.read(1)
        fh.seek(-100, 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    return {"gguf": gguf, "broken": broken,
            "onnx": api.convert(tiny_llama, "onnx", output=root / "tiny-onnx", recipe=ConvertRecipe(bits=32)).path}


@pytest.fixture(scope="module")
def endless(tiny_llama, tmp_path_factory) -> Path:
    """The tiny model with its special tokens' output rows zeroed: their logits are exactly 0 where some other
    token's is positive, so it never ends by itself and a stream runs as long as a test needs."""
    import shutil

    from safetensors.torch import load_file, save_file

    from edgekit import api
    from edgekit.converters.formats.base import ConvertRecipe

    root = tmp_path_factory.mktemp("endless")
    ckpt = shutil.copytree(tiny_llama, root / "ckpt")
    weights = next(ckpt.glob("*.safetensors"))
    tensors = load_file(weights)
    tensors["lm_head.weight"][:3] = 0  # <|endoftext|>, <|im_start|>, <|im_end|>
    save_file(tensors, weights, metadata={"format": "pt"})
    return api.convert(ckpt, "gguf", output=root / "endless", recipe=ConvertRecipe(preset="Q8_0")).path

