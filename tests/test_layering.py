"""The house rules, checked on the source: imports flow one way and modules stay small.

engine adapters (connector/vllm*, connector/sglang*) -> core (the rest of connector/) ->
{tiers (storage_backends/), copy layer (cuda_ext/)} -> chunk format (chunk_format/); the tools in
the root package (CLI, demos) sit above everything. Every ``import`` of a kvtier module counts,
also one inside a function or under ``TYPE_CHECKING``: a lazy import is still a dependency, and a
backward one is how the cycles this test guards against crept in. The walk reads the files with
``ast`` instead of importing them, so it sees every import, not only those one run executes.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FOLDERS = {  # repo folder -> the package it installs as (pyproject's package-dir)
    "kvtier": "kvtier",
    "chunk_format": "kvtier.chunk_format",
    "storage_backends": "kvtier.storage_backends",
    "cuda_ext": "kvtier.cuda_ext",
    "connector": "kvtier.connector",
}
ADAPTER_PREFIXES = ("kvtier.connector.vllm", "kvtier.connector.sglang")
ENGINE_PACKAGES = ("vllm", "sglang")
MAX_LINES = 500
MAX_ADAPTER_LINES = 300


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool


def _modules() -> dict[str, Module]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).glob("*.py")):
            is_package = path.name == "__init__.py"
            name = package if is_package else f"{package}.{path.stem}"
            found[name] = Module(name, path, is_package)
    return found


MODULES = _modules()


def layer(name: str) -> str:
    """The layer a kvtier module belongs to."""
    if name == "kvtier":
        return "root-init"
    if name.startswith("kvtier.chunk_format"):
        return "chunk format"
    if name.startswith("kvtier.storage_backends"):
        return "tiers"
    if name.startswith("kvtier.cuda_ext"):
        return "copy layer"
    if name.startswith(ADAPTER_PREFIXES):
        return "engine adapters"
    if name.startswith("kvtier.connector"):
        return "core"
    return "tools"


# What each layer may import besides itself. Tiers and the copy layer are siblings: the core joins them.
ALLOWED = {
    "root-init": set(),
    "chunk format": set(),
    "tiers": {"chunk format"},
    "copy layer": {"chunk format"},
    "core": {"tiers", "copy layer", "chunk format"},
    "engine adapters": {"core", "tiers", "copy layer", "chunk format"},
    "tools": {"engine adapters", "core", "tiers", "copy layer", "chunk format", "root-init"},
}


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports_of(module: Module) -> set[str]:
    """Every kvtier module ``module`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(module.path.read_text(), str(module.path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            submodules = {f"{base}.{alias.name}" for alias in node.names} & MODULES.keys()
            out.update(submodules)
            if len(submodules) < len(node.names):  # names defined in ``base`` itself (a package re-exports them)
                out.add(base)
    return {name for name in out if name in MODULES and name != module.name}


def external_imports_of(module: Module) -> set[str]:
    """Top-level names of the non-kvtier packages ``module`` imports."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(module.path.read_text(), str(module.path))):
        if isinstance(node, ast.Import):
            out.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.partition(".")[0])
    return out


GRAPH = {name: imports_of(module) for name, module in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
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
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_the_walk_sees_the_whole_package():
    """Guards the test itself: a walk that found nothing would pass everything."""
    assert len(MODULES) > 40
    assert "kvtier.connector.vllm" in MODULES and "kvtier.chunk_format.codec" in MODULES
    assert "kvtier.chunk_format.keys" in GRAPH["kvtier.chunk_format.codec"]
    assert "kvtier.connector.chunk_store" in GRAPH.get("kvtier.connector.vllm_worker", set()) | GRAPH["kvtier.connector.vllm"]


def test_no_backward_import():
    wrong = [f"{name} ({layer(name)}) imports {target} ({layer(target)})"
             for name, targets in sorted(GRAPH.items()) for target in sorted(targets)
             if layer(target) != layer(name) and layer(target) not in ALLOWED[layer(name)]]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_vllm_and_sglang_adapters_do_not_import_each_other():
    wrong = [f"{name} imports {target}" for name, targets in sorted(GRAPH.items()) for target in sorted(targets)
             if name.startswith(ADAPTER_PREFIXES) and target.startswith(ADAPTER_PREFIXES)
             and name.split(".")[2][:4] != target.split(".")[2][:4]]
    assert not wrong, "\n".join(wrong)


def test_only_adapters_and_tools_know_the_engines():
    """The core, the tiers, the copy layer and the chunk format are engine-agnostic."""
    wrong = [f"{name} imports {package}" for name, module in sorted(MODULES.items())
             if layer(name) not in ("engine adapters", "tools")
             for package in sorted(external_imports_of(module) & set(ENGINE_PACKAGES))]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_files():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_import_cycle_between_folders():
    folder_of = {name: module.path.parent.name for name, module in MODULES.items()}
    folders: dict[str, set[str]] = {folder: set() for folder in FOLDERS}
    for name, targets in GRAPH.items():
        folders[folder_of[name]].update(folder_of[t] for t in targets if folder_of[t] != folder_of[name]
                                        and t != "kvtier")  # kvtier/__init__.py: the version, imports nothing
    cycles = _cycles(folders)
    assert not cycles, "folder cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_private_names_of_another():
    wrong = []
    for name, module in sorted(MODULES.items()):
        for node in ast.walk(ast.parse(module.path.read_text())):
            if isinstance(node, ast.ImportFrom) and _resolve(module, node).startswith("kvtier"):
                wrong.extend(f"{name}: from {_resolve(module, node)} import {alias.name}" for alias in node.names
                             if alias.name.startswith("_") and not alias.name.startswith("__"))
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    lines = len(MODULES[name].path.read_text().splitlines())
    limit = MAX_ADAPTER_LINES if layer(name) == "engine adapters" else MAX_LINES
    assert lines < limit, f"{MODULES[name].path.relative_to(REPO)}: {lines} lines (limit {limit}): split it"
