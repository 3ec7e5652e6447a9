"""Artifacts, convert, devices and navigation driven by Textual's pilot with tiny real artifacts."""

from __future__ import annotations

import json

import pytest

from edgekit.tui.app import EdgekitApp
from edgekit.tui.screens.artifacts import InspectScreen
from edgekit.tui.screens.dialogs import Confirm, ErrorPanel, HelpScreen
from tests.tui.conftest import wait_for

pytestmark = pytest.mark.anyio


async def _artifacts(pilot, app, n: int):
    screen = app.get_screen("artifacts")
    await wait_for(pilot, lambda: len(screen.rows) == n, what=f"{n} artifacts in the list")
    return screen


async def test_artifacts_list_inspect_and_delete(models):
    app = EdgekitApp(folder="models")
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await _artifacts(pilot, app, 2)
        assert [r.name for r in screen.rows] == ["tiny-f16", "tiny-q8"]
        table = screen.query_one("#artifacts-table")
        assert table.get_row_at(1)[:4] == ["tiny-q8", "gguf", "rtn", "Q8_0"]
        assert "2 artifacts under models" in str(screen.query_one("#artifacts-status").render())
        await pilot.press("enter")  # inspect the first one
        await wait_for(pilot, lambda: isinstance(app.screen, InspectScreen)
                       and app.screen.query_one("#inspect-tensors").row_count > 0, what="the inspect view")
        tensors = app.screen.query_one("#inspect-tensors")
        types = {tensors.get_row_at(i)[0]: tensors.get_row_at(i)[1] for i in range(tensors.row_count)}
        assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
        assert "bits/weight" in str(app.screen.query_one("#inspect-summary").render())
        await pilot.press("escape")
        await pilot.press("d")
        assert isinstance(app.screen, Confirm)
        await pilot.press("n")  # no: nothing happens
        assert (models / "tiny-f16").exists()
        await pilot.press("d", "y")
        await _artifacts(pilot, app, 1)
        assert not (models / "tiny-f16").exists() and (models / "tiny-q8").exists()
        assert "1 artifact under models" in str(screen.query_one("#artifacts-status").render())


async def test_artifacts_open_in_chat_and_profile(models):
    app = EdgekitApp(folder="models", backend_options={"n_ctx": 512, "n_threads": 2})
    async with app.run_test(size=(100, 30)) as pilot:
        await _artifacts(pilot, app, 2)
        await pilot.press("down", "p")
        assert app.current_mode == "profile"
        assert app.screen.query_one("#pf-targets").value == str(models.relative_to(models.parent) / "tiny-q8")
        await pilot.press("f3", "c")
        chat = app.get_screen("chat")
        assert app.current_mode == "chat"
        await wait_for(pilot, lambda: chat.session is not None and not chat.busy, what="the chat to open")
        assert chat.session.artifact.name == "tiny-q8"  # the screen kept its cursor on the second row
        await pilot.press("f3", "u")  # to the devices screen, the artifact filled in for a fit check or push
        assert app.current_mode == "devices"
        assert app.screen.query_one("#dev-artifact").value.endswith("tiny-q8")


async def test_deleting_the_artifact_open_in_chat_closes_it_and_its_history(models):
    from edgekit.tui.chat_session import ChatSession, history_path

    session = ChatSession.open(models / "tiny-q8")
    session.messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    session.save()
    assert history_path(models / "tiny-q8").exists()
    app = EdgekitApp(folder="models", chat=models / "tiny-q8", backend_options={"n_ctx": 512, "n_threads": 2})
    async with app.run_test(size=(100, 30)) as pilot:
        chat = app.get_screen("chat")
        await wait_for(pilot, lambda: chat.session is not None and not chat.busy, what="the chat to open")
        await pilot.press("f3")
        await _artifacts(pilot, app, 2)
        await pilot.press("down", "d", "y")
        await _artifacts(pilot, app, 1)
        await wait_for(pilot, lambda: chat.session is None, what="the chat to close")
        assert chat.query_one("#chat-input").disabled and "was deleted" in str(chat.query_one("#chat-stats").render())
        assert not history_path(models / "tiny-q8").exists()


async def test_damaged_artifacts_are_marked_and_their_delete_says_their_size(models):
    """QA: the delete dialog of an artifact with an unreadable manifest said (0 B) for a folder holding the
    model, and a model file cut short was listed as if whole."""
    text = (models / "tiny-f16" / "edgekit.json").read_text()
    (models / "tiny-f16" / "edgekit.json").write_text(text[:200])
    model = models / "tiny-q8" / "model.gguf"
    model.write_bytes(model.read_bytes()[:100_000])
    app = EdgekitApp(folder="models")
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await _artifacts(pilot, app, 2)
        table = screen.query_one("#artifacts-table")
        assert [table.get_row_at(i)[0] for i in range(2)] == ["tiny-f16 (unreadable)", "tiny-q8 (damaged)"]
        await pilot.press("d")
        assert isinstance(app.screen, Confirm)
        size = sum(f.stat().st_size for f in (models / "tiny-f16").iterdir()) / 1e6
        assert f"({size:.1f} MB) is removed" in app.screen.question, app.screen.question
        await pilot.press("n", "down", "enter")  # the damaged one says what is wrong
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorPanel), what="the error panel")
        assert "model file truncated" in app.screen.message and "re-convert" in app.screen.message


async def test_folder_without_artifacts_says_what_to_do(tmp_path):
    app = EdgekitApp(folder=tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.get_screen("artifacts")
        status = screen.query_one("#artifacts-status")
        await wait_for(pilot, lambda: "no artifacts" in str(status.render()), what="the empty state")
        assert "Convert screen (F4)" in str(status.render())
        await pilot.press("d")  # nothing selected: a warning, no dialog
        assert not isinstance(app.screen, Confirm)


async def _convert(pilot, app, model, quant: str, output: str, method: str = "rtn"):
    await pilot.press("f4")
    screen = app.get_screen("convert")
    screen.query_one("#cv-model").value = str(model)
    screen.query_one("#cv-quant").value = quant
    screen.query_one("#cv-output").value = output
    screen.query_one("#cv-method").value = method
    await pilot.press("ctrl+r")
    return screen


async def test_convert_runs_in_the_background_and_the_artifact_appears(models, tiny_llama):
    app = EdgekitApp(folder="models")
    async with app.run_test(size=(100, 30)) as pilot:
        await _artifacts(pilot, app, 2)
        screen = await _convert(pilot, app, tiny_llama, "Q4_0", "out-q4_0")
        await wait_for(pilot, lambda: screen.outcome != "", timeout=60, what="the conversion")
        assert screen.outcome == "done" and screen.last_output.name == "out-q4_0"
        assert screen.query_one("#cv-progress").percentage == 1
        manifest = json.loads((models.parent / "out-q4_0" / "edgekit.json").read_text())
        assert manifest["preset"] == "Q4_0"
        log = "\n".join(str(line) for line in screen.query_one("#cv-log").lines)
        assert "encoding" in log and "wrote" in log
        bar = screen.query_one("#cv-progress")
        assert bar.total is not None and bar.progress == bar.total
        artifacts = await _artifacts(pilot, app, 3)  # outside the scanned folder, listed all the same
        assert "out-q4_0" in [r.name for r in artifacts.rows]


async def test_convert_to_aqlm_with_format_options(models, tiny_llama):
    """Format options as ``convert -O`` takes them, and the format's own method (AQLM) where the form still says
    rtn, as the CLI picks it."""
    pytest.importorskip("aqlm")
    app = EdgekitApp(folder="models")
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f4")
        screen = app.get_screen("convert")
        for field, value in (("#cv-model", str(tiny_llama)), ("#cv-format", "aqlm"), ("#cv-quant", "2"),
                             ("#cv-options", "embedding=fp8 scheme=2x6"), ("#cv-samples", "4"),
                             ("#cv-output", "out-aqlm")):
            screen.query_one(field).value = value
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: screen.outcome != "", timeout=300, what="the conversion")
        assert screen.outcome == "done", "\n".join(str(line) for line in screen.query_one("#cv-log").lines)
        manifest = json.loads((models.parent / "out-aqlm" / "edgekit.json").read_text())
        assert manifest["preset"] == "AQLM_2x6" and manifest["aqlm"]["embedding"] == "fp8"
        assert manifest["recipe"]["method"] == "aqlm"
        screen.query_one("#cv-options").value = "embedding"  # not KEY=VALUE: the fix, before any work
        await pilot.press("ctrl+r")
        assert isinstance(app.screen, ErrorPanel) and "KEY=VALUE" in app.screen.message


async def test_convert_bits_follow_the_format_default(models):
    """The bits field starts at the format's default (AQLM: 2, as ``convert --to aqlm`` without --bits) while the
    user has not typed bits of their own; typed bits stay."""
    app = EdgekitApp(folder="models")
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f4")
        screen = app.get_screen("convert")
        quant, fmt = screen.query_one("#cv-quant"), screen.query_one("#cv-format")
        assert quant.value == "4"
        screen.query_one("#cv-model").value = "./model"
        fmt.value = "aqlm"
        await wait_for(pilot, lambda: quant.value == "2", what="AQLM's default bits")
        assert screen.form().recipe().bits == 2
        fmt.value = "onnx"
        await wait_for(pilot, lambda: quant.value == "4", what="ONNX's default bits")
        quant.value = "8"
        fmt.value = "aqlm"
        await pilot.pause()
        await pilot.pause()
        assert quant.value == "8"
        quant.value = ""  # an empty field converts at the format's default
        assert screen.form().recipe().bits == 2


async def _gptq_under_way(pilot, app, tiny_llama):
    """A GPTQ conversion of the tiny model, past its first progress report (calibrating: seconds to go)."""
    screen = await _convert(pilot, app, tiny_llama, "4", "out-gptq", method="gptq")
    await wait_for(pilot, lambda: screen._step != "", timeout=60, what="the first progress report")
    return screen


async def _cancel(pilot, screen) -> None:
    await pilot.press("escape")
    await wait_for(pilot, lambda: screen.outcome != "", timeout=60, what="the cancel")


async def test_convert_cancel_leaves_nothing(models, tiny_llama):
    app = EdgekitApp(folder="models")
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await _gptq_under_way(pilot, app, tiny_llama)
        await _cancel(pilot, screen)
        assert screen.outcome == "cancelled"
        assert "cancelled: nothing was written" in str(screen.query_one("#cv-step").render())
        leftovers = [p.name for p in models.parent.iterdir() if p.name.startswith((".out-gptq", "out-gptq"))]
        assert leftovers == []
        assert not screen.query_one("#cv-start").disabled  # ready for another run


async def test_quitting_during_a_conversion_asks_first(models, tiny_llama):
    app = EdgekitApp(folder="models")
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await _gptq_under_way(pilot, app, tiny_llama)
        await pilot.press("ctrl+q")
        assert isinstance(app.screen, Confirm) and "A conversion is under way" in app.screen.question
        await pilot.press("n")  # no: the app and the conversion go on
        assert app.is_running and not isinstance(app.screen, Confirm)
        await _cancel(pilot, screen)  # (unless it finished); with nothing running, Ctrl+Q quits at once
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: not app.is_running, what="the app to quit")


async def test_convert_bad_form_shows_the_fix(models, tmp_path):
    app = EdgekitApp(folder="models")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _convert(pilot, app, tmp_path / "missing", "4", "")
        await wait_for(pilot, lambda: screen.outcome == "failed", what="the failure")
        assert isinstance(app.screen, ErrorPanel) and "missing" in app.screen.message
        bar = screen.query_one("#cv-progress")
        assert (bar.total, bar.progress) == (1, 0)  # not left spinning as if the job still ran
        await pilot.press("escape")
        screen.query_one("#cv-model").value = ""
        await pilot.press("ctrl+r")
        assert isinstance(app.screen, ErrorPanel) and "give the model folder" in app.screen.message


async def test_help_palette_and_screen_keys(models):
    app = EdgekitApp(folder="models")
    async with app.run_test(size=(80, 24)) as pilot:
        for key, mode in (("f2", "chat"), ("f4", "convert"), ("f5", "profile"), ("f6", "devices"), ("f3", "artifacts")):
            await pilot.press(key)
            assert app.current_mode == mode
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        commands = [c.title for c in app.get_system_commands(app.screen)]
        assert "Go to convert" in commands and "Help" in commands


async def _devices(pilot, app):
    await pilot.press("f6")
    screen = app.get_screen("devices")
    await wait_for(pilot, lambda: len(screen.infos) >= 1, what="the device list")
    return screen


async def test_devices_lists_the_host_checks_fit_and_pushes(models, tmp_path):
    pytest.importorskip("edgekit.devices")
    app = EdgekitApp(folder="models")
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await _devices(pilot, app)
        assert screen.infos[0].id == "host"
        assert screen.query_one("#devices-table").get_row_at(0)[0] == "host"
        screen.query_one("#dev-artifact").value = "models/tiny-q8"
        screen.query_one("#dev-dest").value = str(tmp_path / "pushed")
        screen.query_one("#devices-table").focus()
        await pilot.press("f")
        await wait_for(pilot, lambda: screen.outcome.startswith("fit"), what="the fit check")
        assert screen.outcome == "fit ok" and "fits host" in str(screen.query_one("#dev-status").render())
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: screen.outcome in ("pushed", "failed"), what="the push")
        assert screen.outcome == "pushed", app.screen
        pushed = tmp_path / "pushed" / "tiny-q8"
        assert (pushed / "model.gguf").read_bytes() == (models / "tiny-q8" / "model.gguf").read_bytes()
        assert (pushed / "edgekit.json").exists()
        assert "sha256 verified" in str(screen.query_one("#dev-status").render())
        bar = screen.query_one("#dev-progress")
        assert bar.progress == bar.total == screen.last_result.bytes_sent
        screen.query_one("#dev-ctx").value = "100000000"  # a context no host RAM holds
        await pilot.press("f")
        await wait_for(pilot, lambda: screen.outcome == "fit refused", what="the refusal")
        assert "RAM" in str(screen.query_one("#dev-status").render())
