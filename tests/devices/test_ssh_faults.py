"""SSH boards that stop answering, pushes stopped by signals, and the lines connection faults print (QA s48)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app
from edgekit.devices import DeviceDisconnected, PushConfig, open_device, push
from edgekit.devices import ssh as ssh_mod
from edgekit.devices.config import SSHHost, add_ssh_host
from edgekit.devices.transfer import partial_name
from edgekit.hashing import sha256_file
from tests.devices.conftest import _free_port
from tests.devices.netfault import CuttingProxy
from tests.devices.test_ssh import _add, _files

runner = CliRunner()


def _sessions(sshd) -> list[psutil.Process]:
    """The sshd processes serving connections (the listener's descendants)."""
    return psutil.Process(sshd["pid"]).children(recursive=True)


class _Freezer:
    """Freezes the board: its sshd sessions and their commands stopped, the TCP link still open (``at``: when).
    ``close`` resumes them, as the watchdog does after ``watchdog`` s (code that waits on forever fails the
    test, not the suite)."""

    def __init__(self, sshd, watchdog: float = 20.0) -> None:
        self.sshd = sshd
        self.stopped: list[psutil.Process] = []
        self.at: list[float] = []
        self._watchdog = threading.Timer(watchdog, self.resume)
        self._watchdog.start()

    def freeze(self) -> None:
        self.stopped.extend(_sessions(self.sshd))
        for p in self.stopped:
            p.send_signal(signal.SIGSTOP)
        self.at.append(time.monotonic())

    def resume(self) -> None:
        for p in self.stopped:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self._watchdog.cancel()
        self.resume()


def test_a_board_that_stops_answering_mid_push_is_given_up(sshd, home, big_artifact, tmp_path, monkeypatch):
    """A frozen board (its sshd stopped, the TCP link still open) fails the push after SFTP_TIMEOUT_S with
    a line that says so, instead of waiting for TCP to give up (~15 minutes); pushing again resumes."""
    monkeypatch.setattr(ssh_mod, "SFTP_TIMEOUT_S", 1.0)
    dev_id = _add(sshd)
    cfg = PushConfig(dest=str(tmp_path / "board"))
    board = _Freezer(sshd, watchdog=30)

    def freeze_once_bytes_flow(desc: str, done: int, total: int) -> None:
        if done and not board.stopped:
            board.freeze()

    try:
        with open_device(dev_id) as dev, pytest.raises(DeviceDisconnected) as e:
            push(big_artifact, dev, cfg, progress=freeze_once_bytes_flow)
        waited = time.monotonic() - board.at[0]
    finally:
        board.close()
    assert board.stopped, "no sshd session process to stop"
    text = str(e.value)
    assert f"lost {dev_id} (no answer for 1 s" in text and "run the same push again to resume" in text, text
    assert waited < 6, waited
    with open_device(dev_id) as dev:
        res = push(big_artifact, dev, cfg)
    assert any(f.resumed_from for f in res.files), res.files
    assert _files(tmp_path / "board" / big_artifact.name) == _files(big_artifact)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_kill_or_hang_up_mid_push_exits_by_the_signal_and_keeps_the_partial(sig, sshd, home, big_artifact,
                                                                             tmp_path):
    """`kill` (or a closed terminal) mid-transfer: exit 128+signal with what was kept, not "the connection
    dropped" exit 8 (the close of the remote file failing on the half-sent packet replaced the SystemExit)."""
    proxy = CuttingProxy((sshd["host"], sshd["port"]), rate=3 << 20)  # a slow link: the push takes seconds
    dev_id = _add(sshd, "slow", port=proxy.port)
    dest = tmp_path / "board"
    partial = Path(partial_name(str(dest / big_artifact.name / "extra.bin"), sha256_file(big_artifact / "extra.bin")))
    # as from a terminal, even where the test runs under nohup (SIGHUP ignored, and so kept ignored)
    main = ("import runpy, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_DFL); sys.argv[0] = 'edgekit'; "
            "runpy.run_module('edgekit.cli.main', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", main, "push", str(big_artifact), dev_id, "--dest", str(dest)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size > 0):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert "dropped" not in err and "Traceback" not in err, err
    assert "the partial file stays on the device: pushing again resumes it" in err, err
    kept = partial.stat().st_size
    assert 0 < kept < (big_artifact / "extra.bin").stat().st_size
    proxy.rate = None
    with open_device(dev_id) as dev:
        res = push(big_artifact, dev, PushConfig(dest=str(dest)))
    assert {f.name: f.resumed_from for f in res.files}["extra.bin"] >= kept
    assert _files(dest / big_artifact.name) == _files(big_artifact)
    proxy.close()


def test_connection_fault_lines_are_plain(sshd, home, tiny_artifact, tmp_path):
    """No "[Errno None]", no ".;", no empty "()"."""
    add_ssh_host(SSHHost(name="closed", host="127.0.0.1", port=_free_port(), user="x", connect_timeout=2))
    r = runner.invoke(app, ["push", str(tiny_artifact), "ssh:closed", "--dry-run"])
    assert r.exit_code == 8 and "connection refused" in r.output and "Errno" not in r.output, r.output
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    add_ssh_host(SSHHost(name="stranger", host=sshd["host"], port=sshd["port"], user=sshd["user"],
                         key=str(tmp_path / "other")))
    r = runner.invoke(app, ["push", str(tiny_artifact), "ssh:stranger", "--dry-run"])
    assert r.exit_code == 8 and "refused the login" in r.output and ".;" not in r.output, r.output
    dev = ssh_mod.SSHDevice(SSHHost(name="x", host="h"))
    assert str(dev._dropped(EOFError())) == ("the connection to ssh:x dropped (EOFError); run the same push again "
                                             "to resume from what arrived")


def test_paramiko_prints_nothing_of_its_own(sshd, home):
    """paramiko logs "Socket exception: Connection reset by peer (104)" through logging's last resort
    (stderr) when a board dies; edgekit says what happened in its own line. (A subprocess: pytest's own
    log capture would hide the line.)"""
    dev_id = _add(sshd)
    code = ("import logging; from edgekit.devices import open_device\n"
            f"with open_device({dev_id!r}) as dev: dev.run('true')\n"
            "logging.getLogger('paramiko.transport').error('Socket exception: Connection reset by peer (104)')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Socket exception" not in r.stderr, r.stderr


def test_silent_boards_are_probed_at_once_in_the_config_order(sshd, home):
    """Boards that accept TCP but never speak SSH each take their whole timeout: listing waits for the
    slowest, not the sum, and keeps the order of devices.json."""
    import socket

    silent = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(4)  # the kernel completes the handshake; nobody ever answers
        silent.append(s)
    add_ssh_host(SSHHost(name="a-silent", host="127.0.0.1", port=silent[0].getsockname()[1], connect_timeout=3))
    _add(sshd, "b-loop")
    add_ssh_host(SSHHost(name="c-silent", host="127.0.0.1", port=silent[1].getsockname()[1], connect_timeout=3))
    start = time.monotonic()
    r = runner.invoke(app, ["devices", "--json", "-p", "ssh"])
    took = time.monotonic() - start
    for s in silent:
        s.close()
    assert r.exit_code == 0, r.output
    devs = json.loads(r.output)["devices"]
    assert [(d["id"], d["state"]) for d in devs] == [("ssh:a-silent", "unreachable"), ("ssh:b-loop", "ready"),
                                                     ("ssh:c-silent", "unreachable")]
    assert "did not answer as an SSH server within 3 s" in devs[0]["detail"], devs[0]["detail"]
    assert took < 5.5, took  # one after another: over 6 s


@contextlib.contextmanager
def _frozen(sshd, after: float = 0.0):
    """The board freezes ``after`` seconds in (its sshd sessions and their commands stopped, the TCP link
    still open); yields the list holding when it froze. Everything resumes at the end, or after 20 s."""
    board = _Freezer(sshd)
    timer = threading.Timer(after, board.freeze)
    timer.start()
    try:
        yield board.at
    finally:
        timer.cancel()
        board.close()


def test_a_board_that_freezes_mid_command_is_given_up(sshd, home, monkeypatch):
    """QA: a command (sha256 verification, mv, df, any run) waited on a frozen board until TCP gave up
    (~15 min). A command that is only quiet is not given up: its sshd answers the keepalive probes while
    sha256sum of a large file prints nothing for minutes."""
    monkeypatch.setattr(ssh_mod, "EXEC_STALL_S", 1.0)
    dev_id = _add(sshd)
    with open_device(dev_id) as dev:
        start = time.monotonic()
        assert dev.run("sleep 3; echo done", timeout=None).stdout == "done\n"  # quiet for 3 stalls
        assert time.monotonic() - start >= 3
        with _frozen(sshd, after=0.5) as at, pytest.raises(DeviceDisconnected) as e:
            dev.run("sleep 30; echo late", timeout=None)
        waited = time.monotonic() - at[0]
    assert str(e.value) == (f"lost {dev_id} (no answer for 1 s: it froze or left the network); run the same push "
                            "again to resume from what arrived")
    assert waited < 5, waited
    with open_device(dev_id) as dev:  # the board is back: a new link works
        assert dev.run("echo back").stdout == "back\n"


def test_a_board_that_freezes_while_it_verifies_is_given_up_and_the_push_resumes(sshd, home, big_artifact,
                                                                                   tmp_path, monkeypatch):
    """The sha256 on the board ran without any limit: a board frozen then kept the push waiting for good.
    Now it is one line and exit 8 within seconds, and pushing again finishes from the complete partial."""
    monkeypatch.setattr(ssh_mod, "EXEC_STALL_S", 1.0)
    dev_id = _add(sshd)
    dest = tmp_path / "board"
    hashing = ssh_mod.SSHDevice.sha256
    froze: list = []

    def freeze_then_hash(self, path: str) -> str:
        if path.endswith(".partial") and not froze:
            froze.append(stack.enter_context(_frozen(sshd)))
            while not froze[0]:
                time.sleep(0.01)
        return hashing(self, path)

    monkeypatch.setattr(ssh_mod.SSHDevice, "sha256", freeze_then_hash)
    with contextlib.ExitStack() as stack:
        r = runner.invoke(app, ["push", str(big_artifact), dev_id, "--dest", str(dest)])
        waited = time.monotonic() - froze[0][0]
    assert waited < 5, waited
    assert r.exit_code == 8 and r.output.startswith("error:") and len(r.output.strip().splitlines()) == 1, r.output
    assert f"lost {dev_id} (no answer for 1 s" in r.output and "Traceback" not in r.output, r.output
    with open_device(dev_id) as dev:
        res = push(big_artifact, dev, PushConfig(dest=str(dest)))
    first = res.files[0]
    assert first.resumed_from == first.size, res.files  # it had all arrived: nothing sent again
    assert _files(dest / big_artifact.name) == _files(big_artifact)
    assert not [p for p in (dest / big_artifact.name).iterdir() if p.name.startswith(".")]  # no partial, no lock
