"""edgekit: compress, convert, run, profile and push large models to the devices people own.

The public SDK lives in :mod:`edgekit.api`; the command line in :mod:`edgekit.cli`.
Heavy dependencies (torch, transformers, llama-cpp-python) are imported lazily.
"""

from __future__ import annotations

__version__ = "0.1.0"

from edgekit.errors import EdgekitError

__all__ = ["EdgekitError", "__version__"]

# ``edgekit.api`` after a plain ``import edgekit``: imported on first use, so ``import edgekit`` (and the
# CLI's ``--help``) stays light (and ``from edgekit import *`` does not pull it in). ``errors`` is bound above.
_LAZY_SUBMODULES = ("api",)


def __getattr__(name: str) -> object:
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")  # also binds it here: no second call
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_SUBMODULES})
