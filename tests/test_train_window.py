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
