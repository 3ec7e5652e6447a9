"""The TUI points of the habits issue: every box has a label, the footer shows every other screen's key at
120 columns, chat reopens at its end, no pre-filled system prompt, the palette's screenshot is saved
somewhere it says."""

from __future__ import annotations

import importlib.util

import pytest
from textual.widgets import Footer, Input, Label
from textual.widgets._footer import FooterKey

from edgekit.tui.app import SCREEN_KEYS, EdgekitApp
from edgekit.tui.chat_session import ChatSession
from tests.tui.conftest import wait_for

pytestmark = pytest.mark.anyio


def _footer_shown(app: EdgekitApp) -> list[str]:
    """The footer keys drawn whole (left of the palette key docked at the right edge)."""
    keys = list(app.screen.query_one(Footer).query(FooterKey))
    edge = min([k.region.x for k in keys if k.description == "palette"] or [app.size.width])
    return [k.key for k in keys if k.region.width > 0 and k.region.right <= edge]


async def test_the_footer_shows_every_other_screen_at_120_columns(tmp_path):
    app = EdgekitApp(folder=tmp_path, start="artifacts")
    async with app.run_test(size=(120, 40)) as pilot:
        for screen, key in SCREEN_KEYS.items():
            await app.action_show(screen)
            others = {k for name, k in SCREEN_KEYS.items() if name != screen}
            # the footer lays its keys out on a later refresh
            await wait_for(pilot, lambda others=others: others | {"f1"} <= set(_footer_shown(app)), timeout=10,
                           what=f"every other screen's key in the footer of {screen}")
            assert key not in _footer_shown(app)  # where you are needs no key
        await pilot.press("f3")  # the keys still work
        await pilot.pause()
        assert app.current_mode == "artifacts"


BOXES = {"convert": [("cv-samples", "samples")], "profile": [("pf-tests", "tests"), ("pf-reps", "reps"),
                                                              ("pf-threads", "threads")],
         "devices": [("dev-ctx", "ctx")]}


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=lambda s: f"{s[0]}x{s[1]}")
async def test_every_box_has_a_label(size, tmp_path):
    app = EdgekitApp(folder=tmp_path, start="convert")
    async with app.run_test(size=size) as pilot:
        for screen, boxes in BOXES.items():
            await app.action_show(screen)
            await pilot.pause()
            for box, label in boxes:
                widget = app.screen.query_one(f"#{box}", Input)
                siblings = list(widget.parent.children)
                before = siblings[siblings.index(widget) - 1]
                assert isinstance(before, Label) and str(before.render()) == label
                assert before.region.width > 0 and before.region.right <= widget.region.x  # drawn, left of its box
                assert widget.region.width >= 8, (box, widget.region)  # and the box has room for its value


def test_a_new_chat_sends_no_system_prompt_of_its_own(models):
    session = ChatSession.open(models / "tiny-q8")
    assert session.system == ""
    session.messages = [{"role": "user", "content": "hi"}]
    assert session.prompt_messages() == [{"role": "user", "content": "hi"}]  # the template adds the model's own


@pytest.mark.llamacpp
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
async def test_chat_reopens_at_the_end_of_a_long_history(models):
    session = ChatSession.open(models / "tiny-q8")
    session.messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}\nline two"}
                        for i in range(40)]
    session.save()
    app = EdgekitApp(folder="models", chat=models / "tiny-q8", backend_options={"n_ctx": 256, "n_threads": 1})
    async with app.run_test(size=(80, 24)) as pilot:
        chat = app.get_screen("chat")
        log = chat.query_one("#chat-log")
        await wait_for(pilot, lambda: chat.session is not None and log.max_scroll_y > 0, what="the history")
        await pilot.pause()
        assert log.scroll_y == log.max_scroll_y
        assert chat.query_one("#system-prompt").text == ""


async def test_the_screenshot_is_saved_where_it_says(edgekit_home, tmp_path):
    app = EdgekitApp(folder=tmp_path, start="convert")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        app.action_screenshot()
        await pilot.pause()
        shots = list((edgekit_home / "screenshots").glob("*.svg"))
        assert len(shots) == 1 and "<svg" in shots[0].read_text()[:500]
        notes = [n.message for n in app._notifications]
        assert notes[-1] == f"saved to {shots[0]}"
        blocked = tmp_path / "file"
        blocked.write_text("x")
        app.action_screenshot(path=str(blocked / "sub"))  # a folder that cannot be made: said, not silent
        await pilot.pause()
        assert type(app.screen).__name__ == "ErrorPanel"


@pytest.mark.parametrize(("budget", "bpw", "size"), [("4.5", 4.5, None), ("90MB", None, 90_000_000),
                                                     ("512 MiB", None, 512 << 20), ("", None, None)])
def test_the_convert_form_takes_a_size_as_well_as_bits_per_weight(budget, bpw, size):
    from edgekit.tui.screens.convert import ConvertForm

    r = ConvertForm(model="./m", bpw=budget).recipe()
    assert (r.bpw, r.size) == (bpw, size)
    assert r.bits == (4 if budget == "" else None)


def test_a_budget_that_is_neither_is_a_one_line_error():
    from edgekit.errors import InputError
    from edgekit.tui.screens.convert import ConvertForm

    with pytest.raises(InputError, match="size like 90MB"):
        ConvertForm(model="./m", bpw="90 potatoes").recipe()
    with pytest.raises(InputError, match="bits per weight"):
        ConvertForm(model="./m", bpw="4.5.1").recipe()
