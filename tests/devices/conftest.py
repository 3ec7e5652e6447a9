"""Device fixtures: a real OpenSSH server on a loopback port, the adbd stand-in behind the real adb
server, and small artifacts to push."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real sshd on 127.0.0.1 with a temp host key and a temp user key; yields connection facts."""
    if not Path(SSHD).exists():
        pytest.skip("openssh-server is not installed (.ci/setup.sh installs it)")
    d = tmp_path_factory.mktemp("sshd")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "user_key")], check=True)
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    port = _free_port()
    (d / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d}/host_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
PermitRootLogin prohibit-password
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
Subsystem sftp internal-sftp
LogLevel ERROR
""")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE)
    try:
        _wait_port(port, proc, "sshd")
        import getpass

        yield {"host": "127.0.0.1", "port": port, "user": getpass.getuser(), "key": str(d / "user_key"),
               "pid": proc.pid}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


@pytest.fixture
def home(private_home) -> Path:
    """A private EDGEKIT_HOME, so device configs and known_hosts do not touch the user's."""
    return private_home


@pytest.fixture(scope="session")
def tiny_artifact(tiny_llama, tmp_path_factory) -> Path:
    """A real GGUF artifact (the tiny Llama at Q8_0) with its manifest, about 2 MB."""
    from edgekit import api

    out = tmp_path_factory.mktemp("art") / "tiny-q8"
    api.convert(tiny_llama, "gguf", output=out, recipe=api.ConvertRecipe(bits=8))
    return out


@pytest.fixture
def big_artifact(tiny_artifact, tmp_path) -> Path:
    """The tiny artifact with ~6 MB of padding files, so transfers span many blocks and chunks."""
    art = tmp_path / "padded"
    shutil.copytree(tiny_artifact, art)
    (art / "extra.bin").write_bytes(os.urandom(6 << 20))
    manifest = json.loads((art / "edgekit.json").read_text())
    (art / "edgekit.json").write_text(json.dumps(manifest))
    return art


ADB = shutil.which("adb")


def _adb(port: int, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([ADB, "-P", str(port), *args], capture_output=True, text=True, timeout=30, check=check)


@pytest.fixture(scope="session")
def adb_server():
    """The real adb server on a private port (so it never fights another), killed at the end."""
    if ADB is None:
        pytest.skip("adb is not installed (.ci/setup.sh installs it)")
    port = _free_port()
    old = os.environ.get("ANDROID_ADB_SERVER_PORT")
    os.environ["ANDROID_ADB_SERVER_PORT"] = str(port)
    _adb(port, "start-server", check=True)
    try:
        yield port
    finally:
        _adb(port, "kill-server")
        if old is None:
            os.environ.pop("ANDROID_ADB_SERVER_PORT", None)
        else:
            os.environ["ANDROID_ADB_SERVER_PORT"] = old


def wait_adb_state(port: int, serial: str, state: str = "device", timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in _adb(port, "devices").stdout.splitlines()[1:]:
            if line.split("\t") == [serial, state]:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{serial} never became {state}: {_adb(port, 'devices').stdout}")


def reconnect(port: int, standin) -> str:
    """``adb connect`` the stand-in (again) and wait until the server lists it as a device."""
    serial = f"127.0.0.1:{standin.port}"
    _adb(port, "connect", serial)
    wait_adb_state(port, serial)
    return serial


@pytest.fixture
def phone(adb_server, home):
    """A fresh adbd stand-in connected to the real adb server; yields (stand-in, device id)."""
    import tempfile

    from tests.devices.adbd_standin import AdbdStandin

    base = Path(tempfile.mkdtemp(prefix="edgekit-adbd-"))
    base.chmod(0o755)  # the device's shell user (uid 2000) must reach its folders
    dev = AdbdStandin(base / "root")
    serial = reconnect(adb_server, dev)
    try:
        yield dev, f"android:{serial}"
    finally:
        _adb(adb_server, "disconnect", serial)
        dev.close()
        shutil.rmtree(base, ignore_errors=True)
