"""The package layout: dependencies point one way, alexpipe -> trainer -> pipeline -> shards,
and inside pipeline the offline build and the online loaders never import each other.

Every import counts, including those inside functions (the lazy ones), read
from the source with ``ast`` rather than by importing anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("alexpipe", "trainer", "pipeline", "shards")
# What each part may import of ours (itself always).
ALLOWED = {
    "alexpipe": {"trainer", "pipeline.build", "pipeline.load", "shards"},
    "trainer": {"pipeline.load", "shards"},
    "pipeline.build": {"shards"},
    "pipeline.load": {"shards"},
    "pipeline": set(),
    "shards": set(),
}


def _part(module: str) -> str | None:
    """The part of the layout a dotted module name belongs to, or None if not ours."""
    top = module.split(".")[0]
    if top not in PACKAGES:
        return None
    if top == "pipeline":
        second = module.split(".")[1:2]
        return f"pipeline.{second[0]}" if second and second[0] in ("build", "load") else "pipeline"
    return top


def _imports(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports, at any depth."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (use absolute ones)"
            if node.module == "pipeline":  # from pipeline import build
                names.update(f"pipeline.{alias.name}" for alias in node.names)
            elif node.module:
                names.add(node.module)
    return names


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _source_files() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def test_every_part_has_source_files():
    parts = {_part(_module_name(path)) for path in _source_files()}
    assert {"alexpipe", "trainer", "pipeline.build", "pipeline.load", "shards"} <= parts


def test_dependencies_point_one_way():
    wrong = []
    for path in _source_files():
        own = _part(_module_name(path))
        for imported in _imports(path):
            target = _part(imported)
            if target is not None and target != own and target not in ALLOWED[own]:
                wrong.append(f"{path.relative_to(ROOT)} ({own}) imports {imported} ({target})")
    assert wrong == []


def test_the_checker_sees_a_wrong_import(tmp_path):
    """The test above would catch an import against the direction (and a lazy one)."""
    source = tmp_path / "module.py"
    source.write_text("def late():\n    from pipeline.load.loader import create_loader\n")
    assert "pipeline.load.loader" in _imports(source)
    assert _part("pipeline.load.loader") not in ALLOWED["pipeline.build"]
    assert _part("trainer.run") not in ALLOWED["pipeline.load"]
