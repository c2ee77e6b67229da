"""Ingest into both backends: contents worked out by hand, updates, idempotency, bad rows, strict."""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import re
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from recsys.columns import IMAGE_BAD_NAME, IMAGE_CORRUPT, IMAGE_EMPTY, IMAGE_MISSING, IMAGE_OK
from recsys.data.mind import MAX_LINE_BYTES, MindFileError
from recsys.errors import ConfigError, SchemaError
from recsys.store import schema
from recsys.store.bulk import BulkWriter
from recsys.store.ingest import content_hash, default_source, ingest
from recsys.store.stats import store_stats

from .conftest import T0
from .mind_files import behavior_line, dump_store, news_line, wipe_store, write_lines

H, D = timedelta(hours=1), timedelta(days=1)


def rows(engine, table, *columns, order_by=None):
    t = schema.metadata.tables[table]
    cols = [t.c[c] for c in columns] if columns else list(t.c)
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(*cols).order_by(*(order_by or cols)))]


def run(engine, quarantine_dir, **kwargs):
    return ingest(engine, quarantine_dir=quarantine_dir, **kwargs)


# --- a small world, checked row by row -----------------------------------------------------------


@pytest.mark.parametrize("batch_size", [5000, 1])
def test_small_world_rows_by_hand(engine, small_world, quarantine_dir, batch_size):
    report = run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"],
                 batch_size=batch_size)
    source = f"{small_world['root'].name}/behaviors"
    assert (report.news, report.users, report.impressions, report.impression_items) == (6, 3, 4, 10)
    assert (report.num_bad_rows, report.quarantine_file, report.source) == (0, None, source)
    assert not quarantine_dir.exists()

    assert rows(engine, "users", "user_id", "first_seen_at", "last_seen_at", "history_at") == [
        ("U1", T0, T0 + D, T0 + D),
        ("U2", T0 + H, T0 + H, T0 + H),
        ("U3", T0 - 2 * H, T0 - 2 * H, T0 - 2 * H),
    ]
    assert rows(engine, "users", "history_hash") == sorted(
        (hashlib.sha256(h.encode()).hexdigest()[:32],) for h in ("N1 N2 N3", "", "N6")
    )
    assert rows(engine, "impressions", "source", "impression_id", "user_id", "time") == [
        (source, 1, "U1", T0), (source, 2, "U2", T0 + H), (source, 3, "U1", T0 + D), (source, 4, "U3", T0 - 2 * H),
    ]
    im, it = schema.impressions, schema.impression_items
    with engine.connect() as conn:
        items = conn.execute(
            sa.select(im.c.impression_id, it.c.position, it.c.news_id, it.c.label)
            .join(im, im.c.id == it.c.impression_pk).order_by(im.c.impression_id, it.c.position)
        ).all()
    assert [tuple(r) for r in items] == [
        (1, 0, "N3", 1), (1, 1, "N4", 0), (1, 2, "N5", 0),
        (2, 0, "N1", 0), (2, 1, "N2", 1), (2, 2, "N6", 1),
        (3, 0, "N4", 1), (3, 1, "N5", 0),
        (4, 0, "N3", 0), (4, 1, "N4", 0),
    ]
    # U1's History is the one of its latest impression (3); clicks keep their earliest time.
    assert rows(engine, "clicks", "user_id", "news_id", "history_pos", "clicked_at") == [
        ("U1", "N1", 0, None), ("U1", "N2", 1, None), ("U1", "N3", 2, T0), ("U1", "N4", None, T0 + D),
        ("U2", "N2", None, T0 + H), ("U2", "N6", None, T0 + H),
        ("U3", "N6", 0, None),
    ]
    # First time each article was shown or listed in a History: N1 and N2 are listed at T0 (U1)
    # before they are shown at T0 + H; N6 is listed at T0 - 2h (U3) before it is shown.
    assert rows(engine, "news", "news_id", "first_seen_at") == [
        ("N1", T0), ("N2", T0), ("N3", T0 - 2 * H), ("N4", T0 - 2 * H), ("N5", T0), ("N6", T0 - 2 * H),
    ]
    assert store_stats(engine) == {
        "news": 6, "news_with_image": 0, "users": 3, "impressions": 4, "impression_items": 10, "labelled_items": 10,
        "clicked_items": 4, "clicks": 7, "quarantined": 0, "sources": 1,
        "image_ok": 0, "image_missing": 6, "image_corrupt": 0, "image_too_large": 0, "image_empty": 0, "image_bad_name": 0,
    }


def test_report_clicks_count_writes_and_stats_count_rows(engine, small_world, quarantine_dir):
    """docs/data-contract.md, "What ingest reports": the report's ``clicks`` is not ``recsys stats``'."""
    report = run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"])
    # History entries U1: N1 N2 N3, U3: N6; clicked pairs (U1, N3), (U1, N4), (U2, N2), (U2, N6).
    # (U1, N3) is both: one row, two writes.
    assert (report.clicks, store_stats(engine)["clicks"]) == (4 + 4, 7)
    report = run(engine, quarantine_dir, behaviors_path=small_world["behaviors"])
    assert (report.clicks, store_stats(engine)["clicks"]) == (4, 7)  # Histories unchanged: only the clicked pairs


def test_news_text_round_trips_with_any_script_and_entity_json(engine, small_world, quarantine_dir):
    run(engine, quarantine_dir, news_path=small_world["news"])
    by_id = {r[0]: r for r in rows(engine, "news", "news_id", "title", "abstract", "title_entities", "abstract_entities", "image_status")}
    assert by_id["N3"][1:3] == ("東京で大雨、交通に影響", "Тяжёлый дождь — العاصفة")
    assert by_id["N1"][3].startswith('[{"Label": "Coast"') and by_id["N1"][4] == "[]"
    assert by_id["N6"][3:5] == ("", "")
    assert {r[5] for r in by_id.values()} == {IMAGE_MISSING}


def test_content_hash_covers_text_fields_and_image(engine, small_world, quarantine_dir):
    run(engine, quarantine_dir, news_path=small_world["news"])
    (stored,) = rows(engine, "news", "content_hash", order_by=[schema.news.c.news_id])[:1]
    expected = hashlib.sha256("\x1f".join(["Storm hits the coast", "Heavy rain.", "news", "newsus", ""]).encode()).hexdigest()
    assert stored == (expected,)
    assert content_hash("ab", "c", "x", "y", None) != content_hash("a", "bc", "x", "y", None)
    assert content_hash("a", "b", "c", "d", None) != content_hash("a", "b", "c", "d", "00" * 32)


def test_content_hash_is_unambiguous_and_keeps_every_earlier_hash():
    # A unit separator inside a field made two versions of an article join alike, so the
    # second kept the first one's cached vectors (title + abstract text differs).
    assert content_hash("a\x1fb", "c", "x", "y", None) != content_hash("a", "b\x1fc", "x", "y", None)
    assert content_hash("a\x1f", "b", "x", "y", None) != content_hash("a", "\x1fb", "x", "y", None)
    # Fields free of it hash as before (worked out with hashlib, as earlier releases stored
    # them): upgrading re-encodes nothing.
    assert content_hash("Team wins the cup", "", "sports", "football", None) == (
        "b536713d248ab878d131c70de47fe4fd23a7f217138dd3479d1a37c15bebcac7"
    )
    joined = "\x1f".join(["Crème brûlée \x1e\U0001f600", 'say "hi"\\', "food", "", "0f" * 32])
    assert content_hash("Crème brûlée \x1e\U0001f600", 'say "hi"\\', "food", "", "0f" * 32) == (
        hashlib.sha256(joined.encode()).hexdigest()
    )


def test_crlf_files_give_the_same_store(engine, small_world, quarantine_dir, tmp_path):
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"], source="s")
    expected = dump_store(engine)
    wipe_store(engine)
    crlf = tmp_path / "crlf"
    crlf.mkdir()
    for name in ("news.tsv", "behaviors.tsv"):
        (crlf / name).write_bytes(small_world[name.split(".")[0]].read_bytes().replace(b"\n", b"\r\n"))
    run(engine, quarantine_dir, news_path=crlf / "news.tsv", behaviors_path=crlf / "behaviors.tsv", source="s")
    assert dump_store(engine) == expected


def test_file_order_and_batch_size_do_not_change_the_store(engine, small_world, quarantine_dir, tmp_path):
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"], source="s")
    expected = dump_store(engine)
    wipe_store(engine)
    lines = small_world["behaviors"].read_text().splitlines()
    reversed_file = write_lines(tmp_path / "reversed.tsv", lines[::-1])
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=reversed_file, source="s", batch_size=1)
    assert dump_store(engine) == expected


# --- updates and reruns ----------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [5000, 1])
def test_same_files_twice_leave_the_same_store(engine, small_world, quarantine_dir, batch_size):
    args = dict(news_path=small_world["news"], behaviors_path=small_world["behaviors"], batch_size=batch_size)
    run(engine, quarantine_dir, **args)
    first = dump_store(engine) | {"news_updated_at": rows(engine, "news", "news_id", "updated_at")}
    report = run(engine, quarantine_dir, **args)
    assert report.users == 0  # all known now
    # Each line matches only what its own id holds: replaced in place, not a repeat.
    assert (report.impressions, report.impressions_repeated, report.impressions_stored_elsewhere) == (4, 0, 0)
    assert dump_store(engine) | {"news_updated_at": rows(engine, "news", "news_id", "updated_at")} == first


def test_newer_news_row_updates_the_article(engine, small_world, quarantine_dir, tmp_path, caplog):
    assert run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"]).news_changed == 0
    before = {r[0]: r for r in rows(engine, "news", "news_id", "title", "content_hash", "updated_at", "first_seen_at")}
    newer = write_lines(tmp_path / "news2.tsv", [
        news_line("N1", title="Storm hits the coast, updated", abstract="Heavy rain."),
        news_line("N2", category="sports", subcategory="football", title="Team wins the cup"),
        news_line("N7", title="Brand new"),
    ])
    with caplog.at_level(logging.INFO, logger="recsys.ingest"):
        report = run(engine, quarantine_dir, news_path=newer)
    assert (report.news, report.news_changed) == (3, 1)  # N1's title; N2 as stored, N7 new
    said = [r for r in caplog.records if "already stored got other content" in r.getMessage()]
    assert [r.getMessage().startswith(f"1 articles already stored got other content (title, abstract, categories or "
                                      f"cover) from {newer}, first N1") for r in said] == [True]
    assert said[0].levelno == logging.INFO  # a night's routine corrections: a warning every night read as trouble
    after = {r[0]: r for r in rows(engine, "news", "news_id", "title", "content_hash", "updated_at", "first_seen_at")}
    assert after["N1"][1] == "Storm hits the coast, updated"
    assert after["N1"][2] != before["N1"][2]
    assert after["N1"][3] > before["N1"][3]
    assert after["N1"][4] == before["N1"][4] == T0  # first seen comes from behaviors, kept
    assert after["N2"] == before["N2"]  # unchanged content: not even updated_at moves
    assert after["N7"][4] is None
    # Replaying the older file undoes the correction, and says so; the same file again changes nothing.
    assert run(engine, quarantine_dir, news_path=small_world["news"]).news_changed == 1
    assert run(engine, quarantine_dir, news_path=small_world["news"]).news_changed == 0


@pytest.mark.parametrize("batch_size", [5000, 2, 1])
def test_duplicate_news_id_in_one_file_keeps_the_last_line(engine, quarantine_dir, tmp_path, batch_size):
    news = write_lines(tmp_path / "news.tsv", [news_line("N1", title="first"), news_line("N2"), news_line("N3"),
                                               news_line("N1", title="last")])
    report = run(engine, quarantine_dir, news_path=news, batch_size=batch_size)
    assert report.news == 3
    stored = rows(engine, "news", "news_id", "title", "content_hash", "updated_at")
    assert [r[:2] for r in stored] == [("N1", "last"), ("N2", "Title of N2"), ("N3", "Title of N3")]
    # The earlier line is never written in between, so the same file again changes nothing.
    run(engine, quarantine_dir, news_path=news, batch_size=batch_size)
    assert rows(engine, "news", "news_id", "title", "content_hash", "updated_at") == stored


@pytest.mark.parametrize("batch_size", [5000, 3, 1])
def test_a_repeated_impression_id_is_a_bad_row_whatever_the_batches(engine, quarantine_dir, tmp_path, batch_size):
    news = write_lines(tmp_path / "news.tsv", [news_line("N1"), news_line("N2")])
    lines = [behavior_line(i, f"U{i}", T0 + i * H, [], ["N1-1", "N2-0"]) for i in range(1, 6)]
    lines += [behavior_line(3, "UA", T0, ["N1"], ["N2-1"]), behavior_line(1, "UB", T0, [], ["N1-0"]),
              behavior_line(3, "UC", T0, [], ["N1-0"])]
    behaviors = write_lines(tmp_path / "behaviors.tsv", lines)
    report = run(engine, quarantine_dir, news_path=news, behaviors_path=behaviors, batch_size=batch_size)
    assert (report.impressions, report.users, report.num_bad_rows) == (5, 5, 3)
    assert rows(engine, "impressions", "impression_id", "user_id") == [(i, f"U{i}") for i in range(1, 6)]
    assert rows(engine, "users", "user_id") == [(f"U{i}",) for i in range(1, 6)]
    quarantined = rows(engine, "quarantine", "line", "reason")
    assert [(line, re.search(r"has '(\d+)'.*\(line (\d+) has it\)", reason).groups()) for line, reason in quarantined] == [
        (6, ("3", "3")), (7, ("1", "1")), (8, ("3", "3"))]


def test_a_killed_ingests_quarantine_temp_file_is_removed(engine, tmp_path, quarantine_dir, monkeypatch):
    import os
    import time

    from recsys import atomic
    from recsys.store.ingest import STALE_QUARANTINE_SECONDS

    quarantine_dir.mkdir()
    killed, live = quarantine_dir / ".20190101T000000_000000-behaviors.tsv.tmp", quarantine_dir / ".20190101T000001_000000-behaviors.tsv.tmp"
    killed.write_text("file\tline\n")
    live.write_text("file\tline\n")
    later = time.time() + STALE_QUARANTINE_SECONDS + 60  # ctime cannot be set back: move the clock on
    monkeypatch.setattr(atomic.time, "time", lambda: later)
    os.utime(live, (later - 5, later - 5))  # another ingest, still writing
    files = _world_with(tmp_path, "behaviors", behavior_line(9, "U1", T0, [], ["N1-1", "N55-x"]))
    report = run(engine, quarantine_dir, news_path=files["news"], behaviors_path=files["behaviors"])
    assert report.num_bad_rows == 1 and Path(report.quarantine_file).exists()
    assert not killed.exists() and live.exists()


def test_a_live_ingest_touches_its_quarantine_temp_file_after_every_batch(engine, tmp_path, quarantine_dir):
    import os
    import time

    files = _world_with(tmp_path, "behaviors", behavior_line(9, "U1", T0, [], ["N1-1", "N55-x"]))  # bad row first
    with open(files["behaviors"], "a") as f:  # two batches after it (the last renames the file into place)
        f.write(behavior_line(3, "U3", T0 + 2 * H, [], ["N2-1", "N3-0"]) + "\n")
    past = time.time() - 86400
    seen = []

    def backdate(_lines):  # what a slow batch would leave for another ingest's cleanup to see
        for tmp in quarantine_dir.glob(".*.tmp"):
            seen.append(tmp.stat().st_mtime)
            os.utime(tmp, (past, past))

    run(engine, quarantine_dir, news_path=files["news"], behaviors_path=files["behaviors"], batch_size=1, progress=backdate)
    assert len(seen) >= 2 and min(seen) > time.time() - 60


class _FullDiskFile:
    """A text file on a full disk: writes are buffered, and fail once they reach the disk."""

    def __init__(self, path, *args, **kwargs):
        self._file = open(path, *args, **kwargs)  # noqa: SIM115 - closed by close()
        self._pending = False

    def write(self, text: str) -> int:
        self._pending = True
        return len(text)

    def flush(self) -> None:
        if self._pending:
            raise OSError(errno.ENOSPC, "No space left on device")

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:  # closed even when its flush fails, as a real file is
        self._file.close()
        pending, self._pending = self._pending, False
        if pending:
            raise OSError(errno.ENOSPC, "No space left on device")


def _quarantine_fails(monkeypatch, quarantine_dir: Path, where: str) -> None:
    """The quarantine folder cannot take the file: read-only (``open``), full (``write``), or
    full when the file is renamed into place (``rename``)."""
    import recsys.store.ingest as ingest_module

    if where == "open":
        def fail_open(path, *args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", str(path))

        monkeypatch.setattr(ingest_module, "open", fail_open, raising=False)
    elif where == "write":
        monkeypatch.setattr(ingest_module, "open", _FullDiskFile, raising=False)
    else:
        real_replace = ingest_module.os.replace

        def fail_replace(src, dst, *args, **kwargs):
            if Path(dst).parent == quarantine_dir:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(ingest_module.os, "replace", fail_replace)


@pytest.mark.parametrize("where", ["open", "write", "rename"])
@pytest.mark.parametrize("batch_size", [5000, 1])
def test_a_quarantine_file_that_cannot_be_written_fails_the_ingest_and_its_batch(engine, tmp_path, quarantine_dir,
                                                                                 monkeypatch, where, batch_size):
    # On a full disk the ingest committed every line, then failed (exit 2) writing the quarantine
    # file: a failed run whose data and quarantine rows were stored, the file missing, a .tmp left.
    files = _world_with(tmp_path, "behaviors", behavior_line(9, "U1", T0, [], ["N1-1", "N55-x"]))
    args = {"news_path": files["news"], "behaviors_path": files["behaviors"], "batch_size": batch_size}
    clean = run(engine, tmp_path / "clean", **args)
    clean_store, clean_file = dump_store(engine), Path(clean.quarantine_file).read_text()
    wipe_store(engine)
    news_only = run(engine, tmp_path / "news-only", news_path=files["news"])
    assert news_only.quarantine_file is None
    before = dump_store(engine)

    with monkeypatch.context() as patch:
        _quarantine_fails(patch, quarantine_dir, where)
        reason = "Read-only file system" if where == "open" else "No space left on device"
        with pytest.raises(ConfigError, match=rf"quarantine file {re.escape(str(quarantine_dir))}/\S+-behaviors\.tsv "
                                              rf"cannot be written \({reason}\): the ingest stopped"):
            run(engine, quarantine_dir, **args)
    assert list(quarantine_dir.iterdir()) == []  # no .tmp, no file that names rows the store lacks
    if batch_size == 5000:  # one batch, rolled back: the store is as it was
        assert dump_store(engine) == before
    else:  # the batches before the failing one stay, as after a crash: line 1 (line 2 is bad)
        assert rows(engine, "impressions", "impression_id") == [(1,)]

    report = run(engine, quarantine_dir, **args)  # the rerun gives what one clean run gives
    assert dump_store(engine) == clean_store
    assert Path(report.quarantine_file).read_text() == clean_file


def test_first_lines_agrees_with_a_dict(tmp_path):
    """The sorted runs that remember impression ids give what a dict of first lines gives."""
    from recsys.data.mind import FirstLines

    rng = np.random.default_rng(0)
    seen, reference, line = FirstLines(), {}, 0
    for size in rng.integers(1, 300, 60):
        ids = rng.integers(0, 2000, size) * 10**14  # large ids, many repeats
        ids = np.unique(ids)  # one batch's new candidates; repeats are looked up first
        lines = np.arange(line + 1, line + 1 + len(ids))
        line += len(ids)
        found = seen.lookup(ids)
        assert found.tolist() == [reference.get(i, 0) for i in ids.tolist()]
        new = found == 0
        seen.add(ids[new], lines[new])
        for i, at in zip(ids[new].tolist(), lines[new].tolist()):
            reference[i] = at
    assert len(seen._runs) <= 8


def test_unlabelled_test_file_then_history_replacement(engine, small_world, quarantine_dir, tmp_path):
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"])
    (tmp_path / "test").mkdir()
    test_file = write_lines(tmp_path / "test" / "behaviors.tsv", [
        behavior_line(1, "U1", T0 + 2 * D, ["N1", "N4"], ["N5", "N6"]),
        behavior_line(2, "U4", T0 + 2 * D, [], ["N1"]),
    ])
    report = run(engine, quarantine_dir, behaviors_path=test_file)
    assert report.source == "test/behaviors" and report.users == 1
    # U1: N2 was only in the old History (gone); N3 was clicked (kept, no longer in History);
    # N4 was clicked and is now in History.
    assert rows(engine, "clicks", "user_id", "news_id", "history_pos", "clicked_at", order_by=None)[:3] == [
        ("U1", "N1", 0, None), ("U1", "N3", None, T0), ("U1", "N4", 1, T0 + D),
    ]
    stats = store_stats(engine)
    assert (stats["impressions"], stats["impression_items"], stats["labelled_items"], stats["sources"]) == (6, 13, 10, 2)
    im, it = schema.impressions, schema.impression_items
    with engine.connect() as conn:
        labels = conn.execute(sa.select(it.c.label).join(im, im.c.id == it.c.impression_pk).where(im.c.source == "test/behaviors")).scalars().all()
    assert labels == [None, None, None]


def test_an_article_only_listed_in_histories_is_as_old_as_its_first_listing(engine, quarantine_dir, tmp_path):
    """MIND's back catalogue appears only in History columns: clicked before the log, so it is
    not brand new. Its first listing stands in for its publication; files only lower it."""
    news = write_lines(tmp_path / "news.tsv", [news_line(n) for n in ("N1", "N2", "N3", "N4")])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_lines(tmp_path / "a" / "behaviors.tsv", [
        behavior_line(1, "U1", T0 + D, ["N1", "N2"], ["N3-1"]),
        behavior_line(2, "U2", T0, ["N2"], ["N3-0"]),
    ])
    run(engine, quarantine_dir, news_path=news, behaviors_path=first)
    # N1 only listed (by U1 at T0 + D), N2 first listed by U2 at T0, N4 neither listed nor shown.
    assert rows(engine, "news", "news_id", "first_seen_at") == [
        ("N1", T0 + D), ("N2", T0), ("N3", T0), ("N4", None),
    ]
    later = write_lines(tmp_path / "b" / "behaviors.tsv", [
        behavior_line(1, "U3", T0 - H, ["N1"], ["N2-0"]),
        behavior_line(2, "U3", T0 + 2 * D, ["N3", "N4"], ["N2-1"]),
    ])
    run(engine, quarantine_dir, behaviors_path=later)
    assert rows(engine, "news", "news_id", "first_seen_at") == [
        ("N1", T0 - H), ("N2", T0 - H), ("N3", T0), ("N4", T0 + 2 * D),
    ]


@pytest.mark.parametrize("batch_size", [5000, 1])
def test_a_click_repeated_a_day_later_keeps_its_first_time(engine, small_world, quarantine_dir, tmp_path, batch_size):
    # The later line comes first in the file: in one batch, then in a batch of its own (the upsert).
    behaviors = write_lines(tmp_path / "behaviors.tsv", [
        behavior_line(1, "U1", T0 + D, [], ["N3-1", "N4-0"]), behavior_line(2, "U1", T0, [], ["N3-1", "N5-0"])])
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=behaviors, batch_size=batch_size)
    assert rows(engine, "clicks", "user_id", "news_id", "history_pos", "clicked_at") == [("U1", "N3", None, T0)]


def test_a_click_earlier_than_the_stored_one_replaces_it_across_ingests(engine, small_world, quarantine_dir, tmp_path):
    later = write_lines(tmp_path / "later.tsv", [behavior_line(1, "U1", T0 + D, [], ["N3-1", "N4-0"])])
    earlier = write_lines(tmp_path / "earlier.tsv", [behavior_line(2, "U1", T0, [], ["N3-1", "N5-0"])])
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=later, source="s")
    assert rows(engine, "clicks", "news_id", "clicked_at") == [("N3", T0 + D)]
    run(engine, quarantine_dir, behaviors_path=earlier, source="s")
    assert rows(engine, "clicks", "news_id", "clicked_at") == [("N3", T0)]
    run(engine, quarantine_dir, behaviors_path=later, source="s")  # the later click again moves nothing
    assert rows(engine, "clicks", "news_id", "clicked_at") == [("N3", T0)]


def test_an_id_repeated_in_a_history_keeps_its_first_position(engine, small_world, quarantine_dir, tmp_path):
    # docs/data-contract.md: history_pos is the index in the History; a repeated id keeps its first.
    first = write_lines(tmp_path / "first.tsv", [behavior_line(1, "U1", T0, ["N1", "N2", "N1"], ["N3-0"])])
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=first, source="s")
    assert rows(engine, "clicks", "user_id", "news_id", "history_pos") == [("U1", "N1", 0), ("U1", "N2", 1)]
    # A later History replaces the stored one by the same rule.
    later = write_lines(tmp_path / "later.tsv", [behavior_line(2, "U1", T0 + D, ["N2", "N1", "N2", "N4"], ["N3-0"])])
    run(engine, quarantine_dir, behaviors_path=later, source="s")
    assert rows(engine, "clicks", "user_id", "news_id", "history_pos") == [("U1", "N1", 1), ("U1", "N2", 0), ("U1", "N4", 3)]


def test_an_older_history_does_not_replace_a_newer_one(engine, small_world, quarantine_dir, tmp_path):
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"])
    before = rows(engine, "clicks")
    old = write_lines(tmp_path / "old.tsv", [behavior_line(1, "U1", T0 - D, ["N5"], ["N6-0"])])
    run(engine, quarantine_dir, behaviors_path=old)
    assert rows(engine, "clicks") == before
    assert rows(engine, "users", "user_id", "first_seen_at", "last_seen_at", "history_at")[0] == ("U1", T0 - D, T0 + D, T0 + D)


def test_sources_keep_equal_impression_ids_apart(engine, small_world, quarantine_dir, tmp_path):
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"], source="train")
    later = small_world["behaviors"].read_text(encoding="utf-8").replace("11/11/2019", "11/13/2019").replace("11/12/2019", "11/14/2019")
    dev = tmp_path / "dev.tsv"
    dev.write_text(later, encoding="utf-8")
    report = run(engine, quarantine_dir, behaviors_path=dev, source="dev")
    assert (report.impressions, report.impressions_stored_elsewhere) == (4, 0)
    assert rows(engine, "impressions", "source", "impression_id")[:1] == [("dev", 1)]
    assert store_stats(engine)["impressions"] == 8 and store_stats(engine)["impression_items"] == 20


def test_the_same_file_under_another_source_is_not_stored_twice(engine, small_world, quarantine_dir, caplog):
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"], source="night1")
    before = dump_store(engine)
    report = run(engine, quarantine_dir, behaviors_path=small_world["behaviors"], source="night2")
    assert (report.impressions, report.impressions_stored_elsewhere, report.impression_items) == (0, 4, 0)
    assert dump_store(engine) == before  # not one click counted twice
    assert f"{small_world['behaviors']} line 1: the store holds this impression" in caplog.text
    assert "source 'night1'" in caplog.text


def test_an_overlapping_file_stores_only_the_impressions_not_held_elsewhere(engine, small_world, quarantine_dir, tmp_path):
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"], source="night1")
    lines = small_world["behaviors"].read_text(encoding="utf-8").splitlines()
    overlap = write_lines(tmp_path / "night2.tsv", [
        lines[1],  # U2's impression, as night1 stored it
        lines[2].replace("N4-1 N5-0", "N4-0 N5-1"),  # U1 at the same time, other labels: another impression
        lines[3].replace("N3-0 N4-0", "N3-0 N4-0 N5-0"),  # U3 at the same time, other candidates
        behavior_line(5, "U2", T0 + 2 * D, [], ["N5-1", "N6-0"]),  # new
    ])
    report = run(engine, quarantine_dir, behaviors_path=overlap, source="night2")
    assert (report.impressions, report.impressions_stored_elsewhere) == (3, 1)
    assert rows(engine, "impressions", "source", "impression_id") == [
        ("night1", 1), ("night1", 2), ("night1", 3), ("night1", 4), ("night2", 3), ("night2", 4), ("night2", 5)]


def test_an_impression_this_source_holds_is_replaced_whatever_another_source_holds(engine, small_world, quarantine_dir, tmp_path):
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"], source="a")
    lines = small_world["behaviors"].read_text(encoding="utf-8").splitlines()
    first = write_lines(tmp_path / "b1.tsv", [lines[0].replace("N5-0", "N5-1")])
    assert run(engine, quarantine_dir, behaviors_path=first, source="b").impressions == 1
    # b's impression 1 corrected back to what a holds: replaced in place under b, not dropped.
    fixed = write_lines(tmp_path / "b2.tsv", [lines[0]])
    report = run(engine, quarantine_dir, behaviors_path=fixed, source="b")
    assert (report.impressions, report.impressions_stored_elsewhere) == (1, 0)
    im, it = schema.impressions, schema.impression_items
    with engine.connect() as conn:
        labels = conn.execute(sa.select(it.c.label).join(im, im.c.id == it.c.impression_pk)
                              .where(im.c.source == "b").order_by(it.c.position)).scalars().all()
    assert labels == [1, 0, 0]


@pytest.mark.parametrize("batch_size", [5000, 1])
@pytest.mark.parametrize("shift", [1, -1])
def test_a_renumbered_copy_under_the_same_source_is_replaced_in_place_and_stays_idempotent(
        engine, small_world, quarantine_dir, tmp_path, shift, batch_size):
    # The known gap (docs/data-contract.md): each id takes its neighbour's impression and the
    # one at the end of the shift is held twice; the rule that would skip it loses impressions
    # of a re-delivery whose window moved (the next test). Nothing is lost, and a rerun of the
    # same copy changes nothing.
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"], source="s")
    lines = small_world["behaviors"].read_text(encoding="utf-8").splitlines()
    renumbered = write_lines(tmp_path / "renumbered.tsv", [
        f"{int(imp_id) + shift}\t{rest}" for imp_id, rest in (line.split("\t", 1) for line in lines)])
    report = run(engine, quarantine_dir, behaviors_path=renumbered, source="s", batch_size=batch_size)
    assert (report.impressions, report.impressions_repeated) == (4, 0)
    held = rows(engine, "impressions", "impression_id", "user_id", "time")
    by_id = {1: ("U1", T0), 2: ("U2", T0 + H), 3: ("U1", T0 + D), 4: ("U3", T0 - 2 * H)}
    expected = {i + shift: who for i, who in by_id.items()} | ({1: by_id[1]} if shift == 1 else {4: by_id[4]})
    assert held == sorted((i, *who) for i, who in expected.items())
    once = dump_store(engine)
    again = run(engine, quarantine_dir, behaviors_path=renumbered, source="s", batch_size=batch_size)
    assert (again.impressions_repeated, again.impressions_changed) == (0, 0)
    assert dump_store(engine) == once


def _news_first_seen(engine) -> dict[str, tuple]:
    return {n: (seen, listed) for n, seen, listed in rows(engine, "news", "news_id", "first_seen_at", "first_listed_at")}


@pytest.mark.parametrize(("batch_size", "one_id_at_a_time"), [(5000, False), (1, False), (5000, True)])
def test_a_corrected_misdated_line_gives_its_articles_their_first_seen_time_back(
        engine, small_world, quarantine_dir, tmp_path, monkeypatch, batch_size, one_id_at_a_time):
    """A year's typo in one line made the articles it showed a year old, and correcting the
    line (the same id, the right time) left them so: they were never fresh again (an audit's
    three most recommended articles vanished from every list)."""
    typo = write_lines(tmp_path / "typo.tsv", [behavior_line(9, "U4", T0 - 365 * D, ["N1"], ["N5-1", "N6-0"])])
    fixed = write_lines(tmp_path / "fixed.tsv", [
        behavior_line(8, "U2", T0 + 3 * H, [], ["N2-1", "N3-0"]),
        behavior_line(9, "U4", T0 + 2 * H, ["N1"], ["N5-1", "N6-0"]),
    ])
    for path in (small_world["behaviors"], fixed):
        run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=path, source=path.stem)
    clean, clean_seen = dump_store(engine), _news_first_seen(engine)
    assert clean_seen["N5"] == (T0, None) and clean_seen["N6"] == (T0 - 2 * H, T0 - 2 * H)  # N6: listed by U3

    wipe_store(engine)
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"], source="behaviors")
    run(engine, quarantine_dir, behaviors_path=typo, source="fixed")
    assert _news_first_seen(engine)["N5"] == (T0 - 365 * D, None)
    if one_id_at_a_time:  # more articles to recount than one IN list holds: the shows are read grouped, whole
        monkeypatch.setattr(BulkWriter, "in_chunk", property(lambda self: 1))
    report = run(engine, quarantine_dir, behaviors_path=fixed, source="fixed", batch_size=batch_size)
    assert (report.impressions_changed, report.first_seen_recounted) == (1, 2)  # N5 and N6
    seen = _news_first_seen(engine)
    assert {n: seen[n] for n in seen if n != "N1"} == {n: clean_seen[n] for n in clean_seen if n != "N1"}
    # The typo's History listed N1 a year early; the store keeps no line's History, so that
    # listing is not taken back (docs/data-contract.md).
    assert seen["N1"] == (T0 - 365 * D, T0 - 365 * D)
    after = dump_store(engine)
    assert {k: v for k, v in after.items() if k != "news"} == {k: v for k, v in clean.items() if k != "news"}
    again = run(engine, quarantine_dir, behaviors_path=fixed, source="fixed", batch_size=batch_size)
    assert (again.impressions_changed, again.first_seen_recounted) == (0, 0) and dump_store(engine) == after


@pytest.mark.parametrize("batch_size", [5000, 1])
def test_a_corrected_future_dated_line_leaves_the_history_a_clean_store_has_whatever_the_batches(
        engine, small_world, quarantine_dir, tmp_path, batch_size):
    """Cleared batch by batch, the future line's History gave way to the corrected line's own
    (T+2d) when the user's later line (T+5d) came in an earlier batch: the result depended on the
    batches, where a clean store keeps the T+5d History."""
    later = behavior_line(4, "U1", T0 + 5 * D, ["N1", "N2"], ["N3-1", "N4-0"])
    future = write_lines(tmp_path / "future.tsv", [later, behavior_line(9, "U1", T0 + 200 * D, ["N6"], ["N5-1", "N4-0"])])
    fixed = write_lines(tmp_path / "fixed.tsv", [later, behavior_line(9, "U1", T0 + 2 * D, ["N6"], ["N5-1", "N4-0"])])
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"], source="behaviors")
    run(engine, quarantine_dir, behaviors_path=fixed, source="extra")
    clean = dump_store(engine)
    wipe_store(engine)
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"], source="behaviors")
    run(engine, quarantine_dir, behaviors_path=future, source="extra")
    run(engine, quarantine_dir, behaviors_path=fixed, source="extra", batch_size=batch_size)
    assert dump_store(engine) == clean
    assert ("U1", T0 + 5 * D) in rows(engine, "users", "user_id", "history_at")


def test_a_correction_interrupted_after_the_line_moved_still_recounts_on_the_rerun(
        engine, small_world, quarantine_dir, tmp_path, monkeypatch):
    """The recount ran with the file's last batch: a correction stopped after the batch that moved
    the line (a SIGTERM) left the articles a year old, and its rerun found nothing to move."""
    from recsys.store.ingest import _Job

    typo = write_lines(tmp_path / "typo.tsv", [behavior_line(9, "U4", T0 - 365 * D, ["N1"], ["N5-1", "N6-0"])])
    fixed = write_lines(tmp_path / "fixed.tsv", [
        behavior_line(9, "U4", T0 + 2 * H, ["N1"], ["N5-1", "N6-0"]),
        behavior_line(8, "U2", T0 + 3 * H, [], ["N2-1", "N3-0"]),
    ])
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"], source="behaviors")
    run(engine, quarantine_dir, behaviors_path=typo, source="fixed")
    real = _Job._write_behaviors
    calls = []

    def stopped_at_the_second_batch(self, rows, source, known):
        calls.append(len(rows))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, rows, source, known)

    monkeypatch.setattr(_Job, "_write_behaviors", stopped_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run(engine, quarantine_dir, behaviors_path=fixed, source="fixed", batch_size=1)
    monkeypatch.setattr(_Job, "_write_behaviors", real)
    assert _news_first_seen(engine)["N5"] == (T0, None)  # recounted with the batch that moved the line
    run(engine, quarantine_dir, behaviors_path=fixed, source="fixed", batch_size=1)
    assert _news_first_seen(engine)["N5"] == (T0, None) and _news_first_seen(engine)["N6"] == (T0 - 2 * H, T0 - 2 * H)


def test_a_corrected_future_dated_line_lets_the_readers_next_histories_in(engine, small_world, quarantine_dir, tmp_path):
    """A line of a clock set months ahead made its History the user's latest; corrected, it
    kept that History and its date, so no real line could replace it (and none was counted in
    histories_not_replaced)."""
    future = write_lines(tmp_path / "future.tsv", [behavior_line(9, "U1", T0 + 200 * D, ["N6"], ["N5-1", "N4-0"])])
    fixed = write_lines(tmp_path / "fixed.tsv", [behavior_line(9, "U1", T0 + 2 * D, ["N6"], ["N5-1", "N4-0"])])
    elsewhere = write_lines(tmp_path / "elsewhere.tsv", [behavior_line(9, "U5", T0 + 2 * D, ["N6"], ["N5-1", "N4-0"])])
    next_day = write_lines(tmp_path / "next_day.tsv", [
        behavior_line(1, "U1", T0 + 3 * D, ["N1", "N2", "N3", "N6"], ["N2-1", "N4-0"]),
        behavior_line(2, "U5", T0 + 3 * D, ["N3"], ["N2-0", "N4-1"]),
    ])

    def ingest_all(*files) -> dict:
        wipe_store(engine)
        run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"], source="behaviors")
        for path, source in files:
            report = run(engine, quarantine_dir, behaviors_path=path, source=source)
        return report

    ingest_all((fixed, "extra"))
    clean = dump_store(engine)
    ingest_all((future, "extra"), (fixed, "extra"))
    assert dump_store(engine) == clean
    assert ingest_all((fixed, "extra"), (next_day, "day3")).histories_not_replaced == 0
    clean_next = dump_store(engine)
    assert ingest_all((future, "extra"), (fixed, "extra"), (next_day, "day3")).histories_not_replaced == 0
    assert dump_store(engine) == clean_next
    # The line was another reader's: U1 keeps the future line's History (the store has no other
    # of its lines' Histories) until U1's next line, which now replaces it.
    ingest_all((elsewhere, "extra"), (next_day, "day3"))
    clean_next = dump_store(engine)
    ingest_all((future, "extra"), (elsewhere, "extra"))
    assert rows(engine, "users", "user_id", "history_at")[0] == ("U1", None)
    run(engine, quarantine_dir, behaviors_path=next_day, source="day3")
    assert dump_store(engine) == clean_next


@pytest.mark.parametrize("batch_size", [5000, 1])
def test_a_line_repeated_under_another_id_is_stored_once(engine, small_world, quarantine_dir, tmp_path, caplog, batch_size):
    # A log line written twice: stored twice, its click counted twice in popularity and training.
    twice = write_lines(tmp_path / "behaviors.tsv", [
        behavior_line(1, "U1", T0, ["N1"], ["N3-1", "N4-0"]),
        behavior_line(2, "U2", T0 + H, [], ["N1-0", "N2-1"]),
        behavior_line(3, "U1", T0, ["N1"], ["N3-1", "N4-0"]),
    ])
    report = run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=twice, source="s",
                 batch_size=batch_size)
    assert (report.impressions, report.impressions_repeated, report.impression_items) == (2, 1, 4)
    assert rows(engine, "impressions", "impression_id", "user_id", "time") == [(1, "U1", T0), (2, "U2", T0 + H)]
    assert (store_stats(engine)["impression_items"], store_stats(engine)["clicked_items"]) == (4, 2)
    assert (f"{twice} line 3: source 's' holds this impression (user U1 at {T0.isoformat(sep=' ')}, same candidates "
            "and labels) as impression 1: not stored again as impression 3") in caplog.text
    before = dump_store(engine)
    again = run(engine, quarantine_dir, behaviors_path=twice, source="s", batch_size=batch_size)
    assert (again.impressions, again.impressions_repeated) == (2, 1)
    assert dump_store(engine) == before


@pytest.mark.parametrize("batch_size", [5000, 1])
def test_an_impression_differing_in_one_label_candidate_user_or_time_is_stored(engine, small_world, quarantine_dir,
                                                                               tmp_path, batch_size):
    lines = [
        behavior_line(1, "U1", T0, ["N1"], ["N3-1", "N4-0"]),
        behavior_line(2, "U1", T0, ["N1"], ["N3-0", "N4-0"]),  # one label
        behavior_line(3, "U1", T0, ["N1"], ["N3-1", "N5-0"]),  # one candidate
        behavior_line(4, "U1", T0, ["N1"], ["N4-0", "N3-1"]),  # the same candidates in another order
        behavior_line(5, "U2", T0, ["N1"], ["N3-1", "N4-0"]),  # another user
        behavior_line(6, "U1", T0 + timedelta(seconds=1), ["N1"], ["N3-1", "N4-0"]),  # another time
        behavior_line(7, "U1", T0, ["N2"], ["N3-1", "N4-0"]),  # only the History differs: the same impression
    ]
    behaviors = write_lines(tmp_path / "behaviors.tsv", lines)
    report = run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=behaviors, source="s",
                 batch_size=batch_size)
    assert (report.impressions, report.impressions_repeated) == (6, 1)
    assert rows(engine, "impressions", "impression_id") == [(i,) for i in range(1, 7)]


@pytest.mark.parametrize("batch_size", [5000, 2, 1])
def test_a_redelivery_with_a_line_inserted_is_stored_as_it_is_whatever_the_batches(engine, small_world, quarantine_dir,
                                                                                   tmp_path, batch_size):
    # A new line 1 moves every impression to the next id. Each line is judged against the store
    # as the file's earlier lines leave it: id 1 no longer holds U1's impression at T0 when
    # line 2 brings it as id 2, so nothing is a repeat and nothing is lost.
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"], source="s")
    lines = small_world["behaviors"].read_text(encoding="utf-8").splitlines()
    shifted = write_lines(tmp_path / "shifted.tsv", [
        behavior_line(1, "U2", T0 + 2 * D, [], ["N5-1", "N6-0"]),
        *(f"{int(imp_id) + 1}\t{rest}" for imp_id, rest in (line.split("\t", 1) for line in lines)),
    ])
    report = run(engine, quarantine_dir, behaviors_path=shifted, source="s", batch_size=batch_size)
    assert (report.impressions, report.impressions_repeated, report.impressions_changed) == (5, 0, 4)
    assert report.first_changed_impression == "line 1 (impression id 1)"  # the log names it: a renumbered copy shows
    assert rows(engine, "impressions", "impression_id", "user_id", "time") == [
        (1, "U2", T0 + 2 * D), (2, "U1", T0), (3, "U2", T0 + H), (4, "U1", T0 + D), (5, "U3", T0 - 2 * H)]
    assert store_stats(engine)["impression_items"] == 12


@pytest.mark.parametrize("batch_size", [5000, 1])
def test_a_redelivery_whose_window_moved_is_stored_as_it_is_and_idempotent(engine, small_world, quarantine_dir, tmp_path,
                                                                           batch_size):
    # Its first line dropped and a new one at the end: line k brings as id k what id k + 1
    # holds. Skipped as repeats of ids 2-4, line 4 then overwrote id 4: U3's impression was
    # held by no id, and the same file again stored it as id 3, overwriting U1's at T0 + D.
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"], source="s")
    lines = small_world["behaviors"].read_text(encoding="utf-8").splitlines()
    moved = write_lines(tmp_path / "moved.tsv", [
        *(f"{int(imp_id) - 1}\t{rest}" for imp_id, rest in (line.split("\t", 1) for line in lines[1:])),
        behavior_line(4, "U2", T0 + 2 * D, [], ["N5-1", "N6-0"]),
    ])
    report = run(engine, quarantine_dir, behaviors_path=moved, source="s", batch_size=batch_size)
    assert (report.impressions, report.impressions_repeated) == (4, 0)
    assert rows(engine, "impressions", "impression_id", "user_id", "time") == [
        (1, "U2", T0 + H), (2, "U1", T0 + D), (3, "U3", T0 - 2 * H), (4, "U2", T0 + 2 * D)]
    once = dump_store(engine)
    run(engine, quarantine_dir, behaviors_path=moved, source="s", batch_size=batch_size)
    assert dump_store(engine) == once


def test_a_changed_impression_replaces_all_its_items(engine, small_world, quarantine_dir, tmp_path):
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"], source="s")
    shorter = write_lines(tmp_path / "b2.tsv", [behavior_line(1, "U1", T0, ["N1", "N2"], ["N6-0"])])
    run(engine, quarantine_dir, behaviors_path=shorter, source="s")
    im, it = schema.impressions, schema.impression_items
    with engine.connect() as conn:
        items = conn.execute(sa.select(it.c.position, it.c.news_id).join(im, im.c.id == it.c.impression_pk).where(im.c.impression_id == 1)).all()
    assert [tuple(r) for r in items] == [(0, "N6")]


@pytest.mark.parametrize("batch_size", [5000, 1])
def test_a_corrected_file_takes_back_the_clicks_and_seen_times_of_the_lines_it_replaces(engine, small_world, quarantine_dir,
                                                                                       tmp_path, batch_size):
    first = write_lines(tmp_path / "first.tsv", [
        behavior_line(1, "U1", T0, ["N1", "N2"], ["N3-1", "N4-1", "N5-0"]),
        behavior_line(2, "U2", T0 + H, [], ["N1-0", "N2-1", "N6-1"]),
        behavior_line(3, "U1", T0 + D, ["N1", "N2", "N3"], ["N4-1", "N5-0"]),
        behavior_line(4, "U3", T0 - 2 * H, ["N6"], ["N3-1", "N4-0"]),
    ])
    corrected = write_lines(tmp_path / "corrected.tsv", [
        behavior_line(1, "U1", T0, ["N1", "N2"], ["N3-1", "N4-0", "N5-0"]),  # N4 was clicked only a day later
        behavior_line(2, "U2", T0 + 3 * H, [], ["N1-0", "N2-1", "N6-0"]),  # another time, N6 not clicked
        behavior_line(3, "U1", T0 + D, ["N1", "N2", "N3"], ["N4-1", "N5-0"]),
        behavior_line(4, "U4", T0 - 2 * H, ["N6"], ["N3-1", "N4-0"]),  # another user's
    ])
    # What the corrected file alone gives: the independent answer.
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=corrected, source="s")
    rebuilt = dump_store(engine)
    wipe_store(engine)

    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=first, source="s")
    report = run(engine, quarantine_dir, behaviors_path=corrected, source="s", batch_size=batch_size)
    assert (report.impressions_changed, report.clicks_withdrawn) == (2, 2)  # U2's N6, U3's N3
    store = dump_store(engine)
    assert store["impressions"] == rebuilt["impressions"] and store["impression_items"] == rebuilt["impression_items"]
    # U3 is left with no impression: its seen times go, the History its line gave stays (documented).
    assert [r for r in store["users"] if r[0] != "U3"] == rebuilt["users"]
    assert [r[:3] for r in store["users"] if r[0] == "U3"] == [("U3", None, None)]
    assert [r for r in store["clicks"] if r[0] != "U3"] == rebuilt["clicks"]
    assert [r for r in store["clicks"] if r[0] == "U3"] == [("U3", "N6", 0, None)]
    # Ingested again, the correction changes nothing more.
    again = run(engine, quarantine_dir, behaviors_path=corrected, source="s", batch_size=batch_size)
    assert (again.impressions_changed, again.clicks_withdrawn) == (0, 0) and dump_store(engine) == store


@pytest.mark.parametrize("batch_size", [5000, 1])
def test_a_click_a_correction_moves_to_a_later_line_is_not_withdrawn_whatever_the_batches(engine, small_world,
                                                                                        quarantine_dir, tmp_path, batch_size):
    # With a batch per line, the first batch finds no click of N1 left (line 2 still holds its
    # old labels) and the second brings it back: the pair is not withdrawn at the end.
    first = write_lines(tmp_path / "first.tsv", [behavior_line(1, "U1", T0, [], ["N1-1", "N2-0"]),
                                                 behavior_line(2, "U1", T0 + H, [], ["N1-0", "N3-0"])])
    corrected = write_lines(tmp_path / "corrected.tsv", [behavior_line(1, "U1", T0, [], ["N1-0", "N2-0"]),
                                                         behavior_line(2, "U1", T0 + H, [], ["N1-1", "N3-0"])])
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=first, source="s")
    report = run(engine, quarantine_dir, behaviors_path=corrected, source="s", batch_size=batch_size)
    assert (report.clicks_withdrawn, report.labels_dropped) == (0, 0)
    assert rows(engine, "clicks") == [("U1", "N1", None, T0 + H)]


def test_an_unlabelled_copy_under_a_labelled_files_source_is_counted_as_dropping_labels(engine, small_world,
                                                                                       quarantine_dir, tmp_path):
    labelled = write_lines(tmp_path / "dev.tsv", [behavior_line(1, "U1", T0, ["N5"], ["N1-1", "N2-0"]),
                                                  behavior_line(2, "U2", T0, [], ["N1-0", "N2-0"])])
    unlabelled = write_lines(tmp_path / "test.tsv", [behavior_line(1, "U1", T0, ["N5"], "N1 N2"),
                                                     behavior_line(2, "U2", T0, [], "N1 N2")])
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=labelled, source="s")
    report = run(engine, quarantine_dir, behaviors_path=unlabelled, source="s")
    # Only impression 1 had a click; U1's History entry stays, its click is gone.
    assert (report.impressions_changed, report.labels_dropped, report.clicks_withdrawn) == (0, 1, 1)
    assert rows(engine, "clicks") == [("U1", "N5", 0, None)]


def test_behaviors_may_reference_news_ingested_earlier(engine, small_world, quarantine_dir):
    run(engine, quarantine_dir, news_path=small_world["news"])
    report = run(engine, quarantine_dir, behaviors_path=small_world["behaviors"])
    assert (report.impressions, report.num_bad_rows) == (4, 0)


def test_progress_counts_every_line(engine, small_world, quarantine_dir):
    calls: list[int] = []
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"], batch_size=3,
        progress=calls.append)
    assert calls == [3, 3, 3, 1]  # 6 news lines, then 4 behaviors lines


# --- bad rows -------------------------------------------------------------------------------------

LONG = "x" * (MAX_LINE_BYTES + 5)

BAD_NEWS = [
    ("N9\tnews\tsub\ttitle", "columns", r"news\.tsv line 2: field 'columns' has 4, expected 8 tab-separated columns"),
    (news_line("N 9"), "news_id", r"news\.tsv line 2: field 'news_id' has 'N 9', expected an id matching"),
    (news_line("N9", category=""), "category", "field 'category' has '', expected a non-empty category"),
    (news_line("N9", title="t" * 1001), "title", r"field 'title' has .*expected at most 1000 characters \(it has 1001\)"),
    (news_line("N9", abstract="a" * 10001), "abstract", r"expected at most 10000 characters \(it has 10001\)"),
    (news_line("N9", title_entities="[{"), "title_entities", r"field 'title_entities' has '\[\{', expected empty or JSON"),
    # PostgreSQL cannot store NUL in text: a bad row on both backends, not a driver error.
    (news_line("N9", abstract="cut\x00here"), "abstract", r"field 'abstract' has 'cut\\x00here', expected text without NUL"),
    (news_line("N9", title="caf\udce9").encode("utf-8", "surrogateescape"), "line", r"news\.tsv line 2: field 'line' has b'.*caf\\xe9.*', expected UTF-8 text"),
    (news_line("N9", title=LONG), "line", r"news\.tsv line 2: field 'line' has 'a line of more than 1048576 bytes'"),
]
BAD_BEHAVIORS = [
    ("9\tU1\t11/11/2019 9:05:58 AM\tN1", "columns", r"behaviors\.tsv line 2: field 'columns' has 4, expected 5 tab-separated columns"),
    (behavior_line("9a", "U1", T0, [], ["N1-1"]), "impression_id", "field 'impression_id' has '9a', expected a non-negative integer"),
    (behavior_line(9, "U/1", T0, [], ["N1-1"]), "user_id", "field 'user_id' has 'U/1', expected an id matching"),
    (behavior_line(9, "U1", "11/11/2019 25:05:58 AM", [], ["N1-1"]), "time", r"field 'time' has '11/11/2019 25:05:58 AM', expected a real date and time \(hour 25 is not 1\.\.12\)"),
    (behavior_line(9, "U1", T0, ["N1", "N?"], ["N1-1"]), "history", "field 'history' has 'N\\?', expected news ids matching"),
    (behavior_line(9, "U1", T0, [], ["N1-1", "N55-x"]), "impressions", r"behaviors\.tsv line 2: field 'impressions' has 'N55-x', expected label 0 or 1"),
    (behavior_line(9, "U1", T0, [], ["N1-1", "N2"]), "impressions", "field 'impressions' has 'N2', expected a label on every candidate"),
    # Every candidate with a bad label reads as an unlabelled id ("N2-x"); as none is known and
    # the id before the dash is, the label is what is wrong, however the other candidates look.
    (behavior_line(9, "U1", T0, [], ["N2-x", "N3-x"]), "impressions", r"behaviors\.tsv line 2: field 'impressions' has 'N2-x', expected label 0 or 1"),
    (behavior_line(9, "U1", T0, [], ["N2", "N3-2"]), "impressions", "field 'impressions' has 'N3-2', expected label 0 or 1"),
    (behavior_line(9, "U1", T0, ["N98"], ["N1-"]), "impressions", "field 'impressions' has 'N1-', expected label 0 or 1"),
    (behavior_line(9, "U1", T0, [], ["N1-1", "N99-0"]), "impressions", "field 'impressions' has 'N99', expected a news id present in the store or in the news file"),
    (behavior_line(9, "U1", T0, [], [f"N1-{i % 2}" for i in range(1001)]), "impressions", "has '1001 candidates', expected at most 1000 candidates"),
    (behavior_line(9, "U1", T0, ["N1"] * 10001, ["N1-1"]), "history", "has '10001 ids', expected at most 10000 ids"),
    (behavior_line(9, "U1", T0, [], ["N1-1"]).encode() + b"\xff", "line", "field 'line' has b'.*', expected UTF-8 text"),
    # A real date no click log holds (a typo) would move first and last seen times for good.
    (behavior_line(9, "U1", "11/9/1019 2:02:56 AM", ["N1"], ["N2-1"]), "time",
     "field 'time' has '11/9/1019 2:02:56 AM', expected a time between 1/1/1990 12:00:00 AM and a day from now"),
    (behavior_line(9, "U1", "11/9/2099 2:02:56 AM", ["N1"], ["N2-1"]), "time", "field 'time' has '11/9/2099 2:02:56 AM', expected a time between"),
    # Clicked and not clicked in one list: which one the store kept would depend on the order.
    (behavior_line(9, "U1", T0, [], ["N2-1", "N3-0", "N2-0"]), "impressions",
     r"behaviors\.tsv line 2: field 'impressions' has 'N2', expected one label per article: it is shown twice"),
    # Line 1 has impression 1: the first line keeps it, in one batch or across batches.
    (behavior_line(1, "U3", T0 + H, [], ["N2-1"]), "impression_id",
     r"behaviors\.tsv line 2: field 'impression_id' has '1', expected an id unique within the file \(line 1 has it\)"),
]


def _world_with(tmp_path, kind: str, bad_line) -> dict[str, Path]:
    """news N1..N3 and two impressions, with ``bad_line`` as line 2 of the ``kind`` file."""
    news = [news_line("N1"), news_line("N2"), news_line("N3")]
    behaviors = [behavior_line(1, "U1", T0, ["N1"], ["N2-1", "N3-0"]), behavior_line(2, "U2", T0 + H, [], ["N1-0", "N3-1"])]
    target = news if kind == "news" else behaviors
    target.insert(1, bad_line)
    return {
        "news": write_lines(tmp_path / "news.tsv", news),
        "behaviors": write_lines(tmp_path / "behaviors.tsv", behaviors),
    }


@pytest.mark.parametrize(
    ("kind", "bad_line", "field", "message"),
    [("news", *case) for case in BAD_NEWS] + [("behaviors", *case) for case in BAD_BEHAVIORS],
    ids=[f"news-{c[1]}-{i}" for i, c in enumerate(BAD_NEWS)] + [f"behaviors-{c[1]}-{i}" for i, c in enumerate(BAD_BEHAVIORS)],
)
def test_bad_row_is_quarantined_and_the_rest_loads(engine, tmp_path, quarantine_dir, kind, bad_line, field, message):
    files = _world_with(tmp_path, kind, bad_line)
    report = run(engine, quarantine_dir, news_path=files["news"], behaviors_path=files["behaviors"])
    assert report.num_bad_rows == 1
    assert (report.news, report.impressions) == (3, 2)
    bad_file = str(files[kind].resolve())
    ((file, line, got_field, reason),) = rows(engine, "quarantine", "file", "line", "field", "reason")
    assert (file, line, got_field) == (bad_file, 2, field)
    assert re.search(message, reason), reason
    # The quarantine file: header, then the same record with the raw line cut short.
    path = Path(report.quarantine_file)
    assert path.parent == quarantine_dir and path.name.endswith("-behaviors.tsv")
    header, record = path.read_text(encoding="utf-8").splitlines()
    assert header == "file\tline\tfield\treason\traw"
    cells = [_unescape(c) for c in record.split("\t")]
    assert cells[:4] == [bad_file, "2", field, reason]
    assert len(cells) == 5 and len(cells[4]) <= 200
    assert not list(quarantine_dir.glob(".*.tmp"))


def _a_week_and_a_wrong_year(tmp_path, strict_line: int = 150):
    """150 impressions over a week from T0, one of them (``strict_line``) dated seven years on."""
    news = write_lines(tmp_path / "news.tsv", [news_line(f"N{i}") for i in range(1, 4)])
    lines = [behavior_line(i, f"U{i % 20}", T0 + i * H, ["N1"], ["N2-1", "N3-0"]) for i in range(1, 151)]
    lines[strict_line - 1] = behavior_line(strict_line, "U7", "12/5/2026 9:00:00 AM", ["N1"], ["N2-1", "N3-0"])
    return news, write_lines(tmp_path / "behaviors.tsv", lines)


@pytest.mark.parametrize("batch_size", [5000, 7])
def test_a_line_dated_far_past_the_rest_of_its_file_is_quarantined(engine, tmp_path, quarantine_dir, batch_size):
    # Stored, it became the store's latest impression: the nightly run's "now" (one active
    # reader instead of all), new articles' first-seen time, and its user's History frozen there.
    news, behaviors = _a_week_and_a_wrong_year(tmp_path, strict_line=40)
    report = run(engine, quarantine_dir, news_path=news, behaviors_path=behaviors, batch_size=batch_size)
    assert (report.impressions, report.num_bad_rows) == (149, 1)
    ((line, field, reason),) = rows(engine, "quarantine", "line", "field", "reason")
    assert (line, field) == (40, "time")
    assert "behaviors.tsv line 40: field 'time' has '12/5/2026 9:00:00 AM', expected a time no later than" in reason
    latest_seen = max(t for (t,) in rows(engine, "users", "last_seen_at"))
    assert max(t for (t,) in rows(engine, "impressions", "time")) == latest_seen == T0 + 150 * H
    assert rows(engine, "users", "user_id", "last_seen_at", order_by=[schema.users.c.user_id])[-1] == ("U9", T0 + 149 * H)
    assert ("U7", T0 + 147 * H) in rows(engine, "users", "user_id", "last_seen_at")


def test_strict_refuses_a_file_with_a_line_far_past_the_rest(engine, tmp_path, quarantine_dir):
    news, behaviors = _a_week_and_a_wrong_year(tmp_path)
    with pytest.raises(SchemaError, match=r"behaviors\.tsv line 150: field 'time' has '12/5/2026 9:00:00 AM', "
                                          r"expected a time no later than .*98% of the file's lines are from"):
        run(engine, quarantine_dir, news_path=news, behaviors_path=behaviors, strict=True)
    assert all(v == [] for v in dump_store(engine).values())


def test_a_line_dated_far_before_the_rest_of_its_file_is_quarantined(engine, tmp_path, quarantine_dir):
    # Stored, it moved N2's and N3's first-seen times back a year for good: out of every fresh set.
    news = write_lines(tmp_path / "news.tsv", [news_line(f"N{i}") for i in range(1, 6)])
    lines = [behavior_line(i, f"U{i % 20}", T0 + i * H, ["N1"], ["N4-1", "N5-0"]) for i in range(1, 151)]
    lines[59] = behavior_line(60, "U0", T0 - 365 * D, ["N1"], ["N2-1", "N3-0"])
    report = run(engine, quarantine_dir, news_path=news, behaviors_path=write_lines(tmp_path / "behaviors.tsv", lines))
    assert (report.impressions, report.num_bad_rows) == (149, 1)
    ((line, field, reason),) = rows(engine, "quarantine", "line", "field", "reason")
    assert (line, field) == (60, "time") and "expected a time no earlier than" in reason
    assert rows(engine, "news", "news_id", "first_seen_at") == [
        ("N1", T0 + H), ("N2", None), ("N3", None), ("N4", T0 + H), ("N5", T0 + H)]


def test_an_id_the_news_file_has_only_on_a_malformed_line_names_that_line(engine, tmp_path, quarantine_dir, caplog):
    # N4's only line had a 1001-character title: its impressions were quarantined as naming an
    # article "present in neither the store nor the news file", though the news file had it.
    news = write_lines(tmp_path / "news.tsv", [news_line("N1"), news_line("N4", title="t" * 1001), news_line("N2")])
    behaviors = write_lines(tmp_path / "behaviors.tsv", [
        behavior_line(1, "U1", T0, ["N4", "N1"], ["N2-1", "N1-0"]), behavior_line(2, "U2", T0 + H, [], ["N1-0", "N4-1"])])
    malformed = rf"{re.escape(str(news))} line 2: field 'title' has 'ttt+\.\.\., expected at most 1000 characters \(it has 1001\)"
    report = run(engine, quarantine_dir, news_path=news, behaviors_path=behaviors)
    assert (report.news, report.impressions, report.num_bad_rows, report.unknown_history_ids) == (2, 1, 2, 1)
    ((line, reason),) = [(line, reason) for file, line, reason in rows(engine, "quarantine", "file", "line", "reason")
                         if file == str(behaviors.resolve())]
    assert line == 2
    assert re.fullmatch(rf"{re.escape(str(behaviors))} line 2: field 'impressions' has 'N4', expected a news id present in the "
                        rf"store or in the news file \(the news file has it only on a malformed line: {malformed}\)", reason), reason
    assert re.search(rf"{re.escape(str(behaviors))} line 1: History names N4, which neither the store nor the news file has "
                     rf"\(the news file has N4 only on a malformed line: {malformed}\): left out of the stored History", caplog.text)


def test_an_id_malformed_on_two_news_lines_names_the_first_of_them(engine, tmp_path, quarantine_dir):
    # The first malformed line of an id is the one to fix first: a later one must not replace it.
    news = write_lines(tmp_path / "news.tsv", [news_line("N1"), news_line("N4", title="t" * 1001),
                                               news_line("N4", category=""), news_line("N2")])
    behaviors = write_lines(tmp_path / "behaviors.tsv", [behavior_line(1, "U1", T0, [], ["N1-0", "N4-1"])])
    report = run(engine, quarantine_dir, news_path=news, behaviors_path=behaviors)
    assert (report.news, report.impressions) == (2, 0)
    (reason,) = [reason for file, reason in rows(engine, "quarantine", "file", "reason") if file == str(behaviors.resolve())]
    assert (f"(the news file has it only on a malformed line: {news} line 2: field 'title' has 'ttt" in reason
            and "line 3" not in reason), reason


def test_a_short_file_has_no_bulk_to_bound_its_times(engine, tmp_path, quarantine_dir):
    # Below 100 lines a file's own span says too little: only the clock's rule holds.
    news = write_lines(tmp_path / "news.tsv", [news_line("N1"), news_line("N2")])
    behaviors = write_lines(tmp_path / "behaviors.tsv", [behavior_line(i, "U1", T0 + i * H, [], ["N1-1", "N2-0"])
                                                         for i in range(1, 99)] + [behavior_line(99, "U2", T0 + 90 * D, [], ["N1-1"])])
    assert run(engine, quarantine_dir, news_path=news, behaviors_path=behaviors).num_bad_rows == 0


def test_an_unknown_history_id_is_left_out_and_its_impression_kept(engine, tmp_path, quarantine_dir, caplog):
    # It quarantined the whole line: a hunt's one news line quarantined for an extra tab in its
    # title took 23% of the impressions with it, every one whose History listed that article.
    files = _world_with(tmp_path, "behaviors", behavior_line(9, "U7", T0, ["N1", "N98", "N3", "N97"], ["N2-1", "N1-0"]))
    report = run(engine, quarantine_dir, news_path=files["news"], behaviors_path=files["behaviors"])
    assert (report.num_bad_rows, report.impressions, report.unknown_history_ids) == (0, 3, 2)
    assert rows(engine, "quarantine", "line") == []
    history = [(n, p) for u, n, p in rows(engine, "clicks", "user_id", "news_id", "history_pos") if u == "U7" and p is not None]
    assert sorted(history, key=lambda r: r[1]) == [("N1", 0), ("N3", 1)]
    assert f"{files['behaviors']} line 2: History names N98, N97, which neither the store nor the news file has: left out" in caplog.text
    # With --strict it is not a bad row either.
    wipe_store(engine)
    assert run(engine, quarantine_dir, news_path=files["news"], behaviors_path=files["behaviors"], strict=True).impressions == 3


def _unescape(cell: str) -> str:
    """A quarantine file's cell as the ingest was given it (docs/data-contract.md, "Quarantine")."""
    named = {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}
    return re.sub(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|.)",
                  lambda m: named.get(m.group(1)) or chr(int(m.group(1)[1:], 16)), cell)


@pytest.mark.parametrize(
    ("kind", "bad_line", "message"),
    [("news", c[0], c[2]) for c in BAD_NEWS] + [("behaviors", c[0], c[2]) for c in BAD_BEHAVIORS],
    ids=[f"news-{c[1]}-{i}" for i, c in enumerate(BAD_NEWS)] + [f"behaviors-{c[1]}-{i}" for i, c in enumerate(BAD_BEHAVIORS)],
)
def test_strict_stops_at_the_bad_row_and_writes_nothing(engine, tmp_path, quarantine_dir, kind, bad_line, message):
    files = _world_with(tmp_path, kind, bad_line)
    with pytest.raises(SchemaError, match=message):
        run(engine, quarantine_dir, news_path=files["news"], behaviors_path=files["behaviors"], strict=True, batch_size=1)
    assert all(v == [] for v in dump_store(engine).values())
    assert not quarantine_dir.exists()


def test_strict_failure_late_in_a_file_leaves_an_existing_store_untouched(engine, small_world, quarantine_dir, tmp_path):
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"])
    before = dump_store(engine) | {"updated": rows(engine, "news", "news_id", "updated_at")}
    news = write_lines(tmp_path / "n2.tsv", [news_line(f"M{i}") for i in range(10)] + [news_line("N1", title="changed")])
    behaviors = write_lines(tmp_path / "b2.tsv", [behavior_line(i, f"V{i}", T0, ["M1"], ["M2-1"]) for i in range(20)] + ["broken"])
    with pytest.raises(SchemaError, match=r"b2\.tsv line 21: field 'columns' has 1, expected 5"):
        run(engine, quarantine_dir, news_path=news, behaviors_path=behaviors, strict=True, batch_size=3)
    assert dump_store(engine) | {"updated": rows(engine, "news", "news_id", "updated_at")} == before


def test_strict_run_on_good_files_equals_a_lenient_run(engine, small_world, quarantine_dir):
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"], strict=True, batch_size=2)
    strict = dump_store(engine)
    wipe_store(engine)
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"])
    assert dump_store(engine) == strict


def test_rerun_does_not_double_count_quarantined_rows(engine, tmp_path, quarantine_dir):
    files = _world_with(tmp_path, "behaviors", behavior_line(9, "U1", T0, [], ["N1-1", "N55-x"]))
    for _ in range(2):
        report = run(engine, quarantine_dir, news_path=files["news"], behaviors_path=files["behaviors"])
        assert report.num_bad_rows == 1
        assert store_stats(engine)["quarantined"] == 1
    assert len(list(quarantine_dir.glob("*-behaviors.tsv"))) == 2  # one file per run
    # Once the file is fixed, its quarantine rows go.
    write_lines(files["behaviors"], [behavior_line(1, "U1", T0, ["N1"], ["N2-1"])])
    assert run(engine, quarantine_dir, behaviors_path=files["behaviors"]).quarantine_file is None
    assert store_stats(engine)["quarantined"] == 0


def test_quarantine_file_escapes_tabs_and_newlines(engine, tmp_path, quarantine_dir):
    files = _world_with(tmp_path, "news", "N9\tnews\twith\\backslash")
    report = run(engine, quarantine_dir, news_path=files["news"])
    record = Path(report.quarantine_file).read_text(encoding="utf-8").splitlines()[1]
    assert record.endswith("\tN9\\tnews\\twith\\\\backslash")



def test_quarantine_file_escapes_every_control_and_bidi_character(engine, tmp_path, quarantine_dir):
    # NUL, ESC and C1 bytes of a bad line went into the file raw: `less` or `cat` of it ran the
    # line's escape sequences, and a U+2028 split its record for Python's splitlines.
    line = "N9\tnews\tsub\tT\x00i\x1b[31mt\x9b2J\x7f\u202el\u2028e\\x00\x1f\t\thttps://x\t[]\t[]"
    files = _world_with(tmp_path, "news", line)
    report = run(engine, quarantine_dir, news_path=files["news"])
    text = Path(report.quarantine_file).read_text(encoding="utf-8")
    assert [c for c in text if ord(c) < 0x20 and c not in "\t\n" or 0x7F <= ord(c) < 0xA0 or ord(c) > 0x7F] == []
    header, record = text.splitlines()
    raw = record.split("\t")[-1]
    assert raw == r"N9\tnews\tsub\tT\x00i\x1b[31mt\x9b2J\x7f\u202el\u2028e\\x00\x1f\t\thttps://x\t[]\t[]"
    assert _unescape(raw) == line  # the escapes read back exactly


# --- images ---------------------------------------------------------------------------------------


def _jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def test_image_statuses_paths_and_hash(engine, small_world, quarantine_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    good = _jpeg(0)
    (images / "N1.jpg").write_bytes(good)
    (images / "N2.png").write_bytes(b"not a png at all")
    (images / "N3.JPG").write_bytes(b"")
    (tmp_path / "outside.png").write_bytes(_jpeg(1))
    (images / "N5.png").symlink_to(tmp_path / "outside.png")
    (images / "N6.webp").write_bytes(good)  # JPEG bytes named .webp: decoded by content
    report = run(engine, quarantine_dir, news_path=small_world["news"], images_dir=images)
    assert rows(engine, "news", "news_id", "image_path", "image_status") == [
        ("N1", str(images.resolve() / "N1.jpg"), IMAGE_OK), ("N2", None, IMAGE_CORRUPT), ("N3", None, IMAGE_EMPTY),
        ("N4", None, IMAGE_MISSING), ("N5", None, IMAGE_BAD_NAME), ("N6", str(images.resolve() / "N6.webp"), IMAGE_OK),
    ]
    assert report.image_status == {"ok": 2, "missing": 1, "corrupt": 1, "too_large": 0, "empty": 1, "bad_name": 1}
    stats = store_stats(engine)
    assert stats["news_with_image"] == 2
    assert {k: stats[f"image_{k}"] for k in report.image_status} == report.image_status
    ((hash_n1, updated_n1),) = [r[1:] for r in rows(engine, "news", "news_id", "content_hash", "updated_at") if r[0] == "N1"]
    expected = hashlib.sha256("\x1f".join(["Storm hits the coast", "Heavy rain.", "news", "newsus", hashlib.sha256(good).hexdigest()]).encode()).hexdigest()
    assert hash_n1 == expected
    # A new picture changes the article's hash; the others stay as they were.
    unchanged = [r for r in rows(engine, "news", "news_id", "content_hash", "updated_at") if r[0] != "N1"]
    (images / "N1.jpg").write_bytes(_jpeg(2))
    run(engine, quarantine_dir, news_path=small_world["news"], images_dir=images)
    after = rows(engine, "news", "news_id", "content_hash", "updated_at")
    assert after[0][1] != hash_n1 and after[0][2] > updated_n1
    assert after[1:] == unchanged


def test_a_news_file_without_covers_keeps_the_stored_ones(engine, small_world, quarantine_dir, tmp_path):
    """MIND's dev news.tsv repeats train's articles; ingesting it without --images, or a nightly
    feed with a folder of the new covers only, must not strip the covers stored before."""
    images = tmp_path / "images"
    images.mkdir()
    covers = {"N1": _jpeg(0), "N2": _jpeg(1)}
    for news_id, data in covers.items():
        (images / f"{news_id}.jpg").write_bytes(data)
    run(engine, quarantine_dir, news_path=small_world["news"], images_dir=images)
    columns = ("news_id", "image_path", "image_status", "content_hash", "updated_at")
    before = rows(engine, "news", *columns)
    assert [r[2] for r in before] == [IMAGE_OK, IMAGE_OK] + [IMAGE_MISSING] * 4

    report = run(engine, quarantine_dir, news_path=small_world["news"])
    assert rows(engine, "news", *columns) == before
    assert report.image_status["ok"] == 2

    new_covers = tmp_path / "new_covers"
    new_covers.mkdir()
    (new_covers / "N3.png").write_bytes(_jpeg(2))
    run(engine, quarantine_dir, news_path=small_world["news"], images_dir=new_covers)
    after = {r[0]: r for r in rows(engine, "news", *columns)}
    assert [after[n] for n in ("N1", "N2")] == before[:2]
    assert after["N3"][1:3] == (str(new_covers.resolve() / "N3.png"), IMAGE_OK)

    # A changed title keeps the cover and hashes it with the stored picture; a cover whose
    # file has gone is not kept.
    edited = write_lines(tmp_path / "edited.tsv", [news_line("N1", title="A new title"), news_line("N2", category="sports", subcategory="football", title="Team wins the cup")])
    (images / "N2.jpg").unlink()
    run(engine, quarantine_dir, news_path=edited)
    after = {r[0]: r for r in rows(engine, "news", *columns)}
    expected = hashlib.sha256("\x1f".join(["A new title", "", "news", "newsus", hashlib.sha256(covers["N1"]).hexdigest()]).encode()).hexdigest()
    assert after["N1"][1:4] == (str(images.resolve() / "N1.jpg"), IMAGE_OK, expected)
    assert after["N2"][1:4] == (None, IMAGE_MISSING, content_hash("Team wins the cup", "", "sports", "football", None))


def test_a_news_file_without_covers_keeps_the_broken_ones_on_record(engine, small_world, quarantine_dir, tmp_path):
    """Re-ingesting the news without --images turned each corrupt or empty cover into a
    missing one: the store forgot which covers were broken, and the changed content hash sent
    those articles back through the text encoder."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "N1.jpg").write_text("this is not a picture")
    (images / "N2.png").write_bytes(b"")
    (images / "N3.jpg").write_bytes(_jpeg(3))
    run(engine, quarantine_dir, news_path=small_world["news"], images_dir=images)
    columns = ("news_id", "image_path", "image_status", "image_sha256", "content_hash", "updated_at")
    before = {r[0]: r for r in rows(engine, "news", *columns)}
    assert [before[n][1:4] for n in ("N1", "N2", "N4")] == [
        (None, IMAGE_CORRUPT, hashlib.sha256(b"this is not a picture").hexdigest()),
        (None, IMAGE_EMPTY, hashlib.sha256(b"").hexdigest()),
        (None, IMAGE_MISSING, None),
    ]
    assert before["N3"][1:4] == (str(images.resolve() / "N3.jpg"), IMAGE_OK, hashlib.sha256(_jpeg(3)).hexdigest())
    assert before["N1"][4] == content_hash("Storm hits the coast", "Heavy rain.", "news", "newsus", hashlib.sha256(b"this is not a picture").hexdigest())

    report = run(engine, quarantine_dir, news_path=small_world["news"])  # no covers this time
    assert {r[0]: r for r in rows(engine, "news", *columns)} == before
    assert (report.image_status["corrupt"], report.image_status["empty"], report.image_status["ok"]) == (1, 1, 1)
    assert report.news_changed == 0

    # A folder that brings a good N1 and another broken N2 replaces both; N3's good cover stays.
    tonight = tmp_path / "tonight"
    tonight.mkdir()
    (tonight / "N1.jpg").write_bytes(_jpeg(1))
    (tonight / "N2.jpg").write_text("still not a picture")
    run(engine, quarantine_dir, news_path=small_world["news"], images_dir=tonight)
    after = {r[0]: r for r in rows(engine, "news", *columns)}
    assert after["N1"][1:4] == (str(tonight.resolve() / "N1.jpg"), IMAGE_OK, hashlib.sha256(_jpeg(1)).hexdigest())
    assert after["N2"][1:4] == (None, IMAGE_CORRUPT, hashlib.sha256(b"still not a picture").hexdigest())
    assert after["N3"] == before["N3"]


def test_an_unusable_new_cover_is_named_and_keeps_the_good_one_stored_before(engine, small_world, quarantine_dir, tmp_path, caplog):
    # A corrupt N1.jpg in tonight's folder replaced yesterday's good cover (status corrupt, no
    # picture), and nothing on the log named the article or the file.
    images, tonight = tmp_path / "images", tmp_path / "tonight"
    images.mkdir(), tonight.mkdir()
    (images / "N1.jpg").write_bytes(_jpeg(0))
    run(engine, quarantine_dir, news_path=small_world["news"], images_dir=images)
    columns = ("news_id", "image_path", "image_status", "content_hash")
    before = rows(engine, "news", *columns)
    (tonight / "N1.jpg").write_text("this is not a picture")
    (tonight / "N2.png").write_bytes(b"")
    with caplog.at_level("WARNING", logger="recsys.ingest"):
        report = run(engine, quarantine_dir, news_path=small_world["news"], images_dir=tonight)
    after = {r[0]: r for r in rows(engine, "news", *columns)}
    assert after["N1"] == before[0]
    assert after["N2"][1:3] == (None, IMAGE_EMPTY)
    assert report.image_status["ok"] == 1 and report.image_status["empty"] == 1
    assert f"cover of N1 is corrupt ({tonight / 'N1.jpg'}: not a JPEG, PNG or WebP image): kept the cover stored before" in caplog.text
    assert f"cover of N2 is empty ({tonight / 'N2.png'}: 0 bytes): the article has no cover" in caplog.text


# --- arguments ------------------------------------------------------------------------------------


def test_argument_errors(engine, small_world, quarantine_dir, tmp_path):
    with pytest.raises(ConfigError, match="ingest needs a news file, a behaviors file or both"):
        run(engine, quarantine_dir)
    with pytest.raises(ConfigError, match="batch_size is 0, expected at least 1"):
        run(engine, quarantine_dir, news_path=small_world["news"], batch_size=0)
    with pytest.raises(ConfigError, match="images folder .*nope does not exist or is not a folder"):
        run(engine, quarantine_dir, news_path=small_world["news"], images_dir=tmp_path / "nope")
    with pytest.raises(ConfigError, match="source 'xxx.*' must have 1 to 255 characters"):
        run(engine, quarantine_dir, behaviors_path=small_world["behaviors"], source="x" * 256)
    with pytest.raises(ConfigError, match="source 'ééé.*' must have 1 to 255 characters"):
        run(engine, quarantine_dir, behaviors_path=small_world["behaviors"], source="é" * 256)  # characters, not bytes
    with pytest.raises(MindFileError, match=r"missing\.tsv: cannot be read"):
        run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=tmp_path / "missing.tsv")
    assert dump_store(engine)["news"] == []  # nothing started before the inputs were checked


def test_a_source_of_exactly_255_characters_is_stored(engine, small_world, quarantine_dir):
    source = "s" * 254 + "é"  # 255 characters (256 bytes): the column's length counts characters
    report = run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"],
                 source=source)
    assert report.impressions == 4
    assert rows(engine, "impressions", "source") == [(source,)] * 4


def test_default_source_is_folder_and_stem(tmp_path):
    assert default_source(tmp_path / "MINDsmall_dev" / "behaviors.tsv") == "MINDsmall_dev/behaviors"


def test_a_default_source_may_keep_a_space_nobody_typed(engine, tmp_path, quarantine_dir):
    # A typed --source ' x' is refused (`train --source x` would not find it); a folder whose
    # name starts with a space gives such a default, which the user never typed, and ingests.
    from recsys.store.ingest import check_source

    with pytest.raises(ConfigError, match=r"source ' x' starts or ends with white space"):
        check_source(" x")
    check_source(" x/behaviors", given=False)
    (tmp_path / " night").mkdir()
    news = write_lines(tmp_path / "news.tsv", [news_line("N1"), news_line("N2")])
    behaviors = write_lines(tmp_path / " night" / "behaviors.tsv", [behavior_line(1, "U1", T0, [], ["N1-1", "N2-0"])])
    report = run(engine, quarantine_dir, news_path=news, behaviors_path=behaviors)
    assert (report.source, report.impressions) == (" night/behaviors", 1)


@pytest.mark.parametrize("bad_first", [["N3-1", "N99-0"], ["N3-1", "N3-0"]])  # an unknown article; a label conflict
def test_a_quarantined_line_brings_nothing_a_later_line_could_repeat(engine, small_world, quarantine_dir, tmp_path, bad_first):
    # Its id used to count as named whatever made it bad: the later line was a repeat when the
    # article was unknown and stored when the labels conflicted.
    first = write_lines(tmp_path / "b1.tsv", [behavior_line(1, "U1", T0, [], ["N3-1", "N4-0"])])
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=first, source="s")
    later = write_lines(tmp_path / "b2.tsv", [behavior_line(1, "U1", T0, [], bad_first),
                                              behavior_line(2, "U1", T0, [], ["N3-1", "N4-0"])])
    report = run(engine, quarantine_dir, behaviors_path=later, source="s")
    assert (report.num_bad_rows, report.impressions, report.impressions_repeated) == (1, 1, 0)


def test_batches_of_long_histories_are_cut_by_ids_and_store_the_same(engine, quarantine_dir, tmp_path, monkeypatch):
    # 5,000 lines of 2,000 History ids held 1.8 GB; the History is stored whole, so the batch is cut.
    from recsys.data import mind

    news = write_lines(tmp_path / "news.tsv", [news_line(f"N{i}") for i in range(1, 41)])
    lines = []
    for i in range(1, 13):  # four users, each on three lines in different batches; 22 to 44 ids a line
        history = [f"N{(i * 7 + k) % 40 + 1}" for k in range(20 + 2 * i)] + (["N99"] if i % 5 == 0 else [])
        lines.append(behavior_line(i, f"U{i % 4}", T0 + i * H, history, [f"N{i}-1", f"N{i + 20}-0"]))
    lines.insert(6, behavior_line(3, "UX", T0, ["N1"], ["N2-1"]))  # a repeated id, in a later batch once cut
    lines.insert(9, behavior_line(50, "UY", T0, ["N1"], ["N98-1"]))  # an unknown candidate
    behaviors = write_lines(tmp_path / "behaviors.tsv", lines)

    def ingested(budget):
        monkeypatch.setattr(mind, "MAX_BATCH_IDS", budget)
        wipe_store(engine)
        done: list[int] = []
        report = run(engine, quarantine_dir, news_path=news, behaviors_path=behaviors, progress=done.append)
        quarantined = Path(report.quarantine_file).read_text(encoding="utf-8")
        Path(report.quarantine_file).unlink()
        # clicks counts click-row writes per batch (docs/data-contract.md), not rows stored
        figures = {k: v for k, v in vars(report).items() if k not in ("elapsed", "quarantine_file", "clicks")}
        return dump_store(engine), figures, quarantined, done

    store, figures, quarantined, done = ingested(10 ** 9)
    assert done == [40, 14]  # news, then behaviors: one batch each
    cut_store, cut_figures, cut_quarantined, cut_done = ingested(100)
    assert cut_done[0] == 40 and sum(cut_done[1:]) == 14 and len(cut_done) > 5
    assert cut_store == store and cut_figures == figures and cut_quarantined == quarantined
    assert (figures["impressions"], figures["num_bad_rows"], figures["unknown_history_ids"]) == (12, 2, 2)


def _history_of(engine, user: str) -> list[str]:
    held = rows(engine, "clicks", "user_id", "news_id", "history_pos")
    return [news for _, news, pos in sorted(r for r in held if r[0] == user and r[2] is not None)]


@pytest.mark.parametrize("batch_size", [5000, 1])
def test_a_history_corrected_at_the_same_time_is_kept_out_and_counted(engine, small_world, quarantine_dir, tmp_path,
                                                                       batch_size):
    # The first ingested History wins among equal times (docs/data-contract.md): a corrected file
    # re-delivered with the same times changed nothing, and nothing said so.
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"], source="s")
    assert _history_of(engine, "U1") == ["N1", "N2", "N3"]
    corrected = write_lines(tmp_path / "corrected.tsv", [
        behavior_line(3, "U1", T0 + D, ["N1", "N5"], ["N4-1", "N5-0"]),  # the same time: kept out
        behavior_line(4, "U3", T0 - 2 * H, ["N6"], ["N3-0", "N4-0"]),  # the same History: nothing to say
        behavior_line(5, "U2", T0 - D, ["N4"], ["N1-0"]),  # older than U2's stored impression: not a tie
    ])
    report = run(engine, quarantine_dir, behaviors_path=corrected, source="s", batch_size=batch_size)
    assert report.histories_not_replaced == 1
    assert (_history_of(engine, "U1"), _history_of(engine, "U3"), _history_of(engine, "U2")) == (
        ["N1", "N2", "N3"], ["N6"], [])
    # Within one file: two lines of a user at one second with two Histories; the first listed is kept.
    twice = write_lines(tmp_path / "twice.tsv", [
        behavior_line(1, "U7", T0, ["N1"], ["N3-1", "N4-0"]),
        behavior_line(2, "U7", T0, ["N2"], ["N5-0", "N6-1"]),
        behavior_line(3, "U7", T0, ["N1"], ["N2-0", "N6-0"]),
    ])
    report = run(engine, quarantine_dir, behaviors_path=twice, source="t", batch_size=batch_size)
    assert (report.histories_not_replaced, _history_of(engine, "U7")) == (1, ["N1"])
    # The same files again: counted again (the store still keeps the first), nothing changes.
    before = dump_store(engine)
    assert run(engine, quarantine_dir, behaviors_path=twice, source="t", batch_size=batch_size).histories_not_replaced == 1
    assert dump_store(engine) == before


@pytest.mark.parametrize("batch_size", [5000, 1])
def test_the_same_line_again_restores_the_history_ids_an_earlier_ingest_left_out(engine, quarantine_dir, tmp_path,
                                                                                  batch_size, caplog):
    # The documented way to restore them (ingest the news file that has the articles, then the
    # behaviors again) did nothing: the line's time equals the stored one, so its History (now
    # whole) read as a same-second rival and the left-out one stayed.
    news = write_lines(tmp_path / "news.tsv", [news_line("N1"), "NX\t\tsub\tno category\t\t\t[]\t[]", news_line("N2")])
    behaviors = write_lines(tmp_path / "behaviors.tsv", [behavior_line(1, "U1", T0, ["N1", "NX", "N1"], ["N2-1"])])
    report = run(engine, quarantine_dir, news_path=news, behaviors_path=behaviors, batch_size=batch_size)
    assert (report.unknown_history_ids, _history_of(engine, "U1")) == (1, ["N1"])
    fixed = write_lines(tmp_path / "fixed.tsv", [news_line("N1"), news_line("NX"), news_line("N2")])
    run(engine, quarantine_dir, news_path=fixed, batch_size=batch_size)
    with caplog.at_level("WARNING", logger="recsys.ingest"):
        report = run(engine, quarantine_dir, behaviors_path=behaviors, batch_size=batch_size)
    assert (report.unknown_history_ids, report.histories_not_replaced) == (0, 0)
    assert _history_of(engine, "U1") == ["N1", "NX"]  # the repeated N1 keeps its first position, as stored
    assert "History other than the one the store keeps" not in caplog.text
    before = dump_store(engine)
    assert run(engine, quarantine_dir, behaviors_path=behaviors, batch_size=batch_size).histories_not_replaced == 0
    assert dump_store(engine) == before  # again: nothing to do
    # A History that holds only part of the stored one, at the same second, does not replace it
    # (whichever came first, the fuller one is kept), and is counted.
    shorter = write_lines(tmp_path / "shorter.tsv", [behavior_line(1, "U1", T0, ["NX"], ["N1-0", "N2-1"])])
    assert run(engine, quarantine_dir, behaviors_path=shorter, source="b", batch_size=batch_size).histories_not_replaced == 0
    assert _history_of(engine, "U1") == ["N1", "NX"]  # a part of the kept History: it loses nothing, not counted
    rival = write_lines(tmp_path / "rival.tsv", [behavior_line(1, "U1", T0, ["N2", "N1"], ["N1-0", "N2-0"])])
    assert run(engine, quarantine_dir, behaviors_path=rival, source="c", batch_size=batch_size).histories_not_replaced == 1
    assert _history_of(engine, "U1") == ["N1", "NX"]


@pytest.mark.parametrize("lines", [
    [["N1"], ["N1", "N2"], ["N2", "N1"]],  # the fuller one second: it still wins, whatever the batch size
    [["N1", "N2"], ["N1"], ["N2", "N1"]],
])
def test_among_histories_of_one_second_the_fuller_one_wins_whatever_the_batches(engine, quarantine_dir, tmp_path, lines):
    news = write_lines(tmp_path / "news.tsv", [news_line(f"N{i}") for i in range(1, 5)])
    behaviors = write_lines(tmp_path / "behaviors.tsv", [
        behavior_line(i + 1, "U7", T0, history, candidates)  # other candidates: three impressions, not one repeated
        for i, (history, candidates) in enumerate(zip(lines, [["N3-1"], ["N4-1"], ["N3-0", "N4-0"]]))])
    outcomes = []
    for batch_size in (5000, 1):
        wipe_store(engine)
        report = run(engine, quarantine_dir, news_path=news, behaviors_path=behaviors, batch_size=batch_size)
        outcomes.append((_history_of(engine, "U7"), report.histories_not_replaced))
    # [N1] is a part of the kept [N1, N2]; [N2, N1] (another order) is a rival, counted.
    assert outcomes == [(["N1", "N2"], 1)] * 2


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_an_ingest_leaves_postgres_statistics_of_what_it_wrote(engine, small_world, quarantine_dir):
    # The nightly ranks right after its ingest; autovacuum analyzes a while later, if at all, and
    # without statistics the planner scanned every click for each shard's histories.
    tables = ("news", "users", "impressions", "impression_items", "clicks")

    def analyzed() -> dict[str, int]:
        with engine.connect() as conn:  # a new transaction: the statistics views are read as of now
            counted = conn.execute(sa.text("SELECT relname, analyze_count FROM pg_stat_user_tables "
                                           "WHERE schemaname = current_schema()")).all()
        return {name: count for name, count in counted if name in tables}

    before = analyzed()
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"])
    after = analyzed()
    assert {name: after[name] - before.get(name, 0) for name in tables} == dict.fromkeys(tables, 1)


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_role_that_may_not_analyze_is_told_in_the_log_and_its_ingest_stands(engine, db_url, small_world,
                                                                               quarantine_dir, caplog):
    # The server only logged "skipping ..."; the job's log said nothing and the nights stayed slow.
    import logging
    import uuid

    from recsys.store.database import open_store

    role = f"recsys_test_job_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE ROLE "{role}" LOGIN'))
    job = None
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f'GRANT USAGE ON SCHEMA public TO "{role}"'))
            conn.execute(sa.text(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"'))
            conn.execute(sa.text(f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO "{role}"'))
            conn.execute(sa.text(f'GRANT TEMPORARY ON DATABASE "{engine.url.database}" TO "{role}"'))
        job = open_store(engine.url.set(username=role).render_as_string(hide_password=False))
        with caplog.at_level(logging.WARNING, logger="recsys.ingest"):
            report = run(job, quarantine_dir, news_path=small_world["news"], behaviors_path=small_world["behaviors"])
        assert report.impressions == 4 and store_stats(engine)["impressions"] == 4
        assert re.search(r"the store's role cannot update its planner statistics \((skipping \"\w+\" --- only table or "
                         r"database owner can analyze it|permission denied to analyze \"\w+\", skipping it)\)",
                         caplog.text), caplog.text  # PostgreSQL 15; 16 and later
    finally:
        if job is not None:
            job.dispose()
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP OWNED BY "{role}"'))
            conn.execute(sa.text(f'DROP ROLE "{role}"'))


# --- another file under the same source name -------------------------------------------------------


def _day(first_id: int, users: str, day: int, n: int = 30) -> list[str]:
    return [behavior_line(first_id + i, f"{users}{i}", T0 + day * D + i * H, ["N1"], ["N2-1", "N3-0"]) for i in range(n)]


def test_another_file_under_the_same_source_name_is_refused_and_nothing_is_stored(engine, small_world, quarantine_dir,
                                                                                  tmp_path):
    # MIND restarts impression ids at 1 in every file: a second day's file under the first's
    # source name (a dev file in a folder named like train's, a nightly file at a fixed path
    # without --source) replaced that day's impressions in place, and the ingest exited 0.
    from recsys.store.ingest import MIN_LOST_IMPRESSIONS, ReplacingImpressionsError

    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=write_lines(tmp_path / "d1.tsv", _day(1, "A", 0)),
        source="daily")
    before = dump_store(engine)
    second = write_lines(tmp_path / "d2.tsv", _day(1, "B", 1, n=40))
    # With --strict nothing of the call is stored, its news file neither.
    new_article = write_lines(tmp_path / "n7.tsv", [news_line("N7", title="Tonight's article"), "N8\tbad line"])
    with pytest.raises(ReplacingImpressionsError, match=re.escape(
            f"{second}: 30 of the 30 impressions that source 'daily' holds under this file's impression ids would be "
            f"replaced by impressions of another user or time and dropped (first: impression id 1, stored for user A0 at {T0}): "
            "this looks like another behaviors file under the same source name")) as info:
        run(engine, quarantine_dir, news_path=write_lines(tmp_path / "n7-good.tsv", [news_line("N7")]), behaviors_path=second,
            source="daily", strict=True)
    assert "give each file its own --source" in str(info.value).lower() and "--replace" in str(info.value)
    assert dump_store(engine) == before and not list(quarantine_dir.glob("*"))
    # Without it the news file is stored (tonight's articles are tonight's candidates), with its
    # quarantine file, as when a behaviors file has too many bad lines; the behaviors file is not.
    with pytest.raises(ReplacingImpressionsError):
        run(engine, quarantine_dir, news_path=new_article, behaviors_path=second, source="daily")
    after = dump_store(engine)
    assert [r[0] for r in after["news"]] == [r[0] for r in before["news"]] + ["N7"]
    assert {k: v for k, v in after.items() if k not in ("news", "quarantine")} == {
        k: v for k, v in before.items() if k not in ("news", "quarantine")}
    (kept,) = quarantine_dir.glob("*")
    assert "N8" in kept.read_text(encoding="utf-8")
    # Under its own name it is stored beside the first day.
    assert run(engine, quarantine_dir, behaviors_path=second, source="daily-2").impressions == 40
    wipe_store(engine)
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=write_lines(tmp_path / "d1.tsv", _day(1, "A", 0)),
        source="daily")
    # A file that replaces them on purpose says so.
    report = run(engine, quarantine_dir, behaviors_path=second, source="daily", replace=True)
    assert (report.impressions, report.impressions_changed) == (40, 30)
    # Below MIN_LOST_IMPRESSIONS dropped, a file is let through: a corrected file of a few lines.
    few = write_lines(tmp_path / "few.tsv", _day(1, "C", 2, n=MIN_LOST_IMPRESSIONS - 1))
    assert run(engine, quarantine_dir, behaviors_path=few, source="daily").impressions_changed == MIN_LOST_IMPRESSIONS - 1


def test_a_redelivery_or_a_correction_of_some_lines_is_not_taken_for_another_file(engine, small_world, quarantine_dir,
                                                                                  tmp_path):
    from recsys.store.ingest import ReplacingImpressionsError

    lines = _day(1, "A", 0, n=60)
    run(engine, quarantine_dir, news_path=small_world["news"], behaviors_path=write_lines(tmp_path / "d1.tsv", lines),
        source="s")
    # The log delivered again with a line inserted at the top: every id names another impression,
    # but each stored one comes back under the next id; nothing is dropped.
    shifted = [behavior_line(1, "Z", T0 - H, [], ["N2-0", "N3-1"]),
               *(f"{int(imp_id) + 1}\t{rest}" for imp_id, rest in (line.split("\t", 1) for line in lines))]
    assert run(engine, quarantine_dir, behaviors_path=write_lines(tmp_path / "shifted.tsv", shifted),
               source="s").impressions_changed == 60
    # Half of them corrected to another user (30 of 61 dropped, not more than half): stored.
    corrected = [line.replace("\tA", "\tX") if i % 2 else line for i, line in enumerate(shifted)]
    assert run(engine, quarantine_dir, behaviors_path=write_lines(tmp_path / "half.tsv", corrected),
               source="s").impressions_changed == 30
    # Every one re-timed (a time-zone fix): refused unless asked for.
    retimed = write_lines(tmp_path / "retimed.tsv", [
        behavior_line(i + 1, f"A{i}", T0 + i * H + 5 * H, ["N1"], ["N2-1", "N3-0"]) for i in range(60)])
    with pytest.raises(ReplacingImpressionsError, match="would be replaced by impressions of another user or time"):
        run(engine, quarantine_dir, behaviors_path=retimed, source="s")
    assert run(engine, quarantine_dir, behaviors_path=retimed, source="s", replace=True).impressions_changed == 60
