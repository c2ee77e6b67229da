"""Interruptions for tests: a SIGTERM whose exception the code it landed in swallowed, and a
Ctrl-C after a given number of a progress bar's advances."""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager

import pytest


def swallowed_sigterm() -> None:
    """SIGTERM to this process, its exception swallowed as Cython's module set-up in `import
    ray` does ("Exception ignored in: <module 'collections.abc'>"). Call it inside
    ``recsys.interrupts.sigterm_unwinds()``."""
    from recsys.interrupts import Terminated

    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at the next bytecode
        pytest.fail("the SIGTERM handler did not run")
    except Terminated:
        pass


def stop_after_shards(count: int):
    """A progress factory (``recsys.progress.progress``'s signature) whose ``count``-th advance
    (a shard written, in the nightly job) is a Ctrl-C, as a scheduler's SIGINT mid-run."""
    @contextmanager
    def bar(description, total):
        seen = []

        def advance(n):
            seen.append(n)
            if len(seen) == count:
                raise KeyboardInterrupt

        yield advance

    return bar
