"""A SIGTERM or SIGHUP that lands once the command has finished (QA leftover): the command's outputs are whole,
so the process ends with the command's own status (0: the artifact asked for exists) and says nothing more,
instead of a silent 143 that read as "interrupted". One that lands before the command started, or while it
runs, still unwinds with its one line and 128 + the signal's number.

The signals here are either not sent at all (the CLI's handler is called as the kernel would call it) or sent
by the process to itself at a fixed point of its own code: nothing depends on timing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from edgekit.cli import ui
from edgekit.cli.ui import Terminated, handle_errors
from edgekit.errors import InputError


@pytest.fixture
def leave(monkeypatch):
    """The CLI's SIGTERM handler (``process.unwind_on_signals``), installed for the test and called directly;
    the handlers before it come back afterwards. No command has run yet in the process it pretends to be."""
    from edgekit.cli.process import unwind_on_signals

    monkeypatch.setattr(ui._Command, "status", None)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        unwind_on_signals()
        yield signal.getsignal(signal.SIGTERM)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_before_the_command_a_signal_unwinds(leave):
    with pytest.raises(Terminated) as exc:
        leave(signal.SIGTERM, None)
    assert exc.value.code == 143


def test_while_the_command_runs_a_signal_unwinds_with_its_line(leave, capsys):
    @handle_errors
    def job() -> None:
        leave(signal.SIGTERM, None)  # where the kernel would have run it, mid-command

    with pytest.raises(Terminated) as exc:
        job()
    assert exc.value.code == 143
    assert capsys.readouterr().err == "error: terminated (SIGTERM); nothing half-written was kept\n"
    assert ui.finished_status() == 143  # said and chosen: a second signal would not change it


def test_after_the_command_returned_a_signal_keeps_its_status_and_says_nothing(leave, tmp_path, capsys):
    artifact = tmp_path / "model.gguf"

    @handle_errors
    def job() -> None:
        assert ui.finished_status() is None  # running
        artifact.write_bytes(b"GGUF")

    job()
    assert ui.finished_status() == 0
    assert leave(signal.SIGTERM, None) is None  # absorbed: the process goes on out with status 0
    assert capsys.readouterr().err == "" and artifact.read_bytes() == b"GGUF"
    with pytest.raises(SystemExit) as exc:  # a second one: it is not leaving, so it leaves now, status kept
        leave(signal.SIGTERM, None)
    assert exc.value.code == 0 and not isinstance(exc.value, Terminated)


def test_after_the_command_failed_a_signal_keeps_the_failures_status(leave, capsys):
    @handle_errors
    def job() -> None:
        raise InputError("--ctx must be positive")

    with pytest.raises(typer.Exit):
        job()
    assert ui.finished_status() == InputError.exit_code
    leave(signal.SIGTERM, None)
    with pytest.raises(SystemExit) as exc:
        leave(signal.SIGTERM, None)
    assert exc.value.code == InputError.exit_code
    assert capsys.readouterr().err == "error: --ctx must be positive\n"  # its own line, and no other


def test_a_group_callback_is_not_the_end_of_the_command():
    """``edgekit cache clear``: the group's callback returns first; the command finishes with its subcommand. What
    a subcommand that is not itself wrapped sees (``peek``) is what the group's callback left: not finished, which
    needs Typer's own click context (it vendors one; the click package never had it)."""
    app = typer.Typer()
    seen = []

    @app.callback()
    @handle_errors
    def group() -> None:
        pass

    @app.command()
    @handle_errors
    def clear() -> None:
        seen.append(ui.finished_status())

    @app.command()
    def peek() -> None:
        seen.append(ui.finished_status())

    result = CliRunner().invoke(app, ["clear"])
    assert result.exit_code == 0, result.output
    assert seen == [None] and ui.finished_status() == 0
    result = CliRunner().invoke(app, ["peek"])
    assert result.exit_code == 0, result.output
    assert seen == [None, None]


# the installed CLI, with the signal sent by the process to itself at a fixed point

HOOK = """
import functools, os, signal, sys
from edgekit.cli import main as m

def then_signal(fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if {before}:
            os.kill(os.getpid(), signal.SIGTERM)
        fn(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # lands as the command returns: whatever it wrote is whole

    return call

info = {where}
info.callback = then_signal(info.callback)
sys.argv = ["edgekit", *sys.argv[1:]]
m.main()
"""


def _edgekit_with_signal(tmp_path: Path, *args: str, before: bool = False) -> subprocess.CompletedProcess:
    where = "m.app.registered_callback" if before else \
        "next(c for c in m.app.registered_commands if c.name == 'convert')"
    code = HOOK.format(before=before, where=where)
    env = {**os.environ, "EDGEKIT_HOME": str(tmp_path / "home"), "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)


def test_convert_terminated_as_it_returns_exits_0_with_its_artifact_whole(tiny_llama, tmp_path):
    out = tmp_path / "tiny-q8"
    res = _edgekit_with_signal(tmp_path, "convert", str(tiny_llama), "--to", "gguf", "--bits", "8", "-o", str(out))
    assert res.returncode == 0, (res.returncode, res.stderr)
    assert "terminated" not in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert res.stdout.startswith(f"wrote {out}"), res.stdout
    from edgekit.artifact import Artifact

    assert Artifact.open(out).model_file.stat().st_size > 0


def test_terminated_before_any_command_ran_says_so(tmp_path):
    res = _edgekit_with_signal(tmp_path, "ls", before=True)
    assert res.returncode == 143
    assert res.stderr == "error: terminated (SIGTERM); nothing half-written was kept\n", res.stderr
