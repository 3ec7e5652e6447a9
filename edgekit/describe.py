"""``edgekit inspect``: what is inside an artifact, read from the model file itself by its format's home
(``Format.describe``): architecture and hyperparameters, parameter count, per-tensor types (with the
fallbacks the converter applied), file size, bits per weight, and the memory it needs at a context length.
"""

from __future__ import annotations

from typing import Any

from edgekit.artifact import Artifact
from edgekit.converters.formats.base import FORMATS
from edgekit.errors import UnsupportedError


def describe(art: Artifact, ctx: int = 4096) -> dict[str, Any]:
    if art.format not in FORMATS:
        raise UnsupportedError(f"inspect reads {', '.join(f.upper() for f in FORMATS.names())} artifacts; "
                               f"this one is {art.format!r}")
    return FORMATS.get(art.format)().describe(art, ctx)
