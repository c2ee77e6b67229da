"""The file-exposure calibration: the served logit combined with what a scored file says of
each candidate's exposure before its impression.

For a candidate the store never showed ("fresh": its popularity features read nothing), the
file's earlier shows of the article and the hours since its first; for the others, their
earlier shows in the file. A logistic regression on the validation window, read as a later
file is served (the store ending where the window begins), fits one weight each
(``fit_exposure_calibration``); ``recsys predict`` and ``recsys evaluate`` apply it to
impressions after the store's end. The nightly job cannot: tomorrow's shows are unknown
tonight (docs/model.md, "Exposure in the scored file").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from recsys.models.linear_blend import LinearBlend

# The design matrix's columns, in order.
FEATURES = ("logit", "fresh_log_shows", "fresh_log_hours", "fresh", "seen_log_shows")
# Rows a fit reads at most (a random sample of impressions beyond): five weights need far fewer.
MAX_FIT_ROWS = 2_000_000


def exposure_design(logits: np.ndarray, counts: np.ndarray, hours: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    """(c, 5) float64 design matrix (``FEATURES``) of c candidates.

    Args:
        logits: (c,) served logits (uncalibrated, the content prior included).
        counts: (c,) earlier shows of each candidate's article in the file.
        hours: (c,) hours since the first of those shows (0 without one).
        fresh: (c,) bool, the store never showed the article before its end.
    """
    f = np.asarray(fresh, dtype=np.float64)
    shows = np.log1p(np.asarray(counts, dtype=np.float64))
    return np.column_stack([np.asarray(logits, dtype=np.float64), f * shows,
                            f * np.log1p(np.asarray(hours, dtype=np.float64)), f, (1.0 - f) * shows])


def fresh_as_of(first_seen: np.ndarray, end: np.datetime64 | None) -> tuple[np.ndarray, np.ndarray]:
    """Which articles a store ending at ``end`` never showed or listed, and their first-seen
    times as the calibration reads them: the same for the fit (``end`` the validation window's
    start) and for scoring (the store's end).

    Args:
        first_seen: (n,) datetime64 first appearance of each article (NaT: never seen).
        end: the store's end; None: a store without one, where only never-seen articles are fresh.

    Returns:
        fresh: (n,) bool; first_seen: (n,) the same times with the fresh ones NaT (age 0 to the
        model: their hours in the file are the calibration's own column, not to count twice).
    """
    fresh = np.isnat(first_seen) if end is None else np.isnat(first_seen) | (first_seen >= end)
    return fresh, np.where(fresh, np.datetime64("NaT"), first_seen).astype(first_seen.dtype)


@dataclass(frozen=True)
class ExposureCalibration(LinearBlend):
    """``logit' = intercept + weights . exposure_design(...)``, fitted on validation; ``weights``
    (5,) one per ``FEATURES`` column.

    Attributes:
        window_hours: the span of the validation window it was fitted on. A scored file's shows
            are counted over at most that many hours before each impression, so that a file
            longer than the fit's window (a validation day against a two-day file) is read
            within the range the weights were fitted on. None (a bundle of before): every
            earlier show of the file.
    """

    window_hours: float | None = None

    FEATURES: ClassVar[tuple[str, ...]] = FEATURES
    LABEL: ClassVar[str] = "file exposure calibration"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_hours is not None and not (math.isfinite(self.window_hours) and self.window_hours > 0):
            raise ValueError(f"{self.LABEL}: window_hours is {self.window_hours!r}, expected a finite number of hours above 0")

    def to_dict(self) -> dict:
        out = super().to_dict()
        if self.window_hours is not None:
            out["window_hours"] = self.window_hours
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ExposureCalibration":
        """Raises ValueError for other columns, weights that are not finite numbers or a bad
        window. A bundle of before the window reads every earlier show."""
        blend = super().from_dict({k: v for k, v in d.items() if k != "window_hours"})
        try:
            window = None if d.get("window_hours") is None else float(d["window_hours"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{cls.LABEL}: window_hours is {d['window_hours']!r}, expected a number of hours") from e
        return cls(blend.weights, blend.intercept, window)

    def logits(self, logits: np.ndarray, counts: np.ndarray, hours: np.ndarray, fresh: np.ndarray) -> np.ndarray:
        """(c,) float64 calibrated logits (arguments as ``exposure_design``)."""
        return self.apply(exposure_design(logits, counts, hours, fresh))


def fit_exposure_calibration(
    logits: np.ndarray, counts: np.ndarray, hours: np.ndarray, fresh: np.ndarray, labels: np.ndarray,
    owner: np.ndarray, *, seed: int = 0, window_hours: float | None = None,
) -> ExposureCalibration:
    """A logistic regression of ``labels`` (c,) 0/1 on ``exposure_design`` (other arguments as
    there). ``owner`` (c,) gives each candidate's impression: beyond ``MAX_FIT_ROWS``
    candidates a random sample of whole impressions (seeded) is read. ``window_hours``: the span
    of the window the counts were read in, kept with the weights (``ExposureCalibration``).

    Raises:
        ValueError: the labels are not both 0 and 1.
    """
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels)
    keep = ExposureCalibration.fit_rows(labels, owner, MAX_FIT_ROWS, seed)
    x = exposure_design(logits[keep], counts[keep], hours[keep], fresh[keep])
    model = LogisticRegression(C=1.0, max_iter=1000).fit(x, labels[keep])
    return ExposureCalibration(tuple(float(w) for w in model.coef_[0]), float(model.intercept_[0]), window_hours)
