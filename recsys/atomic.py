"""Files that appear whole or not at all: write a temporary sibling, fsync, rename."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from recsys.errors import DiskError, disk_error, disk_errors

log = logging.getLogger(__name__)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one step.

    If the block raises, the temporary file is removed and ``path`` is left as it was.

    Args:
        path: the final file.
        mode: "w" (text; ``encoding`` defaults to UTF-8) or "wb".
        **kwargs: passed to ``open`` (e.g. ``newline``).

    Raises:
        DiskError: the disk is full or read-only (the message names ``path``, not the
            temporary file); an error about another file the block wrote is raised as it is.
    """
    path = Path(path)
    with disk_errors("write", path):  # mkstemp's error names the temporary file, which the user never sees
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    try:
        os.chmod(tmp, umasked(0o666))  # mkstemp creates 0600; as open() would, the umask decides
        with os.fdopen(fd, mode, **kwargs) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        error = _disk_error(path, exc, tmp)
        if error is None:
            raise
        raise error from exc


def umasked(mode: int) -> int:
    """``mode`` less the process's umask: what open() (0o666) or mkdir() (0o777) give a new file.

    For files made by mkstemp or folders by mkdtemp (always 0600 and 0700), which are renamed
    into place: a model version made 0700 could not be read by the data scientists' accounts
    however the job's umask was set.
    """
    try:  # Linux 4.7+ says it without changing it (os.umask would, for a moment, in every thread)
        with open("/proc/self/status", encoding="ascii") as status:
            mask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
    return mode & ~mask


def _disk_error(path: Path, exc: BaseException, tmp: str | Path) -> DiskError | None:
    """A DiskError naming ``path`` when ``exc`` is a full or read-only disk and names no file or
    one of ours (the block may write other files); else None."""
    if isinstance(exc, OSError) and exc.filename not in (None, str(tmp), str(path)):
        return None
    return disk_error("write", path, exc)


def age_seconds(path: Path) -> float:
    """Seconds since ``path`` itself last changed (not the files in it). A rename changes the
    ctime, so a folder just moved aside is young whatever its files' age.

    Raises:
        FileNotFoundError: ``path`` is gone.
    """
    st = path.lstat()
    return time.time() - max(st.st_mtime, st.st_ctime)


def remove_stale(paths: Iterable[Path], older_than: float, *, why: str) -> list[Path]:
    """Remove the files and folders of ``paths`` unchanged for ``older_than`` seconds.

    For what killed writers leave behind: a writer that is still running keeps its temporary
    file's mtime fresh, so only leftovers grow old. A symlink is removed, not followed. One
    already gone (another process cleaned it) is skipped; any other failure is logged, never
    raised, so that housekeeping cannot fail the command that does it.

    Args:
        paths: candidates (files, folders or links).
        older_than: seconds since the path last changed (``age_seconds``).
        why: what the paths are, for the log line ("left by a save that did not finish").

    Returns:
        The paths removed.
    """
    removed = []
    for path in paths:
        try:
            if age_seconds(path) < older_than:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        except OSError as err:
            log.warning("could not remove %s, %s (%s)", path, why, err)
            continue
        log.info("removed %s, %s", path, why)
        removed.append(path)
    return removed
