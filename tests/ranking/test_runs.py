"""Nightly runs in the store: shard writes, the atomic switch, resume, pruning and readers."""

from __future__ import annotations

import pandas as pd
import pytest
from sqlalchemy import func, select

from recsys.columns import NEWS_ID, RANK, SCORE, USER_ID
from recsys.errors import ConfigError, NotFoundError, StoreError
from recsys.ranking import runs
from recsys.store import schema as s

PLAN = {"as_of": "2019-11-15 00:00:00", "k": 2, "num_shards": 2, "model_version": "v1"}


def _recs(users, news, score0=1.0):
    rows = [(u, r + 1, n, score0 - 0.1 * r) for u in users for r, n in enumerate(news)]
    return pd.DataFrame(rows, columns=[USER_ID, RANK, NEWS_ID, SCORE])


def _count(engine, table, **where):
    query = select(func.count()).select_from(table)
    for key, value in where.items():
        query = query.where(table.c[key] == value)
    with engine.connect() as conn:
        return conn.execute(query).scalar()


def _complete_run(engine, news, users=("U1", "U2"), plan=PLAN):
    run_id = runs.create_run(engine, model_version="v1", plan=plan)
    runs.write_shard(engine, run_id, 0, _recs(users[:1], news), num_users=1)
    runs.write_shard(engine, run_id, 1, _recs(users[1:], news), num_users=len(users) - 1)
    runs.complete_run(engine, run_id, counts={"users": len(users)}, timings={"rank": 1.0}, num_shards=2)
    return run_id


@pytest.fixture
def world(store, add_news, add_users):
    add_news(store, ["N1", "N2", "N3", "N4"])
    add_users(store, ["U1", "U2", "U3"])
    return store


def test_readers_see_only_the_latest_complete_run(world):
    first = _complete_run(world, ["N1", "N2"])
    second = runs.create_run(world, model_version="v2", plan={**PLAN, "k": 3})
    runs.write_shard(world, second, 0, _recs(["U1"], ["N3", "N4"]), num_users=1)
    # Half-written run: invisible.
    assert runs.latest_run(world).run_id == first
    recs = runs.recommendations_for_user(world, "U1", 10)
    assert recs[NEWS_ID].tolist() == ["N1", "N2"] and recs.attrs["run_id"] == first
    runs.write_shard(world, second, 1, _recs(["U2"], ["N3", "N4"]), num_users=1)
    runs.complete_run(world, second, counts={"users": 2}, timings={}, num_shards=2)
    recs = runs.recommendations_for_user(world, "U1", 10)
    assert recs[NEWS_ID].tolist() == ["N3", "N4"] and recs.attrs["run_id"] == second
    assert list(recs.columns) == ["rank", "news_id", "title", "category", "score"]
    assert recs["title"].tolist() == ["title of N3", "title of N4"]
    assert recs[RANK].tolist() == [1, 2]
    assert runs.recommendations_for_user(world, "U1", 1)[NEWS_ID].tolist() == ["N3"]
    # A k beyond any rank (or any integer the database takes) asks for the whole list.
    assert runs.recommendations_for_user(world, "U1", 10**20)[NEWS_ID].tolist() == ["N3", "N4"]


def _view(engine):
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT run_id, user_id, rank, news_id FROM current_recommendations ORDER BY user_id, rank"
        ).all()
    return [tuple(r) for r in rows]


def test_the_current_view_shows_only_the_latest_complete_run(world):
    # Product surfaces that query the store directly read this view, never a run in progress
    # or a failed one, even when those have higher run ids.
    assert _view(world) == []
    first = _complete_run(world, ["N1", "N2"])
    expected = [(first, "U1", 1, "N1"), (first, "U1", 2, "N2"), (first, "U2", 1, "N1"), (first, "U2", 2, "N2")]
    assert _view(world) == expected
    running = runs.create_run(world, model_version="v2", plan={**PLAN, "k": 3})
    runs.write_shard(world, running, 0, _recs(["U1"], ["N3"]), num_users=1)
    assert _view(world) == expected
    runs.fail_run(world, running, "boom")
    failed_rows = _count(world, s.recommendations, run_id=running)
    assert failed_rows == 1 and _view(world) == expected
    second = _complete_run(world, ["N4"], plan={**PLAN, "k": 1})
    assert _view(world) == [(second, "U1", 1, "N4"), (second, "U2", 1, "N4")]


def test_unknown_user_and_empty_lists(world):
    _complete_run(world, ["N1"])
    with pytest.raises(NotFoundError, match="user 'nobody' is unknown"):
        runs.recommendations_for_user(world, "nobody")
    # Known user that the run gave nothing to: an empty list, not an error.
    assert runs.recommendations_for_user(world, "U3").empty
    with pytest.raises(ConfigError, match="k is 0, expected at least 1"):
        runs.recommendations_for_user(world, "U1", 0)


def test_known_user_before_any_run(world):
    with pytest.raises(NotFoundError, match="no nightly run has completed yet"):
        runs.recommendations_for_user(world, "U1")


def test_shard_written_once(world):
    run_id = runs.create_run(world, model_version="v1", plan=PLAN)
    assert runs.write_shard(world, run_id, 0, _recs(["U1"], ["N1", "N2"]), num_users=1) is True
    assert runs.write_shard(world, run_id, 0, _recs(["U1"], ["N1", "N2"]), num_users=1) is False
    assert _count(world, s.recommendations, run_id=run_id) == 2
    assert runs.finished_shards(world, run_id) == {0: (1, 2)}


def test_shard_rows_are_stored_as_given(world):
    """The shard goes to the driver as plain tuples: NumPy and Arrow dtypes, a quote in an id,
    float32 scores and the microseconds of ``created_at`` come back unchanged through SQLAlchemy."""
    from datetime import datetime

    import numpy as np

    run_id = runs.create_run(world, model_version="v1", plan=PLAN)
    frame = pd.DataFrame({
        USER_ID: pd.array(["U1", "U1", "U'2"], dtype="string[pyarrow]"),
        RANK: np.array([1, 2, 1], dtype=np.int16),
        NEWS_ID: np.array(["N1", "N2", "N2"], dtype=object),
        SCORE: np.array([0.1, -2.5e-8, 3.0], dtype=np.float32),
    })
    at = datetime(2019, 11, 15, 1, 2, 3, 456789)
    assert runs.write_shard(world, run_id, 0, frame, num_users=2, created_at=at) is True
    rec = s.recommendations.c
    with world.connect() as conn:
        got = conn.execute(
            select(rec.user_id, rec.rank, rec.news_id, rec.score, rec.created_at)
            .where(rec.run_id == run_id).order_by(rec.user_id, rec.rank)
        ).all()
    want = [("U'2", 1, "N2", float(np.float32(3.0)), at), ("U1", 1, "N1", float(np.float32(0.1)), at),
            ("U1", 2, "N2", float(np.float32(-2.5e-8)), at)]
    assert [tuple(r) for r in got] == want
    assert runs.finished_shards(world, run_id) == {0: (2, 3)}


def test_failed_shard_write_leaves_nothing(world):
    run_id = runs.create_run(world, model_version="v1", plan=PLAN)
    duplicated = pd.concat([_recs(["U1"], ["N1"]), _recs(["U1"], ["N2"])])  # two rank-1 rows
    with pytest.raises(StoreError, match=rf"shard 0 of run {run_id}: rows break the key .* a user got a rank twice"):
        runs.write_shard(world, run_id, 0, duplicated, num_users=1)
    assert _count(world, s.recommendations) == 0 and runs.finished_shards(world, run_id) == {}


def test_shard_write_checks_columns_and_status(world):
    run_id = runs.create_run(world, model_version="v1", plan=PLAN)
    with pytest.raises(StoreError, match=r"lack columns \['score'\]"):
        runs.write_shard(world, run_id, 0, _recs(["U1"], ["N1"]).drop(columns=[SCORE]), num_users=1)
    runs.fail_run(world, run_id, "boom")
    with pytest.raises(StoreError, match=f"run {run_id} is failed, not running: shard 0 not written"):
        runs.write_shard(world, run_id, 0, _recs(["U1"], ["N1"]), num_users=1)
    assert runs.get_run(world, run_id).message == "boom"


def test_complete_needs_every_shard(world):
    run_id = runs.create_run(world, model_version="v1", plan=PLAN)
    runs.write_shard(world, run_id, 0, _recs(["U1"], ["N1"]), num_users=1)
    with pytest.raises(StoreError, match=f"run {run_id} has 1 of 2 shards written"):
        runs.complete_run(world, run_id, counts={}, timings={}, num_shards=2)
    runs.write_shard(world, run_id, 1, _recs(["U2"], ["N1"]), num_users=1)
    runs.complete_run(world, run_id, counts={"users": 2}, timings={"rank": 0.5}, num_shards=2)
    with pytest.raises(StoreError, match=f"run {run_id} is complete, cannot complete it"):
        runs.complete_run(world, run_id, counts={}, timings={}, num_shards=2)
    info = runs.get_run(world, run_id)
    # The plan (with its fingerprint) survives the final counts.
    assert info.counts["users"] == 2 and info.plan["k"] == 2 and len(info.plan["fingerprint"]) == 16


def test_resumable_run_needs_the_same_plan(world):
    run_id = runs.create_run(world, model_version="v1", plan=PLAN)
    assert runs.find_resumable_run(world, dict(PLAN)).run_id == run_id
    assert runs.find_resumable_run(world, {**PLAN, "k": 5}) is None
    later = runs.create_run(world, model_version="v1", plan={**PLAN, "k": 5})
    # Only the newest running run can be resumed.
    assert runs.find_resumable_run(world, dict(PLAN)) is None
    runs.write_shard(world, run_id, 0, _recs(["U1"], ["N1"]), num_users=1)
    assert runs.abandon_running_runs(world, keep_run_id=later, message="superseded") == [run_id]
    assert runs.get_run(world, run_id).status == "failed"
    assert _count(world, s.recommendations, run_id=run_id) == 0
    assert runs.get_run(world, later).status == "running"


def test_prune_keeps_the_newest_runs(world):
    ids = [_complete_run(world, ["N1", "N2"]) for _ in range(4)]
    failed = runs.create_run(world, model_version="v1", plan=PLAN)
    runs.write_shard(world, failed, 0, _recs(["U1"], ["N1"]), num_users=1)
    runs.fail_run(world, failed, "killed")
    newest = _complete_run(world, ["N3"])
    assert runs.prune_runs(world, keep_runs=2) == ids[:3]
    assert [runs.get_run(world, i).status for i in ids] == ["pruned", "pruned", "pruned", "complete"]
    with world.connect() as conn:
        left = conn.execute(select(s.recommendations.c.run_id).distinct()).scalars().all()
    assert sorted(left) == [ids[3], newest]
    assert _count(world, s.run_shards, run_id=failed) == 0
    assert runs.latest_run(world).run_id == newest
    with pytest.raises(ConfigError, match="keep_runs is 0, expected at least 1"):
        runs.prune_runs(world, keep_runs=0)


def test_run_summary(world):
    run_id = _complete_run(world, ["N1", "N2"])
    summary = runs.run_summary(world, run_id)
    assert summary["status"] == "complete" and summary["model_version"] == "v1"
    assert summary["counts"] == {"users": 2} and summary["timings"] == {"rank": 1.0}
    assert summary["shards_written"] == 2 and summary["recommendations_stored"] == 4
    assert summary["plan"]["k"] == 2
    with pytest.raises(NotFoundError, match="run 999 does not exist"):
        runs.run_summary(world, 999)


def test_the_cli_says_why_a_known_users_list_is_empty(world, capsys):
    from recsys.cli import main

    _complete_run(world, ["N1", "N2"], users=("U1", "U2"))
    url = world.url.render_as_string(hide_password=False)
    assert main(["--db", url, "recommend", "--user", "U3", "--json"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "[]"
    assert "note: user 'U3' has no list in run 1: not active in that run's window" in err
    assert main(["--db", url, "recommend", "--user", "U1", "--json"]) == 0
    out, err = capsys.readouterr()
    assert [r["news_id"] for r in __import__("json").loads(out)] == ["N1", "N2"] and "note" not in err
