"""The host as a device when edgekit's cache folder does not exist and cannot be made (a HOME the user cannot
write): listing it and pushing to a writable --dest still work."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekit.devices import list_devices, open_device


@pytest.fixture
def unmakeable_home(tmp_path, monkeypatch) -> Path:
    """EDGEKIT_HOME below a plain file: it does not exist, and no mkdir can make it."""
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    home = blocker / "home" / ".cache" / "edgekit"
    monkeypatch.setenv("EDGEKIT_HOME", str(home))
    return home


def test_host_is_listed_with_a_home_that_cannot_be_made(unmakeable_home):
    """Was "error: No such file or directory (.../.cache/edgekit)": disk usage of a folder that is not there."""
    (host,) = list_devices(["host"]).devices
    assert host.id == "host" and host.storage_free > 0
    assert host.storage_path == str(unmakeable_home / "pushed")
    assert not unmakeable_home.exists()


def test_push_to_a_writable_dest_needs_no_home(unmakeable_home, tiny_artifact, tmp_path):
    from edgekit.devices import PushConfig, push

    with open_device("host") as dev:
        res = push(tiny_artifact, dev, PushConfig(dest=str(tmp_path / "copy")))
    assert sorted(f.name for f in res.files) == ["edgekit.json", "model.gguf"]
    assert (tmp_path / "copy/tiny-q8/model.gguf").read_bytes() == (tiny_artifact / "model.gguf").read_bytes()
