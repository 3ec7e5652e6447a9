"""What every part of the Core ML home shares: coremltools (imported quietly) and the package on disk."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MODEL_NAME = "model.mlpackage"


def coremltools() -> Any:
    """coremltools, imported quietly (it logs that its macOS prediction library is absent on Linux, and
    warns that edgekit's torch is newer than it tested: edgekit never uses its torch front end)."""
    import logging
    import warnings

    from edgekit.errors import require

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return require("coremltools", "coreml")


def package_bytes(path: Path) -> int:
    """Bytes of every file in a package folder."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@contextlib.contextmanager
def scratch_in(out_dir: Path) -> Iterator[None]:
    """Point coremltools' temporary files (its weights folder, and the whole package it builds before
    ``save`` copies it, deleted only when the model object is collected) into a folder inside ``out_dir``,
    the output's temporary folder: they go with it on an error or Ctrl-C, the sweep of a killed writer's
    leftovers covers kill -9, and nothing is left in $TMPDIR. The folder is removed before the output is
    renamed into place."""
    scratch = out_dir / ".coremltools-tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    before = tempfile.tempdir
    tempfile.tempdir = str(scratch)  # coremltools calls mkdtemp() and TemporaryDirectory() with no dir
    try:
        yield
    finally:
        tempfile.tempdir = before
        shutil.rmtree(scratch, ignore_errors=True)
