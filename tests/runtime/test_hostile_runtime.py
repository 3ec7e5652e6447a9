"""The llama.cpp worker in hostile environments: a full temporary folder, a broken EDGEKIT_LLAMACPP_WRAPPER, and a
process/thread limit (ulimit -u). Each is one line that names the cause and the fix, never a crash report
with rebuild advice, a retry or a Python traceback."""

from __future__ import annotations

import errno
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

if importlib.util.find_spec("llama_cpp") is None:  # (not imported here: only the worker loads it)
    pytest.skip("llama-cpp-python is not installed", allow_module_level=True)

from edgekit.errors import BackendError, DiskFullError, InputError  # noqa: E402
from edgekit.runtime import _llamacpp_process, llamacpp_build  # noqa: E402
from edgekit.runtime.llamacpp import LlamaCppBackend  # noqa: E402

pytestmark = pytest.mark.llamacpp


def _open(art: Path, **kwargs) -> LlamaCppBackend:
    return LlamaCppBackend(art / "model.gguf", n_ctx=256, n_threads=1, **kwargs)


def _workers_left() -> list[int]:
    """Live llama.cpp worker processes started by this test process."""
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)
            if p.status() != psutil.STATUS_ZOMBIE and "_llamacpp_worker" in " ".join(p.cmdline())]


# -- a full temporary folder ------------------------------------------------------------------------------------


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -rm` (user namespaces) to mount a small tmpfs")
def test_eval_with_a_full_tmp_names_the_folder_not_a_crash(tiny_gguf, tmp_path):
    """A 64 kB /tmp: the worker's memory-mapped logits file faulted (SIGBUS) on its first unbacked page, which
    read as a llama.cpp crash, was retried in safe CPU mode and ended in advice to rebuild llama-cpp-python."""
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    small = tmp_path / "small"
    small.mkdir()
    edgekit = Path(sys.executable).with_name("edgekit")
    script = (f'mount -t tmpfs -o size=64k tmpfs "{small}" && exec "{edgekit}" eval "{tiny_gguf}" '
              f'--text "{text}" --no-record -t 1')
    env = {**os.environ, "TMPDIR": str(small), "EDGEKIT_HOME": str(tmp_path / "home")}
    res = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env,
                         timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith(("error", "warning: llama.cpp"))]
    assert res.returncode == DiskFullError.exit_code, res.stderr
    said = (rf"error: the temporary folder {re.escape(str(small))} is full: no room for the [\d.]+ \w+ of logits, "
            r"[\d.]+ \w+ free; free space there or set TMPDIR to a folder with room")
    assert len(lines) == 1 and re.fullmatch(said, lines[0]), res.stderr
    assert "crash" not in res.stderr and "rebuild" not in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_a_sigbus_with_the_temp_folder_full_is_a_full_disk_and_no_retry(tiny_gguf, monkeypatch):
    """Should a mapped array still fault (a filesystem that cannot reserve blocks), a SIGBUS while the temporary
    folder's filesystem is full says so; it is not retried in safe CPU mode."""
    warned: list[str] = []
    backend = _open(tiny_gguf, on_warning=warned.append)
    try:
        folder = backend._tempdir()
        real = shutil.disk_usage

        def full(path):
            usage = real(path)
            return usage._replace(free=4096) if str(path).startswith(folder) else usage

        monkeypatch.setattr(shutil, "disk_usage", full)
        os.kill(backend.pid, signal.SIGBUS)
        with pytest.raises(DiskFullError, match=r"temporary folder .* filled up .*TMPDIR"):
            backend.logits([1, 2, 3])
        assert warned == []
    finally:
        backend.close()


def test_a_temporary_folder_that_cannot_be_made_names_tmpdir(tiny_gguf, tmp_path, monkeypatch):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    backend = _open(tiny_gguf)
    try:
        monkeypatch.setattr("tempfile.tempdir", str(not_a_folder))
        with pytest.raises(InputError, match=rf"temporary folder {not_a_folder} .*set TMPDIR"):
            backend.logits([1, 2, 3])
    finally:
        backend.close()


def test_the_worker_reserves_its_array_and_says_which_folder_is_full(tmp_path, monkeypatch):
    """The worker side: no room for the array is one line naming the folder, and no partial file is left."""
    from edgekit.runtime._llamacpp_measure import TempSpaceError, open_npy

    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    work = tmp_path / "edgekit-llamacpp-x"
    work.mkdir()
    with pytest.raises(TempSpaceError, match=rf"^the temporary folder {tmp_path} is full: no room for the 4\.0 MB "
                                             r"of logits, .* free; .*set TMPDIR"):
        open_npy(str(work / "logits-1.npy"), (1000, 1000), "logits")
    assert list(work.iterdir()) == []


# -- EDGEKIT_LLAMACPP_WRAPPER ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("wrapper", "says"), [
    ("sh -c 'x", r"EDGEKIT_LLAMACPP_WRAPPER=\"sh -c 'x\" is not a command line \(no closing quotation\)"),
    ("nonexistent-cmd-xyz", r"EDGEKIT_LLAMACPP_WRAPPER: the program 'nonexistent-cmd-xyz' is not found"),
])
def test_a_broken_wrapper_is_named(tiny_gguf, monkeypatch, wrapper, says):
    """Was "internal error: ValueError: No closing quotation" and "No such file or directory (nonexistent-cmd)"."""
    monkeypatch.setenv(llamacpp_build.WRAPPER_ENV, wrapper)
    with pytest.raises(InputError, match=says):
        _open(tiny_gguf)


# -- the process/thread limit (ulimit -u) ---------------------------------------------------------------------------


def test_a_refused_reader_thread_is_the_process_limit_and_leaves_no_worker(tiny_gguf, monkeypatch):
    """Was "internal error: RuntimeError: cannot join thread before it is started" (close() joined a thread whose
    start had failed)."""

    class LimitedThread(threading.Thread):
        started = 0

        def start(self) -> None:
            if LimitedThread.started >= 1:
                raise RuntimeError("can't start new thread")
            LimitedThread.started += 1
            super().start()

    fake = types.SimpleNamespace(**{**vars(threading), "Thread": LimitedThread})
    before = set(_workers_left())  # other tests' backends this process still holds are not this call's
    monkeypatch.setattr(_llamacpp_process, "threading", fake)
    with pytest.raises(BackendError, match=r"reader threads: the system refused a new process or thread.*ulimit -u"):
        _open(tiny_gguf)
    assert set(_workers_left()) <= before


def test_a_refused_fork_is_the_process_limit(tiny_gguf, monkeypatch):
    def refused(*args, **kwargs):
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(subprocess, "Popen", refused)
    monkeypatch.setattr("resource.getrlimit", lambda which: (4, 4))
    with pytest.raises(BackendError, match=r"worker process: .*\(ulimit -u, now 4\) is likely reached"):
        _open(tiny_gguf)


def test_a_worker_that_cannot_start_a_thread_is_the_process_limit_not_a_crash(tiny_gguf, monkeypatch):
    """The worker's own thread refused (Python's message on its stderr, exit 1) was "the llama.cpp worker exited
    unexpectedly ... rerun with EDGEKIT_LLAMACPP_LOG=1"."""
    monkeypatch.setenv(llamacpp_build.WRAPPER_ENV,
                       "sh -c 'echo \"RuntimeError: can'\\''t start new thread\" >&2; exit 1' --")
    with pytest.raises(BackendError, match=r"could not start a thread while loading: .*process.* limit") as info:
        _open(tiny_gguf)
    assert "exited unexpectedly" not in str(info.value)
