"""Peak resident memory of a benchmark: this process plus every process it started.

Used as ``with PeakRSS() as rss: ...``; afterwards ``rss.peak`` is the largest summed RSS seen
(bytes) and ``rss.peak_driver`` the largest RSS of this process alone.
"""

from __future__ import annotations

import threading

import psutil


class PeakRSS:
    """Samples RSS in a background thread every ``interval_s`` seconds and keeps the peaks."""

    def __init__(self, interval_s: float = 0.1):
        self.interval_s = interval_s
        self.peak = self.peak_driver = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._me = psutil.Process()

    def _sample(self) -> None:
        total = driver = self._me.memory_info().rss
        for child in self._me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:  # a worker that just exited
                pass
        self.peak, self.peak_driver = max(self.peak, total), max(self.peak_driver, driver)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
