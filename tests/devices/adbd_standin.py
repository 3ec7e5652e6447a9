"""An Android device stand-in that speaks adbd's wire protocol on 127.0.0.1, for the real adb server.

Written from AOSP's protocol notes (OVERVIEW.TXT, protocol.txt, SYNC.TXT): 24-byte messages
(command, arg0, arg1, length, checksum, magic), CNXN without AUTH (like ro.adb.secure=0), streams with
OPEN/OKAY/WRTE/CLSE and one-WRTE-in-flight flow control, services ``shell:`` / ``shell,v2:`` and
``sync:`` (STAT, STA2, LST2, LIST, SEND, RECV, QUIT).

The "device" is a folder. Shell commands really run in /bin/sh as uid 2000 (Android's shell user), with
device paths (/data, /sdcard, /system, ...) rewritten into the folder, so permissions behave as on a
phone: /data/local/tmp is writable, /system is not. ``getprop`` and ``df`` are small scripts answering
from the configured properties and capacity. Faults: ``drop_after`` closes the link after that many
SEND bytes (a cable pulled mid-push; the half-received file is removed, as adbd does).
"""

from __future__ import annotations

import os
import re
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

A_CNXN, A_OPEN, A_OKAY, A_WRTE, A_CLSE = (struct.unpack("<I", c)[0] for c in (b"CNXN", b"OPEN", b"OKAY", b"WRTE",
                                                                              b"CLSE"))
VERSION = 0x01000001
MAX_PAYLOAD = 256 * 1024
SHELL_UID = 2000
DEVICE_DIRS = ("data", "sdcard", "storage", "system", "vendor")
_PATH_RE = re.compile(r"(?<![\w./-])/(" + "|".join(DEVICE_DIRS) + r")(?=/|\b)")

DEFAULT_PROPS = {
    "ro.product.model": "Standin 7", "ro.product.manufacturer": "edgekit", "ro.product.name": "standin",
    "ro.product.device": "standin", "ro.product.cpu.abi": "arm64-v8a", "ro.product.cpu.abilist": "arm64-v8a",
    "ro.soc.model": "SM8550", "ro.board.platform": "kalama", "ro.build.version.release": "14",
    "ro.build.version.sdk": "34",
}

GETPROP = """#!/bin/sh
if [ -n "$1" ]; then sed -n "s/^\\[$1\\]: \\[\\(.*\\)\\]$/\\1/p" "{props}"; else cat "{props}"; fi
"""
# toybox's df -k layout; capacity and usage come from the stand-in's settings and the folder's real contents.
DF = """#!/bin/sh
used=$(du -sk "{root}" | cut -f1)
total=$(cat "{capacity}")
free=$((total - used)); [ $free -lt 0 ] && free=0
echo "Filesystem     1K-blocks    Used Available Use% Mounted on"
echo "/dev/block/dm-5 $total $used $free 50% /data"
"""


class AdbdStandin:
    """Listens on 127.0.0.1:``port``; ``root`` holds the device's files. Thread-based; ``close()`` stops it."""

    def __init__(self, root: Path, props: dict[str, str] | None = None, capacity: int = 8 << 30) -> None:
        self.root = Path(root)
        self.bin = self.root.parent / (self.root.name + "-bin")
        self.props = dict(DEFAULT_PROPS, **(props or {}))
        self.drop_after: int | None = None
        self.frozen = False  # a hung phone: while set, nothing is read or answered (the link stays up)
        self.received = 0
        self.drops = 0
        for d in ("data/local/tmp", "sdcard", "system/bin", "vendor"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chown(self.root / "data/local/tmp", SHELL_UID, SHELL_UID)
        os.chown(self.root / "sdcard", SHELL_UID, SHELL_UID)
        self.bin.mkdir(exist_ok=True)
        (self.bin / "props").write_text("".join(f"[{k}]: [{v}]\n" for k, v in self.props.items()))
        self.set_capacity(capacity)
        for name, text in (("getprop", GETPROP), ("df", DF)):
            (self.bin / name).write_text(text.format(props=self.bin / "props", root=self.root,
                                                     capacity=self.bin / "capacity"))
            (self.bin / name).chmod(0o755)
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(4)
        self.port = self._sock.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def set_capacity(self, nbytes: int) -> None:
        (self.bin / "capacity").write_text(str(nbytes // 1024))

    def host_path(self, device_path: str) -> Path:
        return self.root / device_path.lstrip("/")

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        self.drop()

    def drop(self) -> None:
        """Pull the cable: close every connection to the adb server."""
        for c in list(self._conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self._conns.clear()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns.append(conn)
            threading.Thread(target=_Connection(self, conn).serve, daemon=True).start()

    # -- shell ------------------------------------------------------------------------------------
    def rewrite(self, command: str) -> str:
        return _PATH_RE.sub(lambda m: f"{self.root}/{m.group(1)}", command)

    def unmap(self, data: bytes) -> bytes:
        return data.replace(str(self.root).encode(), b"")

    def shell(self, command: str) -> tuple[int, bytes, bytes]:
        env = {"PATH": f"{self.bin}:/usr/bin:/bin", "HOME": str(self.root / "data/local/tmp"), "LANG": "C"}
        p = subprocess.run(["setpriv", f"--reuid={SHELL_UID}", f"--regid={SHELL_UID}", "--clear-groups", "--",
                            "sh", "-c", self.rewrite(command)], capture_output=True, env=env,
                           cwd=self.root / "data/local/tmp")
        return p.returncode, self.unmap(p.stdout), self.unmap(p.stderr)


class _Stream:
    def __init__(self, local: int, remote: int) -> None:
        self.local, self.remote = local, remote
        self.ready = threading.Event()
        self.ready.set()
        self.inbox: list[bytes] = []
        self.cv = threading.Condition()
        self.closed = False

    def feed(self, data: bytes | None) -> None:
        with self.cv:
            if data is None:
                self.closed = True
            else:
                self.inbox.append(data)
            self.cv.notify_all()


class _Reader:
    """Byte-exact reads over a stream's WRTE payloads."""

    def __init__(self, stream: _Stream) -> None:
        self.s = stream
        self.buf = bytearray()

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            with self.s.cv:
                while not self.s.inbox and not self.s.closed:
                    self.s.cv.wait()
                if not self.s.inbox:
                    raise EOFError
                self.buf += self.s.inbox.pop(0)
        out, self.buf = bytes(self.buf[:n]), self.buf[n:]
        return out


class _Connection:
    def __init__(self, dev: AdbdStandin, sock: socket.socket) -> None:
        self.dev, self.sock = dev, sock
        self.streams: dict[int, _Stream] = {}
        self.next_id = 1
        self.lock = threading.Lock()
        self.alive = True

    def send(self, cmd: int, a0: int, a1: int, data: bytes = b"") -> None:
        self.hold()
        hdr = struct.pack("<6I", cmd, a0, a1, len(data), sum(data) & 0xFFFFFFFF, cmd ^ 0xFFFFFFFF)
        with self.lock:
            self.sock.sendall(hdr + data)

    def hold(self) -> None:
        while self.dev.frozen and not self.dev._closed:
            time.sleep(0.05)

    def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            if not part:
                raise EOFError
            buf += part
        return buf

    def serve(self) -> None:
        try:
            while True:
                cmd, a0, a1, length, _, _ = struct.unpack("<6I", self.recv_exact(24))
                data = self.recv_exact(length) if length else b""
                self.hold()
                self.dispatch(cmd, a0, a1, data)
        except (EOFError, OSError):
            pass
        finally:
            self.alive = False
            for s in self.streams.values():
                s.feed(None)
                s.ready.set()
            self.sock.close()

    def dispatch(self, cmd: int, a0: int, a1: int, data: bytes) -> None:
        if cmd == A_CNXN:
            banner = "device::" + "".join(f"{k}={self.dev.props[k]};" for k in
                                          ("ro.product.name", "ro.product.model", "ro.product.device"))
            self.send(A_CNXN, VERSION, MAX_PAYLOAD, (banner + "features=shell_v2,cmd,stat_v2").encode())
        elif cmd == A_OPEN:
            service = data.rstrip(b"\0").decode()
            local = self.next_id
            self.next_id += 1
            stream = self.streams[local] = _Stream(local, a0)
            self.send(A_OKAY, local, a0)
            threading.Thread(target=self.run_service, args=(stream, service), daemon=True).start()
        elif cmd == A_WRTE and a1 in self.streams:
            s = self.streams[a1]
            s.feed(data)
            self.send(A_OKAY, s.local, s.remote)
        elif cmd == A_OKAY and a1 in self.streams:
            self.streams[a1].ready.set()
        elif cmd == A_CLSE and a1 in self.streams:
            self.streams.pop(a1).feed(None)

    def write(self, s: _Stream, data: bytes) -> None:
        for i in range(0, len(data), MAX_PAYLOAD):
            s.ready.wait()
            if not self.alive or s.closed:
                raise EOFError
            s.ready.clear()
            self.send(A_WRTE, s.local, s.remote, data[i:i + MAX_PAYLOAD])

    def close_stream(self, s: _Stream) -> None:
        if self.alive and s.local in self.streams:
            s.ready.wait(5)
            self.streams.pop(s.local, None)
            self.send(A_CLSE, s.local, s.remote)

    def run_service(self, s: _Stream, service: str) -> None:
        try:
            if service.startswith("shell,v2") or service.startswith("shell:"):
                v2 = service.startswith("shell,v2")
                rc, out, err = self.dev.shell(service.split(":", 1)[1])
                if v2:
                    pkt = lambda i, b: bytes([i]) + struct.pack("<I", len(b)) + b  # noqa: E731
                    self.write(s, (pkt(1, out) if out else b"") + (pkt(2, err) if err else b"") + pkt(3, bytes([rc])))
                else:
                    self.write(s, out + err)
            elif service == "sync:":
                _Sync(self, s).serve()
            self.close_stream(s)
        except (EOFError, OSError):
            pass
        except Exception:  # a stand-in bug: show it, the test then fails on the missing reply
            traceback.print_exc()


class _Sync:
    def __init__(self, conn: _Connection, stream: _Stream) -> None:
        self.conn, self.s, self.dev = conn, stream, conn.dev
        self.r = _Reader(stream)

    def reply(self, data: bytes) -> None:
        self.conn.write(self.s, data)

    def serve(self) -> None:
        while True:
            rid, n = struct.unpack("<4sI", self.r.read(8))
            if rid == b"QUIT":
                return
            arg = self.r.read(n).decode()
            getattr(self, "do_" + rid.decode().lower(), self.unknown)(arg, rid)

    def unknown(self, arg: str, rid: bytes) -> None:
        self.fail(f"unknown sync request {rid!r}")

    def fail(self, msg: str) -> None:
        self.reply(b"FAIL" + struct.pack("<I", len(msg)) + msg.encode())

    def do_stat(self, path: str, rid: bytes) -> None:
        try:
            st = os.stat(self.dev.host_path(path))
            self.reply(b"STAT" + struct.pack("<3I", st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime)))
        except OSError:
            self.reply(b"STAT" + bytes(12))

    def do_sta2(self, path: str, rid: bytes) -> None:
        try:
            st = (os.lstat if rid == b"LST2" else os.stat)(self.dev.host_path(path))
            self.reply(rid + struct.pack("<IQQIIIIQqqq", 0, st.st_dev, st.st_ino, st.st_mode, st.st_nlink, st.st_uid,
                                         st.st_gid, st.st_size, int(st.st_atime), int(st.st_mtime), int(st.st_ctime)))
        except OSError as exc:
            self.reply(rid + struct.pack("<I", exc.errno or 2) + bytes(64))

    do_lst2 = do_sta2

    def do_list(self, path: str, rid: bytes) -> None:
        folder = self.dev.host_path(path)
        for name in sorted(os.listdir(folder)) if folder.is_dir() else []:
            st = os.lstat(folder / name)
            self.reply(b"DENT" + struct.pack("<4I", st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime),
                                             len(name.encode())) + name.encode())
        self.reply(b"DONE" + bytes(16))

    def do_recv(self, path: str, rid: bytes) -> None:
        try:
            data = self.dev.host_path(path).read_bytes()
        except OSError as exc:
            self.fail(exc.strerror or str(exc))
            return
        for i in range(0, len(data), 64 << 10):
            chunk = data[i:i + (64 << 10)]
            self.reply(b"DATA" + struct.pack("<I", len(chunk)) + chunk)
        self.reply(b"DONE" + bytes(4))

    def do_send(self, spec: str, rid: bytes) -> None:
        path, _, mode = spec.rpartition(",")
        target = self.dev.host_path(path)
        # Written by the shell user, as adbd does on a user build: permissions decide, not this code.
        writer = subprocess.Popen(["setpriv", f"--reuid={SHELL_UID}", f"--regid={SHELL_UID}", "--clear-groups", "--",
                                   "sh", "-c", 'exec cat > "$1"', "sh", str(target)],
                                  stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        capacity = int((self.dev.bin / "capacity").read_text()) * 1024
        used = sum(p.stat().st_size for p in self.dev.root.rglob("*") if p.is_file())
        error = None
        try:
            while True:
                rid2, n = struct.unpack("<4sI", self.r.read(8))
                if rid2 == b"DONE":
                    break
                data = self.r.read(n)
                self.dev.received += n
                if self.dev.drop_after is not None and self.dev.received >= self.dev.drop_after:
                    self.dev.drop_after = None
                    self.dev.drops += 1
                    raise EOFError("cable pulled")
                used += n
                if error is None and used > capacity:
                    error = "No space left on device"
                if error is None:
                    try:
                        writer.stdin.write(data)
                    except BrokenPipeError:  # the writer died (permissions): its stderr says why
                        error = ""
        except (EOFError, OSError):
            writer.kill()
            writer.wait()
            target.unlink(missing_ok=True)  # adbd removes what a broken SEND left
            try:
                self.conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            raise EOFError from None
        try:
            writer.stdin.close()
        except BrokenPipeError:
            pass
        rc = writer.wait()
        if rc != 0 or error:
            msg = error or self.dev.unmap(writer.stderr.read()).decode(errors="replace").strip()
            if error:
                target.unlink(missing_ok=True)
            self.fail(f"couldn't create file: {msg.split(': ')[-1] if 'denied' in msg else msg}")
            return
        if mode.isdigit():
            os.chmod(target, stat.S_IMODE(int(mode)))
        self.reply(b"OKAY" + bytes(4))


def main() -> None:  # pragma: no cover - manual use: python -m tests.devices.adbd_standin ROOT
    dev = AdbdStandin(Path(sys.argv[1]))
    print(f"adbd stand-in on 127.0.0.1:{dev.port}, files in {dev.root}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()

