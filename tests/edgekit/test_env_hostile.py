"""edgekit in hostile environments (QA report): an output encoding that cannot show every character, a
non-UTF-8 locale, warnings made errors (``-W error``), a working folder deleted under the shell,
EDGEKIT_DEBUG=0, ``python -m edgekit``, ``python -OO`` and a per-user thread limit. Each ends in one line that
says the fix, or works; never a traceback, never the work lost at its last line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tests.edgekit.test_cli_scripts import fake_artifact

EDGEKIT = str(Path(sys.executable).with_name("edgekit"))
runner = CliRunner()
NON_ASCII = "Mödel İSTANBUL ıi 日本 x"


def edgekit(*args: str, env: dict | None = None, cmd: list[str] | None = None, **kw) -> subprocess.CompletedProcess:
    """The installed CLI (or ``cmd``) as a script runs it: stdout and stderr pipes, in the environment the tests
    run in less the settings these tests vary, plus ``env``."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("PYTHONWARNINGS", "PYTHONIOENCODING", "PYTHONUTF8", "LC_ALL", "EDGEKIT_DEBUG", "COLUMNS")}
    base.update({"COLUMNS": "200"}, **(env or {}))
    kw.setdefault("capture_output", True)
    kw.setdefault("timeout", 180)
    return subprocess.run([*(cmd or [EDGEKIT]), *args], env=base, **kw)


def one_error_line(res: subprocess.CompletedProcess) -> str:
    err = res.stderr.decode("utf-8", "replace")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# 1. an output encoding that cannot show every character


def test_names_it_cannot_encode_are_escaped_not_fatal(tmp_path):
    fake_artifact(tmp_path / "lib" / "日本-gguf-q4")
    res = edgekit("ls", env={"EDGEKIT_MODELS": str(tmp_path / "lib"), "PYTHONIOENCODING": "ascii"})
    assert res.returncode == 0, res.stderr
    assert b"\\u65e5\\u672c-gguf-q4" in res.stdout  # escaped, so nothing is lost


@pytest.mark.llamacpp
def test_eval_results_survive_an_ascii_stdout(tiny_gguf):
    res = edgekit("eval", str(tiny_gguf), "--chunks", "1", "--ctx", "64", "--no-record",
                  env={"PYTHONIOENCODING": "ascii"})
    assert res.returncode == 0, res.stderr
    assert b"perplexity" in res.stdout and b"\\xb1" in res.stdout  # the ± column, escaped


def test_a_piped_prompt_is_read_as_utf8_whatever_the_encoding(tmp_path):
    missing = str(tmp_path / "nope")
    res = edgekit("run", missing, "-p", "-", input="héllo\n".encode(), env={"PYTHONIOENCODING": "ascii"})
    assert "does not exist" in one_error_line(res)  # the prompt was read; the missing model is the error
    res = edgekit("run", missing, "-p", "-", input=b"h\xe9llo\n", env={"PYTHONIOENCODING": "ascii"})
    assert "the prompt is not valid UTF-8 (byte 0xe9" in one_error_line(res) and res.returncode == 2


# 2. warnings made errors: edgekit's own notes stay notes


def test_edgekit_notes_are_not_fatal_under_pythonwarnings_error(tiny_llama, tmp_path):
    out = tmp_path / "out"
    res = edgekit("convert", str(tiny_llama), "--bits", "4", "--tensor-type", "zzz=q8_0", "-o", str(out),
                  env={"PYTHONWARNINGS": "error"})
    assert res.returncode == 0, res.stderr
    assert b"warning: --tensor-type 'zzz' matches no tensor" in res.stderr and (out / "edgekit.json").is_file()


def test_the_busy_cpu_note_is_shown_not_raised(monkeypatch):
    from edgekit.runtime import hostinfo

    monkeypatch.setattr(hostinfo, "_said", set())
    shown: list[str] = []

    def library_warn(note: str) -> None:  # as the llama.cpp backend's on_warning default does
        warnings.warn(note, RuntimeWarning, stacklevel=2)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.showwarning = lambda message, *a, **k: shown.append(str(message))
        hostinfo._say_once("2.0 of 2 CPUs are busy", None)
        hostinfo._say_once("1.5 of 2 CPUs are busy", library_warn)
    assert shown == ["2.0 of 2 CPUs are busy", "1.5 of 2 CPUs are busy"]


@pytest.mark.llamacpp
def test_eval_not_recorded_is_a_note_under_an_error_filter(tiny_gguf, monkeypatch):
    from edgekit import api
    from edgekit.artifact import Artifact
    from edgekit.errors import EdgekitWarning
    from edgekit.quickstart import sample_text_path

    def read_only(self, result):
        raise OSError(30, "Read-only file system", str(tiny_gguf / "edgekit.json"))

    monkeypatch.setattr(Artifact, "record_eval", read_only)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("error")
        res = api.evaluate(tiny_gguf, sample_text_path(), api.EvalConfig(ctx=64, chunks=1), n_threads=1)
    assert res.ppl > 0
    assert [w.category for w in seen] == [EdgekitWarning] and "not recorded" in str(seen[0].message)


def test_other_packages_warnings_follow_the_filters(capsys):
    from edgekit.cli.ui import handle_errors

    @handle_errors
    def command() -> None:
        warnings.warn_explicit("a cache was not written", UserWarning, "calibration.py", 1, module="edgekit.calibration")
        warnings.warn_explicit("TypedStorage is deprecated", UserWarning, "storage.py", 1, module="torch.storage")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(typer.Exit) as exc:
            command()
    err = capsys.readouterr().err
    assert exc.value.exit_code == 1 and "warning: a cache was not written" in err
    assert "error: UserWarning: TypedStorage is deprecated (a warning, made an error" in err and "internal" not in err

    with warnings.catch_warnings():  # an `ignore` the user put first still silences edgekit's notes
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message="a cache")
        with pytest.raises(typer.Exit):
            command()
    assert "a cache was not written" not in capsys.readouterr().err


# 3. the working folder was deleted


@pytest.mark.parametrize("args", [["ls", "--dir", "."], ["neurons", "../tiny"]], ids=["ls", "neurons"])
def test_a_deleted_working_folder_is_one_line(tmp_path, args):
    gone = tmp_path / "gone"
    gone.mkdir()
    res = edgekit(*args, cmd=["bash", "-c", f'cd "{gone}" && rmdir "{gone}" && exec "$0" "$@"', EDGEKIT])
    assert "the current folder no longer exists" in one_error_line(res) and res.returncode == 2


# 4. a locale that is not UTF-8


def test_a_utf8_prompt_in_the_c_locale(tmp_path):
    res = edgekit("run", str(tmp_path / "nope"), "-p", "héllo", env={"LC_ALL": "C", "PYTHONUTF8": "0"})
    assert "does not exist" in one_error_line(res)  # not "the prompt is not valid UTF-8"


@pytest.mark.parametrize("locale", ["C", "en_US.ISO-8859-1"])
def test_convert_a_non_ascii_folder_in_a_non_utf8_locale(tiny_llama, tmp_path, locale):
    if locale != "C" and "en_US.iso88591" not in subprocess.run(["locale", "-a"], capture_output=True, text=True).stdout:
        pytest.skip("the en_US.ISO-8859-1 locale is not installed (localedef -i en_US -f ISO-8859-1 en_US.ISO-8859-1)")
    import shutil

    src = tmp_path / NON_ASCII
    shutil.copytree(tiny_llama, src)
    res = edgekit("convert", NON_ASCII, "--bits", "4", "-o", "日本-q4", cwd=tmp_path,
                  env={"LC_ALL": locale, "PYTHONUTF8": "0"})
    assert res.returncode == 0, res.stderr.decode("utf-8", "replace")
    assert (tmp_path / "日本-q4" / "edgekit.json").is_file()


def test_utf8_mode_keeps_argv_bytes_and_interpreter_options(tmp_path):
    lib = os.fsencode(tmp_path) + "/日本".encode() + b"\xff"
    fake_artifact(Path(os.fsdecode(lib)) / "g4")
    res = edgekit("-W", "error", "-m", "edgekit.cli", "ls", "--json", "--dir", os.fsdecode(lib), cmd=[sys.executable],
                  env={"LC_ALL": "C", "PYTHONUTF8": "0"})
    assert res.returncode == 0, res.stderr
    assert os.fsencode(json.loads(res.stdout.decode("utf-8"))["dir"]) == lib  # the same bytes, decoded as UTF-8


# 5. EDGEKIT_DEBUG


@pytest.mark.parametrize("value", ["0", "false", "no", ""])
def test_edgekit_debug_off_values(monkeypatch, value):
    from edgekit.cli.ui import handle_errors

    monkeypatch.setenv("EDGEKIT_DEBUG", value)

    @handle_errors
    def command() -> None:
        raise RuntimeError("boom")

    with pytest.raises(typer.Exit):  # one line, not the traceback
        command()


def test_edgekit_debug_shows_an_os_errors_traceback(monkeypatch):
    from edgekit.cli import process

    for step in ("ensure_utf8_mode", "unwind_on_signals", "std_streams_for_scripts", "text_streams_for_any_text"):
        monkeypatch.setattr(process, step, lambda: None)

    def command() -> None:
        raise PermissionError(13, "Permission denied", "/x")

    monkeypatch.setenv("EDGEKIT_DEBUG", "1")
    with pytest.raises(PermissionError):
        process.run(command)
    monkeypatch.setenv("EDGEKIT_DEBUG", "0")
    with pytest.raises(SystemExit):
        process.run(command)


# 6, 7. python -m edgekit, python -OO


def test_python_m_edgekit_cli_is_the_cli():
    res = edgekit("-m", "edgekit.cli", "--version", cmd=[sys.executable])
    assert res.returncode == 0 and res.stdout == edgekit("--version").stdout, res.stderr


def test_command_help_under_python_oo():
    res = edgekit(EDGEKIT, "--help", cmd=[sys.executable, "-OO"])
    assert res.returncode == 0, res.stderr
    assert b"Generate a reply" in res.stdout and b"Convert a checkpoint" in res.stdout


# 8. the per-user thread limit (ulimit -u)


def test_the_thread_limit_is_said_not_called_an_interruption(monkeypatch, capsys):
    from edgekit.cli.ui import handle_errors

    @handle_errors
    def blas_at_the_limit() -> None:  # OpenBLAS raises SIGINT when it cannot start its threads
        raise KeyboardInterrupt

    @handle_errors
    def python_at_the_limit() -> None:
        raise RuntimeError("can't start new thread")

    with pytest.raises(typer.Exit) as exc:
        blas_at_the_limit()
    assert exc.value.exit_code == 130 and "interrupted" in capsys.readouterr().err  # threads start: a real Ctrl-C

    def refused(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refused)
    for command in (blas_at_the_limit, python_at_the_limit):
        with pytest.raises(typer.Exit) as exc:
            command()
        err = capsys.readouterr().err
        assert exc.value.exit_code == 1 and "error: the limit on processes and threads" in err and "ulimit -u" in err
