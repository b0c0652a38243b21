"""The layout of docs/design.md: leviathan's packages in layers that import only downward
(type-only imports included), no import cycle between packages or between modules, and
the `moe` library standing alone. A package is a top-level subpackage or module of
leviathan (`leviathan.train`, `leviathan.trained`, ...); an import counts wherever it is
written (module top or inside a function)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# Bottom to top: a package imports only packages of lower layers (docs/design.md, Layers).
LAYERS = [
    {"errors"},
    {"storage"},
    {"model"},
    {"config", "hf"},
    {"data", "parallel"},
    {"train"},
    {"export", "eval_tasks"},
    {"trained", "sizing"},
    {"inspection", "compare"},
    {"entry"},
    {"cli"},
]


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The modules a source file imports (absolute names; `from a import b` names a.b
    when that is a module of the repository, else a)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            found |= {module_named(node.module, alias.name) for alias in node.names}
    return found


def module_named(module: str, name: str) -> str:
    candidate = ROOT.joinpath(*f"{module}.{name}".split("."))
    is_module = candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file()
    return f"{module}.{name}" if is_module else module


def module_graph(*roots: str) -> dict[str, set[str]]:
    """module -> the repository's modules it imports, for every module under `roots`."""
    paths = [p for root in roots for p in sorted((ROOT / root).rglob("*.py"))]
    name = {p: ".".join(p.relative_to(ROOT).with_suffix("").parts) for p in paths}
    known = {m.removesuffix(".__init__") for m in name.values()}
    return {name[p].removesuffix(".__init__"): {m for m in imports(p) if m in known} for p in paths}


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


def test_no_module_imports_itself_back():
    graph = module_graph("leviathan", "moe")
    assert "leviathan.data.encode" in graph["leviathan.data.raydata"]  # it sees the edges
    cycle = find_cycle(graph)
    assert cycle is None, "module cycle: " + " -> ".join(cycle)


def test_every_package_has_a_layer_and_imports_only_downward():
    graph = package_graph()
    layer = {package: i for i, names in enumerate(LAYERS) for package in names}
    assert graph.keys() <= layer.keys(), f"packages without a layer: {graph.keys() - layer.keys()}"
    upward = sorted(
        f"{source} -> {target}"
        for source, targets in graph.items()
        for target in targets
        if layer[target] >= layer[source]
    )
    assert not upward, "imports that are not downward: " + ", ".join(upward)


def test_the_layer_check_sees_type_only_imports(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from leviathan.config import Config\n"
    )
    assert imports(planted) == {"typing", "leviathan.config"}


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
