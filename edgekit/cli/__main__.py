"""``python -m edgekit.cli``: the ``edgekit`` command, run exactly as the console script runs it (for an
environment whose scripts folder is not on PATH)."""

from __future__ import annotations

import sys

from edgekit.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
