"""host.json is a cache: a full or read-only EDGEKIT_HOME only costs a re-measurement."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from edgekit.runtime import hostinfo


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_host_cache_that_cannot_be_written_is_no_error(private_home, monkeypatch, code):
    def fail(self, *a, **kw):  # atomic_file turns these into DiskFullError / InputError, not OSError
        raise OSError(code, "cannot write")

    monkeypatch.setattr(Path, "write_text", fail)
    hostinfo._save_cache("k", 1)
    assert hostinfo._load_cache() == {}
    assert [p.name for p in private_home.iterdir()] == []  # no temporary file left
