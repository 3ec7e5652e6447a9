"""Packaging: the product card's folders install under the one `edgekit` import name."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
MAPPED = {"edgekit": "edgekit", "converters": "edgekit.converters", "runtime": "edgekit.runtime",
          "tui": "edgekit.tui", "devices": "edgekit.devices"}


def test_every_package_folder_is_listed_and_mapped():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {v: k for k, v in cfg["package-dir"].items()} == MAPPED
    found = set()
    for folder, pkg in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((pkg, *rel)))
    assert found == set(cfg["packages"])


def test_installed_modules_resolve_into_the_product_folders():
    import edgekit.converters.formats.gguf as gguf_format
    import edgekit.runtime.llamacpp as llamacpp

    assert Path(gguf_format.__file__).is_relative_to(ROOT / "converters")
    assert Path(llamacpp.__file__).is_relative_to(ROOT / "runtime")
