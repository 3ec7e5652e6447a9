"""Chat messages: the user's as plain text, the model's as Markdown that grows as tokens stream."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual.widgets import Label, Markdown, Static


class ChatMessage(Vertical):
    """One message. Assistant replies render Markdown (code blocks highlighted); ``append`` streams.

    Not a Tab stop of its own: the log around it is one (PageUp/PageDown scroll it from the input too).
    Ctrl+Y copies the last reply; any text selected with the mouse copies with Ctrl+C."""

    def __init__(self, role: str, content: str = "") -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.content = content

    def compose(self) -> ComposeResult:
        yield Label("you" if self.role == "user" else self.role, classes="role")
        if self.role == "assistant":
            yield Markdown(self.content, classes="body")
        else:
            yield Static(self.content, classes="body", markup=False)

    async def append(self, text: str) -> None:
        """Add streamed text to the reply."""
        if not text:
            return
        self.content += text
        await self.query_one(Markdown).append(text)

    def mark(self, note: str) -> None:
        """Show a note under the role label, e.g. ``stopped`` after a cancel."""
        self.query_one(".role", Label).update(Content.assemble(self.role, "  ", (f"({note})", "dim")))
