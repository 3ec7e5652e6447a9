"""Profiling on a device: push the artifact (verified), run there, return rows of the local schema.

SSH boards (and this host) run edgekit's own profiler with the edgekit installed on the device; a
llama.cpp ``llama-bench`` built for the device (``runner``) works on SSH boards and on Android, where
edgekit pushes it and parses its ``-o json`` output with issue 5's ``from_llama_bench``.
"""

from __future__ import annotations

import json
import posixpath
import shlex
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.artifact import Artifact
from edgekit.devices.base import Device, DeviceError, PushInProgress, normalize_arch
from edgekit.devices.pushlock import PushLock
from edgekit.devices.transfer import ProgressFn, PushConfig, default_name, push
from edgekit.errors import InputError, UnsupportedError

# ELF e_machine -> normalized arch (the values of the ELF spec's EM_* constants).
RUNNER_WAIT_S = 120.0  # how long a profile waits for another one uploading the runner into the same folder
ELF_MACHINES = {0x03: "x86", 0x28: "armv7", 0x3E: "x86_64", 0xB7: "aarch64", 0xF3: "riscv64"}


def elf_arch(path: Path) -> str:
    """The architecture an ELF executable is built for; InputError when it is not an ELF file."""
    if not path.exists():
        raise InputError(f"runner {path} does not exist; give the path of a llama-bench built for the device")
    head = path.read_bytes()[:20] if path.is_file() else b""
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise InputError(f"runner {path} is not an ELF executable; give a llama-bench binary built for the device")
    (machine,) = struct.unpack("<H" if head[5] == 1 else ">H", head[18:20])
    return ELF_MACHINES.get(machine, f"e_machine {machine:#x}")


def check_runner_abi(runner: Path, device: Device, arch: str | None, abi: str | None) -> None:
    """Refuse a runner built for another CPU than the device's, saying which build is needed."""
    built = elf_arch(runner)
    ok = built == arch or (built == "armv7" and arch == "aarch64")  # 64-bit Arm runs 32-bit Arm code
    if not ok:
        target = abi or arch or "the device's CPU"
        hint = f" (Android NDK: cmake -DANDROID_ABI={abi})" if abi else ""
        raise InputError(f"runner {runner} is built for {built}, but {device.id} is {target}; build llama-bench "
                         f"for {target}{hint}")


def check_runner_cpu(runner: Path, device: Device) -> None:
    """Refuse an x86-64 runner that uses instruction sets the device's CPU lacks (it would die with
    SIGILL there). The instruction sets come from the build record edgekit's setup writes beside the
    runner (``<runner>.json``); a runner without one is not checked."""
    from edgekit.runtime import llamacpp_build

    try:
        record = json.loads(Path(f"{runner}.json").read_text())
    except (OSError, ValueError):
        return
    options = record.get("options") or []
    if not options:
        return
    r = device.run("cat /proc/cpuinfo")
    flags = llamacpp_build.cpu_flags(r.stdout) if r.rc == 0 else set()
    if not flags:
        return  # the device does not say; llama-bench's own crash report will
    lacking = llamacpp_build.missing(options, flags)
    if lacking:
        have = llamacpp_build.label(llamacpp_build.supported(flags))
        raise InputError(f"runner {runner.name} is built for {record.get('key')}, but {device.id}'s CPU lacks "
                         f"{', '.join(lacking)}; build llama-bench for it with CMAKE_ARGS "
                         f"\"{llamacpp_build.cmake_args(llamacpp_build.supported(flags))}\" ({have})")


@dataclass(frozen=True)
class RemoteProfileConfig:
    """What to run on the device.

    tests: llama-bench style tests ("pp512,tg128", "pp512+tg128"). reps: timed repetitions. threads:
    CPU threads (None: all). runner: a local llama-bench binary built for the device (pushed and run);
    None runs edgekit's profiler there (edgekit must be installed on the device). remote_edgekit: the
    edgekit executable on the device (default: the SSH host's configured one, else ``edgekit``).
    dest: push destination (default the device's).
    """

    tests: str = "pp512,tg128"
    reps: int = 5
    threads: int | None = None
    runner: Path | None = None
    remote_edgekit: str | None = None
    dest: str | None = None
    ctx: int = 4096

    def __post_init__(self) -> None:
        from edgekit.runtime.hostinfo import check_threads
        from edgekit.runtime.profile_schema import parse_tests

        parse_tests(self.tests)
        if self.reps < 1:
            raise InputError("--reps must be >= 1")
        check_threads(self.threads)


def remote_profile(device: Device, artifact: str | Path | Artifact, config: RemoteProfileConfig | None = None,
                   progress: ProgressFn | None = None) -> list[dict[str, Any]]:
    """Push ``artifact`` to ``device`` and profile it there; rows in the ``edgekit.profile/1`` schema."""
    config = config or RemoteProfileConfig()
    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
    info = device.info()
    if config.runner is not None:
        check_runner_abi(Path(config.runner), device, info.arch, info.abi)
        if info.arch == "x86_64":
            check_runner_cpu(Path(config.runner), device)
    elif device.platform == "android":
        raise UnsupportedError(f"{device.id}: Android runs llama.cpp, not edgekit; give --runner with a llama-bench "
                               f"built for {info.abi or 'the phone'}")
    py = _remote_python(device, config) if config.runner is None else []  # before minutes of pushing
    name = default_name(artifact, art)  # the folder's name, as push gives it
    pushed = push(art, device, PushConfig(dest=config.dest, name=name, ctx=config.ctx), progress=progress)
    remote_model = posixpath.join(pushed.remote_dir, art.model_file.name)
    if config.runner is not None:
        return _run_llama_bench(device, Path(config.runner), remote_model, pushed.remote_dir, art, config)
    return _run_edgekit(device, py, pushed.remote_dir, config)


def _remote_python(device: Device, config: RemoteProfileConfig) -> list[str]:
    """The interpreter (and its arguments) behind the edgekit script on the device (its shebang), checked to
    import edgekit's profiler; DeviceError saying what to install otherwise."""
    exe = config.remote_edgekit or getattr(getattr(device, "host", None), "remote_edgekit", None) or "edgekit"
    find = (f"p=$(command -v {shlex.quote(exe)}) || exit 3; py=$(head -1 \"$p\" | sed -n 's/^#!//p'); "
            "[ -n \"$py\" ] || exit 4; $py -c 'import edgekit.devices.remote_main' || exit 5; echo \"$py\"")
    r = device.run(find)
    py = shlex.split(r.stdout.strip().splitlines()[-1]) if r.rc == 0 and r.stdout.strip() else []
    if not py:
        why = {3: f"{exe} not found", 4: f"{exe} is not a Python script"}.get(
            r.rc, f"its Python cannot import edgekit: {r.output.splitlines()[-1] if r.output else r.rc}")
        raise DeviceError(f"edgekit is not usable on {device.id} ({why}); install it there (or give its path with "
                          "--remote-edgekit), or give --runner with a llama-bench built for the device")
    return py


def _run_edgekit(device: Device, py: list[str], remote_dir: str, config: RemoteProfileConfig) -> list[dict[str, Any]]:
    args = ["-m", "edgekit.devices.remote_main", remote_dir, "--tests", config.tests, "--reps", str(config.reps)]
    if config.threads:
        args += ["--threads", str(config.threads)]
    r = device.run(" ".join(shlex.quote(a) for a in [*py, *args]), timeout=None)
    if r.rc != 0:
        raise DeviceError(f"profiling on {device.id} failed: {r.output.splitlines()[-1] if r.output else r.rc}")
    return json.loads(r.stdout)["rows"]


def _llama_bench_args(tests: str, reps: int, threads: int | None) -> list[str]:
    from edgekit.runtime.profile_schema import parse_tests

    pp, tg, pg = [], [], []
    for t in parse_tests(tests):
        if t.n_depth:
            raise InputError("context depth (@dN) is not passed to llama-bench runners; drop it or profile with "
                             "edgekit on the device")
        (pg.append(f"{t.n_prompt},{t.n_gen}") if t.n_prompt and t.n_gen else
         pp.append(str(t.n_prompt)) if t.n_prompt else tg.append(str(t.n_gen)))
    args = ["-p", ",".join(pp) or "0", "-n", ",".join(tg) or "0", "-r", str(reps), "-o", "json"]
    for x in pg:
        args += ["-pg", x]
    return args + (["-t", str(threads)] if threads else [])


def _run_llama_bench(device: Device, runner: Path, model: str, remote_dir: str, art: Artifact,
                     config: RemoteProfileConfig) -> list[dict[str, Any]]:
    from edgekit.runtime.profile import artifact_info
    from edgekit.runtime.profile_schema import from_llama_bench

    remote_runner = upload_runner(device, runner, posixpath.join(posixpath.dirname(remote_dir), "bin"))
    cmd = " ".join(shlex.quote(a) for a in [remote_runner, "-m", model,
                                            *_llama_bench_args(config.tests, config.reps, config.threads)])
    r = device.run(cmd, timeout=None)
    if r.rc != 0:
        raise DeviceError(f"{runner.name} failed on {device.id}: {r.output.splitlines()[-1] if r.output else r.rc}")
    rows = [row.to_json() for row in from_llama_bench(json.loads(r.stdout), artifact_info(art))]
    for row in rows:  # llama-bench sizes each test's context to fit it exactly
        if row["config"].get("n_ctx") is None:
            row["config"]["n_ctx"] = row["n_prompt"] + row["n_gen"] + row["n_depth"]
    return rows


def upload_runner(device: Device, runner: Path, folder: str, wait_s: float = RUNNER_WAIT_S) -> str:
    """``runner`` in ``folder`` on the device, executable, sha256-verified; not sent again when the same
    file (size and sha256) is there already. Returns its path on the device. Two profiles uploading into one
    folder take turns (the push lock, pushlock.py): the second waits up to ``wait_s`` for the first, then finds
    the runner there; a lock still held after that is refused, naming who holds it."""
    from edgekit.devices.transfer import FilePush, _verify, partial_name
    from edgekit.hashing import sha256_file_cached

    remote = posixpath.join(folder, runner.name)
    size, sha = runner.stat().st_size, sha256_file_cached(runner)

    def there() -> bool:
        return device.file_size(remote) == size and device.sha256(remote) == sha

    if not there():
        device.makedirs(folder)
        lock, deadline = PushLock(device, folder), time.monotonic() + wait_s
        while True:
            try:
                lock.acquire()
                break
            except PushInProgress:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)
        try:
            if not there():  # the upload we waited for may have sent this very runner
                tmp = partial_name(remote, sha)
                device.remove(tmp)
                device.append_from(runner, tmp, 0, lambda n: None, None)
                _verify(device, tmp, FilePush(runner.name, size, sha))
                device.rename(tmp, remote)
        finally:
            lock.release()
    device.run(f"chmod 755 {shlex.quote(remote)}")
    return remote


__all__ = ["RemoteProfileConfig", "check_runner_abi", "elf_arch", "normalize_arch", "remote_profile", "upload_runner"]
