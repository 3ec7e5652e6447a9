"""What every part of the Core ML home shares: coremltools (imported quietly, called so that Ctrl-C gets out of
it) and the package on disk (its scratch folder, and the same bytes for the same model)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

MODEL_NAME = "model.mlpackage"
RESEND_S = 0.1  # how often a swallowed interrupt is delivered again
_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # Ctrl-C, and what the CLI unwinds like it
_ITEM_IDS = uuid.uuid5(uuid.NAMESPACE_URL, "https://edgekit/coreml/mlpackage-item")
R = TypeVar("R")


def coremltools() -> Any:
    """coremltools, imported quietly (it logs that its macOS prediction library is absent on Linux, and
    warns that edgekit's torch is newer than it tested: edgekit never uses its torch front end)."""
    import logging
    import warnings

    from edgekit.errors import require

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return require("coremltools", "coreml")


def fresh_op_names(mb: Any) -> None:
    """Start the MIL builder's op names afresh (``add_0``, ``add_1``, ...): coremltools numbers them from one
    counter per process, so a second conversion in a process (the SDK's, a test's) named its ops on from the
    first one's and wrote other bytes than the same conversion in a new process."""
    counts = getattr(mb, "name_count", None)
    if isinstance(counts, dict):
        counts.clear()


def package_bytes(path: Path) -> int:
    """Bytes of every file in a package folder."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@contextlib.contextmanager
def scratch_in(out_dir: Path) -> Iterator[None]:
    """Point coremltools' temporary files (its weights folder, and the whole package it builds before
    ``save`` copies it, deleted only when the model object is collected) into a folder inside ``out_dir``,
    the output's temporary folder: they go with it on an error or Ctrl-C, the sweep of a killed writer's
    leftovers covers kill -9, and nothing is left in $TMPDIR. The folder is removed before the output is
    renamed into place."""
    scratch = out_dir / ".coremltools-tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    before = tempfile.tempdir
    tempfile.tempdir = str(scratch)  # coremltools calls mkdtemp() and TemporaryDirectory() with no dir
    try:
        yield
    finally:
        tempfile.tempdir = before
        shutil.rmtree(scratch, ignore_errors=True)


class _Interrupts:
    """The signal handlers in place during one :func:`interruptible` call: each chains to the handler it
    replaced, keeps what that raised, and raises it again (and again) until it gets out of the call."""

    def __init__(self, frame: FrameType | None) -> None:
        self.frame = frame  # interruptible's own: a signal handled there is only kept, for it to raise
        self.previous: dict[int, Any] = {}
        self.pending: BaseException | None = None
        self.closing = False
        self.stop = threading.Event()
        self.resender: threading.Thread | None = None

    def install(self) -> None:
        for name in _SIGNALS:
            signum = getattr(signal, name, None)
            previous = None if signum is None else signal.getsignal(signum)
            if callable(previous):  # not SIG_DFL, SIG_IGN (nohup), nor a handler set outside Python
                self.previous[signum] = previous
                signal.signal(signum, self.on_signal)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.pending is None:
            try:
                self.previous[signum](signum, frame)
            except BaseException as exc:  # KeyboardInterrupt, or the CLI's Terminated
                self.pending = exc
            else:
                return  # a handler that raises nothing: nothing to deliver
        if self.closing or frame is self.frame:
            return  # the call has returned: interruptible raises it now
        self._keep_sending(signum)
        raise self.pending

    def _keep_sending(self, signum: int) -> None:
        """Deliver the signal again every RESEND_S until the call ends: a handler's exception raised inside
        one of coremltools' bare ``except:`` clauses is dropped there, and the next one lands elsewhere."""
        if self.resender is not None or not hasattr(signal, "pthread_kill"):
            return
        main = threading.main_thread().ident

        def send() -> None:
            while not self.stop.wait(RESEND_S):
                signal.pthread_kill(main, signum)  # type: ignore[arg-type]

        thread = threading.Thread(target=send, name="edgekit-coreml-interrupt", daemon=True)
        with contextlib.suppress(RuntimeError):  # no thread to be had: the call's end still raises it
            thread.start()
            self.resender = thread

    def close(self) -> None:
        self.stop.set()
        if self.resender is not None:
            self.resender.join()
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)  # runs a signal still in flight first: self.closing keeps it


def interruptible(fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """``fn(*args, **kwargs)``, a coremltools call, made to honour Ctrl-C (and the CLI's SIGTERM and SIGHUP).
    coremltools catches everything in places (bare ``except:`` in its MIL type inference), so the
    KeyboardInterrupt raised there can be dropped and the convert run on to "wrote ...". Here the signal
    is delivered again until its exception gets out, and one still swallowed when ``fn`` returns (or that
    ``fn`` turned into another error) is raised then. Outside the main thread (the TUI's workers), where
    no signal handler runs, it is a plain call."""
    if threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)
    guard = _Interrupts(sys._getframe())
    failure: BaseException | None = None
    try:
        guard.install()  # in here: a signal that cuts it short still finds close() restoring what was set
        result = fn(*args, **kwargs)
    except BaseException as exc:  # the interrupt, if one came, is said instead of what it became
        failure = exc
    guard.closing = True  # set in this frame, where no handler raises: close() cannot be cut short
    guard.close()
    if guard.pending is not None and not isinstance(failure, type(guard.pending)):
        raise guard.pending
    if failure is not None:
        raise failure
    return result


def save_package(model: Any, path: Path) -> None:
    """``model.save(path)``, made reproducible: the same model gives the same bytes in every file.
    protobuf writes map fields (the metadata, each op's attributes) in an order that changes from one
    process to the next, so the spec is written again with sorted maps; and coremltools names the package's
    items with random UUIDs in Manifest.json, so each gets a name-based UUID of its path and content
    instead. The manifest keeps libmodelpackage's own layout (sorted keys, 4 spaces), which it writes back
    unchanged whenever it opens the package."""
    model.save(str(path))
    manifest_file = path / "Manifest.json"
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    items: dict[str, dict[str, str]] = manifest["itemInfoEntries"]
    data = path / "Data"
    spec_file = data / items[manifest["rootModelIdentifier"]]["path"]
    spec = coremltools().proto.Model_pb2.Model()
    spec.ParseFromString(spec_file.read_bytes())
    spec_file.write_bytes(spec.SerializeToString(deterministic=True))
    ids = {old: _item_identifier(data, item["path"]) for old, item in items.items()}
    manifest["itemInfoEntries"] = {ids[old]: item for old, item in items.items()}
    manifest["rootModelIdentifier"] = ids[manifest["rootModelIdentifier"]]
    text = json.dumps(manifest, indent=4, sort_keys=True, ensure_ascii=False) + "\n"
    manifest_file.write_text(text, encoding="utf-8")


def _item_identifier(data: Path, rel: str) -> str:
    """A UUID (version 5) of a package item's path and the content of its file or files."""
    item = data / rel
    files = sorted(p for p in item.rglob("*") if p.is_file()) if item.is_dir() else [item]
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            h.update(f"{f.relative_to(data).as_posix()}\0".encode() + hashlib.file_digest(fh, "sha256").digest())
    return str(uuid.uuid5(_ITEM_IDS, f"{rel}\0{h.hexdigest()}"))
