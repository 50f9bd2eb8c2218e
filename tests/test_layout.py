"""The package's structure: every module imports, the fewstep modules import each other without a circle (counting
imports inside functions too, which hide circles from Python), and the packages imported by models (training's
distributed helpers) stay light."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import fewstep

ROOT = Path(fewstep.__file__).resolve().parent


def module_names() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the fewstep modules it imports (anywhere in its source), resolved to existing modules."""
    modules = module_names()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for target in found:
                resolved = resolve(target) if target.startswith("fewstep") else None
                if resolved and resolved not in (name, "fewstep"):
                    targets.add(resolved)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_imports_and_no_two_import_each_other():
    for info in pkgutil.walk_packages(fewstep.__path__, "fewstep."):
        if not info.name.endswith("__main__"):  # a command's entry point runs on import
            importlib.import_module(info.name)
    graph = import_graph()
    assert len(graph) > 60 and "fewstep.training.loop" in graph
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_circle_hidden_in_a_function():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_role_packages_import_nothing_on_their_own():
    """``fewstep.models`` imports ``fewstep.training.distributed``'s neighbours without pulling in the loop: the
    package files of config/ and training/ hold a docstring only."""
    for package in ("config", "training"):
        tree = ast.parse((ROOT / package / "__init__.py").read_text())
        assert [type(n).__name__ for n in tree.body] == ["Expr"]
