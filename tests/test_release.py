"""The code's fingerprint in the nightly's plan: it changes with the sources, not with caches."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import recsys
from recsys import source_fingerprint


def _copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(Path(recsys.__file__).parent, tmp_path / "recsys",
                                ignore=shutil.ignore_patterns("__pycache__", "assets")))


def test_the_fingerprint_follows_the_sources_only(tmp_path):
    tree = _copy(tmp_path)
    before = source_fingerprint(tree)
    assert len(before) == 64 and before == source_fingerprint(tree)
    (tree / "__pycache__").mkdir(exist_ok=True)
    (tree / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"cache")
    (tree / "notes.txt").write_text("not code")
    assert source_fingerprint(tree) == before
    scorer = tree / "models" / "scorer.py"
    scorer.write_text(scorer.read_text() + "\n# one more line\n")
    changed = source_fingerprint(tree)
    assert changed != before
    scorer.rename(tree / "models" / "scorer2.py")  # same bytes under another name
    assert source_fingerprint(tree) not in (before, changed)


def test_the_fingerprint_against_a_hand_computed_one(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.py").write_bytes(b"x = 1\n")
    (tmp_path / "b" / "c.py").write_bytes(b"y = 2\n")
    want = hashlib.sha256()
    for name, data in (("a.py", b"x = 1\n"), ("b/c.py", b"y = 2\n")):
        want.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    assert source_fingerprint(tmp_path) == want.hexdigest()


def test_hidden_names_and_dangling_links_are_not_read(tmp_path):
    # An editor's lock file (.#cli.py, a link to nothing) made the nightly exit 2 after its ingest.
    (tmp_path / "a.py").write_bytes(b"x = 1\n")
    before = source_fingerprint(tmp_path)
    (tmp_path / ".#a.py").symlink_to("user@host.1234:1700000000")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "b.py").write_bytes(b"y = 2\n")
    (tmp_path / "gone.py").symlink_to(tmp_path / "missing.py")
    assert source_fingerprint(tmp_path) == before == hashlib.sha256(
        b"a.py\0" + hashlib.sha256(b"x = 1\n").digest()).hexdigest()


def test_release_names_the_version_and_this_tree():
    assert recsys.release() == f"{recsys.__version__}+{source_fingerprint(Path(recsys.__file__).parent)[:16]}"


def test_a_tree_without_sources_is_read_by_its_compiled_files(tmp_path):
    # compileall, then the .py files removed: the hash of no file at all would be every release's.
    (tmp_path / "__pycache__").mkdir()
    compiled = tmp_path / "__pycache__" / "a.cpython-311.pyc"
    compiled.write_bytes(b"one")
    before = source_fingerprint(tmp_path)
    assert before != hashlib.sha256().hexdigest()
    compiled.write_bytes(b"two")
    assert source_fingerprint(tmp_path) != before


def test_a_tree_without_sources_passes_over_hidden_names_and_dangling_links_too(tmp_path):
    # The .pyc fallback read an editor's lock file (a link to nothing) and failed, as the .py
    # path once did.
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"one")
    want = hashlib.sha256(b"__pycache__/a.cpython-311.pyc\0" + hashlib.sha256(b"one").digest()).hexdigest()
    assert source_fingerprint(tmp_path) == want
    (tmp_path / ".#a.cpython-311.pyc").symlink_to("user@host.1234:1700000000")
    (tmp_path / ".hidden" / "__pycache__").mkdir(parents=True)
    (tmp_path / ".hidden" / "__pycache__" / "b.cpython-311.pyc").write_bytes(b"two")
    (tmp_path / "__pycache__" / "gone.cpython-311.pyc").symlink_to(tmp_path / "missing.pyc")
    assert source_fingerprint(tmp_path) == want
