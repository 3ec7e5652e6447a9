"""Profiling on a device: edgekit's profiler run over real SSH, and runner binaries checked by ELF header."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from edgekit.devices import open_device
from edgekit.devices.base import DeviceError
from edgekit.devices.config import SSHHost, add_ssh_host
from edgekit.devices.profile import (
    RemoteProfileConfig,
    _llama_bench_args,
    elf_arch,
    remote_profile,
    upload_runner,
)
from edgekit.errors import InputError, UnsupportedError

EDGEKIT = Path(sys.executable).with_name("edgekit")


@pytest.mark.llamacpp
def test_profile_over_ssh_returns_the_local_schema(sshd, home, tiny_artifact, tmp_path):
    add_ssh_host(SSHHost(name="loop", host=sshd["host"], port=sshd["port"], user=sshd["user"], key=sshd["key"],
                         remote_edgekit=str(EDGEKIT)))
    with open_device("ssh:loop") as dev:
        rows = remote_profile(dev, tiny_artifact, RemoteProfileConfig(tests="pp16,tg8", reps=2, threads=1,
                                                                      dest=str(tmp_path / "board")))
    assert [r["test"] for r in rows] == ["pp16", "tg8"]
    for r in rows:
        assert r["schema"] == "edgekit.profile/1" and r["status"] == "ok" and r["reps"] == 2
        assert r["tps_mean"] > 0 and r["config"]["n_threads"] == 1
        assert r["artifact"]["path"].startswith(str(tmp_path / "board"))  # it ran on the pushed copy


def test_wrong_abi_runner_is_explained(phone, tiny_artifact, tmp_path):
    standin, dev_id = phone
    runner = tmp_path / "llama-bench"  # an x86-64 ELF whatever this host is (the stand-in phone is arm64-v8a)
    runner.write_bytes(_elf(0x3E) + bytes(64))
    with open_device(dev_id) as dev, pytest.raises(InputError) as e:
        remote_profile(dev, tiny_artifact, RemoteProfileConfig(runner=runner))
    assert "built for x86_64" in str(e.value) and "arm64-v8a" in str(e.value) and "ANDROID_ABI" in str(e.value)
    assert not standin.host_path("/data/local/tmp/edgekit").exists()  # refused before anything was pushed


def test_android_needs_a_runner_and_runner_must_be_elf(phone, tiny_artifact, tmp_path):
    standin, dev_id = phone
    with open_device(dev_id) as dev:
        with pytest.raises(UnsupportedError, match="--runner"):
            remote_profile(dev, tiny_artifact, RemoteProfileConfig())
        script = tmp_path / "llama-bench"
        script.write_text("#!/bin/sh\n")
        with pytest.raises(InputError, match="not an ELF executable"):
            remote_profile(dev, tiny_artifact, RemoteProfileConfig(runner=script))


def test_a_runner_that_does_not_exist_says_so(tmp_path):
    with pytest.raises(InputError, match="runner .*nope does not exist"):
        elf_arch(tmp_path / "nope")


def test_edgekit_missing_on_the_board_is_found_before_pushing(sshd, home, tiny_artifact, tmp_path):
    """QA s48: the whole artifact went up before edgekit was looked for on the board."""
    add_ssh_host(SSHHost(name="bare", host=sshd["host"], port=sshd["port"], user=sshd["user"], key=sshd["key"],
                         remote_edgekit="/nonexistent/edgekit"))
    with open_device("ssh:bare") as dev, pytest.raises(DeviceError) as e:
        remote_profile(dev, tiny_artifact, RemoteProfileConfig(dest=str(tmp_path / "board")))
    assert not (tmp_path / "board").exists()  # refused before the artifact went up
    assert "edgekit is not usable on ssh:bare (/nonexistent/edgekit not found)" in str(e.value), str(e.value)
    assert "--runner" in str(e.value)


def test_the_runner_is_not_sent_again_when_the_board_has_it(sshd, home, tmp_path):
    """Same size and sha256 on the board: no upload (it was 11.5 MB on every run); a changed one is
    replaced, verified."""
    add_ssh_host(SSHHost(name="rb", host=sshd["host"], port=sshd["port"], user=sshd["user"], key=sshd["key"]))
    bench = tmp_path / "llama-bench"
    bench.write_bytes(_elf(0x3E) + bytes(4096))
    folder = tmp_path / "board" / "bin"
    with open_device("ssh:rb") as dev:
        remote = upload_runner(dev, bench, str(folder))
        first = Path(remote).stat()
        assert upload_runner(dev, bench, str(folder)) == remote
        again = Path(remote).stat()
        assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
        bench.write_bytes(_elf(0x3E) + bytes(8192))
        upload_runner(dev, bench, str(folder))
    assert Path(remote).read_bytes() == bench.read_bytes() and Path(remote).stat().st_mode & 0o111
    assert sorted(p.name for p in folder.iterdir()) == ["llama-bench"]  # no partial left


def test_two_profiles_upload_one_runner_in_turn(home, tmp_path):
    """Two profiles sending the runner into one folder wrote the same partial file; the second now waits for the
    first's lock and finds the runner there, or, still held after its wait, says who holds it."""
    import threading

    from edgekit.devices.base import PushInProgress
    from edgekit.devices.host import HostDevice
    from edgekit.devices.pushlock import LOCK_NAME, PushLock

    bench = tmp_path / "llama-bench"
    bench.write_bytes(_elf(0x3E) + bytes(4096))
    folder = tmp_path / "board" / "bin"
    folder.mkdir(parents=True)
    dev = HostDevice()
    held = PushLock(dev, str(folder))
    held.acquire()
    try:
        with pytest.raises(PushInProgress, match="pid"):
            upload_runner(dev, bench, str(folder), wait_s=0.3)
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]  # nothing sent while the other held it
        result: list[str] = []
        second = threading.Thread(target=lambda: result.append(upload_runner(dev, bench, str(folder), wait_s=30)))
        second.start()
        time.sleep(1.0)
        assert second.is_alive()  # waiting for its turn
    finally:
        held.release()
    second.join(30)
    assert result == [str(folder / "llama-bench")] and (folder / "llama-bench").read_bytes() == bench.read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == ["llama-bench"]


def _elf(machine: int, little: bool = True) -> bytes:
    head = bytearray(b"\x7fELF" + bytes([2, 1 if little else 2]) + bytes(12))
    head += machine.to_bytes(2, "little" if little else "big")
    return bytes(head)


@pytest.mark.parametrize("machine,arch", [(0xB7, "aarch64"), (0x28, "armv7"), (0x3E, "x86_64"), (0xF3, "riscv64")])
def test_elf_machine_table(tmp_path, machine, arch):
    f = tmp_path / "bin"
    f.write_bytes(_elf(machine) + bytes(64))
    assert elf_arch(f) == arch
    f.write_bytes(_elf(machine, little=False) + bytes(64))  # e_machine is in the file's own byte order
    assert elf_arch(f) == arch


# platform.machine()'s spellings of the architectures ELF_MACHINES names
_MACHINE_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64",
                 "armv7l": "armv7", "armv8l": "armv7", "riscv64": "riscv64", "i686": "x86", "i386": "x86"}


@pytest.mark.skipif(sys.platform != "linux", reason="this interpreter is an ELF file only on Linux")
def test_elf_arch_of_this_interpreter_is_this_host():
    import platform

    assert elf_arch(Path(sys.executable).resolve()) == _MACHINE_ARCH[platform.machine().lower()]


def test_llama_bench_arguments():
    assert _llama_bench_args("pp512,tg128,pp64+tg16", 3, 4) == [
        "-p", "512", "-n", "128", "-r", "3", "-o", "json", "-pg", "64,16", "-t", "4"]
    with pytest.raises(InputError, match="depth"):
        _llama_bench_args("tg128@d512", 1, None)


@pytest.mark.llamacpp
def test_profile_cli_with_device(sshd, home, tiny_artifact, tmp_path):
    """`edgekit profile ART --device ssh:NAME --json`: the same rows as a local profile, from the board."""
    import json

    from typer.testing import CliRunner

    from edgekit.cli.main import app

    add_ssh_host(SSHHost(name="loop2", host=sshd["host"], port=sshd["port"], user=sshd["user"], key=sshd["key"],
                         remote_edgekit=str(EDGEKIT), dest=str(tmp_path / "board")))
    r = CliRunner().invoke(app, ["profile", str(tiny_artifact), "--device", "ssh:loop2", "--tests", "pp16,tg8", "-r", "2",
                                 "--threads", "1", "--json", "--no-history"])
    assert r.exit_code == 0, r.output
    run = json.loads(r.output[r.output.index("{"):])
    assert [row["test"] for row in run["rows"]] == ["pp16", "tg8"]
    assert run["host"]["device"] == "ssh:loop2" and all(row["tps_mean"] > 0 for row in run["rows"])
    r = CliRunner().invoke(app, ["profile", str(tiny_artifact), "--device", "ssh:nope"])
    assert r.exit_code != 0 and "Traceback" not in r.output


def _llama_bench() -> Path:
    """The real llama-bench `.ci/setup.sh --tests` builds (static, x86-64-v3 at most, this host's ABI)."""
    import os

    from edgekit.runtime.llamacpp_build import runner_path

    p = Path(os.environ.get("EDGEKIT_LLAMA_BENCH") or runner_path())
    if not p.is_file():
        pytest.skip(f"no llama-bench at {p} (bash .ci/setup.sh --tests builds it)")
    return p


def _check_llama_bench_rows(rows: list[dict], board_dir: str) -> None:
    assert [r["test"] for r in rows] == ["pp16", "tg8"]
    assert [r["config"]["n_ctx"] for r in rows] == [16, 8]  # llama-bench's context per test, not "cNone"
    for r in rows:
        assert r["schema"] == "edgekit.profile/1" and r["source"] == "llama-bench" and r["status"] == "ok"
        assert r["reps"] == 2 and len(r["samples_s"]) == 2 and r["tps_mean"] > 0
        assert r["config"]["n_threads"] == 1 and r["artifact"]["sha256"]  # the local artifact's identity


def test_real_llama_bench_runner_over_ssh(sshd, home, tiny_artifact, tmp_path):
    """--runner: the llama-bench binary is checked against the board's ABI, pushed next to the artifact,
    run there over SSH, and its JSON parsed into the same rows."""
    bench = _llama_bench()
    add_ssh_host(SSHHost(name="lb", host=sshd["host"], port=sshd["port"], user=sshd["user"], key=sshd["key"]))
    with open_device("ssh:lb") as dev:
        rows = remote_profile(dev, tiny_artifact, RemoteProfileConfig(tests="pp16,tg8", reps=2, threads=1,
                                                                      runner=bench, dest=str(tmp_path / "board")))
    _check_llama_bench_rows(rows, str(tmp_path / "board"))
    pushed = tmp_path / "board" / "bin" / bench.name
    assert pushed.is_file()  # pushed beside the artifact folder
    first = pushed.stat()
    with open_device("ssh:lb") as dev:  # the same runner is there already: not sent again
        remote_profile(dev, tiny_artifact, RemoteProfileConfig(tests="pp16", reps=1, threads=1, runner=bench,
                                                               dest=str(tmp_path / "board")))
    assert (pushed.stat().st_ino, pushed.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)


def test_real_llama_bench_runner_on_an_android_standin(adb_server, home, tiny_artifact):
    """The same over adb: a stand-in phone reporting this host's ABI runs the pushed binary as the
    shell user, through the real adb server."""
    import platform
    import shutil
    import tempfile

    from tests.devices.adbd_standin import AdbdStandin
    from tests.devices.conftest import _adb, reconnect

    bench = _llama_bench()
    abi = {"x86_64": "x86_64", "aarch64": "arm64-v8a"}.get(platform.machine(), platform.machine())
    base = Path(tempfile.mkdtemp(prefix="edgekit-adbd-"))
    base.chmod(0o755)
    dev = AdbdStandin(base / "root", props={"ro.product.cpu.abi": abi, "ro.product.cpu.abilist": abi})
    serial = reconnect(adb_server, dev)
    try:
        with open_device(f"android:{serial}") as phone:
            rows = remote_profile(phone, tiny_artifact, RemoteProfileConfig(tests="pp16,tg8", reps=2, threads=1,
                                                                            runner=bench))
        _check_llama_bench_rows(rows, "/data/local/tmp/edgekit")
    finally:
        _adb(adb_server, "disconnect", serial)
        dev.close()
        shutil.rmtree(base, ignore_errors=True)


def test_the_profile_table_names_the_device(sshd, home, tiny_artifact, tmp_path):
    """QA: `profile --device` printed the table of a local profile, with nothing saying where it ran."""
    from typer.testing import CliRunner

    from edgekit.cli.main import app

    bench = _llama_bench()
    add_ssh_host(SSHHost(name="lbt", host=sshd["host"], port=sshd["port"], user=sshd["user"], key=sshd["key"],
                         dest=str(tmp_path / "board")))
    r = CliRunner().invoke(app, ["profile", str(tiny_artifact), "--device", "ssh:lbt", "--runner", str(bench),
                                 "--tests", "tg8", "-r", "1", "--threads", "1", "--no-history"])
    assert r.exit_code == 0, r.output
    assert "edgekit profile (ok) on ssh:lbt: tiny-q8" in " ".join(r.output.split()), r.output
