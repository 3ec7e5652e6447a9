"""One push at a time into a folder of a device (QA): a second push refuses at once with who holds the lock,
a killed push's lock is taken over, and another machine's lock holds until it is left untouched too long."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app
from edgekit.devices import PushConfig, PushInProgress, open_device, push
from edgekit.devices.pushlock import LOCK_NAME, LOCK_STALE_S
from edgekit.devices.transfer import partial_name
from edgekit.hashing import sha256_file
from tests.devices.adbd_standin import SHELL_UID
from tests.devices.netfault import CuttingProxy
from tests.devices.test_ssh import _add, _files

runner = CliRunner()
MAIN = "import runpy, sys; sys.argv[0] = 'edgekit'; runpy.run_module('edgekit.cli.main', run_name='__main__')"


def _one_error_line(r, code: int = 8) -> str:
    assert r.exit_code == code, r.output
    assert r.output.startswith("error:") and len(r.output.strip().splitlines()) == 1, r.output
    assert "Traceback" not in r.output
    return " ".join(r.output.split())


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_second_push_to_the_same_place_refuses_at_once_and_a_killed_ones_lock_is_taken_over(
        sshd, home, big_artifact, tmp_path):
    """Both pushes wrote the same partial file and failed with "arrived with size None instead of ...". The
    second now refuses before anything (a dry run too), naming the push that works there; once that one is
    killed (kill -9: it removes nothing), its lock does not stand in the way and the push resumes."""
    proxy = CuttingProxy((sshd["host"], sshd["port"]), rate=1 << 20)  # a slow link: the first push takes seconds
    dev_id = _add(sshd, "slow", port=proxy.port)
    dest = tmp_path / "board"
    remote = dest / big_artifact.name
    partial = Path(partial_name(str(remote / "extra.bin"), sha256_file(big_artifact / "extra.bin")))
    first = subprocess.Popen([sys.executable, "-c", MAIN, "push", str(big_artifact), dev_id, "--dest", str(dest)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size > 0):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.02)
        for extra in ([], ["--dry-run"]):
            text = _one_error_line(runner.invoke(app, ["push", str(big_artifact), dev_id, "--dest", str(dest),
                                                       *extra]))
            assert (f"another push to {dev_id}:{remote} is in progress (pid {first.pid} on {socket.gethostname()})"
                    in text), text
            assert f"wait for it to finish, or stop it (kill {first.pid})" in text, text
        assert first.poll() is None, "the refused push disturbed the one at work"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert (remote / LOCK_NAME).exists() and partial.exists()  # what a killed push leaves
    proxy.rate = None
    with open_device(dev_id) as dev:
        res = push(big_artifact, dev, PushConfig(dest=str(dest)))
    assert {f.name: f.resumed_from for f in res.files}["extra.bin"] > 0
    assert _files(remote) == _files(big_artifact) and _hidden(remote) == []  # the lock went with the push
    proxy.close()


def _foreign_lock(path: Path, age: float) -> None:
    owner = {"pid": 4242, "host": "other-laptop", "where": "other-laptop|boot|1", "started": 1.0, "token": "t"}
    path.write_text(json.dumps(owner) + "\n")
    when = time.time() - age
    os.utime(path, (when, when))


@pytest.mark.parametrize("where", ["ssh", "android"])
def test_a_lock_of_another_machine_holds_until_left_untouched(where, request, tiny_artifact, tmp_path):
    """A push from another machine cannot be looked at: its lock holds (the refusal says how to remove it)
    until it was left untouched for LOCK_STALE_S, then it is taken over."""
    if where == "ssh":
        request.getfixturevalue("home")
        dev_id = _add(request.getfixturevalue("sshd"))
        dest, remote = str(tmp_path / "board"), tmp_path / "board" / tiny_artifact.name
        remote.mkdir(parents=True)
    else:
        standin, dev_id = request.getfixturevalue("phone")
        dest, remote = "/data/local/tmp/edgekit", standin.host_path(f"/data/local/tmp/edgekit/{tiny_artifact.name}")
        remote.mkdir(parents=True)
        for d in (remote, remote.parent):  # made by the phone's shell user, as an earlier push would
            os.chown(d, SHELL_UID, SHELL_UID)
    lock = remote / LOCK_NAME
    _foreign_lock(lock, age=90)
    remote_lock = f"{dest}/{tiny_artifact.name}/{LOCK_NAME}"
    for extra in ([], ["--dry-run"]):
        text = _one_error_line(runner.invoke(app, ["push", str(tiny_artifact), dev_id, "--dest", dest, *extra]))
        assert f"another push to {dev_id}:{dest}/{tiny_artifact.name} is in progress (pid 4242 on other-laptop, " \
               "last seen 9" in text and " s ago)" in text, text
        assert f"if it is no longer running remove {remote_lock} on {dev_id}" in text, text
    assert sorted(p.name for p in remote.iterdir()) == [LOCK_NAME]  # nothing sent
    _foreign_lock(lock, age=LOCK_STALE_S + 60)
    with open_device(dev_id) as dev:
        push(tiny_artifact, dev, PushConfig(dest=dest))
    assert _files(remote) == _files(tiny_artifact) and _hidden(remote) == []


def test_a_push_in_this_process_holds_its_lock(home, tiny_artifact, tmp_path):
    """The SDK's own check (the TUI pushes in a thread): a push this process still runs is not stale."""
    from edgekit.devices.host import HostDevice
    from edgekit.devices.pushlock import PushLock

    remote = tmp_path / "board" / tiny_artifact.name
    remote.mkdir(parents=True)
    dev = HostDevice()
    held = PushLock(dev, str(remote))
    held.acquire()
    try:
        with pytest.raises(PushInProgress, match=f"pid {os.getpid()} on "):
            push(tiny_artifact, dev, PushConfig(dest=str(tmp_path / "board")))
    finally:
        held.abandon()  # as when its link dropped: the lock stays, and is stale for this process now
    assert (remote / LOCK_NAME).exists()
    push(tiny_artifact, dev, PushConfig(dest=str(tmp_path / "board")))
    assert _files(remote) == _files(tiny_artifact) and _hidden(remote) == []


def test_a_folder_the_phone_does_not_let_us_write_says_so(phone, tiny_artifact):
    """The lock is the first thing written: a folder of another user says what to do, as a refused file
    would, and is left as it was."""
    standin, dev_id = phone
    theirs = standin.host_path(f"/data/local/tmp/edgekit/{tiny_artifact.name}")
    theirs.mkdir(parents=True)  # root's, 0755: the phone's shell user cannot write in it
    text = _one_error_line(runner.invoke(app, ["push", str(tiny_artifact), dev_id]))
    assert f"{dev_id} refused to create /data/local/tmp/edgekit/{tiny_artifact.name}/{LOCK_NAME}" in text, text
    assert "Permission denied" in text and "--dest" in text, text
    assert list(theirs.iterdir()) == [] and standin.received == 0
