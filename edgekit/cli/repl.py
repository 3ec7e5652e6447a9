"""``edgekit run`` without a prompt: a chat in the terminal, one line a turn, the conversation kept
for the session (as ``llama-cli`` and ``ollama run`` do); and ``run``'s one-shot reply and ``--json``.

The model is loaded once and every turn sends the whole conversation through its chat template. Ctrl-C
stops the reply being written (what was written stays in the conversation); at the prompt it only says
how to leave. ``/exit`` or Ctrl-D ends; ``/clear`` forgets the conversation.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from edgekit.cli.ui import err, say
from edgekit.errors import BackendCrashed, EdgekitError
from edgekit.runtime.base import Backend, GenerationStats, SamplingConfig

EXIT = ("/exit", "/quit", "/bye")
HELP = "a line is a message; /clear forgets the conversation; /exit or Ctrl-D ends; Ctrl-C stops a reply"


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
    """``input`` with line editing and history where readline exists (a TTY on Linux and macOS)."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - importing it is what turns line editing on for input()
    return input(prompt)


def chat_repl(open_backend: Callable[[], Backend], sampling: SamplingConfig, *, system: str | None = None,
              raw: bool = False, show_stats: bool = True, read: Callable[[str], str] = read_line,
              out: TextIO | None = None) -> list[dict[str, str]]:
    """Chat until ``/exit`` or end of input; returns the conversation. With ``raw`` each line is completed
    as plain text on its own (no template, so no conversation to keep)."""
    out = out or sys.stdout
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    first = len(messages)
    backend = open_backend()
    say(err, dim(HELP))
    try:
        while True:
            try:
                line = read(">>> ")
            except EOFError:  # Ctrl-D, or the end of piped input
                out.write("\n")
                break
            except KeyboardInterrupt:
                out.write("\n")
                say(err, dim("(/exit or Ctrl-D to leave)"))
                continue
            text = line.strip()
            if not text:
                continue
            if text in EXIT:
                break
            if text == "/clear":
                del messages[first:]
                say(err, dim("conversation cleared"))
                continue
            if text in ("/help", "/?"):
                say(err, dim(HELP))
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
