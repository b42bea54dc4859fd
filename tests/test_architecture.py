"""The layout's rules, read from the source (ast, nothing imported): no import circles, serving never
imports training, each room imports only the rooms below it, and modules stay small (docs/architecture.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "training")

#: Room of a service module → its rank: a module may import its own room and rooms of a lower rank.
FOUNDATION = {"service.settings", "service.errors", "service.metrics", "service.log_safety", "service.processes"}
RANKS = {"foundation": 0, "imaging": 1, "models": 2, "cascade": 3, "store": 4, "http": 5, "pacs": 5, "app": 6}
#: (importer, imported) pairs allowed across the ranks, each with its reason.
EXCEPTIONS = {
    # A bad AE allowlist stops start-up when the settings are read, with the parser's own message; the
    # allowlist module imports nothing of the service (its package __init__ is a docstring).
    ("service.settings", "service.pacs.allowlist"),
}
#: Modules allowed over MAX_LINES: the first line of their docstring says why.
MAX_LINES = 400
APP_MAX_LINES = 150


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """Every first-party module `path` imports, at any depth (a function-level import still depends)."""
    found: set[str] = set()
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    modules = sources()
    known = set(modules)
    return {name: imports(path, known) for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
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

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def room(module: str) -> str | None:
    """The room of a service module (None outside service/ and for the package itself)."""
    if module in FOUNDATION:
        return "foundation"
    if module == "service.app":
        return "app"
    parts = module.split(".")
    if parts[0] != "service" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in RANKS else None


def test_no_import_circle() -> None:
    assert cycles(graph()) == []


def test_the_circle_finder_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_serving_never_imports_training() -> None:
    edges = graph()
    offending = sorted((source, target) for source, targets in edges.items() if source.startswith("service")
                       for target in targets if target.startswith("training"))
    assert offending == []


def test_every_service_module_lives_in_a_room() -> None:
    homeless = sorted(name for name in sources() if name.startswith("service.") and room(name) is None)
    assert homeless == []


def test_rooms_import_only_downwards() -> None:
    edges = graph()
    wrong = []
    for source, targets in edges.items():
        if room(source) is None:
            continue
        for target in targets:
            if room(target) is None or (source, target) in EXCEPTIONS:
                continue
            rank_source, rank_target = RANKS[room(source)], RANKS[room(target)]
            if rank_target > rank_source or (rank_target == rank_source and room(source) != room(target)):
                wrong.append(f"{source} ({room(source)}) imports {target} ({room(target)})")
    assert wrong == []


def first_docstring_line(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def test_modules_stay_small() -> None:
    too_long = []
    for name, path in sources().items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and "long" not in first_docstring_line(path).lower():
            too_long.append(f"{name}: {lines} lines")
    assert too_long == []
    assert len((REPO / "service/app.py").read_text().splitlines()) <= APP_MAX_LINES


@pytest.mark.parametrize("module", ["service.app", "service.cascade.flow", "service.pacs.side"])
def test_the_rules_see_the_modules_they_judge(module: str) -> None:
    """A parser that found no imports would pass every rule above: the main modules must show theirs."""
    assert graph()[module], f"no first-party import found in {module}"
