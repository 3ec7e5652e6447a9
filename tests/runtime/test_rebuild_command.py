"""The rebuild command edgekit suggests (missing llama-cpp-python, SIGILL, protection faults) fixes the
environment that runs: the checkout's setup script only from the checkout's own .venv, else pip of this
interpreter with the CMAKE_ARGS for this CPU."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from edgekit.runtime import llamacpp_build as lb
from edgekit.runtime import llamacpp_errors

ROOT = Path(__file__).resolve().parents[2]
EPYC = ROOT / "tests/runtime/data/cpuinfo-epyc-avx2.txt"


def test_the_checkouts_venv_gets_the_setup_script(monkeypatch):
    monkeypatch.setattr(sys, "prefix", str(ROOT / ".venv"))
    monkeypatch.chdir(ROOT)
    assert lb.in_checkout_venv()
    assert lb.rebuild_command() == "bash .ci/setup.sh --rebuild-llama"
    assert lb.rebuild_command("x86-64-v3") == "bash .ci/setup.sh --rebuild-llama --cpu x86-64-v3"


def test_another_venv_gets_pip_for_its_own_interpreter(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "plain"))
    monkeypatch.setenv(lb.CPUINFO_ENV, str(EPYC))
    assert not lb.in_checkout_venv()
    cmd = lb.rebuild_command("x86-64-v3")
    assert "setup.sh" not in cmd
    assert cmd.startswith(f'CMAKE_ARGS="{lb.cmake_args(lb.resolve("x86-64-v3"))}" {sys.executable} -m pip install ')
    assert "--no-cache-dir" in cmd and "--force-reinstall" in cmd and '"llama-cpp-python' in cmd


def test_crash_messages_follow_the_running_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(lb.CPUINFO_ENV, str(EPYC))
    monkeypatch.setattr(lb, "installed_record", lambda: None)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "plain"))
    for sig in (signal.SIGILL, signal.SIGSEGV):
        msg = llamacpp_errors.crash_message(-sig, "loading", "m.gguf")
        assert f"{sys.executable} -m pip install" in msg and "setup.sh" not in msg, msg
    monkeypatch.setattr(sys, "prefix", str(ROOT / ".venv"))
    monkeypatch.chdir(ROOT)
    for sig in (signal.SIGILL, signal.SIGSEGV):
        assert "`bash .ci/setup.sh --rebuild-llama`" in llamacpp_errors.crash_message(-sig, "loading", "m.gguf")
