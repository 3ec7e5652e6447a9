"""Exit statuses of signals at the edges (QA s57).

B1: a closed terminal (SIGHUP from the kernel's hangup) exits 129, as the README's exit-code table says, although
stdout and stderr were that terminal and now fail every write (EIO): the hangup's line and Python's last flush
once ended it with "lost sys.stderr" (exit 1), and a GGUF chat with an abort (its worker left unclosed until
interpreter shutdown). The terminal is really closed (a pty's master), nothing is timed.

B2: a signal that lands once ``convert`` has said ``wrote ...`` keeps the command's status (0): the command's
result line is its last act, and nothing slow (an import) runs between it and the command being finished. The
signal is sent by the process to itself on the first import after that line, where the window was."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals and ptys")


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "EDGEKIT_HOME": str(tmp_path / "home"), "PYTHONWARNINGS": "ignore", "COLUMNS": "200",
            "TERM": "xterm"}


def _signals_by_default() -> None:
    """The child's signals as a terminal's login gives them: a suite run under nohup (or in the background)
    hands its children SIGHUP (SIGINT) ignored, which edgekit rightly keeps ignoring."""
    for name in ("SIGHUP", "SIGINT", "SIGTERM"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)


def _chat_then_close_the_terminal(tmp_path: Path, artifact: Path) -> int:
    """``edgekit run ARTIFACT`` on a pty; once it prompts, the terminal closes. Its exit status."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: a session of its own with the pty as its terminal (an SSH login, a window)
        try:
            os.chdir(tmp_path)
            _signals_by_default()
            os.execve(sys.executable, [sys.executable, "-m", "edgekit.cli", "run", str(artifact), "-n", "4",
                                       "--temp", "0"], _env(tmp_path))
        finally:
            os._exit(127)
    seen = b""
    deadline = time.monotonic() + 240
    try:
        while b">>> " not in seen:
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child's side closed, it ended before prompting
                    chunk = b""
                assert chunk, seen.decode(errors="replace")
                seen += chunk
    finally:
        os.close(fd)  # the terminal goes away: the kernel hangs it up and sends SIGHUP
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("still running 60 s after its terminal closed")
        time.sleep(0.05)


def test_a_gguf_chat_whose_terminal_closes_exits_129(tiny_gguf, tmp_path):
    assert _chat_then_close_the_terminal(tmp_path, tiny_gguf) == 128 + signal.SIGHUP  # not -6 (abort), not 1


def test_an_onnx_chat_whose_terminal_closes_exits_129(tiny_llama, tmp_path):
    pytest.importorskip("onnxruntime")
    from edgekit import api

    art = api.convert(tiny_llama, "onnx", output=tmp_path / "tiny-onnx", recipe=api.ConvertRecipe(bits=8)).path
    assert _chat_then_close_the_terminal(tmp_path, art) == 128 + signal.SIGHUP  # not 1 ("lost sys.stderr")


def test_kill_hup_with_the_terminal_open_still_says_its_line(tmp_path):
    """SIGHUP sent by hand, stderr a file that is still there: the line is said, not sent to /dev/null."""
    code = ("import functools, os, signal, sys; from edgekit.cli import main as m\n"
            "info = m.app.registered_callback; fn = info.callback\n"
            "info.callback = functools.wraps(fn)(lambda *a, **k: (os.kill(os.getpid(), signal.SIGHUP), fn(*a, **k)))\n"
            "sys.argv = ['edgekit', 'ls']; m.main()")
    res = subprocess.run([sys.executable, "-c", code], preexec_fn=_signals_by_default, capture_output=True, text=True, env=_env(tmp_path),
                         timeout=120, cwd=tmp_path)
    assert res.returncode == 129
    assert res.stderr == "error: hung up (SIGHUP); nothing half-written was kept\n", res.stderr


SIGNAL_ON_THE_FIRST_IMPORT_AFTER_WROTE = """
import os, signal, sys
from edgekit.cli import convert_cmd, main as m

said = convert_cmd.say

class SignalOnImport:
    def find_spec(self, name, path=None, target=None):
        sys.meta_path.remove(self)
        os.kill(os.getpid(), signal.SIG{sig})  # what the kernel would deliver then: handled right here
        return None

def say(console, message, tag="", style=""):
    said(console, message, tag, style)
    if tag == "wrote":  # the result line is out: anything the process imports from now on is the window
        sys.meta_path.insert(0, SignalOnImport())

convert_cmd.say = say
sys.argv = ["edgekit", *sys.argv[1:]]
m.main()
"""


@pytest.mark.parametrize("sig", ["TERM", "HUP", "INT"])
def test_a_signal_after_convert_said_wrote_keeps_status_0(tiny_llama, tmp_path, sig):
    out = tmp_path / "tiny-q8"
    res = subprocess.run([sys.executable, "-c", SIGNAL_ON_THE_FIRST_IMPORT_AFTER_WROTE.format(sig=sig), "convert",
                          str(tiny_llama), "--to", "gguf", "--bits", "8", "-o", str(out)],
                         preexec_fn=_signals_by_default, capture_output=True, text=True, env=_env(tmp_path), timeout=300, cwd=tmp_path)
    assert res.returncode == 0, (res.returncode, res.stderr)
    assert res.stdout.startswith(f"wrote {out}"), res.stdout
    assert "nothing half-written was kept" not in res.stderr and "interrupted" not in res.stderr, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    from edgekit.artifact import Artifact

    assert Artifact.open(out).model_file.stat().st_size > 0


SIGNAL_IN_THE_INTERPRETERS_TEARDOWN = """
import os, signal, sys
from edgekit.cli import main as m

class Last:
    def __del__(self):  # runs in the module teardown, after Python put its handlers back to the default
        os.kill(os.getpid(), signal.SIG{sig})

last = Last()
sys.argv = ["edgekit", *sys.argv[1:]]
m.main()
"""


@pytest.mark.parametrize("sig", ["TERM", "HUP", "INT"])
def test_a_signal_in_the_last_milliseconds_of_the_exit_keeps_the_status(tmp_path, sig):
    res = subprocess.run([sys.executable, "-c", SIGNAL_IN_THE_INTERPRETERS_TEARDOWN.format(sig=sig), "ls"],
                         preexec_fn=_signals_by_default, capture_output=True, text=True, env=_env(tmp_path), timeout=120, cwd=tmp_path)
    assert res.returncode == 0, (res.returncode, res.stderr)  # not -15 / -1 / -2: killed by it
