"""The chat's history on disk: a full or read-only home only loses it, and two chats with one artifact keep
both conversations (no model is loaded here)."""

from __future__ import annotations

import errno
import json

import pytest

from edgekit import fsutil
from edgekit.tui.chat_session import ChatSession, history_path


@pytest.fixture
def full_home(monkeypatch):
    """Every file written in edgekit's home fails as on a full disk (atomic_file then raises DiskFullError)."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil, "_make_temp", full)


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def test_a_full_home_loses_only_the_history_and_says_so_once(models, full_home):
    """QA: with a full EDGEKIT_HOME every message failed, and Ctrl+L (clear) crashed the TUI."""
    session = ChatSession.open(models / "tiny-q8")
    session.messages.append(_user("hello"))
    session.save()  # no error: the chat goes on
    session.clear()
    notice = session.history_notice()
    assert "the chat history is not being saved (the disk is full)" in notice and "EDGEKIT_HOME" in notice
    session.messages.append(_user("again"))
    session.save()
    assert session.history_notice() == ""  # said once, not at every message


def test_two_chats_with_one_artifact_keep_both_conversations(models):
    """QA: the last of two chats to save won, and the other's conversation was lost. The newest opens
    next time; the other is kept beside it."""
    a, b = ChatSession.open(models / "tiny-q8"), ChatSession.open(models / "tiny-q8")
    a.messages.append(_user("from A"))
    a.save()
    b.messages.append(_user("from B"))
    b.save()
    assert [m["content"] for m in ChatSession.open(models / "tiny-q8").messages] == ["from B"]
    saved = json.loads(history_path(models / "tiny-q8").read_text())
    assert [[m["content"] for m in o["messages"]] for o in saved["others"]] == [["from A"]]
    a.messages.append(_user("A goes on"))
    a.save()  # A is the newest now; B's is kept
    saved = json.loads(history_path(models / "tiny-q8").read_text())
    assert [m["content"] for m in saved["messages"]] == ["from A", "A goes on"]
    assert [[m["content"] for m in o["messages"]] for o in saved["others"]] == [["from B"]]
    c = ChatSession.open(models / "tiny-q8")  # goes on from A's: A's older copy is not kept twice
    c.messages.append(_user("C goes on"))
    c.save()
    saved = json.loads(history_path(models / "tiny-q8").read_text())
    assert [[m["content"] for m in o["messages"]] for o in saved["others"]] == [["from B"]]


def test_a_history_an_earlier_edgekit_saved_opens(models):
    history_path(models / "tiny-q8").write_text(json.dumps({"artifact": str(models / "tiny-q8"), "system": "S",
                                                            "messages": [_user("old")]}))
    session = ChatSession.open(models / "tiny-q8")
    assert session.system == "S" and session.messages == [_user("old")]
    session.messages.append(_user("new"))
    session.save()
    saved = json.loads(history_path(models / "tiny-q8").read_text())
    assert saved["messages"] == [_user("old"), _user("new")] and saved["others"] == []


def test_a_chat_goes_back_to_a_kept_conversation_and_keeps_the_one_it_left(models):
    """Stop 50 kept other chats' conversations under ``others`` but nothing showed them: ``conversations``
    lists them and ``switch_to`` takes one up, keeping the one left, and neither is kept twice."""
    a, b = ChatSession.open(models / "tiny-q8"), ChatSession.open(models / "tiny-q8")
    a.system = "Be brief."
    a.messages += [_user("from A"), {"role": "assistant", "content": "reply A"}]
    a.save()
    b.messages.append(_user("from B"))
    b.save()
    assert [[m["content"] for m in c["messages"]] for c in b.conversations()] == [["from A", "reply A"]]
    b.switch_to(b.conversations()[0])
    assert b.system == "Be brief." and [m["content"] for m in b.messages] == ["from A", "reply A"]
    kept = b.conversations()
    assert [[m["content"] for m in c["messages"]] for c in kept] == [["from B"]]  # A's copy is not listed too
    b.messages.append(_user("B goes on with A's"))
    b.save()
    saved = json.loads(history_path(models / "tiny-q8").read_text())
    assert [m["content"] for m in saved["messages"]] == ["from A", "reply A", "B goes on with A's"]
    assert [[m["content"] for m in o["messages"]] for o in saved["others"]] == [["from B"]]
    b.switch_to(None)  # a new conversation: empty, the system prompt stays, the last one kept
    assert b.messages == [] and b.system == "Be brief."
    assert [[m["content"] for m in c["messages"]] for c in b.conversations()] == [
        ["from A", "reply A", "B goes on with A's"], ["from B"]]
    assert ChatSession.open(models / "tiny-q8").messages == []  # the next chat opens the newest: the empty one
    b.switch_to(None)  # an empty conversation left is not kept
    assert len(b.conversations()) == 2
