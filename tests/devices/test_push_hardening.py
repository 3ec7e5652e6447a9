"""Push against hostile artifacts and device answers: no symbolic links followed out of an artifact,
no changed files sent, no folder left on a device that refused the push."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app
from edgekit.devices import PushConfig, open_device, push
from edgekit.devices.base import InsufficientMemoryError, VerificationError
from edgekit.devices.host import HostDevice
from edgekit.errors import CorruptFileError, InputError
from tests.devices.test_ssh import _add

runner = CliRunner()


@pytest.fixture
def art(tiny_artifact, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_artifact, tmp_path / "tiny-q8"))


def test_symlink_in_an_artifact_is_refused(home, art, tmp_path):
    (art / "notes.txt").symlink_to("/etc/shadow")
    with open_device("host") as dev, pytest.raises(InputError, match="is a symbolic link"):
        push(art, dev, PushConfig(dest=str(tmp_path / "board")))
    r = runner.invoke(app, ["push", str(art), "host", "--dest", str(tmp_path / "board")])
    assert r.exit_code == 2 and r.output.startswith("error:") and "remove the link" in r.output, r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "board").exists()


def test_a_changed_file_is_not_pushed(home, art, tmp_path):
    data = bytearray((art / "model.gguf").read_bytes())
    data[-10] ^= 1
    (art / "model.gguf").write_bytes(bytes(data))
    r = runner.invoke(app, ["push", str(art), "host", "--dest", str(tmp_path / "board")])
    assert r.exit_code == 3 and "model.gguf changed since it was converted" in r.output, r.output
    from edgekit.artifact import Artifact

    opened = Artifact.open(art, verify=False)  # an Artifact handed to push is checked too
    with open_device("host") as dev, pytest.raises(CorruptFileError, match="changed since"):
        push(opened, dev, PushConfig(dest=str(tmp_path / "board")))
    assert not (tmp_path / "board").exists()


def test_ram_refusal_leaves_no_folder(home, art, tmp_path):
    (tmp_path / "board").mkdir()
    with open_device("host") as dev, pytest.raises(InsufficientMemoryError, match="--no-ram-check"):
        push(art, dev, PushConfig(dest=str(tmp_path / "board" / "models" / "new"), ctx=1 << 30))
    assert list((tmp_path / "board").iterdir()) == []  # the three folders it had made are gone


def test_ssh_ram_refusal_leaves_no_folder(sshd, home, tiny_artifact, tmp_path):
    with open_device(_add(sshd)) as dev, pytest.raises(InsufficientMemoryError):
        push(tiny_artifact, dev, PushConfig(dest=str(tmp_path / "b"), ctx=1 << 30))
    assert not (tmp_path / "b").exists()


def test_phone_storage_refusal_leaves_no_folder(phone, tiny_artifact):
    standin, dev_id = phone
    standin.set_capacity(512 << 10)
    r = runner.invoke(app, ["push", str(tiny_artifact), dev_id])
    assert r.exit_code == 4 and "free space on the device" in r.output, r.output
    assert not standin.host_path("/data/local/tmp/edgekit").exists()
    assert standin.host_path("/data/local/tmp").exists()


def test_a_folder_the_device_already_had_is_kept(home, art, tmp_path):
    (tmp_path / "board" / "tiny-q8").mkdir(parents=True)
    (tmp_path / "board" / "tiny-q8" / "theirs.txt").write_text("x")
    with open_device("host") as dev, pytest.raises(InsufficientMemoryError):
        push(art, dev, PushConfig(dest=str(tmp_path / "board"), ctx=1 << 30))
    assert (tmp_path / "board" / "tiny-q8" / "theirs.txt").read_text() == "x"


class _Liar(HostDevice):
    def resolve(self, path: str) -> str:
        return "../../etc"


def test_device_answer_outside_a_folder_is_refused(home, art):
    with pytest.raises(VerificationError, match="not an absolute folder"):
        push(art, _Liar(), PushConfig(dest="~/models"))


def test_a_push_cancelled_before_any_byte_leaves_the_device_as_it_was(home, art, tmp_path):
    import threading

    from edgekit.devices.base import PushCancelled

    cancel = threading.Event()
    cancel.set()
    (tmp_path / "board").mkdir()
    with open_device("host") as dev, pytest.raises(PushCancelled, match="before any byte was sent"):
        push(art, dev, PushConfig(dest=str(tmp_path / "board" / "models" / "new")), cancel=cancel)
    assert list((tmp_path / "board").iterdir()) == []  # no folders, no empty partial file

    cancel.clear()
    seen = []

    def stop_midway(desc: str, done: int, total: int) -> None:
        seen.append(done)
        if done:
            cancel.set()  # the first block is on the device: the partial file stays to be resumed

    dest = tmp_path / "board" / "models"
    with open_device("host") as dev, pytest.raises(PushCancelled, match="next push resumes it"):
        push(art, dev, PushConfig(dest=str(dest)), progress=stop_midway, cancel=cancel)
    assert any(p.name.endswith(".partial") or "partial" in p.name for p in dest.rglob("*")), list(dest.rglob("*"))


def test_a_device_that_fills_up_says_so_and_the_next_push_resumes(home, art, tmp_path, monkeypatch):
    """ENOSPC mid-transfer (QA s47 M5): the disk-full exit code and a line that says where, what to free and
    that pushing again resumes, not "No space left on device ()" with exit 1."""
    import errno
    import os

    def fill_up(self, local, remote, offset, on_bytes, cancel):
        with open(local, "rb") as src, open(remote, "ab") as dst:
            src.seek(offset)
            half = src.read(max(1, (local.stat().st_size - offset) // 2))
            dst.write(half)
            on_bytes(len(half))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    dest = tmp_path / "board"
    with monkeypatch.context() as mp:
        mp.setattr(HostDevice, "append_from", fill_up)
        r = runner.invoke(app, ["push", str(art), "host", "--dest", str(dest)])
    assert r.exit_code == 4, r.output
    assert r.output.startswith("error:") and len(r.output.strip().splitlines()) == 1, r.output
    assert "Traceback" not in r.output and "()" not in r.output
    text = " ".join(r.output.split())
    assert f"host's storage filled up at {dest / art.name}" in text, text
    assert "push again: it resumes from the partial file" in text and "MB there" in text, text
    with open_device("host") as dev:
        result = push(art, dev, PushConfig(dest=str(dest)))
    assert any(fp.resumed_from for fp in result.files), result.files
    assert (dest / art.name / "edgekit.json").exists()


def test_a_phone_that_fills_up_mid_push_says_so(phone, tiny_artifact):
    """adb's sync reply "No space left on device" (the storage check switched off, so the bytes go)."""
    from edgekit.errors import DiskFullError

    standin, dev_id = phone
    standin.set_capacity(512 << 10)
    with open_device(dev_id) as dev, pytest.raises(DiskFullError, match="storage filled up at .*push again"):
        push(tiny_artifact, dev, PushConfig(check_storage=False, check_ram=False))


def test_ctrl_c_mid_push_says_the_partial_file_resumes(home, art, tmp_path):
    def interrupt_midway(desc: str, done: int, total: int) -> None:
        if done:
            raise KeyboardInterrupt

    with open_device("host") as dev, pytest.raises(KeyboardInterrupt) as stopped:
        push(art, dev, PushConfig(dest=str(tmp_path / "board")), progress=interrupt_midway)
    assert stopped.value.__notes__ == ["the partial file stays on the device: pushing again resumes it"]
    with open_device("host") as dev:  # and it does
        result = push(art, dev, PushConfig(dest=str(tmp_path / "board")))
    assert any(f.resumed_from for f in result.files)


def test_a_folder_without_a_manifest_goes_under_the_folders_name(home, tiny_artifact, tmp_path):
    """QA: `push t4g/` (a folder holding just model.gguf) landed in .../model, the file's stem; it goes
    where the user named it, and the dry run says so. A model file given alone keeps its stem."""
    import json

    bare = tmp_path / "t4g"
    bare.mkdir()
    shutil.copy(tiny_artifact / "model.gguf", bare / "model.gguf")
    dest = tmp_path / "board"
    r = runner.invoke(app, ["push", f"{bare}/", "host", "--dest", str(dest), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "wouldsend" in "".join(r.output.split()) and f"host:{dest}/t4g" in "".join(r.output.split()), r.output
    r = runner.invoke(app, ["push", str(bare), "host", "--dest", str(dest), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["remote_dir"] == str(dest / "t4g"), r.output
    assert sorted(p.name for p in (dest / "t4g").iterdir()) == ["edgekit.json", "model.gguf"]
    assert not (dest / "model").exists()
    r = runner.invoke(app, ["push", str(bare / "model.gguf"), "host", "--dest", str(dest), "--dry-run", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["remote_dir"] == str(dest / "model"), r.output


def test_a_dry_run_says_the_manifest_of_a_bare_model_is_made_by_the_push(home, tiny_artifact, tmp_path):
    """QA: `push --dry-run` of a folder without edgekit.json listed an edgekit.json that is not there; the push
    writes one on the device, so the dry run says it will be made."""
    bare = tmp_path / "t4g"
    bare.mkdir()
    shutil.copy(tiny_artifact / "model.gguf", bare / "model.gguf")
    r = runner.invoke(app, ["push", str(bare), "host", "--dest", str(tmp_path / "board"), "--dry-run"])
    assert r.exit_code == 0, r.output
    lines = {ln.split()[0]: ln for ln in r.output.splitlines() if ln.startswith("  ")}
    assert "made by the push" in lines["edgekit.json"] and lines["model.gguf"].rstrip().endswith("new")
    r = runner.invoke(app, ["push", str(tiny_artifact), "host", "--dest", str(tmp_path / "board"), "--dry-run"])
    assert "made by the push" not in r.output  # an artifact's own manifest exists
