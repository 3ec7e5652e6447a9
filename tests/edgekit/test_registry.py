"""The name -> plug-in registries: lazy built-ins, duplicates refused, unknown names listed, and the first
lookups from several threads at once (the GGUF writer's encoder threads) all see the built-ins."""

from __future__ import annotations

import sys
import textwrap
import threading

import pytest

from edgekit.errors import UnsupportedError
from edgekit.registry import Registry


def test_register_get_names_and_errors():
    reg: Registry[object] = Registry("widget")
    a = reg.register("Alpha")(object())
    assert reg.get("alpha") is a and reg.get("ALPHA") is a and "alpha" in reg and reg.names() == ["alpha"]
    reg.register("alpha")(a)  # the same object again is fine
    with pytest.raises(ValueError, match="widget 'alpha' is already registered"):
        reg.register("alpha")(object())
    with pytest.raises(UnsupportedError, match="unknown widget 'beta'; choose one of: alpha"):
        reg.get("beta")


def test_first_lookups_from_many_threads_wait_for_the_builtins(tmp_path, monkeypatch):
    reg: Registry[int] = Registry("slow thing", ["edgekit_test_slow_plugins"])
    (tmp_path / "edgekit_test_slow_plugins.py").write_text(textwrap.dedent("""
        import time
        from tests.edgekit.test_registry import CURRENT
        time.sleep(0.3)  # a heavy import: other threads ask meanwhile
        for i in range(5):
            CURRENT[0].register(f"thing{i}")(i)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    CURRENT[:] = [reg]
    results: list[object] = []

    def ask() -> None:
        try:
            results.append(reg.get("thing4"))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            results.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sys.modules.pop("edgekit_test_slow_plugins", None)
    assert results == [4] * 6


CURRENT: list[Registry] = []


def test_duplicate_names_are_refused_case_blind_in_the_real_registries():
    """A plug-in that takes a built-in's name (in any case) fails at import, never replacing the built-in."""
    from edgekit.converters.formats.base import FORMATS
    from edgekit.runtime.base import BACKENDS

    gguf_format, llamacpp = FORMATS.get("gguf"), BACKENDS.get("llamacpp")
    with pytest.raises(ValueError, match="format 'GGUF' is already registered"):
        FORMATS.register("GGUF")(object())
    with pytest.raises(ValueError, match="backend 'LlamaCpp' is already registered"):
        BACKENDS.register("LlamaCpp")(object())
    assert FORMATS.get("gguf") is gguf_format and BACKENDS.get("llamacpp") is llamacpp
