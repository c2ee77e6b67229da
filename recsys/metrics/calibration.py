"""Calibration of predicted click probabilities: reliability curve and expected calibration error.

Bins follow ``sklearn.calibration.calibration_curve``: with ``strategy="uniform"`` the edges
are ``linspace(0, 1, num_bins + 1)``; with ``strategy="quantile"`` they are quantiles of the
predictions (repeated edges merged, so there may be fewer bins), which suits click rates of a
few percent, where uniform bins put nearly everything in the first bin. A prediction ``p``
falls in bin ``searchsorted(inner_edges, p, side="left")``: bins are closed on the right, and
the first is also closed on the left.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recsys.metrics.classification import check_probabilities
from recsys.metrics.ranking import MetricInputError, _as_labels

STRATEGIES = ("uniform", "quantile")


@dataclass(frozen=True)
class ReliabilityCurve:
    """Observed click rate against mean predicted probability, per probability bin.

    Attributes:
        edges: (num_bins + 1,) bin edges, ascending.
        counts: (num_bins,) int64 candidates per bin.
        mean_predicted: (num_bins,) mean predicted probability per bin, NaN where empty.
        fraction_positive: (num_bins,) share of clicked candidates per bin, NaN where empty.
    """

    edges: np.ndarray
    counts: np.ndarray
    mean_predicted: np.ndarray
    fraction_positive: np.ndarray

    def bins(self) -> list[dict]:
        """One plain dict per bin (JSON-ready; None where a bin is empty)."""
        rows = []
        for b, count in enumerate(self.counts):
            empty = count == 0
            rows.append(
                {
                    "lower": float(self.edges[b]),
                    "upper": float(self.edges[b + 1]),
                    "count": int(count),
                    "mean_predicted": None if empty else float(self.mean_predicted[b]),
                    "fraction_positive": None if empty else float(self.fraction_positive[b]),
                }
            )
        return rows

    def expected_calibration_error(self) -> float:
        """Count-weighted mean of |fraction_positive - mean_predicted| over non-empty bins."""
        filled = self.counts > 0
        gaps = np.abs(self.fraction_positive[filled] - self.mean_predicted[filled])
        return float(np.sum(self.counts[filled] * gaps) / self.counts.sum())


def bin_edges(y_prob: np.ndarray, *, num_bins: int, strategy: str) -> np.ndarray:
    """Bin edges for ``reliability_curve`` (see the module docstring)."""
    if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise MetricInputError(f"num_bins is {num_bins!r}, expected an integer >= 1")
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, num_bins + 1)
    if strategy == "quantile":
        return np.unique(np.quantile(y_prob, np.linspace(0.0, 1.0, num_bins + 1)))
    raise MetricInputError(f"strategy is {strategy!r}, expected one of {list(STRATEGIES)}")


def reliability_curve(y_true, y_prob, *, num_bins: int = 10, strategy: str = "uniform") -> ReliabilityCurve:
    """Reliability curve of predicted click probabilities.

    Args:
        y_true: (c,) 0/1 labels.
        y_prob: (c,) predicted probabilities in [0, 1].
        num_bins: number of bins (quantile bins may merge into fewer).
        strategy: ``"uniform"`` (equal width on [0, 1]) or ``"quantile"`` (equal counts).

    Returns:
        The per-bin counts, mean predicted probability and observed click rate.

    Raises:
        MetricInputError: empty input, bad shapes or values, num_bins < 1, or an unknown strategy.
    """
    labels = _as_labels(y_true)
    probs = check_probabilities(y_prob, len(labels))
    if len(labels) == 0:
        raise MetricInputError("reliability curve is undefined for no candidates, expected at least one")
    edges = bin_edges(probs, num_bins=num_bins, strategy=strategy)
    num = max(len(edges) - 1, 1)
    if len(edges) == 1:  # every prediction equal: one bin of zero width
        edges = np.r_[edges, edges]
    which = np.searchsorted(edges[1:-1], probs, side="left")
    counts = np.bincount(which, minlength=num)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_predicted = np.bincount(which, weights=probs, minlength=num) / counts
        fraction_positive = np.bincount(which, weights=labels, minlength=num) / counts
    return ReliabilityCurve(edges=edges, counts=counts.astype(np.int64),
                            mean_predicted=mean_predicted, fraction_positive=fraction_positive)


def expected_calibration_error(y_true, y_prob, *, num_bins: int = 10, strategy: str = "uniform") -> float:
    """Expected calibration error: ``sum_b (n_b / n) |click rate_b - mean probability_b|``.

    Args:
        y_true: (c,) 0/1 labels.
        y_prob: (c,) predicted probabilities in [0, 1].
        num_bins: number of bins.
        strategy: ``"uniform"`` or ``"quantile"`` binning.

    Returns:
        A value in [0, 1]; 0 for perfectly calibrated bins.

    Raises:
        MetricInputError: as ``reliability_curve``.
    """
    return reliability_curve(y_true, y_prob, num_bins=num_bins, strategy=strategy).expected_calibration_error()
