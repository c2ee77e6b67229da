"""`recsys train`'s default window: labelled impressions of the chosen source, checked before encoding."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import numpy as np
import pytest

from recsys.config import MAX_DAYS, Workspace, load_config
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
    # An unlabelled file's source, or a mistyped one: the sources that have labels are named.
    for source in ("test/behaviors", "nope"):
        with pytest.raises(RecsysError, match=re.escape(
                f"the store holds no labelled impressions of source '{source}': --source takes one of "
                "'dev/behaviors', 'train/behaviors' (the 2 sources with labelled impressions)")):
            train_window(store, None, None, 1.0, source)
    # A store fed by nightly runs under dated sources holds hundreds: the first ten are named.
    from recsys.store import repository

    many = [f"nightly-2019-11-{d:02d}" for d in range(1, 31)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(repository, "labelled_sources", lambda engine: many)
        with pytest.raises(RecsysError, match=re.escape(
                f"--source takes one of {', '.join(map(repr, many[:10]))} and 20 more (the 30 sources with labelled")):
            train_window(store, None, None, 1.0, "nope")


def test_time_zone_offsets_are_converted_to_the_stores_naive_utc():
    assert parse_time("2019-11-14T09:00Z", "--since") == datetime(2019, 11, 14, 9, 0)
    assert parse_time("2019-11-14T10:30+01:00", "--until") == datetime(2019, 11, 14, 9, 30)
    assert parse_time("2019-11-14", "--since") == datetime(2019, 11, 14)
    with pytest.raises(RecsysError, match=r"--until '14/11/2019' is not a date or datetime"):
        parse_time("14/11/2019", "--until")


@pytest.mark.parametrize(
    ("value", "flag"),
    [("0001-01-01T00:00:00+01:00", "--since"), ("0001-01-01T13:00+14:00", "--since"), ("9999-12-31T23:00:00-02:00", "--until")],
)
def test_an_offset_past_the_calendars_ends_is_named(value, flag):
    # An OverflowError (exit code 2) before.
    with pytest.raises(RecsysError, match=rf"^{flag} {re.escape(repr(value))} is outside the calendar in UTC, expected a "
                                          r"time from 0001-01-01 00:00:00 to 9999-12-31 23:59:59.999999 UTC$"):
        parse_time(value, flag)


def test_a_window_at_the_calendars_start_is_checked_without_overflow(store):
    # ``until - valid_days`` is before year 1: an OverflowError before.
    with pytest.raises(RecsysError, match=r"training window --since 0001-01-01 00:00:00 .. --until 0001-01-01 12:00:00 is "
                                          r"not longer than the validation window \(model.valid_days = 1.0\)"):
        train_window(store, datetime(1, 1, 1), datetime(1, 1, 1, 12), 1.0)
    assert train_window(store, datetime(1, 1, 1), None, 1.0)[0] == datetime(1, 1, 1)


def test_a_bad_window_says_which_bound_is_a_default_and_which_days_the_store_holds(store):
    # "--until 2019-11-15 10:00:01" was said of a flag never given, with no next step.
    stored = r"the store's labelled impressions run from 2019-11-09 10:00:00 to 2019-11-15 10:00:00"
    with pytest.raises(RecsysError, match=rf"^training window is empty: --since 2020-01-01 00:00:00 is not before the default "
                                          rf"end 2019-11-15 10:00:01 \(1 s after the last labelled impression; no --until "
                                          rf"given\); {stored}: move the window onto them$"):
        train_window(store, datetime(2020, 1, 1), None, 1.0)
    with pytest.raises(RecsysError, match=r"^training window is empty: the default start 2019-11-09 10:00:00 \(the first "
                                          r"labelled impression; no --since given\) is not before --until 2019-01-01 00:00:00"):
        train_window(store, None, datetime(2019, 1, 1), 1.0)
    with pytest.raises(RecsysError, match=r"^training window the default start 2019-11-09 10:00:00 .* \.\. --until "
                                          r"2019-11-09 20:00:00 is not longer than the validation window \(model.valid_days "
                                          rf"= 1.0\); widen the window \({stored}\) or lower model.valid_days$"):
        train_window(store, None, datetime(2019, 11, 9, 20), 1.0)
    with pytest.raises(RecsysError, match=r"^training window is empty: --since 2019-11-14 00:00:00 is not before the default "
                                          r"end 2019-11-13 10:00:01 \(1 s after the last labelled impression of source "
                                          r"'train/behaviors'; no --until given\); the store's labelled impressions of source "
                                          r"'train/behaviors' run from 2019-11-09 10:00:00 to 2019-11-13 10:00:00"):
        train_window(store, datetime(2019, 11, 14), None, 1.0, "train/behaviors")


@pytest.mark.parametrize("clock_hours", [0.0, MAX_DAYS * 24.0])
def test_the_training_log_of_a_window_from_the_calendars_start_is_the_whole_log(store, clock_hours):
    # ``--since 0001-01-01`` minus the popularity window overflowed; nothing is older, so it reads all.
    from recsys.pipelines.train import read_training_log
    from recsys.store import repository as repo

    news_ids = repo.read_news(store)["news_id"].to_numpy(dtype=object)
    until = T0 + 9 * D
    for since in (datetime(1, 1, 1), T0):
        part = read_training_log(store, news_ids, since, until, window_hours=24.0, feature_clock_hours=clock_hours)
        assert len(part) == len(repo.read_interaction_log(store, news_ids, until=until))


def _stub_catalogue(monkeypatch):
    """The catalogue without encoding it: the window checks read only its ids."""
    from types import SimpleNamespace

    from recsys.store import repository as repo

    class Catalogue(SimpleNamespace):
        def __len__(self):
            return len(self.news_ids)

    def stub(engine, workspace, config):
        news = repo.read_news(engine)
        return news, Catalogue(news_ids=news["news_id"].to_numpy(dtype=object), has_image=np.ones(len(news), bool))

    monkeypatch.setattr(train_pipeline, "load_catalogue", stub)


class Stop(Exception):
    pass


def _stop_before_training(monkeypatch) -> dict:
    """``train_ctr`` stops the run; the returned dict receives the windows it was given."""
    from recsys.models import training

    seen = {}

    def stop(features, train, valid, *args, **kwargs):
        seen.update(train=train, valid=valid, features=features)
        raise Stop

    monkeypatch.setattr(training, "train_ctr", stop)
    return seen


def _window_store(engine, tmp_path, valid_labels: list[list[str]], train_labels: list[str] = ("N2-1", "N3-0")):
    """Five training days (one impression of ``train_labels`` each), then one validation
    impression per entry of ``valid_labels`` on day 6."""
    news = write_lines(tmp_path / "news.tsv", [news_line(f"N{i}") for i in range(1, 5)])
    lines = [behavior_line(i + 1, f"U{i}", T0 + i * D, ["N1"], list(train_labels)) for i in range(5)]
    lines += [behavior_line(10 + j, f"V{j}", T0 + 6 * D + j * timedelta(minutes=1), ["N1"], labels)
              for j, labels in enumerate(valid_labels)]
    ingest(engine, news_path=news, behaviors_path=write_lines(tmp_path / "b.tsv", lines), quarantine_dir=tmp_path / "q")
    return engine


@pytest.mark.parametrize(
    ("valid_labels", "warned"),
    [
        ([["N3-1", "N4-0"]], "the validation AUC rests on 1 impression (of 1 in the validation window"),
        ([["N3-1", "N4-0"]] * 29 + [["N3-1"]] * 5, "the validation AUC rests on 29 impressions (of 34"),
        # A log that keeps impressions without a click: 30 of 301 is as steady a mean as 30 of 30.
        ([["N3-1", "N4-0"]] * 30 + [["N3-0"]] * 271, None),
        ([["N3-1", "N4-0"]] * 30, None),
    ],
    ids=["one", "under 30", "30 among many without a click", "enough"],
)
def test_a_validation_auc_of_few_impressions_is_warned_about_not_refused(engine, tmp_path, monkeypatch, caplog,
                                                                          valid_labels, warned):
    # It was published with no hint that it came from one impression.
    _window_store(engine, tmp_path, valid_labels)
    _stub_catalogue(monkeypatch)
    seen = _stop_before_training(monkeypatch)
    with caplog.at_level("WARNING", logger="recsys.train"), pytest.raises(Stop):
        run_train(engine, Workspace(tmp_path / "ws").ensure(), load_config(None, {}))
    thin = [r.getMessage() for r in caplog.records if "validation AUC rests on" in r.getMessage()]
    assert thin == [] if warned is None else (len(thin) == 1 and thin[0].startswith(warned)), thin
    from recsys.models.training import scoreable_impressions

    counts = train_pipeline._counts(seen["train"], seen["valid"], seen["features"],
                                    valid_scoreable=scoreable_impressions(seen["valid"]))
    assert counts["valid_impressions"] == len(valid_labels)
    assert counts["valid_scoreable_impressions"] == sum(len(labels) == 2 and labels[0] != labels[1] for labels in valid_labels)


@pytest.mark.parametrize(
    ("valid_labels", "train_labels", "window", "message"),
    [
        ([["N3-1", "N4-0"]], ["N2-0", "N3-0"], {}, "training window .* holds no click"),
        ([["N3-1", "N4-0"]], ["N2-1", "N3-1"], {}, r"training window .* holds no non-click \(all \d+ labelled candidates are 1\)"),
        ([["N3-0", "N4-0"]], ["N2-1", "N3-0"], {}, "validation window .* holds no click"),
        ([["N3-1", "N4-1"]], ["N2-1", "N3-0"], {}, "validation window .* holds only clicks"),
        ([["N3-1"], ["N4-0"]], ["N2-1", "N3-0"], {}, r"has no impression with both a click and a non-click \(1 clicks"),
        ([["N3-1", "N4-0"]], ["N2-1", "N3-0"], {"until": "2019-11-20"}, "the validation window holds no labelled"),
        ([["N3-1", "N4-0"]], ["N2-1", "N3-0"], {"since": "2019-11-14", "until": "2019-11-16"},
         "the training window holds no labelled"),
    ],
    ids=["no training click", "no training non-click", "no validation click", "only validation clicks", "clicks apart", "empty validation",
         "empty training"],
)
def test_a_window_without_the_labels_training_needs_fails_before_the_catalogue_is_encoded(
        engine, tmp_path, monkeypatch, valid_labels, train_labels, window, message):
    # The labels were checked only after the whole catalogue was encoded (minutes at MIND size).
    from recsys.pipelines.train import read_windows
    from recsys.store import repository as repo

    _window_store(engine, tmp_path, valid_labels, train_labels)

    def encode(*args, **kwargs):
        raise AssertionError("the catalogue was encoded before the window's labels were checked")

    monkeypatch.setattr(train_pipeline, "load_catalogue", encode)
    with pytest.raises(RecsysError, match=message) as early:
        run_train(engine, Workspace(tmp_path / "ws").ensure(), load_config(None, {}), **window)
    # The same words as the check on the rows read, which stays.
    since, valid_start, until = train_window(engine, *(parse_time(window.get(k), k) for k in ("since", "until")), 1.0)
    news_ids = repo.read_news(engine)["news_id"].to_numpy(dtype=object)
    with pytest.raises(RecsysError) as late:
        read_windows(engine, news_ids, since, valid_start, until, source=None, history_len=5)
    assert (type(early.value), str(early.value)) == (type(late.value), str(late.value))


def test_scoreable_impressions_are_those_the_auc_averages_over(engine, tmp_path):
    from recsys.models.training import mean_impression_auc, scoreable_impressions
    from recsys.pipelines.train import read_windows
    from recsys.store import repository as repo

    rng = np.random.default_rng(1)
    labels = [[f"N{p}-{y}" for p, y in zip(rng.choice(4, rng.integers(1, 4), replace=False) + 1, rng.integers(0, 2, 3))]
              for _ in range(200)]
    _window_store(engine, tmp_path, labels)
    news_ids = repo.read_news(engine)["news_id"].to_numpy(dtype=object)
    _, valid, _ = read_windows(engine, news_ids, T0, T0 + 5 * D, T0 + 7 * D, source=None, history_len=5)
    want = mean_impression_auc(valid.labels, rng.random(len(valid.labels)), valid.candidate_offsets)[1]
    assert scoreable_impressions(valid) == want
    assert 0 < want < len(valid) == 200


def _stored_runs_and_versions(engine) -> tuple[int, int]:
    import sqlalchemy as sa

    from recsys.store import schema as s

    with engine.connect() as conn:
        return (conn.execute(sa.select(sa.func.count()).select_from(s.runs)).scalar_one(),
                conn.execute(sa.select(sa.func.count()).select_from(s.model_versions)).scalar_one())


def _five_days_and_a_validation_day(engine, tmp_path, monkeypatch, train_labels, dev_labels) -> Workspace:
    """Five training days of one impression with ``train_labels`` and one on the validation day
    with ``dev_labels`` ingested; the catalogue stubbed. Returns the workspace."""
    news = write_lines(tmp_path / "news.tsv", [news_line(f"N{i}") for i in range(1, 5)])
    lines = [behavior_line(i + 1, f"U{i}", T0 + i * D, ["N1"], train_labels) for i in range(5)]
    lines.append(behavior_line(6, "U9", T0 + 6 * D, ["N1"], dev_labels))
    ingest(engine, news_path=news, behaviors_path=write_lines(tmp_path / "b.tsv", lines), quarantine_dir=tmp_path / "q")
    _stub_catalogue(monkeypatch)
    return Workspace(tmp_path / "ws").ensure()


@pytest.mark.parametrize(
    ("dev_labels", "message"),
    [
        (["N3-0", "N4-0"], r"holds no click \(all 2 labelled candidates are 0\)"),
        (["N3-1", "N4-1"], r"holds only clicks \(all 2 labelled candidates are 1\)"),
    ],
    ids=["no click", "only clicks"],
)
def test_a_validation_window_without_an_auc_is_refused_before_the_run_starts(engine, tmp_path, monkeypatch, dev_labels, message):
    # A ValueError from train_ctr before (exit code 2), after a run row was written.
    ws = _five_days_and_a_validation_day(engine, tmp_path, monkeypatch, ["N2-1", "N3-0"], dev_labels)
    with pytest.raises(RecsysError, match=rf"^the validation window 2019-11-14 10:00:01 .. 2019-11-15 10:00:01 {message}, "
                                          r"so its per-impression AUC, which early stopping follows, is undefined; "
                                          r"widen it \(--until, model.valid_days\) or ingest more behaviors$"):
        run_train(engine, ws, load_config(None, {}))
    assert _stored_runs_and_versions(engine) == (0, 0)
    assert not ws.models_dir.exists()


def test_a_training_window_without_a_click_is_refused_before_the_run_starts(engine, tmp_path, monkeypatch):
    # It trained, and published as current a version that ranked by the content prior alone.
    from recsys.models.training import NoTrainingClicksError

    ws = _five_days_and_a_validation_day(engine, tmp_path, monkeypatch, ["N2-0", "N3-0"], ["N3-1", "N4-0"])
    with pytest.raises(NoTrainingClicksError, match=r"^the training window 2019-11-09 10:00:00 .. 2019-11-14 10:00:01 holds "
                                                    r"no click \(all 10 labelled candidates are 0\): .* move the window "
                                                    r"\(--since, --until, model.valid_days\) onto days with clicks"):
        run_train(engine, ws, load_config(None, {}))
    assert _stored_runs_and_versions(engine) == (0, 0)
    assert not ws.models_dir.exists()


def test_a_window_past_the_stored_days_is_named(store, tmp_path, monkeypatch):
    _stub_catalogue(monkeypatch)
    ws = Workspace(tmp_path / "ws").ensure()
    with pytest.raises(RecsysError, match=r"the validation window holds no labelled impressions \(2019-11-09 10:00:00 .. "
                                          r"9999-12-30 00:00:00 .. 9999-12-31 00:00:00\); move the window \(--since, --until, "
                                          r"model.valid_days\) onto days of ingested behaviors \(the store's labelled impressions run "
                                          r"from 2019-11-09 10:00:00 to 2019-11-15 10:00:00\)$"):
        run_train(store, ws, load_config(None, {}), until="9999-12-31")
    assert _stored_runs_and_versions(store) == (0, 0)


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
    from recsys.pipelines.features import first_seen_array
    from recsys.pipelines.train import read_training_log, read_windows
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


def test_a_training_started_during_an_ingest_says_so_before_it_reads(store, tmp_path, monkeypatch, caplog):
    # Train takes no lock and an ingest commits batch by batch: a training started 4 s into an
    # ingest read half its file and published the version as current, without a word.
    from recsys.pipelines.runlog import recorded_run, running_runs

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(train_pipeline, "load_catalogue", stop)
    ws = Workspace(tmp_path / "ws").ensure()
    with caplog.at_level("WARNING"), pytest.raises(Stop):
        run_train(store, ws, load_config(None, {}))
    assert "still running" not in caplog.text
    with recorded_run(store, "ingest") as record:  # this process: alive, so not abandoned
        assert [run_id for run_id, _, _ in running_runs(store, "ingest")] == [record["run_id"]]
        with caplog.at_level("WARNING"), pytest.raises(Stop):
            run_train(store, ws, load_config(None, {}))
    assert re.search(rf"ingest run {record['run_id']} \(.*, started .* UTC\) is still running: this training reads only "
                     "the batches it has committed so far", caplog.text)
    assert running_runs(store, "ingest") == []


def test_an_ingest_that_writes_while_the_training_reads_is_named_for_the_manifest(store, tmp_path, monkeypatch, caplog):
    # The first check runs before the catalogue's encoding (22 minutes at MIND size): an ingest
    # that began after it gave the reads part of its file, and the manifest said none ran.
    from recsys.pipelines.runlog import recorded_run

    class Stop(Exception):
        pass

    with recorded_run(store, "ingest"):  # complete before the training: whole, not named
        pass
    during = []
    read_windows = train_pipeline.read_windows

    def read_during_an_ingest(*args, **kwargs):
        with recorded_run(store, "ingest") as record:
            during.append(record["run_id"])
        return read_windows(*args, **kwargs)

    found = {}

    def stop_after(engine, marks, *, warned):
        found.update(partial(engine, marks, warned=warned))
        raise Stop

    partial = train_pipeline._warn_of_partial_ingests
    monkeypatch.setattr(train_pipeline, "read_windows", read_during_an_ingest)
    monkeypatch.setattr(train_pipeline, "_warn_of_partial_ingests", stop_after)
    ws = Workspace(tmp_path / "ws").ensure()
    with caplog.at_level("WARNING"), pytest.raises(Stop):
        run_train(store, ws, load_config(None, {}))
    assert found == {"ingest_runs_running_at_read": during, "last_ingest_unfinished": None}
    assert re.search(rf"ingest run {during[0]} \(.*, started .* UTC\) wrote to the store while this training read it: "
                     "the training read only part of its file", caplog.text)
    assert "is still running" not in caplog.text


def test_an_ingest_that_stopped_before_its_end_is_named_until_one_completes(store, caplog):
    from recsys.pipelines.runlog import ingest_marks, recorded_run
    from recsys.pipelines.train import _warn_of_partial_ingests

    with pytest.raises(RuntimeError), recorded_run(store, "ingest") as record:
        raise RuntimeError("disk full\nmore detail")
    marks = ingest_marks(store)  # reads that began after it ended: it is not one of theirs
    with caplog.at_level("WARNING"):
        assert _warn_of_partial_ingests(store, marks, warned=[]) == {
            "ingest_runs_running_at_read": [], "last_ingest_unfinished": record["run_id"]}
    assert (f"the latest ingest, run {record['run_id']}, did not complete (failed: RuntimeError: disk full): the store "
            "holds the batches it committed before it stopped") in caplog.text
    # Refused after reading its files whole (ingest.max_bad_share): its good lines are all there.
    with pytest.raises(RuntimeError), recorded_run(store, "ingest") as refused:
        refused["counts"] = {"impressions": 6}
        raise RuntimeError("--behaviors b.tsv: 249 of its 255 lines were bad")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert _warn_of_partial_ingests(store, marks, warned=[refused["run_id"]])["last_ingest_unfinished"] == refused["run_id"]
    assert (f"the latest ingest, run {refused['run_id']}, failed after reading its files whole (RuntimeError: "
            "--behaviors b.tsv: 249 of its 255 lines were bad): the store holds their good lines") in caplog.text
    assert "part of its file" not in caplog.text
    with recorded_run(store, "ingest") as redone:  # the file ingested again, in the reads' time
        pass
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert _warn_of_partial_ingests(store, marks, warned=[refused["run_id"], redone["run_id"]]) == {
            "ingest_runs_running_at_read": [refused["run_id"], redone["run_id"]], "last_ingest_unfinished": None}
    assert caplog.text == ""  # named already (warned) and complete


@pytest.mark.parametrize("seed", range(4))
def test_window_labels_answer_what_the_rows_say(engine, tmp_path, seed):
    """The EXISTS answers against the labels written, window by window (unlabelled lines too)."""
    from recsys.store import repository as repo

    rng = np.random.default_rng(seed)
    news = write_lines(tmp_path / "news.tsv", [news_line(f"N{i}") for i in range(1, 5)])
    rows = []  # (day, labels or None)
    for i in range(12):
        labels = None if rng.random() < 0.2 else rng.integers(0, 2, rng.integers(1, 4)).tolist()
        rows.append((int(rng.integers(0, 6)), labels))
    lines = [behavior_line(i + 1, f"U{i}", T0 + day * D, [], [f"N{j + 1}" + ("" if labels is None else f"-{y}")
                                                              for j, y in enumerate(labels or [0, 0])])
             for i, (day, labels) in enumerate(rows)]
    ingest(engine, news_path=news, behaviors_path=write_lines(tmp_path / "b.tsv", lines), quarantine_dir=tmp_path / "q")
    for lo in range(6):
        for hi in range(lo + 1, 7):
            shown = [labels for day, labels in rows if lo <= day < hi and labels is not None]
            want = {"labelled": bool(shown), "clicked": any(1 in ls for ls in shown),
                    "skipped": any(0 in ls for ls in shown), "scoreable": any(1 in ls and 0 in ls for ls in shown)}
            assert repo.window_labels(engine, since=T0 + lo * D, until=T0 + hi * D) == want, (lo, hi)
            assert repo.window_labels(engine, since=T0 + lo * D, until=T0 + hi * D, asks=("scoreable",)) == {
                "scoreable": want["scoreable"]}


@pytest.mark.parametrize("folder", ["models", "cache/features"])
def test_a_workspace_folder_train_cannot_write_is_refused_before_encoding(engine, tmp_path, monkeypatch, folder):
    # A file where models/ goes was found at the save, after the encoding and the training: exit 2,
    # "internal error: NotADirectoryError".
    ws = _five_days_and_a_validation_day(engine, tmp_path, monkeypatch, ["N2-1", "N3-0"], ["N3-1", "N4-0"])
    in_the_way = ws.root / folder
    in_the_way.parent.mkdir(parents=True, exist_ok=True)
    in_the_way.write_text("not a folder")

    def encoding(*args, **kwargs):
        raise AssertionError("the catalogue was encoded")

    monkeypatch.setattr(train_pipeline, "load_catalogue", encoding)
    with pytest.raises(RecsysError, match=rf"^--workspace {re.escape(str(in_the_way))}: {re.escape(str(in_the_way))} is a "
                                          r"file, expected a folder$"):
        run_train(engine, ws, load_config(None, {}))
    assert _stored_runs_and_versions(engine) == (0, 0)
    assert in_the_way.read_text() == "not a folder"
