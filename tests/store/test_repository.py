"""The store's read path (recsys.store.repository) against the MIND lines that were ingested."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from recsys.store import repository as repo
from recsys.store.ingest import ingest
from tests.store.mind_files import behavior_line, news_line, write_lines

T0 = datetime(2019, 11, 11, 9, 0, 0)


def _ingest(engine, tmp_path, news_ids, behaviors):
    news = write_lines(tmp_path / "news.tsv", [news_line(n) for n in news_ids])
    beh = write_lines(tmp_path / "behaviors.tsv", behaviors)
    ingest(engine, news_path=news, behaviors_path=beh, quarantine_dir=tmp_path / "q")


def test_impressions_match_the_file(engine, tmp_path):
    ids = [f"N{i}" for i in range(1, 9)]
    _ingest(engine, tmp_path, ids, [
        behavior_line(1, "U1", T0, ["N1", "N2", "N3"], ["N4-1", "N5-0", "N6-0"]),
        behavior_line(2, "U2", T0 + timedelta(hours=1), [], ["N7-0", "N8-1"]),
        behavior_line(3, "U1", T0 + timedelta(hours=2), ["N1", "N2", "N3"], ["N5-1", "N6-0"]),
    ])
    news_ids = repo.read_news(engine)["news_id"].to_numpy()
    imps = repo.read_impressions(engine, news_ids, history_len=2)
    row = {n: i for i, n in enumerate(news_ids)}
    assert imps.impression_ids.tolist() == [1, 2, 3]  # time order
    assert imps.user_ids.tolist() == ["U1", "U2", "U1"]
    assert [news_ids[imps.candidates(i)].tolist() for i in range(3)] == [["N4", "N5", "N6"], ["N7", "N8"], ["N5", "N6"]]
    assert [imps.candidate_labels(i).tolist() for i in range(3)] == [[1, 0, 0], [0, 1], [1, 0]]
    # History: most recent first, capped, and never the impression clicks (N4, N5 are labels).
    assert news_ids[imps.history(0)].tolist() == ["N3", "N2"]
    assert news_ids[imps.history(2)].tolist() == ["N3", "N2"]
    assert imps.history(1).size == 0
    assert imps.candidate_items.dtype == np.int32 and row["N4"] == imps.candidates(0)[0]
    # A time window selects by impression time, end exclusive.
    window = repo.read_impressions(engine, news_ids, since=T0 + timedelta(minutes=30), until=T0 + timedelta(hours=2))
    assert window.impression_ids.tolist() == [2]


def test_serving_history_puts_impression_clicks_first(engine, tmp_path):
    ids = [f"N{i}" for i in range(1, 7)]
    _ingest(engine, tmp_path, ids, [
        behavior_line(1, "U1", T0, ["N1", "N2", "N3"], ["N4-1", "N3-1", "N5-0"]),
        behavior_line(2, "U1", T0 + timedelta(hours=1), ["N1", "N2", "N3"], ["N6-1", "N5-0"]),
    ])
    news_ids = repo.read_news(engine)["news_id"].to_numpy()
    serving = repo.read_user_histories(engine, np.array(["U1"], dtype=object), news_ids)
    training = repo.read_user_histories(engine, np.array(["U1"], dtype=object), news_ids, include_impression_clicks=False)
    # Newest timed click first (N6, then N4 and N3 clicked at T0), then the History column.
    serving_ids = news_ids[serving[1]].tolist()
    assert serving_ids[0] == "N6" and set(serving_ids[1:3]) == {"N4", "N3"} and serving_ids[3:] == ["N2", "N1"]
    # Training reads the History column only, in its own order (N3 was re-clicked later).
    assert news_ids[training[1]].tolist() == ["N3", "N2", "N1"]


def test_a_training_history_keeps_the_column_order_when_its_oldest_entry_was_clicked_again(engine, tmp_path):
    # N1, the oldest entry of the History, is clicked again in a later impression: the training
    # read (History column only) must not move it ahead of N3 and N2 for having a click time.
    ids = [f"N{i}" for i in range(1, 6)]
    _ingest(engine, tmp_path, ids, [
        behavior_line(1, "U1", T0, ["N1", "N2", "N3"], ["N4-0", "N5-0"]),
        behavior_line(2, "U1", T0 + timedelta(hours=1), ["N1", "N2", "N3"], ["N1-1", "N5-0"]),
    ])
    news_ids = repo.read_news(engine)["news_id"].to_numpy()
    users = np.array(["U1"], dtype=object)
    training = repo.read_user_histories(engine, users, news_ids, include_impression_clicks=False)
    assert news_ids[training[1]].tolist() == ["N3", "N2", "N1"]
    # Serving leads with the timed click, then the rest of the column, newest first.
    assert news_ids[repo.read_user_histories(engine, users, news_ids)[1]].tolist() == ["N1", "N3", "N2"]


def test_the_cap_keeps_the_same_clicks_of_one_impression_whatever_order_the_database_returns(engine, tmp_path, monkeypatch):
    # Five clicks of one impression share its time and have no History position: with the cap
    # at 3, which three a user's history kept followed the query plan (the nightly's lists then
    # changed with --shard-size and --engine on PostgreSQL).
    ids = [f"N{i}" for i in range(1, 9)]
    _ingest(engine, tmp_path, ids, [
        behavior_line(1, "U1", T0, ["N8"], ["N1-1", "N2-1", "N3-1", "N4-1", "N5-1", "N6-0"]),
        behavior_line(2, "U2", T0, [], ["N5-1", "N6-1", "N7-1"]),
    ])
    news_ids = np.array(ids, dtype=object)
    users = np.array(["U1", "U2"], dtype=object)
    capped = repo.read_user_histories(engine, users, news_ids, max_len=3)
    real_stream = repo._stream

    def backwards(conn, query, columns):  # another plan: every part, and the rows in it, reversed
        return [part.iloc[::-1].reset_index(drop=True) for part in reversed(list(real_stream(conn, query, columns)))]

    monkeypatch.setattr(repo, "_stream", backwards)
    for got in (repo.read_user_histories(engine, users, news_ids, max_len=3),
                repo.read_user_histories(engine, users[::-1], news_ids, max_len=3)[1][[3, 4, 5, 0, 1, 2]]):
        assert np.array_equal(got[1] if isinstance(got, tuple) else got, capped[1])
    # Ties run by item row from the last, as the click log read newest first does.
    assert [news_ids[capped[1][capped[0][u]:capped[0][u + 1]]].tolist() for u in range(2)] == [["N5", "N4", "N3"], ["N7", "N6", "N5"]]


def test_histories_of_many_users_are_chunked(engine, tmp_path):
    users = [f"U{i}" for i in range(6001)]
    _ingest(engine, tmp_path, ["N1", "N2"], [
        behavior_line(i + 1, u, T0, ["N1"] if i % 2 else [], ["N2-1"]) for i, u in enumerate(users)
    ])
    news_ids = np.array(["N1", "N2"], dtype=object)
    offsets, items = repo.read_user_histories(engine, np.array(users, dtype=object), news_ids, include_impression_clicks=False)
    lengths = np.diff(offsets)
    assert lengths.tolist() == [i % 2 for i in range(6001)]
    assert set(items.tolist()) == {0}


def test_click_log_and_time_range(engine, tmp_path):
    _ingest(engine, tmp_path, ["N1", "N2"], [
        behavior_line(1, "U1", T0, [], ["N1-1", "N2-0"]),
        behavior_line(2, "U2", T0 + timedelta(days=1), [], ["N2-1"]),
    ])
    assert repo.time_range(engine) == (T0, T0 + timedelta(days=1))
    news_ids = np.array(["N1", "N2"], dtype=object)
    log = repo.read_interaction_log(engine, news_ids, until=T0 + timedelta(hours=1))
    assert sorted(zip(news_ids[log.item_rows].tolist(), log.clicks.tolist())) == [("N1", 1), ("N2", 0)]
    later = repo.read_interaction_log(engine, news_ids, since=T0 + timedelta(hours=1))
    assert news_ids[later.item_rows].tolist() == ["N2"] and later.clicks.tolist() == [1]
    titles = repo.read_news_titles(engine, ["N2"])
    assert titles.loc["N2", "title"] == "Title of N2"
    # `similar --k` past 65,535 articles: one IN list of them was an internal error on PostgreSQL.
    many = repo.read_news_titles(engine, [f"X{i}" for i in range(70_000)] + ["N1"])
    assert many.index.tolist() == ["N1"] and many.loc["N1", "title"] == "Title of N1"


def test_click_log_holds_labelled_clicks_before_until(engine, tmp_path):
    _ingest(engine, tmp_path, ["N1", "N2", "N3"], [
        behavior_line(1, "U1", T0, ["N3"], ["N1-1", "N2-0"]),
        behavior_line(2, "U2", T0 + timedelta(hours=1), [], ["N2-1", "N3-1"]),
        behavior_line(3, "U1", T0 + timedelta(days=1), ["N3"], ["N2-1"]),
    ])
    news_ids = np.array(["N1", "N2", "N3"], dtype=object)
    clicks = repo.read_click_log(engine, news_ids)
    got = sorted(zip(np.repeat(clicks.user_ids, np.diff(clicks.offsets)).tolist(), clicks.times.tolist(), news_ids[clicks.items].tolist()))
    assert got == [("U1", T0, "N1"), ("U1", T0 + timedelta(days=1), "N2"),
                   ("U2", T0 + timedelta(hours=1), "N2"), ("U2", T0 + timedelta(hours=1), "N3")]
    # History entries (N3 of U1) are not logged clicks; until is exclusive; unknown articles drop.
    early = repo.read_click_log(engine, np.array(["N2", "N3"], dtype=object), until=T0 + timedelta(days=1))
    assert early.user_ids.tolist() == ["U2"] and len(early) == 2


def test_click_counts_count_labelled_clicks_in_the_window(engine, tmp_path):
    _ingest(engine, tmp_path, ["N1", "N2", "N3", "N4"], [
        behavior_line(1, "U1", T0, ["N3"], ["N1-1", "N2-0"]),
        behavior_line(2, "U2", T0 + timedelta(hours=1), [], ["N2-1", "N3-1", "N1-1"]),
        behavior_line(3, "U1", T0 + timedelta(days=1), ["N3"], ["N2-1", "N1-0"]),
        behavior_line(4, "U3", T0 + timedelta(days=2), [], ["N2", "N1"]),  # unlabelled: no clicks
    ])
    news_ids = np.array(["N4", "N2", "N1", "N3"], dtype=object)
    every = repo.read_click_counts(engine, news_ids, since=T0, until=T0 + timedelta(days=3))
    assert every.tolist() == [0, 2, 2, 1] and every.dtype == np.float64
    # since inclusive, until exclusive; History entries (N3 of U1) are not clicks.
    first_day = repo.read_click_counts(engine, news_ids, since=T0 + timedelta(hours=1), until=T0 + timedelta(days=1))
    assert first_day.tolist() == [0, 1, 1, 1]
    # The same as the clicks of the popularity log of that window (what evaluate counted before).
    log = repo.read_interaction_log(engine, news_ids, since=T0 + timedelta(hours=1), until=T0 + timedelta(days=1))
    assert first_day.tolist() == np.bincount(log.item_rows, weights=log.clicks, minlength=4).tolist()


def test_skipped_articles_are_the_label_0_candidates_of_each_users_labelled_impressions_before_until(engine, tmp_path):
    behaviors = [
        behavior_line(1, "U1", T0, ["N5"], ["N1-0", "N2-0", "N3-1", "N4-0"]),
        behavior_line(2, "U1", T0 + timedelta(hours=1), [], ["N1-0", "N3-0", "N5-1"]),  # N1 skipped again
        behavior_line(3, "U2", T0 + timedelta(hours=2), [], ["N4-0", "N5-0", "N1-1"]),
        behavior_line(4, "U1", T0 + timedelta(days=1), [], ["N5-0", "N6-0"]),  # at until: not read
        behavior_line(5, "U3", T0 + timedelta(hours=3), [], ["N1", "N2"]),  # unlabelled: not skips
    ]
    _ingest(engine, tmp_path, ["N1", "N2", "N3", "N4", "N5", "N6"], behaviors)
    news_ids = np.array(["N6", "N5", "N4", "N3", "N2", "N1"], dtype=object)

    def skipped(users, **kwargs):
        who, rows = repo.read_skipped(engine, users, news_ids, **kwargs)
        assert who.dtype == rows.dtype == np.int64
        return sorted(zip(np.asarray(users, dtype=object)[who].tolist(), news_ids[rows].tolist()))

    # Counted by hand from the lines above; a pair skipped twice is there twice.
    before = [("U1", "N1"), ("U1", "N1"), ("U1", "N2"), ("U1", "N3"), ("U1", "N4"), ("U2", "N4"), ("U2", "N5")]
    assert skipped(["U1", "U2", "U3"], until=T0 + timedelta(days=1)) == before
    assert skipped(["U2", "U9"], until=T0 + timedelta(days=1)) == before[5:]
    assert skipped(["U1", "U2"], until=T0 + timedelta(hours=1)) == [("U1", "N1"), ("U1", "N2"), ("U1", "N4")]
    assert skipped(["U1", "U2"]) == sorted(before + [("U1", "N5"), ("U1", "N6")])  # without until: all
    assert skipped([]) == [] and skipped(["U1"], until=T0) == []
    # An article missing from the ordering is dropped (the catalogue names every stored one).
    who, rows = repo.read_skipped(engine, ["U1"], np.array(["N1"], dtype=object))
    assert rows.tolist() == [0, 0] and who.tolist() == [0, 0]  # N1, skipped in lines 1 and 2


def test_a_scoring_run_reads_no_skip_an_ingest_commits_while_it_runs(engine, tmp_path):
    """predict and evaluate read the skips chunk by chunk, the rest of the store once at load: an
    ingest that commits between two chunks must not reach the later ones."""
    from recsys.models.affinity import KeyVocabulary
    from recsys.pipelines.scoring import SkipReader
    from recsys.store.ingest import ingest

    _ingest(engine, tmp_path, ["N1", "N2", "N3"], [behavior_line(1, "U1", T0, [], ["N1-0", "N3-1"])])
    news_ids = np.array(["N1", "N2", "N3"], dtype=object)
    codes = KeyVocabulary.of(["a", "a", "b"], ["x", "y", "x"]).codes(["a", "a", "b"], ["x", "y", "x"])
    reader = SkipReader(engine, T0 + timedelta(days=10), news_ids)
    assert reader(np.array(["U1"], dtype=object)).counts(codes).lookup(np.array(["U1"], dtype=object), codes[:1])[1].tolist() == [1]
    later = write_lines(tmp_path / "later.tsv", [behavior_line(1, "U1", T0 + timedelta(days=1), [], ["N2-0", "N3-1"])])
    ingest(engine, behaviors_path=later, quarantine_dir=tmp_path / "q")
    users = np.array(["U1", "U2"], dtype=object)  # another chunk's users: not the cached read
    assert reader(users).counts(codes).lookup(users[:1], codes[:1])[1].tolist() == [1]
    assert SkipReader(engine, T0 + timedelta(days=10), news_ids)(users).counts(codes).lookup(users[:1], codes[:1])[1].tolist() == [2]
    before = repo.last_impression_pk(engine)
    assert repo.read_skipped(engine, ["U1"], news_ids, through_pk=before - 1)[1].tolist() == [0]


def test_skipped_articles_of_many_users_are_read_in_chunks(engine, tmp_path):
    users = [f"U{i}" for i in range(5003)]
    _ingest(engine, tmp_path, ["N1", "N2"], [behavior_line(i + 1, u, T0, [], ["N1-0", "N2-1"]) for i, u in enumerate(users)])
    asked = users[::-1]
    who, rows = repo.read_skipped(engine, asked, np.array(["N1", "N2"], dtype=object))
    assert sorted(np.asarray(asked)[who].tolist()) == sorted(users) and set(rows.tolist()) == {0}


def test_training_histories_do_not_read_a_later_files_clicks(engine, tmp_path):
    # Train file: U1 clicks N2 at T0. A later (test) file stores U1's new History, which lists
    # that click; the training impression must still read only what came before it.
    from recsys.pipelines.train import read_windows

    ids = [f"N{i}" for i in range(1, 6)]
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    news = write_lines(tmp_path / "news.tsv", [news_line(n) for n in ids])
    train = write_lines(tmp_path / "train" / "behaviors.tsv", [
        behavior_line(1, "U1", T0, ["N1"], ["N2-1", "N3-0"]),
        behavior_line(2, "U1", T0 + timedelta(days=1), ["N1"], ["N4-1", "N3-0"]),
    ])
    test = write_lines(tmp_path / "test" / "behaviors.tsv", [
        behavior_line(1, "U1", T0 + timedelta(days=3), ["N1", "N2", "N4"], ["N5", "N3"]),
    ])
    ingest(engine, news_path=news, behaviors_path=train, quarantine_dir=tmp_path / "q")
    news_ids = repo.read_news(engine)["news_id"].to_numpy()
    window = (T0, T0 + timedelta(days=1), T0 + timedelta(days=2))

    def histories():
        train, valid, _ = read_windows(engine, news_ids, *window, source=None, history_len=10)
        return [[news_ids[imps.history(i)].tolist() for i in range(len(imps))] for imps in (train, valid)]

    before = histories()
    assert before == [[["N1"]], [["N1"]]]
    ingest(engine, behaviors_path=test, quarantine_dir=tmp_path / "q")
    stored = repo.read_impressions(engine, news_ids, since=window[0], until=window[1], history_len=10)
    assert news_ids[stored.history(0)].tolist() == ["N4", "N2", "N1"]  # what the store now holds
    # Impression 1 (T0) loses N2 (its own click) and N4; impression 2 (a day later) keeps N2,
    # clicked before it, and loses N4, its own click.
    assert histories() == [[["N1"]], [["N2", "N1"]]]


def test_streamed_reads_do_not_depend_on_the_chunk_size(engine, tmp_path, monkeypatch):
    # Rows are streamed STREAM_ROWS at a time and users read _IN_CHUNK at a time; an impression's
    # items can span chunks (one row per chunk: every impression but the first starts mid-stream).
    ids = [f"N{i}" for i in range(1, 10)]
    lines, expected = [], []
    for i in range(12):
        items = [f"N{4 + (i + k) % 5}" for k in range(1 + i % 4)]
        labels = [int(k == i % len(items)) for k in range(len(items))]
        lines.append(behavior_line(i + 1, f"U{i % 5}", T0 + timedelta(minutes=i), ["N1", "N2"] if i % 2 else ["N3"],
                                   [f"{n}-{y}" for n, y in zip(items, labels)]))
        expected.append((items, labels))
    # An unlabelled impression (a test file's) between them: left out of labelled reads.
    lines.append(behavior_line(99, "U7", T0 + timedelta(minutes=5, seconds=30), ["N1"], ["N9", "N8"]))
    _ingest(engine, tmp_path, ids, lines)
    news_ids = repo.read_news(engine)["news_id"].to_numpy()
    users = np.array([f"U{u}" for u in range(5)], dtype=object)
    every = repo.read_impressions(engine, news_ids)
    assert every.impression_ids.tolist() == [1, 2, 3, 4, 5, 6, 99, 7, 8, 9, 10, 11, 12]
    assert news_ids[every.candidates(6)].tolist() == ["N9", "N8"] and every.candidate_labels(6).tolist() == [-1, -1]

    def everything():
        imps = repo.read_impressions(engine, news_ids, history_len=5, labelled_only=True)
        log = repo.read_interaction_log(engine, news_ids)
        clicks = repo.read_click_log(engine, news_ids)
        histories = repo.read_user_histories(engine, users, news_ids)
        return imps, log, clicks, histories

    imps, log, clicks, histories = everything()
    assert imps.impression_ids.tolist() == list(range(1, 13))
    # Against the file: every impression's candidates and labels, in order.
    assert [(news_ids[imps.candidates(i)].tolist(), imps.candidate_labels(i).tolist()) for i in range(12)] == expected
    assert len(log) == sum(len(items) for items, _ in expected) and int(log.clicks.sum()) == 12 == len(clicks)
    for rows, users_at_once in ((1, 1), (2, 2), (5, 3)):
        monkeypatch.setattr(repo, "STREAM_ROWS", rows)
        monkeypatch.setattr(repo, "_IN_CHUNK", users_at_once)
        again, log2, clicks2, histories2 = everything()
        for field in ("impression_ids", "user_ids", "times", "history_offsets", "history_items",
                      "candidate_offsets", "candidate_items", "labels"):
            np.testing.assert_array_equal(getattr(again, field), getattr(imps, field), err_msg=f"{field} at {rows} rows")
        for a, b in ((log2.item_rows, log.item_rows), (log2.times, log.times), (log2.clicks, log.clicks),
                     (clicks2.offsets, clicks.offsets), (clicks2.items, clicks.items), (clicks2.times, clicks.times),
                     (histories2[0], histories[0]), (histories2[1], histories[1])):
            np.testing.assert_array_equal(a, b)


def test_an_unknown_candidate_is_named_whatever_chunk_it_is_in(engine, tmp_path, monkeypatch):
    _ingest(engine, tmp_path, ["N1", "N2", "N3"], [
        behavior_line(1, "U1", T0, [], ["N1-1", "N2-0"]),
        behavior_line(2, "U2", T0 + timedelta(hours=1), [], ["N2-0", "N3-1"]),
    ])
    monkeypatch.setattr(repo, "STREAM_ROWS", 1)
    with pytest.raises(KeyError, match="news id 'N3' has no features"):
        repo.read_impressions(engine, np.array(["N1", "N2"], dtype=object))
    # The logs drop what they cannot index instead.
    assert len(repo.read_interaction_log(engine, np.array(["N1", "N2"], dtype=object))) == 3


def test_a_reingest_between_the_two_queries_of_a_read_is_not_seen(engine, tmp_path, monkeypatch):
    # read_impressions reads the items, then the impressions' own columns; a corrected file
    # ingested in between (impression 2 moved ten days later) must not mix into the result.
    (tmp_path / "fix").mkdir()
    news = write_lines(tmp_path / "news.tsv", [news_line(n) for n in ("N1", "N2", "N3")])
    first = write_lines(tmp_path / "behaviors.tsv",
                        [behavior_line(i + 1, "U1", T0 + timedelta(hours=i), ["N1"], ["N2-1", "N3-0"]) for i in range(3)])
    ingest(engine, news_path=news, behaviors_path=first, quarantine_dir=tmp_path / "q", source="train")
    news_ids = repo.read_news(engine)["news_id"].to_numpy()
    moved = write_lines(tmp_path / "fix" / "behaviors.tsv",
                        [behavior_line(2, "U1", T0 + timedelta(days=10), ["N1"], ["N2-1", "N3-0"])])
    stream, streams = repo._stream, []

    def ingest_after_the_items(conn, query, columns):
        yield from stream(conn, query, columns)
        streams.append(columns)
        if len(streams) == 1:  # the items are read; the impression rows not yet
            ingest(engine, behaviors_path=moved, quarantine_dir=tmp_path / "q", source="train")

    monkeypatch.setattr(repo, "_stream", ingest_after_the_items)
    window = dict(since=T0, until=T0 + timedelta(days=1))
    imps = repo.read_impressions(engine, news_ids, **window)
    assert streams[0][1] == "news_id" and streams[1][1] == "impression_id"  # the ingest ran between the two
    assert imps.impression_ids.tolist() == [1, 2, 3]
    assert imps.times.tolist() == [T0, T0 + timedelta(hours=1), T0 + timedelta(hours=2)]
    monkeypatch.setattr(repo, "_stream", stream)
    assert repo.read_impressions(engine, news_ids, **window).impression_ids.tolist() == [1, 3]  # a new read sees it


def test_a_failing_read_raises_sqlalchemys_error_and_leaves_the_connection_usable(engine):
    """Reads fetch through the driver's cursor; its errors come back as SQLAlchemy's, as the
    CLI expects of every store error, with the statement named."""
    import sqlalchemy as sa

    from recsys.store import schema as s

    bad = sa.select(s.news.c.news_id, sa.literal_column("no_such_column"))
    with engine.connect() as conn:
        with pytest.raises(sa.exc.DBAPIError, match="no_such_column") as caught:
            list(repo._stream(conn, bad, ["news_id", "x"]))
        assert caught.value.statement is not None and "no_such_column" in caught.value.statement
        conn.rollback()
        assert conn.execute(sa.select(sa.func.count()).select_from(s.news)).scalar_one() == 0


def test_a_read_stopped_early_closes_its_cursor(engine, tmp_path, monkeypatch):
    # A caller that stops after the first chunk (read_impressions on an unknown candidate) closes
    # the stream; on PostgreSQL a server-side cursor left open would outlive the read. The same
    # connection then reads on.
    import sqlalchemy as sa

    from recsys.store import schema as s

    _ingest(engine, tmp_path, ["N1", "N2", "N3"], [
        behavior_line(i + 1, "U1", T0 + timedelta(minutes=i), [], ["N1-1", "N3-0"]) for i in range(4)
    ])
    monkeypatch.setattr(repo, "STREAM_ROWS", 2)
    with engine.connect() as conn:
        items = repo._stream(conn, sa.select(s.impression_items.c.news_id), ["news_id"])
        assert next(items)["news_id"].tolist() == ["N1", "N3"]
        items.close()
        if engine.dialect.name == "postgresql":
            assert conn.exec_driver_sql("SELECT count(*) FROM pg_cursors").scalar_one() == 0
        assert len(list(repo._stream(conn, sa.select(s.impression_items.c.news_id), ["news_id"]))) == 4


def test_ids_are_quoted_in_the_reads_own_sql(engine, tmp_path):
    # Ids reach SQLite's SQL as rendered literals (PostgreSQL's as bound parameters); ingest only
    # admits [A-Za-z0-9_-], but the read functions take any ids and must not break on a quote.
    _ingest(engine, tmp_path, ["N1", "N2"], [behavior_line(1, "U1", T0, ["N1"], ["N2-1"])])
    news_ids = repo.read_news(engine)["news_id"].to_numpy()
    offsets, items = repo.read_user_histories(engine, np.array(["U'1", "U1", "U\\1"], dtype=object), news_ids)
    assert np.diff(offsets).tolist() == [0, 2, 0]
    assert news_ids[items].tolist() == ["N2", "N1"]


@pytest.mark.parametrize("source", ["MIND_100%_sample/behaviors", "it's %s %(x)s \\ %%"])
def test_a_source_with_percent_signs_and_quotes_selects_its_impressions(engine, tmp_path, source):
    # A source is free text (the file's folder and name by default). psycopg's parameter style
    # doubles '%' in rendered SQL; a literal sent without parameters compared as 'MIND_100%%_...'
    # and silently selected nothing on PostgreSQL.
    news = write_lines(tmp_path / "news.tsv", [news_line(n) for n in ("N1", "N2", "N3")])
    beh = write_lines(tmp_path / "behaviors.tsv", [
        behavior_line(1, "U1", T0, ["N1"], ["N2-1", "N3-0"]),
        behavior_line(2, "U1", T0 + timedelta(hours=1), ["N1"], ["N3-1"]),
    ])
    ingest(engine, news_path=news, behaviors_path=beh, quarantine_dir=tmp_path / "q", source=source)
    other = write_lines(tmp_path / "other.tsv", [behavior_line(1, "U2", T0, [], ["N1-1", "N2-0"])])
    ingest(engine, behaviors_path=other, quarantine_dir=tmp_path / "q", source="other")
    news_ids = repo.read_news(engine)["news_id"].to_numpy()
    assert repo.read_impressions(engine, news_ids, source=source).impression_ids.tolist() == [1, 2]
    assert repo.read_impressions(engine, news_ids, source=source, labelled_only=True).user_ids.tolist() == ["U1", "U1"]
    assert repo.read_impressions(engine, news_ids, source="other").user_ids.tolist() == ["U2"]


@pytest.mark.postgres
def test_a_streamed_read_is_planned_to_be_read_to_the_end(pg_database_url):
    # PostgreSQL plans a cursor for a tenth of its rows (cursor_tuple_fraction 0.1) and so scanned
    # the whole clicks table for each shard's histories: 0.7-0.9 s a shard at 5M clicks, not 0.1 s.
    import sqlalchemy as sa

    from recsys.store.database import create_engine_for

    engine = create_engine_for(pg_database_url)
    try:
        with engine.connect() as conn:
            query = sa.select(sa.func.current_setting("cursor_tuple_fraction"))
            chunks = list(repo._stream(conn, query, ["fraction"]))
    finally:
        engine.dispose()
    assert [chunk["fraction"].tolist() for chunk in chunks] == [["1"]]


def test_impressions_of_one_second_are_read_by_user_not_by_the_line_order(engine, tmp_path):
    # Read by row id (the ingest's line order), the same impressions in another line order
    # trained another model with the same seed.
    _ingest(engine, tmp_path, ["N1", "N2"], [
        behavior_line(1, "U2", T0, [], ["N1-1", "N2-0"]),
        behavior_line(2, "U1", T0, [], ["N2-1", "N1-0"]),
        behavior_line(3, "U10", T0, [], ["N1-0", "N2-1"]),
        behavior_line(4, "U0", T0 - timedelta(seconds=1), [], ["N1-1", "N2-0"]),
    ])
    news_ids = repo.read_news(engine)["news_id"].to_numpy()
    imps = repo.read_impressions(engine, news_ids)
    assert imps.user_ids.tolist() == ["U0", "U1", "U10", "U2"]  # time, then user id in code point order
    assert imps.impression_ids.tolist() == [4, 2, 3, 1]
    assert [news_ids[imps.candidates(i)].tolist() for i in range(4)] == [["N1", "N2"], ["N2", "N1"], ["N1", "N2"], ["N1", "N2"]]
    assert [imps.candidate_labels(i).tolist() for i in range(4)] == [[1, 0], [1, 0], [0, 1], [1, 0]]


@pytest.mark.postgres
def test_ids_are_ordered_by_code_point_in_a_postgresql_database_with_a_language_collation(icu_engine, tmp_path):
    # A production cluster is often created with en_US or ICU collations, which order "n1"
    # before "N1" and skip "-" and "_": an article's position breaks the ties of the history
    # cap, top-k and training order, so the same files trained and ranked differently there.
    import sqlalchemy as sa

    engine = icu_engine
    ids = ["n1", "N_3", "N-2", "N1", "Nb", "NA"]
    with engine.connect() as conn:  # the database's own order is not the code point order
        in_db = conn.execute(sa.text("SELECT unnest(CAST(:ids AS text[])) AS i ORDER BY i"), {"ids": ids}).scalars().all()
    assert in_db != sorted(ids)
    _ingest(engine, tmp_path, ids, [
        behavior_line(1, "u1", T0, [], ["N1-1", "n1-0"]),
        behavior_line(2, "U_2", T0, [], ["N1-0", "n1-1"]),
        behavior_line(3, "U-3", T0, [], ["NA-1", "Nb-0"]),
    ])
    news_ids = repo.read_news(engine)["news_id"].to_numpy()
    assert news_ids.tolist() == sorted(ids)
    assert repo.read_impressions(engine, news_ids).user_ids.tolist() == sorted(["u1", "U_2", "U-3"])


def test_the_news_state_is_read_news_narrowed_and_digests_alike(engine, tmp_path, small_world):
    """A nightly retry digests ``read_news_state``; the refresh that recorded the index digested
    ``read_news``: the same rows, values and types on either backend, or every night would
    refresh (or, worse, a changed article would be missed)."""
    from recsys.config import load_config
    from recsys.pipelines.index import catalogue_state

    news = small_world["news"].read_text(encoding="utf-8") + news_line("N0") + "\n"  # never shown nor listed
    ingest(engine, news_path=write_lines(tmp_path / "more_news.tsv", news.splitlines()),
           behaviors_path=small_world["behaviors"], quarantine_dir=tmp_path / "q")
    full, narrow = repo.read_news(engine), repo.read_news_state(engine)
    assert narrow["news_id"].tolist() == ["N0", "N1", "N2", "N3", "N4", "N5", "N6"]
    pd.testing.assert_frame_equal(narrow, full[list(narrow.columns)])
    assert narrow["first_seen_at"].isna().tolist() == [True, *[False] * 6]
    config = load_config(None)
    assert catalogue_state(narrow, config) == catalogue_state(full, config)
