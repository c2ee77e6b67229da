"""SIGTERM (a scheduler's timeout, ``kill``) and SIGHUP (an operator's ssh session that drops)
unwound like Ctrl-C, and remembered.

The handler raises ``Terminated`` so that the store's lock is released and a nightly run stays
resumable; otherwise a retry on another host would wait for the lock to go stale (15 minutes).
An exception raised from a signal handler can be swallowed by code it lands in: Cython's
module set-up in ``import ray`` reports it as "Exception ignored" and goes on, and the job then
ranked the whole night. Long loops therefore also call ``raise_if_terminated``.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM (or SIGHUP)."""


_terminated: str | None = None  # the name of the signal that arrived


def on_sigterm(signum, frame) -> None:
    global _terminated
    _terminated = signal.Signals(signum).name
    raise Terminated


def terminated() -> bool:
    """Whether a SIGTERM (or SIGHUP) arrived inside the current ``sigterm_unwinds`` block."""
    return _terminated is not None


def termination_signal() -> str | None:
    """The name of the signal that terminated the current ``sigterm_unwinds`` block, if any."""
    return _terminated


def raise_if_terminated() -> None:
    """Raise ``Terminated`` again when a SIGTERM arrived but its exception was swallowed."""
    if _terminated:
        raise Terminated


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` inside the block (handlers can only be set from the main
    thread; elsewhere the process keeps its handler). The previous handler is restored after,
    and a SIGTERM of this block is forgotten: the next command starts afresh."""
    global _terminated
    _terminated = None
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main_thread:
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_sigterm)
        if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:  # nohup's stays ignored
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_sigterm)
    try:
        yield
    finally:
        _terminated = None
        for signum, handler in previous.items():  # None: a handler not set from Python, i.e. the default
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGTERM, SIGHUP and Ctrl-C wait for the end of the block, then arrive (and raise) as usual: for a
    short step that costs far more cut short than finished, such as releasing the store's lock
    (cut short, a retry on another host waited 15 minutes for it to go stale). A second signal
    inside the block arrives at once (the step is stuck, or the operator means it); of several,
    SIGTERM (else SIGHUP) is the one delivered, so the command still says it was terminated.

    Handlers can only be set from the main thread, which is also the only one Python raises them
    in: elsewhere this changes nothing. (Blocking the signals with ``pthread_sigmask`` would not
    do: the kernel hands a process's signal to any thread that does not block it.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous: dict[int, object] = {}
    restored = False

    def restore() -> None:
        nonlocal restored
        if not restored:
            restored = True
            for signum, handler in previous.items():
                signal.signal(signum, _handler_or_default(handler))

    def deliver() -> None:
        signum = next((s for s in (signal.SIGTERM, signal.SIGHUP) if s in arrived), arrived[0])
        _deliver(signum, previous[signum])

    def defer(signum, frame) -> None:
        arrived.append(signum)
        if len(arrived) > 1 and not restored:
            restore()
            deliver()

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        if signal.getsignal(signum) != signal.SIG_IGN:  # ignored stays ignored, and is no second signal
            previous[signum] = signal.signal(signum, defer)
    try:
        yield
    finally:
        if not restored:  # else a second signal was delivered already
            restore()  # first: one that arrives meanwhile is in ``arrived``, one after meets its handler
            if arrived:
                deliver()


def _handler_or_default(handler):
    return signal.SIG_DFL if handler is None else handler  # None: set outside Python, i.e. the default


def _deliver(signum: int, handler) -> None:
    """What ``signum`` would have done under ``handler`` (already put back)."""
    if callable(handler):
        handler(signum, None)
    elif handler in (None, signal.SIG_DFL):
        signal.raise_signal(signum)  # the default action, now that it is back
