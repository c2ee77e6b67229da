"""Side features of a (candidate, time) pair: recent popularity and article age.

Popularity at time ``t`` counts the clicks and shows of the article in ``[t - window, t)`` of an
``InteractionLog``: strictly before ``t``, so a training sample never sees its own click or
anything later. Age is ``t - first_seen`` (NaT, i.e. never seen before, counts as brand new).
Training and serving call the same ``SideFeatures.compute``; the normalisation statistics are
fitted on the training samples and saved in the model bundle's config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from recsys.data.interactions import InteractionLog

SIDE_FEATURE_NAMES = ("log_clicks", "log_shows", "log_age_hours")
# Below this spread (the features are log1p counts and hours) a feature counts as constant.
_MIN_STD = 1e-3
# (item, time) pairs computed at a time: ``raw_side_features`` holds about 110 bytes per pair
# while it works, so a MIND-large training window (80M pairs) at once would need ~9 GB.
PAIR_CHUNK = 1 << 20
_log = logging.getLogger(__name__)


def raw_side_features(
    item_rows: np.ndarray,
    times: np.ndarray,
    log: InteractionLog,
    first_seen: np.ndarray,
    *,
    window_hours: float,
    age_times: np.ndarray | None = None,
) -> np.ndarray:
    """Unnormalised side features, one row per (item, time) pair.

    Args:
        item_rows: (p,) int item rows into the feature table the log and ``first_seen`` index.
        times: (p,) datetime64 times at which the items are shown.
        log: labelled shows and clicks; only events strictly before each time count.
        first_seen: (n,) datetime64 first appearance (or publication) of every item, NaT if
            unknown.
        window_hours: popularity look-back window.
        age_times: (p,) datetime64 times at which the age is read, if not ``times`` (popularity
            read at the end of the logged data, age at the show's own time).

    Returns:
        (p, 3) float64: log1p(clicks in window), log1p(shows in window), log1p(age in hours).

    Raises:
        ValueError: an item row outside ``first_seen`` or the log, or a non-positive window.
    """
    if not window_hours > 0:
        raise ValueError(f"window_hours is {window_hours}, expected a positive number of hours")
    check_side_inputs(item_rows, log, first_seen, times=times, age_times=age_times)
    item_rows = np.asarray(item_rows, dtype=np.int64)
    times = np.asarray(times).astype("datetime64[s]")
    age_times = times if age_times is None else np.asarray(age_times).astype("datetime64[s]")
    window = np.timedelta64(int(round(window_hours * 3600)), "s")
    clicks, shows = log.window_counts(item_rows, times, window=window)
    seen = np.asarray(first_seen).astype("datetime64[s]")[item_rows]
    age_seconds = (age_times - seen).astype(np.int64).astype(np.float64)
    age_hours = np.where(np.isnat(seen), 0.0, np.maximum(age_seconds, 0.0) / 3600.0)
    return np.stack([np.log1p(clicks), np.log1p(shows), np.log1p(age_hours)], axis=1)


def check_side_inputs(item_rows, log: InteractionLog, first_seen: np.ndarray, *, times=None, age_times=None) -> None:
    """Checks what ``raw_side_features`` reads, for callers that compute it in chunks.

    Raises ValueError for arrays of different lengths or an item row outside the log or ``first_seen``."""
    if times is not None and len(item_rows) != len(times):
        raise ValueError(f"side features got {len(item_rows)} item rows but {len(times)} times")
    if times is not None and age_times is not None and len(age_times) != len(times):
        raise ValueError(f"side features got {len(times)} times but {len(age_times)} age times")
    item_rows = np.asarray(item_rows)
    limit = min(len(first_seen), log.num_items)
    if len(item_rows) and (item_rows.min() < 0 or item_rows.max() >= limit):
        bad = np.flatnonzero((item_rows < 0) | (item_rows >= limit))[0]
        raise ValueError(
            f"side features: item row {item_rows[bad]} at position {bad} is outside the log "
            f"({log.num_items} items) or first_seen ({len(first_seen)} items)"
        )


@dataclass(frozen=True)
class SideFeatures:
    """How side features are computed and normalised; saved in the bundle's config.

    Attributes:
        window_hours: popularity look-back window in hours.
        mean / std: per-feature normalisation statistics (from the training samples).
    """

    window_hours: float = 24.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if not self.window_hours > 0:
            raise ValueError(f"SideFeatures.window_hours is {self.window_hours}, expected > 0")
        n = len(SIDE_FEATURE_NAMES)
        if len(self.mean) != n or len(self.std) != n:
            raise ValueError(f"SideFeatures mean/std have {len(self.mean)}/{len(self.std)} entries, expected {n}")
        if min(self.std) <= 0:
            raise ValueError(f"SideFeatures.std is {self.std}, expected positive values")

    @property
    def num_features(self) -> int:
        return len(SIDE_FEATURE_NAMES)

    def fit(self, item_rows: np.ndarray, times: np.ndarray, log: InteractionLog, first_seen: np.ndarray) -> "SideFeatures":
        """A copy whose normalisation statistics are fitted on these (training) samples."""
        check_side_inputs(item_rows, log, first_seen, times=times)  # before the chunks: positions count from 0 here
        count, mean, m2 = 0, np.zeros(len(SIDE_FEATURE_NAMES)), np.zeros(len(SIDE_FEATURE_NAMES))
        for lo in range(0, len(item_rows), PAIR_CHUNK):
            raw = raw_side_features(item_rows[lo : lo + PAIR_CHUNK], times[lo : lo + PAIR_CHUNK], log, first_seen,
                                    window_hours=self.window_hours)
            # Chan et al.'s pairwise update: the chunks' means and squared deviations combine exactly.
            n, chunk_mean = len(raw), raw.mean(axis=0)
            delta = chunk_mean - mean
            m2 += ((raw - chunk_mean) ** 2).sum(axis=0) + delta**2 * count * n / (count + n)
            mean += delta * n / (count + n)
            count += n
        if count == 0:
            return self
        std = np.sqrt(m2 / count)
        # A feature constant on the training samples (a first window where nothing had been
        # shown before) has no scale to learn: dividing by a tiny std would turn later values
        # into ~1e6 and saturate the scorer. It is only centred, as scikit-learn's
        # StandardScaler does with a zero variance.
        constant = std < _MIN_STD
        if constant.any():
            names = [name for name, c in zip(SIDE_FEATURE_NAMES, constant) if c]
            _log.warning("side features %s are constant on the %d training samples: centred, not scaled", names, count)
        std = np.where(constant, 1.0, std)
        return SideFeatures(self.window_hours, tuple(float(v) for v in mean), tuple(float(v) for v in std))

    def compute(
        self, item_rows: np.ndarray, times: np.ndarray, log: InteractionLog, first_seen: np.ndarray,
        *, age_times: np.ndarray | None = None,
    ) -> np.ndarray:
        """Normalised side features.

        Args: see ``raw_side_features``.

        Returns:
            (p, num_features) float32.
        """
        check_side_inputs(item_rows, log, first_seen, times=times, age_times=age_times)  # before the chunks: positions count from 0 here
        out = np.empty((len(item_rows), self.num_features), dtype=np.float32)
        mean, std = np.asarray(self.mean), np.asarray(self.std)
        for lo in range(0, len(item_rows), PAIR_CHUNK):
            part = slice(lo, lo + PAIR_CHUNK)
            raw = raw_side_features(item_rows[part], times[part], log, first_seen, window_hours=self.window_hours,
                                    age_times=None if age_times is None else age_times[part])
            out[part] = (raw - mean) / std
        return out

    def to_dict(self) -> dict:
        return {"names": list(SIDE_FEATURE_NAMES), "window_hours": self.window_hours,
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "SideFeatures":
        names = tuple(d.get("names", SIDE_FEATURE_NAMES))
        if names != SIDE_FEATURE_NAMES:
            raise ValueError(f"side features {list(names)} saved, this code computes {list(SIDE_FEATURE_NAMES)}")
        return cls(float(d["window_hours"]), tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))
