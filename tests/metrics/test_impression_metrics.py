"""ImpressionMetrics: every number against the one-impression functions, sklearn or bootstrap_ci."""

import numpy as np
import pytest
import sklearn.metrics

from recsys.metrics import accumulator as accumulator_module
from recsys.metrics.accumulator import (
    ARTICLE_AGE_ORDER,
    HISTORY_LENGTH_ORDER,
    METRICS,
    ImpressionMetrics,
    article_age_bucket,
    article_age_buckets,
    history_length_bucket,
)
from recsys.metrics.bootstrap import bootstrap_ci
from recsys.metrics.calibration import reliability_curve
from recsys.metrics.classification import log_loss
from recsys.metrics.ranking import MetricInputError, mind_scores, ranks_from_scores, scores_from_ranks

MODELS = ("good", "noisy", "count")
CATEGORIES = np.array(["news", "sports", "finance", "lifestyle"])


def _world(num_impressions=300, seed=0):
    """Impressions with labels, three models' scores and group values; some unlabelled."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num_impressions):
        n = int(rng.integers(2, 25))
        p = rng.beta(1, 8, n)
        labels = (rng.random(n) < p).astype(int)
        if i % 40 == 7:
            labels[:] = -1
        scores = {
            "good": np.clip(p + rng.normal(0, 0.03, n), 0, 1),
            "noisy": rng.random(n) * 0.5 + p * 0.5,
            "count": rng.integers(0, 4, n).astype(float),  # ties, and not probabilities
        }
        item_groups = {"category": CATEGORIES[rng.integers(0, 4, n)], "has_image": rng.random(n) < 0.7}
        impression_groups = {"history_length": history_length_bucket(int(rng.integers(0, 15)), short_max=5)}
        out.append((labels, scores, item_groups, impression_groups))
    return out


def _accumulate(world, **options):
    acc = ImpressionMetrics(
        MODELS,
        item_groups=("category", "has_image"),
        impression_groups=("history_length",),
        group_order={"history_length": HISTORY_LENGTH_ORDER},
        num_resamples=options.pop("num_resamples", 300),
        breakdown_resamples=options.pop("breakdown_resamples", 100),
        **options,
    )
    for labels, scores, item_groups, impression_groups in world:
        acc.add(labels, scores, item_groups=item_groups, impression_groups=impression_groups)
    return acc


@pytest.fixture(scope="module")
def world():
    return _world()


@pytest.fixture(scope="module")
def result(world):
    return _accumulate(world).result()


def _labelled(world):
    return [w for w in world if w[0][0] != -1]


def test_counts(world, result):
    labelled = _labelled(world)
    assert result["num_impressions"] == len(world)
    assert result["num_unlabelled"] == len(world) - len(labelled)
    assert result["num_labelled_impressions"] == len(labelled)
    assert result["num_candidates"] == sum(len(w[0]) for w in labelled)
    assert result["num_clicked"] == sum(int(w[0].sum()) for w in labelled)
    single = sum(1 for w in labelled if w[0].sum() in (0, len(w[0])))
    assert result["num_single_class"] == single
    assert result["num_scored"] == len(labelled) - single


@pytest.mark.parametrize("model", MODELS)
def test_ranking_metrics_equal_mind_scores_on_prediction_file_ranks(world, result, model):
    labelled = _labelled(world)
    expected = mind_scores([w[0] for w in labelled], [scores_from_ranks(ranks_from_scores(w[1][model])) for w in labelled])
    for metric in ("impression_auc", "mrr", "ndcg@5", "ndcg@10"):
        assert result["models"][model]["metrics"][metric]["value"] == pytest.approx(expected[metric], abs=1e-12)


@pytest.mark.parametrize("model", MODELS)
def test_pooled_auc_and_log_loss_equal_sklearn_on_float32_scores(world, result, model):
    labelled = _labelled(world)
    labels = np.concatenate([w[0] for w in labelled])
    scores = np.concatenate([w[1][model] for w in labelled]).astype(np.float32).astype(np.float64)
    metrics = result["models"][model]["metrics"]
    assert metrics["pooled_auc"]["value"] == pytest.approx(sklearn.metrics.roc_auc_score(labels, scores), abs=1e-12)
    if model == "count":
        assert metrics["log_loss"] == {"value": None, "ci_low": None, "ci_high": None}
        assert result["models"][model]["calibration"] is None
        assert not result["models"][model]["probabilistic"]
    else:
        assert metrics["log_loss"]["value"] == pytest.approx(log_loss(labels, scores), abs=1e-12)
        curve = reliability_curve(labels, scores, num_bins=10, strategy="quantile")
        calibration = result["models"][model]["calibration"]
        assert calibration["ece"] == pytest.approx(curve.expected_calibration_error(), abs=1e-12)
        assert calibration["num_bins"] == len(calibration["bins"]) == len(curve.counts)


def test_intervals_equal_bootstrap_ci_of_the_per_impression_values(world, result):
    # Same seed and same number of impressions: the same resamples as bootstrap_ci.
    labelled = _labelled(world)
    per_impression = []
    for labels, scores, _, _ in labelled:
        if 0 < labels.sum() < len(labels):
            per_impression.append(sklearn.metrics.roc_auc_score(labels, scores_from_ranks(ranks_from_scores(scores["good"]))))
        else:
            per_impression.append(np.nan)
    ci = bootstrap_ci(np.array(per_impression), num_resamples=300, seed=0)
    got = result["models"]["good"]["metrics"]["impression_auc"]
    assert (got["value"], got["ci_low"], got["ci_high"]) == pytest.approx(tuple(ci), abs=1e-12)


def test_every_interval_holds_its_value(result):
    for entry in result["models"].values():
        for metric, values in entry["metrics"].items():
            if values["value"] is not None:
                assert values["ci_low"] <= values["value"] <= values["ci_high"], metric


def test_differences_to_the_first_model(result):
    first = result["models"]["good"]
    for name, entry in result["models"].items():
        for metric in METRICS:
            value, reference = entry["metrics"][metric]["value"], first["metrics"][metric]["value"]
            if value is None:
                assert entry["diff_to_first"][metric] is None
                continue
            assert entry["diff_to_first"][metric] == pytest.approx(value - reference)
    noisy = result["models"]["noisy"]["diff_to_first_ci"]["impression_auc"]
    assert noisy["ci_high"] < 0  # clearly worse than the good model
    assert result["models"]["good"]["diff_to_first_ci"]["mrr"] == {"ci_low": 0.0, "ci_high": 0.0}


def test_tied_impressions_are_counted(world, result):
    labelled = _labelled(world)
    expected = sum(1 for w in labelled if len(np.unique(w[1]["count"])) < len(w[1]["count"]))
    assert result["models"]["count"]["tied_impressions"] == expected
    assert result["models"]["noisy"]["tied_impressions"] == 0


def test_item_group_breakdown_scores_each_group_within_each_impression(world, result):
    labelled = _labelled(world)
    breakdown = result["models"]["noisy"]["breakdowns"]["category"]
    for category in CATEGORIES:
        labels_in, scores_in = [], []
        for labels, scores, item_groups, _ in labelled:
            mask = item_groups["category"] == category
            if mask.any():
                ranks = ranks_from_scores(scores["noisy"])[mask]
                labels_in.append(labels[mask])
                scores_in.append(1.0 / ranks)
        expected = mind_scores(labels_in, scores_in)
        entry = breakdown[category]
        assert entry["num_impressions"] == len(labels_in)
        assert entry["num_scored"] == expected["num_scored"]
        assert entry["num_candidates"] == sum(len(x) for x in labels_in)
        for metric in ("impression_auc", "mrr", "ndcg@5", "ndcg@10"):
            assert entry["metrics"][metric]["value"] == pytest.approx(expected[metric], abs=1e-12)
        flat_labels = np.concatenate(labels_in)
        flat_scores = np.concatenate(
            [scores["noisy"][item_groups["category"] == category] for _, scores, item_groups, _ in labelled]
        ).astype(np.float32)
        assert entry["metrics"]["pooled_auc"]["value"] == pytest.approx(
            sklearn.metrics.roc_auc_score(flat_labels, flat_scores), abs=1e-12
        )
        assert entry["metrics"]["log_loss"]["value"] == pytest.approx(log_loss(flat_labels, flat_scores), abs=1e-9)
        assert entry["metrics"]["impression_auc"]["ci_low"] <= entry["metrics"]["impression_auc"]["value"]


def test_impression_group_breakdown_restricts_to_those_impressions(world, result):
    labelled = _labelled(world)
    breakdown = result["models"]["good"]["breakdowns"]["history_length"]
    assert list(breakdown) == [g for g in HISTORY_LENGTH_ORDER if g in breakdown]
    for group, entry in breakdown.items():
        chosen = [w for w in labelled if w[3]["history_length"] == group]
        expected = mind_scores([w[0] for w in chosen], [1.0 / ranks_from_scores(w[1]["good"]) for w in chosen])
        assert entry["num_impressions"] == len(chosen)
        assert entry["metrics"]["mrr"]["value"] == pytest.approx(expected["mrr"], abs=1e-12)
        labels = np.concatenate([w[0] for w in chosen])
        scores = np.concatenate([w[1]["good"] for w in chosen]).astype(np.float32)
        assert entry["metrics"]["pooled_auc"]["value"] == pytest.approx(sklearn.metrics.roc_auc_score(labels, scores), abs=1e-12)


def test_boolean_groups_become_text_keys(result):
    assert set(result["models"]["good"]["breakdowns"]["has_image"]) == {"True", "False"}


def test_add_batch_small_flushes_and_small_chunks_give_the_same_result(world, result, monkeypatch):
    monkeypatch.setattr(accumulator_module, "_FLUSH_CANDIDATES", 50)
    monkeypatch.setattr(accumulator_module, "_CHUNK_CANDIDATES", 40)
    acc = ImpressionMetrics(
        MODELS, item_groups=("category", "has_image"), impression_groups=("history_length",),
        group_order={"history_length": HISTORY_LENGTH_ORDER}, num_resamples=300, breakdown_resamples=100,
    )
    for start in range(0, len(world), 37):
        part = world[start : start + 37]
        offsets = np.r_[0, np.cumsum([len(w[0]) for w in part])]
        acc.add_batch(
            np.concatenate([w[0] for w in part]),
            {m: np.concatenate([w[1][m] for w in part]) for m in MODELS},
            offsets,
            item_groups={g: np.concatenate([w[2][g] for w in part]) for g in ("category", "has_image")},
            impression_groups={"history_length": [w[3]["history_length"] for w in part]},
        )
    assert acc.result() == result


def test_no_labelled_impression_gives_empty_metrics():
    acc = ImpressionMetrics(["a"], item_groups=("category",))
    acc.add([-1, -1], {"a": [0.1, 0.2]}, item_groups={"category": ["x", "y"]})
    out = acc.result()
    assert out["num_unlabelled"] == 1 and out["num_labelled_impressions"] == 0
    assert out["models"]["a"]["metrics"]["mrr"] == {"value": None, "ci_low": None, "ci_high": None}
    assert out["models"]["a"]["breakdowns"] == {"category": {}}


def test_no_labelled_impression_leaves_probabilistic_unknown():
    # A click count was reported as probabilistic: nothing had been seen to say otherwise.
    acc = ImpressionMetrics(["p", "count"])
    acc.add_batch([-1, -1, -1, -1, -1], {"p": [0.1, 0.2, 0.3, 0.4, 0.5], "count": [3.0, 7.0, 1.0, 2.0, 9.0]}, [0, 2, 5])
    assert [acc.result()["models"][m]["probabilistic"] for m in ("p", "count")] == [None, None]
    acc.add([1, 0], {"p": [0.9, 0.1], "count": [5.0, 2.0]})
    assert [acc.result()["models"][m]["probabilistic"] for m in ("p", "count")] == [True, False]


def test_a_score_of_exactly_one_is_still_a_probability():
    # 1.0 is a certain click, not a count: log loss and calibration are still reported,
    # the 1.0 clipped to 1 - 1e-7 as log_loss clips it. (Values exact in float32.)
    acc = ImpressionMetrics(["p"], num_resamples=20)
    acc.add([1, 0], {"p": [1.0, 0.25]})
    acc.add([0, 1], {"p": [0.5, 0.75]})
    out = acc.result()["models"]["p"]
    assert out["probabilistic"] is True
    assert out["calibration"] is not None
    expected = sklearn.metrics.log_loss([1, 0, 0, 1], np.clip([1.0, 0.25, 0.5, 0.75], 1e-7, 1 - 1e-7))
    assert out["metrics"]["log_loss"]["value"] == pytest.approx(expected, rel=1e-9)


def test_calibration_uses_the_num_bins_asked_for():
    probs = np.arange(1, 25) / 32  # 24 distinct probabilities, exact in float32
    labels = np.arange(24) % 3 == 0
    acc = ImpressionMetrics(["p"], num_resamples=20, num_bins=4)
    for start in range(0, 24, 6):
        acc.add(labels[start : start + 6].astype(int), {"p": probs[start : start + 6]})
    calibration = acc.result()["models"]["p"]["calibration"]
    expected = reliability_curve(labels.astype(int), probs, num_bins=4, strategy="quantile").bins()
    assert calibration["num_bins"] == 4 and len(expected) == 4
    assert calibration["bins"] == expected


def test_groups_without_a_declared_order_come_most_candidates_first():
    # First seen in the order a, b, c (also alphabetical): 1, 3 and 5 candidates.
    acc = ImpressionMetrics(["a"], item_groups=("category",), num_resamples=20)
    acc.add([1, 0, 0, 1, 0], {"a": [0.9, 0.1, 0.2, 0.3, 0.4]}, item_groups={"category": ["a", "b", "b", "b", "c"]})
    acc.add([0, 1, 0, 1], {"a": [0.5, 0.6, 0.7, 0.8]}, item_groups={"category": ["c", "c", "c", "c"]})
    breakdown = acc.result()["models"]["a"]["breakdowns"]["category"]
    assert list(breakdown) == ["c", "b", "a"]


def test_only_single_class_impressions_leave_per_impression_metrics_undefined():
    acc = ImpressionMetrics(["a"], num_resamples=20)
    acc.add([1, 1], {"a": [0.9, 0.2]})
    acc.add([0, 0, 0], {"a": [0.1, 0.3, 0.2]})
    out = acc.result()["models"]["a"]["metrics"]
    assert out["impression_auc"]["value"] is None
    assert out["pooled_auc"]["value"] == pytest.approx(sklearn.metrics.roc_auc_score([1, 1, 0, 0, 0], [0.9, 0.2, 0.1, 0.3, 0.2]))


def test_buckets():
    assert [history_length_bucket(n) for n in (0, 1, 10, 11)] == ["cold", "short", "short", "long"]
    assert [article_age_bucket(h) for h in (None, float("nan"), 1, 6, 30, 100)] == [
        "unknown", "unknown", "< 6 h", "6-24 h", "1-3 d", "> 3 d",
    ]
    assert set(ARTICLE_AGE_ORDER) >= {article_age_bucket(h) for h in (None, 1, 6, 30, 100)}
    with pytest.raises(MetricInputError, match="history length is -1, expected >= 0"):
        history_length_bucket(-1)


def _one(**changes):
    acc = ImpressionMetrics(["a", "b"], item_groups=("category",), impression_groups=("history_length",))
    args = {
        "labels": [1, 0],
        "scores": {"a": [0.1, 0.2], "b": [0.3, 0.4]},
        "item_groups": {"category": ["x", "y"]},
        "impression_groups": {"history_length": "cold"},
    }
    args.update(changes)
    acc.add(args["labels"], args["scores"], item_groups=args["item_groups"], impression_groups=args["impression_groups"])


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"labels": [1, 2]}, "impression 0 has label 2, expected 0 or 1"),
        ({"labels": [1, -1]}, "impression 0 has label -1, expected 0 or 1 \\(or -1 for every candidate"),
        ({"labels": []}, "expected 1 to 65535 candidates"),
        ({"scores": {"a": [0.1, 0.2]}}, r"scores lacks \['b'\] and has unknown \[\], expected exactly \['a', 'b'\]"),
        ({"scores": {"a": [0.1, 0.2], "b": [0.3, 0.4], "c": [0, 0]}}, r"has unknown \['c'\]"),
        ({"scores": {"a": [0.1], "b": [0.3, 0.4]}}, r"scores of model 'a' have shape \(1,\), expected \(2,\)"),
        ({"scores": {"a": [0.1, np.nan], "b": [0.3, 0.4]}}, "model 'a' scores nan, expected finite scores"),
        ({"item_groups": {"category": ["x"]}}, r"item_groups\['category'\] has 1 values, expected 2"),
        ({"item_groups": None}, r"item_groups lacks \['category'\]"),
        ({"impression_groups": {}}, r"impression_groups lacks \['history_length'\]"),
    ],
)
def test_bad_impressions_are_rejected(changes, message):
    with pytest.raises(MetricInputError, match=message):
        _one(**changes)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda acc: acc.add_batch([1, 0, -1], {"a": [0.1, 0.2, 0.3]}, [0, 3]), "impression 0 mixes labels -1 with 0/1"),
        (lambda acc: acc.add_batch([1, 0], {"a": [0.1, 0.2]}, [0, 1]), "offsets run from 0 to 1, expected 0 to 2"),
        (lambda acc: acc.add_batch([1, 0, 5], {"a": [0.1, 0.2, 0.3]}, [0, 2, 3]), "impression 1 has label 5"),
        (lambda acc: acc.add_batch([1, 0], {"a": [0.1, np.inf]}, [0, 1, 2]), "impression 1: model 'a' scores inf"),
        (lambda acc: acc.add_batch([[1, 0]], {"a": [0.1, 0.2]}, [0, 2]), "expected a 1-D array"),
        (lambda acc: acc.add_batch([1, 0], {"a": [0.1, 0.2]}, [0, 2]), r"item_groups lacks \['g'\]"),
        (lambda acc: acc.add_batch([1, 0], {"a": [0.1]}, [0, 2]), r"scores of model 'a' have shape \(1,\), expected \(2,\)"),
        (lambda acc: acc.add_batch([1, 0], {"a": [0.1, 0.2]}, [[0, 2]]), r"offsets have shape \(1, 2\)"),
        (
            lambda acc: acc.add_batch([1, 0], {"a": [0.1, 0.2]}, [0, 2], item_groups={"g": ["x"]},
                                      impression_groups={"h": ["c"]}),
            r"item_groups\['g'\] has 1 values, expected 2",
        ),
        (
            lambda acc: acc.add_batch([1, 0], {"a": [0.1, 0.2]}, [0, 2], item_groups={"g": ["x", "y"]},
                                      impression_groups={"h": []}),
            r"impression_groups\['h'\] has 0 values, expected 1",
        ),
    ],
)
def test_bad_batches_are_rejected(call, message):
    with pytest.raises(MetricInputError, match=message):
        call(ImpressionMetrics(["a"], item_groups=("g",), impression_groups=("h",)))


def test_too_many_groups_are_rejected(monkeypatch):
    monkeypatch.setattr(accumulator_module, "MAX_GROUPS", 2)
    acc = ImpressionMetrics(["a"], item_groups=("g",))
    acc.add([1, 0, 0], {"a": [0.1, 0.2, 0.3]}, item_groups={"g": ["x", "y", "z"]})
    with pytest.raises(MetricInputError, match="group scheme 'g' has more than 2 distinct values"):
        acc.result()


def test_too_long_impressions_are_rejected(monkeypatch):
    monkeypatch.setattr(accumulator_module, "MAX_CANDIDATES", 3)
    acc = ImpressionMetrics(["a"])
    with pytest.raises(MetricInputError, match="impression 0 has 4 candidates, expected at most 3"):
        acc.add_batch([1, 0, 0, 0], {"a": [0.1, 0.2, 0.3, 0.4]}, [0, 4])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model_names": []}, "model_names is empty"),
        ({"model_names": ["a", "a"]}, r"model names repeat \['a'\]"),
        ({"model_names": ["a"], "item_groups": ["g"], "impression_groups": ["g"]}, r"group scheme names repeat \['g'\]"),
        ({"model_names": ["a"], "num_resamples": 0}, "num_resamples is 0, expected an integer >= 1"),
        ({"model_names": ["a"], "num_resamples": 10, "breakdown_resamples": 20}, "expected at most num_resamples"),
        ({"model_names": ["a"], "confidence": 95}, "confidence is 95"),
        ({"model_names": ["a"], "calibration_strategy": "kde"}, "calibration_strategy is 'kde'"),
        ({"model_names": ["a"], "group_order": {"age": ["new"]}}, r"group_order names unknown schemes \['age'\]"),
    ],
)
def test_bad_options_are_rejected(kwargs, message):
    with pytest.raises(MetricInputError, match=message):
        ImpressionMetrics(**kwargs)


def test_known_ordinal_groups_keep_their_order_without_being_told():
    acc = ImpressionMetrics(["a"], impression_groups=("history_length",), item_groups=("article_age",), num_resamples=20)
    rng = np.random.default_rng(0)
    for bucket in ["long"] * 5 + ["short"] * 3 + ["cold"]:
        acc.add(rng.integers(0, 2, 6), {"a": rng.random(6)}, impression_groups={"history_length": bucket},
                item_groups={"article_age": ["> 3 d", "> 3 d", "> 3 d", "< 6 h", "unknown", "6-24 h"]})
    breakdowns = acc.result()["models"]["a"]["breakdowns"]
    assert list(breakdowns["history_length"]) == ["cold", "short", "long"]
    assert list(breakdowns["article_age"]) == ["< 6 h", "6-24 h", "> 3 d", "unknown"]


def test_result_can_be_taken_again_after_more_impressions(world, result):
    acc = _accumulate(world[:100])
    acc.result()
    for labels, scores, item_groups, impression_groups in world[100:]:
        acc.add(labels, scores, item_groups=item_groups, impression_groups=impression_groups)
    assert acc.result() == result


# --- resampling readers (clusters) instead of impressions -----------------------------------


def _users(world, per_user=3, seed=1):
    """A user id per impression: about ``per_user`` impressions each, interleaved."""
    rng = np.random.default_rng(seed)
    return [f"U{u}" for u in rng.integers(0, max(1, len(world) // per_user), len(world))]


def _accumulate_clustered(world, users, **options):
    acc = ImpressionMetrics(
        MODELS, item_groups=("category", "has_image"), impression_groups=("history_length",),
        group_order={"history_length": HISTORY_LENGTH_ORDER}, num_resamples=300, breakdown_resamples=100,
        cluster_unit="user", **options,
    )
    for (labels, scores, item_groups, impression_groups), user in zip(world, users):
        acc.add(labels, scores, item_groups=item_groups, impression_groups=impression_groups, cluster=user)
    return acc


def test_user_intervals_equal_a_direct_cluster_bootstrap(world):
    from recsys.metrics.bootstrap import percentile_interval, resample_counts

    users = _users(world)
    got = _accumulate_clustered(world, users).result()
    assert got["bootstrap"]["unit"] == "user"
    # By hand: each resample draws users with replacement; an impression weighs as often as
    # its user was drawn. Users are numbered in order of first appearance.
    values, weights_of = [], []
    labelled_users = [u for w, u in zip(world, users) if w[0][0] != -1]
    order = {u: i for i, u in enumerate(dict.fromkeys(labelled_users))}
    for (labels, scores, _, _), user in zip(_labelled(world), labelled_users):
        scored = 0 < labels.sum() < len(labels)
        auc = sklearn.metrics.roc_auc_score(labels, scores_from_ranks(ranks_from_scores(scores["good"]))) if scored else 0.0
        values.append((auc, float(scored)))
        weights_of.append(order[user])
    a, b = np.array(values).T
    counts = np.concatenate(list(resample_counts(len(order), num_resamples=300, seed=0)))
    w = counts[:, weights_of]
    low, high = percentile_interval((w @ a) / (w @ b), confidence=0.95)
    metric = got["models"]["good"]["metrics"]["impression_auc"]
    assert metric["value"] == pytest.approx(a.sum() / b.sum(), abs=1e-12)
    assert (metric["ci_low"], metric["ci_high"]) == pytest.approx((float(low), float(high)), abs=1e-12)


def test_one_impression_per_user_gives_the_impression_bootstrap(world, result):
    distinct = [f"U{i}" for i in range(len(world))]
    got = _accumulate_clustered(world, distinct).result()
    assert got["bootstrap"].pop("unit") == "user"
    expected = {**result, "bootstrap": {k: v for k, v in result["bootstrap"].items() if k != "unit"}}
    assert got == expected


def test_repeated_impressions_of_a_reader_widen_the_user_interval(world):
    # Each reader's impression shown five times: five independent-looking copies of one draw.
    labelled = _labelled(world)[:100]
    copies = [w for w in labelled for _ in range(5)]
    users = [f"U{i}" for i in range(len(labelled)) for _ in range(5)]
    by_user = _accumulate_clustered(copies, users).result()["models"]["good"]
    by_impression = _accumulate(copies).result()["models"]["good"]
    for metric in ("impression_auc", "mrr"):
        width_user = by_user["metrics"][metric]["ci_high"] - by_user["metrics"][metric]["ci_low"]
        width_impression = by_impression["metrics"][metric]["ci_high"] - by_impression["metrics"][metric]["ci_low"]
        assert width_user > 1.8 * width_impression  # about sqrt(5) = 2.2
        assert by_user["metrics"][metric]["value"] == by_impression["metrics"][metric]["value"]
    diff_user = by_user["diff_to_first_ci"]["pooled_auc"]
    assert diff_user == {"ci_low": 0.0, "ci_high": 0.0}  # the reference model itself


def test_batches_with_clusters_equal_one_by_one(world, monkeypatch):
    users = _users(world)
    expected = _accumulate_clustered(world, users).result()
    monkeypatch.setattr(accumulator_module, "_FLUSH_CANDIDATES", 50)
    acc = ImpressionMetrics(
        MODELS, item_groups=("category", "has_image"), impression_groups=("history_length",),
        group_order={"history_length": HISTORY_LENGTH_ORDER}, num_resamples=300, breakdown_resamples=100,
        cluster_unit="user",
    )
    for start in range(0, len(world), 37):
        part, part_users = world[start : start + 37], users[start : start + 37]
        acc.add_batch(
            np.concatenate([w[0] for w in part]),
            {m: np.concatenate([w[1][m] for w in part]) for m in MODELS},
            np.r_[0, np.cumsum([len(w[0]) for w in part])],
            item_groups={g: np.concatenate([w[2][g] for w in part]) for g in ("category", "has_image")},
            impression_groups={"history_length": [w[3]["history_length"] for w in part]},
            clusters=np.array(part_users, dtype=object),
        )
    assert acc.result() == expected


def test_clusters_must_match_the_cluster_unit():
    with_users = ImpressionMetrics(["a"], cluster_unit="user")
    with pytest.raises(MetricInputError, match=r"impression 0: cluster missing, expected one per impression \(cluster_unit 'user'\)"):
        with_users.add([1, 0], {"a": [0.2, 0.1]})
    with pytest.raises(MetricInputError, match="impressions from 0: clusters has 1 values, expected 2"):
        with_users.add_batch([1, 0, 0, 1], {"a": [0.2, 0.1, 0.3, 0.4]}, [0, 2, 4], clusters=["U1"])
    plain = ImpressionMetrics(["a"])
    with pytest.raises(MetricInputError, match=r"cluster given, but this accumulator resamples impressions"):
        plain.add([1, 0], {"a": [0.2, 0.1]}, cluster="U1")
    with pytest.raises(MetricInputError, match="cluster_unit is 'impression', expected None or the name"):
        ImpressionMetrics(["a"], cluster_unit="impression")


def test_age_buckets_vectorised_match_the_edges_and_the_scalar_form():
    hours = np.array([0.0, 5.999, 6.0, 23.9, 24.0, 71.9, 72.0, 1e4, np.nan])
    expected = ["< 6 h", "< 6 h", "6-24 h", "6-24 h", "1-3 d", "1-3 d", "> 3 d", "> 3 d", "unknown"]
    assert article_age_buckets(hours).tolist() == expected
    assert [article_age_bucket(None if np.isnan(h) else float(h)) for h in hours] == expected


def _all_intervals(entry):
    """(where, interval dict) of every metric, difference and breakdown interval of a model entry."""
    for metric, interval in entry["metrics"].items():
        yield ("metrics", metric), interval
    for metric, interval in entry["diff_to_first_ci"].items():
        yield ("diff", metric), interval
    for scheme, groups in entry["breakdowns"].items():
        for group, counts in groups.items():
            for metric, interval in counts["metrics"].items():
                yield (scheme, group, metric), interval


@pytest.mark.parametrize("num_users", [1, 9])
def test_fewer_users_than_the_minimum_give_no_interval(world, result, num_users):
    # A bootstrap over one user repeats that user: a zero-width interval that looks certain.
    users = [f"U{i % num_users}" for i in range(len(world))]
    got = _accumulate_clustered(world, users).result()
    assert got["bootstrap"]["min_units"] == 10
    for name in MODELS:
        for where, interval in _all_intervals(got["models"][name]):
            if name == "good" and where[0] == "diff":
                continue  # the reference against itself: exactly 0
            assert interval["ci_low"] is None and interval["ci_high"] is None, (name, where)
        # The values themselves do not depend on the resampling unit.
        for metric in METRICS:
            assert got["models"][name]["metrics"][metric]["value"] == result["models"][name]["metrics"][metric]["value"]
    assert got["models"]["noisy"]["metrics"]["mrr"]["num_units"] == num_users
    assert got["models"]["noisy"]["diff_to_first_ci"]["mrr"]["num_units"] == num_users


def test_ten_users_give_intervals(world):
    users = [f"U{i % 10}" for i in range(len(world))]
    got = _accumulate_clustered(world, users).result()["models"]["noisy"]
    for metric in ("impression_auc", "mrr", "pooled_auc"):
        assert got["metrics"][metric]["ci_low"] < got["metrics"][metric]["ci_high"]
        assert "num_units" not in got["metrics"][metric]
        assert got["diff_to_first_ci"][metric]["ci_low"] < got["diff_to_first_ci"][metric]["ci_high"]


@pytest.mark.parametrize("others", [
    # 30 users see candidates, 5 of them click (counted as every user with a candidate, its
    # interval was shown and a difference from 5 users coloured).
    pytest.param(lambda labels: np.zeros_like(labels), id="five_click"),
    # The mirror: 30 users click, only 5 of them skip anything (the other 25 click every
    # candidate shown). Pooled AUC compares clicked with skipped candidates.
    pytest.param(lambda labels: np.where(labels < 0, labels, 1), id="five_skip"),
])
def test_pooled_auc_rests_on_the_fewer_of_the_users_who_clicked_and_who_skipped(world, others):
    # U0-U4 keep their labels, the 25 others get ``others``': pooled AUC rests on those 5.
    users = [f"U{i % 30}" for i in range(len(world))]
    five = {f"U{i}" for i in range(5)}
    relabelled = [(labels if user in five else others(labels), scores, item_groups, impression_groups)
                  for (labels, scores, item_groups, impression_groups), user in zip(world, users)]
    got = _accumulate_clustered(relabelled, users).result()["models"]["noisy"]
    assert got["metrics"]["pooled_auc"]["value"] is not None
    assert got["metrics"]["pooled_auc"]["ci_low"] is None and got["metrics"]["pooled_auc"]["num_units"] == 5
    assert got["diff_to_first_ci"]["pooled_auc"]["num_units"] == 5
    # Log loss rests on every user shown a candidate: 30, an interval.
    assert got["metrics"]["log_loss"]["ci_low"] < got["metrics"]["log_loss"]["ci_high"]


def test_a_breakdown_group_of_one_user_has_no_interval(world):
    # 30 users; a category only user U0 is shown. Its group rests on one user, the others on many.
    users = [f"U{i % 30}" for i in range(len(world))]
    changed = []
    for (labels, scores, item_groups, impression_groups), user in zip(world, users):
        category = item_groups["category"].copy()
        if user == "U0":
            category[:] = "rare"
        changed.append((labels, scores, {**item_groups, "category": category}, impression_groups))
    got = _accumulate_clustered(changed, users).result()["models"]["good"]["breakdowns"]["category"]
    for metric in ("impression_auc", "pooled_auc"):
        assert got["rare"]["metrics"][metric]["value"] is not None
        assert got["rare"]["metrics"][metric]["ci_low"] is None
        assert got["rare"]["metrics"][metric]["num_units"] == 1
        assert got["news"]["metrics"][metric]["ci_low"] < got["news"]["metrics"][metric]["ci_high"]
