from pathlib import Path

import pytest

from recsys.atomic import atomic_open


def test_replaces_whole_file(tmp_path: Path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_open(target) as f:
        f.write("new")
        assert target.read_text() == "old"  # not visible until the block ends
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path: Path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(target, "wb") as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
