"""Reliability curves and ECE against scikit-learn's calibration_curve and hand-worked values."""

import numpy as np
import pytest
from sklearn.calibration import calibration_curve

from recsys.metrics.calibration import expected_calibration_error, reliability_curve
from recsys.metrics.ranking import MetricInputError


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_curve_matches_sklearn(strategy):
    rng = np.random.default_rng(0)
    probs = rng.beta(1, 15, 20000)
    probs[:50] = np.round(probs[:50], 1)  # values on bin edges
    labels = (rng.random(20000) < probs * 1.3).astype(int)
    curve = reliability_curve(labels, probs, num_bins=10, strategy=strategy)
    prob_true, prob_pred = calibration_curve(labels, probs, n_bins=10, strategy=strategy)
    filled = curve.counts > 0
    np.testing.assert_allclose(curve.fraction_positive[filled], prob_true, atol=1e-12)
    np.testing.assert_allclose(curve.mean_predicted[filled], prob_pred, atol=1e-12)
    assert curve.counts.sum() == 20000


def test_quantile_bins_hold_equal_counts():
    probs = np.arange(1000) / 1000
    curve = reliability_curve(np.zeros(1000, int), probs, num_bins=4, strategy="quantile")
    assert curve.counts.tolist() == [250, 250, 250, 250]


def test_ece_hand_worked():
    # Bin [0, 0.5]: predictions 0.2, 0.4 (mean 0.3), one click (rate 0.5): gap 0.2 over 2 of 4.
    # Bin (0.5, 1]: predictions 0.6, 1.0 (mean 0.8), two clicks (rate 1.0): gap 0.2 over 2 of 4.
    labels, probs = [0, 1, 1, 1], [0.2, 0.4, 0.6, 1.0]
    assert expected_calibration_error(labels, probs, num_bins=2) == pytest.approx(0.2)
    bins = reliability_curve(labels, probs, num_bins=2).bins()
    assert bins[0] == {"lower": 0.0, "upper": 0.5, "count": 2, "mean_predicted": pytest.approx(0.3), "fraction_positive": 0.5}
    assert expected_calibration_error([0, 1], [0.0, 1.0], num_bins=10) == 0.0


def test_ece_adds_gaps_of_opposite_sign():
    # Bin [0, 0.5]: predictions 0.2, 0.4 (mean 0.3), no click: over-confident by 0.3.
    # Bin (0.5, 1]: predictions 0.6, 0.8 (mean 0.7), two clicks: under-confident by 0.3.
    # Each gap counts in full (|gap|), so they do not cancel: 2/4 * 0.3 + 2/4 * 0.3 = 0.3.
    assert expected_calibration_error([0, 0, 1, 1], [0.2, 0.4, 0.6, 0.8], num_bins=2) == pytest.approx(0.3)


def test_empty_bins_are_reported_as_none():
    bins = reliability_curve([0, 1], [0.05, 0.95], num_bins=4).bins()
    assert [b["count"] for b in bins] == [1, 0, 0, 1]
    assert bins[1]["mean_predicted"] is None and bins[1]["fraction_positive"] is None


def test_equal_predictions_make_one_quantile_bin():
    curve = reliability_curve([0, 1, 0], [0.3, 0.3, 0.3], num_bins=5, strategy="quantile")
    assert curve.counts.tolist() == [3]
    assert curve.expected_calibration_error() == pytest.approx(abs(1 / 3 - 0.3))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: reliability_curve([0, 1], [0.1, 1.2]), r"y_prob holds 1.2, expected probabilities in \[0, 1\]"),
        (lambda: reliability_curve([], []), "undefined for no candidates"),
        (lambda: reliability_curve([0, 1], [0.1, 0.2], num_bins=0), "num_bins is 0, expected an integer >= 1"),
        (lambda: reliability_curve([0, 1], [0.1, 0.2], strategy="kmeans"), "strategy is 'kmeans', expected one of"),
        (lambda: expected_calibration_error([0, 2], [0.1, 0.2]), "y_true holds 2"),
    ],
)
def test_bad_input_is_rejected(call, message):
    with pytest.raises(MetricInputError, match=message):
        call()
