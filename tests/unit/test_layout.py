"""The layout's rules, read from the source: no import cycle among the project's modules (imports inside
functions and under TYPE_CHECKING included), `common/` imports none of the apps nor the command line,
`server/` and `client/` never import each other nor `simulations/`, and only `common/messages/` builds
or reads Flower records by key."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "server", "client", "simulations")
FORBIDDEN = {  # importer's top-level package -> packages it may never import
    "common": {"server", "client", "simulations"},
    "server": {"client", "simulations"},
    "client": {"server", "simulations"},
}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """Every project module `name` imports, anywhere in the file, with the line."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *([base] if base else [])])
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target, node.lineno


def graph() -> dict[str, dict[str, int]]:
    known = modules()
    return {name: dict(imported(name, path, known)) for name, path in known.items()}


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
    return found


def test_the_checker_sees_every_package_and_finds_a_planted_cycle() -> None:
    # Prepare
    edges = graph()
    planted = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}

    # Assert
    assert {"common.config", "server.server_app", "client.client_app", "simulations.cli.main"} <= set(edges)
    assert "common.messages.records" in edges["common.messages.soft_labels"]
    assert cycles(planted) == [["a", "b", "c"]]


def test_no_import_cycle_among_the_project_modules() -> None:
    # Execute
    found = cycles(graph())

    # Assert
    assert found == [], f"import cycles: {found}"


@pytest.mark.parametrize("importer", sorted(FORBIDDEN))
def test_each_role_imports_only_what_it_may(importer: str) -> None:
    # Execute
    bad = [f"{module} -> {target} (line {line})" for module, targets in graph().items() if module.split(".")[0] == importer
           for target, line in targets.items() if target.split(".")[0] in FORBIDDEN[importer]]

    # Assert
    assert bad == [], f"{importer}/ may not import {sorted(FORBIDDEN[importer])}: {bad}"


def test_only_common_messages_reads_flower_records_by_key() -> None:
    # Prepare: a record is read or built by key through `.content[...]`, `RecordDict({"key": ...})` or the typed
    # record containers' `.array_records`/`.config_records`/`.metric_records`
    pattern = re.compile(r"\.content(\.get\(|\[)|RecordDict\(\{|\.(array|config|metric)_records\b")
    offenders = []

    # Execute
    for name, path in modules().items():
        if name.startswith("common.messages"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")

    # Assert
    assert offenders == [], "Flower records read by key outside common/messages/:\n" + "\n".join(offenders)
