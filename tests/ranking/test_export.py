"""Parquet export of a run: round trip against the store, atomic write, errors."""

from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd
import pyarrow.parquet as pq
import pytest
from sqlalchemy import select, text

from recsys.columns import NEWS_ID, RANK, SCORE, USER_ID
from recsys.errors import NotFoundError, RecsysError
from recsys.ranking import runs
from recsys.ranking.export import EXPORT_SCHEMA, export_run
from recsys.store import schema as s


def _run(engine, users, news):
    run_id = runs.create_run(engine, model_version="v1", plan={"k": len(news)})
    frame = pd.DataFrame(
        [(u, r + 1, n, 0.5 - 0.01 * r + 0.001 * i) for i, u in enumerate(users) for r, n in enumerate(news)],
        columns=[USER_ID, RANK, NEWS_ID, SCORE],
    )
    runs.write_shard(engine, run_id, 0, frame, num_users=len(users))
    runs.complete_run(engine, run_id, counts={}, timings={}, num_shards=1)
    return run_id


def test_round_trip(store, add_news, tmp_path):
    add_news(store, ["N1", "N2", "N3"])
    users = [f"U{i}" for i in range(25)]
    old = _run(store, users, ["N3", "N1"])
    run_id = _run(store, users, ["N1", "N2", "N3"])
    path = export_run(store, tmp_path / "out", chunk_rows=10)  # several row groups
    assert path.name == f"recommendations-run-{run_id}.parquet"
    table = pq.read_table(path)
    assert table.schema.equals(EXPORT_SCHEMA)
    # The columns and types docs/operations.md promises downstream readers (EXPORT_SCHEMA could drift).
    assert [(f.name, str(f.type), f.nullable) for f in table.schema] == [
        ("run_id", "int64", False), ("user_id", "string", False), ("rank", "int16", False), ("news_id", "string", False),
        ("score", "double", False), ("created_at", "timestamp[us, tz=UTC]", False)]
    assert pq.ParquetFile(path).metadata.num_row_groups == 8  # 75 rows, 10 a group: streamed, not read whole
    got = table.to_pandas()
    with store.connect() as conn:
        want = pd.read_sql(
            select(s.recommendations).where(s.recommendations.c.run_id == run_id)
            .order_by(s.recommendations.c.user_id, s.recommendations.c.rank), conn,
        )
    assert len(got) == 75
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    assert not got.duplicated([USER_ID, RANK]).any()
    # An explicit older run; nothing but the two files is left behind.
    export_run(store, tmp_path / "out", run_id=old)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"recommendations-run-{old}.parquet", f"recommendations-run-{run_id}.parquet",
    ]


@pytest.mark.postgres
def test_rows_come_by_user_id_in_code_point_order_whatever_the_databases_collation(icu_engine, add_news, tmp_path):
    """An en-US database orders "u1" before "U_2" and skips "-" and "_": the export and the
    evaluation's list reader would list the same run's users in another order than on SQLite
    or a C-collated database."""
    from recsys.store.repository import iter_run_recommendations

    add_news(icu_engine, ["N1", "N2"])
    users = ["u1", "U_2", "U-3", "U1", "Ub", "UA"]
    with icu_engine.connect() as conn:  # the database's own order is not the code point order
        assert conn.execute(text("SELECT unnest(CAST(:u AS text[])) AS u ORDER BY u"), {"u": users}).scalars().all() != sorted(users)
    run_id = _run(icu_engine, users, ["N2", "N1"])
    got = pq.read_table(export_run(icu_engine, tmp_path, chunk_rows=5)).to_pandas()
    assert got[USER_ID].tolist() == [u for u in sorted(users) for _ in range(2)]
    assert got[RANK].tolist() == [1, 2] * len(users)
    chunks = list(iter_run_recommendations(icu_engine, run_id))
    assert pd.concat(chunks)[USER_ID].tolist() == got[USER_ID].tolist()


def test_created_at_is_a_utc_timestamp(store, add_news, tmp_path):
    """The store holds naive UTC times; the file says UTC, so a reader in another zone (Spark,
    DuckDB, pandas) does not read the rows' time as its own local time."""
    import pyarrow as pa

    add_news(store, ["N1", "N2"])
    run_id = runs.create_run(store, model_version="v1", plan={"k": 2})
    frame = pd.DataFrame([("U1", 1, "N1", 0.9), ("U1", 2, "N2", 0.8)], columns=[USER_ID, RANK, NEWS_ID, SCORE])
    written = datetime(2019, 11, 15, 2, 30, 5, 123456)
    runs.write_shard(store, run_id, 0, frame, num_users=1, created_at=written)
    runs.complete_run(store, run_id, counts={}, timings={}, num_shards=1)
    table = pq.read_table(export_run(store, tmp_path))
    assert table.schema.field("created_at").type == pa.timestamp("us", tz="UTC")
    with store.connect() as conn:
        stored = conn.execute(select(s.recommendations.c.created_at).where(s.recommendations.c.run_id == run_id)).scalars().all()
    assert stored == [written, written]  # naive, UTC
    assert table.column("created_at").to_pylist() == [written.replace(tzinfo=timezone.utc)] * 2


def test_export_errors(store, tmp_path):
    with pytest.raises(NotFoundError, match="no nightly run has completed yet: nothing to export"):
        export_run(store, tmp_path / "out")
    running = runs.create_run(store, model_version="v1", plan={})
    with pytest.raises(NotFoundError, match=f"run {running} is running: only complete runs can be exported"):
        export_run(store, tmp_path / "out", run_id=running)
    with pytest.raises(NotFoundError, match="run 12345 does not exist"):
        export_run(store, tmp_path / "out", run_id=12345)
    # A complete ingest or training run was exported as an empty file, exit 0: a loader would
    # publish empty lists.
    from recsys.pipelines.runlog import recorded_run

    for kind, article in (("ingest", "an"), ("train", "a")):
        with recorded_run(store, kind) as record:
            pass
        assert runs.get_run(store, record["run_id"]).status == runs.COMPLETE
        with pytest.raises(NotFoundError, match=f"^run {record['run_id']} is {article} {kind} run, not a nightly run: "
                                                "only complete nightly runs have recommendations to export$"):
            export_run(store, tmp_path / "out", run_id=record["run_id"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stream_rows", [1, 2, 3, 1000])
def test_run_recommendations_stream_in_whole_lists(store, add_news, monkeypatch, stream_rows):
    """``iter_run_recommendations`` (evaluate's beyond-accuracy read) keeps every list in one chunk."""
    from recsys.store import repository as repo

    add_news(store, ["N1", "N2", "N3", "N4"])
    news = ["N1", "N2", "N3", "N4"]
    lists = {f"U{i}": news[: 1 + i % 4] for i in range(13)}  # lists of 1 to 4 items
    run_id = runs.create_run(store, model_version="v1", plan={"k": 4})
    frame = pd.DataFrame([(u, r + 1, n, 1.0 - r) for u, items in lists.items() for r, n in enumerate(items)],
                         columns=[USER_ID, RANK, NEWS_ID, SCORE])
    runs.write_shard(store, run_id, 0, frame, num_users=len(lists))
    _run(store, ["U0", "V"], ["N4"])  # another run: not read
    monkeypatch.setattr(repo, "STREAM_ROWS", stream_rows)
    chunks = list(repo.iter_run_recommendations(store, run_id))
    users_per_chunk = [set(c[USER_ID]) for c in chunks]
    for i, a in enumerate(users_per_chunk):
        assert all(not (a & b) for b in users_per_chunk[i + 1:])  # no list split over chunks
    got = pd.concat(chunks, ignore_index=True)
    assert list(got.columns) == [USER_ID, RANK, NEWS_ID]
    assert sorted(zip(got[USER_ID], got[RANK], got[NEWS_ID])) == sorted(zip(frame[USER_ID], frame[RANK], frame[NEWS_ID]))
    for user, rows in got.groupby(USER_ID):
        assert rows[RANK].tolist() == list(range(1, len(lists[user]) + 1))
    if stream_rows <= 3:
        assert len(chunks) > 3
    assert list(repo.iter_run_recommendations(store, 12345)) == []


@pytest.mark.parametrize("explicit", [True, False])
def test_a_run_pruned_while_exported_is_an_error_not_an_empty_file(store, add_news, monkeypatch, tmp_path, explicit):
    """A prune that commits between the run's lookup and the read left an empty Parquet file
    and exit 0: a loader would have published empty lists."""
    from recsys.ranking import export

    add_news(store, ["N1", "N2"])
    old = _run(store, ["U1", "U2"], ["N1", "N2"])
    newer = _run(store, ["U1"], ["N2"])
    read = export.iter_run_rows

    def pruned_first(engine, run_id, **kw):
        runs.prune_runs(engine, keep_runs=1)  # the nightly job's prune, between lookup and read
        return read(engine, run_id, **kw)

    monkeypatch.setattr(export, "iter_run_rows", pruned_first)
    if not explicit:  # `old` was the latest at lookup time; `newer` completed and pruned it since
        monkeypatch.setattr(export, "latest_run", lambda engine: runs.get_run(engine, old))
    with pytest.raises(NotFoundError, match=f"^run {old} became pruned while it was exported"):
        export_run(store, tmp_path / "out", run_id=old if explicit else None)
    assert list((tmp_path / "out").iterdir()) == []
    # A complete run still exports, and the nightly's newest run was never touched.
    monkeypatch.setattr(export, "iter_run_rows", read)
    assert len(pq.read_table(export_run(store, tmp_path / "out", run_id=newer))) == 1


def test_a_complete_run_without_rows_exports_an_empty_file(store, tmp_path):
    """A night with no active reader completes with no lists: its export is empty, not an error."""
    run_id = runs.create_run(store, model_version="v1", plan={"k": 5})
    runs.complete_run(store, run_id, counts={}, timings={}, num_shards=0)
    table = pq.read_table(export_run(store, tmp_path, run_id=run_id))
    assert table.num_rows == 0 and table.schema.equals(EXPORT_SCHEMA)


def test_a_relative_folder_gives_the_absolute_path_of_the_file(store, add_news, tmp_path, monkeypatch):
    # Airflow runs the job in a temporary folder it deletes: the summary's relative path named nothing.
    add_news(store, ["N1"])
    run_id = _run(store, ["U1"], ["N1"])
    monkeypatch.chdir(tmp_path)
    path = export_run(store, "exports")
    assert path == tmp_path / "exports" / f"recommendations-run-{run_id}.parquet" and path.is_file()


def test_a_folder_in_the_files_place_is_an_error_naming_the_file(store, add_news, tmp_path):
    # `recsys export` ended in "internal error: IsADirectoryError" (exit 2), where `nightly --export`
    # said what was wrong (exit 1).
    add_news(store, ["N1"])
    run_id = _run(store, ["U1"], ["N1"])
    out = tmp_path / "exports"
    in_the_way = out / f"recommendations-run-{run_id}.parquet"
    (in_the_way / "kept").mkdir(parents=True)
    with pytest.raises(RecsysError) as raised:
        export_run(store, out)
    assert str(raised.value) == f"cannot write {in_the_way}: Is a directory"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [in_the_way.name, f"{in_the_way.name}/kept"]
