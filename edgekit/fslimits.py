"""What stops a write or a delete on this machine, said in one line with its fix: a full disk or quota, a
file size limit (``ulimit -f``), a read-only target, a name too long for the temporary name an output is
first written under, a folder this user may not delete from. Found before the work where it can be
(:func:`deletion_blocker`, :func:`check_name_length`), said after where it cannot (:func:`write_error`)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
from pathlib import Path

from edgekit.errors import DiskFullError, EdgekitError, InputError

# numpy reports a full disk without an errno: a short write in tofile(), or its fallocate() pre-check
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written|Not enough free space to write \d+ bytes")
OUTPUT_FIX = "choose another output folder with -o"
_FULL_WORDS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says a disk (or quota) is full: ENOSPC/EDQUOT, or the words a writer that gives no
    errno uses (safetensors' Rust writer: "... (os error 28)"; adb and device shells)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    return any(w in text for w in _FULL_WORDS)


def write_error(exc: BaseException, dest: Path, elsewhere: str = OUTPUT_FIX) -> EdgekitError | None:
    """The one-line error for an exception met while writing ``dest``: a full disk or a read-only target.
    ``elsewhere`` is the other way out the message offers. Writers that give no errno count too:
    safetensors' SafetensorError ("os error 28"), numpy's short write, shutil.Error's list of ENOSPC copies."""
    if isinstance(exc, EdgekitError) or not isinstance(exc, Exception):
        return None  # already one line (or Ctrl-C)
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    short = code is None and bool(_SHORT_WRITE.search(str(exc)))
    too_large = code == errno.EFBIG or (code is None and "file too large" in str(exc).lower())  # Rust: os error 27
    if too_large or (short and _size_limited(dest)):
        limit = _file_size_limit()
        if limit is None:
            return DiskFullError(f"{dest} needs a file bigger than its file system allows; nothing was kept. "
                                 f"{elsewhere[0].upper()}{elsewhere[1:]} on another file system")
        return DiskFullError(f"a file size limit (ulimit -f {limit // 1024}) stopped the write of {dest}; nothing "
                             "was kept. Raise it (ulimit -f unlimited) and retry")
    if code in (errno.ENOSPC, errno.EDQUOT) or short or (code is None and is_disk_full(exc)):
        return DiskFullError(f"the disk filled up while writing {dest}; nothing was kept. Free some space or "
                             f"{elsewhere}")
    if isinstance(exc, OSError) and code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return InputError(f"cannot write {dest}: {exc.strerror or exc}; make it writable or {elsewhere}")
    return None


def _file_size_limit() -> int | None:
    """The soft RLIMIT_FSIZE (``ulimit -f``) in bytes, or None when there is none."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _size_limited(dest: Path) -> bool:
    """Whether a short write (numpy's, which gives no errno) into ``dest`` hit ``ulimit -f`` rather than a full
    disk: a limit is set and the disk still has room (Python ignores SIGXFSZ, so the write comes back short)."""
    if _file_size_limit() is None:
        return False
    with contextlib.suppress(OSError):
        return shutil.disk_usage(nearest_existing(Path(dest))).free > 1 << 20
    return True


def nearest_existing(path: Path) -> Path:
    """``path`` (made absolute) or its nearest parent that exists: the file system, and the folder whose
    permissions decide, for an output not made yet."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


# The longest name a file system takes (NAME_MAX on Linux, macOS and Windows alike), and what the temporary
# name of an output adds to it: ".NAME.partial-PID-XXXXXXXX", a pid of up to 7 digits (Linux's pid_max).
NAME_MAX = 255
_TEMP_EXTRA = len("..partial--") + 7 + 8


def check_name_length(dest: Path) -> None:
    """Refuse an output whose name leaves no room for the temporary name it is first written under."""
    size, most = len(os.fsencode(Path(dest).name)), NAME_MAX - _TEMP_EXTRA
    if size > most:
        raise InputError(f"the name {Path(dest).name[:24]}... is {size} bytes long; an output's name may have at most "
                         f"{most} (file systems allow {NAME_MAX}, and the temporary name it is written under first "
                         "needs the rest): choose a shorter -o")


def _who(uid: int) -> str:
    with contextlib.suppress(ImportError, KeyError):
        import pwd

        return pwd.getpwuid(uid).pw_name
    return f"uid {uid}"


def deletion_blocker(path: Path) -> str:
    """What stops this process from deleting ``path`` (a link or file, or a folder and all it holds), found
    before anything is touched: "F belongs to root and is not writable for you" for the first folder F it may
    not remove entries from (not writable, or sticky and neither F nor the entry its own); empty when none.
    Root passes (a read-only file system aside); what this cannot foresee (an immutable file) is the
    caller's error to recover from."""
    euid = os.geteuid() if hasattr(os, "geteuid") else -1

    def blocked(folder: str, entry: str) -> str:
        fst, est = os.stat(folder), os.lstat(entry)
        if not os.access(folder, os.W_OK | os.X_OK | os.R_OK):
            if fst.st_uid == euid:
                return f"{folder} is not writable"
            return f"{folder} belongs to {_who(fst.st_uid)} and is not writable for you"
        if fst.st_mode & stat.S_ISVTX and euid not in (0, fst.st_uid, est.st_uid):
            return f"{entry} belongs to {_who(est.st_uid)} and {folder} lets only owners delete (sticky)"
        return ""

    try:
        st = os.lstat(path)
        if why := blocked(os.path.dirname(os.path.abspath(path)) or os.sep, str(path)):
            return why
        if not stat.S_ISDIR(st.st_mode):
            return ""
        for root, dirs, files in os.walk(path, onerror=_raise):  # links inside are not followed
            for name in (*dirs, *files):
                if why := blocked(root, os.path.join(root, name)):
                    return why
    except OSError as exc:  # a folder that cannot even be read
        return f"{exc.filename or path} cannot be read ({exc.strerror or exc})"
    return ""


def _raise(exc: OSError) -> None:
    raise exc
