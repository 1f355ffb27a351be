"""The code layout of docs/design.md ("Code layout") is the code's: every import of a module of
this project is one the table there allows, and every module is in the table.

The table is read from the document, so the two cannot drift apart: a new import across
modules fails here until the document says it is allowed (and why the layering permits it)."""
from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: folder -> the package name it installs as
PACKAGES = {"snapshotter": "snapshotter", "backends": "snapshotter_backends"}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts[0] = PACKAGES[parts[0]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for folder in PACKAGES for p in sorted((ROOT / folder).rglob("*.py"))}


def layout() -> dict[str, set[str]]:
    """group -> the groups it may import, from the table under "## Code layout"."""
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    section = text.split("\n## Code layout\n", 1)[1].split("\n## ", 1)[0]
    table: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        group = cells[0].strip("`")
        table[group] = set(re.findall(r"`([\w.]+)`", cells[2]))
    return table


def group_of(module: str, groups: set[str]) -> str | None:
    """The longest group naming ``module`` or a package holding it."""
    best = None
    for g in groups:
        if (module == g or module.startswith(g + ".")) and (best is None or len(g) > len(best)):
            best = g
    return best


def imported(module: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The project's modules ``module`` imports, at the top or inside a function."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base in PACKAGES.values() and all(a.name == "__version__" for a in node.names):
                continue  # the version string, which every layer may quote
            names = [f"{base}.{a.name}" for a in node.names] if base in known else [base]
            names = [n if n in known else base for n in names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def test_every_module_is_in_the_layout():
    groups = set(layout())
    assert groups, "docs/design.md has no '## Code layout' table"
    missing = sorted(m for m in modules() if group_of(m, groups) is None)
    assert not missing, f"modules not in docs/design.md's Code layout table: {missing}"


def test_every_import_is_one_the_layout_allows():
    table = layout()
    groups = set(table)
    mods = modules()
    wrong = []
    for module, path in mods.items():
        mine = group_of(module, groups)
        for other in imported(module, path, set(mods)):
            theirs = group_of(other, groups)
            if theirs is None or theirs == mine or (mine and mine.startswith(theirs + ".")):
                continue
            if theirs not in table.get(mine, set()):
                wrong.append(f"{module} imports {other} ({mine} -> {theirs})")
    assert not wrong, "imports docs/design.md's Code layout does not allow:\n" + "\n".join(sorted(wrong))


def test_the_core_names_no_backend():
    """The core reaches backends only through the registry (entry point strings)."""
    mods = modules()
    for module, path in mods.items():
        if module.startswith("snapshotter."):
            assert not any(o.startswith("snapshotter_backends") for o in imported(module, path, set(mods))), module
