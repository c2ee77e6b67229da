"""TensorFlow's C++ start-up chatter, kept out of stderr.

Importing TensorFlow (2.16 and later) writes six lines to the process's stderr before absl
logging is set up ("All log messages before absl::InitializeLog() ...", oneDNN, "Could not find
cuda drivers"), and its first look at the devices an ERROR line ("failed call to cuInit") on
every machine without a GPU. ``TF_CPP_MIN_LOG_LEVEL`` does not reach them. A nightly run starts
TensorFlow in two or three processes, so cron mailed a dozen such lines every night and a
``grep ERROR`` on the log fired on every clean run.

``install()`` (called when the ``recsys`` package is imported, so in every process: the command,
its helper, local and Ray workers) makes the first ``import tensorflow`` of the process run with
file descriptor 2 sent to a temporary file, and looks at the devices there too. Afterwards the
lines that are this chatter go to the log at DEBUG (``--verbose`` shows them, logger
``recsys.tensorflow``); every other byte written meanwhile (another thread's log line, a real
error) is written back to stderr as it was.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("recsys.tensorflow")

# absl's own line, absl-format lines (``I0000 00:00:1796637744.226342   21476 port.cc:153] ...``)
# of level I or W; of level E only the CUDA probe's, so a real error still reaches stderr.
_CHATTER = re.compile(
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|[IW]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] .*"
    rb"|E\d{4} [\d:.]+ +\d+ cuda_\w+\.cc:\d+\] failed call to cuInit: .*"
    # The second line of cpu_feature_guard's message (shown when TF_CPP_MIN_LOG_LEVEL is unset).
    rb"|To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags\."
)


def replay(captured: bytes) -> None:
    """Log the chatter lines of ``captured`` at DEBUG and write every other line to fd 2 unchanged."""
    other = []
    for line in captured.splitlines(keepends=True):
        if _CHATTER.fullmatch(line.rstrip(b"\r\n")):
            log.debug("%s", line.rstrip(b"\r\n").decode("utf-8", "replace"))
        else:
            other.append(line)
    if other:
        os.write(2, b"".join(other))


@contextmanager
def stderr_captured() -> Iterator[None]:
    """Send file descriptor 2 to a temporary file for the block, then ``replay`` what it got.

    Without a descriptor 2 (cron's ``2>&-``) or a temporary file, the block runs as it is.
    """
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        sink = tempfile.TemporaryFile()
    except OSError:
        os.close(saved)
        yield
        return
    with sink:
        _flush_stderr()
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            _flush_stderr()  # what Python wrote meanwhile belongs to the file, not the next owner of fd 2
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            replay(sink.read())


def _flush_stderr() -> None:
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
    except (OSError, ValueError):  # closed or gone
        pass


class _QuietLoader(importlib.abc.Loader):
    """Runs the real loader of ``tensorflow`` with stderr captured, then probes the devices."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        # The module keeps its real loader: nothing after the import should see this one.
        module.__loader__ = self._loader
        module.__spec__.loader = self._loader
        with stderr_captured():
            self._loader.exec_module(module)
            # Lists the devices (the CUDA probe and its cuInit line) without starting the
            # runtime, so thread counts can still be set afterwards (recsys.threads). A failure
            # here is TensorFlow's to report at its first real use, not the import's.
            try:
                module.config.list_physical_devices()
            except Exception as exc:  # noqa: BLE001
                log.debug("listing TensorFlow's devices failed: %s", exc)


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` with the other finders and wraps its loader; once per process."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        _remove()
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def _remove() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _QuietFinder)]


def install() -> None:
    """Quiet the first ``import tensorflow`` of this process (a no-op once it is imported)."""
    if "tensorflow" in sys.modules or any(isinstance(finder, _QuietFinder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietFinder())
