"""The chat screen driven by Textual's pilot on a tiny real GGUF (llama.cpp in its worker process)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal

import pytest

from edgekit.tui.app import EdgekitApp
from edgekit.tui.chat_session import ChatSession, history_path
from edgekit.tui.screens.chat import ChatScreen
from edgekit.tui.screens.dialogs import ErrorPanel
from edgekit.tui.widgets.chat import ChatMessage
from tests.tui.conftest import wait_for

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.llamacpp,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed"),
]
OPTIONS = {"n_ctx": 2048, "n_threads": 2}


def _app(target) -> EdgekitApp:
    return EdgekitApp(folder="models", chat=target, backend_options=OPTIONS)


async def _ready(pilot, app) -> ChatScreen:
    chat = app.get_screen("chat")
    await wait_for(pilot, lambda: chat.session is not None and chat.session.backend is not None and not chat.busy,
                   what="the model to load")
    return chat


async def _send(pilot, chat: ChatScreen, text: str, max_tokens: int = 64) -> None:
    chat.query_one("#s-max_tokens").value = str(max_tokens)
    chat.query_one("#chat-input").focus()
    await pilot.press(*text)
    await pilot.press("enter")


async def test_typed_message_streams_tokens_into_the_reply(real_gguf):
    app = _app(real_gguf)
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await _ready(pilot, app)
        seen: list[tuple[bool, int]] = []
        on_chunk = chat._on_chunk

        async def spy(session, chunk, live):
            await on_chunk(session, chunk, live)
            seen.append((chat.busy, live.generated_tokens))

        chat._on_chunk = spy
        chat.query_one("#s-temperature").value = "0"
        # chat starts with no system prompt (the template's own: SmolLM2 then answers this one in French
        # landmarks, as `edgekit run` does without --system); this test is about streaming, so it sets one
        chat.query_one("#system-prompt").text = "You are a helpful assistant."
        await _send(pilot, chat, "What is the capital of France?", max_tokens=24)
        await wait_for(pilot, lambda: not chat.busy, what="the reply")
        streaming = [n for busy, n in seen if busy]
        # pieces reached the screen while the worker thread was still generating (the UI loop never blocked)
        assert len(streaming) >= 3 and streaming == sorted(streaming) and streaming[0] < streaming[-1]
        stats = chat.last_stats
        assert 0 < stats.generated_tokens <= 24 and stats.stop_reason in ("eos", "length")
        assert stats.tokens_per_second > 0 and stats.n_ctx == 2048 and stats.prompt_tokens > 10
        status = str(chat.query_one("#chat-stats").render())
        assert "tok/s" in status and f"ctx {stats.context_used}/2048" in status and "stop: " in status
        messages = [m for m in chat.query(ChatMessage)]
        assert [m.role for m in messages] == ["user", "assistant"]
        assert messages[0].content == "What is the capital of France?" and "Paris" in messages[1].content
        # kept per artifact on disk, system prompt included
        saved = json.loads(history_path(real_gguf).read_text())
        assert saved["system"] == chat.session.system
        assert [m["content"] for m in saved["messages"]] == [messages[0].content, messages[1].content]
        assert "chat template" in str(chat.query_one("#chat-title").render())
        assert not chat.query_one("#chat-input").disabled


async def test_escape_stops_a_generation_and_the_next_message_works(real_gguf):
    app = _app(real_gguf)
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await _ready(pilot, app)
        await _send(pilot, chat, "Tell me a very long story about a dragon, in many paragraphs.", max_tokens=1500)
        reply = chat._reply
        await wait_for(pilot, lambda: len(reply.content) > 0, what="the first tokens")
        await pilot.press("escape")
        await wait_for(pilot, lambda: not chat.busy, what="the generation to stop")
        assert chat.last_stats.stop_reason == "cancelled"
        assert 0 < chat.last_stats.generated_tokens < 200
        assert "stopped" in str(reply.query_one(".role").render())
        assert chat.session.messages[-1] == {"role": "assistant", "content": reply.content}
        await _send(pilot, chat, "Thanks!", max_tokens=8)
        await wait_for(pilot, lambda: not chat.busy, what="the second reply")
        assert chat.last_stats.stop_reason in ("length", "eos") and 0 < chat.last_stats.generated_tokens <= 8
        assert [m["role"] for m in chat.session.messages] == ["user", "assistant", "user", "assistant"]


async def test_a_crashed_runtime_shows_the_error_panel_and_chat_recovers(real_gguf, models):
    app = _app(real_gguf)
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await _ready(pilot, app)
        await _send(pilot, chat, "Tell me a very long story about a knight.", max_tokens=1500)
        await wait_for(pilot, lambda: len(chat._reply.content) > 0, what="the first tokens")
        os.kill(chat.session.backend._proc.pid, signal.SIGKILL)  # the worker dies mid-generation
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorPanel), what="the error panel")
        panel = app.screen
        assert panel.title_text == "The runtime crashed" and "SIGKILL" in panel.message
        await pilot.press("escape")
        assert app.screen is chat and chat.session.backend is None and not chat.busy
        assert "failed" in str(chat.query(ChatMessage).last().query_one(".role").render())
        await _send(pilot, chat, "Still there?", max_tokens=8)  # the model loads again
        await wait_for(pilot, lambda: not chat.busy and chat.last_stats is not None, what="a reply after the crash")
        assert chat.last_stats.generated_tokens > 0 and chat.session.backend is not None


async def test_a_message_past_the_context_comes_back_and_the_chat_goes_on(models):
    """A prompt longer than the context is refused before any reply: the history forgets it (the next
    message is not refused for it), the log drops it and the input gets its text back to shorten."""
    app = EdgekitApp(folder="models", chat=models / "tiny-q8", backend_options={"n_ctx": 256, "n_threads": 2})
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await _ready(pilot, app)
        long = "word " * 200
        chat.query_one("#chat-input").value = long
        chat.query_one("#chat-input").focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorPanel), what="the error panel")
        assert "context holds 256" in app.screen.message
        await pilot.press("escape")
        await wait_for(pilot, lambda: not chat.busy, what="the turn to end")
        assert chat.session.messages == [] and ChatSession.open(models / "tiny-q8").messages == []
        assert list(chat.query(ChatMessage)) == []
        assert chat.query_one("#chat-input").value == long.strip()
        assert "back in the input" in str(chat.query_one("#chat-stats").content)
        chat.query_one("#chat-input").value = ""
        await _send(pilot, chat, "hi", max_tokens=4)
        await wait_for(pilot, lambda: not chat.busy and len(chat.session.messages) == 2, what="a reply")
        assert chat.session.messages[0] == {"role": "user", "content": "hi"}


async def test_the_settings_pane_follows_the_window_width_until_ctrl_s(models):
    app = _app(models / "tiny-q8")
    async with app.run_test(size=(140, 30)) as pilot:
        chat = await _ready(pilot, app)
        pane = chat.query_one("#chat-settings")
        assert pane.display
        await pilot.resize_terminal(80, 24)
        await pilot.pause()
        assert not pane.display  # the chat gets the whole width back
        await pilot.press("f3")  # resized while another screen shows
        await pilot.resize_terminal(140, 30)
        await pilot.press("f2")
        await pilot.pause()
        assert pane.display
        await pilot.press("ctrl+s")  # the user's choice wins over the width from now on
        await pilot.resize_terminal(150, 30)
        await pilot.pause()
        assert not pane.display


def _notes(app) -> list[tuple[str, str]]:
    """The toasts the app is showing, oldest first, as (message, severity)."""
    return [(n.message, n.severity) for n in app._notifications]


async def test_history_is_per_artifact_and_reopens(models):
    session = ChatSession.open(models / "tiny-q8")
    session.system = "Answer briefly."
    session.messages = [{"role": "user", "content": "earlier question"},
                        {"role": "assistant", "content": "earlier **answer**"}]
    session.save()
    app = _app(models / "tiny-q8")
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await _ready(pilot, app)
        assert [m.content for m in chat.query(ChatMessage)] == ["earlier question", "earlier **answer**"]
        assert chat.query_one("#system-prompt").text == "Answer briefly."
        await app.open_in_chat(models / "tiny-f16")  # another artifact: its own (empty) history
        chat = await _ready(pilot, app)
        assert list(chat.query(ChatMessage)) == [] and chat.session.artifact.name == "tiny-f16"
        await pilot.press("ctrl+y")  # nothing to copy yet: a warning, the clipboard untouched
        await pilot.pause()
        assert app.clipboard == ""
        assert _notes(app)[-1] == ("no reply to copy yet", "warning")
        await app.open_in_chat(models / "tiny-q8")
        chat = await _ready(pilot, app)
        assert len(chat.query(ChatMessage)) == 2
        await pilot.press("ctrl+y")  # the last assistant reply, as written (markdown source, not rendered)
        await pilot.pause()
        assert app.clipboard == "earlier **answer**"
        assert _notes(app)[-1] == ("copied the last reply (18 characters)", "information")
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert list(chat.query(ChatMessage)) == [] and ChatSession.open(models / "tiny-q8").messages == []


async def test_bad_sampling_value_is_refused_without_sending(models):
    app = _app(models / "tiny-q8")
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await _ready(pilot, app)
        chat.query_one("#s-temperature").value = "-1"
        await _send(pilot, chat, "hi")
        await pilot.pause()
        assert not chat.busy and chat.session.messages == []
        assert chat.query_one("#chat-input").value == "hi"  # kept for a retry


async def test_corrupt_model_and_missing_runtime_show_the_error_panel(models, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    app = _app(bad)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorPanel), what="the error panel")
        assert "could not load bad.gguf" in app.screen.message
        await pilot.press("escape")
        await pilot.press("f3")  # the app is still usable
        await wait_for(pilot, lambda: app.current_mode == "artifacts" and len(app.screen.rows) == 2,
                       what="the artifacts list")
        other = tmp_path / "other-format"
        other.mkdir()
        (other / "params.bin").write_bytes(b"x")
        (other / "edgekit.json").write_text(json.dumps({"schema": "edgekit.artifact/1", "format": "tflite",
                                                        "files": {"model": "params.bin"}}))
        await app.open_in_chat(other)
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorPanel), what="the error panel")
        assert app.screen.title_text == "Not supported" and "no runtime for 'tflite'" in app.screen.message
        await pilot.press("enter")
        assert app.current_mode == "chat" and not isinstance(app.screen, ErrorPanel)


async def test_offload_auto_plans_for_this_host(models):
    """`edgekit chat --offload auto`: the session loads with the planner's options and says why."""
    app = EdgekitApp(folder="models", chat=models / "tiny-q8", backend_options={**OPTIONS, "offload": "auto"})
    async with app.run_test(size=(120, 30)) as pilot:
        chat = await _ready(pilot, app)
        reason = chat.session.offload_reason
        assert reason and "offload:" in str(chat.query_one("#chat-stats").content)
        await _send(pilot, chat, "hi", max_tokens=4)
        await wait_for(pilot, lambda: not chat.busy and len(chat.session.messages) == 2, what="a reply")


async def test_a_long_chat_runs_past_a_kv_window_with_drafting_shown(real_gguf, tmp_path, monkeypatch):
    """Three turns through a 256-token KV window with prompt-lookup drafting: the chat never runs out of
    context, and the status line shows the window's use and the drafts' acceptance."""
    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path))
    app = EdgekitApp(folder="models", chat=real_gguf,
                     backend_options={**OPTIONS, "kv_window": 256, "kv_sinks": 4, "speculative": "ngram"})
    async with app.run_test(size=(120, 30)) as pilot:
        chat = await _ready(pilot, app)
        assert "KV window 256" in str(chat.query_one("#chat-stats").render())
        chat.query_one("#s-temperature").value = "0"
        for text in ("Tell me a long story about a dragon.", "Now repeat the story.", "Tell me another one."):
            await _send(pilot, chat, text, max_tokens=120)
            await wait_for(pilot, lambda: not chat.busy, what="the reply", timeout=120)
        status = str(chat.query_one("#chat-stats").render())
        live = chat.last_stats
        assert live is not None and live.kv_window == 256 and live.kv_evicted > 0 and live.kv_cells <= 256
        assert "KV window" in status and "evicted" in status and "draft" in status
        assert len(chat.session.messages) == 6


async def test_a_full_home_keeps_the_chat_going_and_says_so_once(models, monkeypatch):
    """QA: with a full EDGEKIT_HOME every message failed (the history could not be written) and Ctrl+L crashed
    the app with a traceback; the chat goes on, only the history is lost, and that is said once."""
    import errno

    from edgekit import fsutil

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil, "_make_temp", full)  # every file written in the home fails as on a full disk
    app = _app(models / "tiny-q8")
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await _ready(pilot, app)
        for n, text in enumerate(("hello", "again"), 1):
            await _send(pilot, chat, text, max_tokens=4)
            await wait_for(pilot, lambda n=n: not chat.busy and len(chat.session.messages) == 2 * n, what="a reply")
        assert not isinstance(app.screen, ErrorPanel)
        warned = [m for m, severity in _notes(app) if severity == "warning"]
        assert len(warned) == 1 and "the chat history is not being saved" in warned[0]
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert app.is_running and list(chat.query(ChatMessage)) == []
        assert "history cleared" in str(chat.query_one("#chat-stats").render())


async def test_ctrl_o_lists_the_kept_conversations_and_takes_one_up(models):
    other = ChatSession.open(models / "tiny-q8")
    other.messages = [{"role": "user", "content": "an older question"}, {"role": "assistant", "content": "its answer"}]
    other.save()
    mine = ChatSession.open(models / "tiny-q8")
    mine.switch_to(None)  # the newest is an empty conversation: the chat opens on it
    mine.messages = [{"role": "user", "content": "the newest"}]
    mine.save()
    app = _app(models / "tiny-q8")
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await _ready(pilot, app)
        assert [m.content for m in chat.query(ChatMessage)] == ["the newest"]
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: app.screen.id != "chat" and app.screen.query("#conversation-list"),
                       what="the conversations dialog")
        lines = [str(o.prompt) for o in app.screen.query_one("#conversation-list").options]
        assert lines == ["+ new conversation (this one is kept)", "2 messages · an older question"]
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: app.screen is chat and len(chat.query(ChatMessage)) == 2,
                       what="the older conversation on screen")
        assert [m.content for m in chat.query(ChatMessage)] == ["an older question", "its answer"]
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: app.screen.query("#conversation-list"), what="the dialog again")
        lines = [str(o.prompt) for o in app.screen.query_one("#conversation-list").options]
        assert lines[1:] == ["1 message · the newest"]  # the one left is kept, the one taken up not listed
        await pilot.press("enter")  # a new conversation
        await wait_for(pilot, lambda: app.screen is chat and not chat.query(ChatMessage), what="an empty chat")
        assert len(chat.session.conversations()) == 2
        await pilot.press("ctrl+o", "escape")  # Esc keeps the chat as it is
        await pilot.pause()
        assert app.screen is chat and not chat.query(ChatMessage)
