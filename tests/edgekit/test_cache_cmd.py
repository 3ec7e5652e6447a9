"""``edgekit cache``: what edgekit keeps to go faster next time (training states, AQLM encodings, calibration
text, hashes), each kind's size and path; ``cache clear [KIND]`` asks (``-y`` does not) and never touches the
model library, devices, known_hosts or chats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, list(args), terminal_width=200)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An edgekit home with something in every cache kind and the user's own things beside them."""
    home = tmp_path / "home"
    monkeypatch.setenv("EDGEKIT_HOME", str(home))
    monkeypatch.delenv("EDGEKIT_MODELS", raising=False)
    for rel, size in {"heal/3f2a/student.safetensors": 3_000_000, "heal/3f2a/state.json": 100,
                      "heal/9c1e/student.safetensors": 1_000_000, "aqlm/77aa/encoded.safetensors": 500_000,
                      "calib/ab.npy": 2_000, "sha256-cache.json": 50,
                      # the user's: never a cache
                      "models/smol-gguf-q4_k_m/edgekit.json": 10, "devices.json": 10, "known_hosts": 10,
                      "chats/a.json": 10, "profile.sqlite": 10}.items():
        (home / rel).parent.mkdir(parents=True, exist_ok=True)
        (home / rel).write_bytes(b"x" * size)
    return home


USER_FILES = ["chats/a.json", "devices.json", "known_hosts", "models/smol-gguf-q4_k_m/edgekit.json", "profile.sqlite"]


def _files(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())


def test_cache_lists_each_kind_with_its_size_and_path(home):
    r = cli("cache", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["home"] == str(home)
    rows = {c["kind"]: c for c in data["caches"]}
    assert list(rows) == ["heal", "aqlm", "calib", "hashes"]
    assert (rows["heal"]["bytes"], rows["heal"]["entries"], rows["heal"]["path"]) == (4_000_100, 2, str(home / "heal"))
    assert (rows["aqlm"]["bytes"], rows["calib"]["bytes"], rows["hashes"]["bytes"]) == (500_000, 2_000, 50)
    r = cli("cache")
    assert r.exit_code == 0, r.output
    assert "heal" in r.stdout and "4.0" in r.stdout and str(home / "aqlm") in r.stdout and "4.5 MB in all" in r.stdout


def test_cache_clear_asks_then_clears_one_kind_or_all_and_never_the_users_things(home):
    before = _files(home)
    r = cli("cache", "clear", "heal")  # stdin is not a terminal: no silent yes
    assert r.exit_code != 0 and r.output.startswith("error:") and "-y" in r.output and _files(home) == before
    r = cli("cache", "clear", "heal", "-y")
    assert r.exit_code == 0 and "cleared heal: 4.0 MB freed" in r.stdout, r.output
    assert (home / "heal").is_dir() and not any((home / "heal").iterdir())  # a running conversion writes here
    assert "aqlm/77aa/encoded.safetensors" in _files(home)
    r = cli("cache", "clear", "-y")
    assert r.exit_code == 0 and "cleared aqlm, calib, hashes" in r.stdout, r.output
    assert _files(home) == USER_FILES
    r = cli("cache", "clear", "-y")
    assert r.exit_code == 0 and "nothing to clear" in r.stdout


def test_cache_clear_of_an_unknown_kind_is_one_line(home):
    before = _files(home)
    r = cli("cache", "clear", "models", "-y")
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        "error: no cache kind 'models'; give heal, aqlm, calib, hashes (or none: all of them)"]
    assert _files(home) == before


def test_cache_clear_keeps_what_a_live_writer_is_writing(home):
    """A conversion running now writes its checkpoint into a hidden temporary folder beside the state: kept."""
    import os

    live = home / "heal" / f".3f2a.partial-{os.getpid()}-abcd"
    live.mkdir()
    (live / "student.safetensors").write_bytes(b"x" * 10)
    r = cli("cache", "clear", "heal", "-y")
    assert r.exit_code == 0, r.output
    assert [p.name for p in (home / "heal").iterdir()] == [live.name]
