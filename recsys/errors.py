"""Project exceptions. Messages name the file, line, field and value, and what was expected."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

# What a write meets on a disk that cannot take it: full, over its quota, mounted read-only.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class RecsysError(Exception):
    """Base class of every error the CLI reports as bad input or bad usage (exit code 1)."""


class ConfigError(RecsysError):
    """A configuration file, flag or environment variable is invalid."""


class SchemaError(RecsysError):
    """An input row does not follow the MIND format.

    Args:
        path: the file being read.
        line: 1-based line number, or None when the error is not tied to a line.
        field: the column name.
        value: the offending value (shortened for the message).
        expected: what the field should have held.
    """

    def __init__(self, path: str, line: int | None, field: str, value: object, expected: str):
        self.path, self.line, self.field, self.value, self.expected = str(path), line, field, value, expected
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        where = f"{self.path} line {line}" if line is not None else self.path
        super().__init__(f"{where}: field '{field}' has {shown}, expected {expected}")

    def __reduce__(self):
        # Rebuilt from its five fields: raised in a worker process (local or Ray), it is pickled
        # back, and the default (its one message argument) failed to unpickle it.
        return type(self), (self.path, self.line, self.field, self.value, self.expected)


class StoreError(RecsysError):
    """The SQL store cannot be reached or is in an unexpected state."""


class ReadOnlyStoreError(StoreError):
    """The store refused a write: a read-only file, user, transaction or server."""


class RunLockedError(StoreError):
    """Another nightly run holds the lock."""


class StoreUnavailableError(StoreError):
    """The store's connection was lost in the middle of a command (the server restarted, the
    backend was killed, the network dropped), or the server could not be reached again: what
    was committed stays, and running the command again is the remedy (a nightly run resumes)."""


class ModelMismatchError(RecsysError):
    """A saved artefact was built with other encoders or dimensions than the ones asked for."""


class NotFoundError(RecsysError):
    """A user, article or model version asked for does not exist."""


class DamagedFileError(RecsysError):
    """A saved artefact (a model bundle's file, a version manifest) is truncated or corrupt."""


class DiskError(RecsysError):
    """A write failed because its disk is full, over quota or read-only (``disk_error``)."""


def disk_errno(exc: BaseException) -> int | None:
    """ENOSPC, EDQUOT or EROFS when ``exc`` says its disk is full or read-only, else None.

    An OSError's errno, or the system's words within the text of a library's error: FAISS raises
    RuntimeError("... write error in <file>: 307155 != 570880 (No space left on device)").
    """
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return exc.errno
    if isinstance(exc, (OSError, RuntimeError)):
        text = str(exc)
        for code in DISK_ERRNOS:
            if os.strerror(code) in text:
                return code
    return None


def disk_problem(code: int) -> str:
    """"no space left on device", "disk quota exceeded" or "read-only file system"."""
    words = os.strerror(code)
    return words[:1].lower() + words[1:]


def disk_error(action: str, path: str | os.PathLike, exc: BaseException) -> DiskError | None:
    """``DiskError("cannot <action> <path>: no space left on device")`` when ``exc`` is a full or
    read-only disk (``disk_errno``), else None: the caller raises it ``from exc``, or ``exc``.

    Args:
        action: what failed, e.g. "save the index" or "write".
        path: the file or folder being written (the one the user knows, not a temporary).
        exc: the error the write raised.
    """
    code = disk_errno(exc)
    if code is None:
        return None
    return DiskError(f"cannot {action} {path}: {disk_problem(code)}")


@contextmanager
def disk_errors(action: str, path: str | os.PathLike) -> Iterator[None]:
    """Raise what the block raises, as ``disk_error(action, path, ...)`` when it is a full or
    read-only disk."""
    try:
        yield
    except Exception as exc:
        error = disk_error(action, path, exc)
        if error is None:
            raise
        raise error from exc
