"""The import structure of the installed package: no import cycles between files, and no import that goes
up the layers  cli/tui -> SDK operations (api, describe, evaluate, importer, quickstart) ->
runtime/devices -> converters -> core. Lazy imports inside functions count: they are the same dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
SDK = {"edgekit.api", "edgekit.describe", "edgekit.evaluate", "edgekit.importer", "edgekit.quickstart"}


def _modules() -> dict[str, Path]:
    """Installed module name -> source file, through pyproject's package-dir mapping."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    mods: dict[str, Path] = {}
    for pkg, folder in cfg.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in f.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            mods.setdefault(".".join([pkg, *parts]), f)
    return mods


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    keep = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*keep, base] if base else keep)
                names = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            for n in names:
                if n.startswith("edgekit") and (t := owner(n)) and t != mod:
                    targets.add(t)
        graph[mod] = targets
    return graph


def _layer(mod: str) -> int:
    top = mod.split(".")[1] if "." in mod else ""
    if top in ("cli", "tui"):
        return 4
    if mod in SDK:
        return 3
    if top in ("runtime", "devices"):
        return 2
    if top == "converters":
        return 1
    return 0


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_no_upward_imports():
    graph = _graph()
    upward = sorted(f"{a} -> {b}" for a, bs in graph.items() for b in bs if _layer(b) > _layer(a)
                    and a != "edgekit")  # the package's own __init__ only re-exports the version
    assert upward == []


def test_the_checker_sees_cycles_and_upward_imports():
    """The walk itself: a made-up graph with one cycle and the layer table on known modules."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert [_layer(m) for m in ("edgekit.cli.main", "edgekit.api", "edgekit.runtime.plan",
                                "edgekit.converters.formats.gguf", "edgekit.arch")] == [4, 3, 2, 1, 0]
    graph = _graph()
    assert "edgekit.converters.formats.gguf.writer" in graph["edgekit.converters.formats.gguf"]
    assert "edgekit.runtime.base" in graph["edgekit.api"]
