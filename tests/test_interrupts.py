"""recsys.interrupts: SIGTERM and SIGHUP unwound like Ctrl-C; signals_deferred holds them for a short
step, then delivers them; a signal after a command's result keeps the command's exit code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from recsys.interrupts import Terminated, signals_deferred, sigterm_unwinds, terminated, termination_signal


@pytest.fixture(autouse=True)
def _python_default_handlers():
    """Each test starts from the handlers an interactive Python has. A test run started in the
    background of a non-interactive shell (`make test &`, a CI runner's script) inherits SIGINT
    ignored, so Python installs no Ctrl-C handler: the tests of what a handled Ctrl-C does would
    then read an ignored one. Tests of ignored signals set that themselves."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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


def test_sighup_unwinds_like_sigterm_and_is_named():
    # An operator's ssh session dropping during a manual nightly: the process died with the
    # lock held and its run left 'running'.
    before = signal.getsignal(signal.SIGHUP)
    with sigterm_unwinds():
        with pytest.raises(Terminated):
            _send(signal.SIGHUP)
        assert terminated() and termination_signal() == "SIGHUP"
        done = []
        with pytest.raises(Terminated):
            with signals_deferred():
                _send(signal.SIGHUP)
                done.append("the step")
        assert done == ["the step"]
    assert signal.getsignal(signal.SIGHUP) == before and termination_signal() is None


def test_sighup_under_nohup_stays_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with sigterm_unwinds():
            _send(signal.SIGHUP)
            assert not terminated() and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 0), (signal.SIGHUP, 3)])
def test_a_signal_during_the_shutdown_after_the_result_keeps_the_commands_exit_code(signum, code):
    """train printed its result, then TensorFlow's shutdown took 1.4 s: a SIGTERM then killed the
    process with the signal's code (-15), and a finished job read as killed. The signal here
    arrives while modules are torn down, after the atexit callbacks, where Python runs no
    handler any more."""
    script = (
        "import os, signal, sys, time\n"
        "from recsys.cli import _exit_on_late_signals\n"
        "class SlowTeardown:\n"
        "    def __del__(self):\n"
        f"        os.kill(os.getpid(), {int(signum)})\n"
        "        time.sleep(1)\n"
        "        os.write(1, b'torn down\\n')\n"
        "slow = SlowTeardown()\n"
        "print('the result')\n"
        f"_exit_on_late_signals({code})\n"
        f"sys.exit({code})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (code, "the result\ntorn down\n")
