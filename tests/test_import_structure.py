"""No import circles among fewvision's own modules.

Every ``import`` / ``from ... import`` statement counts, wherever it is (module level, inside a function, under
``if TYPE_CHECKING``), read from the source with :mod:`ast` - nothing is imported. A package's ``__init__`` importing
its own submodules counts like any other import, so a submodule that reaches back to its package's ``__init__``
(directly or through other modules) closes a circle.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "fewvision"


def module_files(root: Path, package: str) -> dict[str, Path]:
    mods = {}
    for folder, _, files in os.walk(root / package):
        for name in files:
            if name.endswith(".py"):
                path = Path(folder) / name
                dotted = ".".join(path.relative_to(root).with_suffix("").parts)
                mods[dotted.removesuffix(".__init__")] = path
    return mods


def _owner(name: str, mods: dict[str, Path]) -> str | None:
    """The module of ours that ``name`` (a module or a name inside one) lives in."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_edges(mods: dict[str, Path], package: str) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                # 'from pkg import sub' imports the module pkg.sub; 'from mod import name' imports mod
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module for a in node.names]
            else:
                continue
            for target in targets:
                owner = _owner(target, mods)
                if owner and owner != mod and (owner == package or owner.startswith(package + ".")):
                    edges[mod].add(owner)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative). A package's ``__init__`` importing
    its children counts: a child that reaches back to the ``__init__`` (even through another module) closes a circle."""
    def followed(v):
        return sorted(edges[v])

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(followed(start)))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(followed(w))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return found


def test_the_checker_finds_a_circle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")  # a package importing its child: not a circle
    (pkg / "a.py").write_text("import os\nfrom .sub.b import thing\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def thing():\n    from ..a import os\n    return os\n")
    (pkg / "c.py").write_text("from pkg import a\n")
    mods = module_files(tmp_path, "pkg")
    edges = import_edges(mods, "pkg")
    assert edges["pkg.sub.b"] == {"pkg.a"} and edges["pkg.c"] == {"pkg.a"}
    assert circles(edges) == [["pkg.a", "pkg.sub.b"]]
    (pkg / "sub" / "b.py").write_text("def thing():\n    return 1\n")
    assert circles(import_edges(module_files(tmp_path, "pkg"), "pkg")) == []
    # a child reaching its package's __init__ through another module (heads.with_good -> modelfile -> heads)
    (pkg / "c.py").write_text("def load():\n    from pkg import registry_of_a\n")
    (pkg / "a.py").write_text("def build():\n    from .c import load\n")
    assert circles(import_edges(module_files(tmp_path, "pkg"), "pkg")) == [["pkg", "pkg.a", "pkg.c"]]


def test_no_import_circles_in_fewvision():
    mods = module_files(SRC, PACKAGE)
    edges = import_edges(mods, PACKAGE)
    assert len(mods) > 100 and sum(map(len, edges.values())) > 200  # the whole package was read
    found = circles(edges)
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)
