"""Android through the real adb server, talking to the adbd stand-in: discovery, push, resume, faults."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app
from edgekit.devices import DeviceDisconnected, PushConfig, open_device, push
from edgekit.devices.transfer import partial_name
from edgekit.hashing import sha256_file
from tests.devices.conftest import reconnect

runner = CliRunner()


def _files(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


def test_discovery_reads_the_phone(phone):
    standin, dev_id = phone
    r = runner.invoke(app, ["devices", "--json", "-p", "android"])
    assert r.exit_code == 0, r.output
    (d,) = json.loads(r.output)["devices"]
    assert d["id"] == dev_id and d["state"] == "ready"
    assert (d["model"], d["abi"], d["arch"], d["soc"]) == ("edgekit Standin 7", "arm64-v8a", "aarch64", "SM8550")
    assert d["os"] == "Android" and d["os_version"] == "14 (SDK 34)"
    assert d["storage_path"] == "/data/local/tmp/edgekit"
    assert 7 << 30 < d["storage_free"] <= 8 << 30 and d["ram_total"] > 0 and d["cores"] >= 1


def test_push_to_default_dest_verifies_then_skips(phone, tiny_artifact):
    standin, dev_id = phone
    r = runner.invoke(app, ["push", str(tiny_artifact), dev_id])
    assert r.exit_code == 0, r.output
    remote = standin.host_path("/data/local/tmp/edgekit/tiny-q8")
    assert _files(remote) == _files(tiny_artifact)
    assert remote.stat().st_uid == 2000  # written by the device's shell user, as on a phone
    r = runner.invoke(app, ["push", str(tiny_artifact), dev_id, "--json"])
    res = json.loads(r.output)
    assert res["bytes_sent"] == 0 and all(f["skipped"] for f in res["files"])


def test_unplugged_mid_push_resumes_from_the_temp_file(phone, big_artifact, adb_server, monkeypatch):
    from edgekit.devices import adb

    monkeypatch.setattr(adb, "CHUNK", 1 << 20)
    standin, dev_id = phone
    standin.drop_after = (3 << 20) + 300_000  # mid-way through the fourth 1 MiB chunk of extra.bin
    with open_device(dev_id) as dev, pytest.raises(DeviceDisconnected, match="resume"):
        push(big_artifact, dev, PushConfig())
    assert standin.drops == 1
    remote = standin.host_path("/data/local/tmp/edgekit/padded")
    extra = big_artifact / "extra.bin"
    partial = Path(partial_name(str(remote / "extra.bin"), sha256_file(extra)))
    assert not (remote / "extra.bin").exists() and not (remote / "edgekit.json").exists()
    assert not list(remote.glob("*.chunk")) and not list(remote.glob(".*.chunk"))  # the broken SEND is gone
    kept = partial.stat().st_size
    assert kept > 0 and kept % (1 << 20) == 0  # whole chunks only
    reconnect(adb_server, standin)
    with open_device(dev_id) as dev:
        res = push(big_artifact, dev, PushConfig())
    assert {f.name: f.resumed_from for f in res.files}["extra.bin"] == kept
    assert res.bytes_sent == extra.stat().st_size - kept + sum(
        f.size for f in res.files if f.name != "extra.bin" and not f.skipped)
    assert _files(remote) == _files(big_artifact)
    assert not [p for p in remote.iterdir() if p.name.startswith(".")]


def test_no_space_is_refused_before_sending(phone, tiny_artifact):
    standin, dev_id = phone
    standin.set_capacity(512 << 10)
    r = runner.invoke(app, ["push", str(tiny_artifact), dev_id])
    assert r.exit_code == 4, r.output
    assert "needs 1.5 MB of storage" in r.output and "free space on the device" in r.output
    assert standin.received == 0


def test_permission_denied_destination(phone, tiny_artifact):
    standin, dev_id = phone
    r = runner.invoke(app, ["push", str(tiny_artifact), dev_id, "--dest", "/system/edgekit"])
    assert r.exit_code == 8, r.output
    assert "refused to create /system/edgekit" in r.output and "Permission denied" in r.output
    assert not standin.host_path("/system/edgekit").exists()


def test_unknown_android_device(phone):
    standin, dev_id = phone
    r = runner.invoke(app, ["push", ".", "android:R58M12345"])
    assert r.exit_code == 2
    assert "unknown Android device 'android:R58M12345'" in r.output and dev_id in r.output


@pytest.mark.parametrize("stop", [KeyboardInterrupt, lambda: SystemExit(143)], ids=["ctrl-c", "sigterm"])
def test_a_push_stopped_on_purpose_leaves_no_chunk_beside_the_partial(phone, big_artifact, monkeypatch, stop):
    """QA: Ctrl-C (or `kill`) with a chunk on the phone not yet appended left `.NAME.<sha>.partial.chunk`
    there for good unless the push was resumed. The chunk goes; the partial file stays and resumes."""
    from edgekit.devices import adb

    monkeypatch.setattr(adb, "CHUNK", 1 << 20)
    standin, dev_id = phone
    shell = adb.AndroidDevice.run
    appends: list[str] = []

    def stopped_at_the_third_append(self, command: str, timeout: float | None = 600):
        if command.startswith("cat ") and ".chunk" in command:
            appends.append(command)
            if len(appends) == 3:  # the fourth 1 MiB chunk of extra.bin is on the phone, not appended
                raise stop()
        return shell(self, command, timeout)

    monkeypatch.setattr(adb.AndroidDevice, "run", stopped_at_the_third_append)
    with open_device(dev_id) as dev, pytest.raises((KeyboardInterrupt, SystemExit)) as e:
        push(big_artifact, dev, PushConfig())
    assert e.value.__notes__ == ["the partial file stays on the device: pushing again resumes it"]
    remote = standin.host_path("/data/local/tmp/edgekit/padded")
    partial = Path(partial_name(str(remote / "extra.bin"), sha256_file(big_artifact / "extra.bin")))
    assert sorted(p.name for p in remote.iterdir()) == [partial.name]  # no chunk, no lock
    assert partial.stat().st_size == 3 << 20
    with open_device(dev_id) as dev:
        res = push(big_artifact, dev, PushConfig())
    assert {f.name: f.resumed_from for f in res.files}["extra.bin"] == 3 << 20
    assert _files(remote) == _files(big_artifact)


def test_a_long_quiet_command_runs_in_the_background_and_is_polled(phone, monkeypatch):
    """sha256sum of a model or a profile run says nothing for minutes: it runs detached on the phone and is
    polled, with its exit code, stdout and stderr as a direct command's, and nothing left behind."""
    import edgekit.devices.adb as adb

    standin, dev_id = phone
    monkeypatch.setattr(adb, "POLL_S", 0.2)
    with open_device(dev_id) as dev:
        r = dev.run("sleep 2; echo out; echo err >&2; exit 3", timeout=None)
        assert (r.rc, r.stdout, r.stderr) == (3, "out\n", "err\n")
        assert dev.run("echo '/data/local/tmp'", timeout=None).stdout == "/data/local/tmp\n"
    assert not list(standin.host_path("/data/local/tmp").glob(".edgekit-run-*"))


def test_a_frozen_phone_is_given_up_while_a_long_command_runs(phone, monkeypatch):
    """A phone that stops answering (hung, or out of reach of adb connect) kept sha256sum's wait open for good:
    now a poll that gets no answer within STALL_S ends it with the one-line 'lost' error."""
    import threading
    import time

    import edgekit.devices.adb as adb

    standin, dev_id = phone
    monkeypatch.setattr(adb, "POLL_S", 0.2)
    monkeypatch.setattr(adb, "STALL_S", 3.0)
    with open_device(dev_id) as dev:
        threading.Timer(1.0, lambda: setattr(standin, "frozen", True)).start()
        t0 = time.monotonic()
        try:
            with pytest.raises(DeviceDisconnected, match=f"lost {dev_id}"):
                dev.run("sleep 60", timeout=None)
            assert time.monotonic() - t0 < 20
            with pytest.raises(DeviceDisconnected):  # a quick command does not wait for good either
                dev.run("true")
        finally:
            standin.frozen = False


def test_ctrl_c_stops_a_long_command_on_the_phone_too(phone, monkeypatch):
    import psutil

    import edgekit.devices.adb as adb

    standin, dev_id = phone
    monkeypatch.setattr(adb, "POLL_S", 0.2)
    shell, calls = adb.AndroidDevice._shell, []

    def interrupted(self, command, timeout):  # Ctrl-C at the third poll
        calls.append(command)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return shell(self, command, timeout)

    monkeypatch.setattr(adb.AndroidDevice, "_shell", interrupted)
    with open_device(dev_id) as dev, pytest.raises(KeyboardInterrupt):
        dev.run("sleep 37; echo never", timeout=None)

    def left() -> list:
        return [p for p in psutil.process_iter(["cmdline"]) if "sleep 37" in " ".join(p.info["cmdline"] or [])
                or (p.info["cmdline"] or [])[-2:] == ["sleep", "37"]]

    deadline = time.monotonic() + 5
    while left() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left()
    assert not list(standin.host_path("/data/local/tmp").glob(".edgekit-run-*"))
