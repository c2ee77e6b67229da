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


def test_the_large_world_writer_writes_files_that_ingest_without_a_bad_line(tmp_path: Path):
    # Its memory figures (docs/model.md, "At eight times that size") rest on a world of
    # bench_ingest's kind: every line good, every article once per impression, a click in each.
    import sys

    from recsys.store.database import open_store
    from recsys.store.ingest import ingest
    from recsys.store.stats import store_stats

    sys.path.insert(0, str(BENCHMARKS[0].parent))
    from write_large_world import write_large_world

    counts = write_large_world(tmp_path / "world", num_news=300, num_users=50, num_impressions=400, mean_candidates=20,
                               seed=1)
    lines = (tmp_path / "world" / "behaviors.tsv").read_text().splitlines()
    items = [line.split("\t")[4].split() for line in lines]
    assert len(lines) == counts["impressions"] == 400 and sum(map(len, items)) == counts["impression_items"]
    assert all(len({i[:-2] for i in row}) == len(row) and any(i.endswith("-1") for i in row) for row in items)
    engine = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        report = ingest(engine, news_path=tmp_path / "world" / "news.tsv",
                        behaviors_path=tmp_path / "world" / "behaviors.tsv", quarantine_dir=tmp_path / "q")
        assert (report.num_bad_rows, report.news, report.impressions) == (0, 300, 400)
        assert store_stats(engine)["impressions"] == 400
    finally:
        engine.dispose()
