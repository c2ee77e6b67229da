"""Progress for long steps: a bar on a terminal, plain log lines otherwise (cron, Airflow)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# The log line of every recsys process (the CLI, and helper processes it spawns), its time in
# UTC as every time the store, the run log and the file names hold: the machine's zone, unnamed,
# made a cron log disagree with the runs it reported.
LOG_FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s"
LOG_TIME = "%Y-%m-%dT%H:%M:%S"

log = logging.getLogger("recsys")


def configure_logging(level: int) -> None:
    """The log set-up of every recsys process: ``LOG_FORMAT`` lines on stderr at ``level``."""
    formatter = logging.Formatter(LOG_FORMAT, LOG_TIME)
    formatter.converter = time.gmtime
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler])  # as before, a no-op where logging is set up
    # Which SIMD build FAISS loaded: six INFO lines a process, none of them news.
    logging.getLogger("faiss.loader").setLevel(logging.NOTSET if level <= logging.DEBUG else logging.WARNING)

Advance = Callable[[int], None]


@contextmanager
def progress(description: str, total: int | None = None, *, interval_s: float = 10.0,
             summary: bool = True) -> Iterator[Advance]:
    """Yield ``advance(n)``; shows a rich bar on a TTY, else a log line every ``interval_s``.

    Args:
        description: what is being done ("encoding articles").
        total: number of units if known.
        interval_s: seconds between log lines when not on a terminal.
        summary: end with a "done" line (off: the bar is removed at the end, for a step
            whose caller logs its own summary, such as a training epoch).
    """
    if sys.stderr is not None and sys.stderr.isatty():  # None: cron's `2>&-` closed it
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
        # On stderr, where the test above looked: rich's default console is stdout, which holds the
        # command's JSON (`recsys ingest > report.json` from a terminal began with the bar); and
        # stdout left alone (rich would send what is printed there to the terminal meanwhile).
        with Progress(*columns, transient=not summary, console=Console(stderr=True), redirect_stdout=False) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)
        return
    done = 0
    start = last = time.monotonic()

    def advance(n: int = 1) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last >= interval_s:
            last = now
            of = f"/{total}" if total else ""
            log.info("%s: %d%s (%.0f s)", description, done, of, now - start)

    yield advance
    if summary:
        of = f"/{total}" if total else ""
        log.info("%s: done %d%s in %.1f s", description, done, of, time.monotonic() - start)
