"""A SIGTERM whose exception the code it landed in swallowed."""

from __future__ import annotations

import os
import signal
import time

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
