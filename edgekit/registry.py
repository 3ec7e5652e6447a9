"""Register by decorator, look up by name.

Each plug-in family (quantizers, formats, backends) owns one :class:`Registry`. Built-in
plug-ins are imported only when a registry is first read, so ``edgekit --help`` stays light.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from edgekit.errors import UnsupportedError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table with a decorator to fill it and lazy loading of built-in modules."""

    def __init__(self, kind: str, builtin_modules: Iterable[str] = ()) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._builtin_modules = tuple(builtin_modules)
        self._loaded = False
        # Encoders look grids up from worker threads: the first lookups must all wait for the imports.
        self._lock = threading.RLock()

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@registry.register("gguf")``. A duplicate name raises ``ValueError``."""
        key = name.lower()

        def decorate(obj: T) -> T:
            if key in self._items and self._items[key] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[key] = obj
            return obj

        return decorate

    def _load_builtins(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            for mod in self._builtin_modules:
                importlib.import_module(mod)
            self._loaded = True

    def get(self, name: str) -> T:
        """The object registered under ``name``; an unknown name lists the known ones."""
        self._load_builtins()
        try:
            return self._items[name.lower()]
        except KeyError:
            raise UnsupportedError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load_builtins()
        return name.lower() in self._items
