"""``pipelines.nightly.run_apart``: the nightly job's helper process (the index refresh runs in it)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from recsys.errors import RecsysError, SchemaError
from recsys.pipelines.nightly import HelperTraceback, run_apart
from recsys.ranking.engines import WorkerDiedError


class TwoPartError(RecsysError):
    """A RecsysError whose constructor does not take its message: it cannot be unpickled as is."""

    def __init__(self, what: str, why: str):
        super().__init__(f"{what}: {why}")


def raise_two_part_error(value):
    raise TwoPartError("behaviors.tsv line 3", value)


def raise_schema_error(value):
    raise SchemaError("behaviors.tsv", 3, "time", value, "a time")


def raise_plain(value):
    raise KeyError(value)


def test_the_result_and_the_errors_come_back_to_the_job():
    assert run_apart(pow, 2, 10, died="x") == 1024
    with pytest.raises(ValueError, match="invalid literal"):
        run_apart(int, "x", died="x")
    with pytest.raises(RecsysError, match=r"^TwoPartError: behaviors.tsv line 3: soon$"):
        run_apart(raise_two_part_error, "soon", died="x")
    # SchemaError pickles (rebuilt from its fields): it comes back as itself.
    with pytest.raises(SchemaError, match=r"^behaviors.tsv line 3: field 'time' has 'soon', expected a time$") as raised:
        run_apart(raise_schema_error, "soon", died="x")
    assert (raised.value.line, raised.value.field) == (3, "time")
    with pytest.raises(KeyError, match="k"):
        run_apart(raise_plain, "k", died="x")


def test_the_helpers_traceback_is_the_cause_of_the_error():
    with pytest.raises(KeyError) as raised:
        run_apart(raise_plain, "k", died="x")
    cause = raised.value.__cause__
    assert isinstance(cause, HelperTraceback)
    assert 'in raise_plain\n    raise KeyError(value)' in str(cause)


def test_a_result_that_cannot_be_sent_back_is_an_error_not_a_death():
    with pytest.raises(RuntimeError, match="the helper's result cannot be sent back: TypeError: cannot pickle"):
        run_apart(threading.Lock, died="x")


def test_a_helper_that_dies_stops_the_job_with_its_message():
    # A helper that exited (a module that failed to import after an upgrade) was said to be
    # "killed by a signal, often the out-of-memory killer".
    with pytest.raises(WorkerDiedError, match=r"^the helper died \(exit code 9: its error, if it wrote one, is above on "
                                              r"stderr\)$"):
        run_apart(os._exit, 9, died="the helper died")
    with pytest.raises(WorkerDiedError, match=r"^the helper died \(killed by SIGKILL, often the out-of-memory killer\)$"):
        run_apart(_kill_self, died="the helper died")


def _kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def test_ctrl_c_in_the_job_stops_the_helper_at_once():
    # Python raises KeyboardInterrupt only if SIGINT was not ignored when it started, and a
    # shell without job control starts background commands with SIGINT ignored: install the
    # default handler so that the test does not depend on how pytest was launched.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupt_the_job_while_the_helper_runs()
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_the_job_while_the_helper_runs():
    # SIGINT to the job's process (as `kill -INT <pid>`); the helper has started by then.
    threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_apart(time.sleep, 120, died="x")
    assert time.monotonic() - t0 < 30  # not the helper's two minutes


def raise_disk_error(path):
    import errno

    from recsys.errors import disk_error

    raise disk_error("save the index", path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))


def test_a_full_disk_in_the_helper_comes_back_as_a_disk_error_naming_the_path():
    # The nightly's index refresh runs in the helper: its save on a full disk must stay exit 1.
    from recsys.errors import DiskError

    with pytest.raises(DiskError, match=r"^cannot save the index /ws/index: no space left on device$"):
        run_apart(raise_disk_error, "/ws/index", died="x")
