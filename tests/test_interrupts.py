"""recsys.interrupts.signals_deferred: SIGTERM and Ctrl-C held for a short step, then delivered."""

from __future__ import annotations

import os
import signal
import time

import pytest

from recsys.interrupts import Terminated, signals_deferred, sigterm_unwinds, terminated


def _send(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # Python runs the handler at its next check: here, not after the statement


def test_a_signal_in_the_block_arrives_after_it_and_the_handlers_are_back():
    done = []
    with sigterm_unwinds():
        with pytest.raises(Terminated):
            with signals_deferred():
                _send(signal.SIGTERM)
                done.append("the step")
        assert terminated() and done == ["the step"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            _send(signal.SIGINT)
            done.append("again")
    assert done == ["the step", "again"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_signal_arrives_at_once_and_sigterm_is_the_one_said():
    # A stuck step is still stoppable; Ctrl-C then SIGTERM said "interrupted", not "terminated".
    done = []
    with sigterm_unwinds():
        with pytest.raises(Terminated):
            with signals_deferred():
                _send(signal.SIGINT)
                done.append("after the first")
                _send(signal.SIGTERM)
                done.append("after the second")
        assert terminated() and done == ["after the first"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_signal_stays_ignored():
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with signals_deferred():
            _send(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_ignored_ctrl_c_is_no_second_signal():
    # Under nohup SIGINT is ignored: counted anyway, a single SIGTERM after it cut the step short.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    done = []
    try:
        with sigterm_unwinds(), pytest.raises(Terminated):
            with signals_deferred():
                _send(signal.SIGINT)
                _send(signal.SIGTERM)
                done.append("the step")
        assert done == ["the step"] and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
