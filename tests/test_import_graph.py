"""The import graph of peer/ has no circle (one run loop; strategies plug in, they are not imported back)."""

from __future__ import annotations

import ast
from pathlib import Path

PEER = Path(__file__).resolve().parents[1] / "peer"


def module_name(path: Path) -> str:
    parts = path.relative_to(PEER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the peer modules it imports anywhere (function-level imports count: they close circles too)."""
    modules = {module_name(path): path for path in PEER.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                while target and target not in modules:  # peer.x.y -> peer.x when y is a name in it
                    target = target.rpartition(".")[0]
                if target and target != name and target != "peer":
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_checker_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_import_graph_reads_the_loop_and_its_strategies():
    graph = import_graph()
    assert {"peer.loop", "peer.strategies.sync", "peer.strategies.diloco"} <= graph["peer.trainer"]
    assert "peer.work" in graph["peer.loop"] and "peer.diloco" in graph["peer.strategies.diloco"]
    assert not any(target.startswith("peer.strategies") for target in graph["peer.loop"])


def test_peer_has_no_import_circle():
    assert find_cycle(import_graph()) is None


def test_peer_never_imports_the_coordinator():
    graph = import_graph()
    for path in PEER.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n == "coordinator" or n.startswith("coordinator.") for n in names), path
    assert graph
