"""Bootstrap intervals over impressions: against a plain loop, sklearn's weighted AUC, and each other."""

import numpy as np
import pytest
import sklearn.metrics

from recsys.metrics.bootstrap import (
    ConfidenceInterval,
    bootstrap_ci,
    bootstrap_ratio_ci,
    bootstrap_ratio_samples,
    exact_pooled_auc_samples,
    percentile_interval,
    pooled_auc_ci,
    pooled_auc_influence,
    resample_counts,
)
from recsys.metrics.ranking import MetricInputError


def _naive_mean_interval(values, num_resamples, seed, confidence=0.95):
    """Textbook percentile bootstrap: draw n indices with replacement, R times."""
    rng = np.random.default_rng(seed)
    n = len(values)
    means = [np.nanmean(values[rng.integers(0, n, size=n)]) for _ in range(num_resamples)]
    alpha = (1 - confidence) / 2
    return np.quantile(means, [alpha, 1 - alpha])


def _impressions(num_impressions, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 40, num_impressions)
    offsets = np.r_[0, np.cumsum(lengths)]
    user = np.repeat(rng.normal(0, 1, num_impressions), lengths)
    scores = rng.normal(0, 1, offsets[-1]) + user
    labels = (rng.random(offsets[-1]) < 1 / (1 + np.exp(-(scores - 2.5)))).astype(int)
    return labels, scores, offsets


def test_mean_interval_equals_the_textbook_bootstrap():
    values = np.random.default_rng(5).random(300)
    ci = bootstrap_ci(values, num_resamples=400, seed=7)
    assert isinstance(ci, ConfidenceInterval)
    assert ci.value == pytest.approx(values.mean())
    assert (ci.ci_low, ci.ci_high) == pytest.approx(tuple(_naive_mean_interval(values, 400, 7)), abs=1e-12)


def test_unscored_impressions_are_drawn_but_not_averaged():
    values = np.random.default_rng(6).random(200)
    values[::7] = np.nan
    ci = bootstrap_ci(values, num_resamples=300, seed=1)
    assert ci.value == pytest.approx(np.nanmean(values))
    assert (ci.ci_low, ci.ci_high) == pytest.approx(tuple(_naive_mean_interval(values, 300, 1)), abs=1e-12)


def test_counts_do_not_depend_on_chunking(monkeypatch):
    whole = np.concatenate(list(resample_counts(50, num_resamples=30, seed=3)))
    monkeypatch.setattr("recsys.metrics.bootstrap._CHUNK_ENTRIES", 120)  # two resamples per chunk
    chunked = list(resample_counts(50, num_resamples=30, seed=3))
    assert len(chunked) == 15
    assert np.array_equal(np.concatenate(chunked), whole)
    assert (whole.sum(axis=1) == 50).all()


def test_interval_narrows_with_more_impressions():
    rng = np.random.default_rng(2)
    small = bootstrap_ci(rng.random(100), num_resamples=300)
    large = bootstrap_ci(rng.random(10000), num_resamples=300)
    assert (large.ci_high - large.ci_low) < (small.ci_high - small.ci_low) / 5
    assert small.ci_low < small.value < small.ci_high


def test_ratio_interval_is_pooled_mean_over_candidates():
    rng = np.random.default_rng(4)
    sizes = rng.integers(1, 20, 500).astype(float)
    losses = sizes * rng.random(500)
    ci = bootstrap_ratio_ci(losses, sizes, num_resamples=200, seed=2)
    assert ci.value == pytest.approx(losses.sum() / sizes.sum())
    rng2 = np.random.default_rng(2)
    ratios = []
    for _ in range(200):
        idx = rng2.integers(0, 500, 500)
        ratios.append(losses[idx].sum() / sizes[idx].sum())
    assert (ci.ci_low, ci.ci_high) == pytest.approx(tuple(np.quantile(ratios, [0.025, 0.975])), abs=1e-12)


def test_many_columns_share_the_resamples():
    rng = np.random.default_rng(8)
    a, b = rng.random(100), rng.random(100)
    both = bootstrap_ratio_samples(np.column_stack([a, b]), np.ones((100, 2)), num_resamples=50, seed=9)
    only_a = bootstrap_ratio_samples(a, np.ones(100), num_resamples=50, seed=9)
    assert np.allclose(both[:, 0], only_a)


def test_percentile_interval_ignores_resamples_without_data():
    samples = np.array([[1.0, np.nan], [2.0, np.nan], [3.0, np.nan], [np.nan, np.nan]])
    low, high = percentile_interval(samples, confidence=0.5)
    assert low[0] == pytest.approx(1.5) and high[0] == pytest.approx(2.5)
    assert np.isnan(low[1]) and np.isnan(high[1])


def test_influence_gives_pooled_auc_and_sums_to_zero():
    labels, scores, offsets = _impressions(400)
    auc, psi = pooled_auc_influence(labels, scores, offsets)
    assert auc == pytest.approx(sklearn.metrics.roc_auc_score(labels, scores), abs=1e-12)
    assert psi.sum() == pytest.approx(0.0, abs=1e-12)


def test_influence_is_the_derivative_of_weighted_auc():
    labels, scores, offsets = _impressions(300, seed=1)
    scores = np.round(scores, 1)  # ties too
    auc, psi = pooled_auc_influence(labels, scores, offsets)
    impression = np.repeat(np.arange(300), np.diff(offsets))
    step = 1e-4 * np.random.default_rng(2).normal(size=300)
    weighted = sklearn.metrics.roc_auc_score(labels, scores, sample_weight=(1 + step)[impression])
    assert weighted - auc == pytest.approx(np.dot(step, psi), rel=1e-3)


def test_exact_samples_equal_sklearn_weighted_auc():
    labels, scores, offsets = _impressions(200, seed=3)
    scores = np.round(scores, 1)
    samples = exact_pooled_auc_samples(labels, scores, offsets, num_resamples=5, seed=4)
    impression = np.repeat(np.arange(200), np.diff(offsets))
    counts = np.concatenate(list(resample_counts(200, num_resamples=5, seed=4)))
    for w, sample in zip(counts, samples):
        expected = sklearn.metrics.roc_auc_score(labels, scores, sample_weight=w[impression])
        assert sample == pytest.approx(expected, abs=1e-12)


@pytest.mark.slow
def test_linearized_interval_agrees_with_the_exact_bootstrap():
    labels, scores, offsets = _impressions(3000, seed=5)
    exact = pooled_auc_ci(labels, scores, offsets, num_resamples=300, method="exact", seed=6)
    linear = pooled_auc_ci(labels, scores, offsets, num_resamples=300, method="linearized", seed=6)
    width = exact.ci_high - exact.ci_low
    assert exact.value == linear.value
    assert linear.ci_low == pytest.approx(exact.ci_low, abs=0.1 * width)
    assert linear.ci_high == pytest.approx(exact.ci_high, abs=0.1 * width)


def test_linearized_interval_is_small_and_covers_the_value():
    labels, scores, offsets = _impressions(500, seed=7)
    ci = pooled_auc_ci(labels, scores, offsets, num_resamples=200, method="linearized")
    assert ci.ci_low < ci.value < ci.ci_high
    assert ci.ci_high - ci.ci_low < 0.1


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: bootstrap_ci([0.1, 0.2], num_resamples=0), "num_resamples is 0, expected an integer >= 1"),
        (lambda: bootstrap_ci([0.1, 0.2], confidence=1.0), "confidence is 1.0, expected a value strictly between 0 and 1"),
        (lambda: bootstrap_ci([np.nan, np.nan]), "holds no finite value"),
        (lambda: bootstrap_ci([0.1, np.inf]), "holds inf"),
        (lambda: bootstrap_ci([[0.1]]), "expected a 1-D array"),
        (lambda: bootstrap_ratio_ci([1.0], [1.0, 2.0]), "expected the same non-empty"),
        (lambda: bootstrap_ratio_ci([1.0, 2.0], [0.0, 0.0]), "denominators sum to 0"),
        (lambda: bootstrap_ratio_samples(np.ones(3), np.ones(2)), "expected the same"),
        (lambda: bootstrap_ratio_samples(np.array([1.0, np.nan]), np.ones(2)), "hold NaN or inf"),
        (lambda: list(resample_counts(0, num_resamples=3, seed=0)), "cannot resample 0 impressions"),
        (lambda: pooled_auc_ci([1, 0], [0.2, 0.1], [0, 2], method="delong"), "method is 'delong'"),
        (lambda: pooled_auc_influence([1, 1], [0.2, 0.1], [0, 2]), "pooled AUC is undefined"),
    ],
)
def test_bad_input_is_rejected(call, message):
    with pytest.raises(MetricInputError, match=message):
        call()
