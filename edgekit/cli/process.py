"""The CLI as a process: what ``edgekit`` does around its commands so that a user's terminal and a script's
pipes get the same care. SIGTERM and SIGHUP unwind like Ctrl-C; a closed stdin reads as empty, a closed
stdout is one error line, and a reader that goes away (``| head``) ends it quietly with status 141. Whatever
the locale says, it runs in Python's UTF-8 mode and its output never fails on a character the terminal's
encoding cannot show; started in a folder that was deleted, it says so before anything else."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable

GONE_CWD = "the current folder no longer exists (it was deleted or moved); cd to one that does and run edgekit again"
_UTF8_REEXEC = "EDGEKIT_UTF8_REEXEC"  # set for the one re-execution in UTF-8 mode: never a second


def refuse_deleted_working_folder() -> None:
    """A shell left in a folder that was then deleted: relative paths, ``--dir .``, and libraries that look up
    their own files from it (torch's oneMKL aborts the process) would each fail their own way, later. One
    line and exit 2 first."""
    from edgekit.cli.ui import fail

    try:
        os.getcwd()
    except FileNotFoundError:
        fail(GONE_CWD, 2)
        raise SystemExit(2) from None


def _is_utf8(encoding: str | None) -> bool:
    import codecs

    try:
        return codecs.lookup(encoding or "ascii").name == "utf-8"
    except LookupError:
        return False


def ensure_utf8_mode() -> None:
    """Start again, once, in Python's UTF-8 mode (``-X utf8``, the default from Python 3.15 on, PEP 686) where
    the locale is not UTF-8 (``LC_ALL=C PYTHONUTF8=0``, ``en_US.ISO-8859-1``): model files, tokenizer JSON,
    paths and prompts are UTF-8 whatever the locale, and in a locale's encoding a path or prompt with a
    character it cannot hold (日本 in ISO-8859-1) is unreadable, or read as other text. The command line is
    started again as given (``sys.orig_argv``: the interpreter's own options, ``-m edgekit`` or the script),
    its bytes unchanged; PYTHONUTF8=1 puts the processes edgekit starts (its model workers) in UTF-8 mode too.
    Where it cannot be started again (Windows, no interpreter path), it goes on as it is."""
    if os.environ.pop(_UTF8_REEXEC, None) is not None or sys.flags.utf8_mode or os.name == "nt":
        return
    import locale

    if _is_utf8(sys.getfilesystemencoding()) and _is_utf8(locale.getpreferredencoding(False)):
        return
    argv = getattr(sys, "orig_argv", None)
    if not sys.executable or not argv:
        return
    env = {**os.environ, "PYTHONUTF8": "1", _UTF8_REEXEC: "1"}  # -X utf8 too: -E and -I ignore PYTHONUTF8
    with contextlib.suppress(OSError):  # could not start it: go on in the locale's encoding
        os.execve(sys.executable, [argv[0], "-X", "utf8", *argv[1:]], env)


def text_streams_for_any_text() -> None:
    """stdout and stderr write any text, whatever encoding the locale or PYTHONIOENCODING gives them: a
    character the encoding cannot hold (± in ASCII, an undecodable byte of a path) is written as its escape
    (``\\xb1``), instead of failing the command at its last line with its results. stdin is read as UTF-8;
    bytes that are not UTF-8 are kept (as surrogates) for the prompt check to name."""
    forgiving = {"backslashreplace", "replace", "namereplace", "xmlcharrefreplace", "ignore"}
    for stream in (sys.stdout, sys.stderr):
        errors = getattr(stream, "errors", None)
        if errors in forgiving or (errors == "surrogateescape" and _is_utf8(getattr(stream, "encoding", None))):
            continue  # UTF-8 with surrogateescape (UTF-8 mode) holds every character and keeps a path's bytes
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    stdin = sys.stdin
    if not (_is_utf8(getattr(stdin, "encoding", None)) and getattr(stdin, "errors", None) == "surrogateescape"):
        with contextlib.suppress(AttributeError, ValueError, OSError):  # nothing read yet, so it can change
            stdin.reconfigure(encoding="utf-8", errors="surrogateescape")  # type: ignore[union-attr]


def unwind_on_signals() -> None:
    """`kill` (SIGTERM) and a closed terminal or SSH session (SIGHUP) unwind like Ctrl-C, so temporary
    outputs are removed instead of left behind. A SIGHUP ignored on purpose (``nohup``) stays ignored.

    Once the command has finished (:func:`~edgekit.cli.ui.finished_status`) there is nothing left to unwind:
    its outputs are whole, and the status it chose (0: the artifact asked for exists) is what the script that
    sent the signal reads, as it would had the signal come a moment later and found the process gone. A
    silent 143 there would say "interrupted" about a complete artifact. A second signal means the process is
    not leaving (a thread it waits for): it leaves at once, with the same status."""
    import signal

    from edgekit.cli.ui import Terminated, finished_status

    late: list[int] = []

    def leave(signum: int, frame: object) -> None:
        if signum == getattr(signal, "SIGHUP", None):
            streams_of_a_closed_terminal_to_devnull()
        status = finished_status()
        if status is None:
            raise Terminated(signum)  # a SystemExit: exits 128 + signum; handle_errors says which signal
        if late:
            raise SystemExit(status)
        late.append(signum)  # absorbed: a raise here, in an atexit callback, would print a traceback

    signal.signal(signal.SIGTERM, leave)
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, leave)
    if not _ignored_at_exit:
        import atexit

        _ignored_at_exit.append(True)
        atexit.register(ignore_signals_while_exiting)  # registered first, so it runs last


_ignored_at_exit: list[bool] = []


def ignore_signals_while_exiting() -> None:
    """The last step before the interpreter's own teardown: the exit status is chosen, every output whole or
    removed. Python then puts its signal handlers back to the default, which kills: a SIGTERM, SIGHUP or Ctrl-C in
    those last milliseconds would end a finished conversion "killed by SIGTERM" (-15) instead of with its status.
    From here on they are ignored (a handler set to ignore is left so)."""
    import signal

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def streams_of_a_closed_terminal_to_devnull() -> None:
    """A SIGHUP from a terminal that closed (a terminal window, an SSH session): stdout and stderr, where they
    were that terminal, now fail every write (EIO), so the hangup's own line, Python's last flush and anything
    said while unwinding would end the process with "lost sys.stderr" (exit 1) instead of 129. They go to
    /dev/null instead: nobody is there to read them. A stream that is a file, a pipe with its reader, or a
    terminal still open (``kill -HUP``) is kept: the line is said there."""
    import select

    for fd in (1, 2):
        try:
            poll = select.poll()
            poll.register(fd, select.POLLOUT)
            if not any(ev & (select.POLLHUP | select.POLLERR) for _, ev in poll.poll(0)):
                continue
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, fd)
            finally:
                os.close(devnull)
        except (OSError, ValueError):
            continue


def std_streams_for_scripts() -> None:
    """What a script or CI job may hand edgekit: a closed stdin reads as empty (``run`` says so, exit 2); to a
    closed stdout every write fails with one line on stderr (exit 1) instead of output silently dropped; and a
    reader of stdout that goes away (``| head``) ends edgekit quietly with status 141, for rich's output (tables,
    ``--help``) as for the rest."""
    from rich.console import Console

    from edgekit.cli.ui import CLOSED_STDOUT, leave_quietly_on_broken_pipe

    if sys.stdin is None:
        sys.stdin = open(os.devnull, encoding="utf-8")  # for the whole run; takes fd 0 again
    if sys.stdout is None:
        import errno
        import io

        class ClosedStdout(io.TextIOBase):
            def write(self, s: str) -> int:
                raise OSError(errno.EBADF, CLOSED_STDOUT)

        os.open(os.devnull, os.O_WRONLY)  # fd 1 again: the next file opened (a model) does not become stdout
        sys.stdout = ClosedStdout()

    def on_broken_pipe(self: Console) -> None:
        self.quiet = True
        leave_quietly_on_broken_pipe()

    Console.on_broken_pipe = on_broken_pipe  # type: ignore[method-assign]  # Typer's help consoles too


def flush_stdout() -> None:
    """Write what is still buffered for stdout now, where a failure can be said: its reader gone, quietly
    (141); any other error (a full disk) in one line, exit 1. Either way Python's own flush at exit then has
    nothing left to fail on (no "Exception ignored" message)."""
    from edgekit.cli.ui import fail, leave_quietly_on_broken_pipe, os_error_line, stdout_reader_gone

    try:
        sys.stdout.flush()
    except OSError as exc:
        if isinstance(exc, BrokenPipeError) or stdout_reader_gone():
            leave_quietly_on_broken_pipe()
        line, code = os_error_line(exc)
        fail(f"writing stdout: {line}", code)
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(code) from None


def run(app: Callable[[], object]) -> None:
    """Run the CLI ``app`` as a process a user or a script starts: signals unwind like Ctrl-C, the standard
    streams are what a script may hand it, and an error met outside any command (``--help`` to a closed
    stdout) is one line too, never a traceback."""
    import errno

    from edgekit.cli.ui import (
        Terminated,
        debugging,
        fail,
        leave_quietly_on_broken_pipe,
        os_error_line,
        say_terminated,
        stdout_reader_gone,
    )

    refuse_deleted_working_folder()
    ensure_utf8_mode()
    unwind_on_signals()
    std_streams_for_scripts()
    text_streams_for_any_text()
    try:
        app()
    except Terminated as exc:  # before a command started (or as it returned): said here, never a silent 143
        say_terminated(exc)
        raise
    except OSError as exc:
        if exc.errno == errno.EPIPE and stdout_reader_gone():
            leave_quietly_on_broken_pipe()
        if debugging():  # EDGEKIT_DEBUG: the traceback handle_errors let through
            raise
        line, code = os_error_line(exc)
        fail(line, code)
        raise SystemExit(code) from None
    finally:
        flush_stdout()
