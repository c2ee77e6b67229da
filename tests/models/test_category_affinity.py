"""The reader's category affinity: its design matrix, counts, fit and saved form."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.data.interactions import Impressions
from recsys.models import affinity
from recsys.models.affinity import (
    FEATURES, AffinityCalibration, KeyVocabulary, SkipCounts, affinity_design, affinity_inputs,
    first_of_each, fit_affinity_calibration, history_key_counts,
)


def test_design_reads_counts_shares_and_lift_per_key():
    x = affinity_design(np.array([0.5]), np.array([[3, 1]]), np.array([[1, 0]]), np.array([4]), np.array([10]))
    lift_cat = np.log(3.5 / 1.5) - np.log(4.5 / 10.5)
    lift_sub = np.log(1.5 / 0.5) - np.log(4.5 / 10.5)
    expected = [0.5, np.log(4), np.log(2), 3 / 4, 1 / 10, lift_cat, np.log(2), 0.0, 1 / 4, 0.0, lift_sub, np.log(5), np.log(11)]
    np.testing.assert_allclose(x[0], expected)
    assert x.shape == (1, len(FEATURES))


def test_a_reader_with_nothing_on_record_reads_zeros_not_a_division_by_zero():
    x = affinity_design(np.array([1.0]), np.zeros((1, 2)), np.zeros((1, 2)), np.array([0]), np.array([0]))
    assert np.isfinite(x).all()
    np.testing.assert_allclose(x[0], [1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])


def test_logits_are_the_weighted_design_plus_intercept_and_survive_a_round_trip():
    weights = tuple(np.linspace(-1, 1, len(FEATURES)))
    cal = AffinityCalibration(weights, -2.0)
    args = (np.array([0.3, -0.2]), np.array([[2, 1], [0, 0]]), np.array([[5, 2], [1, 1]]), np.array([6, 0]), np.array([30, 3]))
    np.testing.assert_allclose(cal.logits(*args), affinity_design(*args) @ np.array(weights) - 2.0)
    assert AffinityCalibration.from_dict(cal.to_dict()) == cal


@pytest.mark.parametrize("saved, message", [
    ({"weights": [1, 2, 3], "intercept": 0.0}, "expected 13 finite weights"),
    ({"weights": [float("nan")] * 13, "intercept": 0.0}, "expected 13 finite weights"),
    ({"weights": [0.0] * 13, "intercept": float("inf")}, "finite intercept"),
    ({"features": ["logit", "clicks"], "weights": [1, 2], "intercept": 0.0}, "expected \\['logit'"),
])
def test_a_bad_saved_affinity_is_refused(saved, message):
    with pytest.raises(ValueError, match=message):
        AffinityCalibration.from_dict(saved)


def _sample(rng, n):
    logits = rng.normal(0, 1, n)
    history = rng.integers(0, 40, n)
    skipped = rng.integers(0, 300, n)
    clicks = np.minimum(rng.integers(0, 10, (n, 2)), history[:, None])
    skips = np.minimum(rng.integers(0, 60, (n, 2)), skipped[:, None])
    return logits, clicks, skips, history, skipped


def test_the_fit_is_sklearns_logistic_regression_on_the_standardised_design_mapped_back():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    logits, clicks, skips, history, skipped = _sample(rng, 20_000)
    x = affinity_design(logits, clicks, skips, history, skipped)
    z = 0.8 * logits + 0.6 * x[:, 1] - 0.4 * x[:, 2] + 1.5 * x[:, 3] - 2.0
    labels = (rng.random(len(z)) < 1 / (1 + np.exp(-z))).astype(np.int8)
    cal = fit_affinity_calibration(logits, clicks, skips, history, skipped, labels, np.arange(len(z)) // 20)
    mean, scale = x.mean(0), x.std(0)
    reference = LogisticRegression(C=1.0, max_iter=2000).fit((x - mean) / scale, labels)
    np.testing.assert_allclose(cal.logits(logits, clicks, skips, history, skipped),
                               reference.decision_function((x - mean) / scale), atol=1e-6)
    # and it finds the probabilities that drew the clicks
    fitted = 1 / (1 + np.exp(-cal.logits(logits, clicks, skips, history, skipped)))
    assert np.abs(fitted - 1 / (1 + np.exp(-z))).mean() < 0.015


def test_a_store_without_skips_gives_constant_columns_a_zero_weight():
    rng = np.random.default_rng(1)
    logits, clicks, _, history, _ = _sample(rng, 5_000)
    zeros = np.zeros((5_000, 2), dtype=np.int64)
    labels = (rng.random(5_000) < 1 / (1 + np.exp(-(logits - 2)))).astype(np.int8)
    cal = fit_affinity_calibration(logits, clicks, zeros, history, np.zeros(5_000, np.int64), labels, np.arange(5_000))
    skip_columns = [FEATURES.index(f"{k}_{c}") for k in ("category", "subcategory") for c in ("log_skips", "skip_share")]
    assert all(cal.weights[i] == 0.0 for i in skip_columns + [FEATURES.index("log_skips")])
    assert np.isfinite(cal.weights).all()


def test_a_large_window_is_fitted_on_whole_impressions_of_a_seeded_sample(monkeypatch):
    rng = np.random.default_rng(2)
    logits, clicks, skips, history, skipped = _sample(rng, 4_000)
    labels = (rng.random(4_000) < 0.2).astype(np.int8)
    owner = np.arange(4_000) // 10
    seen = []
    real = affinity.affinity_design

    def spy(*args):
        seen.append(args[0].copy())
        return real(*args)

    monkeypatch.setattr(affinity, "MAX_FIT_ROWS", 1_000)
    monkeypatch.setattr(affinity, "affinity_design", spy)
    first = fit_affinity_calibration(logits, clicks, skips, history, skipped, labels, owner, seed=3)
    assert first == fit_affinity_calibration(logits, clicks, skips, history, skipped, labels, owner, seed=3)
    rows = np.flatnonzero(np.isin(logits, seen[0]))
    assert 500 < len(rows) < 1_600
    kept = np.unique(owner[rows])
    assert np.array_equal(np.flatnonzero(np.isin(owner, kept)), rows)  # whole impressions


def test_a_single_class_window_is_refused():
    logits, clicks, skips, history, skipped = _sample(np.random.default_rng(3), 100)
    with pytest.raises(ValueError, match="clicks and non-clicks"):
        fit_affinity_calibration(logits, clicks, skips, history, skipped, np.zeros(100, np.int8), np.arange(100))


def test_a_subcategory_is_keyed_within_its_category_and_unknown_keys_read_minus_one():
    vocabulary = KeyVocabulary.of(["sports", "news", "sports"], ["local", "local", "golf"])
    codes = vocabulary.codes(["news", "sports", "sports", "travel", "news"], ["local", "local", "golf", "local", "golf"])
    assert vocabulary.sizes == (2, 3)
    assert codes[0, 0] != codes[1, 0] and codes[0, 1] != codes[1, 1]  # "local" of news is not "local" of sports
    assert codes[1, 0] == codes[2, 0] and codes[1, 1] != codes[2, 1]
    assert list(codes[3]) == [-1, -1] and codes[4, 0] == codes[0, 0] and codes[4, 1] == -1


def test_skip_counts_count_each_article_once_per_user_and_key_and_read_zero_where_nothing_is_known():
    categories = ["sports", "sports", "news", "weather", "sports"]
    subcategories = ["golf", "tennis", "local", "storms", "golf"]
    codes = KeyVocabulary.of(categories, subcategories).codes(categories, subcategories)
    codes[3] = -1  # an article whose keys are unknown: in its reader's total only
    users = np.array(["a", "b", "c"], dtype=object)
    # a skipped 0 twice, 1, 3 and 4; b skipped 2 and 4; c nothing
    user_index = np.array([0, 0, 0, 0, 0, 1, 1])
    item_rows = np.array([0, 0, 1, 3, 4, 2, 4])
    counts = SkipCounts.from_pairs(users, user_index, item_rows, codes)
    cand = codes[[0, 2, 1, 4, 0]]
    keys, totals = counts.lookup(np.array(["a", "a", "b", "c", "nobody"], dtype=object), cand)
    # a: sports 0, 1, 4 (golf 0 and 4, tennis 1), news none, 4 articles in all
    np.testing.assert_array_equal(keys, [[3, 2], [0, 0], [1, 0], [0, 0], [0, 0]])
    np.testing.assert_array_equal(totals, [4, 4, 2, 0, 0])
    empty = SkipCounts.from_pairs(users[:0], np.zeros(0, np.int64), np.zeros(0, np.int64), codes)
    np.testing.assert_array_equal(empty.lookup(np.array(["a"], dtype=object), codes[:1])[0], [[0, 0]])


def test_skip_counts_match_a_loop():
    rng = np.random.default_rng(5)  # the publisher's two keys and two content clusters
    codes = np.column_stack([rng.integers(-1, 5, 80), rng.integers(-1, 12, 80), rng.integers(0, 7, 80), rng.integers(-1, 3, 80)])
    users = np.array([f"u{i}" for i in range(40)], dtype=object)
    user_index, item_rows = rng.integers(0, 40, 3000), rng.integers(0, 80, 3000)
    counts = SkipCounts.from_pairs(users, user_index, item_rows, codes)
    asked_users, asked_items = rng.integers(0, 45, 500), rng.integers(0, 80, 500)
    names = np.array([f"u{i}" for i in asked_users], dtype=object)
    keys, totals = counts.lookup(names, codes[asked_items])
    for j, (u, c) in enumerate(zip(asked_users, asked_items)):
        skipped = set(item_rows[user_index == u].tolist()) if u < 40 else set()
        assert totals[j] == len(skipped)
        for k in range(4):
            expected = sum(1 for r in skipped if codes[r, k] == codes[c, k]) if codes[c, k] >= 0 else 0
            assert keys[j, k] == expected


def _brute_force_history_counts(owner, cand_codes, offsets, items, item_codes):
    clicks = np.zeros((len(owner), item_codes.shape[1]), dtype=np.int64)
    for j, i in enumerate(owner):
        hist = items[offsets[i]:offsets[i + 1]]
        for k in range(item_codes.shape[1]):
            if cand_codes[j, k] >= 0:
                clicks[j, k] = sum(1 for h in hist if item_codes[h, k] == cand_codes[j, k])
    return clicks, np.diff(offsets)[owner]


def test_history_key_counts_match_a_loop():
    rng = np.random.default_rng(4)
    item_codes = np.column_stack([rng.integers(-1, 4, 60), rng.integers(-1, 9, 60), rng.integers(-1, 5, 60)])
    lengths = rng.integers(0, 12, 30)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    items = rng.integers(0, 60, offsets[-1])
    owner = rng.integers(0, 30, 500)
    cand_codes = item_codes[rng.integers(0, 60, 500)]
    got = history_key_counts(owner, cand_codes, offsets, items, item_codes)
    expected = _brute_force_history_counts(owner, cand_codes, offsets, items, item_codes)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_affinity_inputs_read_each_impressions_history_and_its_users_skips():
    vocabulary = KeyVocabulary.of(["a", "a", "b", "b"], ["x", "y", "x", "z"])
    item_codes = vocabulary.codes(["a", "a", "b", "b"], ["x", "y", "x", "z"])
    imps = Impressions(
        impression_ids=np.array([1, 2]), user_ids=np.array(["u", "v"], dtype=object),
        times=np.array(["2019-11-15T00:00", "2019-11-15T01:00"], dtype="datetime64[s]"),
        history_offsets=np.array([0, 3, 3]), history_items=np.array([0, 1, 2], np.int32),
        candidate_offsets=np.array([0, 2, 4]), candidate_items=np.array([1, 3, 0, 2], np.int32),
        labels=np.array([1, 0, 0, 1], np.int8),
    )
    skips = SkipCounts.from_pairs(np.array(["v"], dtype=object), np.array([0, 0, 0]), np.array([2, 2, 2]), item_codes)
    clicks, skip_keys, history, skipped = affinity_inputs(imps, skips, item_codes, 50)
    # u's history: (a,x), (a,y), (b,x); candidates (a,y) and (b,z). v: no history, skipped (b,x)
    # three times, one article
    np.testing.assert_array_equal(clicks, [[2, 1], [1, 0], [0, 0], [0, 0]])
    np.testing.assert_array_equal(skip_keys, [[0, 0], [0, 0], [0, 0], [1, 1]])
    np.testing.assert_array_equal(history, [3, 3, 0, 0])
    np.testing.assert_array_equal(skipped, [0, 0, 1, 1])
    # The user encoder reads the first history_len (the newest): a history read for a model with
    # a longer cap is counted as this model reads it, (a,x) and (a,y) only.
    clicks, _, history, _ = affinity_inputs(imps, skips, item_codes, 2)
    np.testing.assert_array_equal(clicks, [[2, 1], [0, 0], [0, 0], [0, 0]])
    np.testing.assert_array_equal(history, [2, 2, 0, 0])


def test_first_of_each_cuts_every_list_to_its_first_entries():
    offsets, items = np.array([0, 3, 3, 8, 9]), np.arange(9) * 10
    cut_offsets, cut = first_of_each(offsets, items, 2)
    assert cut_offsets.tolist() == [0, 2, 2, 4, 5] and cut.tolist() == [0, 10, 30, 40, 80]
    same_offsets, same = first_of_each(offsets, items, 100)
    assert same_offsets.tolist() == offsets.tolist() and same.tolist() == items.tolist()


def test_a_category_named_with_any_characters_keys_its_subcategories_apart():
    vocabulary = KeyVocabulary.of(["a\x1fb", "a"], ["c", "b\x1fc"])
    assert vocabulary.sizes == (2, 2)


def _blobs(rng, centres: np.ndarray, per: int, spread: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(len(centres) * per, a) unit rows scattered around each unit centre, and their blob."""
    label = np.repeat(np.arange(len(centres)), per)
    x = centres[label] + rng.normal(0, spread, (len(label), centres.shape[1]))
    return x / np.linalg.norm(x, axis=1, keepdims=True), label


def _unit(rng, k: int, a: int) -> np.ndarray:
    x = rng.normal(size=(k, a))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two labelings group the rows alike (up to renaming)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_content_clusters_recover_separated_themes_per_block_and_code_the_nearest_centre():
    from recsys.models.affinity import ContentClusters

    rng = np.random.default_rng(0)
    text, topic = _blobs(rng, np.eye(6)[:4], 50)  # four themes, well apart
    image, _ = _blobs(rng, _unit(rng, 3, 6), 67)
    image = image[rng.permutation(len(image))[: len(text)]]
    no_cover = np.arange(len(text)) % 10 == 0
    image[no_cover] = 0.0  # a missing cover is a zero block
    anchors = np.column_stack([text, image]).astype(np.float32)
    clusters = ContentClusters.fit(anchors, ("text", "image"), np.arange(0, len(anchors), 2), 4, seed=1)
    assert clusters.blocks == ("text", "image") and clusters.offsets == (0, 6)
    assert clusters.keys == ("text_cluster", "image_cluster")
    codes = clusters.codes(anchors)
    assert codes.shape == (len(anchors), 2) and codes.dtype == np.int64
    assert _same_partition(codes[:, 0], topic)  # the rows not fitted on too
    assert (codes[no_cover, 1] == -1).all() and (codes[~no_cover, 1] >= 0).all()
    for b, table in enumerate(clusters.centres):  # nearest centre, by a loop
        centres = np.array(table)
        for row in range(0, len(anchors), 7):
            x = anchors[row, 6 * b : 6 * b + 6].astype(np.float64)
            if x @ x > 0.5:
                assert codes[row, b] == int(np.argmax([x @ c for c in centres]))
    assert ContentClusters.from_dict(clusters.to_dict()) == clusters


def test_a_block_without_usable_rows_is_left_out_and_fewer_rows_than_centres_fit_fewer():
    from recsys.models.affinity import ContentClusters

    rng = np.random.default_rng(2)
    anchors = np.column_stack([_unit(rng, 5, 4), np.zeros((5, 4))]).astype(np.float32)  # no covers at all
    clusters = ContentClusters.fit(anchors, ("text", "image"), np.arange(5), 16, seed=0)
    assert clusters.blocks == ("text",) and len(clusters.centres[0]) == 5
    assert clusters.codes(anchors).shape == (5, 1)
    assert ContentClusters.fit(np.zeros((5, 8), np.float32), ("text", "image"), np.arange(5), 16, seed=0) is None


def test_clusters_expressed_in_a_rotated_anchor_space_code_the_same_articles_alike():
    """The refit's networks read anchors on another basis: the same clusters, re-centred on the
    new anchors of their members, code the articles as before."""
    from recsys.models.affinity import ContentClusters

    rng = np.random.default_rng(3)
    text, _ = _blobs(rng, _unit(rng, 5, 8), 40)
    anchors = text.astype(np.float32)
    clusters = ContentClusters.fit(anchors, ("text",), np.arange(len(anchors)), 5, seed=0)
    rotation = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    rotated = (anchors @ rotation).astype(np.float32)
    before = clusters.codes(anchors)
    moved = clusters.expressed_in(rotated, before, np.arange(len(anchors)))
    np.testing.assert_array_equal(moved.codes(rotated), before)
    assert clusters.codes(rotated).tolist() != before.tolist()  # the old centres do not fit the new space


def test_the_affinity_with_clusters_reads_their_codes_after_the_publishers_and_survives_a_round_trip():
    from recsys.models.affinity import ContentClusters, design_features

    clusters = ContentClusters(("text", "image"), (0, 2), (((1.0, 0.0), (0.0, 1.0)), ((0.6, 0.8), (-0.6, -0.8), (1.0, 0.0))))
    features = design_features(("category", "subcategory", "text_cluster", "image_cluster"))
    assert len(features) == 23 and features[11:13] == ("text_cluster_log_clicks", "text_cluster_log_skips")
    cal = AffinityCalibration(tuple(np.linspace(-1, 1, 23)), 0.5, clusters)
    assert cal.features == features and cal.to_dict()["features"] == list(features)
    assert AffinityCalibration.from_dict(cal.to_dict()) == cal
    publisher = np.array([[0, 1], [1, -1], [0, 0]])
    anchors = np.array([[0.9, 0.1, 0.0, 0.0], [0.1, -0.9, -0.5, -0.9], [0.2, 0.9, 1.0, 0.1]], np.float32)
    anchors[:, :2] /= np.linalg.norm(anchors[:, :2], axis=1, keepdims=True)
    np.testing.assert_array_equal(cal.item_codes(publisher, anchors), [[0, 1, 0, -1], [1, -1, 0, 1], [0, 0, 1, 2]])
    with pytest.raises(ValueError, match="need the anchors of the 3 articles"):
        cal.item_codes(publisher, None)
    args = (np.array([0.3]), np.array([[2, 1, 0, 3]]), np.array([[5, 2, 1, 0]]), np.array([6]), np.array([30]))
    np.testing.assert_allclose(cal.logits(*args), affinity_design(*args) @ np.array(cal.weights) + 0.5)
    assert AffinityCalibration.from_dict({"weights": [0.0] * 13, "intercept": 0.0}).clusters is None  # an older bundle


@pytest.mark.parametrize("clusters, message", [
    ({"blocks": ["text"], "offsets": [0], "centres": [[[1.0, 0.0], [0.0]]]}, "widths \\[1, 2\\]"),
    ({"blocks": ["text"], "offsets": [0, 2], "centres": [[[1.0, 0.0]]]}, "1 blocks, 2 offsets"),
    ({"blocks": ["text"], "offsets": [0], "centres": [[[float("nan"), 0.0]]]}, "at least one finite centre"),
    ({"blocks": ["text"], "centres": [[[1.0, 0.0]]]}, "unreadable content clusters"),
])
def test_bad_saved_clusters_are_refused(clusters, message):
    weights = [0.0] * 18
    with pytest.raises(ValueError, match=message):
        AffinityCalibration.from_dict({"weights": weights, "intercept": 0.0, "clusters": clusters})


def test_codes_of_vectors_narrower_than_the_clusters_read_are_refused():
    from recsys.models.affinity import ContentClusters

    clusters = ContentClusters(("text", "image"), (0, 2), (((1.0, 0.0),), ((1.0, 0.0),)))
    with pytest.raises(ValueError, match="read anchor columns 2 .. 3; the vectors have 3 anchor columns"):
        clusters.codes(np.ones((4, 3), np.float32))


def test_a_seed_beyond_a_c_int_fits_as_its_remainder_and_an_empty_centre_codes_no_one():
    from recsys.models.affinity import ContentClusters

    rng = np.random.default_rng(5)
    anchors = _blobs(rng, np.eye(4)[:3], 20)[0].astype(np.float32)
    rows = np.arange(len(anchors))
    assert ContentClusters.fit(anchors, ("text",), rows, 3, 2**32 - 1) == ContentClusters.fit(anchors, ("text",), rows, 3, 2**31 - 1)
    # A row whose inner product with every real centre is negative still takes one of them.
    clusters = ContentClusters(("text",), (0,), (((1.0, 0.0), (0.0, 1.0), (0.0, 0.0)),))
    np.testing.assert_array_equal(clusters.codes(np.array([[-0.6, -0.8], [0.6, 0.8]], np.float32))[:, 0], [0, 1])
