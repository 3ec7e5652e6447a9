"""``edgekit run`` without a prompt: a chat in the terminal, one message a turn, the conversation kept
for the session (as ``llama-cli`` and ``ollama run`` do); and ``run``'s one-shot reply and ``--json``.

A message is what Enter sends: a line as typed, or a paste whole, its newlines included (the terminal's
bracketed paste, through GNU readline: the paste lands in the line being edited, and Enter sends it). A
message of several lines can also be typed: a line starting with \""" opens it and a line ending with \"""
closes it (as in ``ollama run``), or a line ending with a backslash goes on to the next (as in
``llama-cli``); the prompt is then ``... ``. These two apply to typed lines only: a paste is sent as it is,
quotes and backslashes included. Without GNU readline (libedit, or no readline at all) a paste arrives as
typed lines, one message each, as before; \""" works everywhere. ``run`` with stdin not a terminal never
chats: all of stdin is one prompt.

The model is loaded once and every turn sends the whole conversation through its chat template. Ctrl-C
stops the reply being written (what was written stays in the conversation); at the prompt it only says
how to leave, and drops a message of several lines being typed. ``/exit`` or Ctrl-D ends; ``/clear`` forgets
the conversation.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from edgekit.cli.ui import err, say
from edgekit.errors import BackendCrashed, EdgekitError
from edgekit.runtime.base import Backend, GenerationStats, SamplingConfig

EXIT = ("/exit", "/quit", "/bye")
PROMPT, MORE = ">>> ", "... "  # MORE: inside a message of several lines
FENCE = '"""'
HELP = ('Enter sends a message{paste}; """ opens and closes one of several lines (or Ctrl-D ends it), and a \\ '
        "ending a line goes on to the next; /clear forgets the conversation; /exit or Ctrl-D ends; Ctrl-C stops a "
        "reply")


def stats_line(st: GenerationStats, chat: bool = False) -> str:
    """The line after a reply. A reply cut where the context ran out (not at -n) says so where the stop is
    named, unless it is a ``chat``'s, whose own note says it."""
    from edgekit.runtime.speculative import decoding_note

    full = (" (the context is full: a larger --ctx, or --kv-window to go on)"
            if st.extra.get("context_full") and not chat else "")
    return (f"{st.prompt_tokens} prompt tokens, {st.generated_tokens} generated, "
            f"TTFT {st.time_to_first_token * 1000:.0f} ms, {st.tokens_per_second:.1f} tok/s, "
            f"stop: {st.stop_reason}{full}{decoding_note(st.extra)}")


def as_json(text: str, st: GenerationStats, artifact: str) -> dict[str, Any]:
    """``run --json``: the reply and what it cost, one object."""
    return {"artifact": artifact, "text": text, "stop_reason": st.stop_reason,
            "prompt_tokens": st.prompt_tokens, "generated_tokens": st.generated_tokens,
            "time_to_first_token_s": round(st.time_to_first_token, 6), "total_s": round(st.total_time, 6),
            "tokens_per_second": round(st.tokens_per_second, 3), "context_full": bool(st.extra.get("context_full")),
            **({"speculative": st.extra["speculative"]} if st.extra.get("speculative") else {}),
            **kv_window_json(st.extra.get("kv") or {})}


def kv_window_json(kv: dict[str, Any]) -> dict[str, Any]:
    """``run --json``'s ``kv_window`` (what the text output's "KV window 1024 (4 sinks): N held, M evicted"
    says): its size, the sinks it always keeps, the tokens held at the end and those evicted; empty without
    a window."""
    if not kv.get("window"):
        return {}
    return {"kv_window": {"size": kv["window"], "sinks": kv.get("sinks"), "held": kv.get("cells"),
                          "evicted": kv.get("evicted", 0)}}


def stream(pieces: Iterator[str], write: Callable[[str], Any] | None) -> tuple[str, bool]:
    """Collect (and write, when ``write``) a reply; Ctrl-C stops it. Returns (text, interrupted)."""
    text: list[str] = []
    try:
        with contextlib.closing(pieces):  # closing cancels the generation in the backend
            for piece in pieces:
                text.append(piece)
                if write is not None:
                    write(piece)
    except KeyboardInterrupt:
        return "".join(text), True
    return "".join(text), False


def read_line(prompt: str) -> str:
    """``input`` with line editing and history where readline exists (a TTY on Linux and macOS); with GNU
    readline a paste comes back whole, its newlines included (see ``whole_pastes``)."""
    whole_pastes()
    return input(prompt)


@functools.cache
def whole_pastes() -> bool:
    """Import readline (which turns line editing on for ``input``) and, where it is GNU readline, turn its
    bracketed paste on: while it reads, readline asks the terminal to mark a paste (ESC[?2004h; ESC[?2004l
    when it returns, on Enter, Ctrl-C, Ctrl-D or a signal's exception) and puts what is between the marks in
    the line being edited, newlines and all; Enter then sends it. CPython turns the setting off (bpo-42819:
    its own REPL runs a line at a time); libedit has none. Returns whether a paste is one message: only when
    input() uses readline, that is when stdin and stdout are both terminals."""
    try:
        import readline
    except ImportError:
        return False
    gnu = getattr(readline, "backend", "editline" if "libedit" in (readline.__doc__ or "") else "readline")
    if gnu != "readline" or getattr(readline, "_READLINE_VERSION", 0) < 0x0700:  # the setting came in 7.0
        return False
    # a dumb terminal (Emacs' M-x shell) would print the codes; readline's own check for it ran at its start
    if os.environ.get("TERM", "dumb") in ("", "dumb"):
        return False
    readline.parse_and_bind("set enable-bracketed-paste on")
    return sys.stdin is not None and sys.stdout is not None and sys.stdin.isatty() and sys.stdout.isatty()


def read_message(read: Callable[[str], str]) -> str:
    """One message, from ``read`` (a line at a time, after its prompt; a paste may come as one "line" with
    newlines in it): a line; or, typed, a block from a line starting with \""" to one ending with \"""; or
    lines joined while they end with a backslash. Prompts with ``PROMPT``, then ``MORE``. A paste is taken as
    it is, never as opening, closing or going on, so a pasted Python file that starts with its docstring, or
    a shell line cut after a backslash, is sent as pasted. Ctrl-D (EOFError) inside a block or after a
    backslash ends the message there, as a closing \""" would: it is sent, and Ctrl-D at the next prompt ends
    the chat. EOFError at the first prompt and KeyboardInterrupt anywhere come from ``read`` (Ctrl-C drops what
    was typed of the message)."""
    line = _newlines(read(PROMPT))
    if "\n" in line:
        return line
    if line.strip().startswith(FENCE):
        rest = line.strip()[len(FENCE):]
        block: list[str] = []
        while "\n" in rest or not rest.rstrip().endswith(FENCE):
            block.append(rest)
            try:
                rest = _newlines(read(MORE))
            except EOFError:  # Ctrl-D ends the block: what was typed is the message
                return "\n".join(block)
        return "\n".join([*block, rest.rstrip()[:-len(FENCE)]])
    lines = [line]
    # as llama-cli: the newline stays, the backslash goes
    while "\n" not in lines[-1] and lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(_newlines(read(MORE)))
        except EOFError:  # Ctrl-D after a backslash: the message ends there
            break
    return "\n".join(lines)


def _newlines(text: str) -> str:
    # a terminal sends a pasted newline as CR; GNU readline 8 turns it into LF, but not every reader does
    return text.replace("\r\n", "\n").replace("\r", "\n")


def tidy(message: str) -> str:
    """What is sent of a message: without the spaces and blank lines around it, but with its first line's
    indent when it has more lines (a pasted block of code keeps its shape)."""
    text = message.rstrip()
    if lead := re.match(r"\s*\n", text):  # the blank lines before the first line with text
        text = text[lead.end():]
    return text if "\n" in text else text.strip()


def chat_repl(open_backend: Callable[[], Backend], sampling: SamplingConfig, *, system: str | None = None,
              raw: bool = False, show_stats: bool = True, read: Callable[[str], str] = read_line,
              out: TextIO | None = None) -> list[dict[str, str]]:
    """Chat until ``/exit`` or end of input; returns the conversation. ``read`` gives a line after a prompt
    (``read_message`` makes the messages). With ``raw`` each message is completed as plain text on its own
    (no template, so no conversation to keep)."""
    out = out or sys.stdout
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    first = len(messages)
    backend = open_backend()
    help_text = HELP.format(paste=" (a paste is one)" if read is read_line and whole_pastes() else "")
    say(err, dim(help_text))
    try:
        while True:
            try:
                text = tidy(read_message(read))
            except EOFError:  # Ctrl-D, or the end of piped input
                out.write("\n")
                break
            except KeyboardInterrupt:
                out.write("\n")
                say(err, dim("(/exit or Ctrl-D to leave)"))
                continue
            if not text:
                continue
            if text in EXIT:
                break
            if text == "/clear":
                del messages[first:]
                say(err, dim("conversation cleared"))
                continue
            if text in ("/help", "/?"):
                say(err, dim(help_text))
                continue
            if not raw:
                messages.append({"role": "user", "content": text})
            st = GenerationStats()
            try:
                reply, stopped = stream(backend.generate(text if raw else list(messages), sampling, st),
                                        lambda piece: (out.write(piece), out.flush()))
            except EdgekitError as exc:  # one turn failed (a prompt past the context...): the chat goes on
                if not raw:
                    messages.pop()
                more = "; /clear forgets the conversation" if len(messages) > first else ""
                say(err, f"{exc}{more}", "error:", "bold red")
                if isinstance(exc, BackendCrashed):
                    backend.close()
                    backend = open_backend()
                continue
            out.write("\n")
            out.flush()
            if not raw and reply:
                messages.append({"role": "assistant", "content": reply})
            if stopped:
                say(err, dim("stopped"))
            elif show_stats:
                say(err, dim(stats_line(st, chat=True)))
            if st.extra.get("context_full"):
                say(err, "the conversation fills the context: /clear to start over, or a larger --ctx",
                    "note:", "yellow")
    finally:
        backend.close()
    return messages


def dim(text: str) -> Any:
    from rich.text import Text

    return Text(text, style="dim")
