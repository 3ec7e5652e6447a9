"""Atomic outputs, free-space checks and edgekit's home (hashing: :mod:`edgekit.hashing`).

Every artifact is written into a hidden temporary sibling folder and renamed into place at the
end, so a failed or interrupted write leaves nothing under the real name. Temporary names carry the
writer's pid and the writer holds an ``flock`` on them, so a later write into the same folder can tell
the leftovers of a killed writer from the work of a live one and sweep them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from edgekit.errors import DiskFullError, EdgekitError, InputError, OutputExistsError
from edgekit.fslimits import OUTPUT_FIX, check_name_length, deletion_blocker, nearest_existing, write_error

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locks, the pid in the name alone marks the owner
    fcntl = None  # type: ignore[assignment]

# .NAME.KIND-PID-RANDOM: what atomic_dir, atomic_file and api's pruning scratch create.
TEMP_NAME_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old|prune)-(?P<pid>\d+)-[^/]*$")
# Folders holding one of these were written by edgekit, so --force may replace them.
OUTPUT_MARKERS = ("edgekit.json", "edgekit_import.json", "edgekit_diffusion.json")


# The way out of a write error in edgekit's home (its caches, histories, device list).
HOME_ELSEWHERE = "set EDGEKIT_HOME to another folder"


def edgekit_home(home: Path | None = None, create: bool | None = None) -> Path:
    """edgekit's cache folder: ``home``, else ``$EDGEKIT_HOME``, else ``~/.cache/edgekit``. ``create=True`` (a
    writer that needs it): made, or the one-line error; ``False``: left as it is; by default made where it can
    be, so a command that only reads works where it cannot (a writer's own write then says why)."""
    env = os.environ.get("EDGEKIT_HOME", "")
    if home is None and env:
        if not env.strip():  # a folder named " " in every working directory
            raise InputError(f"EDGEKIT_HOME is {env!r}, blank; set it to an absolute folder, or unset it")
        base = Path(env).expanduser()
        if not base.is_absolute():  # a different home in every working directory: never what was meant
            raise InputError(f"EDGEKIT_HOME is {env!r}, a relative path; set it to an absolute one "
                             f"(e.g. {Path(env).expanduser().absolute()})")
    else:
        base = Path(home).expanduser().absolute() if home else Path.home() / ".cache" / "edgekit"
    if create:
        if problem := home_problem(base):
            raise InputError(problem)
        make_dir(base, HOME_ELSEWHERE)
    elif create is None:
        with contextlib.suppress(OSError):
            base.mkdir(parents=True, exist_ok=True)
    return base


def folder_problem(path: Path) -> str:
    """Why ``path`` can be no folder: it, or the nearest of its parents that exists, is a file or a broken
    symbolic link (said as "X is a file, not a folder"); empty when neither."""
    for p in (path, *path.parents):
        try:
            if p.is_symlink() and not p.exists():
                return f"{p} is a broken symbolic link (to {os.readlink(p)})"
            if p.exists():
                return "" if p.is_dir() else f"{p} is a file, not a folder"
        except OSError:  # not ours to see: the write's own error says so
            return ""
    return ""


def home_problem(base: Path | None = None) -> str:
    """The one line that says edgekit's home (``base``, else :func:`edgekit_home`'s) can be no folder, and the fix;
    empty when it can. Writers raise it; commands that only read warn with it and go on."""
    base = edgekit_home(create=False) if base is None else base
    if not (problem := folder_problem(base)):
        return ""
    what = f"EDGEKIT_HOME is {base}" if os.environ.get("EDGEKIT_HOME") else f"edgekit's home is {base}"
    itself = f"{base} is "
    detail = problem[len(itself):] if problem.startswith(itself) else f"but {problem}"
    return f"{what}, {detail}; point EDGEKIT_HOME at a folder (or move what is in the way)"


def make_dir(path: Path, elsewhere: str) -> Path:
    """``path`` and its parents made, or the one-line error whose fix is "make it writable or ``elsewhere``"
    (e.g. :data:`HOME_ELSEWHERE`)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if problem := folder_problem(path):  # mkdir's "File exists" / "Not a directory" say neither what nor where
            raise InputError(f"cannot create {path}: {problem}; move it or {elsewhere}") from exc
        raise write_error(exc, path, elsewhere) or InputError(
            f"cannot create {path}: {exc.strerror or exc}; make it writable or {elsewhere}") from exc
    return path


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError, StopIteration):  # Linux: read it without changing it
        with open("/proc/self/status") as f:
            return int(next(ln for ln in f if ln.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0)  # elsewhere: set and restore, which briefly affects other threads
    os.umask(mask)
    return mask


def check_free_space(folder: Path, needed_bytes: int, what: str = "the output", headroom: int = 0) -> None:
    """Raise :class:`DiskFullError` when ``folder``'s file system has less than ``needed_bytes`` plus
    ``headroom`` (a safety margin, named apart so a small output does not read as a big one) free."""
    probe = nearest_existing(folder)
    free = shutil.disk_usage(probe).free
    if TEMP_NAME_RE.match(probe.name):  # the user chose its folder, not our temporary name
        probe = probe.parent
    if free < needed_bytes + headroom:
        margin = f" plus {headroom / 1e6:.0f} MB headroom" if headroom else ""
        raise DiskFullError(
            f"not enough disk space for {what}: needs {max(needed_bytes / 1e6, 1):.0f} MB{margin}, "
            f"{probe} has {free / 1e6:.0f} MB free; free some space or choose another output folder with -o"
        )


def _named(dest: Path) -> tuple[Path, str]:
    """What a write error about ``dest`` names, and the fix it offers: the real output for a file inside an
    output's temporary folder (never its ``.NAME.partial-PID-*`` name), the home's fix for edgekit's caches."""
    for folder in (dest, *dest.parents):
        if (m := TEMP_NAME_RE.match(folder.name)) and m["kind"] == "partial":
            return folder.parent / m["name"], OUTPUT_FIX
    return dest, HOME_ELSEWHERE if _in_home(dest) else _FILE_FIX


def _in_home(path: Path) -> bool:
    with contextlib.suppress(EdgekitError):
        return edgekit_home(create=False) in Path(path).absolute().parents
    return False


def is_edgekit_output(folder: Path) -> bool:
    """Whether ``folder`` is something edgekit wrote: a real folder holding one of edgekit's marker files
    (see OUTPUT_MARKERS). A marker that does not parse still counts (the name is edgekit's own), so a damaged
    artifact can be replaced or removed."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    return any((folder / m).is_file() and not (folder / m).is_symlink() for m in OUTPUT_MARKERS)


def check_output(dest: Path, force: bool, replaceable: Callable[[Path], bool]) -> None:
    """What :func:`atomic_dir` refuses, checked before long work that comes ahead of it."""
    _check_dest(Path(dest), force, replaceable)


def check_not_inside(source: Path, dest: Path) -> None:
    """Refuse an output that would replace the input it is made from: ``source`` at or under ``dest``
    (``import art/model.gguf -o art --force`` deleted the GGUF it read)."""
    src, out = Path(source).expanduser().resolve(), Path(dest).expanduser().resolve()
    if src == out:
        raise InputError(f"-o {dest} is the input folder itself: writing there would replace it; choose another -o")
    if out in src.parents:
        raise InputError(f"{dest} holds {source}, the input: writing there would replace it; choose another -o")


def _check_dest(dest: Path, force: bool, replaceable: Callable[[Path], bool], again: bool = False) -> None:
    """Refuse to replace ``dest`` unless ``force`` and it is something edgekit wrote (and this process may delete
    it); ``again``: it appeared while this run was writing."""
    check_name_length(dest)
    if not (dest.exists() or dest.is_symlink()):
        return
    if again and not force:
        raise OutputExistsError(f"{dest} was written by another edgekit while this one ran; this run kept "
                                "nothing: choose another -o, or pass --force to replace it")
    if not replaceable(dest):
        raise OutputExistsError(f"{dest} exists and is not an edgekit artifact; --force only replaces those, so "
                                "nothing was touched: choose another -o")
    if not force:
        raise OutputExistsError(f"{dest} already exists; pass --force (SDK: force=True) to replace it or choose "
                                "another -o (output=)")
    if why := deletion_blocker(dest):  # found before the work: replacing it would leave the old one behind
        raise OutputExistsError(f"cannot replace {dest}: {why}; nothing was written: ask its owner to remove it "
                                "(or to fix its permissions), or choose another -o")


def _lock(fd: int) -> bool:
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def hold_lock(path: Path) -> int | None:
    """An fd holding the lock on folder ``path`` by which :func:`sweep_stale` tells a live edgekit's hidden
    folder from a killed one's (the pid in its name alone cannot across machines or pid namespaces); close it
    when done. None where it cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    _lock(fd)
    return fd


def _make_temp(parent: Path, name: str, kind: str, directory: bool) -> tuple[Path, int]:
    """A temporary ``.NAME.KIND-PID-*`` in ``parent``, and an fd holding its lock (close it when done)."""
    prefix = f".{name}.{kind}-{os.getpid()}-"
    if directory:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            path.rmdir()
            raise
    else:
        fd, name_ = tempfile.mkstemp(prefix=prefix, dir=parent)
        path = Path(name_)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; what it becomes should not be
    _lock(fd)
    return path, fd


@contextlib.contextmanager
def temp_dir(parent: Path, name: str, kind: str = "prune") -> Iterator[Path]:
    """A scratch folder beside ``parent / name``, removed afterwards; one a killed process leaves is swept."""
    path, fd = _make_temp(parent, name, kind, directory=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process
    return True


def abandoned(path: Path) -> bool:
    """No live writer: its pid is gone (a reused pid keeps it, the safe side) and nobody holds its lock."""
    m = TEMP_NAME_RE.match(path.name)
    if not m or path.is_symlink() or _pid_alive(int(m["pid"])):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        return _lock(fd)
    finally:
        os.close(fd)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def sweep_stale(parent: Path) -> list[str]:
    """Remove what killed edgekit writers left in ``parent`` (temporary folders and files); says what went."""
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return []
    removed = []
    for p in entries:
        if not abandoned(p):
            continue
        with contextlib.suppress(OSError):
            size = _size(p)
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(f"removed {p} ({size / 1e6:.1f} MB), left by an edgekit that was killed "
                           f"(pid {TEMP_NAME_RE.match(p.name)['pid']})")  # type: ignore[index]
    return removed


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


@functools.cache
def _libc_renameat2() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc >= 2.28 / musl >= 1.2.4 (macOS, Windows, older C libraries)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False where the C library or the file system lacks it (the caller falls back)."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` only if ``dst`` does not exist (FileExistsError otherwise), atomically."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "File exists", str(dst))
    try:
        os.rename(src, dst)  # a folder onto a non-empty folder fails, which keeps the race harmless
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, "File exists", str(dst)) from exc
        raise


def _swap_in(tmp: Path, dest: Path) -> Path:
    """Put ``tmp`` in ``dest``'s place without a moment where ``dest`` is missing; returns what holds the old."""
    if _renameat2(tmp, dest, _RENAME_EXCHANGE):
        return tmp
    old, fd = _make_temp(dest.parent, dest.name, "old", directory=True)
    try:
        os.rename(dest, old / "x")
        try:
            os.rename(tmp, dest)
        except OSError:
            os.rename(old / "x", dest)
            raise
    finally:
        os.close(fd)
    return old


@contextlib.contextmanager
def atomic_dir(dest: Path, force: bool = False, *, replaceable: Callable[[Path], bool] = is_edgekit_output,
               notes: list[str] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success it becomes ``dest``, on any error it is removed.

    ``dest`` that already exists is refused unless ``force``, and even then unless ``replaceable(dest)``
    (something edgekit wrote): the user's own folder is never replaced. The final rename is atomic against
    concurrent writers: of two runs writing the same ``dest`` without ``force`` one fails. Leftovers of
    killed writers in ``dest``'s folder are swept first. ``notes`` gets a line for each thing removed or
    replaced, for the caller to show.
    """
    dest = Path(dest)
    notes = notes if notes is not None else []
    _check_dest(dest, force, replaceable)
    parent = dest.parent
    elsewhere = HOME_ELSEWHERE if _in_home(dest) else OUTPUT_FIX  # a cache's way out, or an output's
    try:
        parent.mkdir(parents=True, exist_ok=True)
        notes.extend(sweep_stale(parent))
        tmp, fd = _make_temp(parent, dest.name, "partial", directory=True)
    except OSError as exc:
        raise write_error(exc, dest, elsewhere) or InputError(
            f"cannot create {dest}: {exc.strerror or exc}; make it writable or {elsewhere}") from exc
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the artifact should not be
        yield tmp
        _share_private_files(tmp)
        try:
            rename_noreplace(tmp, dest)
        except FileExistsError:
            _check_dest(dest, force, replaceable, again=True)
            old = _swap_in(tmp, dest)
            try:
                shutil.rmtree(old)
            except OSError as exc:  # checked before, so rare (an immutable file): said, never silent
                notes.append(f"replaced {dest}, but the earlier one could not be deleted ({exc.strerror or exc}): "
                             f"what is left of it is at {old}; delete it")
            else:
                notes.append(f"replaced {dest} (an earlier edgekit output)")
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        mapped = write_error(exc, dest, elsewhere)
        if mapped is not None:
            raise mapped from exc
        raise
    finally:
        os.close(fd)


def _share_private_files(folder: Path) -> None:
    """Give the files under ``folder`` that a writer made private (safetensors' writer and mkstemp create
    them 0600) the modes the umask gives new files, as every other file of an output has."""
    mask = _umask()
    if not 0o077 & ~mask:
        return  # the umask keeps new files private too
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and not st.st_mode & 0o077:
                os.chmod(path, (0o777 if st.st_mode & 0o100 else 0o666) & ~mask)


_FILE_FIX = "retry in another folder"


@contextlib.contextmanager
def atomic_file(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; renamed onto ``dest`` on success, removed on error."""
    dest = Path(dest)
    named, fix = _named(dest)
    check_name_length(dest)
    try:
        tmp, fd = _make_temp(dest.parent, dest.name, "partial", directory=False)
    except OSError as exc:
        raise write_error(exc, named, fix) or InputError(
            f"cannot write {named}: {exc.strerror or exc}; make it writable or {fix}") from exc
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        mapped = write_error(exc, named, fix)
        if mapped is not None:
            raise mapped from exc
        raise
    finally:
        os.close(fd)
