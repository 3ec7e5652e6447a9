"""fsutil's write errors and edgekit's home: every writer's full disk is the one disk-full line (safetensors'
SafetensorError, shutil.Error's list), messages name the real output and what to do, and a home that cannot
be written never stops a command that only reads."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import typer

from edgekit.errors import DiskFullError, InputError
from edgekit.fsutil import (
    atomic_dir,
    atomic_file,
    check_free_space,
    check_not_inside,
    edgekit_home,
    is_edgekit_output,
)

pytestmark = pytest.mark.usefixtures("private_home")

ENOSPC_TEXT = "Error while serializing: I/O error: No space left on device (os error 28)"


def _safetensors_full() -> Exception:
    from safetensors import SafetensorError

    return SafetensorError(ENOSPC_TEXT)  # what its Rust writer raises on a full disk: no OSError, no errno


def _copytree_full(tmp_path: Path) -> shutil.Error:
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    return shutil.Error([(str(src), str(dst), f"[Errno 28] No space left on device: '{src}' -> '{dst}'")])


@pytest.mark.parametrize("make", [lambda tmp: _safetensors_full(), _copytree_full])
def test_a_full_disk_without_an_errno_is_the_disk_full_error_of_atomic_dir(tmp_path, make):
    with pytest.raises(DiskFullError) as caught, atomic_dir(tmp_path / "out"):
        raise make(tmp_path)
    assert str(caught.value).startswith(f"the disk filled up while writing {tmp_path / 'out'}; nothing was kept")
    assert "[(" not in str(caught.value) and "partial" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_a_safetensors_full_disk_is_the_disk_full_error_of_atomic_file(tmp_path):
    with pytest.raises(DiskFullError, match="disk filled up while writing"), atomic_file(tmp_path / "x.safetensors"):
        raise _safetensors_full()
    assert list(tmp_path.iterdir()) == []


def test_a_file_inside_an_output_names_the_output_not_its_temporary_folder(tmp_path):
    """The manifest is written with atomic_file inside atomic_dir's ``.out.partial-PID-*`` folder."""
    with pytest.raises(DiskFullError) as caught, atomic_dir(tmp_path / "out") as tmp:
        with atomic_file(tmp / "edgekit.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
    msg = str(caught.value)
    assert f"while writing {tmp_path / 'out'};" in msg and ".partial-" not in msg
    assert "choose another output folder with -o" in msg
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make", [lambda tmp: _safetensors_full(), _copytree_full])
def test_the_cli_says_a_full_disk_in_one_line_whatever_raised_it(capsys, tmp_path, make):
    from edgekit.cli.ui import handle_errors

    @handle_errors
    def job() -> None:
        raise make(tmp_path)

    with pytest.raises(typer.Exit) as stopped:
        job()
    text = capsys.readouterr().err
    assert stopped.value.exit_code == 4, text
    assert "the disk filled up" in text and "internal error" not in text and "[(" not in text


def test_free_space_refusal_names_the_headroom_apart(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: type(usage)(usage.total, usage.used, 1_000_000))
    with pytest.raises(DiskFullError) as caught:
        check_free_space(tmp_path / "out", 900_000, "the GGUF file", headroom=64 << 20)
    assert "needs 1 MB plus 67 MB headroom" in str(caught.value)


def test_an_output_that_is_the_input_folder_says_so(tmp_path):
    (tmp_path / "tiny").mkdir()
    with pytest.raises(InputError) as caught:
        check_not_inside(tmp_path / "tiny", tmp_path / "tiny")
    assert str(caught.value) == (f"-o {tmp_path / 'tiny'} is the input folder itself: writing there would replace "
                                 "it; choose another -o")


@pytest.mark.parametrize("manifest", ['{"schema": 1, "form', "", "[1, 2]"])
def test_an_artifact_with_a_damaged_manifest_is_still_edgekits_to_replace(tmp_path, manifest):
    art = tmp_path / "art"
    art.mkdir()
    (art / "edgekit.json").write_text(manifest)
    (art / "model.gguf").write_bytes(b"GGUF")
    assert is_edgekit_output(art)
    with atomic_dir(art, force=True) as tmp:
        (tmp / "edgekit.json").write_text("{}")
    assert sorted(p.name for p in art.iterdir()) == ["edgekit.json"]


def test_a_symlinked_manifest_is_not_a_marker(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (tmp_path / "m.json").write_text("{}")
    (theirs / "edgekit.json").symlink_to(tmp_path / "m.json")
    assert not is_edgekit_output(theirs)


def test_home_expands_a_tilde_and_refuses_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("EDGEKIT_HOME", "~/ekhome")
    assert edgekit_home() == tmp_path / "ekhome"
    monkeypatch.setenv("EDGEKIT_HOME", "ekhome")
    with pytest.raises(InputError, match="EDGEKIT_HOME is 'ekhome', a relative path; set it to an absolute one"):
        edgekit_home()
    monkeypatch.setenv("EDGEKIT_HOME", "")
    assert edgekit_home() == tmp_path / ".cache" / "edgekit"


def _read_only(monkeypatch):
    def refuse(self, *a, **kw):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)


def test_home_is_made_where_it_can_be_and_a_writer_that_needs_it_is_told_why(private_home, monkeypatch):
    assert edgekit_home(create=False) == private_home and not private_home.exists()
    _read_only(monkeypatch)
    assert edgekit_home() == private_home and not private_home.exists()  # a reader goes on without it
    with pytest.raises(InputError) as caught:
        edgekit_home(create=True)
    assert str(caught.value) == (f"cannot write {private_home}: Read-only file system; make it writable or set "
                                 "EDGEKIT_HOME to another folder")


def test_ls_works_where_the_home_cannot_be_made(private_home, monkeypatch):
    from typer.testing import CliRunner

    from edgekit.cli.main import app

    monkeypatch.delenv("EDGEKIT_MODELS", raising=False)
    _read_only(monkeypatch)
    r = CliRunner().invoke(app, ["ls"])
    assert r.exit_code == 0, r.output
    assert "Read-only" not in r.output and not private_home.exists()


def test_a_cache_write_in_the_home_says_how_to_move_the_home(private_home):
    with pytest.raises(DiskFullError) as caught, atomic_file(edgekit_home(create=True) / "host.json"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(caught.value).endswith("Free some space or set EDGEKIT_HOME to another folder")


def test_the_sha256_cache_keeps_only_its_newest_entries(tmp_path, monkeypatch):
    """Files hashed in folders long deleted (a temporary conversion's) no longer pile up for ever: the whole
    cache is read and rewritten for each file hashed, and 24k entries had made it 4 MB."""
    import json

    from edgekit import fsutil, hashing

    monkeypatch.setattr(hashing, "SHA_CACHE_ENTRIES", 8)
    files = []
    for i in range(12):
        f = tmp_path / f"f{i}.bin"
        f.write_bytes(bytes([i]) * 10)
        files.append(f)
        hashing.remember_sha256(f, f"{i:064x}")
    cache = json.loads((fsutil.edgekit_home() / "sha256-cache.json").read_text())
    assert len(cache) == 8
    assert [k.rsplit("|", 2)[0] for k in cache] == [str(f.resolve()) for f in files[-8:]]
    assert hashing.sha256_file_cached(files[-1]) == f"{11:064x}"  # remembered, not rehashed
    assert hashing.sha256_file_cached(files[0]) == hashing.sha256_file(files[0])  # forgotten: hashed again
