"""TensorFlow's C++ start-up chatter, kept out of stderr.

Importing TensorFlow writes lines to the process's stderr before its log level is read
(2.17 and later: "All log messages before absl::InitializeLog() ...", oneDNN, "Could not find
cuda drivers"; ``TF_CPP_MIN_LOG_LEVEL`` does not reach them), and on a machine without a CUDA
driver its first look at the devices writes an ERROR line ("failed call to cuInit"). A nightly
run starts TensorFlow in two or three processes, so cron mailed a dozen such lines every night
and a ``grep ERROR`` on the log fired on every clean run.

``install()`` (called when the ``recsys`` package is imported, so in every process: the command,
its helper, local and Ray workers) makes the first ``import tensorflow`` of the process run with
file descriptor 2 sent through a filter process, which drops those lines and passes every other
byte on as it comes (another thread's log line, a real error, the last words of a crash: the
filter outlives the process that feeds it). Where TensorFlow can find no GPU (no CUDA driver,
or every GPU hidden by ``CUDA_VISIBLE_DEVICES``) the import also lists the devices there, which
is where the cuInit line comes from; elsewhere nothing about CUDA is held back. With debug
logging on (``--verbose``) nothing is filtered.
"""

from __future__ import annotations

import ctypes
import importlib.abc
import importlib.util
import logging
import os
import select
import subprocess
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("recsys.tensorflow")

# Run by the filter process (``python -I -S -c``): argv[1] is "1" to drop the cuInit line too,
# argv[2] the descriptor it says it started on.
# Two line formats: absl's (TensorFlow 2.17+: ``I0000 00:00:1796637744.226342   21476 port.cc:153] ...``)
# and TSL's (2.16: ``2024-05-07 19:48:22.210161: I tensorflow/core/util/port.cc:113] ...``).
FILTER = r"""
import os, re, sys
os.write(int(sys.argv[2]), b"1")  # started: the parent sends fd 2 here only now
os.close(int(sys.argv[2]))

def absl(levels, where=rb"[\w./-]+"):
    return b"[" + levels + rb"]\d{4} [\d:.]+ +\d+ " + where + rb":\d+\] "

def tsl(levels, where=rb"[\w./-]+"):
    return rb"\d{4}-\d\d-\d\d [\d:.]+: [" + levels + b"] " + where + rb":\d+\] "

patterns = [
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    absl(b"IW") + rb".*",
    tsl(b"IW") + rb".*",
    # The second line of cpu_feature_guard's message (when TF_CPP_MIN_LOG_LEVEL is unset).
    rb"To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags\.",
]
if sys.argv[1] == "1":
    cuda = rb"[\w./-]*cuda_\w+\.cc"
    patterns += [absl(b"E", cuda) + rb"failed call to cuInit: .*", tsl(b"E", cuda) + rb"failed call to cuInit: .*"]
chatter = re.compile(b"|".join(b"(?:" + p + b")" for p in patterns))
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    if not chatter.fullmatch(line.rstrip(b"\r\n")):
        out.write(line)
        out.flush()
"""


def cuda_unusable() -> bool:
    """Whether TensorFlow can find no GPU here: no CUDA driver library, or every GPU hidden
    (``CUDA_VISIBLE_DEVICES`` empty or -1, as CPU batch jobs on GPU hosts set it)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return True
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return True
    return False


# Filters whose input outlives the block (a child process started during the import holds the
# pipe): kept, so that they are not collected while they run.
_RUNNING: list[subprocess.Popen] = []
_STARTED_WITHIN_S = 10.0


@contextmanager
def stderr_filtered(*, drop_cuinit: bool) -> Iterator[None]:
    """Send file descriptor 2 through the ``FILTER`` process for the block.

    The block runs unfiltered when debug logging is on, when there is no descriptor 2 (cron's
    ``2>&-``), or when the filter does not start (an embedded Python whose ``sys.executable`` is
    no interpreter). The filter runs in a session of its own, so that a signal to the job's
    process group (a scheduler stopping it) leaves it to pass on the job's last words.
    """
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    filter_process, saved = _start_filter(drop_cuinit)
    if filter_process is None:
        yield
        return
    try:
        _flush_stderr()
        os.dup2(filter_process.stdin.fileno(), 2)
        yield
    finally:
        _flush_stderr()  # what Python wrote meanwhile goes through the filter, not to the next owner of fd 2
        os.dup2(saved, 2)
        os.close(saved)
        filter_process.stdin.close()  # the filter's end of input: it passes on the rest and exits
        try:
            filter_process.wait(timeout=2)
        except subprocess.TimeoutExpired:  # a child of the block holds the pipe open: it ends with it
            _RUNNING.append(filter_process)


def _start_filter(drop_cuinit: bool) -> tuple[subprocess.Popen | None, int]:
    """The filter process and a copy of the real fd 2, or (None, -1) when it did not start."""
    try:
        saved = os.dup(2)
    except OSError:
        return None, -1
    ready, told = os.pipe()
    try:
        filter_process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", FILTER, "1" if drop_cuinit else "0", str(told)],
            stdin=subprocess.PIPE, stdout=saved, stderr=saved, pass_fds=(told,), start_new_session=True,
        )
    except (OSError, ValueError):  # no interpreter to start
        os.close(saved)
        return None, -1
    finally:
        os.close(told)
    try:
        started = select.select([ready], [], [], _STARTED_WITHIN_S)[0] and os.read(ready, 1) == b"1"
    finally:
        os.close(ready)
    if not started:  # not Python, or it failed: its own words, if any, went to the real stderr
        filter_process.stdin.close()
        filter_process.kill()
        filter_process.wait()
        os.close(saved)
        return None, -1
    return filter_process, saved


def _flush_stderr() -> None:
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
    except (OSError, ValueError):  # closed or gone
        pass


class _QuietLoader(importlib.abc.Loader):
    """Runs the real loader of ``tensorflow`` through the filter, then probes the devices."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        _remove()
        # The module keeps its real loader: nothing after the import should see this one.
        module.__loader__ = self._loader
        module.__spec__.loader = self._loader
        no_gpu = cuda_unusable()
        with stderr_filtered(drop_cuinit=no_gpu):
            self._loader.exec_module(module)
            if no_gpu:
                # The cuInit line comes from the first look at the devices; listing them does not
                # start the runtime, so thread counts can still be set afterwards (recsys.threads).
                # A failure here is TensorFlow's to report at its first real use, not the import's.
                try:
                    module.config.list_physical_devices()
                except Exception as exc:  # noqa: BLE001
                    log.debug("listing TensorFlow's devices failed: %s", exc)


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` with the other finders and wraps its loader, until it is imported."""

    def __init__(self) -> None:
        self._finding = threading.local()  # per thread: another thread's look must not hide this one

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow" or getattr(self._finding, "on", False):
            return None
        self._finding.on = True  # importlib.util.find_spec below asks this finder again
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._finding.on = False
        if spec is not None and spec.loader is not None and not isinstance(spec.loader, _QuietLoader):
            spec.loader = _QuietLoader(spec.loader)
        return spec


def _remove() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _QuietFinder)]


def install() -> None:
    """Quiet the first ``import tensorflow`` of this process (a no-op once it is imported)."""
    if "tensorflow" in sys.modules or any(isinstance(finder, _QuietFinder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietFinder())
