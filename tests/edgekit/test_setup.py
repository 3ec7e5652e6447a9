"""`bash .ci/setup.sh`, the main command, installs only what edgekit runs with: no system packages (adb and
sshd are --tests' business), no test tools; and a second run changes nothing."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _current() -> bool:
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + (ROOT / ".ci/constraints.txt").read_bytes())
    stamp = ROOT / ".venv/.edgekit-setup"
    return stamp.is_file() and stamp.read_text().strip() == want.hexdigest()[:16]


@pytest.mark.skipif(not _current(), reason="the set-up is not current: run bash .ci/setup.sh first")
def test_the_main_command_installs_no_system_packages_and_is_idempotent(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("apt-get", "apt", "dpkg", "sudo"):  # record any call: the main command must make none
        (fake / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {tmp_path}/calls\nexit 1\n")
        (fake / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", ".ci/setup.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (tmp_path / "calls").exists(), (tmp_path / "calls").read_text()
    assert "installing" not in r.stdout and "building" not in r.stdout  # a second run installs nothing
    assert "edgekit is set up: ok" in r.stdout


def test_test_tools_and_system_packages_are_behind_tests():
    """Every apt-get and the dev extra sit in the --tests branch of the script."""
    text = (ROOT / ".ci/setup.sh").read_text()
    tests_branch = text[text.index('if [ "$TESTS" = 1 ]; then'):]
    main = text[: text.index('if [ "$TESTS" = 1 ]; then')]
    assert "apt-get install" not in main and "apt-get install" in tests_branch
    extras = main.split("\nEXTRAS=", 1)[1].split("\n", 1)[0].split(",")
    assert "dev" not in extras and {"torch", "onnx", "serve"} <= set(extras)
    assert '"$EXTRAS,dev"' in main.split('[ "$TESTS" = 1 ] && install_edgekit', 1)[1].split("\n", 1)[0]
