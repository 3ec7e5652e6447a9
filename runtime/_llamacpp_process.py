"""The llama.cpp worker process as :class:`edgekit.runtime.llamacpp.LlamaCppBackend` drives it: starting it
(retried once in safe CPU mode after a protection fault), the JSON-line pipes and their reader threads,
routing replies to the request that asked, closing it, and turning its deaths and errors into
one-line messages. A mixin of the backend: it reads the backend's ``_config``, ``model_path``,
``safe_cpu``, ``retry_safe``, ``verbose`` and the state ``__init__`` sets up."""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgekit.errors import BackendCrashed, BackendError, DiskFullError, EdgekitError, InputError, notice
from edgekit.native_path import utf8_path
from edgekit.runtime import llamacpp_build
from edgekit.runtime.llamacpp_errors import (
    PROTECTION_FAULTS,
    crash_message,
    load_error,
    log_hint,
    shown_name,
    signal_name,
)

WORKER = Path(__file__).with_name("_llamacpp_worker.py")
EOF = object()
# what Python, libgomp and OpenBLAS print when the system refuses a thread (the per-user process limit)
THREAD_LIMIT = ("can't start new thread", "Thread creation failed", "pthread_create failed")


class WorkerProcess:
    """Process plumbing of the llama.cpp backend (see the module docstring)."""

    _proc: subprocess.Popen[bytes] | None
    _config: dict[str, Any]
    model_path: Path
    safe_cpu: bool
    retry_safe: bool
    verbose: bool

    def close(self) -> None:
        """Stop the worker (politely: stdin EOF; then by force) and remove temporary files."""
        proc = self._proc
        if proc is not None and proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
        self._reap()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        self._gone = self._gone or "it is closed"

    def _reap(self) -> int | None:
        """Wait for the worker to exit (killing it if it hangs), close its pipes; its exit status."""
        proc, self._proc = self._proc, None
        self._active = None
        if proc is None:
            return None
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait(timeout=5)
        for t in self._threads:
            # a start that failed (the thread limit) leaves one never started; a collection of the backend
            # that a reader thread happened to trigger runs there
            if t.ident is not None and t is not threading.current_thread():
                t.join(timeout=2)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        return rc

    def __del__(self) -> None:
        # The reader threads hold no reference to the backend, so one nobody holds is collected and its worker
        # stopped here; as an unclosed file does, it says so (a ResourceWarning: shown with -X dev or -W).
        if getattr(self, "_proc", None) is not None:
            try:
                warnings.warn(f"unclosed llama.cpp backend {shown_name(self.model_path)} (pid {self._proc.pid}); "
                              "close() it or use it in a with block", ResourceWarning, stacklevel=2, source=self)
            except Exception:  # noqa: BLE001 - a filter that raises, or interpreter shutdown
                pass
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _route(self, rid: int) -> queue.Queue[Any]:
        route: queue.Queue[Any] = queue.Queue()
        with self._routes_lock:
            self._routes[rid] = route
        return route

    def _recv_route(self, route: queue.Queue[Any], doing: str) -> dict[str, Any]:
        msg = route.get()
        if msg is EOF:
            route.put(EOF)
            raise self._crashed(doing)
        return msg

    # -- one user at a time -----------------------------------------------------------------------
    # ``_busy`` is the thread inside a call right now (for a generation: its consumer while in ``next()``),
    # ``_active`` the generation still streaming, paused or not; ``_claim_lock`` makes checking and taking
    # them one step, so of two threads that start a call at once exactly one runs.

    def _take_over(self, rid: int | None = None) -> None:
        """Make this thread the one using the worker. Another thread inside a call right now is refused: both
        would read one queue of replies (one hung, the other cut short). A generation still streaming whose
        consumer is not pulling it (it stopped early, or this or another thread starts another call) is
        cancelled and its messages drained; its iterator then ends as cancelled. With ``rid``: only that
        generation (its own iterator closing early), and nothing if another call has already ended it."""
        me = threading.current_thread()
        with self._claim_lock:
            if rid is not None and self._active != rid:
                return
            if self._busy is not None and self._busy is not me:
                raise BackendError("this backend is in use in another thread (generating text, or another call); "
                                   "give each thread its own backend, or load it with n_seq=N to run N generations "
                                   "at once")
            rid, self._active = self._active, None
            self._busy = me
        if rid is None or self._proc is None:
            return
        self._send({"op": "cancel", "id": rid})
        while True:
            msg = self._recv("stopping a generation", rid)
            if msg["ev"] in ("done", "error"):
                return

    def _resume(self, rid: int) -> bool:
        """A paused generation's consumer pulls again: this thread uses the worker again, unless another
        call has taken it (False: the generation was cancelled)."""
        with self._claim_lock:
            if self._active != rid:
                return False
            self._busy = threading.current_thread()
            return True

    def _release(self) -> None:
        with self._claim_lock:
            if self._busy is threading.current_thread():
                self._busy = None

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One call using the worker (:meth:`_take_over`), which is free again when it returns."""
        nested = self._busy is threading.current_thread()
        try:
            self._take_over()
            yield
        finally:
            if not nested:
                self._release()

    # -- worker plumbing ------------------------------------------------------------------------

    def _start_with_retry(self) -> None:
        try:
            self._start(self.safe_cpu)
        except BackendCrashed as exc:
            if not self._can_retry_safe(exc):
                raise
            self._restart_safe(exc)

    def _can_retry_safe(self, exc: BackendCrashed | None = None) -> bool:
        if exc is not None and exc.signal not in PROTECTION_FAULTS:
            return False
        return self.retry_safe and not self.safe_cpu and not self._decoded

    def _restart_safe(self, exc: BackendCrashed) -> None:
        self._warn(f"{exc} - retrying once in safe CPU mode (slower)")
        with self._exclusive():
            self.close()
            self.safe_cpu = True
            self._start(True)

    def _warn(self, message: str) -> None:
        if self._on_warning is not None:
            self._on_warning(message)
        else:
            notice(message, stacklevel=4)  # a note to the user: never raised by an error filter

    def _load_request(self) -> dict[str, Any]:
        """The config with its model paths as llama.cpp can open them: a name that is not UTF-8 through a link
        in the temporary folder (:func:`edgekit.native_path.utf8_path`), which ``close`` removes and each start makes."""
        cfg = dict(self._config, model_path=utf8_path(self._config["model_path"], "llama.cpp", self._tempdir))
        spec = cfg["speculative"]
        if "draft_path" in spec:
            cfg["speculative"] = dict(spec, draft_path=utf8_path(spec["draft_path"], "llama.cpp", self._tempdir))
        return cfg

    def _start(self, safe_cpu: bool) -> None:
        load = self._load_request()  # first: a path no link can help is refused before a worker starts
        self._inbox = queue.Queue()
        self._stderr_tail.clear()
        self._decoded = False
        self._threads = []
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        prefix = wrapper_command()
        try:
            self._proc = subprocess.Popen(
                [*prefix, sys.executable, str(WORKER)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                close_fds=True,
            )
        except OSError as exc:
            raise start_error(exc, prefix) from None
        # plain functions, not bound methods: a thread holding the backend would keep it from ever being
        # collected (and its worker from being stopped) when its user drops it without close()
        self._threads = [
            threading.Thread(target=read_stdout, args=(self._proc, self._inbox, self._routes, self._routes_lock),
                             daemon=True),
            threading.Thread(target=read_stderr, args=(self._proc, self._stderr_tail, self.verbose), daemon=True),
        ]
        try:
            for t in self._threads:
                t.start()
        except RuntimeError:  # "can't start new thread": the per-user process/thread limit
            self._proc.kill()
            raise BackendError(limit_message("could not start the llama.cpp worker's reader threads")) from None
        t0 = time.perf_counter()
        self._send({"op": "load", "id": 0, **load, "safe_cpu": safe_cpu})
        msg = self._recv("loading", None)
        if msg["ev"] == "error":
            self._reap()
            raise self._load_error(msg)
        if "draft_path" in (msg.get("speculative") or {}):  # the user's path, not the link it was loaded through
            msg["speculative"]["draft_path"] = self._config["speculative"]["draft_path"]
        self._info = msg
        self._gone = ""
        self.load_time = time.perf_counter() - t0

    def _send(self, msg: dict[str, Any]) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise BackendError(f"the llama.cpp model is not loaded ({self._gone}); load it again")
        try:
            with self._send_lock:  # batched generations send from several threads
                proc.stdin.write((json.dumps(msg) + "\n").encode("utf-8"))
                proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # the worker died: _recv sees its EOF and reports how

    def _recv(self, doing: str, rid: int | None) -> dict[str, Any]:
        """The next message of request ``rid`` (stale ones are skipped); a dead worker raises."""
        while True:
            msg = self._inbox.get()
            if msg is EOF:
                raise self._crashed(doing)
            if rid is None or msg.get("id") in (rid, None):
                return msg

    def _call(self, op: str, doing: str, **kwargs: Any) -> Any:
        with self._exclusive():
            rid = next(self._ids)
            self._send({"op": op, "id": rid, **kwargs})
            msg = self._recv(doing, rid)
        if msg["ev"] == "error":
            raise self._error_from(msg, doing)
        return msg.get("value")

    def _tempdir(self) -> str:
        """The folder the worker writes arrays (logits) into, made on first use under ``TMPDIR``."""
        if self._tmpdir is None:
            try:
                self._tmpdir = tempfile.mkdtemp(prefix="edgekit-llamacpp-")
            except OSError as exc:
                folder = tempfile.gettempdir()
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DiskFullError(f"the temporary folder {folder} is full; free space there or set "
                                        "TMPDIR to a folder with room") from None
                raise InputError(f"cannot make a folder in the temporary folder {folder} "
                                 f"({exc.strerror or exc}); set TMPDIR to a writable folder") from None
        return self._tmpdir

    # -- error messages -------------------------------------------------------------------------

    def _log_hint(self, *needles: str) -> str:
        return log_hint(self._stderr_tail, *needles)

    def _crashed(self, doing: str) -> BackendError:
        rc = self._reap()
        self._gone = "its worker crashed"
        sig = signal_name(rc)
        if self._log_hint(*THREAD_LIMIT):  # the worker could not start a thread: not a crash, a limit
            return BackendError(limit_message(f"the llama.cpp worker could not start a thread while {doing}"))
        if sig == "SIGBUS" and self._temp_full():
            # a memory-mapped array on a full tmpfs faults on its first unbacked page: not llama.cpp's fault
            return DiskFullError(f"the temporary folder {os.path.dirname(self._tmpdir or '')} filled up while "
                                 f"{doing}; free space there or set TMPDIR to a folder with room")
        exc = BackendCrashed(crash_message(rc, doing, shown_name(self.model_path), self.safe_cpu,
                                          self._log_hint("GGML_ASSERT", "error", "failed", "abort")))
        exc.signal = sig
        return exc

    def _temp_full(self, room: int = 1 << 20) -> bool:
        """Whether the filesystem of the temporary folder has less than ``room`` bytes free."""
        if not self._tmpdir:
            return False
        try:
            return shutil.disk_usage(self._tmpdir).free < room
        except OSError:
            return False

    def _load_error(self, msg: dict[str, Any]) -> Exception:
        return load_error(msg, self.model_path, self._stderr_tail, self._config.get("n_ctx"))

    def _error_from(self, msg: dict[str, Any], doing: str) -> EdgekitError:
        text = str(msg.get("message") or msg.get("type") or "unknown error")
        # the caller's input, not llama.cpp's (InputError: the chat template refused or could not render it)
        if msg.get("type") in ("PromptTooLongError", "NoChatTemplateError", "InputError"):
            return InputError(text)
        if msg.get("type") == "TempSpaceError":  # the worker's message names the folder and the fix
            return DiskFullError(text)
        return BackendError(f"llama.cpp failed while {doing}: {text}")


# -- the reader threads -------------------------------------------------------------------------------------------


def read_stdout(proc: subprocess.Popen[bytes], inbox: queue.Queue[Any], routes: dict[int, queue.Queue[Any]],
                routes_lock: threading.Lock) -> None:
    """Route the worker's JSON lines: to the generation's own queue (``n_seq`` > 1) or to ``inbox``; EOF to all."""
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with routes_lock:
                route = routes.get(msg.get("id")) if isinstance(msg, dict) else None
            (route or inbox).put(msg)
    except (OSError, ValueError):
        pass
    with routes_lock:
        for route in routes.values():
            route.put(EOF)
    inbox.put(EOF)


def read_stderr(proc: subprocess.Popen[bytes], tail: collections.deque[str], verbose: bool) -> None:
    """Keep the worker's last log lines in ``tail`` (for error messages); ``verbose`` also shows them."""
    assert proc.stderr is not None
    try:
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                tail.append(line)
            if verbose:
                sys.stderr.write(raw.decode("utf-8", "replace"))
                sys.stderr.flush()
    except (OSError, ValueError):
        pass


# -- starting the worker ------------------------------------------------------------------------------------------


def wrapper_command() -> list[str]:
    """``EDGEKIT_LLAMACPP_WRAPPER`` as a command prefix; one that is not a command line says so."""
    try:
        return llamacpp_build.wrapper_prefix()
    except ValueError as exc:
        value = os.environ.get(llamacpp_build.WRAPPER_ENV, "")
        raise InputError(f"{llamacpp_build.WRAPPER_ENV}={value!r} is not a command line ({str(exc).lower()}); "
                         "fix its quoting or unset it") from None


def start_error(exc: OSError, prefix: list[str]) -> EdgekitError:
    """What a worker that could not be started means: a wrapper that is not a program, or a system limit."""
    if exc.errno == errno.EAGAIN:
        return BackendError(limit_message("could not start the llama.cpp worker process"))
    if exc.errno == errno.ENOMEM:
        return BackendError("could not start the llama.cpp worker process: out of memory; close other programs")
    if prefix and isinstance(exc, (FileNotFoundError, PermissionError)):
        how = "is not found" if isinstance(exc, FileNotFoundError) else "cannot be run (permission denied)"
        return InputError(f"{llamacpp_build.WRAPPER_ENV}: the program {prefix[0]!r} {how}; "
                          "fix or unset it")
    return BackendError(f"could not start the llama.cpp worker ({exc.strerror or exc}: {sys.executable}); "
                        "check that this Python can still be run")


def limit_message(what: str) -> str:
    """``what`` failed because the system would not create a process or thread: almost always the per-user
    process limit, which counts threads too."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    except (ImportError, OSError, ValueError):
        soft = None
    if soft is None or soft == resource.RLIM_INFINITY:
        return (f"{what}: the system refused a new process or thread (its process limit: a container's "
                "pids.max or kernel.threads-max); stop other processes or raise that limit")
    return (f"{what}: the system refused a new process or thread; this user's process/thread limit "
            f"(ulimit -u, now {soft}) is likely reached: raise it or stop other processes")
