"""The machine-wide lock of the Ray tests (one module, imported as ``tests.ray_lock`` by the
conftest and by test modules alike, so that its re-entrancy count is one count)."""

from __future__ import annotations

import fcntl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_ray_lock_depth = 0


@contextmanager
def ray_tests_lock() -> Iterator[None]:
    """The machine-wide lock of the Ray tests; re-entrant within a process (a module's Ray instance
    holds it from its start, and each of its tests takes it again: a second flock on another open
    file would wait for the first for ever)."""
    global _ray_lock_depth
    if _ray_lock_depth:
        _ray_lock_depth += 1
        try:
            yield
        finally:
            _ray_lock_depth -= 1
        return
    with open(Path(tempfile.gettempdir()) / "recsys-tests-ray.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        _ray_lock_depth = 1
        try:
            yield
        finally:
            _ray_lock_depth = 0
