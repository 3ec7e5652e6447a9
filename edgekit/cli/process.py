"""The CLI as a process: what ``edgekit`` does around its commands so that a user's terminal and a script's
pipes get the same care. SIGTERM and SIGHUP unwind like Ctrl-C; a closed stdin reads as empty, a closed
stdout is one error line, and a reader that goes away (``| head``) ends it quietly with status 141."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable


def unwind_on_signals() -> None:
    """`kill` (SIGTERM) and a closed terminal or SSH session (SIGHUP) unwind like Ctrl-C, so temporary
    outputs are removed instead of left behind. A SIGHUP ignored on purpose (``nohup``) stays ignored."""
    import signal

    from edgekit.cli.ui import Terminated

    def leave(signum: int, frame: object) -> None:
        raise Terminated(signum)  # a SystemExit: exits 128 + signum; handle_errors says which signal

    signal.signal(signal.SIGTERM, leave)
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, leave)


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

    from edgekit.cli.ui import fail, leave_quietly_on_broken_pipe, os_error_line, stdout_reader_gone

    unwind_on_signals()
    std_streams_for_scripts()
    try:
        app()
    except OSError as exc:
        if exc.errno == errno.EPIPE and stdout_reader_gone():
            leave_quietly_on_broken_pipe()
        line, code = os_error_line(exc)
        fail(line, code)
        raise SystemExit(code) from None
    finally:
        flush_stdout()
