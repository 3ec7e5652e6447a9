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


def test_py_typed_marks_the_installed_package():
    """PEP 561: the marker sits in the edgekit package root (it covers the mapped subpackages too) and the
    package data a wheel installs lists it; an editable install reads the edgekit folder itself."""
    import fnmatch
    import importlib.resources
    import os
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    assert importlib.resources.files("edgekit").joinpath("py.typed").is_file()
    # listed, not left to setuptools' own default: that came in 69, and the build system allows 68
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert any(fnmatch.fnmatch("py.typed", g) for g in cfg["tool"]["setuptools"]["package-data"]["edgekit"])
    cwd = os.getcwd()
    os.chdir(ROOT)  # setuptools resolves package-dir and package-data globs against the project root
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # setuptools' own deprecation notes about the license table
            dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
        dist.include_package_data = False  # the package-data globs alone: no egg-info written
        build_py = dist.get_command_obj("build_py")
        build_py.ensure_finalized()
        build_py.manifest_files = {}
        assert "edgekit/py.typed" in build_py.find_data_files("edgekit", "edgekit")
    finally:
        os.chdir(cwd)


def test_submodules_are_attributes_of_a_plain_import():
    """``import edgekit; edgekit.api`` works, and ``import edgekit`` alone imports neither the SDK nor torch."""
    import subprocess
    import sys

    code = ("import sys, edgekit; light = not {'edgekit.api', 'torch', 'numpy'} & set(sys.modules); "
            "print(light, edgekit.api.generate.__module__, edgekit.errors.InputError.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.split() == ["True", "edgekit.api", "InputError"]
