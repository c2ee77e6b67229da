"""The sample-world generator: MIND format, determinism, windows, freshness and click model."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from recsys.data import sample
from recsys.data.covers import NUM_STYLES, STYLE_NAMES, draw_cover
from recsys.data.sample import (
    TOPICS,
    SampleError,
    build_world,
    click_logits,
    format_mind_time,
    generate_sample,
    read_world,
)
from recsys.errors import ConfigError, RecsysError
from tests.digests import file_digests

MIND_TIME = "%m/%d/%Y %I:%M:%S %p"
SMALL = dict(num_users=200, num_news=300, num_impressions=450, seed=3, image_size=48, workers=1)
NUM_TEST = 150  # a third of the training impressions by default
TINY = {**SMALL, "num_users": 10, "num_news": 100, "num_impressions": 30}  # for tests of the output folder


def _read_tsv(path: Path) -> list[list[str]]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [line.split("\t") for line in text[:-1].split("\n")]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "world"
    generate_sample(out, **SMALL)
    return out


@pytest.fixture(scope="module")
def world(world_dir):
    return read_world(world_dir)


@pytest.fixture(scope="module")
def behaviors(world_dir):
    """{split: list of (impression id, user, time, history list, [(news id, label)])}."""
    parsed = {}
    for split, name in (("train", "behaviors_train.tsv"), ("test", "behaviors_test.tsv")):
        rows = []
        for cols in _read_tsv(world_dir / name):
            assert len(cols) == 5
            items = [tuple(tok.rsplit("-", 1)) for tok in cols[4].split(" ")]
            rows.append((int(cols[0]), cols[1], cols[2], cols[3].split(" ") if cols[3] else [], items))
        parsed[split] = rows
    return parsed


@pytest.fixture(scope="module")
def truth(world_dir):
    rows = _read_tsv(world_dir / "truth.tsv")
    assert all(len(r) == 6 for r in rows)
    return [(s, int(i), n, int(pos), float(p), int(y)) for s, i, n, pos, p, y in rows]


# --------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_gives_identical_files(world_dir, tmp_path):
    again = tmp_path / "again"
    generate_sample(again, **SMALL)
    assert file_digests(again) == file_digests(world_dir)


@pytest.mark.slow
def test_worker_processes_do_not_change_the_bytes(world_dir, tmp_path):
    pooled = tmp_path / "pooled"
    generate_sample(pooled, **{**SMALL, "workers": 2})
    assert file_digests(pooled) == file_digests(world_dir)


def test_other_seed_gives_other_files(world_dir, tmp_path):
    other = tmp_path / "other"
    generate_sample(other, **{**SMALL, "seed": 4})
    a, b = file_digests(world_dir), file_digests(other)
    for name in ("news.tsv", "behaviors_train.tsv", "behaviors_test.tsv", "truth.tsv"):
        assert a[name] != b[name]


def test_build_world_is_deterministic():
    a = build_world(num_users=50, num_news=200, seed=11)
    b = build_world(num_users=50, num_news=200, seed=11)
    for field in ("news_ids", "news_topic", "news_style", "news_popularity", "news_published", "user_ids",
                  "topic_affinity", "style_affinity", "history_offsets", "history_items"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_read_world_rebuilds_the_hidden_state(world_dir, world):
    direct = build_world(num_users=SMALL["num_users"], num_news=SMALL["num_news"], seed=SMALL["seed"])
    np.testing.assert_array_equal(world.topic_affinity, direct.topic_affinity)
    np.testing.assert_array_equal(world.history_items, direct.history_items)
    news_ids = [cols[0] for cols in _read_tsv(world_dir / "news.tsv")]
    assert news_ids == world.news_ids.tolist()


def test_news_train_holds_the_articles_published_before_the_test_window(world_dir, world):
    # The demo ingested news.tsv, so its nightly recommended articles published after its night.
    every = _read_tsv(world_dir / "news.tsv")
    published = dict(zip(world.news_ids.tolist(), world.news_published))
    before = [cols for cols in every if published[cols[0]] < world.windows.test_start]
    assert 0 < len(before) < len(every)
    assert _read_tsv(world_dir / "news_train.tsv") == before  # whole lines, in news.tsv's order
    kept = {cols[0] for cols in before}
    for cols in _read_tsv(world_dir / "behaviors_train.tsv"):  # training shows only those
        assert set(cols[3].split()) <= kept
        assert {item.rsplit("-", 1)[0] for item in cols[4].split()} <= kept


# --------------------------------------------------------------------------------------------
# MIND format


def test_news_file_is_mind_format(world_dir, world):
    rows = _read_tsv(world_dir / "news.tsv")
    assert len(rows) == SMALL["num_news"]
    categories = {t.category for t in TOPICS}
    for cols in rows:
        assert len(cols) == 8
        news_id, category, subcategory, title, abstract, url, title_entities, abstract_entities = cols
        assert re.fullmatch(r"N\d+", news_id)
        assert category in categories and subcategory in sample.SUBCATEGORIES[category]
        assert 10 < len(title) < 200 and not title[0].islower()
        assert url.startswith("https://") and news_id.lower() in url
        for text, column in ((title, title_entities), (abstract, abstract_entities)):
            entities = json.loads(column)
            assert isinstance(entities, list)
            for entity in entities:
                assert set(entity) == {"Label", "Type", "WikidataId", "Confidence", "OccurrenceOffsets",
                                       "SurfaceForms"}
                assert re.fullmatch(r"Q\d+", entity["WikidataId"]) and 0 < entity["Confidence"] <= 1
                surface = entity["SurfaceForms"][0]
                for offset in entity["OccurrenceOffsets"]:
                    assert text[offset : offset + len(surface)] == surface
    assert len({cols[0] for cols in rows}) == len(rows)
    # Titles use UTF-8 beyond ASCII somewhere (places, clubs), and some articles have entities.
    raw = (world_dir / "news.tsv").read_text(encoding="utf-8")
    assert any(ord(c) > 127 for c in raw)
    assert sum(cols[6] != "[]" for cols in rows) > len(rows) // 10


def test_category_is_coarser_than_topic():
    by_category: dict[str, set[str]] = {}
    for topic in TOPICS:
        by_category.setdefault(topic.category, set()).add(topic.name)
    assert 12 <= len(TOPICS) <= 18
    assert all(len(names) >= 2 for names in by_category.values())


def test_behaviors_files_are_mind_format(world_dir, world, behaviors):
    news_ids = set(world.news_ids.tolist())
    time_pattern = re.compile(r"[1-9]\d?/[1-9]\d?/\d{4} [1-9]\d?:\d\d:\d\d [AP]M")
    history_of: dict[str, list[str]] = {}
    for split, rows in behaviors.items():
        assert [r[0] for r in rows] == list(range(1, len(rows) + 1))  # ids restart at 1 per file
        for _, user, when, history, items in rows:
            assert re.fullmatch(r"U\d+", user)
            assert time_pattern.fullmatch(when), when
            datetime.strptime(when, MIND_TIME)
            assert set(history) <= news_ids
            assert history_of.setdefault(user, history) == history  # fixed per user, as in MIND
            ids = [nid for nid, _ in items]
            assert sample.MIN_CANDIDATES <= len(ids) <= sample.MAX_CANDIDATES
            assert len(set(ids)) == len(ids) and set(ids) <= news_ids
            labels = [label for _, label in items]
            assert set(labels) <= {"0", "1"} and "1" in labels
    assert len(behaviors["train"]) == SMALL["num_impressions"] and len(behaviors["test"]) == NUM_TEST
    assert any(not h for h in history_of.values())  # some users have an empty history


def test_unlabelled_test_file_is_the_test_file_without_labels(world_dir):
    labelled = _read_tsv(world_dir / "behaviors_test.tsv")
    bare = _read_tsv(world_dir / "behaviors_test_unlabelled.tsv")
    assert len(bare) == len(labelled)
    for a, b in zip(labelled, bare):
        assert a[:4] == b[:4]
        assert b[4].split(" ") == [tok.rsplit("-", 1)[0] for tok in a[4].split(" ")]
        assert not re.search(r"-[01]\b", b[4])


def test_truth_matches_the_behaviors(behaviors, truth):
    expected = [
        (split, imp, nid, pos, int(label))
        for split in ("train", "test")
        for imp, _, _, _, items in behaviors[split]
        for pos, (nid, label) in enumerate(items)
    ]
    assert [(s, i, n, pos, y) for s, i, n, pos, _, y in truth] == expected
    assert all(0 < p < 1 for *_, p, _ in truth)


def test_one_impression_chunks_have_integer_positions(tmp_path):
    # 1001 and 1 leave a last chunk of one impression, whose positions came out as "0.0".
    from recsys.pipelines.evaluate import load_truth

    out = tmp_path / "w"
    generate_sample(out, **{**SMALL, "num_users": 10, "num_news": 100, "num_impressions": 1001,
                            "num_test_impressions": 1})
    assert all(re.fullmatch(r"[0-9]+", row[3]) for row in _read_tsv(out / "truth.tsv"))
    assert len(load_truth(out / "truth.tsv", "train")) == 1001 and len(load_truth(out / "truth.tsv", "test")) == 1


def test_images_decode_and_match_articles(world_dir, world):
    files = sorted((world_dir / "images").iterdir())
    names = {p.stem for p in files}
    assert names <= set(world.news_ids.tolist())
    missing = 1 - len(files) / world.num_news
    assert 0.04 < missing < 0.2  # ~10% of articles have no picture
    formats = {}
    for path in files:
        with Image.open(path) as img:
            img.load()
            assert img.size == (SMALL["image_size"], SMALL["image_size"])
            formats[path.suffix] = img.format
    assert formats == {".jpg": "JPEG", ".png": "PNG", ".webp": "WEBP"}


def test_world_folder_is_an_ordinary_readable_folder(world_dir):
    assert world_dir.stat().st_mode & 0o755 == 0o755


def test_world_json_describes_the_world(world_dir):
    document = json.loads((world_dir / "world.json").read_text(encoding="utf-8"))
    assert document["seed"] == SMALL["seed"]
    assert document["parameters"]["num_impressions"] == SMALL["num_impressions"]
    windows = document["windows"]
    assert windows["history_start"] < windows["train_start"] < windows["test_start"] < windows["test_end"]
    assert document["counts"]["train_impressions"] == 450 and document["counts"]["test_impressions"] == NUM_TEST
    assert document["parameters"]["num_test_impressions"] == NUM_TEST


# --------------------------------------------------------------------------------------------
# Windows and freshness


def test_test_window_follows_the_train_window(world, behaviors):
    def times(split):
        return np.array([np.datetime64(datetime.strptime(r[2], MIND_TIME)) for r in behaviors[split]])

    train, test = times("train"), times("test")
    w = world.windows
    assert w.train_start <= train.min() and train.max() < w.test_start
    assert w.test_start <= test.min() and test.max() < w.test_end
    history_published = world.news_published[world.history_items]
    assert (history_published < w.train_start).all()


def test_candidates_are_recent_articles(world, behaviors):
    row_of = {nid: i for i, nid in enumerate(world.news_ids.tolist())}
    for rows in behaviors.values():
        for _, _, when, _, items in rows:
            t = np.datetime64(datetime.strptime(when, MIND_TIME), "s")
            published = world.news_published[[row_of[nid] for nid, _ in items]]
            assert (published <= t).all()
            assert (published >= t - world.windows.freshness).mean() > 0.8


def test_about_half_of_test_candidates_are_fresh(world, behaviors):
    seen_in_train = {nid for r in behaviors["train"] for nid, _ in r[4]} | {n for r in behaviors["train"] for n in r[3]}
    test_items = [nid for r in behaviors["test"] for nid, _ in r[4]]
    unseen = np.mean([nid not in seen_in_train for nid in test_items])
    assert 0.35 < unseen < 0.7
    row_of = {nid: i for i, nid in enumerate(world.news_ids.tolist())}
    published_after = world.news_published[[row_of[n] for n in test_items]] >= world.windows.test_start
    # Articles published after training can never have been shown in training.
    assert not any(nid in seen_in_train for nid, after in zip(test_items, published_after) if after)
    assert 0.35 < published_after.mean() < 0.7


# --------------------------------------------------------------------------------------------
# Click model


def test_labels_are_calibrated_to_the_recorded_probabilities(truth):
    p = np.array([row[4] for row in truth])
    y = np.array([row[5] for row in truth])
    # Labels of different impressions are independent; the sum's sd is close to sqrt(sum p(1-p)).
    assert abs(y.sum() - p.sum()) < 4 * np.sqrt((p * (1 - p)).sum())
    for lo, hi in ((0, 0.05), (0.05, 0.2), (0.2, 1.0)):
        sel = (p >= lo) & (p < hi)
        assert sel.sum() > 200
        assert abs(y[sel].mean() - p[sel].mean()) < 4 * np.sqrt((p[sel] * (1 - p[sel])).sum()) / sel.sum()


def _joined(world, behaviors, truth):
    user_row = {u: i for i, u in enumerate(world.user_ids.tolist())}
    news_row = {n: i for i, n in enumerate(world.news_ids.tolist())}
    user_of = {(split, r[0]): user_row[r[1]] for split, rows in behaviors.items() for r in rows}
    users = np.array([user_of[(s, i)] for s, i, *_ in truth])
    news = np.array([news_row[n] for _, _, n, *_ in truth])
    impressions = np.array([(0 if s == "train" else 10**6) + i for s, i, *_ in truth])
    return users, news, impressions


def test_clicks_depend_on_topic_style_and_popularity(world, behaviors, truth):
    users, news, impressions = _joined(world, behaviors, truth)
    y = np.array([row[5] for row in truth], dtype=float)
    topic = world.topic_affinity[users, world.news_topic[news]]
    style = world.style_affinity[users, world.news_style[news]]
    popularity = world.news_popularity[news]
    assert np.corrcoef(y, topic)[0, 1] > 0.1
    assert np.corrcoef(y, style)[0, 1] > 0.1
    assert np.corrcoef(y, popularity)[0, 1] > 0.02
    # The recorded probability is sigmoid(click_logits) conditioned on >= 1 click per impression.
    p = np.array([row[4] for row in truth])
    raw = 1 / (1 + np.exp(-click_logits(world, users, news)))
    starts = np.flatnonzero(np.r_[True, np.diff(impressions) != 0])
    any_click = 1 - np.exp(np.add.reduceat(np.log1p(-raw), starts))
    expected = raw / np.repeat(any_click, np.diff(np.r_[starts, len(raw)]))
    np.testing.assert_allclose(p, np.clip(expected, 1e-6, 1 - 1e-6), atol=1e-6)


def test_each_modality_alone_is_clearly_worse_than_both(world, behaviors, truth):
    users, news, impressions = _joined(world, behaviors, truth)
    y = np.array([row[5] for row in truth])
    topic = sample.TOPIC_WEIGHT * world.topic_affinity[users, world.news_topic[news]]
    style = sample.STYLE_WEIGHT * world.style_affinity[users, world.news_style[news]]
    popularity = sample.POPULARITY_WEIGHT * world.news_popularity[news]

    bounds = np.flatnonzero(np.r_[True, np.diff(impressions) != 0, True])  # truth rows are grouped

    spans = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if 0 < y[a:b].sum() < b - a]

    def mann_whitney_auc(labels, score):
        ranks = rankdata(score)
        positives = labels.sum()
        return (ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * (len(labels) - positives))

    def per_impression_auc(score):
        return float(np.mean([mann_whitney_auc(y[a:b], score[a:b]) for a, b in spans]))

    for a, b in spans[:20]:  # the fast AUC is scikit-learn's, ties included
        score = topic[a:b] + style[a:b]
        assert mann_whitney_auc(y[a:b], score) == pytest.approx(roc_auc_score(y[a:b], score))

    both = per_impression_auc(topic + style + popularity)
    text_only = per_impression_auc(topic + popularity)
    image_only = per_impression_auc(style + popularity)
    popularity_only = per_impression_auc(popularity)
    assert both - text_only > 0.03 and both - image_only > 0.03
    assert popularity_only > 0.55


def test_conditional_labels_match_rejection_sampling():
    p = np.array([0.02, 0.3, 0.05, 0.6, 0.01])
    rng = np.random.default_rng(0)
    reps = 20000
    labels, conditional = sample._draw_labels(rng, np.tile(p, reps), np.full(reps, len(p)))
    labels = labels.reshape(reps, len(p))
    assert (labels.sum(axis=1) >= 1).all()
    # Reference: independent Bernoulli draws, keeping impressions with at least one click.
    ref = np.random.default_rng(1).random((4 * reps, len(p))) < p
    ref = ref[ref.any(axis=1)]
    np.testing.assert_allclose(labels.mean(axis=0), ref.mean(axis=0), atol=0.015)
    np.testing.assert_allclose(conditional[: len(p)], p / (1 - np.prod(1 - p)))


def test_large_and_small_pool_samplers_draw_the_same_distribution():
    world = build_world(num_users=10, num_news=4000, seed=5)
    pool = sample._Pool(world)
    reps, n = 3000, 37
    lo, hi, counts = np.zeros(reps, np.int64), np.full(reps, 300), np.full(reps, n)
    rng = np.random.default_rng(2)
    gumbel = pool._gumbel_top(rng, lo, hi, counts)[:, :n]
    successive = pool._successive(rng, lo, hi, counts)[:, :n]
    for picked in (gumbel, successive):
        assert all(len(set(row)) == n for row in picked.tolist())
        assert picked.min() >= 0 and picked.max() < 300
    inclusion = [np.bincount(p.ravel(), minlength=300) / reps for p in (gumbel, successive)]
    np.testing.assert_allclose(inclusion[0], inclusion[1], atol=0.06)
    # Heavier exposure weight means shown more often.
    assert np.corrcoef(inclusion[1], pool.log_weight[:300])[0, 1] > 0.8


def test_large_pool_sampler_redraws_rows_left_short():
    world = build_world(num_users=10, num_news=4000, seed=5)
    pool = sample._Pool(world)
    # Pools barely larger than the wanted count: 150 draws rarely find enough distinct articles.
    picked = pool._successive(np.random.default_rng(0), np.array([0, 100]), np.array([52, 146]), np.array([50, 45]))
    assert len(set(picked[0, :50].tolist())) == 50 and set(picked[0, :50].tolist()) <= set(range(52))
    assert len(set(picked[1, :45].tolist())) == 45 and set(picked[1, :45].tolist()) <= set(range(100, 146))
    assert (picked[1, 45:] == 0).all()


# --------------------------------------------------------------------------------------------
# Covers


@pytest.mark.parametrize("style", range(NUM_STYLES), ids=STYLE_NAMES)
def test_covers_of_a_style_are_varied_pictures(style):
    a = np.asarray(draw_cover(style, np.random.default_rng(1), 64), dtype=float)
    b = np.asarray(draw_cover(style, np.random.default_rng(2), 64), dtype=float)
    again = np.asarray(draw_cover(style, np.random.default_rng(1), 64), dtype=float)
    assert a.shape == (64, 64, 3)
    np.testing.assert_array_equal(a, again)
    assert np.abs(a - b).mean() > 3  # every cover differs
    assert a.std() > 10 and len(np.unique(a.reshape(-1, 3), axis=0)) > 8  # not a flat swatch


def test_photo_covers_need_the_packages_that_ship_the_photos(monkeypatch):
    from recsys.data import covers

    covers._photos.cache_clear()
    monkeypatch.setattr(covers.importlib.util, "find_spec", lambda name: None)
    try:
        with pytest.raises(RuntimeError, match="the 'sklearn' package is not installed"):
            draw_cover(STYLE_NAMES.index("duotone_photo"), np.random.default_rng(0))
    finally:
        covers._photos.cache_clear()


def test_draw_cover_rejects_bad_arguments():
    with pytest.raises(ValueError, match="style 10 is not a style index"):
        draw_cover(NUM_STYLES, np.random.default_rng(0))
    with pytest.raises(ValueError, match="cover size 8 is too small"):
        draw_cover(0, np.random.default_rng(0), 8)
    # A negative index must not wrap round to the last style.
    with pytest.raises(ValueError, match="style -1 is not a style index"):
        draw_cover(-1, np.random.default_rng(0))
    # 32 pixels is the smallest side allowed.
    with pytest.raises(ValueError, match="cover size 31 is too small"):
        draw_cover(0, np.random.default_rng(0), 31)
    assert draw_cover(0, np.random.default_rng(0), 32).size == (32, 32)


# --------------------------------------------------------------------------------------------
# Time format


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        ("2019-11-11T09:05:58", "11/11/2019 9:05:58 AM"),
        ("2019-11-09T00:30:00", "11/9/2019 12:30:00 AM"),
        ("2019-01-05T12:00:07", "1/5/2019 12:00:07 PM"),
        ("2019-11-14T23:59:59", "11/14/2019 11:59:59 PM"),
    ],
)
def test_format_mind_time(stamp, expected):
    assert format_mind_time(np.datetime64(stamp)) == expected
    assert datetime.strptime(expected, MIND_TIME) == datetime.fromisoformat(stamp)


# --------------------------------------------------------------------------------------------
# Output folder, progress and errors


def test_progress_reports_every_article_and_impression(tmp_path):
    seen = []
    generate_sample(tmp_path / "w", **{**SMALL, "progress": seen.append})
    assert sum(seen) == SMALL["num_news"] + SMALL["num_impressions"] + NUM_TEST


def test_command_progress_shows_the_total(tmp_path, caplog):
    from recsys.pipelines.sample import run_generate_sample

    caplog.set_level(logging.INFO, logger="recsys")
    run_generate_sample(tmp_path / "w", users=10, news=100, impressions=30, seed=1)
    assert "generating sample world: done 140/140 in" in caplog.text  # 100 articles, 30 + 10 impressions


def test_regenerating_replaces_an_earlier_world(tmp_path):
    out = tmp_path / "w"
    generate_sample(out, **SMALL)
    summary = generate_sample(out, **{**SMALL, "seed": 9})
    assert read_world(out).seed == 9 and summary["seed"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # no staging or old folders left


def test_numpy_integer_sizes_get_the_default_test_window(tmp_path):
    summary = generate_sample(tmp_path / "w", **{**SMALL, "num_users": np.int64(10), "num_news": np.int64(100),
                                                 "num_impressions": np.int64(30)})
    assert (summary["train_impressions"], summary["test_impressions"]) == (30, 10)


def test_failed_generation_leaves_nothing_behind(tmp_path):
    def fail(_):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        generate_sample(tmp_path / "w", **{**SMALL, "progress": fail})
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_folder_that_is_not_a_sample(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(SampleError, match="holds notes.txt, which generate-sample does not write"):
        generate_sample(tmp_path, **SMALL)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(SampleError, match="exists and is not a folder"):
        generate_sample(tmp_path / "file", **SMALL)


def test_refuses_a_folder_whose_world_json_is_not_a_sample_world(tmp_path):
    # A project's own world.json made the folder look like a world, and all of it was deleted.
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "world.json").write_text('{"my": "x"}')
    with pytest.raises(SampleError, match=r"world.json: field 'format' has None.*choose an empty or new folder"):
        generate_sample(proj, **TINY)
    (proj / "thesis.txt").write_text("precious")
    with pytest.raises(SampleError, match=r"proj: holds thesis.txt, which generate-sample does not write"):
        generate_sample(proj, **TINY)
    (proj / "world.json").write_text(json.dumps({"format": sample.WORLD_FORMAT}))
    with pytest.raises(SampleError, match=r"proj: holds thesis.txt"):
        generate_sample(proj, **TINY)
    assert (proj / "thesis.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]


@pytest.mark.parametrize(("added", "named"), [("NOTES.md", "NOTES.md"), ("ws/recsys.db", "ws"),
                                              ("images/originals/N1.jpg", "images/originals")])
def test_refuses_to_replace_a_world_with_files_of_its_user(tmp_path, added, named):
    out = tmp_path / "w"
    generate_sample(out, **TINY)
    (out / added).parent.mkdir(exist_ok=True)
    (out / added).write_text("keep me")
    before = file_digests(out)
    with pytest.raises(SampleError, match=f"w: holds {named}, which generate-sample does not write"):
        generate_sample(out, **{**TINY, "seed": 9})
    assert file_digests(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


@pytest.mark.parametrize("out", [".", "..", "w"])
def test_refuses_the_current_folder_and_those_above_it(tmp_path, monkeypatch, out):
    # The world is renamed onto out: '.' failed half-way (EBUSY) and left an ..old- folder behind,
    # and a folder above the current one was renamed away from under it.
    generate_sample(tmp_path / "w", **TINY)
    before = file_digests(tmp_path)
    monkeypatch.chdir(tmp_path / "w" / "images" if out == "w" else tmp_path / "w")
    with pytest.raises(SampleError, match="is the current folder or one above it"):
        generate_sample(tmp_path / out if out == "w" else out, **{**TINY, "seed": 9})
    assert file_digests(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_a_failed_swap_puts_the_earlier_world_back(tmp_path, monkeypatch):
    out = tmp_path / "w"
    generate_sample(out, **TINY)
    before = file_digests(out)
    replace = os.replace

    def busy_staging(src, dst):
        if ".partial-" in str(src):
            raise OSError(errno.EBUSY, "Device or resource busy")
        replace(src, dst)

    monkeypatch.setattr(sample.os, "replace", busy_staging)
    with pytest.raises(OSError, match="busy"):
        generate_sample(out, **{**TINY, "seed": 9})
    assert file_digests(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_command_refuses_an_out_it_cannot_create(tmp_path):
    from recsys.pipelines.sample import run_generate_sample

    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    for out, message in ((tmp_path / "file" / "w", "file is a file, expected a folder"),
                         (tmp_path / "link", "link is a link to .*gone, which does not exist")):
        with pytest.raises(RecsysError, match=f"--out {re.escape(str(out))}: .*{message}"):
            run_generate_sample(out, users=10, news=100, impressions=30, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "link"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_users": 0}, "num_users is 0, expected an integer from 10 to 10000000"),
        ({"num_users": 100_000_000_000}, "num_users is 100000000000, expected an integer from 10 to 10000000"),
        ({"num_users": 10**23}, f"num_users is {10**23}, expected an integer from 10 to 10000000"),
        ({"num_news": 99}, "num_news is 99, expected an integer from 100 to 2000000"),
        ({"num_news": 2_000_001}, "num_news is 2000001, expected an integer from 100 to 2000000"),
        ({"num_news": 150.0}, "num_news is 150.0, expected an integer"),
        ({"seed": -1}, "seed is -1, expected an integer >= 0"),
        ({"num_impressions": 0}, "num_impressions is 0, expected an integer from 1 to 50000000"),
        ({"num_impressions": True}, "num_impressions is True, expected an integer from 1 to 50000000"),
        ({"num_impressions": 10**30}, f"num_impressions is {10**30}, expected an integer from 1 to 50000000"),
        ({"num_test_impressions": 0}, "num_test_impressions is 0, expected an integer from 1 to 50000000"),
        ({"num_test_impressions": 50_000_001}, "num_test_impressions is 50000001, expected an integer from 1 to 50000000"),
        ({"image_size": 16}, "image_size is 16, expected an integer from 32 to 512"),
        ({"image_size": 1024}, "image_size is 1024, expected an integer from 32 to 512"),
        ({"workers": 0}, "workers is 0, expected an integer >= 1"),
        ({"start": "Nov 9"}, "start is 'Nov 9', expected a date YYYY-MM-DD"),
        ({"train_days": 0}, "train_days is 0, expected an integer >= 1"),
        ({"freshness_days": 20}, "freshness_days is 20, expected at most history_days"),
    ],
)
def test_bad_arguments_are_config_errors(tmp_path, change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        generate_sample(tmp_path / "w", **{**SMALL, **change})
    assert not (tmp_path / "w").exists()


def test_read_world_errors(tmp_path):
    with pytest.raises(SampleError, match="world.json: not found"):
        read_world(tmp_path)
    (tmp_path / "world.json").write_text("{not json")
    with pytest.raises(SampleError, match="cannot be read"):
        read_world(tmp_path)
    (tmp_path / "world.json").write_text(json.dumps({"format": "other/2"}))
    with pytest.raises(SampleError, match="field 'format' has 'other/2'"):
        read_world(tmp_path)
    (tmp_path / "world.json").write_text(json.dumps({"format": sample.WORLD_FORMAT, "seed": 1, "parameters": {}}))
    with pytest.raises(SampleError, match="missing or malformed parameter 'num_users'"):
        read_world(tmp_path)


# --------------------------------------------------------------------------------------------
# The committed sample (data/sample), generated by the command in data/README.md

COMMITTED = Path(__file__).resolve().parents[2] / "data" / "sample"
COMMITTED_ARGS = dict(num_users=1000, num_news=1000, num_impressions=1800, seed=7)


def test_committed_sample_is_complete_and_small():
    document = json.loads((COMMITTED / "world.json").read_text(encoding="utf-8"))
    params = document["parameters"]
    assert {k: params[k] for k in ("num_users", "num_news", "num_impressions")} == {
        k: v for k, v in COMMITTED_ARGS.items() if k != "seed"
    }
    assert document["seed"] == COMMITTED_ARGS["seed"]
    counts = document["counts"]
    assert 0 < len(_read_tsv(COMMITTED / "news_train.tsv")) < counts["news"]
    for name, expected in (("news.tsv", counts["news"]), ("behaviors_train.tsv", counts["train_impressions"]),
                           ("behaviors_test.tsv", counts["test_impressions"]),
                           ("behaviors_test_unlabelled.tsv", counts["test_impressions"]),
                           ("truth.tsv", counts["train_items"] + counts["test_items"])):
        assert len(_read_tsv(COMMITTED / name)) == expected, name
    assert len(list((COMMITTED / "images").iterdir())) == counts["news_with_image"]
    assert sum(p.stat().st_size for p in COMMITTED.rglob("*") if p.is_file()) < 10 * 2**20


@pytest.mark.slow
def test_committed_sample_is_what_the_generator_writes(tmp_path):
    fresh = tmp_path / "sample"
    generate_sample(fresh, **COMMITTED_ARGS, workers=1)
    a, b = file_digests(fresh), file_digests(COMMITTED)
    # Text files byte for byte; pictures by name (JPEG/WebP encoders may differ between Pillow builds).
    assert {k: v for k, v in a.items() if not k.startswith("images")} == {
        k: v for k, v in b.items() if not k.startswith("images")
    }
    assert {k for k in a if k.startswith("images")} == {k for k in b if k.startswith("images")}
