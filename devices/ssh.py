"""SSH boards (Jetson, Raspberry Pi and the like) through paramiko: info, shell, SFTP transfers.

Hosts come from edgekit's own config (config.py). Host keys: the user's known_hosts is honoured; a
host seen for the first time is remembered in edgekit's known_hosts (trust on first use, like
``ssh -o StrictHostKeyChecking=accept-new``) and a changed key is refused.
"""

from __future__ import annotations

import contextlib
import errno
import posixpath
import shlex
import socket
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
from edgekit.devices.config import SSHHost, get_ssh_host, load_ssh_hosts
from edgekit.devices.host import cpu_from_proc
from edgekit.errors import require
from edgekit.fsutil import edgekit_home

BLOCK = 1 << 18
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
        client = paramiko.SSHClient()
        client.load_system_host_keys()
        known = edgekit_home() / "known_hosts"
        known.touch(exist_ok=True)
        client.load_host_keys(str(known))
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # saved to edgekit's known_hosts
        h = self.host
        try:
            client.connect(h.host, port=h.port, username=h.user,
                           key_filename=str(Path(h.key).expanduser()) if h.key else None,
                           timeout=h.connect_timeout, banner_timeout=h.connect_timeout,
                           auth_timeout=h.connect_timeout, look_for_keys=h.key is None)
        except paramiko.BadHostKeyException as exc:
            raise DeviceError(f"the host key of {self.id} ({h.host}:{h.port}) changed; if that is expected, "
                              f"remove its line from {known} or ~/.ssh/known_hosts") from exc
        except paramiko.AuthenticationException as exc:
            raise DeviceError(f"{self.id} refused the login as {h.user or 'the current user'}: {exc}; check "
                              "--user and --key ('edgekit devices add' updates them)") from exc
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise DeviceDisconnected(f"cannot reach {self.id} at {h.host}:{h.port}: {exc}; is it on and is sshd "
                                     "running?") from exc
        client.save_host_keys(str(known))
        self._client = client
        return client

    def _sftp_client(self) -> Any:
        if self._sftp is None:
            self._sftp = self._connect().open_sftp()
        return self._sftp

    def close(self) -> None:
        for obj in (self._sftp, self._client):
            if obj is not None:
                try:
                    obj.close()
                except Exception:  # noqa: BLE001 - closing a dead link
                    pass
        self._sftp = self._client = None

    def _dropped(self, exc: BaseException) -> DeviceDisconnected:
        self.close()
        return DeviceDisconnected(f"the connection to {self.id} dropped ({exc or type(exc).__name__}); run the "
                                  "same push again to resume from what arrived")

    # -- Device -------------------------------------------------------------------------------------
    def default_dest(self) -> str:
        return self.host.dest or "~/edgekit"

    def resolve(self, path: str) -> str:
        if path == "~" or path.startswith("~/"):
            if self._home is None:
                self._home = self._sftp_client().normalize(".")
            return self._home.rstrip("/") + path[1:] if path != "~" else self._home
        return path

    # SFTP requests ride the open session; each exec costs a new sshd session (slow on small boards).
    def file_size(self, path: str) -> int | None:
        try:
            return int(self._sftp_client().stat(path).st_size)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno:
                return None
            raise self._dropped(exc) from exc

    def rename(self, src: str, dst: str) -> None:
        try:
            self._sftp_client().posix_rename(src, dst)
        except OSError:
            super().rename(src, dst)

    def remove(self, path: str) -> None:
        try:
            self._sftp_client().remove(path)
        except OSError:
            pass

    def run(self, command: str, timeout: float | None = 600) -> RunResult:
        client = self._connect()
        import paramiko

        try:
            _, stdout, stderr = client.exec_command(command, timeout=timeout)
            out = stdout.read().decode(errors="replace")
            err = stderr.read().decode(errors="replace")
            rc = stdout.channel.recv_exit_status()
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise self._dropped(exc) from exc
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
        import paramiko

        sftp = self._sftp_client()
        try:
            with open(local, "rb") as src, sftp.open(remote, "r+b" if offset else "wb") as dst:
                dst.set_pipelined(True)
                dst.seek(offset)
                src.seek(offset)
                while block := src.read(BLOCK):
                    PushCancelledCheck(cancel)
                    dst.write(block)
                    on_bytes(len(block))
        except PermissionError as exc:
            raise DevicePermissionError(f"{self.id} refused to write {remote}: permission denied; choose a "
                                        f"destination you can write with --dest (default {self.default_dest()})"
                                        ) from exc
        except OSError as exc:
            transport = self._client.get_transport() if self._client is not None else None
            if isinstance(exc, (socket.timeout, ConnectionError)) or transport is None or not transport.is_active():
                raise self._dropped(exc) from exc
            free = None
            with contextlib.suppress(Exception):  # SFTP v3 has no "disk full" status: sftp-server says "Failure"
                free = self.free_bytes(posixpath.dirname(remote))
            if free is not None and free < BLOCK:
                raise OSError(errno.ENOSPC, "No space left on device", remote) from exc
            raise DeviceError(f"{self.id} could not write {remote}: {exc} (is its disk full?)") from exc
        except (paramiko.SSHException, EOFError) as exc:
            raise self._dropped(exc) from exc


@register_platform("ssh")
class SSHPlatform(Platform):
    name = "ssh"

    def discover(self) -> tuple[list[DeviceInfo], str | None]:
        hosts = load_ssh_hosts()
        if not hosts:
            return [], "no SSH boards configured; add one with 'edgekit devices add ssh:NAME --host HOST --user USER'"
        found = []
        for host in hosts.values():
            dev = SSHDevice(host)
            try:
                found.append(dev.info())
            except DeviceError as exc:
                found.append(DeviceInfo(id=dev.id, platform="ssh", name=host.name, state="unreachable",
                                        detail=str(exc)))
            finally:
                dev.close()
        return found, None

    def open(self, ident: str) -> Device:
        return SSHDevice(get_ssh_host(ident))
