"""The package's own model source, written flat into an export folder with its imports made
relative, so that the folder runs where neither `leviathan` nor `moe` can be imported.

The files are found by following the imports of the entry modules (the transformers
wrapper) through `leviathan` and `moe`; each module becomes `NAME.py` after the last part
of its name (`leviathan.model.gpt` -> gpt.py, the `moe` package -> moe.py). transformers
copies a remote-code file together with the files it names in `from .NAME import` lines
only, so a module imported whole (`from leviathan.model import correlation`) is named
once more in that form.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the folder holding leviathan/ and moe/
OWN = ("leviathan", "moe")  # top-level packages whose modules are copied


def module_file(module: str) -> Path | None:
    """The source file of one of our modules (a package: its __init__.py), or None."""
    if module.split(".")[0] not in OWN:
        return None
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def flat_name(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def imported_modules(node: ast.ImportFrom) -> tuple[str | None, list[ast.alias], list[ast.alias]]:
    """Of `from M import a, b`: M when some names come from its file, then the names that
    are attributes of M and the names that are modules of their own."""
    names, modules = [], []
    for alias in node.names:
        (modules if module_file(f"{node.module}.{alias.name}") else names).append(alias)
    return (node.module if names else None), names, modules


def own_imports(tree: ast.Module) -> list[ast.ImportFrom]:
    """The `from leviathan... import` and `from moe... import` statements, anywhere."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(module_file(a.name) for a in node.names):
            raise ValueError(f"`import {node.names[0].name}`: write it as `from ... import`")
        if isinstance(node, ast.ImportFrom) and node.level == 0 and module_file(node.module or ""):
            found.append(node)
    return found


def closure(entries: list[str]) -> dict[str, Path]:
    """Every module the entries need, through our packages: module name -> file."""
    files: dict[str, Path] = {}
    todo = list(entries)
    while todo:
        module = todo.pop()
        if module in files:
            continue
        files[module] = module_file(module)
        for node in own_imports(ast.parse(files[module].read_text(encoding="utf-8"))):
            source, _, modules = imported_modules(node)
            todo += ([source] if source else []) + [f"{node.module}.{a.name}" for a in modules]
    return files


def relative_import(node: ast.ImportFrom) -> list[str]:
    """The statements that replace one import: the same names, from the flat files."""
    source, names, modules = imported_modules(node)
    lines = []
    if source:
        lines.append(f"from .{flat_name(source)} import {', '.join(map(alias_text, names))}")
    for alias in modules:
        lines.append(f"from . import {alias_text(alias)}")
        lines.append(f"from .{alias.name} import __name__ as _{alias.name}_file  # (transformers)")
    return lines


def alias_text(alias: ast.alias) -> str:
    return alias.name + (f" as {alias.asname}" if alias.asname else "")


def relative_source(path: Path) -> str:
    """The text of `path` with each of its imports of our modules made relative."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for node in sorted(own_imports(ast.parse("\n".join(lines))), key=lambda n: -n.lineno):
        indent = " " * node.col_offset
        new = [indent + line for line in relative_import(node)]
        lines[node.lineno - 1 : node.end_lineno] = new
    origin = path.relative_to(ROOT).as_posix()
    header = f"# {origin}, copied by `leviathan export --format hf` with its imports made relative"
    return "\n".join([header, *lines]) + "\n"


def write_sources(folder: Path, entries: list[str]) -> list[str]:
    """Write the entries and every module they need into `folder`; return the file names."""
    files = closure(entries)
    names = [f"{flat_name(m)}.py" for m in files]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f"modules that would share a file in the export: {', '.join(clash)}")
    for module, path in files.items():
        (folder / f"{flat_name(module)}.py").write_text(relative_source(path), encoding="utf-8")
    return sorted(names)
