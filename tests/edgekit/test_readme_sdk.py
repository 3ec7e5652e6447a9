"""The README's Python snippets run as written (QA s54: the GPTQ conversion is named ``...-gptq``, and the
snippet then opened the name without it)."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from edgekit.calibration import CalibConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def _snippet(after: str) -> str:
    """The indented code block that follows the line ``after``."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(after)) + 1
    while not lines[start].strip():
        start += 1
    block = []
    for line in lines[start:]:
        if line.strip() and not line.startswith("    "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block))


def test_the_config_snippet_runs_as_written(tiny_llama, tmp_path, monkeypatch, private_home):
    pytest.importorskip("onnx")
    code = _snippet("From Python every setting of a method or a format is reachable through its config")
    assert "GPTQConfig" in code and "api.plan(" in code
    shutil.copytree(tiny_llama, tmp_path / "SmolLM2-135M")  # the README's model folder, as a tiny model
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGEKIT_MODELS", str(tmp_path / "models"))
    # calibrate on 2 short sequences, not 32 x 512 tokens: what is checked is that the snippet runs
    defaults = dict(zip(("source", "samples", "seqlen"), CalibConfig.__init__.__defaults__, strict=False))
    assert defaults == {"source": "self", "samples": 32, "seqlen": 512}
    monkeypatch.setattr(CalibConfig.__init__, "__defaults__", ("self", 2, 32, *CalibConfig.__init__.__defaults__[3:]))
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - the README's own code
    art = scope["gguf"]
    assert art.name == "smollm2-135m-gguf-q4_k_m-gptq"  # the name the snippet's comment says plan takes
    by_name = scope["api"].plan(art.name, vram_bytes=6 << 30, n_ctx=8192)
    assert type(by_name) is type(scope["api"].plan(art, vram_bytes=6 << 30, n_ctx=8192))
