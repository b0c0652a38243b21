"""The package layout (issue 11): no import cycle between leviathan's packages, and the
`moe` library stands alone. A package is a top-level subpackage or module of leviathan
(`leviathan.train`, `leviathan.trained`, ...); an import counts wherever it runs (module top
or inside a function), not under `if TYPE_CHECKING:`, which never runs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The modules a source file imports (absolute names)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
        for n in ast.walk(node)
    }
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            found.add(node.module)
    return found


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "leviathan" and len(parts) > 1 else None


def package_graph() -> dict[str, set[str]]:
    """package -> the other packages it imports."""
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "leviathan").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        source = package_of(module.removesuffix(".__init__"))
        if source is None:
            continue
        targets = {package_of(m) for m in imports(path)} - {None, source}
        graph.setdefault(source, set()).update(targets)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that returns to its start, or None."""
    state: dict[str, str] = {}  # "open" while on the current path, then "done"

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"b2"}, "b2": {"b"}}) == ["b", "b2", "b"]


def test_leviathan_packages_import_no_cycle():
    graph = package_graph()
    assert {"model", "train", "parallel", "trained", "export", "storage"} <= graph.keys()
    cycle = find_cycle(graph)
    assert cycle is None, "package cycle: " + " -> ".join(cycle)


def test_the_model_knows_no_engine_or_launcher():
    graph = package_graph()
    assert graph["model"] <= {"errors"}, graph["model"]
    assert "train" not in graph["parallel"] and "trained" not in graph["train"]


def test_moe_imports_neither_leviathan_nor_deepspeed():
    for path in sorted((ROOT / "moe").glob("*.py")):
        anywhere = {m.split(".")[0] for m in imports(path)}
        at_top = {m.split(".")[0] for m in imports(path, top_level_only=True)}
        assert "leviathan" not in anywhere, path
        assert "deepspeed" not in at_top, path
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, moe; print(*sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout.split()
    assert not [m for m in loaded if m.split(".")[0] in ("leviathan", "deepspeed")]
