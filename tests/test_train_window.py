"""`recsys train`'s default window: labelled impressions of the chosen source, checked before encoding."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from recsys.config import Workspace, load_config
from recsys.errors import RecsysError
from recsys.pipelines import train as train_pipeline
from recsys.pipelines.train import parse_time, run_train, train_window
from recsys.store.ingest import ingest
from tests.store.mind_files import behavior_line, news_line, write_lines

T0 = datetime(2019, 11, 9, 10, 0, 0)
D = timedelta(days=1)


@pytest.fixture
def store(engine, tmp_path):
    """MIND-like: labelled train (days 0-4), labelled dev (day 6), unlabelled test (day 8)."""
    news = write_lines(tmp_path / "news.tsv", [news_line(f"N{i}") for i in range(1, 5)])
    files = {
        "train": [behavior_line(i + 1, f"U{i}", T0 + i * D, ["N1"], ["N2-1", "N3-0"]) for i in range(5)],
        "dev": [behavior_line(1, "U9", T0 + 6 * D, ["N1"], ["N3-1", "N4-0"])],
        "test": [behavior_line(1, "U9", T0 + 8 * D, ["N1"], ["N2", "N4"])],
    }
    for name, lines in files.items():
        (tmp_path / name).mkdir()
        path = write_lines(tmp_path / name / "behaviors.tsv", lines)
        ingest(engine, news_path=news if name == "train" else None, behaviors_path=path, quarantine_dir=tmp_path / "q")
    return engine


def test_the_default_window_ends_after_the_last_labelled_impression(store):
    # The unlabelled test day is in the store (for its articles) but cannot be validated on.
    assert train_window(store, None, None, 1.0) == (T0, T0 + 5 * D + timedelta(seconds=1), T0 + 6 * D + timedelta(seconds=1))


def test_the_default_window_follows_the_source(store):
    # Training on train alone must not validate on the dev day that follows it.
    since, valid_start, until = train_window(store, None, None, 1.0, "train/behaviors")
    assert (since, valid_start, until) == (T0, T0 + 3 * D + timedelta(seconds=1), T0 + 4 * D + timedelta(seconds=1))
    with pytest.raises(RecsysError, match="no labelled impressions of source 'test/behaviors'"):
        train_window(store, None, None, 1.0, "test/behaviors")
    with pytest.raises(RecsysError, match="no labelled impressions of source 'nope'"):
        train_window(store, None, None, 1.0, "nope")


def test_time_zone_offsets_are_converted_to_the_stores_naive_utc():
    assert parse_time("2019-11-14T09:00Z", "--since") == datetime(2019, 11, 14, 9, 0)
    assert parse_time("2019-11-14T10:30+01:00", "--until") == datetime(2019, 11, 14, 9, 30)
    assert parse_time("2019-11-14", "--since") == datetime(2019, 11, 14)
    with pytest.raises(RecsysError, match=r"--until '14/11/2019' is not a date or datetime"):
        parse_time("14/11/2019", "--until")


def test_a_bad_window_fails_before_the_catalogue_is_encoded(store, tmp_path, monkeypatch):
    def encode(*args, **kwargs):
        raise AssertionError("the catalogue was encoded before the window was checked")

    monkeypatch.setattr(train_pipeline, "load_catalogue", encode)
    ws = Workspace(tmp_path / "ws").ensure()
    config = load_config(None, {})
    with pytest.raises(RecsysError, match="--since 'yesterday' is not a date"):
        run_train(store, ws, config, since="yesterday")
    with pytest.raises(RecsysError, match="training window is empty"):
        run_train(store, ws, config, since="2019-11-12T00:00Z", until="2019-11-11")


@pytest.mark.parametrize("clock_hours", [0.0, 24.0])
def test_the_training_log_holds_every_show_the_windows_side_features_count(engine, tmp_path, clock_hours):
    """``read_training_log`` starts one popularity window (plus a feature-clock period) before
    the window: side features read from it equal those read from the whole store's log."""
    import numpy as np

    from recsys.models.side_features import raw_side_features
    from recsys.models.training import clock_floor
    from recsys.pipelines.train import first_seen_array, read_training_log, read_windows
    from recsys.store import repository as repo

    news = write_lines(tmp_path / "news.tsv", [news_line(f"N{i}") for i in range(1, 7)])
    rng = np.random.default_rng(0)
    lines = []
    for i in range(72):  # an impression every two hours for six days
        picks = rng.choice(6, 3, replace=False) + 1
        labels = rng.integers(0, 2, 3)
        lines.append(behavior_line(i + 1, f"U{i % 5}", T0 + i * timedelta(hours=2), ["N1"],
                                   [f"N{p}-{y}" for p, y in zip(picks, labels)]))
    ingest(engine, news_path=news, behaviors_path=write_lines(tmp_path / "b.tsv", lines), quarantine_dir=tmp_path / "q")
    frame = repo.read_news(engine)
    news_ids, first_seen = frame["news_id"].to_numpy(dtype=object), first_seen_array(frame)
    since, valid_start, until = T0 + timedelta(days=2, hours=12), T0 + 4 * D, T0 + 5 * D  # since at 22:00
    train, valid, _ = read_windows(engine, news_ids, since, valid_start, until, source=None, history_len=5)
    whole = repo.read_interaction_log(engine, news_ids)
    part = read_training_log(engine, news_ids, since, until, window_hours=24.0, feature_clock_hours=clock_hours)
    assert len(part) < len(whole)
    for imps in (train, valid):
        times = np.repeat(imps.times, np.diff(imps.candidate_offsets))
        times = clock_floor(times, clock_hours) if clock_hours else times
        got = raw_side_features(imps.candidate_items, times, part, first_seen, window_hours=24.0)
        want = raw_side_features(imps.candidate_items, times, whole, first_seen, window_hours=24.0)
        np.testing.assert_array_equal(got, want)
        assert want[:, 1].min() > 0  # every candidate was shown in the window before it


def test_the_time_range_of_labelled_impressions_ignores_an_unlabelled_test_file(store, engine):
    from recsys.store import repository as repo

    assert repo.time_range(store, labelled_only=True) == (T0, T0 + 6 * D)
    assert repo.time_range(store, source="test/behaviors") == (T0 + 8 * D, T0 + 8 * D)
    assert repo.time_range(store, source="test/behaviors", labelled_only=True) == (None, None)
    assert repo.time_range(store) == (T0, T0 + 8 * D)  # the unlabelled day is later
    with engine.begin() as conn:  # an empty store has none
        from recsys.store import schema as s

        conn.execute(s.impression_items.delete())
        conn.execute(s.impressions.delete())
    assert repo.time_range(engine, labelled_only=True) == (None, None) == repo.time_range(engine)
