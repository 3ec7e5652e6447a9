""".ci/setup.sh's decisions, tested through the helpers it calls (runtime/llamacpp_build.py) and its text:
a moved version pin reinstalls llama-cpp-python, the CPU level a run chose is kept for the venv (and the
--bench tools are built and found under it), "installed" means installed, and a venv without pip is repaired.

The script itself was run by hand in throwaway clones with a private EDGEKIT_CACHE and fake wheel dirs
(a full run needs PyTorch and a llama.cpp build)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgekit.runtime import llamacpp_build as lb

ROOT = Path(__file__).resolve().parents[2]
SETUP = (ROOT / ".ci/setup.sh").read_text()
XEON = ROOT / "tests/runtime/data/cpuinfo-xeon-amx.txt"  # AVX-512: auto and x86-64-v3 differ
x86_only = pytest.mark.skipif(not lb.is_x86(), reason="CPU levels are x86-64's")


@pytest.fixture
def venv(tmp_path, monkeypatch) -> Path:
    """A pretend environment: sys.prefix (where the build record and the remembered level live) is tmp."""
    monkeypatch.setattr("sys.prefix", str(tmp_path / "venv"))
    monkeypatch.setenv(lb.CPUINFO_ENV, str(XEON))
    monkeypatch.delenv("EDGEKIT_LLAMA_CPU", raising=False)
    return tmp_path / "venv"


def _install(monkeypatch, level: str, version: str, dist_version: str | None = None) -> None:
    """As if setup had installed the wheel for ``level`` at ``version`` (pip's metadata says ``dist_version``)."""
    lib = Path(lb.sys.prefix) / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(lb, "installed_lib_dir", lambda: lib)
    monkeypatch.setattr("importlib.metadata.version", lambda name: dist_version or version)
    path = lb.installed_record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(lb.make_record(lb.resolve(level), version)))


# -- finding: a moved pin with its wheel already cached was not installed -------------------------------

@x86_only
def test_installed_build_must_match_key_and_pinned_version(venv, monkeypatch):
    _install(monkeypatch, "auto", "0.3.36")
    assert lb.installed_mismatch(lb.resolve("auto"), "0.3.36") is None
    assert lb.installed_mismatch(lb.resolve("auto"), "0.3.37") == "0.3.36 is installed, 0.3.37 is pinned"
    assert lb.installed_mismatch(lb.resolve("x86-64-v3"), "0.3.36").startswith("the installed build is for x86-64-v4")
    _install(monkeypatch, "auto", "0.3.36", dist_version="0.3.37")  # pip installed another over it
    assert lb.installed_mismatch(lb.resolve("auto"), "0.3.36") == "0.3.37 is installed, 0.3.36 is pinned"
    lb.installed_record_path().unlink()
    assert lb.installed_mismatch(lb.resolve("auto"), "0.3.36") == "it has no edgekit build record"
    monkeypatch.setattr(lb, "installed_lib_dir", lambda: None)
    assert lb.installed_mismatch(lb.resolve("auto"), "0.3.36") == "llama-cpp-python is not installed"


@x86_only
def test_installed_subcommand_exits_1_with_the_reason(venv, monkeypatch, capsys):
    _install(monkeypatch, "auto", "0.3.36")
    assert lb.main(["installed", "--cpu", "auto", "--version", "0.3.36"]) == 0
    assert lb.main(["installed", "--cpu", "auto", "--version", "0.3.37"]) == 1
    assert capsys.readouterr().out.splitlines() == ["ok", "0.3.36 is installed, 0.3.37 is pinned"]


def test_setup_reinstalls_on_any_mismatch_the_helper_reports():
    assert 'installed --cpu "$CPU" --version "$LLAMA_VERSION"' in SETUP
    assert "installed%% *" not in SETUP  # the old key-only comparison


# -- finding: the chosen CPU level was forgotten by the next plain run ----------------------------------

def test_the_level_is_remembered_per_venv_until_auto(venv, capsys):
    assert lb.remembered_level() is None
    lb.main(["remember", "x86-64-v3"])
    assert (venv / "share/edgekit/llama-cpu").read_text().strip() == "x86-64-v3"
    lb.main(["remembered"])
    assert capsys.readouterr().out.strip() == "x86-64-v3"
    lb.main(["remember", "auto"])
    assert lb.remembered_level() is None and not (venv / "share/edgekit/llama-cpu").exists()
    lb.main(["remembered"])
    assert capsys.readouterr().out.strip() == "auto"


def test_setup_uses_the_remembered_level_unless_cpu_is_given():
    assert re.search(r'^TESTS=0 BENCH=0 REBUILD=0 CPU=\$\{EDGEKIT_LLAMA_CPU:-\}$', SETUP, re.M)
    pick = SETUP[SETUP.index('if [ -z "$CPU" ]; then'):SETUP.index('KEY=$(.venv/bin/python $BUILD_PY key')]
    assert "$BUILD_PY remembered" in pick and "--cpu auto" in pick and "say " in pick
    fallback = SETUP[SETUP.index('if [ $rc = 3 ]; then'):]
    assert "KEY=$SAFE CPU=$SAFE" in fallback  # the fallback is what gets remembered
    remember = SETUP.index('$BUILD_PY remember "$CPU"')
    assert SETUP.index("echo \"$LIBSHA\" >$SMOKE") < remember < SETUP.index('if [ "$BENCH" = 1 ]')


# -- finding: --bench tools built for auto, filed (and looked up) under another key ---------------------

def test_bench_tools_are_built_for_the_level_of_their_key():
    bench = SETUP[SETUP.index('if [ "$BENCH" = 1 ]'):]
    assert "$BUILD_PY cmake-args --cpu \"$CPU\")" in bench
    assert "$BUILD_PY cmake-args)" not in SETUP  # every build names its level


@x86_only
def test_bench_finds_the_tools_under_the_remembered_level(venv, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("_imatrix_under_test", ROOT / "bench/llamacpp_imatrix.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "version", lambda name: "0.3.36")
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache/bin").mkdir(parents=True)
    for tool in ("imatrix", "quantize"):
        (tmp_path / f"cache/bin/llama-{tool}-0.3.36-x86-64-v3").write_text("")
    assert mod.tools() is None  # auto is x86-64-v4+... on this CPU
    lb.remember_level("x86-64-v3")  # after `--cpu x86-64-v3` or a crash's fallback
    assert [p.name for p in mod.tools()] == ["llama-imatrix-0.3.36-x86-64-v3", "llama-quantize-0.3.36-x86-64-v3"]


# -- finding: "installed" passed on the checkout's folder; the last line said "set up:" anyway ----------

def test_edgekit_counts_as_installed_only_when_importable_from_elsewhere():
    check = SETUP[SETUP.index("edgekit_installed() {"):SETUP.index("install_edgekit() {")]
    assert "cd /" in check and " -I -c" in check and "$ROOT" in check
    assert '! .venv/bin/python -c "import edgekit"' not in SETUP
    last = SETUP.rstrip().splitlines()[-2:]
    assert last[0].startswith(".venv/bin/edgekit --help >/dev/null || die ")
    assert last[1].startswith('say "edgekit is set up: ok')


# -- finding: a venv without pip failed every rerun -----------------------------------------------------

def test_a_venv_without_pip_is_repaired(tmp_path):
    """The script's venv block, run on what an interrupted `python -m venv` leaves."""
    start = SETUP.index("if [ ! -x .venv/bin/python ]; then")
    block = SETUP[start:SETUP.index("\nfi\n", start) + 4]
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", ".venv"], cwd=tmp_path, check=True)
    script = f'set -euo pipefail\nPY={sys.executable}\nsay() {{ echo "$*"; }}\n{block}'
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "repairing .venv: it has no pip" in r.stdout
    assert subprocess.run([str(tmp_path / ".venv/bin/python"), "-c", "import pip"]).returncode == 0
