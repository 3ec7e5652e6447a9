"""edgekit: compress, convert, run, profile and push large models to the devices people own.

The public SDK lives in :mod:`edgekit.api`; the command line in :mod:`edgekit.cli`.
Heavy dependencies (torch, transformers, llama-cpp-python) are imported lazily.
"""

from __future__ import annotations

__version__ = "0.1.0"

from edgekit.errors import EdgekitError

__all__ = ["EdgekitError", "__version__"]
