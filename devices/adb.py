"""Android phones over adb: discovery and info through the adb server (adbutils), sync pushes, shell.

edgekit talks to the adb server on ``$ANDROID_ADB_SERVER_PORT`` (5037 by default) and starts it with
the ``adb`` executable when it is not running. adb's sync protocol cannot append, so a file goes up in
chunks: each chunk is sent to ``TMP.chunk`` with SEND and appended to the temp file on the device with
``cat``. An interrupted push resumes from the temp file's size; a push stopped on purpose (Ctrl-C, a
signal, a cancel) removes the chunk it was at.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shlex
import shutil
import socket
import struct
import subprocess
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
    PushCancelled,
    PushCancelledCheck,
    RunResult,
    normalize_arch,
    parse_df_k,
    parse_meminfo,
    register_platform,
)
from edgekit.devices.host import cpu_from_proc
from edgekit.errors import InputError, MissingDependencyError, require

DEFAULT_DEST = "/data/local/tmp/edgekit"
CHUNK = 8 << 20          # bytes per SEND; the resume granularity
SYNC_DATA_MAX = 64 << 10  # adb's SYNC_DATA_MAX
CLEANUP_TIMEOUT_S = 10    # removing a chunk after Ctrl-C: a phone that does not answer is not waited on
STALL_S = 60.0            # a phone that answers nothing this long (a quick command, or a poll) froze or left
JOBS_DIR = "/data/local/tmp"  # where a long command keeps its pid, output and exit code (the shell user may write)
POLL_S = 2.0              # how often a long command (sha256sum of a model, a profile) is asked whether it ended
STATES = {"device": "ready", "unauthorized": "unauthorized", "offline": "offline", "no permissions": "error"}


def server_port() -> int:
    return int(os.environ.get("ANDROID_ADB_SERVER_PORT", "5037"))


def adb_executable() -> str | None:
    return os.environ.get("ADBUTILS_ADB_PATH") or shutil.which("adb")


def client() -> Any:
    """An adbutils client for the adb server, starting the server (``adb start-server``) if needed."""
    adbutils = require("adbutils", "devices")
    c = adbutils.AdbClient(host="127.0.0.1", port=server_port(), socket_timeout=30)
    try:  # probe first: adbutils would start the server itself, printing onto our stdout
        socket.create_connection(("127.0.0.1", server_port()), timeout=3).close()
        return c
    except OSError:
        pass
    exe = adb_executable()
    if exe is None:
        raise MissingDependencyError("adb is not installed; install Android platform-tools (Debian: apt-get install "
                                     "adb) to use Android devices")
    subprocess.run([exe, "-P", str(server_port()), "start-server"], capture_output=True, timeout=30)
    c.server_version()
    return c


def parse_getprop(text: str) -> dict[str, str]:
    """``[key]: [value]`` lines from ``getprop``."""
    props = {}
    for line in text.splitlines():
        if line.startswith("[") and "]: [" in line:
            key, _, value = line.partition("]: [")
            props[key[1:]] = value.rstrip().removesuffix("]")
    return props


class AndroidDevice(Device):
    platform = "android"

    def __init__(self, serial: str, adb_client: Any | None = None) -> None:
        super().__init__(serial)
        self._client = adb_client or client()
        states = {d.serial: d.state for d in self._client.list()}
        if serial not in states:
            known = ", ".join(f"android:{s}" for s in states) or "none connected"
            raise InputError(f"unknown Android device 'android:{serial}' (known: {known}); plug it in with USB "
                             "debugging on, or 'adb connect HOST:PORT' for one over the network")
        if states[serial] != "device":
            raise DeviceError(f"android:{serial} is {states[serial]}; unlock it and accept the USB debugging prompt")
        self._dev = self._client.device(serial)

    def default_dest(self) -> str:
        return DEFAULT_DEST

    def run(self, command: str, timeout: float | None = 600) -> RunResult:
        """``command`` in the phone's shell. With a ``timeout`` it is a quick one: the phone must answer within
        STALL_S (or ``timeout`` if shorter). With ``timeout=None`` it may run quietly for as long as it needs,
        in the background on the phone, polled (see the module's note); Ctrl-C stops it there too."""
        if timeout is None:
            return self._run_polled(command)
        return self._shell(command, min(timeout, STALL_S))

    def _shell(self, command: str, timeout: float) -> RunResult:
        import adbutils

        try:
            r = self._dev.shell2(command, timeout=timeout, v2=True)
        except (adbutils.AdbError, OSError, EOFError) as exc:
            raise self._dropped(exc) from exc
        if r.stdout or r.stderr:
            return RunResult(r.returncode, r.stdout, r.stderr)
        return RunResult(r.returncode, r.output)

    def _run_polled(self, command: str) -> RunResult:
        import secrets

        q = shlex.quote
        job = q(posixpath.join(JOBS_DIR, f".edgekit-run-{secrets.token_hex(6)}"))
        inner = f"echo $$ > pid; exec sh -c {q(command)}"
        self._check(self._shell(f"mkdir -p {job} && cd {job} && (sh -c {q(inner)} > out 2> err < /dev/null; "
                                "echo $? > rc.tmp && mv rc.tmp rc) > /dev/null 2>&1 < /dev/null &", STALL_S),
                    f"start a command in {JOBS_DIR}")
        # 0: ended (rc follows); 1: running or starting; 7: its folder is gone; 8: its process is gone, no rc
        poll = (f"cd {job} 2>/dev/null || exit 7; [ -f rc ] && cat rc && exit 0; [ -f pid ] || exit 1; "
                "kill -0 $(cat pid) 2>/dev/null && exit 1; sleep 1; [ -f rc ] && cat rc && exit 0; exit 8")
        try:
            while (r := self._shell(poll, STALL_S)).rc == 1:
                time.sleep(POLL_S)
            if r.rc != 0 or not r.stdout.strip().isdigit():
                raise DeviceError(f"android:{self.ident} lost a command it was running ({'its folder' if r.rc == 7 else 'its process'} "
                                  "went: did the phone restart?); run it again")
            out = self._shell(f"cat {job}/out", STALL_S).stdout
            err = self._shell(f"cat {job}/err", STALL_S).stdout
            with contextlib.suppress(DeviceDisconnected):
                self._shell(f"rm -rf {job}", CLEANUP_TIMEOUT_S)
            return RunResult(int(r.stdout.strip()), out, err)
        except (KeyboardInterrupt, SystemExit, PushCancelled):
            with contextlib.suppress(Exception):  # stopped here: stopped on the phone too
                self._shell(f"p=$(cat {job}/pid 2>/dev/null) && {{ pkill -P $p; kill $p; }}; rm -rf {job}",
                            CLEANUP_TIMEOUT_S)
            raise

    def _dropped(self, exc: BaseException) -> DeviceDisconnected:
        return DeviceDisconnected(f"lost android:{self.ident} ({str(exc) or type(exc).__name__}); reconnect it and run the "
                                  "same push again to resume")

    def info(self) -> DeviceInfo:
        props = parse_getprop(self.run("getprop").stdout)
        total, avail = parse_meminfo(self.run("cat /proc/meminfo").stdout)
        st_total, st_free = parse_df_k(self.run(f"df -k {shlex.quote(self._existing(DEFAULT_DEST))}").stdout)
        cpu, flags = cpu_from_proc(self.run("cat /proc/cpuinfo").stdout)
        abi = props.get("ro.product.cpu.abi")
        release, sdk = props.get("ro.build.version.release"), props.get("ro.build.version.sdk")
        nproc = self.run("nproc").stdout.strip()
        return DeviceInfo(
            id=self.id, platform="android", name=props.get("ro.product.model") or self.ident,
            model=" ".join(filter(None, (props.get("ro.product.manufacturer"), props.get("ro.product.model")))) or None,
            os="Android", os_version=f"{release} (SDK {sdk})" if release else None, arch=normalize_arch(abi), abi=abi,
            soc=props.get("ro.soc.model") or props.get("ro.board.platform") or props.get("ro.hardware"),
            cpu=cpu, cpu_features=flags, cores=int(nproc) if nproc.isdigit() else None, ram_total=total,
            ram_available=avail, storage_path=DEFAULT_DEST, storage_total=st_total, storage_free=st_free)

    def _existing(self, path: str) -> str:
        while path not in ("", "/") and self.run(f"test -d {shlex.quote(path)}").rc != 0:
            path = path.rsplit("/", 1)[0]
        return path or "/"

    def send(self, local: Path, remote: str, start: int, length: int, on_bytes: BytesFn, cancel: Cancel | None) -> None:
        """sync SEND of ``local[start:start+length]`` to ``remote`` (replacing it), in 64 KiB DATA packets."""
        import adbutils

        try:
            with self._dev.open_transport(timeout=60) as c, open(local, "rb") as src:
                c.send_command("sync:")
                c.check_okay()
                spec = f"{remote},{0o100644}".encode()
                c.conn.sendall(b"SEND" + struct.pack("<I", len(spec)) + spec)
                src.seek(start)
                left = length
                while left:
                    PushCancelledCheck(cancel)
                    block = src.read(min(SYNC_DATA_MAX, left))
                    c.conn.sendall(b"DATA" + struct.pack("<I", len(block)) + block)
                    left -= len(block)
                    on_bytes(len(block))
                c.conn.sendall(b"DONE" + struct.pack("<I", int(time.time())))
                status = c.read_exact(4)
                if status != b"OKAY":
                    n = struct.unpack("<I", c.read_exact(4))[0]
                    msg = c.read_exact(n).decode(errors="replace")
                    if "denied" in msg.lower() or "read-only" in msg.lower():
                        raise DevicePermissionError(f"android:{self.ident} refused to write {remote}: {msg}; choose "
                                                    f"a writable --dest (default {DEFAULT_DEST})")
                    raise DeviceError(f"android:{self.ident} could not write {remote}: {msg}")
        except (adbutils.AdbError, OSError, EOFError) as exc:
            raise self._dropped(exc) from exc

    def append_from(self, local: Path, remote: str, offset: int, on_bytes: BytesFn, cancel: Cancel | None) -> None:
        """Whole chunks of CHUNK bytes: each is sent beside ``remote`` and appended to it, so the temp file
        only ever grows by a whole, complete chunk."""
        size = local.stat().st_size
        pos = offset
        chunk_path = remote + ".chunk"
        try:
            while pos < size or (pos == 0 and size == 0):
                n = min(CHUNK, size - pos)
                if pos == 0:  # the first chunk becomes the temp file itself
                    self.send(local, remote, 0, n, on_bytes, cancel)
                else:
                    self.send(local, chunk_path, pos, n, on_bytes, cancel)
                    self._check(self.run(f"cat {shlex.quote(chunk_path)} >> {shlex.quote(remote)} && "
                                         f"rm -f {shlex.quote(chunk_path)}"), f"append to {remote}")
                pos += n
                if n == 0:
                    break
        except (PushCancelled, KeyboardInterrupt, SystemExit):
            # Stopped on purpose, the phone still answers: the chunk goes, the temp file stays for resuming.
            # (A push that is never resumed would otherwise leave it beside the temp file.)
            with contextlib.suppress(Exception):
                self.run(f"rm -f {shlex.quote(chunk_path)}", timeout=CLEANUP_TIMEOUT_S)
            raise


@register_platform("android")
class AndroidPlatform(Platform):
    name = "android"

    def discover(self) -> tuple[list[DeviceInfo], str | None]:
        try:
            c = client()
            listed = c.list()
        except MissingDependencyError as exc:
            return [], str(exc)
        except Exception as exc:  # noqa: BLE001 - an adb server that will not start is a note, not a crash
            return [], f"adb server on port {server_port()} is not answering ({exc}); try 'adb start-server'"
        found = []
        for d in listed:
            state = STATES.get(d.state, "error")
            if state != "ready":
                found.append(DeviceInfo(id=f"android:{d.serial}", platform="android", name=d.serial, state=state,
                                        detail=f"adb reports {d.state}; unlock the phone and accept USB debugging"))
                continue
            try:
                found.append(AndroidDevice(d.serial, c).info())
            except DeviceError as exc:
                found.append(DeviceInfo(id=f"android:{d.serial}", platform="android", name=d.serial, state="error",
                                        detail=str(exc)))
        return found, None if found else "no Android devices (adb sees none; enable USB debugging or 'adb connect')"

    def open(self, ident: str) -> Device:
        return AndroidDevice(ident)
