"""Bootstrap confidence intervals over impressions.

Impressions, not candidates, are the unit resampled: candidates of one impression share a user
and a moment, so resampling candidates would understate the spread. Every statistic here is
a ratio of per-impression sums, ``sum_i w_i a_i / sum_i w_i b_i``, with ``w`` the resample
counts (multinomial, ``n`` draws from ``n`` impressions):

* a mean of per-impression values: ``a_i`` the value (0 when the impression is not scored),
  ``b_i`` 1 when scored, 0 otherwise;
* pooled log loss: ``a_i`` the impression's summed loss, ``b_i`` its number of candidates.

Resample counts for a chunk of resamples form a matrix ``C`` (resamples, impressions), so all
statistics of a chunk are two matrix products, ``C @ A`` and ``C @ B``; 150k impressions x
1000 resamples x dozens of statistics take a few seconds. The counts depend only on
``(num_impressions, num_resamples, seed)``, so statistics computed with the same seed use the
same resamples and their differences are paired.

Pooled AUC is not a ratio of per-impression sums (it counts pairs across impressions). Two
ways are offered:

* ``"exact"``: recompute the weighted pooled AUC for every resample, one pass over all
  candidates each (0.6-0.8 s per resample at 5.6M candidates on the shared 2-core machine),
  so fewer resamples;
* ``"linearized"``: resample the first-order expansion of AUC around the full sample, the
  per-impression influence ``psi_i`` (DeLong's variance components, summed per impression).
  It is a ratio statistic like the others, so it costs nothing extra and shares the paired
  resamples; its error against the exact bootstrap is O(1/num_impressions).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from threadpoolctl import threadpool_limits

from recsys.metrics.ranking import MetricInputError, _as_labels, _as_scores, _check_offsets

# Counts chunk size: resamples x impressions entries drawn at once (three arrays of ~16 MB).
_CHUNK_ENTRIES = 2_000_000


class ConfidenceInterval(NamedTuple):
    """A statistic on the full sample and its bootstrap percentile interval."""

    value: float
    ci_low: float
    ci_high: float


def _check_options(num_resamples: int, confidence: float) -> None:
    if isinstance(num_resamples, bool) or not isinstance(num_resamples, (int, np.integer)) or num_resamples < 1:
        raise MetricInputError(f"num_resamples is {num_resamples!r}, expected an integer >= 1")
    if not 0.0 < confidence < 1.0:
        raise MetricInputError(f"confidence is {confidence!r}, expected a value strictly between 0 and 1")


def resample_counts(num_impressions: int, *, num_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Multinomial resample counts, chunk by chunk.

    The draws do not depend on the chunking, so any consumer with the same arguments sees the
    same resamples.

    Args:
        num_impressions: ``n``, the units resampled.
        num_resamples: ``R``.
        seed: seed of ``np.random.default_rng``.

    Yields:
        (r, n) float64 arrays of counts (each row sums to n), r rows at a time, R rows in all.
    """
    if num_impressions < 1:
        raise MetricInputError(f"cannot resample {num_impressions} impressions, expected at least 1")
    rng = np.random.default_rng(seed)
    chunk = max(1, min(num_resamples, _CHUNK_ENTRIES // num_impressions))
    done = 0
    while done < num_resamples:
        r = min(chunk, num_resamples - done)
        draws = rng.integers(0, num_impressions, size=(r, num_impressions))
        draws += (np.arange(r, dtype=np.int64) * num_impressions)[:, None]
        yield np.bincount(draws.ravel(), minlength=r * num_impressions).reshape(r, num_impressions).astype(np.float64)
        done += r


def bootstrap_ratio_samples(
    numerators, denominators, *, num_resamples: int = 1000, seed: int = 0, dtype=np.float64
) -> np.ndarray:
    """Resampled ratio statistics ``sum(w * a) / sum(w * b)`` for many columns at once.

    Args:
        numerators: (n, m) per-impression numerators ``a``, or (n,) for one statistic.
        denominators: same shape, per-impression denominators ``b``.
        num_resamples: ``R``.
        seed: resampling seed (same seed, same resamples).
        dtype: precision of the matrix products; float32 halves memory for wide tables and
            still gives interval bounds to about 1e-6.

    Returns:
        (R, m) float64 statistics (or (R,) for 1-D input); NaN where a resample's denominator
        is 0 (e.g. a small group not drawn at all).

    Raises:
        MetricInputError: shapes differ, values are not finite, or options are invalid.
    """
    _check_options(num_resamples, 0.5)
    num = np.asarray(numerators, dtype=dtype)
    den = np.asarray(denominators, dtype=dtype)
    if num.shape != den.shape or num.ndim not in (1, 2):
        raise MetricInputError(
            f"numerators have shape {num.shape} and denominators {den.shape}, expected the same (n,) or (n, m) shape"
        )
    one_column = num.ndim == 1
    num, den = num.reshape(len(num), -1), den.reshape(len(den), -1)
    samples = ratio_samples(num, den, np.arange(num.shape[1]), num_resamples=num_resamples, seed=seed)
    return samples[:, 0] if one_column else samples


def ratio_samples(
    numerators: np.ndarray,
    denominators: np.ndarray,
    denominator_of: np.ndarray,
    *,
    num_resamples: int,
    seed: int,
    counts: list[np.ndarray] | None = None,
) -> np.ndarray:
    """Resampled ``sum(w * num[:, j]) / sum(w * den[:, denominator_of[j]])``; shared denominators.

    Args:
        numerators: (n, k) per-impression numerators, float32 or float64.
        denominators: (n, d) per-impression denominators, same dtype.
        denominator_of: (k,) column of ``denominators`` that divides each numerator.
        num_resamples: ``R``.
        seed: resampling seed.
        counts: the chunks of ``resample_counts(n, num_resamples=R, seed=seed)`` already drawn
            (any integer dtype), to reuse them across calls; None draws them.

    Returns:
        (R, k) float64 statistics, NaN where the resampled denominator is 0.

    Raises:
        MetricInputError: values are not finite.
    """
    if not (np.isfinite(numerators).all() and np.isfinite(denominators).all()):
        raise MetricInputError("numerators or denominators hold NaN or inf, expected finite per-impression sums")
    dtype = numerators.dtype
    chunks = counts if counts is not None else resample_counts(len(numerators), num_resamples=num_resamples, seed=seed)
    parts = []
    # One BLAS thread: these products take well under a second each, and multi-threaded
    # OpenBLAS slows down by an order of magnitude when other processes share the cores.
    with threadpool_limits(limits=1, user_api="blas"):
        for chunk in chunks:
            weights = chunk.astype(dtype, copy=False)
            num_sums = (weights @ numerators).astype(np.float64)
            den_sums = (weights @ denominators).astype(np.float64)[:, denominator_of]
            with np.errstate(divide="ignore", invalid="ignore"):
                parts.append(np.where(den_sums != 0, num_sums / den_sums, np.nan))
    return np.concatenate(parts)


def percentile_interval(samples, *, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper percentile bounds of resampled statistics, ignoring NaN resamples.

    Args:
        samples: (R,) or (R, m) resampled statistics.
        confidence: coverage of the interval, e.g. 0.95 for the 2.5th and 97.5th percentiles.

    Returns:
        ``(low, high)``, scalars or (m,) arrays; NaN where every resample is NaN.
    """
    _check_options(1, confidence)
    samples = np.asarray(samples, dtype=np.float64)
    alpha = (1.0 - confidence) / 2.0
    valid = ~np.isnan(samples)
    if valid.all():
        low, high = np.quantile(samples, [alpha, 1.0 - alpha], axis=0)
        return low, high
    low = np.full(samples.shape[1:], np.nan)
    high = np.full(samples.shape[1:], np.nan)
    has_any = valid.any(axis=0)
    if np.any(has_any):
        bounds = np.nanquantile(samples[:, has_any] if samples.ndim == 2 else samples, [alpha, 1.0 - alpha], axis=0)
        if samples.ndim == 2:
            low[has_any], high[has_any] = bounds
        else:
            low, high = bounds
    return low, high


def bootstrap_ratio_ci(
    numerators, denominators, *, num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> ConfidenceInterval:
    """``sum(a) / sum(b)`` with its bootstrap interval over impressions.

    Args:
        numerators: (n,) per-impression sums ``a`` (e.g. summed log loss).
        denominators: (n,) per-impression sums ``b`` (e.g. number of candidates).
        num_resamples: resamples.
        confidence: interval coverage.
        seed: resampling seed.

    Returns:
        The ratio on the full sample and its percentile interval.

    Raises:
        MetricInputError: shapes differ, empty input, a zero total denominator, or bad options.
    """
    _check_options(num_resamples, confidence)
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if num.ndim != 1 or num.shape != den.shape or len(num) == 0:
        raise MetricInputError(
            f"numerators have shape {num.shape} and denominators {den.shape}, expected the same non-empty (n,) shape"
        )
    if den.sum() == 0:
        raise MetricInputError("denominators sum to 0, expected a positive total")
    samples = bootstrap_ratio_samples(num, den, num_resamples=num_resamples, seed=seed)
    low, high = percentile_interval(samples, confidence=confidence)
    return ConfidenceInterval(float(num.sum() / den.sum()), float(low), float(high))


def bootstrap_ci(
    per_impression_values, *, num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> ConfidenceInterval:
    """Mean of per-impression values with its bootstrap percentile interval.

    Args:
        per_impression_values: (n,) one value per impression (e.g. per-impression AUC). NaN
            marks an impression that was not scored: it is still drawn, but adds nothing to a
            resample's mean, as it adds nothing to the full-sample mean.
        num_resamples: resamples of the n impressions.
        confidence: interval coverage.
        seed: resampling seed.

    Returns:
        ``ConfidenceInterval(mean, ci_low, ci_high)``.

    Raises:
        MetricInputError: not 1-D, no finite value, infinite values, or bad options.
    """
    values = np.asarray(per_impression_values, dtype=np.float64)
    if values.ndim != 1:
        raise MetricInputError(f"per_impression_values has shape {values.shape}, expected a 1-D array")
    if np.isinf(values).any():
        raise MetricInputError("per_impression_values holds inf, expected finite values or NaN for unscored")
    scored = ~np.isnan(values)
    if not scored.any():
        raise MetricInputError("per_impression_values holds no finite value, expected at least one scored impression")
    return bootstrap_ratio_ci(
        np.where(scored, values, 0.0), scored.astype(np.float64),
        num_resamples=num_resamples, confidence=confidence, seed=seed,
    )


def _impression_index(offsets: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def _tie_groups(scores: np.ndarray, *, presorted: bool = False):
    """Candidates sorted by score and split into groups of equal score.

    Returns:
        ``(order, starts, group_of)``: the ascending order, the start of each group in it, and
        the group of each sorted position.
    """
    order = np.arange(len(scores)) if presorted else np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    new_group = np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]
    return order, np.flatnonzero(new_group), np.cumsum(new_group) - 1


def pooled_auc_influence(y_true, y_score, offsets) -> tuple[float, np.ndarray]:
    """Pooled AUC and each impression's first-order influence on it.

    With resample weights ``w`` (summing to n), ``AUC(w) = AUC + sum_i w_i psi_i`` up to terms
    of order 1/n; ``sum_i psi_i = 0``.

    Args:
        y_true: (c,) 0/1 labels of all candidates, impression after impression.
        y_score: (c,) scores.
        offsets: (n + 1,) CSR offsets of the impressions.

    Returns:
        ``(auc, psi)`` with psi (n,) float64.

    Raises:
        MetricInputError: bad shapes or values, or a single class over all candidates.
    """
    labels = _as_labels(y_true)
    scores = _as_scores(y_score, len(labels))
    offsets = _check_offsets(offsets, len(labels))
    return auc_influence(labels, scores, _impression_index(offsets), len(offsets) - 1)


def auc_influence(
    labels: np.ndarray,
    scores: np.ndarray,
    impression_index: np.ndarray,
    num_impressions: int,
    *,
    presorted: bool = False,
) -> tuple[float, np.ndarray]:
    """``pooled_auc_influence`` for candidates given by impression index (no checks).

    Args:
        labels: (c,) int 0/1 labels.
        scores: (c,) finite scores.
        impression_index: (c,) impression of each candidate, in ``[0, num_impressions)``; an
            impression may own no candidate (its influence is 0), which lets a subset of
            candidates (one category, say) be measured against the resamples of all impressions.
        num_impressions: ``n``.
        presorted: the candidates are already in ascending score order (skips the sort, so
            subsets of one sorted array cost a filter each).

    Returns:
        ``(auc, psi)`` with psi (n,) float64.

    Raises:
        MetricInputError: a single class among the candidates.
    """
    num_pos = int(labels.sum())
    num_neg = len(labels) - num_pos
    if num_pos == 0 or num_neg == 0:
        raise MetricInputError(
            f"pooled AUC is undefined: {num_pos} clicked and {num_neg} non-clicked candidates, expected both classes"
        )
    if presorted:
        sorted_scores, clicked, impression = scores, labels == 1, impression_index
    else:
        order = np.argsort(scores, kind="stable")
        sorted_scores, clicked, impression = scores[order], labels[order] == 1, impression_index[order]
    new_group = np.empty(len(sorted_scores), dtype=bool)
    new_group[0] = True
    np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=new_group[1:])
    starts = np.flatnonzero(new_group)
    group_of = np.cumsum(new_group, dtype=np.int64) - 1
    del new_group
    group_pos = np.add.reduceat(clicked.astype(np.float64), starts)
    group_neg = np.diff(np.r_[starts, len(sorted_scores)]) - group_pos
    neg_below = np.cumsum(group_neg) - 0.5 * group_neg  # negatives below + half the tied
    pos_above = num_pos - np.cumsum(group_pos) + 0.5 * group_pos  # positives above + half the tied
    pair_credit = np.where(clicked, neg_below[group_of], pos_above[group_of])
    del group_of
    credit = np.bincount(impression, weights=pair_credit, minlength=num_impressions)
    pos_count = np.bincount(impression[clicked], minlength=num_impressions)
    neg_count = np.bincount(impression, minlength=num_impressions) - pos_count
    pairs = float(num_pos) * float(num_neg)
    auc = float(credit.sum() / 2.0 / pairs)
    psi = credit / pairs - auc * (pos_count / num_pos + neg_count / num_neg)
    return auc, psi


def exact_pooled_auc_samples(y_true, y_score, offsets, *, num_resamples: int = 200, seed: int = 0) -> np.ndarray:
    """Pooled AUC recomputed on every resample of impressions (weights on candidates).

    Args:
        y_true: (c,) 0/1 labels, impression after impression.
        y_score: (c,) scores.
        offsets: (n + 1,) CSR offsets of the impressions.
        num_resamples: resamples; each costs one pass over the c candidates.
        seed: resampling seed (the resamples equal those of ``bootstrap_ratio_samples``).

    Returns:
        (num_resamples,) float64 AUCs, NaN where a resample holds one class only.

    Raises:
        MetricInputError: bad input or options.
    """
    _check_options(num_resamples, 0.5)
    labels = _as_labels(y_true)
    scores = _as_scores(y_score, len(labels))
    offsets = _check_offsets(offsets, len(labels))
    order, starts, group_of = _tie_groups(scores)
    is_pos = labels[order] == 1
    impression = _impression_index(offsets)[order]
    pos_imp, neg_imp = impression[is_pos], impression[~is_pos]
    pos_group, neg_group = group_of[is_pos], group_of[~is_pos]
    num_groups = len(starts)
    out = np.empty(num_resamples, dtype=np.float64)
    done = 0
    for counts in resample_counts(len(offsets) - 1, num_resamples=num_resamples, seed=seed):
        for w in counts:
            group_pos = np.bincount(pos_group, weights=w[pos_imp], minlength=num_groups)
            group_neg = np.bincount(neg_group, weights=w[neg_imp], minlength=num_groups)
            neg_below = np.cumsum(group_neg) - 0.5 * group_neg
            total_pos, total_neg = group_pos.sum(), group_neg.sum()
            out[done] = np.dot(group_pos, neg_below) / (total_pos * total_neg) if total_pos and total_neg else np.nan
            done += 1
    return out


def pooled_auc_ci(
    y_true,
    y_score,
    offsets,
    *,
    num_resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    method: str = "exact",
) -> ConfidenceInterval:
    """Pooled AUC with a bootstrap interval over impressions.

    Args:
        y_true: (c,) 0/1 labels, impression after impression.
        y_score: (c,) scores.
        offsets: (n + 1,) CSR offsets of the impressions.
        num_resamples: resamples (``"exact"`` costs one pass over all candidates per resample).
        confidence: interval coverage.
        seed: resampling seed.
        method: ``"exact"`` or ``"linearized"`` (see the module docstring).

    Returns:
        The pooled AUC and its percentile interval.

    Raises:
        MetricInputError: bad input, a single class, or an unknown method.
    """
    _check_options(num_resamples, confidence)
    if method not in ("exact", "linearized"):
        raise MetricInputError(f"method is {method!r}, expected 'exact' or 'linearized'")
    auc, psi = pooled_auc_influence(y_true, y_score, offsets)
    if method == "exact":
        samples = exact_pooled_auc_samples(y_true, y_score, offsets, num_resamples=num_resamples, seed=seed)
    else:
        n = len(psi)
        samples = auc + bootstrap_ratio_samples(n * psi, np.ones(n), num_resamples=num_resamples, seed=seed)
    low, high = percentile_interval(samples, confidence=confidence)
    return ConfidenceInterval(auc, float(low), float(high))
