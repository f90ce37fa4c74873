"""The layering of the package, checked from its imports: nothing imports upward.

CLI/API → driver → worker tasks → per-window stages → deblenders and backends → pure kernels
→ geometry and schema; the part store alone knows the on-disk layout of a run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "survey_engine"


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """survey_engine modules imported by ``path`` (anywhere in it, lazily or not)."""
    mod = _module(path).split(".")
    pkg = mod if path.name == "__init__.py" else mod[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names = [f"{target}.{a.name}" for a in node.names] if not node.module else [target]
            out.update(names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("survey_engine")}


MODULES = {_module(p): _imports(p) for p in PKG.rglob("*.py")}


def _importers(prefix: str) -> set[str]:
    return {m for m, deps in MODULES.items() if any(d == prefix or d.startswith(prefix + ".") for d in deps)}


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("survey_engine.kernels", ("unet", "deblend", "stages", "backends", "tasks", "driver",
                                   "store", "config", "cli", "mosaic", "parallel")),
        ("survey_engine.unet", ("deblend", "stages", "backends", "tasks", "driver", "store", "cli")),
        ("survey_engine.classify", ("deblend", "stages", "backends", "tasks", "driver", "store", "cli",
                                    "unet", "evaluate")),
        ("survey_engine.deblend", ("stages", "backends", "tasks", "driver", "store", "cli")),
        ("survey_engine.backends", ("stages", "tasks", "driver", "store", "cli", "deblend")),
        ("survey_engine.stages", ("tasks", "driver", "store", "cli")),
        ("survey_engine.tasks", ("driver", "cli")),
        ("survey_engine.store", ("tasks", "driver", "stages", "cli")),
        ("survey_engine.schema", ("catalog", "kernels", "stages", "driver", "tasks")),
        ("survey_engine.catalog", ("kernels", "stages", "driver", "tasks", "store")),
    ],
)  # fmt: skip
def test_no_module_imports_upward(layer, forbidden):
    offenders = {
        (m, d) for m, deps in MODULES.items() if m == layer or m.startswith(layer + ".")
        for d in deps if any(d == f"survey_engine.{f}" or d.startswith(f"survey_engine.{f}.")
                             for f in forbidden)
    }  # fmt: skip
    assert not offenders, offenders


def test_only_the_entry_points_import_the_driver():
    assert _importers("survey_engine.driver") <= {"survey_engine", "survey_engine.cli", "survey_engine.bench",
                                                  "survey_engine.survey"}  # the survey driver


def _code_strings(path: Path) -> set[str]:
    """String constants of a module's code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docs = {
        id(n.body[0].value) for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
        and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)
    }  # fmt: skip
    return {n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs}  # fmt: skip


def test_only_the_part_store_knows_the_part_files():
    names = ("labels.bin", "footprints.npz", "pending.json", "background.npz", "run.json", "parts/")
    users = {
        str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
        if any(s == "parts" or any(n in s for n in names) for s in _code_strings(p))
    }  # fmt: skip
    assert users == {"store.py"}, users
