"""Portability of the llama.cpp build: it is built for the CPU that setup finds (never AMX), its record
tells the truth about the instructions in it, it runs as an AVX2-only CPU would (qemu-user's Haswell),
a SIGILL explains itself, and what needs no model run (plan) needs no working llama.cpp.

These fail on the next slip: hard-coded AVX-512 flags in setup, a native build, a record that lies,
a crash message that blames the wrong thing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekit.runtime import llamacpp_build as lb

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).with_name("data")
EPYC = DATA / "cpuinfo-epyc-avx2.txt"  # AMD EPYC 7B12: AVX2, no AVX-512 (the machine that got SIGILL)
XEON = DATA / "cpuinfo-xeon-amx.txt"  # Xeon that reports AMX and faults on it
HASWELL = DATA / "cpuinfo-haswell.txt"  # what `qemu-x86_64 -cpu Haswell` runs
QEMU = ["qemu-x86_64", "-cpu", "Haswell"]

needs_llama = pytest.mark.skipif(lb.installed_lib_dir() is None, reason="llama-cpp-python is not installed")
needs_qemu = pytest.mark.skipif(shutil.which("qemu-x86_64") is None or not lb.is_x86(),
                                reason="qemu-user is not installed (bash .ci/setup.sh --tests installs it)")
needs_objdump = pytest.mark.skipif(shutil.which("objdump") is None, reason="binutils' objdump is not installed")

# Instructions beyond AVX2 as objdump prints them: any AVX-512 register (zmm, xmm/ymm 16-31, opmasks) or an
# AVX-512-only mnemonic; AMX's tile instructions.
AVX512_RE = re.compile(r"%zmm\d|%[xy]mm(1[6-9]|2\d|3[01])\b|%k[1-7]\b|\b(vpternlog[dq]|vperm[it]2[bwdqps]+|"
                       r"vpro[lr]v?[dq]|vp?compress|vp?expand|vrcp14|vrsqrt14|vscalef|vgetexp|vfixupimm|"
                       r"vrndscale|vpconflict|vplzcnt|valign[dq]|vdpbf16ps|vcvtne2ps2bf16)\b")
AMX_RE = re.compile(r"\b(tileloadd|tilestored|tdpb[su]{2}d|tdpbf16ps|ldtilecfg|sttilecfg|tilezero|tilerelease)\b")


def _flags(path: Path) -> set[str]:
    return lb.cpu_flags(path.read_text())


def _classes(binary: Path) -> set[str]:
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(binary)], capture_output=True, text=True,
                          check=True).stdout
    return {name for name, rx in (("AVX512", AVX512_RE), ("AMX", AMX_RE)) if rx.search(text)}


def _installed() -> dict:
    record = lb.installed_record()
    if record is None:
        pytest.fail("llama-cpp-python has no valid edgekit build record: run bash .ci/setup.sh")
    return record


# -- choosing what to build ----------------------------------------------------------------------

def test_build_for_an_avx2_only_epyc_has_no_avx512():
    opts = lb.resolve("auto", _flags(EPYC))
    assert opts == list(lb.LEVELS["x86-64-v3"]) and lb.key(opts) == "x86-64-v3"
    args = lb.cmake_args(opts)
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AVX2=ON" in args
    for off in ("AVX512", "AVX512_VNNI", "AVX512_BF16", "AVX_VNNI", "AMX_TILE", "AMX_INT8"):
        assert f"-DGGML_{off}=OFF" in args, off
    assert lb.missing(opts, _flags(EPYC)) == []


def test_build_for_the_amx_xeon_uses_avx512_and_never_amx():
    opts = lb.resolve("auto", _flags(XEON))
    assert {"AVX512", "AVX512_VNNI", "AVX512_BF16"} <= set(opts)
    assert not any(o.startswith("AMX") for o in opts) and "-DGGML_AMX_TILE=OFF" in lb.cmake_args(opts)
    # The Xeon's build does not run on the EPYC, and the key says so: they never share a wheel.
    assert lb.missing(opts, _flags(EPYC)) == ["AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"]
    assert lb.key(opts) != lb.key(lb.resolve("auto", _flags(EPYC)))


def test_levels_never_exceed_the_cpu():
    assert lb.resolve("x86-64-v4", _flags(EPYC)) == list(lb.LEVELS["x86-64-v3"])
    assert lb.resolve("x86-64-v3", _flags(XEON)) == list(lb.LEVELS["x86-64-v3"])
    assert lb.resolve("AVX2,FMA", _flags(HASWELL)) == ["FMA", "AVX2"]
    with pytest.raises(SystemExit, match="unknown CPU option"):
        lb.resolve("AVX9", _flags(XEON))


def test_setup_builds_for_the_detected_cpu_only():
    """No instruction set is hard-coded in setup: every CMAKE_ARGS come from llamacpp_build."""
    text = (ROOT / ".ci/setup.sh").read_text()
    assert not re.search(r"-DGGML_(AVX\w*|AMX\w*|FMA|F16C|SSE42|BMI2|NATIVE)=ON", text)
    assert "-march=native" not in text
    assert text.count("llamacpp_build.py cmake-args") + text.count("$BUILD_PY cmake-args") >= 2


# -- what is installed ----------------------------------------------------------------------------

@needs_llama
def test_installed_build_fits_this_cpu():
    record = _installed()
    assert set(record["options"]) <= set(lb.supported(lb.cpu_flags()))
    assert lb.missing(record["options"], lb.cpu_flags()) == []
    assert not any(o.startswith("AMX") for o in record["options"])


@needs_llama
@needs_objdump
def test_cpu_library_holds_what_its_record_claims():
    """The instructions in libggml-cpu match the record: AVX-512 exactly when it says so, AMX never."""
    record = _installed()
    found = _classes(Path(record["cpu_library"]))
    assert "AMX" not in found
    assert ("AVX512" in found) == ("AVX512" in record["options"]), (found, record["options"])


def _runner() -> Path:
    p = Path(os.environ.get("EDGEKIT_LLAMA_BENCH") or lb.runner_path())
    if not p.is_file():
        pytest.skip(f"no llama-bench at {p} (bash .ci/setup.sh --tests builds it)")
    return p


@needs_objdump
def test_llama_bench_runner_is_portable():
    """The runner pushed to devices is built for x86-64-v3 at most, and its record says so."""
    runner = _runner()
    record = json.loads(Path(f"{runner}.json").read_text())
    assert set(record["options"]) <= set(lb.LEVELS["x86-64-v3"])
    assert _classes(runner) == set()


# -- running as an AVX2-only CPU would ------------------------------------------------------------

@needs_qemu
def test_llama_bench_runner_runs_as_an_avx2_cpu(tmp_path):
    runner = _runner()
    model = lb.write_smoke_gguf(tmp_path / "smoke.gguf")
    r = subprocess.run([*QEMU, str(runner), "-m", str(model), "-p", "8", "-n", "4", "-r", "1", "-t", "1",
                        "-o", "json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    assert [(x["n_prompt"], x["n_gen"]) for x in rows] == [(8, 0), (0, 4)] and all(x["avg_ts"] > 0 for x in rows)


@needs_llama
@needs_qemu
def test_smoke_decode_as_an_avx2_cpu(monkeypatch):
    """The installed build under qemu's Haswell: it decodes if it claims no more than AVX2; otherwise
    it dies with a real SIGILL, and the explanation names what Haswell lacks and the fix."""
    record = _installed()
    monkeypatch.setenv(lb.CPUINFO_ENV, str(HASWELL))
    ok, what = lb.smoke_check(prefix=QEMU)
    lacking = lb.missing(record["options"], _flags(HASWELL))
    if not lacking:
        assert ok, what
        assert what.startswith("decoded")
    else:
        assert not ok and what.startswith("llama.cpp crashed (SIGILL)"), what
        assert ", ".join(lacking) in what and "--rebuild-llama" in what and "AMX" not in what


@needs_llama
@needs_qemu
def test_backend_sigill_explains_itself_and_is_not_retried(monkeypatch, tmp_path):
    from edgekit.errors import BackendCrashed
    from edgekit.runtime.llamacpp import LlamaCppBackend

    record = _installed()
    lacking = lb.missing(record["options"], _flags(HASWELL))
    model = lb.write_smoke_gguf(tmp_path / "smoke.gguf")
    monkeypatch.setenv(lb.CPUINFO_ENV, str(HASWELL))
    monkeypatch.setenv(lb.WRAPPER_ENV, " ".join(QEMU))
    warned: list[str] = []
    if not lacking:
        with LlamaCppBackend(model, n_ctx=64, n_threads=1, on_warning=warned.append) as llm:
            assert len(llm.tokenize("abc")) > 0
        return
    with pytest.raises(BackendCrashed) as err:
        LlamaCppBackend(model, n_ctx=64, n_threads=1, on_warning=warned.append)
    msg = str(err.value)
    assert err.value.signal == "SIGILL" and "\n" not in msg
    assert f"uses {', '.join(lacking)}, which this CPU" in msg and "--rebuild-llama" in msg
    assert warned == []  # safe CPU mode cannot help a SIGILL: no retry


# -- what needs no model run needs no working llama.cpp --------------------------------------------

@needs_llama
def test_plan_and_run_when_llama_cpp_crashes(monkeypatch, tmp_path):
    from edgekit.cli.main import app

    model = lb.write_smoke_gguf(tmp_path / "smoke.gguf")
    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "home"))  # nothing measured before
    monkeypatch.setenv(lb.WRAPPER_ENV, "sh -c 'kill -ILL $$' --")  # every llama.cpp process dies of SIGILL
    monkeypatch.setenv(lb.CPUINFO_ENV, str(EPYC))
    r = CliRunner().invoke(app, ["plan", str(model), "--ctx", "64", "--cpu-bandwidth", "20"])
    assert r.exit_code == 0, r.output
    assert "fits" in r.output
    r = CliRunner().invoke(app, ["run", str(model), "-p", "hi", "-n", "2"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "SIGILL" in r.output and "--rebuild-llama" in r.output


# -- runners pushed to devices --------------------------------------------------------------------

class _Board:
    id = "ssh:epyc"

    def __init__(self, cpuinfo: Path) -> None:
        self.cpuinfo = cpuinfo.read_text()

    def run(self, command: str, timeout: float | None = 600):
        from edgekit.devices.base import RunResult

        assert command == "cat /proc/cpuinfo"
        return RunResult(0, self.cpuinfo, "")


def test_runner_for_another_cpu_is_refused_before_pushing(tmp_path):
    from edgekit.devices.profile import check_runner_cpu
    from edgekit.errors import InputError

    runner = tmp_path / "llama-bench"
    runner.write_bytes(b"\x7fELF")
    Path(f"{runner}.json").write_text(json.dumps(lb.make_record(lb.resolve("auto", _flags(XEON)))))
    with pytest.raises(InputError, match=r"lacks AVX_VNNI, AVX512, .*-DGGML_AVX512=OFF"):
        check_runner_cpu(runner, _Board(EPYC))
    Path(f"{runner}.json").write_text(json.dumps(lb.make_record(lb.resolve("x86-64-v3", _flags(XEON)))))
    check_runner_cpu(runner, _Board(EPYC))  # a v3 runner fits the EPYC


def test_build_helper_runs_as_a_script_before_edgekit_is_installed():
    """setup.sh calls the file by path with a bare interpreter: it must need nothing but the stdlib."""
    r = subprocess.run([sys.executable, "-S", "-I", str(ROOT / "runtime/llamacpp_build.py"), "key", "--cpu",
                        "x86-64-v3"], capture_output=True, text=True, env={**os.environ, lb.CPUINFO_ENV: str(EPYC)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("x86-64-v3" if lb.is_x86() else f"{os.uname().machine.lower()}-native")
