"""TUI fixtures: tiny real GGUF artifacts (llama.cpp runs them in well under a second) under one folder,
an isolated EDGEKIT_HOME (chat histories), and helpers that wait on the app without fixed sleeps."""

from __future__ import annotations

import importlib.util
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

if importlib.util.find_spec("textual") is None:
    pytest.skip("textual is not installed (pip install 'edgekit[tui]')", allow_module_level=True)


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_llama, tmp_path_factory) -> Path:
    """``models/`` with two artifacts of the tiny Llama: ``tiny-f16`` (F16) and ``tiny-q8`` (Q8_0)."""
    from edgekit import api

    root = tmp_path_factory.mktemp("tui") / "models"
    api.convert(tiny_llama, "gguf", output=root / "tiny-f16", recipe=api.ConvertRecipe(bits=None, preset="F16"))
    api.convert(tiny_llama, "gguf", output=root / "tiny-q8", recipe=api.ConvertRecipe(bits=8))
    return root


@pytest.fixture
def models(tiny_artifacts, tmp_path, monkeypatch) -> Path:
    """A private copy of the tiny artifacts (tests delete and add), cwd set to its parent so the app
    shows the relative folder ``models`` (snapshots stay free of temporary paths)."""
    dest = tmp_path / "models"
    shutil.copytree(tiny_artifacts, dest)
    monkeypatch.chdir(tmp_path)
    return dest


@pytest.fixture(autouse=True)
def edgekit_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "edgekit-home"
    monkeypatch.setenv("EDGEKIT_HOME", str(home))
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads collapse on shared cores
    return home


async def wait_for(pilot, cond: Callable[[], bool], timeout: float = 30.0, what: str = "the condition") -> None:
    """Let the app run until ``cond()`` holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await pilot.pause(0.02)


@pytest.fixture
def anyio_backend() -> str:
    """Pilot tests are ``async def`` run by anyio's pytest plugin, on asyncio (what Textual uses)."""
    return "asyncio"
