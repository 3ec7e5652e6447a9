"""``edgekit ls`` counts what killed conversions left in the library (QA s55: a ``kill -9`` left a hidden
``.NAME.partial-PID-*`` folder, possibly gigabytes, that ls neither listed nor mentioned), and ``ls --clean``
deletes it; a conversion running now is neither counted nor touched."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app

# A writer as convert is one: its output in atomic_dir's hidden folder, then it waits (to be killed, or to run on).
WRITER = """
import sys, time
from pathlib import Path
from edgekit.fsutil import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "model.gguf").write_bytes(b"x" * 2_000_000)
    print(tmp.name, flush=True)
    time.sleep(120)
"""


def _writer(dest: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(dest)], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()  # type: ignore[union-attr]


def _artifact(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "edgekit.json").write_text(json.dumps({"schema": "edgekit.artifact/1", "format": "gguf",
                                                     "files": {"model": "model.gguf"}, "size_bytes": 10}))
    (folder / "model.gguf").write_bytes(b"0" * 10)


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    monkeypatch.setenv("EDGEKIT_MODELS", str(path))
    return path


def test_ls_counts_a_killed_conversions_leftover_and_clean_deletes_only_it(store):
    runner = CliRunner()
    killed, killed_name = _writer(store / "killed-gguf-q4_0")
    running, running_name = _writer(store / "running-gguf-q4_0")
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        assert killed_name.startswith(f".killed-gguf-q4_0.partial-{killed.pid}-") and (store / killed_name).is_dir()

        r = runner.invoke(app, ["ls"])  # no artifact yet: the leftover is said all the same
        assert r.exit_code == 0 and "no artifacts in" in r.stdout, r.output
        note = " ".join(r.stderr.split())
        assert (f"note: a leftover of a killed edgekit run (2.0 MB) in {store}: {killed_name}; 'edgekit ls --clean' "
                "deletes it") in note, note
        assert running_name not in note  # a conversion running now is no leftover

        _artifact(store / "g4")
        r = runner.invoke(app, ["ls"], terminal_width=200)
        assert r.exit_code == 0 and "g4" in r.stdout and killed_name not in r.stdout, r.output
        assert "a leftover of a killed edgekit run (2.0 MB)" in " ".join(r.stderr.split()), r.stderr
        data = json.loads(runner.invoke(app, ["ls", "--json"]).stdout)
        assert [(Path(x["path"]).name, x["pid"], x["size_bytes"]) for x in data["leftovers"]] == [
            (killed_name, killed.pid, 2_000_000)]

        r = runner.invoke(app, ["ls", "--clean"], terminal_width=200)
        assert r.exit_code == 0 and "g4" in r.stdout, r.output
        said = " ".join(r.stderr.split())
        assert f"removed {store / killed_name} (2.0 MB), left by an edgekit that was killed" in said, said
        assert "leftover" not in said
        assert not (store / killed_name).exists() and (store / running_name).is_dir()
    finally:
        running.kill()
        running.wait(30)
    r = runner.invoke(app, ["ls"])  # killed as well now: a leftover in turn
    assert f"a leftover of a killed edgekit run (2.0 MB) in {store}: {running_name}" in " ".join(r.stderr.split())
