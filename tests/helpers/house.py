"""Static facts about the source tree for the house-rule tests: the import graph and the sizes of modules and
functions (read with ``ast``; nothing is imported)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("gfm_core", "orchestration")


@dataclass(frozen=True)
class Module:
    """A module of the tree: its dotted name, file and parsed source."""

    name: str
    path: Path
    tree: ast.Module
    lines: int

    @property
    def docstring(self) -> str:
        return ast.get_docstring(self.tree) or ""


def modules(root: Path) -> dict[str, Module]:
    """Every module of :data:`PACKAGES` under ``root``, by dotted name (a package by its own name)."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            text = f.read_text()
            out[".".join(parts)] = Module(".".join(parts), f, ast.parse(text), len(text.splitlines()))
    return out


def _imported(mod: Module, known: dict[str, Module]) -> Iterator[str]:
    """Every module of the tree ``mod`` imports, at module level or inside functions (not under TYPE_CHECKING)."""
    is_pkg = mod.path.name == "__init__.py"

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    def walk(node: ast.AST) -> Iterator[str]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                yield from (t for a in child.names if (t := resolve(a.name)))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    here = mod.name.split(".") if is_pkg else mod.name.split(".")[:-1]
                    base = ".".join(here[: len(here) - child.level + 1] + ([child.module] if child.module else []))
                for a in child.names:
                    target = resolve(f"{base}.{a.name}") if f"{base}.{a.name}" in known else resolve(base)
                    if target:
                        yield target
            yield from walk(child)

    yield from walk(mod.tree)


def import_graph(mods: dict[str, Module]) -> dict[str, set[str]]:
    """``module -> modules of the tree it imports`` (self-imports left out)."""
    return {name: {t for t in _imported(m, mods) if t != name} for name, m in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def long_functions(mods: dict[str, Module], limit: int) -> list[tuple[str, int]]:
    """``(module.function, lines)`` of every function or method longer than ``limit`` lines."""
    out = []
    for name, m in mods.items():
        for node in ast.walk(m.tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > limit:
                    out.append((f"{name}.{node.name}", n))
    return out


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module importing ``start`` runs: its imports, transitively, with the packages above each (their
    ``__init__`` runs first)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen or name not in graph:
            continue
        seen.add(name)
        parents = [name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)]
        todo.extend([*graph[name], *parents])
    return seen
