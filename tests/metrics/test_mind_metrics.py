"""Per-impression MIND metrics: hand-worked values, the MIND scorer, scikit-learn, invariances."""

import math

import numpy as np
import pytest
import sklearn.metrics
from hypothesis import given, settings
from hypothesis import strategies as st

import mind_reference
from recsys.metrics.ranking import (
    MetricInputError,
    batch_impression_scores,
    batch_ranks_from_scores,
    dcg_score,
    impression_auc_score,
    mind_scores,
    mrr_score,
    ndcg_score,
    ranks_from_scores,
    scores_from_ranks,
)

LABELS = [1, 0, 0, 1, 0]
SCORES = [0.9, 0.8, 0.3, 0.5, 0.1]
IDEAL_2 = 1 + 1 / math.log2(3)  # DCG of two clicks in the first two places


def test_hand_worked_impression():
    # Order by score: candidates 0, 1, 3, 2, 4; the clicks (0 and 3) sit at positions 1 and 3.
    assert mrr_score(LABELS, SCORES) == pytest.approx((1 / 1 + 1 / 3) / 2)
    assert impression_auc_score(LABELS, SCORES) == pytest.approx(5 / 6)  # 0.9 beats 3 negatives, 0.5 beats 2
    assert dcg_score(LABELS, SCORES, k=5) == pytest.approx(1 + 1 / math.log2(4))
    assert ndcg_score(LABELS, SCORES, k=5) == pytest.approx(1.5 / IDEAL_2)
    assert ndcg_score(LABELS, SCORES, k=2) == pytest.approx(1 / IDEAL_2)  # the second click is cut off
    assert ndcg_score(LABELS, SCORES, k=1) == pytest.approx(1.0)


def test_impression_shorter_than_k_counts_every_candidate():
    labels, scores = [0, 1, 0], [0.3, 0.2, 0.1]
    expected = (1 / math.log2(3)) / 1.0
    assert ndcg_score(labels, scores, k=10) == pytest.approx(expected)
    assert ndcg_score(labels, scores, k=3) == pytest.approx(expected)
    assert ndcg_score(labels, scores, k=10) == pytest.approx(mind_reference.ndcg_score(np.array(labels), scores, 10))


def test_ties_rank_the_later_candidate_first_and_count_half_in_auc():
    # MIND orders with argsort(scores)[::-1]: with a stable sort the later of two tied
    # candidates comes first, so a click on the earlier one lands at position 2.
    assert mrr_score([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert mrr_score([0, 1], [0.5, 0.5]) == pytest.approx(1.0)
    assert ndcg_score([1, 0], [0.5, 0.5]) == pytest.approx(1 / math.log2(3))
    assert impression_auc_score([1, 0], [0.5, 0.5]) == 0.5
    assert impression_auc_score([1, 0, 1, 0], [0.7, 0.7, 0.2, 0.1]) == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    # Three-way tie: the MIND order is candidates 2, 1, 0.
    assert mrr_score([1, 0, 0], [1.0, 1.0, 1.0]) == pytest.approx(1 / 3)


def test_ties_match_the_mind_scorer_where_numpy_sorts_stably():
    # np.argsort's default kind is not stable: on NumPy builds with SIMD sorting the order of
    # ties changes with the array length. Where it happens to equal the stable order (short
    # arrays), the MIND scorer and these functions must agree exactly.
    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(3000):
        n = int(rng.integers(2, 9))
        labels = rng.integers(0, 2, n)
        scores = rng.integers(0, 3, n).astype(float)
        if labels.sum() in (0, n) or not np.array_equal(np.argsort(scores), np.argsort(scores, kind="stable")):
            continue
        checked += 1
        assert mrr_score(labels, scores) == pytest.approx(mind_reference.mrr_score(labels, scores))
        for k in (1, 5, 10):
            assert ndcg_score(labels, scores, k=k) == pytest.approx(mind_reference.ndcg_score(labels, scores, k))
    assert checked > 100


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_agrees_with_mind_scorer_without_ties(data):
    n = data.draw(st.integers(2, 60))
    labels = np.array(data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    if labels.sum() in (0, n):
        labels[0], labels[-1] = 1, 0
    scores = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).permutation(n) / n
    assert mrr_score(labels, scores) == pytest.approx(mind_reference.mrr_score(labels, scores), abs=1e-12)
    for k in (5, 10):
        assert ndcg_score(labels, scores, k=k) == pytest.approx(mind_reference.ndcg_score(labels, scores, k), abs=1e-12)
    assert impression_auc_score(labels, scores) == pytest.approx(sklearn.metrics.roc_auc_score(labels, scores), abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 4)), min_size=2, max_size=40))
def test_auc_matches_sklearn_with_ties(pairs):
    labels = np.array([p[0] for p in pairs])
    scores = np.array([p[1] for p in pairs], dtype=float)
    if labels.sum() in (0, len(labels)):
        return
    assert impression_auc_score(labels, scores) == pytest.approx(sklearn.metrics.roc_auc_score(labels, scores), abs=1e-12)


def test_ndcg_matches_sklearn_for_binary_labels_without_ties():
    # sklearn's gain is the label itself, equal to 2**y - 1 for 0/1 labels.
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 40))
        labels = rng.integers(0, 2, n)
        labels[0] = 1
        scores = rng.permutation(n).astype(float)
        for k in (5, 10):
            expected = sklearn.metrics.ndcg_score([labels], [scores], k=k)
            assert ndcg_score(labels, scores, k=k) == pytest.approx(expected, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 1), min_size=2, max_size=30),
    st.integers(-1000, 1000),
    st.integers(1, 50),
    st.randoms(use_true_random=False),
)
def test_adding_a_constant_or_scaling_leaves_rankings_unchanged(labels, shift, scale, rnd):
    labels = np.array(labels)
    if labels.sum() == 0:
        labels[0] = 1
    scores = np.array([rnd.randint(0, 5) for _ in labels], dtype=float)  # integer scores: exact after shifting
    moved = scores * scale + shift
    for k in (5, 10):
        assert ndcg_score(labels, moved, k=k) == ndcg_score(labels, scores, k=k)
    assert mrr_score(labels, moved) == mrr_score(labels, scores)
    if 0 < labels.sum() < len(labels):
        assert impression_auc_score(labels, moved) == impression_auc_score(labels, scores)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 3)), min_size=1, max_size=15), min_size=1, max_size=12))
def test_batch_equals_one_impression_at_a_time(impressions):
    labels = np.concatenate([[p[0] for p in imp] for imp in impressions])
    scores = np.concatenate([[float(p[1]) for p in imp] for imp in impressions])
    offsets = np.r_[0, np.cumsum([len(imp) for imp in impressions])]
    batch = batch_impression_scores(labels, scores, offsets)
    for i in range(len(impressions)):
        y, s = labels[offsets[i] : offsets[i + 1]], scores[offsets[i] : offsets[i + 1]]
        assert batch["num_clicked"][i] == y.sum() and batch["num_candidates"][i] == len(y)
        if 0 < y.sum() < len(y):
            assert batch["scored"][i]
            assert batch["impression_auc"][i] == pytest.approx(impression_auc_score(y, s), abs=1e-12)
            assert batch["mrr"][i] == pytest.approx(mrr_score(y, s), abs=1e-12)
            assert batch["ndcg@5"][i] == pytest.approx(ndcg_score(y, s, k=5), abs=1e-12)
            assert batch["ndcg@10"][i] == pytest.approx(ndcg_score(y, s, k=10), abs=1e-12)
        else:
            assert not batch["scored"][i] and np.isnan(batch["mrr"][i])
    ranks = batch_ranks_from_scores(scores, offsets)
    for i in range(len(impressions)):
        assert np.array_equal(ranks[offsets[i] : offsets[i + 1]], ranks_from_scores(scores[offsets[i] : offsets[i + 1]]))


def test_mind_scores_averages_scored_impressions_and_counts_the_rest():
    labels = [[1, 0, 0], [0, 0], [1, 1], [], [-1, -1, -1], [0, 1]]
    scores = [[0.9, 0.1, 0.5], [0.1, 0.2], [0.3, 0.4], [], [0.1, 0.2, 0.3], [0.6, 0.4]]
    result = mind_scores(labels, scores)
    assert result["num_impressions"] == 6
    assert result["num_unlabelled"] == 2
    assert result["num_single_class"] == 2
    assert result["num_scored"] == 2
    assert result["impression_auc"] == pytest.approx((1.0 + 0.0) / 2)
    assert result["mrr"] == pytest.approx((1.0 + 0.5) / 2)
    assert result["ndcg@5"] == pytest.approx((1.0 + 1 / math.log2(3)) / 2)


def test_mind_scores_without_scored_impressions_gives_none():
    result = mind_scores([[1, 1], [0]], [[0.1, 0.2], [0.3]])
    assert result["impression_auc"] is None and result["mrr"] is None
    assert result["num_single_class"] == 2 and result["num_scored"] == 0


def test_mind_scores_equals_the_scorer_on_rank_scores():
    rng = np.random.default_rng(1)
    labels, ranks = [], []
    for _ in range(300):
        n = int(rng.integers(2, 50))
        labels.append(rng.integers(0, 2, n))  # short ones are often single-class
        ranks.append(rng.permutation(n) + 1)
    truth = [f"{i} [{','.join(map(str, y))}]" for i, y in enumerate(labels)]
    submission = [f"{i} [{','.join(map(str, r))}]" for i, r in enumerate(ranks)]
    keep = [i for i, y in enumerate(labels) if 0 < y.sum() < len(y)]
    expected = mind_reference.scoring([truth[i] for i in keep], [submission[i] for i in keep])
    result = mind_scores(labels, [scores_from_ranks(r) for r in ranks])
    assert result["num_scored"] == len(keep)
    got = (result["impression_auc"], result["mrr"], result["ndcg@5"], result["ndcg@10"])
    assert got == pytest.approx(expected, abs=1e-12)


def test_ranks_from_scores_breaks_ties_in_candidate_order():
    assert ranks_from_scores([0.1, 0.9, 0.5]).tolist() == [3, 1, 2]
    assert ranks_from_scores([0.5, 0.5, 0.9, 0.5]).tolist() == [2, 3, 1, 4]
    assert ranks_from_scores([]).tolist() == []


def test_scores_from_ranks_is_one_over_rank_and_keeps_the_order():
    assert scores_from_ranks([1, 2, 4]).tolist() == [1.0, 0.5, 0.25]
    scores = np.array([0.3, 0.1, 0.7, 0.2])
    assert np.array_equal(ranks_from_scores(scores_from_ranks(ranks_from_scores(scores))), ranks_from_scores(scores))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: impression_auc_score([1, 1], [0.1, 0.2]), "2 clicked and 0 non-clicked"),
        (lambda: impression_auc_score([1, 0], [0.1]), r"y_score has shape \(1,\), expected \(2,\)"),
        (lambda: impression_auc_score([1, 2], [0.1, 0.2]), "y_true holds 2, expected labels 0 or 1"),
        (lambda: impression_auc_score([1, 0], [0.1, np.nan]), "y_score holds nan, expected finite"),
        (lambda: impression_auc_score([[1, 0]], [[0.1, 0.2]]), "expected a 1-D array"),
        (lambda: mrr_score([], []), "y_true is empty"),
        (lambda: mrr_score([0, 0], [0.1, 0.2]), "MRR is undefined: no clicked candidate"),
        (lambda: ndcg_score([0, 0], [0.1, 0.2]), "nDCG is undefined: no clicked candidate"),
        (lambda: ndcg_score([1, 0], [0.1, 0.2], k=0), "k is 0, expected an integer >= 1"),
        (lambda: dcg_score([1, 0], [0.1, 0.2], k=2.5), "k is 2.5, expected an integer >= 1"),
        (lambda: ranks_from_scores([0.1, np.inf]), "scores holds inf, expected finite"),
        (lambda: scores_from_ranks([1, 0]), "ranks hold 0, expected integers >= 1"),
        (lambda: scores_from_ranks([1.5]), "ranks hold 1.5, expected integers >= 1"),
        (lambda: scores_from_ranks(["a"]), "ranks hold 'a', expected integers >= 1"),
        (lambda: scores_from_ranks([[1]]), "expected a 1-D array"),
        (lambda: batch_impression_scores([1, 0], [0.1, 0.2], [0, 1]), "offsets run from 0 to 1, expected 0 to 2"),
        (lambda: batch_impression_scores([1, 0], [0.1, 0.2], [0, 0, 2]), "impression 0 has 0 candidates"),
        (lambda: batch_impression_scores([1, 0], [0.1, 0.2], [[0, 2]]), r"offsets have shape \(1, 2\)"),
        (lambda: batch_ranks_from_scores([[0.1, 0.2]], [0, 2]), "scores has shape \\(1, 2\\), expected a 1-D array"),
        (lambda: mind_scores([[1, 0]], []), "differ in length after 0 impressions"),
        (lambda: mind_scores([[1, 0]], [[0.1]]), r"impression 0: scores has shape \(1,\)"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(call, message):
    with pytest.raises(MetricInputError, match=message):
        call()
