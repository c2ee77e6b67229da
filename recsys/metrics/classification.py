"""Pooled classification metrics over all candidates of all impressions."""

from __future__ import annotations

import numpy as np

from recsys.metrics.ranking import MetricInputError, _as_labels, _as_scores, _midranks, _show

# Probabilities are clipped into [LOG_LOSS_EPS, 1 - LOG_LOSS_EPS] so that a confident miss costs
# about 16 nats instead of infinity (float32 models cannot tell 1e-7 from 0 anyway).
LOG_LOSS_EPS = 1e-7


def auc_score(y_true, y_score) -> float:
    """ROC AUC over all candidates pooled (equal to ``sklearn.metrics.roc_auc_score``).

    Args:
        y_true: (c,) 0/1 labels.
        y_score: (c,) scores.

    Returns:
        The probability that a clicked candidate outscores a non-clicked one, ties counting 1/2.

    Raises:
        MetricInputError: shapes differ, bad values, or only one class present.
    """
    labels = _as_labels(y_true)
    scores = _as_scores(y_score, len(labels))
    num_pos = int(labels.sum())
    num_neg = len(labels) - num_pos
    if num_pos == 0 or num_neg == 0:
        raise MetricInputError(
            f"pooled AUC is undefined: {num_pos} clicked and {num_neg} non-clicked candidates, "
            "expected both classes"
        )
    ranks = _midranks(scores)
    return float((ranks[labels == 1].sum() - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def check_probabilities(y_prob, num: int, name: str = "y_prob") -> np.ndarray:
    """(num,) float64 probabilities, or MetricInputError naming the first value outside [0, 1]."""
    probs = _as_scores(y_prob, num, name)
    outside = (probs < 0) | (probs > 1)
    if outside.any():
        raise MetricInputError(f"{name} holds {_show(probs[outside][0])}, expected probabilities in [0, 1]")
    return probs


def log_losses(y_true, y_prob, *, eps: float = LOG_LOSS_EPS) -> np.ndarray:
    """Per-candidate binary cross-entropy in nats, probabilities clipped to [eps, 1 - eps].

    Args:
        y_true: (c,) 0/1 labels.
        y_prob: (c,) predicted click probabilities in [0, 1].
        eps: clipping margin.

    Returns:
        (c,) float64 losses.

    Raises:
        MetricInputError: shapes differ, labels not 0/1, probabilities outside [0, 1], or a
            bad eps.
    """
    if not 0.0 < eps < 0.5:
        raise MetricInputError(f"eps is {eps}, expected 0 < eps < 0.5")
    labels = _as_labels(y_true)
    probs = np.clip(check_probabilities(y_prob, len(labels)), eps, 1.0 - eps)
    return -np.where(labels == 1, np.log(probs), np.log1p(-probs))


def log_loss(y_true, y_prob, *, eps: float = LOG_LOSS_EPS) -> float:
    """Mean binary cross-entropy over all candidates, in nats (lower is better).

    Args:
        y_true: (c,) 0/1 labels.
        y_prob: (c,) predicted click probabilities in [0, 1].
        eps: probabilities are clipped to [eps, 1 - eps].

    Returns:
        ``-mean(y log p + (1 - y) log(1 - p))``.

    Raises:
        MetricInputError: empty input, shapes differ, or values out of range.
    """
    losses = log_losses(y_true, y_prob, eps=eps)
    if losses.size == 0:
        raise MetricInputError("log loss is undefined for no candidates, expected at least one")
    return float(losses.mean())
