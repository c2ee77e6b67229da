"""How often a scored behaviors file has shown each article before each impression.

An article published after the store's last ingest has no popularity in the store: the side
features read nothing for it. The file being scored does show it, and how often (and for how
long) a publisher has shown an article says how hard it pushes it, which is what top MIND
solutions counted in the test file. Only shows are read, never labels, and only shows strictly
before an impression's time, so no impression reads itself or a later one (docs/model.md,
"Exposure in the scored file").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Item rows go in the high bits of a packed key, seconds since 1970 in the low 32 (until 2106).
_SECONDS_BITS = 32
_SECONDS_MASK = (1 << _SECONDS_BITS) - 1
_EPOCH = np.datetime64("1970-01-01T00:00:00", "s")


@dataclass(frozen=True)
class FileShows:
    """Every counted show of a scored file, packed ``item row << 32 | seconds since 1970`` and
    sorted: 8 bytes a show.

    Attributes:
        keys: (s,) int64 sorted packed keys (``pack``).
    """

    keys: np.ndarray

    @staticmethod
    def pack(items: np.ndarray, times: np.ndarray) -> np.ndarray:
        """(s,) int64 packed keys, unsorted, of shows of ``items`` (s,) non-negative item rows at
        ``times`` (s,) datetime64.

        Raises:
            ValueError: lengths differ, a negative item row, or a time that is missing or
                outside 1970-2106 (the seconds must fit 32 bits).
        """
        items = np.asarray(items, dtype=np.int64)
        times = np.asarray(times, dtype="datetime64[s]")
        if items.shape != times.shape or items.ndim != 1:
            raise ValueError(f"items {items.shape} and times {times.shape} must be two arrays of one length")
        if not len(items):
            return np.empty(0, dtype=np.int64)
        if items.min() < 0:
            raise ValueError(f"item row {int(items.min())} is negative")
        if np.isnat(times).any():
            raise ValueError("a show has no time (NaT)")
        seconds = (times - _EPOCH).astype(np.int64)
        if seconds.min() < 0 or seconds.max() > _SECONDS_MASK:
            bad = times[(seconds < 0) | (seconds > _SECONDS_MASK)][0]
            raise ValueError(f"show time {bad} is outside 1970-01-01 .. 2106-02-07, the times 32 bits of seconds hold")
        return (items << _SECONDS_BITS) | seconds

    @classmethod
    def from_events(cls, items: np.ndarray, times: np.ndarray) -> "FileShows":
        """Shows of ``items`` at ``times`` (as ``pack``)."""
        return cls(np.sort(cls.pack(items, times)))

    @classmethod
    def from_packed(cls, parts: list[np.ndarray]) -> "FileShows":
        """Shows from ``pack``'s keys of several parts (sorted here, in place)."""
        keys = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        keys.sort()
        return cls(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def earlier(self, items: np.ndarray, times: np.ndarray, *,
                window_hours: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """For each (article, time) pair: how often the file showed the article strictly before
        ``time`` and the hours since the first of those shows.

        Args:
            items: (c,) item rows.
            times: (c,) datetime64 times of the impressions they were shown in.
            window_hours: count only the shows in ``[time - window_hours, time)`` (the hours are
                then since the first of those); None: every earlier show.

        Returns:
            counts: (c,) int64 earlier shows; hours: (c,) float64 hours since the first of them,
            0 where there is none.
        """
        if window_hours is not None and not window_hours > 0:  # also NaN
            raise ValueError(f"window_hours is {window_hours}, expected a number of hours above 0 (or None: every show)")
        items = np.asarray(items, dtype=np.int64)
        times = np.asarray(times, dtype="datetime64[s]")
        counts = np.zeros(len(items), dtype=np.int64)
        hours = np.zeros(len(items), dtype=np.float64)
        if not len(self.keys) or not len(items):
            return counts, hours
        seconds = (times - _EPOCH).astype(np.int64)
        # Clipped so that a packed key stays in its item's range (a time past 2106 counts every show).
        since = 0 if window_hours is None else seconds - int(round(window_hours * 3600))
        start = np.searchsorted(self.keys, (items << _SECONDS_BITS) + np.clip(since, 0, _SECONDS_MASK + 1), side="left")
        stop = np.searchsorted(self.keys, (items << _SECONDS_BITS) + np.clip(seconds, 0, _SECONDS_MASK + 1), side="left")
        counts = np.where(seconds > 0, stop - start, 0).astype(np.int64)
        has = counts > 0
        first = self.keys[start[has]] & _SECONDS_MASK
        hours[has] = (seconds[has] - first) / 3600.0
        return counts, hours
