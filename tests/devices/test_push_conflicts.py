"""Push against what is already on the device (QA s48): a folder where a file of the artifact goes, a
--dest that is a file, an artifact updated in place, and another push writing the same partial file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app
from edgekit.devices import PushConfig, open_device, push
from edgekit.devices.base import DeviceError, VerificationError
from edgekit.hashing import sha256_file
from tests.devices.adbd_standin import SHELL_UID
from tests.devices.test_ssh import _add, _files

runner = CliRunner()


def _one_error_line(r, code: int = 8) -> str:
    assert r.exit_code == code, r.output
    assert r.output.startswith("error:") and len(r.output.strip().splitlines()) == 1, r.output
    assert "Traceback" not in r.output
    return " ".join(r.output.split())


def test_a_folder_where_the_model_file_goes_is_refused_over_ssh(sshd, home, tiny_artifact, tmp_path):
    """`mv -f` into a folder once put the model inside it as a hidden partial and said "sent"."""
    dev = _add(sshd)
    in_the_way = tmp_path / "board" / "tiny-q8" / "model.gguf"
    in_the_way.mkdir(parents=True)
    for extra in ([], ["--dry-run"]):
        text = _one_error_line(runner.invoke(app, ["push", str(tiny_artifact), dev, "--dest",
                                                   str(tmp_path / "board"), *extra]))
        assert f"{in_the_way} is a folder on {dev}" in text and "--name" in text, text
        assert [p for p in (tmp_path / "board").rglob("*")] == [in_the_way.parent, in_the_way]  # nothing sent


def test_a_folder_where_the_model_file_goes_is_refused_on_a_phone(phone, tiny_artifact):
    standin, dev_id = phone
    in_the_way = standin.host_path("/data/local/tmp/edgekit/t4x/model.gguf")
    in_the_way.mkdir(parents=True)
    for d in (in_the_way, in_the_way.parent, in_the_way.parent.parent):  # made by the phone's shell user
        os.chown(d, SHELL_UID, SHELL_UID)
    text = _one_error_line(runner.invoke(app, ["push", str(tiny_artifact), dev_id, "--name", "t4x"]))
    assert "/data/local/tmp/edgekit/t4x/model.gguf is a folder on android:" in text and "--name" in text, text
    assert list(in_the_way.parent.rglob("*")) == [in_the_way] and standin.received == 0


@pytest.mark.parametrize("where", ["ssh", "android"])
def test_rename_never_moves_a_file_into_a_folder(where, request, tmp_path):
    """The rename itself refuses a folder at the target (over SSH after rename(2) failed with EISDIR)."""
    if where == "ssh":
        sshd = request.getfixturevalue("sshd")
        request.getfixturevalue("home")
        dev_id, base, host_path = _add(sshd), str(tmp_path), lambda p: Path(p)
    else:
        standin, dev_id = request.getfixturevalue("phone")
        base, host_path = "/data/local/tmp", standin.host_path
    with open_device(dev_id) as dev:
        dev.makedirs(f"{base}/t/model.gguf")
        dev.run(f"echo data > {base}/t/.partial")
        with pytest.raises(DeviceError, match="model.gguf is a folder on .*remove that folder there"):
            dev.rename(f"{base}/t/.partial", f"{base}/t/model.gguf")
    assert host_path(f"{base}/t/.partial").is_file() and not list(host_path(f"{base}/t/model.gguf").iterdir())


def test_dry_run_to_a_dest_that_is_a_file_fails_like_the_push(sshd, home, tiny_artifact, tmp_path):
    dev = _add(sshd)
    (tmp_path / "afile").write_text("mine")
    lines = [_one_error_line(runner.invoke(app, ["push", str(tiny_artifact), dev, "--dest", str(tmp_path / "afile"),
                                                 *extra])) for extra in (["--dry-run"], [])]
    assert lines[0] == lines[1] and f"{tmp_path / 'afile'} is a file there, not a folder" in lines[0], lines
    assert (tmp_path / "afile").read_text() == "mine"


def test_an_interrupted_update_never_leaves_the_old_manifest_beside_new_files(sshd, home, big_artifact, tmp_path):
    """QA s48 13: files are renamed into place one by one; the old edgekit.json goes before the first, so a
    folder with edgekit.json on the device is a complete artifact, and the next push completes the update."""
    dev_id = _add(sshd)
    cfg = PushConfig(dest=str(tmp_path / "board"))
    remote = tmp_path / "board" / big_artifact.name
    with open_device(dev_id) as dev:
        push(big_artifact, dev, cfg)
    assert (remote / "edgekit.json").is_file()
    (big_artifact / "extra.bin").write_bytes(os.urandom(1 << 20))   # the update: a changed file,
    (big_artifact / "extra2.bin").write_bytes(os.urandom(1 << 20))  # and a new one sent after it

    def stop_in_the_second_file(desc: str, done: int, total: int) -> None:
        if desc.startswith("extra2.bin") and done:
            raise KeyboardInterrupt

    with open_device(dev_id) as dev, pytest.raises(KeyboardInterrupt):
        push(big_artifact, dev, cfg, progress=stop_in_the_second_file)
    assert sha256_file(remote / "extra.bin") == sha256_file(big_artifact / "extra.bin")  # replaced already
    assert not (remote / "edgekit.json").exists()
    with open_device(dev_id) as dev:
        res = push(big_artifact, dev, cfg)
    assert {f.name for f in res.files if not f.skipped} == {"extra2.bin", "edgekit.json"}
    assert _files(remote) == _files(big_artifact)


def test_a_partial_file_another_push_took_away_is_explained(sshd, home, tiny_artifact, tmp_path):
    """Two pushes to the same folder share the partial file; the one that finds it gone says so, not
    "arrived with size None"."""
    dev_id = _add(sshd)
    remote = tmp_path / "board" / tiny_artifact.name

    def the_other_push(desc: str, done: int, total: int) -> None:
        for p in remote.glob(".*.partial"):
            p.unlink()

    with open_device(dev_id) as dev, pytest.raises(VerificationError) as e:
        push(tiny_artifact, dev, PushConfig(dest=str(tmp_path / "board")), progress=the_other_push)
    text = str(e.value)
    assert "vanished" in text and "another push to the same folder" in text and "None" not in text, text
    with open_device(dev_id) as dev:
        push(tiny_artifact, dev, PushConfig(dest=str(tmp_path / "board")))
    assert _files(remote) == _files(tiny_artifact)
