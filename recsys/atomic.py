"""Files that appear whole or not at all: write a temporary sibling, fsync, rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one step.

    If the block raises, the temporary file is removed and ``path`` is left as it was.

    Args:
        path: the final file.
        mode: "w" (text; ``encoding`` defaults to UTF-8) or "wb".
        **kwargs: passed to ``open`` (e.g. ``newline``).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are meant to be shared
        with os.fdopen(fd, mode, **kwargs) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
