"""Atomic outputs, free-space checks and hashing.

Every artifact is written into a hidden temporary sibling folder and renamed into place at the
end, so a failed or interrupted write leaves nothing under the real name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgekit.errors import DiskFullError, InputError, OutputExistsError


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def edgekit_home(home: Path | None = None) -> Path:
    """edgekit's cache folder: ``$EDGEKIT_HOME`` or ``~/.cache/edgekit``."""
    base = Path(home or os.environ.get("EDGEKIT_HOME", Path.home() / ".cache" / "edgekit"))
    base.mkdir(parents=True, exist_ok=True)
    return base


def sha256_file_cached(path: Path) -> str:
    """sha256 of ``path``, remembered by (path, size, mtime) so re-converting a source does not rehash it."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cache_path = edgekit_home() / "sha256-cache.json"
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = sha256_file(path)
        with contextlib.suppress(OSError):  # a read-only cache only costs time
            with atomic_file(cache_path) as tmp:
                tmp.write_text(json.dumps(cache))
    return cache[key]


def sha256_files(paths: list[Path]) -> str:
    """One sha256 over several files (sorted by name), for sharded checkpoints."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        h.update(sha256_file_cached(p).encode())
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_free_space(folder: Path, needed_bytes: int, what: str = "the output") -> None:
    """Raise :class:`DiskFullError` when ``folder``'s file system has less than ``needed_bytes`` free."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise DiskFullError(
            f"not enough disk space for {what}: needs {needed_bytes / 1e6:.0f} MB, "
            f"{probe} has {free / 1e6:.0f} MB free; free some space or choose another output folder with -o"
        )


@contextlib.contextmanager
def atomic_dir(dest: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success it replaces ``dest``, on any error it is removed.

    ``dest`` that already exists is refused unless ``force``; with ``force`` the old folder is
    only removed once the new one is complete.
    """
    dest = Path(dest)
    if dest.exists() and not force:
        raise OutputExistsError(f"{dest} already exists; pass --force to replace it or choose another -o")
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {parent}: {exc.strerror}; choose a writable output folder") from exc
    _sweep_stale_partials(parent, dest.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-{os.getpid()}-", dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the artifact should not be
    try:
        yield tmp
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=parent))
            os.rename(dest, old / "x")
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(
                f"the disk filled up while writing {dest}; nothing was kept. Free some space or choose another -o"
            ) from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sweep_stale_partials(parent: Path, name: str) -> None:
    """Remove temporary folders an earlier writer of ``name`` left when it was killed (its pid is gone)."""
    import psutil

    for p in parent.glob(f".{name}.partial-*"):
        pid = p.name[len(f".{name}.partial-"):].split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; renamed onto ``dest`` on success, removed on error."""
    dest = Path(dest)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(f"the disk filled up while writing {dest}; free some space and retry") from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
