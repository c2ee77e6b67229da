"""build_result (the report dict) and the beyond-accuracy measures, worked by hand."""

from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest

from report_data import KINDS, MODELS, make_accumulator
from recsys.evaluation.report import ReportError, beyond_accuracy, build_result
from recsys.metrics.accumulator import METRICS


def test_result_has_the_documented_shape(synthetic_result):
    header = synthetic_result["header"]
    assert header["generated_at"] == "2024-05-01T12:00:00+00:00"
    assert header["num_impressions"] == 250 and header["num_unlabelled"] == 5
    assert header["num_labelled_impressions"] == 245
    assert header["model_versions"] == ["v1", "v2"]
    assert header["bootstrap"]["num_resamples"] == 200
    assert list(synthetic_result["models"]) == list(MODELS)
    for name, entry in synthetic_result["models"].items():
        assert entry["kind"] == KINDS.get(name, "model")
        assert set(entry["metrics"]) == set(METRICS)
        assert set(entry["breakdowns"]) == {"category", "has_image", "history_length"}
    assert synthetic_result["beyond_accuracy"]["num_users"] == 30


def test_gap_closed_is_the_share_of_the_random_to_oracle_gap(synthetic_result):
    models = synthetic_result["models"]
    oracle = models["oracle"]["metrics"]["impression_auc"]["value"]
    for entry in models.values():
        auc = entry["metrics"]["impression_auc"]["value"]
        assert entry["gap_closed"] == pytest.approx((auc - 0.5) / (oracle - 0.5))
    assert models["oracle"]["gap_closed"] == pytest.approx(1.0)
    assert models["v2"]["gap_closed"] > models["v1"]["gap_closed"] > models["random"]["gap_closed"]


def test_without_an_oracle_no_gap_is_reported():
    result = build_result(make_accumulator(60), kinds={"random": "baseline"})
    assert all(entry["gap_closed"] is None for entry in result["models"].values())
    assert result["models"]["v2"]["kind"] == "model"
    assert result["beyond_accuracy"] is None
    assert datetime.fromisoformat(result["header"]["generated_at"]).tzinfo == timezone.utc


def test_an_oracle_no_better_than_random_gives_no_gap():
    # The oracle ranks its one click above 2 of 5 skipped candidates: AUC 0.4, below random;
    # a share of the random-to-oracle gap has no meaning then.
    from recsys.metrics.accumulator import ImpressionMetrics

    acc = ImpressionMetrics(["m", "oracle"], num_resamples=20)
    acc.add([1, 0, 0, 0, 0, 0], {"m": [0.9, 0.1, 0.2, 0.3, 0.4, 0.5], "oracle": [0.5, 0.9, 0.8, 0.7, 0.1, 0.2]})
    result = build_result(acc, kinds={"oracle": "oracle"})
    assert result["models"]["oracle"]["metrics"]["impression_auc"]["value"] == pytest.approx(0.4)
    assert [entry["gap_closed"] for entry in result["models"].values()] == [None, None]


@pytest.mark.parametrize(
    "kinds, message",
    [
        ({"v9": "model"}, r"kinds names unknown models \['v9'\]"),
        ({"v1": "champion"}, "expected each kind to be one of"),
        ({"v1": "oracle", "oracle": "oracle"}, r"kinds marks \['v1', 'oracle'\] as oracle, expected at most one"),
    ],
)
def test_bad_kinds_are_rejected(kinds, message):
    with pytest.raises(ReportError, match=message):
        build_result(make_accumulator(20), kinds=kinds)


RECS = pd.DataFrame(
    {
        "user_id": ["U1", "U1", "U1", "U2", "U2"],
        "rank": [1, 2, 3, 1, 2],
        "news_id": ["N1", "N2", "N3", "N4", "N5"],
    }
)
CATEGORY = {"N1": "news", "N2": "news", "N3": "sports", "N4": "finance"}  # N5 unknown
FIRST_SEEN = {"N1": "2019-11-01", "N2": "2019-11-20", "N3": pd.NaT, "N4": "2019-11-14 23:00"}  # N5 never seen
POPULARITY = {"N1": 10, "N2": 5, "N3": 0, "N4": 5, "N6": 20}  # N5 and 5 more catalogue items: 0


def test_beyond_accuracy_hand_worked():
    out = beyond_accuracy(RECS, CATEGORY, FIRST_SEEN, POPULARITY, catalogue_size=10, new_since="2019-11-15")
    assert out["num_users"] == 2 and out["num_recommendations"] == 5 and out["num_distinct_items"] == 5
    assert out["coverage"] == pytest.approx(0.5)
    # U1: news, news, sports; U2: finance, unknown.
    assert out["intra_list_diversity"] == pytest.approx((2 / 3 + 2 / 2) / 2)
    assert out["gini_simpson_diversity"] == pytest.approx(((1 - (2 / 3) ** 2 - (1 / 3) ** 2) + 0.5) / 2)
    # New: N2 (after), N3 (never shown), N5 (unknown).
    assert out["novelty"] == pytest.approx(3 / 5)
    # Catalogue popularity sorted: six 0, 5, 5, 10, 20. Percentiles: N1 85, N2 70, N3 30, N4 70, N5 30.
    assert out["mean_popularity_percentile"] == pytest.approx((85 + 70 + 30 + 70 + 30) / 5)
    assert out["new_since"] == "2019-11-15T00:00:00+00:00"


def test_an_article_first_seen_exactly_at_new_since_is_new():
    # "At or after": N1 at the instant counts, N2 a second before does not.
    recs = pd.DataFrame({"user_id": ["U1", "U1"], "rank": [1, 2], "news_id": ["N1", "N2"]})
    first_seen = {"N1": "2019-11-15 00:00:00", "N2": "2019-11-14 23:59:59"}
    out = beyond_accuracy(recs, {}, first_seen, {}, catalogue_size=2, new_since="2019-11-15")
    assert out["novelty"] == pytest.approx(1 / 2)


def test_popularity_percentile_of_the_whole_catalogue_averages_fifty():
    items = [f"N{i}" for i in range(40)]
    recs = pd.DataFrame({"user_id": ["U"] * 40, "rank": range(1, 41), "news_id": items})
    popularity = {item: float(i % 7) for i, item in enumerate(items)}
    out = beyond_accuracy(recs, {}, {}, popularity, catalogue_size=40, new_since="2020-01-01")
    assert out["mean_popularity_percentile"] == pytest.approx(50.0)
    assert out["coverage"] == 1.0 and out["novelty"] == 1.0


@pytest.mark.parametrize(
    "recs, popularity, size, message",
    [
        (RECS.drop(columns="rank"), POPULARITY, 10, r"recommendations lack columns \['rank'\]"),
        (RECS.iloc[:0], POPULARITY, 10, "recommendations are empty"),
        (RECS, POPULARITY, 4, "catalogue_size is 4, expected at least 5"),
        (RECS.iloc[:3], {}, 2, "catalogue_size is 2, expected at least 3"),  # 3 distinct recommended
        (RECS, {"N1": -1.0}, 10, "item_popularity of 'N1' is -1.0, expected a number >= 0"),
    ],
)
def test_beyond_accuracy_rejects_bad_input(recs, popularity, size, message):
    with pytest.raises(ReportError, match=message):
        beyond_accuracy(recs, CATEGORY, FIRST_SEEN, popularity, catalogue_size=size, new_since="2019-11-15")


def test_beyond_accuracy_over_chunks_of_whole_lists_equals_the_whole():
    rng = np.random.default_rng(3)
    items = [f"N{i}" for i in range(30)]
    rows = [(f"U{u}", r + 1, items[j]) for u in range(40)
            for r, j in enumerate(rng.choice(30, rng.integers(1, 8), replace=False))]
    recs = pd.DataFrame(rows, columns=["user_id", "rank", "news_id"])
    category = {n: ["news", "sports", "finance"][i % 3] for i, n in enumerate(items[:25])}  # 5 unknown
    first_seen = {n: f"2019-11-{10 + i % 10}" for i, n in enumerate(items[:20])}
    popularity = {n: float(i % 6) for i, n in enumerate(items)}
    whole = beyond_accuracy(recs, category, first_seen, popularity, catalogue_size=35, new_since="2019-11-15")
    starts = np.flatnonzero(recs["user_id"].ne(recs["user_id"].shift()).to_numpy())  # where each list begins
    cuts = sorted(rng.choice(starts[1:], 9, replace=False).tolist())
    chunks = [recs.iloc[a:b] for a, b in zip([0, *cuts], [*cuts, len(recs)])]
    chunked = beyond_accuracy(iter(chunks), category, first_seen, popularity, catalogue_size=35, new_since="2019-11-15")
    assert chunked.keys() == whole.keys()
    for key, value in whole.items():
        assert chunked[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), key
    # Against the per-user definition, computed here without pandas' groupby.
    lists = {}
    for user, _, news_id in rows:
        lists.setdefault(user, []).append(category.get(news_id, "unknown"))
    assert whole["intra_list_diversity"] == pytest.approx(np.mean([len(set(c)) / len(c) for c in lists.values()]))
    assert whole["gini_simpson_diversity"] == pytest.approx(
        np.mean([1 - sum((c.count(x) / len(c)) ** 2 for x in set(c)) for c in lists.values()]))

    long = next(i for i in range(len(starts) - 1) if starts[i + 1] - starts[i] >= 2)
    split = [recs.iloc[: starts[long] + 1], recs.iloc[starts[long] + 1:]]  # a list of 2+ items in two chunks
    with pytest.raises(ReportError, match=rf"user 'U{long}''s recommendations are split over two chunks"):
        beyond_accuracy(iter(split), category, first_seen, popularity, catalogue_size=35, new_since="2019-11-15")
    with pytest.raises(ReportError, match="recommendations are empty"):
        beyond_accuracy(iter([recs.iloc[:0]]), category, first_seen, popularity, catalogue_size=35, new_since="2019-11-15")
