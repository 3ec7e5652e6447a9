"""Kernels compiled by numba where it is installed (edgekit's default extras bring it), with the caller's
numpy path where it is not."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


def numba_kernel(build: Callable[[Any], Any]) -> Callable[[], Any]:
    """Decorate ``build(numba) -> compiled function``: the decorated name returns that function, compiled
    on first use and kept, or None when numba is not installed."""

    @functools.cache
    def get() -> Any:
        try:
            import numba
        except ImportError:
            return None
        return build(numba)

    get.__doc__ = build.__doc__
    return get
