"""The benchmark scripts are run by hand, not imported by any test: check they still parse and
that every name they import from recsys (at the top or inside a function) still exists, so a
refactor that moves a function cannot leave a documented benchmark command broken."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


def _recsys_imports(tree: ast.AST) -> list[tuple[str, str | None, int]]:
    """(module, name or None for `import module`, line) of every recsys import in the tree."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "recsys":
            found += [(node.module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name.split(".")[0] == "recsys"]
    return found


def test_there_are_benchmarks():
    assert len(BENCHMARKS) >= 10


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_parses_and_its_recsys_imports_resolve(script: Path):
    tree = ast.parse(script.read_text(), filename=str(script))  # SyntaxError names file and line
    missing = []
    for module, name, line in _recsys_imports(tree):
        try:
            imported = importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"{script.name}:{line}: import {module}: {exc}")
            continue
        if name is not None and name != "*" and not hasattr(imported, name):
            try:  # `from package import submodule`
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{script.name}:{line}: {module} has no {name}")
    assert not missing, "\n".join(missing)
