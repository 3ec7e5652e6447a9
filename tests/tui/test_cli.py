"""``edgekit tui`` / ``edgekit chat``: bad input fails in one line before the screen is taken over, and
``edgekit --help`` does not import Textual."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from edgekit.cli.main import app

runner = CliRunner()


def test_help_lists_the_commands_without_importing_textual():
    code = "import sys; from edgekit.cli.main import app; print('textual' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "tui" in result.output and "chat" in result.output


def test_chat_with_a_missing_artifact_is_one_line(tmp_path):
    result = runner.invoke(app, ["chat", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "does not exist; give an artifact folder" in result.output and "Traceback" not in result.output


def test_tui_refuses_a_bad_folder_and_screen(tmp_path):
    result = runner.invoke(app, ["tui", "--dir", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "is not a folder" in result.output
    result = runner.invoke(app, ["tui", "--screen", "settings"])
    assert result.exit_code == 2 and "choose chat, artifacts" in result.output


def test_tui_prints_where_a_profile_stopped_by_quitting_left_its_rows(tmp_path, monkeypatch, capsys):
    """The app's screen is gone when the note would matter: `edgekit tui` prints it, one line on stderr."""
    from edgekit.cli import tui_cmd
    from edgekit.tui.app import EdgekitApp

    note = "the profile stopped; its 2 row(s) are kept in the profile history, the run marked 'interrupted'"
    monkeypatch.setattr(tui_cmd, "refuse_without_terminal", lambda *a: None)
    monkeypatch.setattr(EdgekitApp, "run", lambda self: note)
    tui_cmd._run_app(tmp_path, None, "profile", 2048, None)
    assert capsys.readouterr().err == f"note: {note}\n"
    monkeypatch.setattr(EdgekitApp, "run", lambda self: None)  # nothing stopped: nothing said
    tui_cmd._run_app(tmp_path, None, "profile", 2048, None)
    assert capsys.readouterr().err == ""
