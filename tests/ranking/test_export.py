"""Parquet export of a run: round trip against the store, atomic write, errors."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest
from sqlalchemy import select

from recsys.columns import NEWS_ID, RANK, SCORE, USER_ID
from recsys.errors import NotFoundError
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


def test_export_errors(store, tmp_path):
    with pytest.raises(NotFoundError, match="no nightly run has completed yet: nothing to export"):
        export_run(store, tmp_path / "out")
    running = runs.create_run(store, model_version="v1", plan={})
    with pytest.raises(NotFoundError, match=f"run {running} is running: only complete runs can be exported"):
        export_run(store, tmp_path / "out", run_id=running)
    with pytest.raises(NotFoundError, match="run 12345 does not exist"):
        export_run(store, tmp_path / "out", run_id=12345)
    assert not (tmp_path / "out").exists()
