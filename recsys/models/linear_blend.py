"""A logistic blend fitted on the validation window: ``intercept + weights . design``.

The form of the two fits ``recsys train`` makes on top of the networks, each with its own
design matrix: the reader's category affinity (``recsys.models.affinity``) and the file-exposure
calibration (``recsys.models.exposure``). Their weights are stored in the bundle's config.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np


@dataclass(frozen=True)
class LinearBlend:
    """``intercept + weights . design``; subclasses name the design's columns (``FEATURES``)
    and themselves in messages (``LABEL``).

    Attributes:
        weights: one per ``FEATURES`` column.
        intercept: the constant.
    """

    weights: tuple[float, ...]
    intercept: float

    FEATURES: ClassVar[tuple[str, ...]] = ()
    LABEL: ClassVar[str] = "linear blend"

    def __post_init__(self) -> None:
        n = len(self.features)
        if len(self.weights) != n or not all(math.isfinite(w) for w in (*self.weights, self.intercept)):
            raise ValueError(f"{self.LABEL}: weights {list(self.weights)} and intercept {self.intercept!r}, "
                             f"expected {n} finite weights ({', '.join(self.features)}) and a finite intercept")

    @property
    def features(self) -> tuple[str, ...]:
        """The design's columns: ``FEATURES``, unless a subclass's depend on its fields."""
        return self.FEATURES

    def apply(self, design: np.ndarray) -> np.ndarray:
        """(c,) float64 blended logits of a (c, len(FEATURES)) design matrix."""
        return design @ np.asarray(self.weights) + self.intercept

    def to_dict(self) -> dict:
        return {"features": list(self.features), "weights": list(self.weights), "intercept": self.intercept}

    @classmethod
    def fit_rows(cls, labels: np.ndarray, owner: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
        """(c,) bool: the candidates a fit reads (``whole_impressions_sample``).

        Raises:
            ValueError: their labels are not both 0 and 1.
        """
        keep = whole_impressions_sample(owner, max_rows, seed)
        if len(np.unique(np.asarray(labels)[keep])) != 2:
            raise ValueError(f"the {cls.LABEL} needs clicks and non-clicks")
        return keep

    @classmethod
    def from_dict(cls, d: dict):
        """Raises ValueError for columns other than ``FEATURES`` or weights that are not finite numbers."""
        if list(d.get("features", cls.FEATURES)) != list(cls.FEATURES):
            raise ValueError(f"{cls.LABEL} over {d['features']}, expected {list(cls.FEATURES)}")
        return cls(tuple(float(w) for w in d["weights"]), float(d["intercept"]))


def sigmoid(z: np.ndarray) -> np.ndarray:
    """(c,) float64 probabilities of logits ``z``, without ``exp``'s overflow."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def whole_impressions_sample(owner: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """(c,) bool: every candidate, or beyond ``max_rows`` a seeded random sample of whole
    impressions (``owner`` (c,) each candidate's impression) holding about ``max_rows``."""
    owner = np.asarray(owner)
    if len(owner) <= max_rows:
        return np.ones(len(owner), dtype=bool)
    impressions = np.unique(owner)
    chosen = np.random.default_rng(seed).random(len(impressions)) < max_rows / len(owner)
    return np.isin(owner, impressions[chosen])
