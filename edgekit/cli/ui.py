"""Console helpers: errors as one line and an exit code, rich progress bars as ProgressFn.

Messages carry user and data text (paths, model names, model output) that may hold brackets: they are
printed as :class:`rich.text.Text`, never parsed as rich markup, so ``x[/bold]y`` prints as itself and
cannot raise MarkupError; only the fixed tag before them is styled.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from edgekit.errors import DiskFullError, EdgekitError, InputError

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

CLOSED_STDOUT = "stdout is closed, so nothing could be written; run edgekit with stdout open (a file or a pipe)"


class Terminated(SystemExit):
    """SIGTERM (``kill``) or SIGHUP (the terminal closed), raised by the CLI's signal handler: it unwinds like
    Ctrl-C (temporary outputs removed) and exits 128 + the signal's number. :func:`handle_errors` says so in
    one line, with what was kept from its notes (as for Ctrl-C), unless ``said``: a command that printed its own
    last line (``serve``'s "stopped; every model unloaded")."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(128 + signum)
        self.signame = signal.Signals(signum).name
        self.said = False


def leave_quietly_on_broken_pipe() -> None:
    """stdout's reader went away (``| head``): nothing is wrong and nothing more is said. Exit 141 (128 +
    SIGPIPE, what a shell reports for ``cat`` or ``grep`` there) with stdout pointed at /dev/null, so that
    Python's last flush of it does not print an "Exception ignored ... BrokenPipeError" at exit."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    raise SystemExit(141)


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe or socket whose reader closed it (a broken pipe that is stdout's, not a
    worker's or a device's)."""
    try:
        import select

        fd = sys.stdout.fileno()
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poll.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


def stdin_is_tty() -> bool:
    """Whether stdin is a terminal (a closed stdin is not: it reads as empty)."""
    return sys.stdin is not None and sys.stdin.isatty()


def read_stdin() -> str:
    """All of stdin; a closed one reads as empty."""
    return "" if sys.stdin is None else sys.stdin.read()


def write_stdout(text: str) -> None:
    """Write ``text`` to stdout as UTF-8 and flush. A character that cannot be encoded (an undecodable byte
    of a path, kept by Python as a lone surrogate) is written as its escape ``\\udcXX``: inside a JSON string
    that is the JSON escape, which ``json.loads`` reads back to the same str (``os.fsencode`` of it gives the
    real bytes), instead of U+FFFD."""
    stream = sys.stdout
    if stream is None:
        raise OSError(errno.EBADF, CLOSED_STDOUT)
    data = text.encode("utf-8", "backslashreplace")
    buffer = getattr(stream, "buffer", None)
    stream.flush()
    if buffer is None:
        stream.write(data.decode("utf-8"))
        stream.flush()
    else:
        buffer.write(data)
        buffer.flush()


def print_json(data: Any, indent: int | None = 2) -> None:
    """Every ``--json`` document goes out here: plain JSON text and a newline, whatever FORCE_COLOR or
    TTY_COMPATIBLE say (never through rich, which would colour it and turn undecodable path bytes into
    U+FFFD)."""
    write_stdout(json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def print_table(console: Console, table: RenderableType) -> None:
    """A table that never cuts a cell short. In a terminal rich fits it to the width, wrapping only the
    columns allowed to wrap; where even that is too wide (a narrow terminal) it is printed as narrow as it can
    be and the terminal wraps its lines, rather than cropped. Anywhere else (a pipe, a file, a CI log) it is
    printed at its natural width, so ``edgekit ls | grep NAME`` finds a long name on its one line. Printed
    either of those two ways, its title is a line of its own (not padded with spaces to the table's width)."""
    from rich.measure import Measurement
    from rich.segment import Segments
    from rich.table import Table

    natural = Measurement.get(console, console.options.update_width(100_000), table)
    terminal = is_terminal(console)
    if terminal and natural.minimum <= console.width:
        console.print(table)
        return
    if isinstance(table, Table) and table.title:
        title, table.title = table.title, None
        say(console, title if isinstance(title, Text) else Text(str(title)))
    width = natural.minimum if terminal else natural.maximum
    console.print(Segments(console.render(table, console.options.update(width=width))), crop=False)


def is_terminal(console: Console) -> bool:
    """Whether the console writes to a real terminal (not what FORCE_COLOR or TTY_COMPATIBLE claim)."""
    try:
        return bool(console.file.isatty())
    except (AttributeError, OSError, ValueError):
        return False


def refuse_without_terminal(what: str, artifact: str = "ARTIFACT") -> None:
    """The terminal apps (``tui``, ``chat``) need a terminal on both stdin and stdout: without one (a script,
    a CI job) they would take over no screen and wait forever for keys; one line and exit 2 instead."""
    stdout_tty = sys.stdout is not None and sys.stdout.isatty()
    if not (stdin_is_tty() and stdout_tty):
        which = "stdin and stdout are" if not stdin_is_tty() and not stdout_tty else \
            "stdin is" if not stdin_is_tty() else "stdout is"
        raise InputError(f"{what} needs a terminal, and {which} not one; in a script use `edgekit run {artifact} "
                         "-p TEXT` (or -p - to read the prompt from stdin)")


def tagged(tag: str, style: str, message: str) -> Text:
    """``tag`` in ``style``, a space, then ``message`` exactly as given."""
    return Text.assemble((tag, style), " ", message)


def say(console: Console, message: str | Text, tag: str = "", style: str = "") -> None:
    """One message line, brackets and all; soft-wrapped so a long path stays one line in a pipe."""
    text = tagged(tag, style, str(message)) if tag else Text(message) if isinstance(message, str) else message
    console.print(text, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    say(err, message, "error:", "bold red")
    return typer.Exit(code)


def debugging() -> bool:
    """Whether EDGEKIT_DEBUG asks for tracebacks: set to anything but empty, 0, false, no or off."""
    return os.environ.get("EDGEKIT_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


_OURS = r"edgekit(\.|$)"


def notes_stay_notes() -> None:
    """Where the warning filters turn warnings into errors (``python -W error``, ``PYTHONWARNINGS=error``), a
    note edgekit's own code gives (the CPUs are busy, a cache could not be written) is still only shown: it
    must not abort the work it is about. A filter that shows the UserWarnings and RuntimeWarnings of edgekit's
    modules goes just before the first ``error`` filter, so the filters before it (an ``ignore``) still apply
    and other packages' warnings follow the filters as given. Call it where the filters were just copied
    (``catch_warnings``), which resets the registries of warnings already shown."""
    import re

    first = next((i for i, f in enumerate(warnings.filters) if f[0] == "error"), None)
    if first is None:
        return
    for category in (RuntimeWarning, UserWarning):  # EdgekitWarning is both
        entry = ("default", None, category, re.compile(_OURS), 0)
        if entry not in warnings.filters[:first]:
            warnings.filters.insert(first, entry)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    # A warning is a message to the user (a crash retried in safe mode, a slow path taken): one line,
    # not Python's file:line plus source echo.
    say(err, str(message), "warning:", "yellow")


def os_error_line(exc: OSError) -> tuple[str, int]:
    """The one line and exit code for an OSError no edgekit code turned into its own error: the reason and,
    when the error names one, the path (never an empty "()"); a full disk is exit 4 with its fix."""
    from edgekit.fslimits import is_disk_full  # not at start-up: only an error needs it

    what = exc.strerror or str(exc) or type(exc).__name__
    where = exc.filename if exc.filename not in (None, "") else None
    copies = exc.args[0] if exc.args and isinstance(exc.args[0], list) else None  # shutil.Error: (src, dst, why)s
    if copies and isinstance(copies[0], tuple) and len(copies[0]) == 3:
        what, where = str(copies[0][2]), copies[0][1]
    line = f"{what} ({where})" if where is not None and str(where) not in what else what
    if exc.errno == errno.EFBIG:  # a file size limit (ulimit -f) or the file system's, not a full disk
        from edgekit.fslimits import write_error

        mapped = write_error(exc, Path(where if where is not None else "the output"))
        if mapped is not None:
            return str(mapped), mapped.exit_code
    if is_disk_full(exc):
        return f"the disk filled up: {line}; free some space and retry", DiskFullError.exit_code
    return line, 1


THREAD_LIMIT = ("the limit on processes and threads{limit} stopped edgekit: it could not start a thread; raise "
                "the limit (ulimit -u) or end other programs of this user, then retry")


def thread_limit_line(known: bool = False) -> str | None:
    """The line to say when no thread can be started (the per-user process limit, ``ulimit -u``, or a
    container's): why a library gave up (OpenBLAS raises SIGINT, a fork fails with EAGAIN). Unless ``known``
    (Python's own "can't start new thread"), None when a thread starts now."""
    import threading

    if not known:
        try:
            threading.Thread(target=lambda: None, daemon=True).start()
        except RuntimeError:
            pass
        else:
            return None
    limit = ""
    with contextlib.suppress(ImportError, AttributeError, OSError, ValueError):
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NPROC)[0]
        limit = "" if soft == resource.RLIM_INFINITY else f" (ulimit -u {soft})"
    return THREAD_LIMIT.format(limit=limit)


class _Command:
    """The command :func:`handle_errors` runs outermost (a decorated function it calls is part of it): ``depth``
    of that nesting, and ``status``, the exit status it chose once it has finished (None until then)."""

    depth = 0
    status: int | None = None


def finished_status() -> int | None:
    """The exit status of the command once it has finished: 0 when it returned, else the one it chose after
    saying its last line (an error's code, 130, 143). None before it starts and while it runs. Its outputs are
    whole by then, so a SIGTERM or SIGHUP that lands afterwards changes nothing (see
    :func:`edgekit.cli.process.unwind_on_signals`)."""
    return _Command.status


def _exit_status(exc: BaseException) -> int:
    """The status a process ends with when ``exc`` leaves the command (typer.Exit, SystemExit, or an error)."""
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    return int(getattr(exc, "exit_code", 1))  # typer.Exit; typer.Abort and an error let through: 1


def say_terminated(exc: Terminated) -> None:
    """The one line of a SIGTERM or SIGHUP, with what a command kept from its notes (as for Ctrl-C); once."""
    if not exc.said:
        exc.said = True
        kept = "; ".join(getattr(exc, "__notes__", ()))
        what = "hung up" if exc.signame == "SIGHUP" else "terminated"
        say(err, f"{what} ({exc.signame}); {kept or 'nothing half-written was kept'}", "error:", "bold red")


def handle_errors(fn: F) -> F:
    """Turn edgekit errors into one line on stderr and a non-zero exit; never a traceback. The outermost one
    also records when its command has finished, and with which status (:func:`finished_status`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        outermost = _Command.depth == 0
        group = outermost and _subcommand_follows()  # known before it runs: nothing slow once it returned
        if outermost:
            _Command.status = None
        _Command.depth += 1
        try:
            result = _one_line_errors(fn, args, kwargs)
        except BaseException as exc:
            if outermost:
                _Command.status = _exit_status(exc)
            raise
        finally:
            _Command.depth -= 1
        if outermost and not group:
            _Command.status = 0
        return result

    return wrapper  # type: ignore[return-value]


def _subcommand_follows() -> bool:
    """Whether the function about to run is a command group's callback (``edgekit cache``), its subcommand
    still to run once it returns: the command has not finished then. Typer's own click (it vendors one) holds
    the context; the click package, where installed, is another module and never had one."""
    try:
        from typer._click.globals import get_current_context
    except ImportError:  # typer before it vendored click
        from click import get_current_context  # type: ignore[no-redef]

    ctx = get_current_context(silent=True)
    return ctx is not None and getattr(ctx, "invoked_subcommand", None) is not None


def _one_line_errors(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``fn(*args, **kwargs)`` with its errors said in one line (:func:`handle_errors`)."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            notes_stay_notes()
            return fn(*args, **kwargs)
    except EdgekitError as exc:
        raise fail(str(exc), exc.exit_code) from None
    except KeyboardInterrupt as exc:  # a note says what was kept on purpose (training progress...)
        if (line := thread_limit_line()) is not None:  # OpenBLAS raises SIGINT when it cannot start threads
            raise fail(line) from None
        kept = "; ".join(getattr(exc, "__notes__", ()))  # what stays on purpose, said instead
        raise fail(f"interrupted; {kept or 'nothing half-written was kept'}", 130) from None
    except Terminated as exc:  # `kill` or a closed terminal: unwound like Ctrl-C, and said like it
        say_terminated(exc)
        raise
    except MemoryError:
        raise fail("out of memory; close other programs or use a smaller model / --ctx", 137) from None
    except OSError as exc:
        if exc.errno == errno.EPIPE and stdout_reader_gone():  # `| head`: not an error
            leave_quietly_on_broken_pipe()
        if debugging():
            raise
        if exc.errno == errno.EAGAIN and (line := thread_limit_line()) is not None:  # fork() at the limit
            raise fail(line) from None
        raise fail(*os_error_line(exc)) from None
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as exc:  # a bug: still one line, with a way to see more
        if debugging():
            raise
        from edgekit.fslimits import is_disk_full

        if is_disk_full(exc):  # a writer that reports ENOSPC without an OSError (safetensors)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise fail(f"the disk filled up ({reason}); free some space and retry", DiskFullError.exit_code) from None
        if isinstance(exc, RuntimeError) and "start new thread" in str(exc):
            raise fail(str(thread_limit_line(known=True))) from None
        if isinstance(exc, Warning):  # another package's warning, which -W error / PYTHONWARNINGS made fatal
            raise fail(f"{type(exc).__name__}: {exc} (a warning, made an error by the warning filters: "
                       "-W error or PYTHONWARNINGS)") from None
        raise fail(f"internal error: {type(exc).__name__}: {exc} (set EDGEKIT_DEBUG=1 for the traceback)", 1) from None


def shown_when_started(progress: Callable[[str, int, int], None],
                       held: list[warnings.WarningMessage]) -> Callable[[str, int, int], None]:
    """``progress`` that first shows the warnings ``held`` back (a note on the CPUs' load): said once the
    job reports its first step, so a flag the job refuses is not preceded by a note about the work."""
    if not held:
        return progress

    def report(desc: str, done: int, total: int) -> None:
        while held:
            w = held.pop(0)
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        progress(desc, done, total)
    return report


def progress_unless_piped(as_json: bool) -> bool:
    """Whether a command that may print ``--json`` draws its progress (always on stderr): without ``--json``
    always; with it where stderr is a terminal (a person waiting minutes for one JSON document), never into a
    script's pipe or log."""
    return not as_json or bool(sys.stderr is not None and sys.stderr.isatty())


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """A ProgressFn drawing one rich bar per step description prefix (on stderr). Where stderr is not a
    terminal (a log, CI) a job that runs past :data:`LOG_QUIET_S` prints plain lines instead: each new
    phase, and the current step every :data:`LOG_EVERY_S`, so a long conversion shows it is alive."""
    if not enabled:
        yield lambda desc, done, total: None
        return
    if not sys.stderr.isatty() and not os.environ.get("EDGEKIT_PROGRESS"):
        yield _progress_lines()
        return
    bar = Progress(TextColumn("{task.description:<48.48}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=err, transient=False)
    task_id = None

    def update(desc: str, done: int, total: int) -> None:
        nonlocal task_id
        if task_id is None:
            task_id = bar.add_task(desc, total=total)
        bar.update(task_id, description=desc, completed=done, total=total)

    with bar:
        yield update


LOG_QUIET_S = 10.0
LOG_EVERY_S = 30.0


# A word naming the item a step works on, not its phase: a tensor (blk.3.attn_q.weight), a count (3/30), a
# type (Q4_K), a path or a label with digits (gen128, q4f16_1).
_ITEM = re.compile(r"\S*[\d./_]\S*")


def _phase(desc: str) -> str:
    """The phase a progress description belongs to: what comes before its first colon (after it, the step's
    detail), without the words that name the item (``encoding blk.3.attn_q.weight as Q4_K`` and ``layer 7/30``
    are one phase each, whatever the tensor or the layer)."""
    return _ITEM.sub("#", desc.split(":")[0])


def _progress_lines() -> Callable[[str, int, int], None]:
    import time

    start = time.monotonic()
    last, phase = 0.0, None

    def update(desc: str, done: int, total: int) -> None:
        nonlocal last, phase
        now = time.monotonic()
        head = _phase(desc)  # per phase, not per tensor: a 70B GGUF would print a line for each of 700
        if now - start < LOG_QUIET_S or (head == phase and now - last < LOG_EVERY_S):
            return
        last, phase = now, head
        err.print(Text(f"{desc} ({done}/{total}, {now - start:.0f} s)", style="dim"), soft_wrap=True)

    return update


DRAFT_HELP = ("A smaller model with the same tokenizer, in the target's format (GGUF or ONNX): speculative "
              "decoding (lossless, faster).")
SPEC_HELP = "'ngram': draft from the prompt itself (prompt lookup; rewrites, extraction)."
NDRAFT_HELP = "Fixed draft length (default: adaptive to the measured acceptance)."
WINDOW_HELP = "Keep at most this many tokens in the KV cache (attention sinks + recent): unbounded text, bounded memory."
SINKS_HELP = "With --kv-window: first tokens always kept (default 4)."
EXPERTS_HELP = ("Experts run per token by a mixture-of-experts GGUF (default: the file's count; 'all': every "
                "one). A --sparse-ffn file's experts are its cold clusters: fewer is faster, 'all' is the dense model.")


def decoding_options(draft: Path | None, speculative: str | None, n_draft: int | None, kv_window: int | None,
                     kv_sinks: int | None) -> dict[str, Any]:
    """Backend options for speculative decoding and the KV window, only those given (a backend that
    cannot do one refuses it by name)."""
    opts: dict[str, Any] = {"draft": str(draft) if draft else None, "speculative": speculative,
                            "n_draft": n_draft, "kv_window": kv_window}
    if kv_sinks is not None:
        if kv_window is None:
            raise InputError("--kv-sinks needs --kv-window")
        opts["kv_sinks"] = kv_sinks
    return {k: v for k, v in opts.items() if v is not None}
