"""The application layer: library modules never import ``ptmpi.cli`` (no cycles) and
argparse stays in ``cli``."""

from __future__ import annotations

import ast
from pathlib import Path

import ptmpi

PACKAGE = Path(ptmpi.__file__).parent
ENTRY = {PACKAGE / "cli.py", PACKAGE / "__main__.py"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_library_modules_import_neither_cli_nor_argparse():
    library = [p for p in sorted(PACKAGE.rglob("*.py")) if p not in ENTRY]
    assert len(library) > 30
    offenders = {str(p.relative_to(PACKAGE)): sorted(
        n for n in _imports(p) if n in ("ptmpi.cli", "argparse") or n.startswith("ptmpi.cli."))
        for p in library}
    assert {k: v for k, v in offenders.items() if v} == {}
    # and cli is the one that does use them
    assert "argparse" in _imports(PACKAGE / "cli.py")
