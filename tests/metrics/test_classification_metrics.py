"""Pooled AUC and log loss against scikit-learn and hand-worked values."""

import math

import numpy as np
import pytest
import sklearn.metrics

from recsys.metrics.classification import auc_score, log_loss, log_losses
from recsys.metrics.ranking import MetricInputError


def test_auc_matches_sklearn_with_many_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 5000)
    scores = rng.integers(0, 20, 5000) / 20 + labels * 0.1
    assert auc_score(labels, scores) == pytest.approx(sklearn.metrics.roc_auc_score(labels, scores), abs=1e-12)


def test_auc_hand_worked():
    # Positives 0.8 and 0.4 against negatives 0.4 and 0.1: 1 + 1 + 0.5 + 1 of 4 pairs.
    assert auc_score([1, 0, 1, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(3.5 / 4)


def test_log_loss_matches_sklearn_away_from_the_clip():
    rng = np.random.default_rng(1)
    probs = rng.uniform(0.01, 0.99, 2000)
    labels = (rng.random(2000) < probs).astype(int)
    assert log_loss(labels, probs) == pytest.approx(sklearn.metrics.log_loss(labels, probs), abs=1e-12)


def test_log_loss_clips_certain_mistakes():
    # A click predicted at probability 0 costs -log(1e-7), not infinity.
    assert log_losses([1, 0], [0.0, 1.0]).tolist() == pytest.approx([-math.log(1e-7)] * 2, rel=1e-9)
    assert log_loss([1, 0], [1.0, 0.0]) == pytest.approx(-math.log(1 - 1e-7), rel=1e-6)
    assert log_loss([1], [0.01], eps=0.1) == pytest.approx(-math.log(0.1))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: auc_score([1, 1, 1], [0.1, 0.2, 0.3]), "pooled AUC is undefined: 3 clicked and 0 non-clicked"),
        (lambda: auc_score([1, 0], [0.1]), r"y_score has shape \(1,\), expected \(2,\)"),
        (lambda: log_loss([1, 0], [0.5, 1.5]), "y_prob holds 1.5, expected probabilities in \\[0, 1\\]"),
        (lambda: log_loss([1, 0], [0.5, -0.25]), "y_prob holds -0.25, expected probabilities in \\[0, 1\\]"),
        (lambda: log_loss([], []), "log loss is undefined for no candidates"),
        (lambda: log_loss([1, 3], [0.5, 0.5]), "y_true holds 3, expected labels 0 or 1"),
        (lambda: log_loss([1], [0.5], eps=0.5), "eps is 0.5, expected 0 < eps < 0.5"),
    ],
)
def test_bad_input_is_rejected(call, message):
    with pytest.raises(MetricInputError, match=message):
        call()
