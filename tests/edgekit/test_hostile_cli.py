"""CLI commands in hostile environments: an unwritable model library (chat, tui), an output folder that cannot
be written (neurons, refused before the work), an empty EDGEKIT_API_KEY (serve). One line with the fix, never
a traceback, and nothing refused that does not need what is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app

runner = CliRunner()


@pytest.fixture
def unmakeable_library(tmp_path, monkeypatch) -> Path:
    """EDGEKIT_MODELS below a plain file: the library does not exist and cannot be made (as in a HOME the user
    cannot write)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    library = blocker / "models"
    monkeypatch.setenv("EDGEKIT_MODELS", str(library))
    return library


@pytest.fixture
def app_runs(monkeypatch) -> list[dict]:
    """The Textual app as a recorder: what it would have been started with (no screen taken over)."""
    pytest.importorskip("textual")
    pytest.importorskip("textual_plotext")
    from edgekit.tui import app as tui_app

    started: list[dict] = []

    class Recorder:
        def __init__(self, **kwargs) -> None:
            started.append(kwargs)

        def run(self) -> None:
            pass

    monkeypatch.setattr(tui_app, "EdgekitApp", Recorder)
    monkeypatch.setattr("edgekit.cli.tui_cmd.refuse_without_terminal", lambda *a, **k: None)
    return started


# -- chat / tui with a library that cannot be made --------------------------------------------------------------------


def test_chat_on_an_artifact_path_needs_no_writable_library(unmakeable_library, app_runs, tmp_path):
    """Was "cannot write .../models: ...; make it writable or set EDGEKIT_MODELS ... (or give -o)": chat has no -o,
    and an artifact given by its path does not need the library."""
    model = tmp_path / "art" / "m.gguf"
    model.parent.mkdir()
    model.write_bytes(b"GGUF")
    r = runner.invoke(app, ["chat", str(model)])
    assert r.exit_code == 0, r.output
    assert [(run["chat"], run["folder"]) for run in app_runs] == [(model, model.parent)]
    assert not unmakeable_library.exists()


def test_tui_with_a_library_that_cannot_be_made_names_dir_not_o(unmakeable_library, app_runs):
    r = runner.invoke(app, ["tui"])
    assert r.exit_code != 0 and app_runs == []
    assert str(unmakeable_library) in r.output and "--dir" in r.output and "-o)" not in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


# -- neurons: where it writes, checked before the work ----------------------------------------------------------------


@pytest.fixture
def no_analysis(monkeypatch) -> None:
    def analyze(*args, **kwargs):
        raise AssertionError("the analysis ran before the output folder was checked")

    monkeypatch.setattr("edgekit.runtime.activation_sparsity.analyze", analyze)


def test_neurons_refuses_an_unwritable_default_output_before_the_work(tiny_llama, tmp_path, monkeypatch,
                                                                      no_analysis):
    """Was 192 s of measuring, then "error: Permission denied (.../tiny-neurons/neurons.json)". (The parent is
    reported unwritable to os.access, so that the test also holds as root.)"""
    import shutil

    model = shutil.copytree(tiny_llama, tmp_path / "ro" / "tiny")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != model.parent and real(p, mode, **kw))
    r = runner.invoke(app, ["neurons", str(model), "-t", "1"])
    assert r.exit_code == 2, r.output
    line = " ".join(r.output.split())
    assert f"cannot write the output folder {model.parent / 'tiny-neurons'} (by default beside the model)" in line
    assert f"{model.parent} is not writable; choose another folder with -o" in line
    assert not (model.parent / "tiny-neurons").exists()


def test_neurons_refuses_an_output_below_a_file_before_the_work(tiny_llama, tmp_path, no_analysis):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    r = runner.invoke(app, ["neurons", str(tiny_llama), "-o", str(blocker / "n"), "-t", "1"])
    assert r.exit_code == 2, r.output
    assert f"cannot write -o {blocker / 'n'}: {blocker} is a file" in " ".join(r.output.split())


# -- serve: an empty EDGEKIT_API_KEY ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "  "])
def test_serve_refuses_an_empty_api_key_variable(tmp_path, monkeypatch, value):
    """Was an open server on 0.0.0.0 with only the generic no-key warning (Click reads an empty variable as
    unset), while --api-key "" is refused: a script whose $SECRET is unset must not expose the models."""
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")

    def started(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr("edgekit.runtime.serve.app.serve", started)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    r = runner.invoke(app, ["serve", str(model), "--host", "0.0.0.0"], env={"EDGEKIT_API_KEY": value})
    assert r.exit_code == 2, r.output
    assert "EDGEKIT_API_KEY is set but empty" in r.output and "Traceback" not in r.output
    # a key given on the command line wins over the empty variable
    r = runner.invoke(app, ["serve", str(model), "--api-key", ""], env={"EDGEKIT_API_KEY": value})
    assert r.exit_code == 2 and "--api-key is empty" in r.output
