"""User and model text reaches the terminal as text: paths, names and model output with brackets print as
themselves (never read as rich or Textual markup), and a crashed runtime is one line.

The CLI runs as a real process (its console script), so these see what a user sees: stderr, exit code,
line count at a pipe's width.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from edgekit.cli import ui

MARKUP = "x[/bold]y [ios] [red]"


def _edgekit(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("edgekit")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from edgekit.cli.main import main; main()"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "80", **(env or {})})


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in r.stderr and "MarkupError" not in r.stderr
    return lines[0]


def test_fail_prints_brackets_on_one_line(monkeypatch: pytest.MonkeyPatch):
    buf = io.StringIO()
    monkeypatch.setattr(ui, "err", Console(file=buf, width=40))
    message = f"cannot open {MARKUP}; install it with: pip install 'edgekit[ios]' and try again"
    exit_ = ui.fail(message, 5)
    assert exit_.exit_code == 5
    assert buf.getvalue() == f"error: {message}\n"  # no markup eaten, no wrap at 40 columns


def test_convert_of_a_missing_path_with_markup(tmp_path: Path):
    missing = tmp_path / MARKUP
    r = _edgekit("convert", str(missing))
    assert r.returncode == 2
    assert _one_error_line(r) == (f"error: {missing} does not exist; give a Hugging Face model folder "
                                  "(config.json + *.safetensors)")


def test_inspect_of_a_path_with_brackets(tmp_path: Path, tiny_gguf: Path):
    r = _edgekit("inspect", str(tmp_path / "m[/bold].gguf"))
    assert r.returncode == 2 and f"{tmp_path / 'm[/bold].gguf'} does not exist" in _one_error_line(r)
    folder = tmp_path / "[ios] models [/bold]"
    shutil.copytree(tiny_gguf, folder)
    r = _edgekit("inspect", str(folder), env={"COLUMNS": "300"})
    assert r.returncode == 0, r.stderr
    assert any(line.split() == ["file", *str(folder / "model.gguf").split()] for line in r.stdout.splitlines())


def test_convert_writes_to_an_output_with_brackets(tiny_llama: Path, tmp_path: Path):
    out = tmp_path / f"out {MARKUP}"
    r = _edgekit("convert", str(tiny_llama), "--type", "Q8_0", "-o", str(out))
    assert r.returncode == 0, r.stderr
    wrote = [line for line in r.stdout.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 1 and wrote[0].startswith(f"wrote {out}  (") and (out / "edgekit.json").exists()


@pytest.mark.llamacpp
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_a_crashed_worker_is_one_warning_and_one_error_line(tiny_gguf: Path):
    from edgekit.runtime import llamacpp_build

    data = Path(__file__).parents[1] / "runtime" / "data" / "cpuinfo-epyc-avx2.txt"
    # the worker process is killed by a real SIGSEGV as it starts, in safe CPU mode too
    r = _edgekit("run", str(tiny_gguf), "-p", "hi", "-n", "2", "-t", "1",  # -t 1: no busy-CPU note on a shared machine
                 env={llamacpp_build.WRAPPER_ENV: "sh -c 'kill -SEGV $$' --", llamacpp_build.CPUINFO_ENV: str(data)})
    assert r.returncode == 7, r.stderr
    warning, error = r.stderr.splitlines()
    shown = f"{tiny_gguf.name}/model.gguf"  # the artifact's folder says which one (every file is model.gguf)
    assert warning.startswith(f"warning: llama.cpp crashed (SIGSEGV) while loading ({shown}); ")
    assert warning.endswith("retrying once in safe CPU mode (slower)")
    assert error.startswith(f"error: llama.cpp crashed (SIGSEGV) while loading ({shown}) (also in safe CPU mode); ")
    for line in (warning, error):
        assert "EDGEKIT_LLAMACPP_LOG=1" in line and "--rebuild-llama" in line and "--safe-cpu" not in line


# --- the TUI: Textual widgets parse markup in str too --------------------------------------------------


@pytest.mark.anyio
@pytest.mark.llamacpp
@pytest.mark.skipif(importlib.util.find_spec("textual") is None or importlib.util.find_spec("llama_cpp") is None,
                    reason="needs textual and llama-cpp-python")
async def test_tui_shows_markup_like_names_and_model_output(tiny_gguf: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    from textual.widgets._data_table import default_cell_formatter

    from edgekit.tui.app import EdgekitApp
    from edgekit.tui.widgets.chat import ChatMessage
    from tests.tui.conftest import wait_for

    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    name = "tiny [bold]q8 [ios]"  # a folder name cannot hold "/", so no closing tag here
    shutil.copytree(tiny_gguf, tmp_path / "models" / name)
    app = EdgekitApp(folder=tmp_path / "models", backend_options={"n_ctx": 256, "n_threads": 2})
    async with app.run_test(size=(120, 30)) as pilot:
        screen = app.get_screen("artifacts")
        await wait_for(pilot, lambda: len(screen.rows) == 1, what="the artifact in the list")
        await pilot.pause()
        cell = screen.query_one("#artifacts-table").get_row_at(0)[0]
        assert default_cell_formatter(cell).plain == name  # what the table draws
        await pilot.press("c")
        chat = app.get_screen("chat")
        await wait_for(pilot, lambda: chat.session is not None and chat.session.backend is not None
                       and not chat.busy, what="the chat to open")
        assert name in str(chat.query_one("#chat-title").render())
        chat.query_one("#s-max_tokens").value = "2"
        chat.query_one("#chat-input").value = f"say {MARKUP}"
        chat.query_one("#chat-input").focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: not chat.busy and chat.last_stats is not None, what="the reply")
        user, reply = list(chat.query(ChatMessage))
        assert str(user.query_one(".body").render()) == f"say {MARKUP}"
        await reply.append(f" {MARKUP} [/]")  # as streamed model output would
        reply.mark(MARKUP)
        await pilot.pause()
        assert reply.content.endswith(f" {MARKUP} [/]") and MARKUP in str(reply.query_one(".role").render())
        app.notify(f"wrote {MARKUP}", markup=False)
        await pilot.pause()
