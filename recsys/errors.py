"""Project exceptions. Messages name the file, line, field and value, and what was expected."""

from __future__ import annotations


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


class RunLockedError(StoreError):
    """Another nightly run holds the lock."""


class ModelMismatchError(RecsysError):
    """A saved artefact was built with other encoders or dimensions than the ones asked for."""


class NotFoundError(RecsysError):
    """A user, article or model version asked for does not exist."""


class DamagedFileError(RecsysError):
    """A saved artefact (a model bundle's file, a version manifest) is truncated or corrupt."""
