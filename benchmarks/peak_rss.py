"""Peak resident memory of a benchmark: this process plus every process it started.

Used as ``with PeakRSS() as rss: ...``; afterwards ``rss.peak`` is the largest summed RSS seen
(bytes), ``rss.peak_driver`` the largest RSS of this process alone, and ``rss.peak_pss`` the
largest summed PSS (proportional set size: a page shared by n processes counts 1/n in each),
which is what the tree really occupies when workers share libraries or memory maps; summed
RSS counts such pages once per process. PSS is read from /proc/<pid>/smaps_rollup (Linux),
which costs more than RSS, so it is sampled every ``pss_every``-th time only; elsewhere it stays 0.
"""

from __future__ import annotations

import threading

import psutil


class PeakRSS:
    """Samples RSS in a background thread every ``interval_s`` seconds and keeps the peaks."""

    def __init__(self, interval_s: float = 0.1, pss_every: int = 10):
        self.interval_s = interval_s
        self.pss_every = pss_every
        self._samples = 0
        self.peak = self.peak_driver = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._me = psutil.Process()

    def _sample(self) -> None:
        processes = [self._me, *self._me.children(recursive=True)]
        with_pss = self._samples % self.pss_every == 0
        self._samples += 1
        total = pss = 0
        driver = self._me.memory_info().rss
        for process in processes:
            try:
                total += process.memory_info().rss
                if with_pss:
                    pss += getattr(process.memory_full_info(), "pss", 0)
            except psutil.Error:  # a worker that just exited
                pass
        self.peak, self.peak_driver = max(self.peak, total), max(self.peak_driver, driver)
        self.peak_pss = max(self.peak_pss, pss)

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
