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


def compile_kernels(numba: Any, *fns: Callable[..., Any]) -> list[Any]:
    """``fns`` compiled by ``numba.njit`` as edgekit's kernels all are: IEEE float arithmetic (no fast-math, no
    FMA contraction), NumPy's division semantics, the GIL released; machine code kept in ``__pycache__``
    keyed by the CPU, or compiled in each process where there is nowhere to keep it (a read-only install)."""
    opts = {"fastmath": False, "error_model": "numpy", "nogil": True}
    try:
        first = numba.njit(cache=True, **opts)(fns[0])
        jit = numba.njit(cache=True, **opts)
    except RuntimeError:  # no cache locator: neither the package's __pycache__ nor a home cache is writable
        jit = numba.njit(cache=False, **opts)
        first = jit(fns[0])
    return [first, *(jit(f) for f in fns[1:])]
