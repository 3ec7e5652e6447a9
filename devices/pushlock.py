"""One push at a time into a folder of a device: a lock file there, which a dead push does not leave stuck.

Why on the device and not on this machine: the pushes that collide are those writing the same partial
files in the same folder, and they may come from different machines (a laptop and a CI runner pushing to
one Jetson). Only the device sees them all. A lock on this machine (``flock``) would let go by itself when
its process dies, but would never see a push from anywhere else.

The lock is ``REMOTE_DIR/.edgekit-push.lock``, created with the shell's noclobber (``set -C``: an
``O_EXCL`` open), so of two pushes exactly one creates it. It holds one JSON line naming its owner: pid,
host name, where that pid means something (host, boot and pid namespace), the process's start time, and
a token of the push. The owner touches it while it works (every LOCK_REFRESH_S of transfer, and before
each verification). A lock is stale, and taken over, when

- its owner lives on this machine and that process is gone (or its pid now names another process), or it
  is this very process but not a push it still runs (a push whose link dropped could not remove it);
- its owner lives elsewhere and has not touched it for LOCK_STALE_S (that machine crashed or lost the
  device): edgekit cannot look at another machine's processes, so the refusal says how to remove it.

A lock is removed only by a shell line that first checks it still holds what was read. Two pushes taking
over one stale lock within the same few microseconds could both go on; even then nothing corrupt is left,
since every file is renamed into place only after its sha256 matched on the device.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import posixpath
import secrets
import shlex
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgekit.devices.base import Device, DeviceError, PushInProgress, RunResult
from edgekit.errors import EdgekitError

LOCK_NAME = ".edgekit-push.lock"
LOCK_REFRESH_S = 60.0   # how often a push touches its lock while sending
LOCK_STALE_S = 1800.0   # a lock of another machine not touched for this long is given up
_ACTIVE: set[str] = set()  # tokens of the pushes this process is running now
_ABSENT = 3  # the read's exit status for "no lock there"


@functools.cache
def _here() -> str:
    """Where a pid names a process of this process table: host name, boot, pid namespace (containers)."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):  # Linux
        parts += [Path("/proc/sys/kernel/random/boot_id").read_text().strip(), str(os.stat("/proc/self/ns/pid").st_ino)]
    if len(parts) == 1:
        import uuid

        parts.append(f"{uuid.getnode():x}")
    return "|".join(parts)


@dataclass(frozen=True)
class Owner:
    """Who holds a lock: ``pid`` on ``host`` (``where`` tells this machine's processes from others')."""

    pid: int
    host: str
    where: str
    started: float
    token: str

    @classmethod
    def me(cls) -> Owner:
        import psutil

        return cls(os.getpid(), socket.gethostname(), _here(), psutil.Process().create_time(), secrets.token_hex(8))

    def line(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):
            return None


@dataclass(frozen=True)
class Held:
    """A lock as read on the device: its text, its owner (None: not one edgekit wrote) and how many seconds
    ago it was last touched, by the device's own clock (None: unknown)."""

    text: str
    owner: Owner | None
    age: float | None

    @property
    def local(self) -> bool:
        return self.owner is not None and self.owner.where == _here()

    def stale(self) -> bool:
        o = self.owner
        if o is not None and self.local:
            return o.token not in _ACTIVE if o.pid == os.getpid() else not _running(o.pid, o.started)
        return self.age is not None and self.age > LOCK_STALE_S


def _running(pid: int, started: float) -> bool:
    """Whether ``pid`` is still the process that started at ``started`` (a reused pid is another one)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - started) < 1.0
    except psutil.AccessDenied:  # someone else's process, alive
        return True
    except psutil.Error:
        return False


class PushLock:
    """The lock of one push into ``remote_dir`` on ``device``: :meth:`check` (a dry run), :meth:`acquire`,
    :meth:`refresh` while working, and :meth:`release` (or :meth:`abandon` when the link is gone)."""

    def __init__(self, device: Device, remote_dir: str) -> None:
        self.device = device
        self.remote_dir = remote_dir
        self.path = posixpath.join(remote_dir, LOCK_NAME)
        self.me = Owner.me()
        self.held = False
        self._touched = 0.0

    def check(self) -> None:
        """Refuse as :meth:`acquire` would while a live push holds the lock; takes nothing."""
        held = self._read()
        if held is not None and not held.stale():
            raise self._refusal(held)

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; :class:`PushInProgress` when a live push holds it."""
        stale, absent = None, 0
        for _ in range(4):
            r = self._take(stale)
            if r.rc == 0:
                self.held = True
                _ACTIVE.add(self.me.token)
                self._touched = time.monotonic()
                return
            held = self._read()
            if held is None:  # not created, and none there: its owner just let go, or the folder refused it
                stale, absent = None, absent + 1
                if absent == 2:
                    break
                continue
            if not held.stale():
                raise self._refusal(held)
            stale = held.text
        self.device._check(r, f"create {self.path}")  # says why (permission denied: choose another --dest)
        raise DeviceError(f"{self.device.id} could not create {self.path}: {r.output or 'it keeps changing'}; "
                          "push again")

    def refresh(self, now: bool = False) -> None:
        """Touch the lock (at most every LOCK_REFRESH_S unless ``now``), so other machines see it is alive."""
        if not self.held or (not now and time.monotonic() - self._touched < LOCK_REFRESH_S):
            return
        self._touched = time.monotonic()
        with contextlib.suppress(EdgekitError):  # a link that dropped says so at the push's next step
            self.device.run(f"{self._if_mine()} && touch \"$l\"")

    def release(self) -> None:
        """Remove the lock if it is still this push's; never raises (it runs while another error unwinds)."""
        if not self.held:
            return
        self.abandon()
        with contextlib.suppress(EdgekitError):
            self.device.run(f"{self._if_mine()} && rm -f \"$l\"")

    def abandon(self) -> None:
        """Let go without touching the device (its link is gone): the lock left there is stale for this
        machine at once, and for others after LOCK_STALE_S."""
        self.held = False
        _ACTIVE.discard(self.me.token)

    # -- the shell lines ----------------------------------------------------------------------------
    def _if_mine(self) -> str:
        return f"l={shlex.quote(self.path)}; [ \"$(cat \"$l\" 2>/dev/null)\" = {shlex.quote(self.me.line())} ]"

    def _take(self, stale: str | None) -> RunResult:
        q = shlex.quote
        over = f"if [ \"$(cat \"$l\" 2>/dev/null)\" = {q(stale)} ]; then rm -f \"$l\"; fi; " if stale else ""
        return self.device.run(f"l={q(self.path)}; {over}(set -C; printf '%s\\n' {q(self.me.line())} > \"$l\")")

    def _read(self) -> Held | None:
        r = self.device.run(f"l={shlex.quote(self.path)}; [ -f \"$l\" ] || exit {_ABSENT}; "
                            "echo $(( $(date +%s) - $(stat -c %Y \"$l\") )); cat \"$l\"")
        if r.rc == _ABSENT:
            return None
        first, _, text = r.stdout.partition("\n")
        text = text.rstrip("\n")
        age = float(first) if first.strip().lstrip("-").isdigit() else None
        return Held(text, Owner.parse(text), age)

    def _refusal(self, held: Held) -> PushInProgress:
        o = held.owner
        where = f"{self.device.id}:{self.remote_dir}"
        who = f"pid {o.pid} on {o.host}" if o is not None else f"a lock not written by edgekit, {self.path}"
        if held.local:
            return PushInProgress(f"another push to {where} is in progress ({who}); wait for it to finish, or "
                                  f"stop it (kill {o.pid}), then push again: it resumes what arrived")
        seen = f", last seen {_ago(held.age)} ago" if held.age is not None else ""
        return PushInProgress(
            f"another push to {where} is in progress ({who}{seen}); wait for it to finish, or if it is no longer "
            f"running remove {self.path} on {self.device.id} (a lock left {LOCK_STALE_S / 60:g} min untouched "
            "is given up)")


def _ago(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
