"""SSH boards (Jetson, Raspberry Pi and the like) through paramiko: info, shell, SFTP transfers.

Hosts come from edgekit's own config (config.py). Host keys: the user's known_hosts is honoured; a
host seen for the first time is remembered in edgekit's known_hosts (trust on first use, like
``ssh -o StrictHostKeyChecking=accept-new``) and a changed key is refused.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import posixpath
import shlex
import stat
import threading
import time
from pathlib import Path
from typing import Any

from edgekit.devices.base import (
    BytesFn,
    Cancel,
    Device,
    DeviceDisconnected,
    DeviceError,
    DeviceInfo,
    DevicePermissionError,
    Platform,
    PushCancelledCheck,
    RunResult,
    normalize_arch,
    parse_df_k,
    parse_meminfo,
    register_platform,
)
from edgekit.devices.config import SSHHost, get_ssh_host, ssh_entries
from edgekit.devices.host import cpu_from_proc
from edgekit.errors import EdgekitError, InputError, require
from edgekit.fsutil import edgekit_home

BLOCK = 1 << 18
SFTP_TIMEOUT_S = 60.0  # no answer to a transfer for this long: the board froze or left the network
EXEC_STALL_S = 60.0    # a command's board silent this long (its sshd answers no probe): it froze or left
KEEPALIVE_S = 15       # keepalive packets on an idle link (NAT boxes forget quiet connections)
PROBE_WORKERS = 8      # boards `edgekit devices` probes at once
_KNOWN_HOSTS_LOCK = threading.Lock()
_SECTIONS = ("uname", "cpuinfo", "meminfo", "board", "df", "nproc", "gpus", "os")


def _info_script(dest: str) -> str:
    parts = {
        "uname": "uname -srm",
        "cpuinfo": "cat /proc/cpuinfo",
        "meminfo": "cat /proc/meminfo",
        "board": "cat /proc/device-tree/model 2>/dev/null | tr -d '\\0'",
        "df": f"d={dest}; while [ ! -d \"$d\" ]; do d=$(dirname \"$d\"); done; df -k \"$d\"",
        "nproc": "nproc 2>/dev/null || getconf _NPROCESSORS_ONLN",
        "gpus": "nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv,noheader,nounits 2>/dev/null",
        "os": ". /etc/os-release 2>/dev/null && echo \"$PRETTY_NAME\"",
    }
    return "; ".join(f"echo '==ek:{k}=='; {parts[k]}" for k in _SECTIONS)


def _why(exc: BaseException, timeout: float | None = None) -> str:
    """A short reason for a failed connection, without paramiko's "[Errno None]" or "No existing session"."""
    errors = getattr(exc, "errors", None)  # paramiko's NoValidConnectionsError: one OSError per address tried
    if isinstance(errors, dict) and errors:
        inner = list(errors.values())
        if all(isinstance(e, ConnectionRefusedError) for e in inner):
            return "connection refused (nothing listens on that port)"
        return "; ".join(_why(e) for e in inner)
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s" if timeout else "timed out"
    text = str(exc)
    if timeout and ("banner" in text or "No existing session" in text):
        return f"it accepted the connection but did not answer as an SSH server within {timeout:g} s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return text.strip().rstrip(".") or type(exc).__name__


def _sections(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("==ek:") and line.endswith("=="):
            current = line[5:-2]
            out[current] = ""
        elif current:
            out[current] += line + "\n"
    return out


class SSHDevice(Device):
    platform = "ssh"

    def __init__(self, host: SSHHost) -> None:
        super().__init__(host.name)
        self.host = host
        self._client: Any = None
        self._sftp: Any = None
        self._home: str | None = None

    # -- connection -------------------------------------------------------------------------------
    def _connect(self) -> Any:
        if self._client is not None:
            return self._client
        paramiko = require("paramiko", "devices")
        quiet = logging.getLogger("paramiko")  # its "Socket exception: ..." lines: edgekit says what happened
        if not quiet.handlers:
            quiet.addHandler(logging.NullHandler())
        h = self.host
        key = Path(h.key).expanduser() if h.key else None
        if key is not None and not key.is_file():
            user = f" --user {h.user}" if h.user else ""
            raise InputError(f"the key file {key} of {self.id} does not exist; fix it with 'edgekit devices add "
                             f"{self.id} --host {h.host} --port {h.port}{user} --key KEYFILE'")
        client = paramiko.SSHClient()
        client.load_system_host_keys()
        known = edgekit_home(create=True) / "known_hosts"
        known.touch(exist_ok=True)
        client.load_host_keys(str(known))
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # saved to edgekit's known_hosts
        try:
            try:
                client.connect(h.host, port=h.port, username=h.user, key_filename=str(key) if key else None,
                               timeout=h.connect_timeout, banner_timeout=h.connect_timeout,
                               auth_timeout=h.connect_timeout, look_for_keys=key is None)
            except BaseException:
                client.close()
                raise
        except paramiko.BadHostKeyException as exc:
            raise DeviceError(f"the host key of {self.id} ({h.host}:{h.port}) changed; if that is expected, "
                              f"remove its line from {known} or ~/.ssh/known_hosts") from exc
        except paramiko.AuthenticationException as exc:
            raise DeviceError(f"{self.id} refused the login as {h.user or 'the current user'} "
                              f"({str(exc).rstrip('.') or 'authentication failed'}); check --user and --key "
                              "('edgekit devices add' updates them)") from exc
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise DeviceDisconnected(f"cannot reach {self.id} at {h.host}:{h.port}: {_why(exc, h.connect_timeout)}; "
                                     "is it on and is sshd running?") from exc
        with _KNOWN_HOSTS_LOCK:  # boards are probed in parallel: merge what the others saved meanwhile
            client.load_host_keys(str(known))
            client.save_host_keys(str(known))
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(KEEPALIVE_S)
        self._client = client
        return client

    def _sftp_client(self) -> Any:
        if self._sftp is None:
            import paramiko

            try:
                self._sftp = self._connect().open_sftp()
            except (OSError, paramiko.SSHException, EOFError) as exc:
                raise self._dropped(exc) from exc
            self._sftp.get_channel().settimeout(SFTP_TIMEOUT_S)  # a board that stops answering is lost, not waited on
        return self._sftp

    def close(self) -> None:
        """Drop the link: the transport first, so nothing waits on a board that may be frozen (or a packet
        half sent); its channels, the SFTP session's among them, close with it."""
        client, sftp = self._client, self._sftp
        self._sftp = self._client = None
        for obj in (client, sftp):
            if obj is not None:
                with contextlib.suppress(Exception):  # closing a dead link
                    obj.close()

    def _dropped(self, exc: BaseException, seconds: float | None = None) -> DeviceDisconnected:
        self.close()
        if isinstance(exc, TimeoutError):
            return DeviceDisconnected(
                f"lost {self.id} (no answer for {seconds or SFTP_TIMEOUT_S:g} s: it froze or left the network); "
                "run the same push again to resume from what arrived")
        return DeviceDisconnected(f"the connection to {self.id} dropped ({_why(exc)}); run the same push again "
                                  "to resume from what arrived")

    # -- Device -------------------------------------------------------------------------------------
    def default_dest(self) -> str:
        return self.host.dest or "~/edgekit"

    def resolve(self, path: str) -> str:
        if path == "~" or path.startswith("~/"):
            if self._home is None:
                self._home = self._sftp_call(lambda sftp: sftp.normalize("."))
            return self._home.rstrip("/") + path[1:] if path != "~" else self._home
        return path

    def _sftp_call(self, fn: Any) -> Any:
        """``fn(sftp)``; a link that dropped or stopped answering is DeviceDisconnected."""
        import paramiko

        try:
            return fn(self._sftp_client())
        except (TimeoutError, ConnectionError, paramiko.SSHException, EOFError) as exc:
            raise self._dropped(exc) from exc

    # SFTP requests ride the open session; each exec costs a new sshd session (slow on small boards).
    def _stat(self, path: str) -> Any:
        try:
            return self._sftp_call(lambda sftp: sftp.stat(path))
        except OSError as exc:  # no such file, no permission, a path through a file
            if exc.errno:
                return None
            raise self._dropped(exc) from exc

    def file_size(self, path: str) -> int | None:
        st = self._stat(path)
        return None if st is None else int(st.st_size)

    def is_dir(self, path: str) -> bool:
        st = self._stat(path)
        return st is not None and stat.S_ISDIR(st.st_mode or 0)

    def rename(self, src: str, dst: str) -> None:
        try:  # rename(2) refuses to put a file onto a folder (EISDIR)
            self._sftp_call(lambda sftp: sftp.posix_rename(src, dst))
        except OSError:
            super().rename(src, dst)  # says why, in the shell's words

    def remove(self, path: str) -> None:
        try:
            self._sftp_call(lambda sftp: sftp.remove(path))
        except OSError:
            pass

    def run(self, command: str, timeout: float | None = 600) -> RunResult:
        """Run ``command`` in an exec channel. ``timeout``: seconds without output before giving up (None:
        the command may stay quiet as long as it needs, as sha256sum of a large file does). Either way a
        board that stops answering is given up after EXEC_STALL_S (see :class:`_Watch`)."""
        client = self._connect()
        import paramiko

        with _Watch(self, EXEC_STALL_S) as watch:
            try:
                _, stdout, stderr = client.exec_command(command, timeout=timeout)
                out = stdout.read().decode(errors="replace")
                err = stderr.read().decode(errors="replace")
                rc = stdout.channel.recv_exit_status()
            except (OSError, paramiko.SSHException, EOFError) as exc:
                if watch.lost:
                    raise self._dropped(TimeoutError(), watch.stall) from exc
                raise self._dropped(exc, timeout) from exc
        if watch.lost:  # the dropped link ended the reads early: what came back is not the command's answer
            raise self._dropped(TimeoutError(), watch.stall)
        return RunResult(rc, out, err)

    def info(self) -> DeviceInfo:
        dest = self.resolve(self.default_dest())
        sec = _sections(self.run(_info_script(shlex.quote(dest))).stdout)
        uname = sec.get("uname", "").split()
        model, flags = cpu_from_proc(sec.get("cpuinfo", ""))
        total, avail = parse_meminfo(sec.get("meminfo", ""))
        st_total, st_free = parse_df_k(sec.get("df", ""))
        board = sec.get("board", "").strip() or None
        nproc = sec.get("nproc", "").strip()
        from edgekit.devices.base import GpuInfo

        gpus = []
        for line in sec.get("gpus", "").strip().splitlines():
            p = [x.strip() for x in line.split(",")]
            if len(p) == 3 and p[1].isdigit():
                gpus.append(GpuInfo(p[0], int(p[1]) << 20, int(p[2]) << 20 if p[2].isdigit() else None))
        return DeviceInfo(
            id=self.id, platform="ssh", name=self.host.name, model=board or model,
            os=uname[0] if uname else None,
            os_version=sec.get("os", "").strip() or (uname[1] if len(uname) > 1 else None),
            arch=normalize_arch(uname[-1]) if uname else None, soc=board, cpu=model, cpu_features=flags,
            cores=int(nproc) if nproc.isdigit() else None, ram_total=total, ram_available=avail,
            storage_path=dest, storage_total=st_total, storage_free=st_free, gpus=tuple(gpus))

    def append_from(self, local: Path, remote: str, offset: int, on_bytes: BytesFn, cancel: Cancel | None) -> None:
        sftp = self._sftp_client()
        dst = None
        try:
            dst = sftp.open(remote, "r+b" if offset else "wb")
            dst.set_pipelined(True)
            dst.seek(offset)
            with open(local, "rb") as src:
                src.seek(offset)
                while block := src.read(BLOCK):
                    PushCancelledCheck(cancel)
                    dst.write(block)
                    on_bytes(len(block))
            f, dst = dst, None
            f.close()  # waits until the board has acknowledged every write
        except BaseException as exc:
            if dst is not None:
                self._discard(dst, exc)
            elif not isinstance(exc, Exception):  # a signal in the open or the last acknowledgements
                self.close()
            translated = self._write_error(exc, remote) if isinstance(exc, Exception) else None
            if translated is None:
                raise
            raise translated from exc

    def _discard(self, f: Any, exc: BaseException) -> None:
        """Close the remote file after ``exc``, never replacing ``exc``. A cancel between blocks, or a write
        the board refused, leaves a healthy link: the file is closed properly. Anything else (a link that
        dropped or froze, a signal's SystemExit or a Ctrl-C that may have struck mid-packet) drops the
        link instead of waiting on the board; what it wrote stays in the partial file for the next push."""
        transport = self._client.get_transport() if self._client is not None else None
        alive = transport is not None and transport.is_active()
        clean = isinstance(exc, EdgekitError) or (isinstance(exc, OSError) and not isinstance(
            exc, (TimeoutError, ConnectionError)))
        if alive and clean:
            with contextlib.suppress(Exception):
                f.close()
        else:
            self.close()

    def _write_error(self, exc: Exception, remote: str) -> Exception | None:
        """The error to raise for ``exc`` from writing ``remote`` (None: ``exc`` itself)."""
        import paramiko

        if isinstance(exc, PermissionError):
            return DevicePermissionError(f"{self.id} refused to write {remote}: permission denied; choose a "
                                         f"destination you can write with --dest (default {self.default_dest()})")
        if isinstance(exc, (paramiko.SSHException, EOFError)):
            return self._dropped(exc)
        if not isinstance(exc, OSError):
            return None
        transport = self._client.get_transport() if self._client is not None else None
        if isinstance(exc, (TimeoutError, ConnectionError)) or transport is None or not transport.is_active():
            return self._dropped(exc)
        free = None
        with contextlib.suppress(Exception):  # SFTP v3 has no "disk full" status: sftp-server says "Failure"
            free = self.free_bytes(posixpath.dirname(remote))
        if free is not None and free < BLOCK:
            return OSError(errno.ENOSPC, "No space left on device", remote)
        return DeviceError(f"{self.id} could not write {remote}: {exc} (is its disk full?)")


class _Watch:
    """Whether the board still answers while a command runs on it.

    A command's silence says nothing: ``sha256sum`` of a multi-GB model prints nothing for minutes on a
    healthy board. So, like ``ssh -o ServerAliveInterval``, the watch asks the board's sshd itself: every
    few seconds a ``keepalive@openssh.com`` request, which an SSH server answers (with a refusal) however
    busy its command is. No answer for ``stall`` seconds means the board froze or left the network, and
    no TCP timeout would say so for a quarter of an hour (a frozen board's kernel still acknowledges
    packets). The watch then drops the link, which ends every wait of the command at once, and sets
    ``lost``."""

    def __init__(self, device: SSHDevice, stall: float) -> None:
        self.device = device
        self.stall = stall
        self.lost = False
        self._done = threading.Event()
        transport = device._client.get_transport() if device._client is not None else None
        self._transport = transport
        self._thread = threading.Thread(target=self._watch, name=f"edgekit-watch-{device.ident}", daemon=True)

    def __enter__(self) -> _Watch:
        if self._transport is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()

    def _watch(self) -> None:
        interval = min(KEEPALIVE_S, self.stall / 2)
        while not self._done.wait(interval):
            if not self._answers() and not self._done.is_set():
                self.lost = True
                self.device.close()
                return

    def _answers(self) -> bool:
        """Whether the board answers a probe within ``stall`` seconds (a probe that the link's end cut short
        counts as answered: the command's own reads report that)."""
        start = time.monotonic()
        probe = threading.Thread(target=self._transport.global_request, args=("keepalive@openssh.com",),
                                 kwargs={"wait": True}, daemon=True)  # returns once answered or the link closed
        probe.start()
        while probe.is_alive() and not self._done.is_set():
            probe.join(min(0.1, max(0.0, start + self.stall - time.monotonic())))
            if time.monotonic() - start >= self.stall:
                break
        return not probe.is_alive() or self._done.is_set()


def _probe(entry: tuple[str, SSHHost | str]) -> DeviceInfo:
    name, host = entry
    if isinstance(host, str):  # a damaged entry of devices.json: listed with its fix, the others still work
        return DeviceInfo(id=f"ssh:{name}", platform="ssh", name=name, state="invalid", detail=host)
    dev = SSHDevice(host)
    try:
        return dev.info()
    except EdgekitError as exc:
        state = "unreachable" if isinstance(exc, DeviceError) else "error"
        return DeviceInfo(id=dev.id, platform="ssh", name=host.name, state=state, detail=str(exc))
    finally:
        dev.close()


@register_platform("ssh")
class SSHPlatform(Platform):
    name = "ssh"

    def discover(self) -> tuple[list[DeviceInfo], str | None]:
        from concurrent.futures import ThreadPoolExecutor

        entries = ssh_entries()
        if not entries:
            return [], "no SSH boards configured; add one with 'edgekit devices add ssh:NAME --host HOST --user USER'"
        with ThreadPoolExecutor(max_workers=min(PROBE_WORKERS, len(entries))) as pool:  # each waits on its board
            return list(pool.map(_probe, entries)), None

    def open(self, ident: str) -> Device:
        return SSHDevice(get_ssh_host(ident))
