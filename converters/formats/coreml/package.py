"""What every part of the Core ML home shares: coremltools (imported quietly) and the package on disk."""

from __future__ import annotations

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
