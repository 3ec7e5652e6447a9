"""Verified, resumable pushes of an artifact to any device, written once against Device's primitives.

Per file: hash it locally; if the device already holds it under the real name with the same sha256,
skip it. Otherwise append to ``.NAME.<sha12>.partial`` from the size that temp file already has (an
interrupted push resumes there), hash the temp file on the device, and only then rename it onto the
real name. The manifest goes last, so a folder with ``edgekit.json`` on the device is complete; a push that
updates an artifact already there removes the old manifest before it renames the first file into place.
A folder on the device where a file goes, or a file where a folder goes, is refused before any byte, and
so is a second push into a folder while another one works there (its lock on the device: pushlock.py).
"""

from __future__ import annotations

import json
import posixpath
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.artifact import MANIFEST_NAME, Artifact
from edgekit.devices.base import (
    Cancel,
    Device,
    DeviceDisconnected,
    DeviceError,
    InsufficientMemoryError,
    PushCancelled,
    PushCancelledCheck,
    VerificationError,
    folder_in_the_way,
)
from edgekit.devices.pushlock import PushLock
from edgekit.errors import DiskFullError, InputError
from edgekit.fslimits import is_disk_full
from edgekit.hashing import sha256_file_cached
from edgekit.progress import ProgressFn


def check_remote_name(name: str, what: str = "name") -> str:
    """Refuse names that could escape the destination folder: absolute, ``..``, empty parts, control chars."""
    if not name or name.startswith("/") or name.startswith("~"):
        raise InputError(f"{what} {name!r} must be a relative name inside the destination; give a plain "
                         "folder name (use --dest for where it goes)")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts) or any(ord(c) < 32 for c in name) or "\\" in name:
        raise InputError(f"{what} {name!r} contains '..', '.', an empty part or a control character; "
                         "give a plain name like 'smol-q4'")
    return name


def check_dest(dest: str) -> str:
    """A destination folder on the device: absolute (or ``~/...`` over SSH), without ``..`` parts."""
    if not (dest.startswith("/") or dest == "~" or dest.startswith("~/")):
        raise InputError(f"--dest {dest!r} must be an absolute folder on the device (or ~/... over SSH)")
    if any(p == ".." for p in dest.split("/")) or any(ord(c) < 32 for c in dest):
        raise InputError(f"--dest {dest!r} contains '..' or a control character; give the folder plainly")
    return dest.rstrip("/") or "/"


@dataclass(frozen=True)
class PushConfig:
    """How to push.

    dest: folder on the device (None: the device's default, e.g. /data/local/tmp/edgekit on Android).
    name: folder name for the artifact under dest (None: the name of the folder given, also of a folder holding
    just a model file; for a model file given alone, its stem).
    ctx: context length the RAM check assumes. check_ram: refuse when the model cannot run in the device's
    RAM at ctx. check_storage: refuse when the device lacks free storage. dry_run: check and plan only.
    """

    dest: str | None = None
    name: str | None = None
    ctx: int = 4096
    check_ram: bool = True
    check_storage: bool = True
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.dest is not None:
            check_dest(self.dest)
        if self.name is not None:
            check_remote_name(self.name, "--name")
        if self.ctx <= 0:
            raise InputError(f"--ctx {self.ctx} must be positive")


@dataclass
class FilePush:
    """One file of a push. ``made``: not a file of the artifact but written for the push (the manifest a bare
    model file gets), so a dry run says it will be created rather than list it as one that exists."""

    name: str
    size: int
    sha256: str
    resumed_from: int = 0
    skipped: bool = False
    made: bool = False


@dataclass
class FitReport:
    ok: bool
    reasons: list[str]
    storage_needed: int
    storage_free: int | None
    ram_needed: int | None
    ram_total: int | None
    ctx: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PushResult:
    device_id: str
    remote_dir: str
    files: list[FilePush] = field(default_factory=list)
    bytes_sent: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    fit: FitReport | None = None

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("files", "fit")}
        d["files"] = [f.__dict__ for f in self.files]
        d["fit"] = self.fit.to_json() if self.fit else None
        return d


def artifact_files(art: Artifact, scratch: Path) -> list[tuple[Path, str]]:
    """(local path, relative remote name) of everything to push, manifest last.

    A folder artifact sends its visible files (recursively) and refuses symbolic links among them; a bare
    model file sends itself plus the manifest derived for it, written into ``scratch``.
    """
    if art.bare_file is not None:
        manifest = scratch / MANIFEST_NAME
        manifest.write_text(json.dumps(art.manifest, indent=2))
        return [(art.bare_file, art.bare_file.name), (manifest, MANIFEST_NAME)]
    files = []
    for p in sorted(art.path.rglob("*")):
        rel = p.relative_to(art.path)
        if any(part.startswith(".") for part in rel.parts) or rel.name == MANIFEST_NAME:
            continue
        if p.is_symlink():  # a link could send anything on this machine (/etc/shadow) under an innocent name
            raise InputError(f"{p} is a symbolic link; push sends only the artifact's own files: remove the link, "
                             "or put a copy of the file there if it belongs in the artifact")
        if p.is_file():
            files.append((p, check_remote_name(rel.as_posix(), "file name")))
    files.append((art.path / MANIFEST_NAME, MANIFEST_NAME))
    return files


def ram_needed(art: Artifact, ctx: int) -> int | None:
    """Memory to run the artifact at ``ctx``: its backend's memory model when it declares one, else the
    size of its model files."""
    from edgekit.runtime.base import memory_to_run

    modelled = memory_to_run(art.format, art.model_file, ctx)
    if modelled is not None:
        return modelled[1]
    return sum(f.stat().st_size for f in art.path.glob(art.model_file.name + "*"))


def resolved_dest(device: Device, dest: str) -> str:
    """``dest`` as the device resolves it (``~`` over SSH); an answer that is not a plain absolute folder is
    refused, since everything pushed is written under it."""
    got = device.resolve(check_dest(dest))
    if not got.startswith("/") or any(p == ".." for p in got.split("/")) or any(ord(c) < 32 for c in got):
        raise VerificationError(f"{device.id} resolved {dest!r} to {got!r}, not an absolute folder; give --dest "
                                "as an absolute path")
    return got.rstrip("/") or "/"


def format_dest(device: Device, art: Artifact) -> str | None:
    """Where the artifact's format has its apps read models on this kind of device (MLC on Android: the
    MLCChat app's files folder), from the format's home; None when it names no place."""
    from edgekit.converters.formats.base import FORMATS

    return FORMATS.get(art.format)().push_dest(device.platform) if art.format in FORMATS else None


def default_name(artifact: str | Path | Artifact, art: Artifact) -> str:
    """The folder an artifact goes to under --dest when no --name is given: the folder the user named (an
    artifact folder, or a folder holding just a model file, which opens as that file), else a model file's
    stem. ``artifact`` is what the user gave, ``art`` what it opened as."""
    if not isinstance(artifact, Artifact):
        from edgekit import library

        given = library.resolve(artifact)
        if given.is_dir():
            return given.resolve().name
    return art.bare_file.stem if art.bare_file is not None else art.path.resolve().name


def remote_dir_for(device: Device, art: Artifact, config: PushConfig, name: str | None = None) -> str:
    """Where on the device the artifact goes: --dest (or the format's or device's default) / --name (or
    ``name``, else :func:`default_name` of ``art``)."""
    dest = resolved_dest(device, config.dest or format_dest(device, art) or device.default_dest())
    return posixpath.join(dest, check_remote_name(config.name or name or default_name(art, art)))


def partial_name(remote: str, sha: str) -> str:
    folder, base = posixpath.split(remote)
    return posixpath.join(folder, f".{base}.{sha[:12]}.partial")


def _plan(device: Device, files: list[tuple[Path, str]], remote_dir: str
          ) -> tuple[list[tuple[Path, str, FilePush]], str | None]:
    """What to send of each file, and the manifest already on the device that must go before the first file
    of this push replaces anything (None: none there, or nothing to replace)."""
    plan: list[tuple[Path, str, FilePush]] = []
    checked = {remote_dir}
    old_manifest = None
    for local, rel in files:
        size = local.stat().st_size
        sha = sha256_file_cached(local)
        remote = posixpath.join(remote_dir, rel)
        sub = posixpath.dirname(remote)
        if sub not in checked:  # a file where a sub-folder of the artifact goes
            _check_folder(device, sub)
            checked.add(sub)
        fp = FilePush(rel, size, sha)
        there = device.file_size(remote)
        if there is not None and device.is_dir(remote):  # mv would put the file inside it
            raise DeviceError(folder_in_the_way(device.id, remote))
        if rel == MANIFEST_NAME and there is not None and any(not p.skipped for _, _, p in plan):
            old_manifest = remote  # updating an artifact: its old manifest goes first and the new one comes last
        elif there == size and device.sha256(remote) == sha:
            fp.skipped = True
        if not fp.skipped:
            have = device.file_size(partial_name(remote, sha)) or 0
            fp.resumed_from = have if have <= size else 0
        plan.append((local, remote, fp))
    return plan, old_manifest


def _check_folder(device: Device, folder: str) -> list[str]:
    """The folders ``makedirs(folder)`` will create (deepest first); a file where one of them (or ``folder``
    itself) goes is refused, as creating it would be."""
    missing = _missing_dirs(device, folder)
    existing = posixpath.dirname(missing[-1]) if missing else folder
    if existing not in ("", "/") and not device.is_dir(existing):
        raise DeviceError(f"{device.id} could not create {folder}: {existing} is a file there, not a folder; "
                          "choose another --dest (or --name)")
    return missing


def check_fit(device: Device, artifact: str | Path | Artifact, ctx: int = 4096, dest: str | None = None,
              storage_needed: int | None = None) -> FitReport:
    """Whether ``artifact`` fits the device's free storage at ``dest`` and its RAM at ``ctx``."""
    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
    if storage_needed is None:
        with tempfile.TemporaryDirectory() as scratch:
            storage_needed = sum(p.stat().st_size for p, _ in artifact_files(art, Path(scratch)))
    dest = resolved_dest(device, dest or format_dest(device, art) or device.default_dest())
    free = device.free_bytes(dest)
    info = device.info()
    ram = ram_needed(art, ctx)
    reasons = []
    if free is not None and storage_needed > free:
        reasons.append(f"needs {storage_needed / 1e6:.1f} MB of storage, {device.id} has {free / 1e6:.1f} MB "
                       f"free at {dest}; free space on the device or choose another --dest")
    if ram is not None and info.ram_total is not None and ram > info.ram_total:
        reasons.append(f"needs about {ram / 1e6:.0f} MB of RAM at context {ctx}, {device.id} has "
                       f"{info.ram_total / 1e6:.0f} MB; use a smaller quantization or --ctx, or --no-ram-check "
                       "to push anyway")
    return FitReport(ok=not reasons, reasons=reasons, storage_needed=storage_needed, storage_free=free,
                     ram_needed=ram, ram_total=info.ram_total, ctx=ctx)


def push(artifact: str | Path | Artifact, device: Device, config: PushConfig | None = None,
         progress: ProgressFn | None = None, cancel: Cancel | None = None) -> PushResult:
    """Push ``artifact`` to ``device``: lock, fit check, resumable transfer, sha256 on the device, rename."""
    config = config or PushConfig()
    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact, verify=False)
    art.verify()  # a file changed since convert would be sent, and verified on the device, as it is now
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgekit-push-") as scratch:
        files = artifact_files(art, Path(scratch))
        remote_dir = remote_dir_for(device, art, config, default_name(artifact, art))
        missing = _check_folder(device, remote_dir)  # a file in the way: refused by a dry run too
        lock = PushLock(device, remote_dir)
        created: list[str] = []
        if config.dry_run:
            lock.check()  # a push running there would refuse this one, so its dry run says so too
        else:  # a destination we may not write fails here, before any checks or bytes
            created = missing
            device.makedirs(remote_dir)
            try:
                lock.acquire()
            except BaseException:
                _remove_empty(device, created)
                raise
        try:
            result = _push_locked(device, art, files, remote_dir, config, progress, cancel, lock, created)
        except DeviceDisconnected:
            lock.abandon()  # no link to remove it with; see pushlock.py for when it counts as stale
            raise
        finally:
            lock.release()
    if not result.dry_run:
        result.seconds = time.perf_counter() - start
    return result


def _push_locked(device: Device, art: Artifact, files: list[tuple[Path, str]], remote_dir: str, config: PushConfig,
                 progress: ProgressFn | None, cancel: Cancel | None, lock: PushLock, created: list[str]) -> PushResult:
    """The push once it holds ``lock``: plan and fit checks, then each file sent, verified and renamed."""
    progress = progress or (lambda desc, done, total: None)
    try:
        plan, old_manifest = _plan(device, files, remote_dir)
        to_send = sum(fp.size - fp.resumed_from for _, _, fp in plan if not fp.skipped)
        fit = check_fit(device, art, config.ctx, config.dest, storage_needed=to_send)
        storage_bad = [r for r in fit.reasons if "storage" in r]
        ram_bad = [r for r in fit.reasons if "RAM" in r]
        if config.check_storage and storage_bad:
            raise DiskFullError(f"not pushing to {device.id}: {storage_bad[0]}")
        if config.check_ram and ram_bad:
            raise InsufficientMemoryError(f"not pushing to {device.id}: {ram_bad[0]}")
    except BaseException as exc:
        _leave_as_it_was(device, lock, created, exc)  # a refused push leaves the device as it was
        raise
    for _, _, fp in plan:
        fp.made = art.bare_file is not None and fp.name == MANIFEST_NAME  # see artifact_files
    result = PushResult(device.id, remote_dir, [fp for _, _, fp in plan], dry_run=config.dry_run, fit=fit)
    if config.dry_run:
        return result
    done = 0
    progress(f"push to {device.id}", 0, to_send)
    tmp, renamed = "", False
    try:
        for local, remote, fp in plan:
            if fp.skipped:
                continue
            sub = posixpath.dirname(remote)
            if sub != remote_dir:
                created[:0] = [d for d in _missing_dirs(device, sub) if d not in created]
                device.makedirs(sub)
            tmp = partial_name(remote, fp.sha256)
            if fp.resumed_from == 0:
                device.remove(tmp)

            def on_bytes(n: int, _name: str = fp.name) -> None:
                nonlocal done
                done += n
                result.bytes_sent += n
                lock.refresh()
                progress(f"{_name} -> {device.id}", done, to_send)

            PushCancelledCheck(cancel)
            try:
                device.append_from(local, tmp, fp.resumed_from, on_bytes, cancel)
            except (OSError, DeviceError) as exc:
                if not is_disk_full(exc):
                    raise
                left = max(0, to_send - done)
                raise DiskFullError(
                    f"{device.id}'s storage filled up at {remote_dir} while pushing {fp.name}; free "
                    f"{max(1, round(left / 1e6))} MB there and push again: it resumes from the partial file"
                ) from exc
            lock.refresh(now=True)  # hashing a large file on the device takes minutes
            _verify(device, tmp, fp)
            if old_manifest is not None:  # an interrupted update leaves no old manifest beside new files
                device.remove(old_manifest)
                old_manifest = None
            device.rename(tmp, remote)
            renamed = True
    except (PushCancelled, KeyboardInterrupt, SystemExit) as exc:  # the TUI's cancel, Ctrl-C, kill / hang-up
        if result.bytes_sent or renamed or any(fp.resumed_from for _, _, fp in plan):
            if not isinstance(exc, PushCancelled):
                exc.add_note("the partial file stays on the device: pushing again resumes it")
            raise
        if tmp:  # opened but never written: nothing to resume
            device.remove(tmp)
        _leave_as_it_was(device, lock, created, exc)
        if not isinstance(exc, PushCancelled):
            raise
        raise PushCancelled("push cancelled before any byte was sent; the device is as it was") from None
    return result


def _leave_as_it_was(device: Device, lock: PushLock, created: list[str], exc: BaseException) -> None:
    """Undo what a push that sent nothing did: its lock, and the folders it created."""
    if isinstance(exc, DeviceDisconnected):
        lock.abandon()
    else:
        lock.release()  # before the folders: it lies in the deepest
    _remove_empty(device, created)


def _missing_dirs(device: Device, remote_dir: str) -> list[str]:
    """The folders ``makedirs(remote_dir)`` will create, deepest first."""
    missing = []
    d = remote_dir
    while d not in ("/", "") and device.file_size(d) is None:
        missing.append(d)
        d = posixpath.dirname(d)
    return missing


def _remove_empty(device: Device, folders: list[str]) -> None:
    for d in folders:  # rmdir leaves a folder something else has filled meanwhile
        device.run(f"rmdir {shlex.quote(d)} 2>/dev/null")


def _verify(device: Device, tmp: str, fp: FilePush) -> None:
    got_size = device.file_size(tmp)
    if got_size is None:
        raise VerificationError(f"the partial copy of {fp.name} vanished from {device.id} while it was sent ({tmp}); "
                                "is another push to the same folder running? Let it finish, then push again")
    got = device.sha256(tmp) if got_size == fp.size else None
    if got != fp.sha256:
        device.remove(tmp)
        what = (f"size {got_size} instead of {fp.size}" if got is None
                else f"sha256 {got[:12]}… instead of {fp.sha256[:12]}…")
        raise VerificationError(f"{fp.name} arrived on {device.id} with {what}; the partial copy was removed, "
                                "push again to send it afresh (one push at a time to the same folder)")
