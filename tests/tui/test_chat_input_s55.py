"""QA: the chat input kept only the first line of a paste and dropped typed format characters (U+200D split
👩‍👩‍👧 into three). Keys and pastes go in as a terminal sends them, through Textual's own parser."""

from __future__ import annotations

import importlib.util
import json

import pytest
from textual._xterm_parser import XTermParser

from edgekit.tui.app import EdgekitApp
from edgekit.tui.chat_session import history_path
from edgekit.tui.widgets.chat import ChatMessage
from tests.tui.conftest import wait_for

pytestmark = pytest.mark.anyio
no_llamacpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed")
FAMILY = "👩\u200d👩\u200d👧"
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"


async def _terminal(pilot, data: str) -> None:
    """Send ``data`` as the terminal's bytes would arrive: keys, bracketed pastes, Enter as \\r."""
    for event in XTermParser().feed(data):
        event.set_sender(pilot.app)
        pilot.app._driver.send_message(event)
        await pilot.pause()


async def _sent(models, data: str) -> tuple[str, list[dict[str, str]]]:
    """Open the chat on tiny-q8, send what ``data`` types; what the session was asked and the saved history."""
    app = EdgekitApp(folder="models", chat=models / "tiny-q8", backend_options={"n_ctx": 512, "n_threads": 2})
    async with app.run_test(size=(100, 30)) as pilot:
        chat = app.get_screen("chat")
        await wait_for(pilot, lambda: chat.session is not None and chat.session.backend is not None
                       and not chat.busy, what="the model to load")
        chat.query_one("#s-max_tokens").value = "2"
        asked: list[str] = []
        reply = chat.session.reply

        def spy(text, *args):
            asked.append(text)
            return reply(text, *args)

        chat.session.reply = spy
        chat.query_one("#chat-input").focus()
        await _terminal(pilot, data)
        await wait_for(pilot, lambda: not chat.busy and len(chat.session.messages) == 2, what="a reply")
        assert chat.query(ChatMessage).first().content == asked[0]
        assert chat.query_one("#chat-input").value == ""
    saved = json.loads(history_path(models / "tiny-q8").read_text())["messages"]
    return asked[0], saved


# -- end to end: what the model is asked and what the history keeps ---------------------------------------

@pytest.mark.llamacpp
@no_llamacpp
async def test_a_pasted_text_is_sent_whole_with_its_lines(models):
    """A bracketed paste of two lines, then Enter: the message is both lines (Textual's Input kept "line1")."""
    asked, saved = await _sent(models, f"{PASTE_START}line1\nline2 é{PASTE_END}\r")
    assert asked == "line1\nline2 é"
    assert saved[0] == {"role": "user", "content": "line1\nline2 é"}


@pytest.mark.llamacpp
@no_llamacpp
async def test_typed_zero_width_joiners_are_kept(models):
    """The family emoji typed as its five code points stays one emoji (the two U+200D were dropped)."""
    asked, saved = await _sent(models, f"日本 {FAMILY} é\r")
    assert asked == f"日本 {FAMILY} é" and asked.count("\u200d") == 2
    assert saved[0] == {"role": "user", "content": f"日本 {FAMILY} é"}


@pytest.mark.llamacpp
@no_llamacpp
async def test_lines_typed_with_ctrl_j_and_a_terminal_paste_of_cr_lines_are_one_message(models):
    """Ctrl+J (a terminal sends \\n) starts a new line; a paste whose lines end in \\r\\n or \\r keeps them as \\n."""
    asked, saved = await _sent(models, f"first\nsecond {PASTE_START}a\r\nb\rc{PASTE_END}\r")
    assert asked == saved[0]["content"] == "first\nsecond a\nb\nc"


# -- the input itself (no model: the chat screen's input enabled by hand) ----------------------------------

async def _input(pilot):
    chat = pilot.app.get_screen("chat")
    inp = chat.query_one("#chat-input")
    inp.disabled = False
    inp.focus()
    await pilot.pause()
    return chat, inp


@pytest.mark.parametrize("char", ["\u200c", "\u200d", "\u200e", "\u200f", "\u2060"])
async def test_every_format_character_is_typed_but_control_keys_are_not(tmp_path, char):
    app = EdgekitApp(folder=tmp_path, start="chat")
    async with app.run_test(size=(80, 24)) as pilot:
        _, inp = await _input(pilot)
        await _terminal(pilot, f"a{char}b")
        assert inp.value == f"a{char}b" and inp.cursor_position == 3
        await _terminal(pilot, "\x07\x7f")  # Ctrl+G types nothing, Backspace still deletes
        assert inp.value == f"a{char}"


async def test_the_line_breaks_show_as_a_mark_and_the_cursor_counts_it(tmp_path):
    app = EdgekitApp(folder=tmp_path, start="chat")
    async with app.run_test(size=(80, 24)) as pilot:
        _, inp = await _input(pilot)
        await _terminal(pilot, f"{PASTE_START}ab\ncd{PASTE_END}")
        assert inp.value == "ab\ncd" and inp.cursor_position == 5
        await pilot.pause()
        drawn = "".join(segment.text for segment in inp.render_line(0))
        assert drawn.startswith("ab⏎cd")  # one line on screen, the break visible
        assert inp._cursor_offset == 6  # after "ab⏎cd": the mark takes its cell
        inp.cursor_position = 2
        await _terminal(pilot, "\x7f")  # Backspace takes "b", and the break and "cd" stay
        assert inp.value == "a\ncd"
        inp.selection = type(inp.selection)(0, 3)  # "a\nc"
        await _terminal(pilot, f"{PASTE_START}x\ny{PASTE_END}")  # a paste replaces the selection
        assert inp.value == "x\nyd"


async def test_f1_help_names_the_new_line_key():
    from edgekit.tui.screens.dialogs import HELP_KEYS

    assert ("Ctrl+J", "chat") in [(key, where) for key, where, _ in HELP_KEYS]
