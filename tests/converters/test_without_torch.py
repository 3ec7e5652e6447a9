"""`pip install edgekit` without the torch extra: the registries load, a GGUF conversion (numpy only) works,
and a conversion that needs PyTorch (AQLM, GPTQ) says which extra to install, in one line.

Each case runs the CLI in a child process whose import system refuses ``torch`` (as a venv without it
would), so a module-level ``import torch`` anywhere on those paths fails the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_NO_TORCH = r"""
import sys

class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoTorch())
sys.argv = ["edgekit", *sys.argv[1:]]
from edgekit.cli.main import main
try:
    main()
finally:
    assert "torch" not in sys.modules
"""


def _edgekit(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGEKIT_MODELS": str(tmp_path / "lib"), "EDGEKIT_HOME": str(tmp_path / "home"),
           "NO_COLOR": "1"}
    env.pop("EDGEKIT_DEBUG", None)
    return subprocess.run([sys.executable, "-c", _NO_TORCH, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_registry_loads_without_torch(tmp_path):
    r = _edgekit(["registry"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "aqlm" in r.stdout and "gptq" in r.stdout


def test_gguf_convert_needs_no_torch(tiny_llama, tmp_path):
    r = _edgekit(["convert", str(tiny_llama), "--to", "gguf", "--type", "Q8_0", "--json"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = json.loads(r.stdout)
    assert manifest["preset"] == "Q8_0"
    assert any((tmp_path / "lib").rglob("*.gguf"))


@pytest.mark.parametrize("args", [["--to", "aqlm"], ["--to", "gguf", "--method", "gptq"]], ids=["aqlm", "gptq"])
def test_torch_conversions_name_the_extra(tiny_llama, tmp_path, args):
    r = _edgekit(["convert", str(tiny_llama), *args], tmp_path)
    assert r.returncode != 0
    err = r.stderr.strip()
    assert "internal error" not in err and "Traceback" not in err, err
    assert err.splitlines()[-1] == ("error: torch is not installed (needed for torch); install it with: "
                                    "pip install 'edgekit[torch]'"), err
