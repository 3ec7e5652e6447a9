"""Progress where stderr is not a terminal (a log file, CI): quiet for short jobs, plain lines for long ones."""

from __future__ import annotations

import pytest

from edgekit.cli import ui


def test_a_long_job_prints_its_phases_to_a_log(monkeypatch, capsys):
    clock = iter([0.0, 1.0, 11.0, 12.0, 13.0, 14.0, 50.0]).__next__  # start, then one reading per update
    monkeypatch.setattr("time.monotonic", clock)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    with ui.progress_bar() as progress:
        progress("loading: model", 0, 3)          # 1 s: quiet
        progress("layer 1/2: calibrating", 1, 3)  # 11 s: past the quiet start, a new phase
        progress("layer 1/2: rounding", 1, 3)     # 12 s: the same phase, too soon
        progress("layer 2/2: calibrating", 2, 3)  # 13 s: another layer, the same phase (QA s55b)
        progress("output head", 2, 3)             # 14 s: a new phase
        progress("output head", 3, 3)             # 50 s: the same phase, but 30 s on
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["layer 1/2: calibrating (1/3, 11 s)", "output head (2/3, 14 s)", "output head (3/3, 50 s)"]


def test_a_short_job_prints_nothing(capsys):
    with ui.progress_bar() as progress:
        for i in range(100):
            progress("step", i, 100)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("notes", "line"), [
    ((), "error: interrupted; nothing half-written was kept"),
    (("the partial file stays on the device: pushing again resumes it",),
     "error: interrupted; the partial file stays on the device: pushing again resumes it"),
])
def test_ctrl_c_says_what_was_kept_without_contradicting_itself(capsys, notes, line):
    import typer

    from edgekit.cli.ui import handle_errors

    @handle_errors
    def job() -> None:
        exc = KeyboardInterrupt()
        for n in notes:
            exc.add_note(n)
        raise exc

    with pytest.raises(typer.Exit) as stopped:
        job()
    assert stopped.value.exit_code == 130
    assert " ".join(capsys.readouterr().err.split()) == line
