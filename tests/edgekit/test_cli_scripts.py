"""edgekit from shell scripts, CI jobs and pipes: plain JSON whatever the colour settings, tables never cut,
no terminal app without a terminal, a closed pipe or stream, signals, names, exit codes (QA report qa52/a).

Most run the installed ``edgekit`` as a script would, with stdout a pipe and the environment given
explicitly (COLUMNS, FORCE_COLOR), so nothing depends on the terminal the tests run in."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app

EDGEKIT = str(Path(sys.executable).with_name("edgekit"))
LONG = "smollm2-135m-instruct-finetuned-on-my-data-v2-gguf-q4_k_m"
runner = CliRunner()


def fake_artifact(folder: Path, size: int = 912_345) -> Path:
    """An artifact folder `ls` lists (a manifest and a model file of the recorded size); nothing runs it."""
    folder.mkdir(parents=True)
    manifest = {"schema": "edgekit.artifact/1", "format": "gguf", "preset": "Q4_K_M", "bpw": 4.92,
                "created": "2026-01-02T03:04:05+00:00", "source": {"path": "/x/SmolLM2-135M"},
                "files": {"model": "model.gguf"}, "size_bytes": size}
    (folder / "edgekit.json").write_text(json.dumps(manifest))
    with open(folder / "model.gguf", "wb") as f:
        f.truncate(size)
    return folder


@pytest.fixture
def library(tmp_path) -> Path:
    lib = tmp_path / "lib"
    fake_artifact(lib / LONG)
    fake_artifact(lib / "g4")
    return lib


def edgekit(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """The installed CLI with stdout and stderr pipes (not a terminal), at a known width, without colours
    forced unless ``env`` says so."""
    base = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR", "COLUMNS")}
    base.update({"COLUMNS": "80", "PYTHONWARNINGS": "ignore"}, **(env or {}))
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("timeout", 120)
    return subprocess.run([EDGEKIT, *args], env=base, **kw)


# 1. --json is plain JSON whatever FORCE_COLOR / TTY_COMPATIBLE say


@pytest.mark.parametrize("force", [{"FORCE_COLOR": "1"}, {"TTY_COMPATIBLE": "1"}, {}], ids=["FORCE_COLOR", "TTY_COMPATIBLE", "plain"])
def test_json_is_plain_json_whatever_the_colour_settings(library, force):
    res = edgekit("ls", "--json", env={"EDGEKIT_MODELS": str(library), **force})
    assert res.returncode == 0, res.stderr
    assert b"\x1b" not in res.stdout
    data = json.loads(res.stdout)
    assert sorted(a["name"] for a in data["artifacts"]) == sorted(["g4", LONG])
    assert res.stdout.endswith(b"}\n")


def test_registry_json_is_plain_under_force_color():
    res = edgekit("registry", "--json", env={"FORCE_COLOR": "1"})
    assert res.returncode == 0, res.stderr
    assert b"\x1b" not in res.stdout and "gguf" in json.loads(res.stdout)["formats"]


def test_print_json_writes_plain_utf8_and_escapes_undecodable_path_bytes(monkeypatch):
    from edgekit.cli import ui

    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="utf-8"))
    path = os.fsdecode(b"/tmp/lib\xff/\xc3\xa9t\xc3\xa9")  # an undecodable byte, and a decodable é
    ui.print_json({"dir": path, "n": 1})
    text = raw.getvalue().decode("utf-8")  # valid UTF-8
    assert "\\udcff" in text and "été" in text and "\ufffd" not in text
    assert os.fsencode(json.loads(text)["dir"]) == b"/tmp/lib\xff/\xc3\xa9t\xc3\xa9"  # the real path back


# 8. paths a script can reuse


def test_ls_json_paths_are_absolute_with_a_relative_library(library, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative EDGEKIT_MODELS is refused (it moves with the cwd); --dir may be
    res = runner.invoke(app, ["ls", "--dir", "lib", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["dir"] == str(library.resolve())
    assert {a["path"] for a in data["artifacts"]} == {str(library.resolve() / "g4"), str(library.resolve() / LONG)}


def test_ls_json_keeps_the_real_bytes_of_a_non_utf8_library_path(tmp_path):
    lib = os.fsencode(tmp_path) + b"/lib\xff"
    fake_artifact(Path(os.fsdecode(lib)) / "g4")
    res = edgekit("ls", "--json", env={"EDGEKIT_MODELS": os.fsdecode(lib)})
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout.decode("utf-8"))
    assert os.fsencode(data["dir"]) == lib
    assert os.fsencode(data["artifacts"][0]["path"]) == lib + b"/g4"


# 2. tables never cut a name or a number


def rows_of(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "│" in ln or "┃" in ln]


@pytest.mark.parametrize("columns", ["40", "50", "80"])
def test_ls_piped_prints_every_name_and_number_whole_on_one_line(library, columns):
    res = edgekit("ls", env={"EDGEKIT_MODELS": str(library), "COLUMNS": columns})
    assert res.returncode == 0, res.stderr
    text = res.stdout.decode()
    line = [ln for ln in text.splitlines() if LONG in ln]  # `edgekit ls | grep NAME` finds it
    assert len(line) == 1, text
    cells = [c.strip() for c in line[0].strip("│").split("│")]
    assert cells[:6] == [LONG, "gguf", "Q4_K_M", "0.9", "4.92", "2026-01-02"], text
    assert text.splitlines()[0] == str(library)  # the title: its own line, no padding
    assert not any(ln != ln.rstrip() for ln in text.splitlines()), text


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_narrow_terminal_does_not_cut_the_key_columns():
    from rich.console import Console
    from rich.table import Table

    from edgekit.cli.ui import print_table

    table = Table(title="lib")
    for i, col in enumerate(("name", "MB", "created", "perplexity on")):
        last = col == "perplexity on"
        table.add_column(col, no_wrap=not last, min_width=None if last else len([LONG, "912.3", "2026-01-02"][i]))
    table.add_row(LONG, "912.3", "2026-01-02", "19.64 valid.txt 16x512")
    console = Console(file=Tty(), width=40, force_terminal=True, color_system=None)
    print_table(console, table)
    text = console.file.getvalue()
    assert any(LONG in ln and "912.3" in ln and "2026-01-02" in ln for ln in text.splitlines()), text


def fake_eval():
    return SimpleNamespace(ppl=841.4746, ppl_stderr=64.7856, ref_ppl=None, kl_mean=None, kl_p99=None,
                           top1_agreement=None, tokens_scored=255,
                           provenance=lambda: "sample.txt sha256:9734714c, 1 chunk x 512")


@pytest.mark.parametrize("console_file", [io.StringIO, Tty], ids=["piped", "terminal"])
def test_eval_table_keeps_its_figures_whole_at_50_columns(console_file):
    from rich.console import Console

    from edgekit.cli.render import eval_table
    from edgekit.cli.ui import print_table

    console = Console(file=console_file(), width=50, color_system=None)
    print_table(console, eval_table(Path("g4"), fake_eval()))
    text = console.file.getvalue()
    assert any("841.4746" in ln and "64.7856" in ln for ln in rows_of(text)), text


# 3. the terminal app refuses to start without a terminal


def test_tui_without_a_terminal_says_to_use_run(tmp_path):
    res = edgekit("tui", "--dir", str(tmp_path), stdin=subprocess.DEVNULL, timeout=60)
    err = res.stderr.decode()
    assert res.returncode == 2, err
    assert err.count("\n") == 1 and "needs a terminal" in err and "edgekit run ARTIFACT -p TEXT" in err
    assert b"\x1b" not in res.stdout + res.stderr


# 4. a reader that goes away: quiet, status 141


def closed_pipe_run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    r, w = os.pipe()
    os.close(r)  # the reader is gone before edgekit writes a byte
    try:
        return edgekit(*args, env=env, stdout=w)
    finally:
        os.close(w)


@pytest.mark.parametrize("args", [["ls", "--json"], ["ls"], ["--help"], ["registry"]], ids=" ".join)
def test_a_closed_pipe_exits_141_and_says_nothing(library, args):
    res = closed_pipe_run(*args, env={"EDGEKIT_MODELS": str(library)})
    assert res.returncode == 141, res.stderr
    assert res.stderr == b""


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error():
    import typer

    from edgekit.cli.ui import handle_errors

    @handle_errors
    def job() -> None:
        raise BrokenPipeError(32, "Broken pipe")  # a worker's or a device's pipe: stdout is fine

    with pytest.raises(typer.Exit) as exc:
        job()
    assert exc.value.exit_code == 1


# 5. closed stdin and closed stdout


def test_run_with_a_closed_stdin_is_an_empty_stdin(tmp_path):
    res = subprocess.run(["bash", "-c", f'exec "{EDGEKIT}" run "{tmp_path / "nope"}" -n 4 <&-'],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: stdin is empty: pipe the prompt in") and "Traceback" not in res.stderr


@pytest.mark.parametrize("args", [["ls", "--json"], ["ls"], ["--help"]], ids=" ".join)
def test_a_closed_stdout_is_one_error_line(library, args):
    res = subprocess.run(["bash", "-c", f'exec "{EDGEKIT}" {" ".join(args)} >&-'], capture_output=True, text=True,
                         env={**os.environ, "EDGEKIT_MODELS": str(library)}, timeout=120)
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith("error: stdout is closed") and res.stderr.count("\n") == 1, res.stderr


# 6. SIGTERM / SIGHUP say so, as Ctrl-C does


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_ends_a_command_with_one_line_like_ctrl_c(sig):
    code = ("import signal, time\nsignal.signal(signal.SIGHUP, signal.SIG_DFL)\n"
            "from edgekit.cli.process import unwind_on_signals\nunwind_on_signals()\n"
            "from edgekit.cli.ui import handle_errors\n"
            "@handle_errors\ndef job():\n    print('ready', flush=True)\n    time.sleep(60)\njob()\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(sig)
    assert p.wait(30) == 128 + sig
    what = "terminated (SIGTERM)" if sig == signal.SIGTERM else "hung up (SIGHUP)"
    assert p.stderr.read() == f"error: {what}; nothing half-written was kept\n"


def test_a_signal_line_says_what_a_command_kept_and_is_said_once(capsys):
    from edgekit.cli.ui import Terminated, handle_errors

    @handle_errors
    def job() -> None:
        exc = Terminated(signal.SIGTERM)
        exc.add_note("the device is as it was")  # as push says
        raise exc

    outer = handle_errors(job)  # nested: still one line
    with pytest.raises(SystemExit) as exc:
        outer()
    assert exc.value.code == 143
    assert capsys.readouterr().err == "error: terminated (SIGTERM); the device is as it was\n"


# 7. names of models in other scripts


def test_artifact_names_keep_letters_of_other_scripts():
    from edgekit.library import artifact_name

    assert artifact_name("日本", "gguf-Q8_0") == "日本-gguf-q8_0"
    assert artifact_name("中文", "gguf-Q8_0") == "中文-gguf-q8_0"  # no longer the same name as 日本's
    assert artifact_name("Mödel 日本", "gguf-Q8_0") == "model-日本-gguf-q8_0"
    assert artifact_name("Ωmega", "x") == "ωmega-x"  # lower case
    assert artifact_name("हिंदी", "x") == "हिंदी-x"  # vowel signs stay with their letters
    assert artifact_name("Ｆｕｌｌ", "x") == "full-x"  # NFKC: full-width letters are ASCII ones
    # accented Latin letters are still folded to ASCII, and anything else is still a dash
    assert artifact_name("mödel é", "gguf-Q8_0") == "model-e-gguf-q8_0"
    assert artifact_name("My Model (v2) ★", "gguf-Q4_0") == "my-model-v2-gguf-q4_0"
    assert artifact_name("../..", "x") == "x" and artifact_name("★") == "model"


# 9. the README's exit codes are the ones edgekit uses


def test_readme_lists_every_exit_code():
    import edgekit.errors as errors

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    listed = {int(n) for row in re.findall(r"^\| ([\d /]+) \|", section, re.M) for n in row.split("/")}
    used = {cls.exit_code for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.EdgekitError)}
    assert used | {0, 1, 129, 130, 137, 141, 143} <= listed, listed
    assert "OOM" in section and "MemoryError" in section


# with a real (tiny) model: run, chat and serve


def test_chat_without_a_terminal_says_to_use_run(tiny_gguf):
    res = edgekit("chat", str(tiny_gguf), stdin=subprocess.DEVNULL, timeout=60)
    err = res.stderr.decode()
    assert res.returncode == 2, err
    assert err.count("\n") == 1 and f"edgekit run {tiny_gguf} -p TEXT" in err and "-p -" in err


@pytest.mark.llamacpp
def test_run_json_names_the_resolved_artifact(tiny_gguf, tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copytree(tiny_gguf, lib / "tiny")
    res = edgekit("run", "tiny", "-p", "hi", "-n", "2", "--json", env={"EDGEKIT_MODELS": str(lib), "FORCE_COLOR": "1"},
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["artifact"] == str((lib / "tiny").resolve())


@pytest.mark.llamacpp
@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["stream", "json"])
def test_run_into_a_closed_pipe_exits_141_quietly(tiny_gguf, json_flag):
    res = closed_pipe_run("run", str(tiny_gguf), "-p", "hi", "-n", "8", "--temp", "0", *json_flag)
    assert res.returncode == 141, res.stderr
    assert b"error" not in res.stderr and b"Broken pipe" not in res.stderr and b"Exception" not in res.stderr


@pytest.mark.llamacpp
def test_serve_stopped_by_sigterm_says_stopped_once_and_nothing_else(tiny_gguf):
    p = subprocess.Popen([EDGEKIT, "serve", str(tiny_gguf), "--port", "0"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        for _ in range(50):
            if "serving" in p.stderr.readline():
                break
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 143
        rest = p.stderr.read()
    finally:
        p.kill()
        p.wait()
    assert rest.count("stopped; every model unloaded") == 1 and "terminated" not in rest, rest


def test_json_commands_show_progress_to_a_person_not_to_a_script(monkeypatch):
    """QA s52: `quickstart --diffusion --json` sat silent for minutes in a terminal; in a pipe it stays quiet."""
    import io

    from edgekit.cli import ui

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    assert ui.progress_unless_piped(True) and ui.progress_unless_piped(False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not ui.progress_unless_piped(True) and ui.progress_unless_piped(False)
