"""Import layering of the three packages: no import cycle, and dependencies pointing one way.

    pallas_kernels <- attnlab.ops <- sharding <- attnlab.nn <- the rest of attnlab
                                                               (train, bench*, cli, data, ...)

A module may import from its own layer and the layers to its left, never from one to its
right. The modules are read with ``ast``, not imported: every ``import`` statement counts,
including those inside functions (lazy imports) and ``importlib.import_module("literal")``.
An import of a package's ``__init__`` is an edge to that package; ``from pkg import name``
is an edge to ``pkg.name`` where that is a module.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("attnlab", "pallas_kernels", "sharding")
# Layer of a module: the first prefix it matches, in this order; the rest of attnlab is last.
LAYERS = (
    ("pallas_kernels", 0),
    ("attnlab.ops", 1),
    ("sharding", 2),
    ("attnlab.nn", 3),
    ("attnlab", 4),
)
LAYER_NAMES = ("pallas_kernels", "attnlab.ops", "sharding", "attnlab.nn", "attnlab (rest)")


@functools.cache
def modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _known(name: str) -> str | None:
    """The longest prefix of ``name`` that is one of our modules (None if outside them)."""
    mods = modules()
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


@functools.cache
def imports() -> dict[str, frozenset[tuple[str, int]]]:
    """Module -> the (imported module, line) pairs of every import of our packages in it."""
    graph = {}
    for mod, path in modules().items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    anchor = ".".join(parts[: len(parts) - node.level + 1])
                    base = f"{anchor}.{base}" if base else anchor
                names = [f"{base}.{alias.name}" for alias in node.names]
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                names = [node.args[0].value]
            else:
                continue
            for name in names:
                if name.split(".")[0] in PACKAGES:
                    target = _known(name)
                    if target is not None and target != mod:
                        targets.add((target, node.lineno))
        graph[mod] = frozenset(targets)
    return graph


def layer(mod: str) -> int:
    for prefix, rank in LAYERS:
        if mod == prefix or mod.startswith(prefix + "."):
            return rank
    raise ValueError(f"{mod} is in no layer; add its package to LAYERS")


def cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), sorted."""
    graph = {m: sorted({t for t, _ in edges}) for m, edges in imports().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def violations(rank: int) -> list[str]:
    """Imports by modules of layer ``rank`` of a module in a layer to its right."""
    return sorted(
        f"{mod}:{line} imports {target} ({LAYER_NAMES[layer(target)]})"
        for mod, edges in imports().items()
        if layer(mod) == rank
        for target, line in edges
        if layer(target) > rank
    )


def test_the_walk_sees_the_packages():
    mods = modules()
    assert "pallas_kernels.gpu.flash_fwd" in mods and "attnlab.ops.attention" in mods
    assert "sharding.ring" in mods and "attnlab.nn" in mods
    # a lazy (function-level) import is an edge too
    assert any(t == "sharding.ulysses" for t, _ in imports()["attnlab.train.trainer"])


def test_no_import_cycle():
    assert cycles() == []


@pytest.mark.parametrize("rank", range(len(LAYER_NAMES) - 1), ids=LAYER_NAMES[:-1])
def test_imports_point_down_the_layers(rank):
    assert violations(rank) == []
