"""Files and outputs against users and attackers: manifests confined to their folder and checked on
open, checksums verified before use, --force that only replaces artifacts, concurrent and killed
writers, a really full disk and a really read-only one."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edgekit.artifact import MANIFEST_NAME, SCHEMA, Artifact, write_manifest
from edgekit.errors import CorruptFileError, OutputExistsError
from edgekit.fsutil import atomic_dir, atomic_file
from tests.edgekit.test_bad_input import assert_clean_error, no_leftovers, run_cli

# a private EDGEKIT_HOME, so the sha256 cache these tests count starts empty and is theirs
pytestmark = pytest.mark.usefixtures("private_home")


@pytest.fixture(scope="module")
def tiny_art(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("arts") / "tiny-q8"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEKIT_HOME", str(tmp_path_factory.mktemp("home")))
        code, text = run_cli("convert", tiny_llama, "--type", "Q8_0", "-o", out)
    assert code == 0, text
    return out


def _copy(art: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(art, dst)
    return dst


def _manifest_dir(tmp_path: Path, manifest) -> Path:
    d = tmp_path / "art"
    d.mkdir()
    (d / "model.gguf").write_bytes(b"GGUF")
    (d / MANIFEST_NAME).write_text(json.dumps(manifest))
    return d


# -- manifests are data: confined and shape-checked ----------------------------------------------

GOOD = {"schema": SCHEMA, "format": "gguf", "files": {"model": "model.gguf"}}


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "sub/../../x.gguf", "..", ".", ""])
def test_manifest_names_outside_the_folder_are_refused(tmp_path, name):
    d = _manifest_dir(tmp_path, {**GOOD, "files": {"model": name}})
    with pytest.raises(CorruptFileError, match="not a file inside"):
        Artifact.open(d)
    assert_clean_error(*run_cli("inspect", d), "not a file inside", "edgekit convert")


def test_manifest_data_file_outside_is_refused(tmp_path):
    d = _manifest_dir(tmp_path, {**GOOD, "files": {"model": "model.gguf", "data": "../../etc/shadow"}})
    with pytest.raises(CorruptFileError, match="not a file inside"):
        Artifact.open(d)


def test_symlink_leading_out_is_refused(tmp_path):
    d = _manifest_dir(tmp_path, GOOD)
    (d / "model.gguf").unlink()
    (d / "model.gguf").symlink_to("/etc/passwd")
    assert_clean_error(*run_cli("inspect", d), "link leading out of")
    (d / "model.gguf").unlink()
    (d / "real.gguf").write_bytes(b"GGUF")
    (d / "model.gguf").symlink_to("real.gguf")  # a link inside its own folder is harmless
    assert Artifact.open(d).model_file == d / "model.gguf"


@pytest.mark.parametrize("manifest, match", [
    ([1, 2], "a JSON object"),
    ("edgekit", "a JSON object"),
    ({"schema": SCHEMA, "format": "gguf"}, "lists no model file"),
    ({**GOOD, "files": ["model.gguf"]}, "lists no model file"),
    ({**GOOD, "files": {"model": 7}}, "lists no model file"),
    ({**GOOD, "files": {"model": "model.gguf", "data": None}}, "must be a file name"),
    ({"schema": SCHEMA, "files": {"model": "model.gguf"}}, "names no format"),
    ({**GOOD, "format": ["gguf"]}, "names no format"),
    ({**GOOD, "schema": 1}, "not an edgekit manifest"),
    ({**GOOD, "schema": "edgekit.artifact/x"}, "unknown schema"),
    ({**GOOD, "sha256": {"model.gguf": 5}}, "hex digests"),
    ({**GOOD, "sha256": ["x"]}, "hex digests"),
])
def test_manifest_shape_is_checked_on_open(tmp_path, manifest, match):
    d = _manifest_dir(tmp_path, manifest)
    with pytest.raises(CorruptFileError, match=match):
        Artifact.open(d)
    for cmd in (("inspect", d), ("run", d, "-p", "hi")):
        assert_clean_error(*run_cli(*cmd), match, "re-run 'edgekit convert'")


# -- checksums -------------------------------------------------------------------------------------

def _count_hashes(monkeypatch) -> list[str]:
    import edgekit.hashing as hashing

    seen: list[str] = []
    real = hashing.sha256_file

    def counting(path, *a, **kw):
        seen.append(str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(hashing, "sha256_file", counting)
    return seen


def test_convert_records_checksums_and_a_changed_file_is_caught(tiny_art, tmp_path, monkeypatch):
    art = _copy(tiny_art, tmp_path / "a")
    m = json.loads((art / MANIFEST_NAME).read_text())
    assert set(m["sha256"]) == {"model.gguf"} and len(m["sha256"]["model.gguf"]) == 64
    hashed = _count_hashes(monkeypatch)
    Artifact.open(art).verify()
    Artifact.open(art, verify=True)
    assert hashed == [str(art / "model.gguf")]  # hashed once (a new path), then remembered by size and mtime
    data = bytearray((art / "model.gguf").read_bytes())
    data[-100] ^= 0xFF  # tensor data, not the header: the file still parses and would run
    (art / "model.gguf").write_bytes(bytes(data))
    (tmp_path / "t.txt").write_text("some text to measure " * 50)
    for cmd in (("run", art, "-p", "hi"), ("eval", art, "--text", tmp_path / "t.txt"),
                ("eval", tiny_art, "--text", tmp_path / "t.txt", "--ref", art)):
        assert_clean_error(*run_cli(*cmd), "model.gguf changed since it was converted", "re-run 'edgekit convert'")
    assert hashed.count(str(art / "model.gguf")) == 2  # the changed file once; the mismatch is remembered too
    assert Artifact.open(art).format == "gguf"  # describing it (inspect, the catalog) still works
    with pytest.raises(CorruptFileError, match="changed since"):
        Artifact.open(art, verify=True)


def test_fresh_convert_needs_no_rehash(tiny_llama, tmp_path, monkeypatch):
    code, text = run_cli("convert", tiny_llama, "--type", "Q8_0", "-o", tmp_path / "a")
    assert code == 0, text
    hashed = _count_hashes(monkeypatch)
    Artifact.open(tmp_path / "a").verify()
    assert hashed == []


def test_older_manifest_without_checksums_still_opens(tiny_art, tmp_path):
    art = _copy(tiny_art, tmp_path / "a")
    m = json.loads((art / MANIFEST_NAME).read_text())
    del m["sha256"]
    write_manifest(art, m)
    assert Artifact.open(art).format == "gguf"


def test_missing_checksummed_file_is_named(tiny_art, tmp_path):
    art = _copy(tiny_art, tmp_path / "a")
    m = json.loads((art / MANIFEST_NAME).read_text())
    m["sha256"]["tokenizer.json"] = "0" * 64
    write_manifest(art, m)
    assert_clean_error(*run_cli("run", art, "-p", "hi"), "tokenizer.json is missing")


# -- convert --force -------------------------------------------------------------------------------

def test_force_never_replaces_a_folder_that_is_not_an_artifact(tiny_llama, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / MANIFEST_NAME).write_text('["not", "a", "manifest"]')
    for extra in ((), ("--force",)):
        assert_clean_error(*run_cli("convert", tiny_llama, "-o", mine, *extra), "is not an edgekit artifact",
                           "choose another -o")
    assert (mine / "thesis.tex").read_text() == "years of work"
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    assert_clean_error(*run_cli("convert", tiny_llama, "-o", afile, "--force"), "is not an edgekit artifact")
    assert afile.read_text() == "x"
    no_leftovers(tmp_path)


def test_force_replaces_an_artifact_and_says_so(tiny_art, tiny_llama, tmp_path):
    out = _copy(tiny_art, tmp_path / "out")
    code, text = run_cli("convert", tiny_llama, "--type", "Q4_0", "-o", out, "--force")
    assert code == 0, text
    assert f"replaced {out}" in " ".join(text.split()) and "wrote" in text
    assert json.loads((out / MANIFEST_NAME).read_text())["preset"] == "Q4_0"
    no_leftovers(tmp_path)


# -- concurrent writers ----------------------------------------------------------------------------

def _write_at_barrier(dest: str, barrier, tag: str, results) -> None:
    try:
        with atomic_dir(Path(dest)) as tmp:
            (tmp / "who").write_text(tag)
            barrier.wait(30)  # both have passed the check at the start and hold a finished folder
        results.put((tag, "ok"))
    except OutputExistsError as exc:
        results.put((tag, str(exc)))


@pytest.mark.parametrize("kernel_rename", [True, False])
def test_two_writers_of_one_output_one_fails(tmp_path, monkeypatch, kernel_rename):
    """Two processes finish the same output at the same moment: one wins, the other fails clearly and
    leaves nothing (with renameat2, and with the plain-rename fallback)."""
    import edgekit.fsutil as fsutil

    if not kernel_rename:
        monkeypatch.setattr(fsutil, "_renameat2", lambda src, dst, flags: False)
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    dest = tmp_path / "out"
    procs = [ctx.Process(target=_write_at_barrier, args=(str(dest), barrier, t, results)) for t in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    got = dict(results.get(timeout=5) for _ in procs)
    winners = [t for t, r in got.items() if r == "ok"]
    (loser,) = set(got) - set(winners)
    assert len(winners) == 1 and "written by another edgekit while this one ran" in got[loser]
    assert (dest / "who").read_text() == winners[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_two_concurrent_cli_converts(tiny_llama, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "edgekit.cli.main", "convert", str(tiny_llama), "--type", "Q8_0", "-o", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    results = [(p.wait(300), p.stdout.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    (failed,) = [text for code, text in results if code]
    assert "Traceback" not in failed and failed.startswith("error:")
    assert "already exists" in failed or "written by another edgekit" in failed
    Artifact.open(out)
    no_leftovers(tmp_path)


# -- leftovers of killed writers ---------------------------------------------------------------------

_HOLD = """
import sys, time
from pathlib import Path
from edgekit.fsutil import atomic_dir, atomic_file
parent = Path(sys.argv[1])
with atomic_dir(parent / sys.argv[2]) as t, atomic_file(parent / (sys.argv[2] + ".json")) as f:
    (t / "model.gguf").write_bytes(b"x" * 300_000)
    f.write_text("{}")
    print("ready", flush=True)
    time.sleep(120)
"""


def _holder(parent: Path, name: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(parent), name], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_sigkilled_writers_leftovers_are_swept_and_reported(tiny_llama, tmp_path):
    tmp_path = tmp_path / "outputs"
    tmp_path.mkdir()
    dead = _holder(tmp_path, "killed")
    alive = _holder(tmp_path, "running")
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait(30)
        left = sorted(p.name for p in tmp_path.iterdir())
        assert [n.split("-")[0] for n in left] == [".killed.json.partial", ".killed.partial",
                                                    ".running.json.partial", ".running.partial"]
        code, text = run_cli("convert", tiny_llama, "--type", "Q8_0", "-o", tmp_path / "other")
        assert code == 0, text
        flat = " ".join(text.split())
        assert flat.count("removed ") == 2 and "(0.3 MB), left by an edgekit that was killed" in flat
        assert f"pid {dead.pid}" in flat and "running" not in flat
        left = sorted(p.name.split("-")[0] for p in tmp_path.iterdir())
        assert left == [".running.json.partial", ".running.partial", "other"]  # a live writer's are kept
    finally:
        alive.kill()
        alive.wait(30)


def test_lock_protects_a_live_writer_whose_pid_looks_dead(tmp_path, monkeypatch):
    """A writer on another machine (shared folder) has a pid this one does not know; its lock keeps it."""
    import edgekit.fsutil as fsutil

    with atomic_dir(tmp_path / "x") as tmp:
        monkeypatch.setattr(fsutil, "_pid_alive", lambda pid: False)
        assert fsutil.sweep_stale(tmp_path) == [] and tmp.exists()
        monkeypatch.undo()


# -- a really full disk, a really read-only one ----------------------------------------------------

def _mount_tmpfs(where: Path, options: str) -> None:
    import shutil

    where.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); needs root or CAP_SYS_ADMIN")


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=512k")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.fixture
def readonly_disk(tmp_path):
    disk = tmp_path / "ro"
    _mount_tmpfs(disk, "ro,size=1m")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_disk_fills_up_mid_write(tiny_llama, small_disk, monkeypatch):
    """The free-space estimate passes (it is switched off here), then the real write runs out of room."""
    import edgekit.converters.formats.gguf.writer as writer

    monkeypatch.setattr(writer, "check_free_space", lambda *a, **kw: None)
    code, text = run_cli("convert", tiny_llama, "--type", "F32", "-o", small_disk / "out")
    assert code == 4, text
    assert_clean_error(code, text, "the disk filled up while writing", "Free some space or choose another")
    assert list(small_disk.iterdir()) == []


@pytest.mark.parametrize("message", ["940032 requested and 253440 written",
                                     "Not enough free space to write 30081024 bytes after offset 1785344"])
def test_short_write_is_a_full_disk(tmp_path, message):
    """numpy reports a full disk without an errno (a short write in tofile(), or its fallocate() check);
    it is still a full disk."""
    from edgekit.errors import DiskFullError
    from edgekit.fslimits import write_error

    err = write_error(OSError(message), tmp_path / "x")
    assert isinstance(err, DiskFullError) and "disk filled up" in str(err)


def test_free_space_check_on_a_small_disk(tiny_llama, small_disk):
    code, text = run_cli("convert", tiny_llama, "-o", small_disk / "out")
    assert code == 4
    assert_clean_error(code, text, "not enough disk space", f"{small_disk} has 1 MB free",
                       "choose another output folder with -o")
    assert list(small_disk.iterdir()) == []


@pytest.mark.parametrize("where", ["out", "sub/out"])
def test_readonly_target(tiny_llama, readonly_disk, where):
    code, text = run_cli("convert", tiny_llama, "-o", readonly_disk / where)
    assert code == 2
    assert_clean_error(code, text, "Read-only file system", "choose another output folder with -o")
    assert list(readonly_disk.iterdir()) == []


def test_atomic_file_on_a_full_disk_leaves_nothing(small_disk):
    from edgekit.errors import DiskFullError

    with pytest.raises(DiskFullError, match="disk filled up"), atomic_file(small_disk / "big.bin") as tmp:
        with open(tmp, "wb") as f:
            f.write(os.urandom(1 << 20))
    assert list(small_disk.iterdir()) == []


def test_threads_of_one_process_never_sweep_each_other(tmp_path):
    """Sweeping runs at the start of every write; a sibling thread's temporary folder (same pid) stays."""
    started, release = threading.Event(), threading.Event()

    def slow():
        with atomic_dir(tmp_path / "slow") as t:
            (t / "f").write_text("1")
            started.set()
            release.wait(30)

    th = threading.Thread(target=slow)
    th.start()
    started.wait(30)
    with atomic_dir(tmp_path / "fast") as t:
        (t / "f").write_text("2")
    release.set()
    th.join(30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast", "slow"]


def test_import_output_may_be_replaced_but_not_a_users_folder(tmp_path):
    """``import --force`` rewrites its own checkpoint (it carries edgekit_import.json), nothing else."""
    from edgekit.fsutil import is_edgekit_output

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    (ours / "edgekit_import.json").write_text('{"source": "x.gguf"}')
    (theirs / "config.json").write_text("{}")
    assert is_edgekit_output(ours) and not is_edgekit_output(theirs)
    with atomic_dir(ours, force=True) as t:
        (t / "edgekit_import.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="not an edgekit artifact"), atomic_dir(theirs, force=True):
        pass
    assert (theirs / "config.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ours", "theirs"]


def test_force_without_kernel_exchange_swaps_through_an_old_folder(tmp_path, monkeypatch):
    import edgekit.fsutil as fsutil

    monkeypatch.setattr(fsutil, "_renameat2", lambda src, dst, flags: False)
    for tag in ("first", "second"):
        notes: list[str] = []
        with atomic_dir(tmp_path / "out", force=True, notes=notes) as t:
            (t / "edgekit_import.json").write_text(json.dumps({"tag": tag}))
    assert notes == [f"replaced {tmp_path / 'out'} (an earlier edgekit output)"]
    assert json.loads((tmp_path / "out" / "edgekit_import.json").read_text()) == {"tag": "second"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_output_is_readable_as_the_umask_says_even_what_a_writer_made_private(tmp_path):
    """safetensors' writer (and mkstemp) create files 0600: an imported model.safetensors was unreadable to
    the other users of a shared machine while every other file was 0644."""
    import os
    import stat

    from edgekit.fsutil import atomic_dir

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as t:
            (t / "private.bin").write_bytes(b"x")
            (t / "private.bin").chmod(0o600)
            (t / "tool").write_bytes(b"#!/bin/sh\n")
            (t / "tool").chmod(0o700)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes == {"private.bin": 0o644, "tool": 0o755}


def test_an_output_that_holds_the_input_is_refused(tiny_llama, tmp_path):
    """`import art/model.gguf -o art --force` replaced the folder and with it the GGUF it read; convert of
    a GGUF into the artifact that holds it would do the same."""
    from typer.testing import CliRunner

    from edgekit import api
    from edgekit.cli.main import app

    art = api.convert(tiny_llama, "gguf", output=tmp_path / "art", recipe=api.ConvertRecipe(bits=8)).path
    before = (art / "model.gguf").read_bytes()
    runner = CliRunner()
    for args in (["import", str(art / "model.gguf"), "-o", str(art), "--force"],
                 ["convert", str(art / "model.gguf"), "--type", "Q4_0", "-o", str(art), "--force"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and "holds" in r.output and "the input" in r.output, r.output
        assert "Traceback" not in r.output
        assert (art / "model.gguf").read_bytes() == before
