"""SSH boards against a real OpenSSH server on loopback: discovery, push, resume, verification, faults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app
from edgekit.devices import DeviceDisconnected, PushConfig, open_device, push
from edgekit.devices.base import DevicePermissionError, InsufficientMemoryError, VerificationError
from edgekit.devices.config import SSHHost, add_ssh_host
from edgekit.devices.transfer import partial_name
from edgekit.hashing import sha256_file
from tests.devices.netfault import CuttingProxy

runner = CliRunner()


def _add(sshd, name: str = "loop", port: int | None = None) -> str:
    add_ssh_host(SSHHost(name=name, host=sshd["host"], port=port or sshd["port"], user=sshd["user"], key=sshd["key"]))
    return f"ssh:{name}"


def _files(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


def test_devices_add_and_list_json(sshd, home):
    r = runner.invoke(app, ["devices", "add", "ssh:loop", "--host", sshd["host"], "--port", str(sshd["port"]),
                            "--user", sshd["user"], "--key", sshd["key"]])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["devices", "--json", "-p", "host", "-p", "ssh"])
    assert r.exit_code == 0, r.output
    devs = {d["id"]: d for d in json.loads(r.output)["devices"]}
    assert set(devs) == {"host", "ssh:loop"}
    board = devs["ssh:loop"]
    assert board["state"] == "ready" and board["os"] == "Linux" and board["arch"] == devs["host"]["arch"]
    assert board["ram_total"] == devs["host"]["ram_total"] and board["cores"] == devs["host"]["cores"]
    assert board["storage_free"] > 0 and board["storage_path"].endswith("/edgekit")


def test_unreachable_board_is_listed_not_fatal(home):
    add_ssh_host(SSHHost(name="gone", host="127.0.0.1", port=1, user="x", connect_timeout=2))
    r = runner.invoke(app, ["devices", "--json", "-p", "ssh"])
    assert r.exit_code == 0, r.output
    (dev,) = json.loads(r.output)["devices"]
    assert dev["state"] == "unreachable" and "cannot reach ssh:gone" in dev["detail"]


def test_push_cli_verifies_and_second_push_skips(sshd, home, tiny_artifact, tmp_path):
    dev = _add(sshd)
    dest = tmp_path / "board"
    r = runner.invoke(app, ["push", str(tiny_artifact), dev, "--dest", str(dest)])
    assert r.exit_code == 0, r.output
    assert "sha256 verified" in r.output
    assert _files(dest / "tiny-q8") == _files(tiny_artifact)
    r = runner.invoke(app, ["push", str(tiny_artifact), dev, "--dest", str(dest), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["bytes_sent"] == 0 and all(f["skipped"] for f in res["files"])


def test_dry_run_sends_nothing(sshd, home, tiny_artifact, tmp_path):
    dev = _add(sshd)
    r = runner.invoke(app, ["push", str(tiny_artifact), dev, "--dest", str(tmp_path / "b"), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "would send" in r.output and not (tmp_path / "b").exists()


def test_unplugged_mid_push_resumes_and_never_leaves_a_half_file(sshd, home, big_artifact, tmp_path):
    proxy = CuttingProxy((sshd["host"], sshd["port"]), cut_after=3 << 20)
    dev_id = _add(sshd, "flaky", port=proxy.port)
    dest = tmp_path / "board"
    cfg = PushConfig(dest=str(dest))
    with open_device(dev_id) as dev, pytest.raises(DeviceDisconnected, match="push again to resume"):
        push(big_artifact, dev, cfg)
    assert proxy.cuts == 1
    remote = dest / "padded"
    assert not (remote / "extra.bin").exists() and not (remote / "edgekit.json").exists()
    partial = Path(partial_name(str(remote / "extra.bin"), sha256_file(big_artifact / "extra.bin")))
    got = partial.stat().st_size
    assert 0 < got < (big_artifact / "extra.bin").stat().st_size
    proxy.cut_after = None
    with open_device(dev_id) as dev:
        res = push(big_artifact, dev, cfg)
    resumed = {f.name: f.resumed_from for f in res.files}
    assert resumed["extra.bin"] >= got  # sftp-server may still finish queued writes after the cut
    assert _files(remote) == _files(big_artifact)
    assert not list(remote.glob(".*partial"))
    proxy.close()


def test_corrupt_partial_is_caught_removed_and_repushed(sshd, home, tiny_artifact, tmp_path):
    dev_id = _add(sshd)
    remote = tmp_path / "board" / "tiny-q8"
    remote.mkdir(parents=True)
    model = tiny_artifact / "model.gguf"
    partial = Path(partial_name(str(remote / "model.gguf"), sha256_file(model)))
    partial.write_bytes(b"\0" * 1000)  # same length a resume would trust, wrong bytes
    cfg = PushConfig(dest=str(tmp_path / "board"))
    with open_device(dev_id) as dev:
        with pytest.raises(VerificationError, match="push again"):
            push(tiny_artifact, dev, cfg)
        assert not partial.exists() and not (remote / "model.gguf").exists()
        push(tiny_artifact, dev, cfg)
    assert _files(remote) == _files(tiny_artifact)


def test_permission_denied_destination(sshd, home, tiny_artifact):
    dev = _add(sshd)
    r = runner.invoke(app, ["push", str(tiny_artifact), dev, "--dest", "/sys/edgekit-test"])
    assert r.exit_code == DevicePermissionError.exit_code
    assert "refused to create /sys/edgekit-test" in r.output and "--dest" in r.output


@pytest.mark.parametrize("args", [["--name", "../escape"], ["--name", "/abs"], ["--name", "a/../../b"],
                                  ["--dest", "/tmp/../etc"], ["--dest", "relative/dir"]])
def test_unsafe_names_are_refused(sshd, home, tiny_artifact, args):
    dev = _add(sshd)
    r = runner.invoke(app, ["push", str(tiny_artifact), dev, *args])
    assert r.exit_code == 2 and "error:" in r.output


def test_refuses_when_ram_cannot_hold_the_context(sshd, home, tiny_artifact, tmp_path):
    dev_id = _add(sshd)
    with open_device(dev_id) as dev, pytest.raises(InsufficientMemoryError, match="--no-ram-check"):
        push(tiny_artifact, dev, PushConfig(dest=str(tmp_path / "b"), ctx=1 << 30))
    assert not [p for p in (tmp_path / "b").rglob("*") if p.is_file()]


def test_unknown_devices(home):
    r = runner.invoke(app, ["push", ".", "ssh:nope"])
    assert r.exit_code == 2 and "unknown SSH device 'ssh:nope'" in r.output
    r = runner.invoke(app, ["devices", "show", "bogus:1"])
    assert r.exit_code == 2 and "unknown device" in r.output


def test_a_core_ml_package_is_pushed_whole_and_verified(sshd, home, tiny_llama, tmp_path):
    """A Core ML artifact is a folder whose model is itself a folder (``model.mlpackage``: manifest, program,
    weight blob): every file of the tree lands verified, and a second push sends nothing."""
    pytest.importorskip("coremltools")
    from edgekit import api

    art = api.convert(tiny_llama, "coreml", output=tmp_path / "tiny-coreml", recipe=api.ConvertRecipe(bits=4)).path
    dev = _add(sshd)
    dest = tmp_path / "mac"
    r = runner.invoke(app, ["push", str(art), dev, "--dest", str(dest), "--json"])
    assert r.exit_code == 0, r.output
    want = {p.relative_to(art).as_posix(): sha256_file(p) for p in art.rglob("*") if p.is_file()}
    got = {p.relative_to(dest / art.name).as_posix(): sha256_file(p) for p in (dest / art.name).rglob("*") if p.is_file()}
    assert got == want and any(k.startswith("model.mlpackage/") and k.endswith("weight.bin") for k in got)
    r = runner.invoke(app, ["push", str(art), dev, "--dest", str(dest), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["bytes_sent"] == 0
