import errno
import os
import time
from pathlib import Path

import pytest

from recsys import atomic
from recsys.atomic import atomic_open
from recsys.errors import DiskError


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


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_full_or_read_only_disk_is_a_disk_error_naming_the_file(tmp_path: Path, monkeypatch, code):
    # An OSError without a file (a write, fsync) was an internal error (exit 2) without a path.
    target = tmp_path / "out.txt"
    target.write_text("old")

    def full(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(atomic.os, "fsync", full)
    words = os.strerror(code)
    with pytest.raises(DiskError, match=f"^cannot write {target}: {words[0].lower()}{words[1:]}$"):
        with atomic_open(target) as f:
            f.write("new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_a_full_disk_met_by_another_file_the_block_writes_is_raised_as_it_is(tmp_path: Path):
    other = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "elsewhere.bin"))
    with pytest.raises(OSError) as info:
        with atomic_open(tmp_path / "out.txt") as f:
            f.write("new")
            raise other
    assert info.value is other
    assert list(tmp_path.iterdir()) == []



@pytest.fixture
def two_hours_later(monkeypatch) -> float:
    """``remove_stale`` sees the clock two hours ahead (ctime cannot be set back); returns that time."""
    later = time.time() + 7200
    monkeypatch.setattr(atomic.time, "time", lambda: later)
    return later


def test_remove_stale_removes_only_what_is_old_enough(tmp_path: Path, two_hours_later):
    old_file, young_file = tmp_path / ".a.tmp", tmp_path / ".b.tmp"
    old_dir = tmp_path / ".tmp-v1"
    (old_dir / "model").mkdir(parents=True)
    (old_dir / "model" / "w.keras").write_bytes(b"x")
    old_file.write_text("half")
    young_file.write_text("still writing")
    os.utime(young_file, (two_hours_later - 10, two_hours_later - 10))  # written 10 s before
    removed = atomic.remove_stale([old_file, young_file, old_dir, tmp_path / "gone"], 3600, why="test")
    assert sorted(p.name for p in removed) == [".a.tmp", ".tmp-v1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.tmp"]


def test_remove_stale_removes_a_link_not_its_target(tmp_path: Path, two_hours_later):
    target = tmp_path / "real"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    link = tmp_path / ".old-link"
    link.symlink_to(target)
    assert atomic.remove_stale([link], 3600, why="test") == [link]
    assert not link.exists() and not link.is_symlink()
    assert (target / "keep.txt").read_text() == "keep"


def test_remove_stale_logs_a_failure_instead_of_raising(tmp_path: Path, two_hours_later, monkeypatch, caplog):
    stuck = tmp_path / ".stuck.tmp"
    stuck.write_text("x")

    def refuse(self, *args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(Path, "unlink", refuse)
    with caplog.at_level("WARNING", logger="recsys.atomic"):
        assert atomic.remove_stale([stuck], 3600, why="test") == []
    assert "could not remove" in caplog.text and "read-only file system" in caplog.text
    assert stuck.exists()


@pytest.fixture
def umask():
    """Set the process's umask for a test (``umask(0o002)``), restored after it."""
    before = os.umask(0o022)
    os.umask(before)
    yield os.umask
    os.umask(before)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)], ids=["022", "002", "077"])
def test_a_file_gets_the_mode_open_would_give_under_the_umask(tmp_path: Path, umask, mask, mode):
    # It was 0644 whatever the umask: wider than a 077 job asked for, narrower than a 002 group's.
    umask(mask)
    with atomic_open(tmp_path / "out.txt") as f:
        f.write("x")
    (tmp_path / "plain.txt").write_text("x")
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == mode == (tmp_path / "plain.txt").stat().st_mode & 0o777


def test_umasked_reads_the_umask_without_changing_it(umask, monkeypatch):
    umask(0o027)
    with monkeypatch.context() as patched:  # read from /proc/self/status, not set and set back
        patched.setattr(os, "umask", lambda mask: pytest.fail("os.umask called"))
        assert atomic.umasked(0o777) == 0o750 and atomic.umasked(0o666) == 0o640
    assert os.umask(0o027) == 0o027
