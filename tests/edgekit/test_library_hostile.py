"""The library and edgekit's home in hostile environments (QA s53): a shared library where another user's
artifacts sit, removals that fail part-way, caches holding the user's own files, environment variables set
wrong, names at the file system's limit, ``ulimit -f``. Each failure is one line that says the fix, and
nothing is lost, hidden or half-written."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekit import library
from edgekit.cli.main import app
from edgekit.errors import DiskFullError, InputError, OutputExistsError
from edgekit.fslimits import write_error
from edgekit.fsutil import atomic_dir, check_output, is_edgekit_output, sweep_stale

runner = CliRunner()
OTHER_USER = "qa53"


def cli(*args):
    return runner.invoke(app, [str(a) for a in args], terminal_width=200)


def one_line_error(r) -> str:
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


def make_artifact(folder: Path, files: dict[str, bytes] | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "edgekit.json").write_text(json.dumps({"schema": "edgekit.artifact/1", "format": "gguf"}))
    for name, data in (files or {"model.gguf": b"GGUF" * 100}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    monkeypatch.setenv("EDGEKIT_MODELS", str(path))
    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "home"))
    return path


# -- 1. rm and --force where another user's artifact sits -----------------------------------------------

def _refuse_unlink(monkeypatch, names: set[str]) -> None:
    """Deleting these files fails as it does for an artifact another user owns (root passes permissions)."""
    real = os.unlink

    def unlink(path, *args, **kwargs):
        if os.path.basename(os.fsdecode(path)) in names:
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)


def test_a_failed_rm_puts_the_artifact_back_and_nothing_is_left_to_sweep(store, monkeypatch):
    """QA s53 #1: the folder stayed renamed to .NAME.old-PID-*, gone from ls, and the owner's next convert
    deleted it for good as "left by an edgekit that was killed"."""
    art = make_artifact(store / "tiny-gguf-q4_k_m")
    with monkeypatch.context() as m:
        _refuse_unlink(m, {"edgekit.json", "model.gguf"})
        line = one_line_error(cli("rm", "tiny-gguf-q4_k_m", "-y"))
    assert line.startswith(f"error: cannot delete {art}: Permission denied") and "nothing was deleted" in line
    assert sorted(p.name for p in art.iterdir()) == ["edgekit.json", "model.gguf"]
    assert hidden(store) == [] and sweep_stale(store) == []
    assert [e.name for e in library.entries()] == ["tiny-gguf-q4_k_m"]


def test_an_rm_that_fails_part_way_keeps_the_manifest_and_says_what_went(store, monkeypatch):
    """What is left is back under its name, listed (damaged) and removable once the cause is fixed; the
    manifest goes last, so it is never a folder edgekit no longer recognises."""
    art = make_artifact(store / "tiny-gguf-q8_0", {"model.gguf": b"GGUF" * 100, "a/tokenizer.json": b"{}"})
    with monkeypatch.context() as m:
        _refuse_unlink(m, {"model.gguf"})
        line = one_line_error(cli("rm", "tiny-gguf-q8_0", "-y"))
    assert "1 of its 3 files were deleted, so it is damaged" in line and "rm it again" in line
    assert [e.name for e in library.entries()] == ["tiny-gguf-q8_0"]  # still listed, so still rm's to take
    assert sorted(p.name for p in art.iterdir()) == ["edgekit.json", "model.gguf"] and hidden(store) == []
    assert cli("rm", "tiny-gguf-q8_0", "-y").exit_code == 0 and not art.exists()


def test_rm_leaves_the_artifact_locked_while_it_deletes(store, monkeypatch):
    """While rm deletes, a sweep in another process (whose pid this one cannot see: another machine on a shared
    folder) takes nothing; the lock on the hidden folder tells it apart from a killed edgekit's."""
    import edgekit.fsutil as fsutil

    art = make_artifact(store / "a-gguf-q4_0")
    real_rmtree, seen = shutil.rmtree, []

    def sweeping_rmtree(path, *args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(fsutil, "_pid_alive", lambda pid: False)
            seen.append((hidden(store), sweep_stale(store)))
        return real_rmtree(path, *args, **kwargs)

    make_artifact(art / "sub", {"x.bin": b"x"})  # a folder inside: removed with shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", sweeping_rmtree)
    library.remove(art)
    assert len(seen[0][0]) == 1 and seen[0][1] == [] and not art.exists()


def _as_other_user() -> list[str]:
    """The command prefix that runs as another user (QA's ``setpriv``); skips where that cannot be done."""
    import pwd

    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user")
    try:
        pwd.getpwnam(OTHER_USER)
    except KeyError:
        pytest.skip(f"no user {OTHER_USER} here")
    return ["setpriv", "--reuid", OTHER_USER, "--regid", OTHER_USER, "--init-groups"]


@pytest.fixture
def shared():
    """A folder every user may write (mode 777, not sticky), outside pytest's private tmp_path."""
    path = Path(tempfile.mkdtemp(prefix="edgekit-shared-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run_as_other(prefix: list[str], shared: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGEKIT_MODELS": str(shared / "lib"), "EDGEKIT_HOME": str(shared / "home"),
           "HOME": str(shared), "NO_COLOR": "1", "COLUMNS": "300"}
    return subprocess.run([*prefix, *args], capture_output=True, text=True, env=env, timeout=120, cwd=shared)


def test_rm_of_another_users_artifact_is_refused_untouched(shared):
    prefix = _as_other_user()
    lib = shared / "lib"
    lib.mkdir()
    lib.chmod(0o777)
    art = make_artifact(lib / "tiny-gguf-q4_k_m")  # root's, 755: another user may rename it, not empty it
    res = _run_as_other(prefix, shared, str(Path(sys.executable).with_name("edgekit")), "rm", "tiny-gguf-q4_k_m", "-y")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip() == (f"error: cannot delete {art}: {art} belongs to root and is not writable for you; "
                                  "nothing was deleted: ask its owner to delete it (or to fix its permissions)")
    assert sorted(os.listdir(lib)) == ["tiny-gguf-q4_k_m"] and (art / "model.gguf").is_file()


def test_force_over_another_users_artifact_fails_before_touching_anything(shared):
    """QA s53 #1: ``convert --force`` over root's artifact printed "wrote" and left root's old one behind as a
    hidden .NAME.partial-PID-* folder, which root's next write then swept as a killed edgekit's."""
    prefix = _as_other_user()
    lib = shared / "lib"
    lib.mkdir()
    lib.chmod(0o777)
    art = make_artifact(lib / "tiny-gguf-q8_0")
    code = ("import sys; from pathlib import Path; from edgekit.fsutil import atomic_dir\n"
            "from edgekit.errors import EdgekitError\n"
            "try:\n"
            "    with atomic_dir(Path(sys.argv[1]), force=True) as tmp:\n"
            "        (tmp / 'edgekit.json').write_text('{}')\n"
            "except EdgekitError as exc:\n"
            "    sys.exit(f'error: {exc}')\n")
    res = _run_as_other(prefix, shared, sys.executable, "-c", code, str(art))
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip() == (f"error: cannot replace {art}: {art} belongs to root and is not writable for you; "
                                  "nothing was written: ask its owner to remove it (or to fix its permissions), or "
                                  "choose another -o")
    assert sorted(os.listdir(lib)) == ["tiny-gguf-q8_0"] and (art / "model.gguf").is_file()


def test_force_over_an_artifact_this_process_may_not_delete_is_refused_before_the_work(tmp_path, monkeypatch):
    """The same, simulated for root (which passes permissions): the check comes before the work too."""
    art = make_artifact(tmp_path / "art")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: os.fspath(p) != str(art) and real(p, mode, **kw))
    with pytest.raises(OutputExistsError, match=f"cannot replace {art}: {art} is not writable; nothing was written"):
        check_output(art, True, is_edgekit_output)
    with pytest.raises(OutputExistsError), atomic_dir(art, force=True) as tmp:
        (tmp / "edgekit.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"] and (art / "model.gguf").is_file()


# -- 2. cache clear deletes only what edgekit wrote ------------------------------------------------------

def test_cache_clear_keeps_and_names_what_edgekit_did_not_write(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("EDGEKIT_HOME", str(home))
    for rel in ("calib/0f3a9c.npy", "calib/thesis.txt", "calib/mine.npy", "heal/3f2a/state.json",
                "heal/notes/todo.md", "aqlm/77aa/report.json", "aqlm/readme"):
        (home / rel).parent.mkdir(parents=True, exist_ok=True)
        (home / rel).write_text("x" * 1000)
    rows = {r["kind"]: r for r in json.loads(cli("cache", "--json").stdout)["caches"]}
    assert (rows["calib"]["entries"], rows["calib"]["bytes"]) == (1, 1000)
    assert rows["calib"]["others"] == [str(home / "calib/mine.npy"), str(home / "calib/thesis.txt")]
    r = cli("cache", "clear", "-y")
    assert r.exit_code == 0 and "cleared heal, aqlm, calib: 0.0 MB freed" in r.stdout, r.output
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file()) == [
        "aqlm/readme", "calib/mine.npy", "calib/thesis.txt", "heal/notes/todo.md"]
    said = " ".join(r.stderr.split())
    assert f"kept {home / 'calib/thesis.txt'}: edgekit did not write it" in said and "heal/notes" in said
    r = cli("cache", "clear", "calib", "-y")  # only others left: nothing to clear, and they are named
    assert r.exit_code == 0 and "nothing to clear" in r.stdout and "thesis.txt" in r.stderr
    assert (home / "calib/thesis.txt").is_file()


# -- 3. environment variables set wrong -------------------------------------------------------------------

@pytest.mark.parametrize("value, said", [("lib", "EDGEKIT_MODELS is 'lib', a relative path; set it to an absolute one"),
                                         (" ", "EDGEKIT_MODELS is ' ', blank; set it to an absolute folder")])
def test_a_relative_or_blank_library_is_refused(tmp_path, monkeypatch, value, said):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGEKIT_MODELS", value)
    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "home"))
    assert said in one_line_error(cli("ls"))
    with pytest.raises(InputError, match=said):
        library.store_dir(create=True)
    assert sorted(os.listdir(tmp_path)) == []


def test_a_home_that_is_a_file_is_named_as_edgekit_home(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.delenv("EDGEKIT_MODELS", raising=False)
    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "afile"))
    said = f"EDGEKIT_HOME is {tmp_path / 'afile'}, a file, not a folder; point EDGEKIT_HOME at a folder"
    for args in (("ls",), ("cache",)):  # read-only: they go on, and say why nothing is there
        r = cli(*args)
        assert r.exit_code == 0 and said in " ".join(r.stderr.split()), r.output
    with pytest.raises(InputError) as caught:  # convert's way to the library: no word of EDGEKIT_MODELS
        library.store_dir(create=True)
    assert str(caught.value).startswith(said) and "EDGEKIT_MODELS" not in str(caught.value)
    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "afile" / "home"))
    with pytest.raises(InputError, match=f"but {tmp_path / 'afile'} is a file, not a folder"):
        library.store_dir(create=True)


def test_a_library_that_is_a_broken_link_says_so(tmp_path, monkeypatch):
    link = tmp_path / "lib"
    link.symlink_to(tmp_path / "gone")
    monkeypatch.setenv("EDGEKIT_MODELS", str(link))
    said = f"EDGEKIT_MODELS is {link}, a broken symbolic link (to {tmp_path / 'gone'})"
    assert said in one_line_error(cli("ls"))
    with pytest.raises(InputError, match="broken symbolic link"):
        library.store_dir(create=True)


# -- 4. names at the file system's limit ---------------------------------------------------------------

def test_a_name_too_long_for_its_temporary_name_is_refused_up_front(tmp_path):
    with pytest.raises(InputError, match=r"is 235 bytes long; an output's name may have at most 229 .* choose a "
                                         r"shorter -o"):
        check_output(tmp_path / ("a" * 235), False, is_edgekit_output)
    with atomic_dir(tmp_path / ("b" * 229)) as tmp:  # the longest allowed is written
        (tmp / "edgekit.json").write_text("{}")
    assert (tmp_path / ("b" * 229) / "edgekit.json").is_file()


def test_an_artifact_with_a_long_name_can_be_removed(store):
    art = make_artifact(store / ("c" * 250))
    assert library.remove(art) > 0 and not art.exists() and hidden(store) == []


# -- 6. ulimit -f ----------------------------------------------------------------------------------------

def test_a_file_size_limit_is_said_as_one_not_as_a_full_disk(tmp_path):
    """Python ignores SIGXFSZ, so a write past ``ulimit -f`` fails: EFBIG from a plain write, a short write
    without an errno from numpy's tofile (what the GGUF writer uses)."""
    import resource

    code = ("import sys, numpy as np; from pathlib import Path; from edgekit.fsutil import atomic_dir\n"
            "from edgekit.errors import EdgekitError\n"
            "for how in ('write', 'tofile'):\n"
            "    try:\n"
            "        with atomic_dir(Path(sys.argv[1]) / how) as tmp:\n"
            "            if how == 'write':\n"
            "                (tmp / 'x.bin').write_bytes(bytes(1 << 20))\n"
            "            else:\n"
            "                np.zeros(1 << 18, np.float32).tofile(tmp / 'x.bin')\n"
            "    except EdgekitError as exc:\n"
            "        print(type(exc).__name__, exc)\n")
    limit = 500 * 1024
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    lines = res.stdout.strip().splitlines()
    assert res.returncode == 0 and len(lines) == 2, res.stdout + res.stderr
    for line, how in zip(lines, ("write", "tofile"), strict=True):
        assert line == (f"DiskFullError a file size limit (ulimit -f 500) stopped the write of {tmp_path / how}; "
                        "nothing was kept. Raise it (ulimit -f unlimited) and retry")
    assert os.listdir(tmp_path) == []


def test_a_file_too_big_for_the_file_system_is_not_a_full_disk(tmp_path, monkeypatch):
    import resource

    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        pytest.skip("this shell has a ulimit -f")
    err = write_error(OSError(errno.EFBIG, "File too large"), tmp_path / "out")
    assert isinstance(err, DiskFullError) and str(err) == (
        f"{tmp_path / 'out'} needs a file bigger than its file system allows; nothing was kept. Choose another "
        "output folder with -o on another file system")


# -- 7. read-only commands leave the home unmade -----------------------------------------------------------

def test_read_only_commands_do_not_create_the_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "nohome"))
    monkeypatch.delenv("EDGEKIT_HOME", raising=False)
    monkeypatch.delenv("EDGEKIT_MODELS", raising=False)
    for args in (("ls",), ("ls", "--json"), ("cache",), ("cache", "clear", "-y"), ("rm", "nothere", "-y"),
                 ("show", "nothere")):
        cli(*args)
        assert not (tmp_path / "nohome").exists(), args


@pytest.mark.parametrize("given", [".", "./", "../tiny/."])
def test_a_model_given_as_dot_is_named_by_its_folder(tmp_path, monkeypatch, given):
    """``edgekit convert .`` from inside the model's folder: the artifact is tiny-gguf-..., not gguf-...
    (``Path('.').name`` is empty); the diffusion converter names the same way."""
    from edgekit import api
    from edgekit.converters.diffusion.convert import default_output as diffusion_output

    (tmp_path / "tiny").mkdir()
    monkeypatch.chdir(tmp_path / "tiny")
    monkeypatch.setenv("EDGEKIT_MODELS", str(tmp_path / "lib"))
    assert api.default_output(Path(given), "gguf", api.ConvertRecipe(bits=8)).name == "tiny-gguf-q8_0"
    assert diffusion_output(Path(given), "onnx", 8, "rtn", 0).name == "tiny-onnx-w8"


def test_a_file_too_large_error_met_anywhere_names_the_size_limit(tmp_path):
    """An EFBIG no writer mapped (a library's own write under ``ulimit -f``) is still said as a size limit,
    not as 'File too large' or a full disk."""
    import resource

    from edgekit.cli.ui import os_error_line

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        line, code = os_error_line(OSError(errno.EFBIG, "File too large", str(tmp_path / "x.bin")))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "ulimit -f 1024" in line and "x.bin" in line and code == DiskFullError.exit_code
