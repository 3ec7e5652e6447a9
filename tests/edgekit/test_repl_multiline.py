"""``edgekit run``'s chat (edgekit/cli/repl.py) takes a message of several lines as one turn: a paste (the
terminal's bracketed paste, through GNU readline), a block between \""" lines, lines ending with a backslash;
and stdin that is not a terminal is still one prompt, as before."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgekit.cli import repl
from edgekit.runtime.base import SamplingConfig

ROOT = Path(__file__).resolve().parents[2]
needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python missing")


class Recorder:
    """A backend that records the last message of each turn (or the raw text) and replies "ok"."""

    def __init__(self):
        self.sent: list[str] = []

    def generate(self, messages, sampling, stats):
        self.sent.append(messages if isinstance(messages, str) else messages[-1]["content"])
        yield "ok"

    def close(self):
        pass


def _chat(lines, **kwargs):
    """Chat with ``lines`` as what each ``read`` returns (an exception class is raised); returns what was sent
    and the prompts read was given."""
    feed, prompts, backend = iter(lines), [], Recorder()

    def read(prompt):
        prompts.append(prompt)
        line = next(feed, EOFError)
        if isinstance(line, type):
            raise line
        return line

    repl.chat_repl(lambda: backend, SamplingConfig(), read=read, out=io.StringIO(), show_stats=False,
                   **kwargs)
    return backend.sent, prompts


def test_a_triple_quoted_block_is_one_message_with_a_continuation_prompt():
    sent, prompts = _chat(['"""', "def f():", "    return 1", "", '"""', "next"])
    assert sent == ["def f():\n    return 1", "next"]
    assert prompts == [">>> ", "... ", "... ", "... ", "... ", ">>> ", ">>> "]


def test_ollamas_forms_text_on_the_opening_and_closing_lines():
    sent, _ = _chat(['"""Summarise:', "one", 'two"""', '"""just this"""',
                     '  """', "indented fences", '  """  '])
    assert sent == ["Summarise:\none\ntwo", "just this", "indented fences"]


def test_a_backslash_ending_a_line_goes_on_to_the_next():
    sent, prompts = _chat(["first \\", "second\\", "third", "alone"])
    assert sent == ["first \nsecond\nthird", "alone"]
    assert prompts == [">>> ", "... ", "... ", ">>> ", ">>> "]


def test_a_paste_is_sent_as_it_is():
    """What GNU readline gives back for a paste (newlines in one line) opens no block and goes on to nothing:
    a Python file that starts with its docstring, a shell line cut after a backslash. Inside a block, a paste
    that ends with \""" does not close it."""
    module = '"""Module doc.\n\nMore."""\nimport os'
    sent, _ = _chat([module, "x = 1 \\\ny = 2 \\", '"""', 'code\n    """doc"""', '"""'])
    assert sent == [module, "x = 1 \\\ny = 2 \\", 'code\n    """doc"""']


def test_a_paste_keeps_its_shape_and_a_line_is_stripped_as_before():
    sent, _ = _chat(["\n \n    indented first\n\n  second \n\n", "  plain  ", "a\r\nb\rc", "   ", ""])
    assert sent == ["    indented first\n\n  second", "plain", "a\nb\nc"]


def test_ctrl_c_drops_the_block_being_typed():
    sent, prompts = _chat(['"""', "half", KeyboardInterrupt, "whole"])
    assert sent == ["whole"] and prompts == [">>> ", "... ", "... ", ">>> ", ">>> "]


def test_raw_completes_a_block_as_one_text():
    sent, _ = _chat(['"""', "Once upon", "a time", '"""', "The river"], raw=True)
    assert sent == ["Once upon\na time", "The river"]


def test_the_help_says_what_a_message_is(monkeypatch):
    said: list[str] = []
    monkeypatch.setattr(repl, "say", lambda _file, text, *a, **k: said.append(str(text)))
    _chat(["/help"])
    assert said[0] == said[1] and '"""' in said[0] and "a line is a message" not in said[0]
    assert "paste" not in said[0]  # a reader of its own: whether a paste is whole is not known


# -- in a terminal: GNU readline's bracketed paste ----------------------------------------------------------

ON, OFF = b"\x1b[?2004h", b"\x1b[?2004l"
ECHO = """
import json
from edgekit.cli import repl
from edgekit.runtime.base import SamplingConfig

class Echo:
    def generate(self, messages, sampling, stats):
        if messages[-1]["content"] == "boom":
            raise RuntimeError("boom")
        yield "<<" + json.dumps(messages[-1]["content"]) + ">>"

    def close(self):
        pass

repl.chat_repl(Echo, SamplingConfig(), show_stats=False)
"""


def _gnu_readline() -> bool:
    try:
        import readline
    except ImportError:
        return False
    return "libedit" not in (readline.__doc__ or "") and getattr(readline, "_READLINE_VERSION", 0) >= 0x0700


needs_readline = pytest.mark.skipif(not _gnu_readline(), reason="GNU readline (7.0 or later) missing")


class Terminal:
    """A program in a pseudo-terminal, driven as a person at an xterm would: it waits for what the program
    writes (never a fixed time) and pastes as a terminal does, in bracketed-paste marks only while the program
    has asked for them, with newlines sent as CR."""

    def __init__(self, args: list[str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # pragma: no cover - the child
            os.chdir(ROOT)
            os.environ.update(TERM="xterm", INPUTRC="/dev/null")  # no inputrc of the machine's
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # a suite run in the background ignores it
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            os.execv(sys.executable, [sys.executable, *args])
        self.out, self.seen, self.status = b"", 0, None

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc) -> None:
        if self.status is None:  # a failed test: the program goes with it
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            os.close(self.fd)

    def expect(self, text: bytes, timeout: float = 60) -> bytes:
        """Wait for ``text`` after what was expected before; returns the output up to it."""
        end = time.monotonic() + timeout
        while (i := self.out.find(text, self.seen)) < 0:
            assert time.monotonic() < end, f"no {text!r} in {self.out!r}"
            assert self._read(0.5), f"it ended without {text!r}: {self.out!r}"
        before, self.seen = self.out[self.seen:i], i + len(text)
        return before

    def type(self, text: str) -> None:
        os.write(self.fd, text.replace("\n", "\r").encode())

    def paste(self, text: str) -> None:
        body = text.replace("\n", "\r").encode()
        bracketed = self.out.rfind(ON) > self.out.rfind(OFF)
        os.write(self.fd, b"\x1b[200~" + body + b"\x1b[201~" if bracketed else body)

    def wait(self, timeout: float = 60) -> int:
        """The program's exit status, once it has ended (its output read to the end)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            open_ = self._read(0.5)
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                while self._read(0):  # what it wrote last
                    pass
                os.close(self.fd)
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
            if not open_:  # EIO: it closed the terminal and is about to be gone
                time.sleep(0.1)
        raise AssertionError(f"it did not end: {self.out!r}")

    def quiet(self, wait: float) -> bool:
        """Whether the program wrote nothing for ``wait`` seconds."""
        before = len(self.out)
        self._read(wait)
        return len(self.out) == before

    def _read(self, wait: float) -> bool:
        """Read what comes within ``wait`` seconds; False once the terminal is closed and read to the end."""
        if select.select([self.fd], [], [], wait)[0]:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # EIO: the program has closed the terminal
                return False
            self.out += chunk
            return bool(chunk)
        return wait > 0

    def replies(self) -> list[str]:
        return [json.loads(m) for m in re.findall(rb"<<(.*?)>>", self.out)]


PASTED = "first line\n\n    second, indented\nthird"


def _bracketed_paste_asked_and_taken_back(out: bytes) -> bool:
    """readline asked for the marks at each prompt and took the request back each time, the last one
    included."""
    return out.count(ON) == out.count(OFF) > 0 and out.rfind(OFF) > out.rfind(ON)


@needs_readline
@pytest.mark.parametrize("leave", ["\x04", "/exit\n", "boom\n"], ids=["ctrl-d", "exit", "an-exception"])
def test_a_paste_is_one_message_in_a_terminal_and_the_mode_is_restored(leave):
    with Terminal(["-c", ECHO]) as term:
        term.expect(b">>> ")
        term.paste(PASTED)
        term.type("\n")  # a paste is in the line being edited: Enter sends it
        term.expect(b">>> ")
        assert term.replies() == [PASTED], term.out  # one turn, not one a line
        term.type('"""\n')
        term.expect(b"... ")
        term.type("typed one\n")
        term.expect(b"... ")
        term.paste('a paste\n  in a block"""')
        term.type("\n")
        term.expect(b"... ")
        term.type('"""\n')
        term.expect(b">>> ")
        term.type("go on \\\n")
        term.expect(b"... ")
        term.type("here\n")
        term.expect(b">>> ")
        term.type(leave)
        rc = term.wait()
    assert term.replies() == [PASTED, 'typed one\na paste\n  in a block"""', "go on \nhere"], term.out
    assert rc == (1 if leave == "boom\n" else 0), term.out
    assert _bracketed_paste_asked_and_taken_back(term.out), term.out


@needs_readline
def test_ctrl_c_in_a_terminal_drops_the_block_and_restores_the_mode():
    with Terminal(["-c", ECHO]) as term:
        term.expect(b">>> ")
        term.type('"""\n')
        term.expect(b"... ")
        term.type("half\n")
        term.expect(b"... ")
        term.type("\x03")
        # A SIGINT that lands before readline waits for a key is only acted on at the next key (CPython
        # checks for signals when select is interrupted, or back in Python): Enter brings it out, and is
        # harmless at a fresh prompt if the Ctrl-C had been seen after all. Never a second SIGINT: it could
        # land in the first one's handler.
        end = time.monotonic() + 120
        while b"Ctrl-D to leave" not in term.out[term.seen:]:
            assert time.monotonic() < end, term.out
            if term.quiet(3):
                term.type("\n")
        term.expect(b"Ctrl-D to leave")
        term.expect(b">>> ")
        term.type("whole\n")
        term.expect(b'<<"whole">>')
        term.expect(b">>> ")
        term.type("\x04")
        assert term.wait() == 0, term.out
    assert term.replies() == ["whole"], term.out
    assert _bracketed_paste_asked_and_taken_back(term.out), term.out


@needs_llama
@needs_readline
def test_edgekit_run_answers_a_paste_once(tiny_gguf):
    with Terminal(["-m", "edgekit.cli.main", "run", str(tiny_gguf), "--temp", "0", "-n", "2", "-c", "256",
                   "-t", "1"]) as term:
        term.expect(b">>> ", timeout=300)  # the model loads first
        term.paste(PASTED)
        term.type("\n")
        term.expect(b"prompt tokens")
        term.expect(b">>> ")
        term.type("\x04")
        assert term.wait() == 0, term.out
    assert len(re.findall(rb"\d+ prompt tokens", term.out)) == 1, term.out  # one turn, not three
    assert b"(a paste is one)" in term.out and b"Traceback" not in term.out
    assert _bracketed_paste_asked_and_taken_back(term.out), term.out


# -- stdin not a terminal: all of it one prompt, as before -----------------------------------------

@needs_llama
def test_piped_stdin_is_still_one_prompt_not_a_chat(tiny_gguf):
    def run(*args, stdin):
        cmd = [sys.executable, "-m", "edgekit.cli.main", "run", str(tiny_gguf), *args,
               "--temp", "0", "-n", "4", "-c", "128", "-t", "1"]
        res = subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert res.returncode == 0 and ">>>" not in res.stdout + res.stderr, res.stderr
        return json.loads(res.stdout) if "--json" in args else res

    piped = run("--json", stdin="hi\nthere\n")  # printf 'hi\nthere\n' | edgekit run ART --json
    given = run("--json", "-p", "hi\nthere", stdin="")
    assert piped["prompt_tokens"] == given["prompt_tokens"] and piped["text"] == given["text"]
    assert run("--json", stdin="hi\n")["prompt_tokens"] < piped["prompt_tokens"]  # both lines: one prompt
    plain = run(stdin="hi\nthere\n")  # printf 'hi\nthere\n' | edgekit run ART: one reply, one stats line
    assert plain.stdout == given["text"] + "\n" and plain.stderr.count("prompt tokens") == 1, plain.stderr


def test_ctrl_d_inside_a_block_or_after_a_backslash_sends_what_was_typed():
    """QA s57: Ctrl-D in an open \""" block ended the whole chat and dropped the message without a word; many
    press Ctrl-D to finish input. It ends the message instead (as the closing \""" would); Ctrl-D at the next
    prompt ends the chat."""
    sent, prompts = _chat(['"""', "abc", "def", EOFError, "after"])
    assert sent == ["abc\ndef", "after"]
    assert prompts == [">>> ", "... ", "... ", "... ", ">>> ", ">>> "]
    sent, _ = _chat(["one \\", "two \\", EOFError, EOFError, "never read"])
    assert sent == ["one \ntwo"]
    sent, _ = _chat(['"""', EOFError, "next"])  # an empty block sends nothing
    assert sent == ["next"]
    sent, _ = _chat(['"""', "kept", KeyboardInterrupt, "next"])  # Ctrl-C still drops it
    assert sent == ["next"]
