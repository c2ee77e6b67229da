"""Both engines give the same recommendations as ranking in-process."""

from __future__ import annotations

import pandas as pd
import pytest
from sqlalchemy import select

from recsys.columns import NEWS_ID, RANK, SCORE, USER_ID
from recsys.ranking.engines import threads_per_worker
from recsys.ranking.nightly import run_nightly
from recsys.store import schema as s
from recsys.threads import default_threads


def _rows(engine, run_id) -> pd.DataFrame:
    rec = s.recommendations.c
    with engine.connect() as conn:
        rows = conn.execute(
            select(rec.user_id, rec.rank, rec.news_id, rec.score).where(rec.run_id == run_id).order_by(rec.user_id, rec.rank)
        ).all()
    return pd.DataFrame(rows, columns=[USER_ID, RANK, NEWS_ID, SCORE])


def _run(engine, world, **kw):
    return run_nightly(engine, model_dir=world.model_dir, index_dir=world.index_dir, shard_size=9, k=10,
                       num_candidates=40, keep_runs=5, **kw)


def _assert_same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert len(a) > 0
    pd.testing.assert_frame_equal(a[[USER_ID, RANK, NEWS_ID]], b[[USER_ID, RANK, NEWS_ID]])
    pd.testing.assert_series_equal(a[SCORE], b[SCORE], check_exact=False, rtol=1e-5)


def test_threads_per_worker_never_oversubscribes():
    for workers in (1, 2, 3, 64):
        assert threads_per_worker(workers) >= 1
        assert workers * threads_per_worker(workers) <= max(default_threads(), workers)


@pytest.mark.slow
def test_local_worker_processes_equal_in_process(world_store, world):
    here = _run(world_store, world, num_workers=0)
    pooled = _run(world_store, world, num_workers=2)
    assert pooled["counts"]["recommendations"] == here["counts"]["recommendations"]
    _assert_same(_rows(world_store, pooled["run_id"]), _rows(world_store, here["run_id"]))


@pytest.mark.slow
@pytest.mark.ray
def test_ray_engine_equals_local(world_store, world):
    local = _run(world_store, world, num_workers=0)
    on_ray = _run(world_store, world, engine_name="ray", num_workers=2)
    assert on_ray["engine"] == "ray" and on_ray["status"] == "complete"
    assert on_ray["counts"]["shards"] == local["counts"]["shards"]
    assert on_ray["counts"]["candidates_scored"] == local["counts"]["candidates_scored"]
    _assert_same(_rows(world_store, on_ray["run_id"]), _rows(world_store, local["run_id"]))


def _setup(store, world, **overrides):
    from datetime import datetime

    import numpy as np

    from recsys.ranking.engines import WorkerSetup

    fields = dict(
        db_url=store.url.render_as_string(hide_password=False), run_id=1, model_dir=str(world.model_dir),
        index_dir=str(world.index_dir), k=10, num_candidates=40, published_after=None,
        side=np.zeros((len(world.news_ids), 3), np.float32), popular=np.arange(5), catalogue_fingerprint="0" * 16,
        num_threads=1, created_at=datetime(2019, 11, 15),
    )
    fields.update(overrides)
    return WorkerSetup(**fields)


def test_worker_refuses_an_index_that_changed(store, world):
    from recsys.errors import ModelMismatchError
    from recsys.ranking.engines import run_local

    with pytest.raises(ModelMismatchError, match="its articles changed since the run started"):
        run_local(_setup(store, world), [(0, ["U000"])], num_workers=0)


@pytest.mark.slow
def test_worker_process_setup_error_reaches_the_driver(store, world):
    from recsys.errors import ModelMismatchError
    from recsys.ranking.engines import run_local

    # A failing pool initializer would make the pool respawn workers for ever: the error must
    # come back with the first shard instead.
    with pytest.raises(ModelMismatchError, match="its articles changed since the run started"):
        run_local(_setup(store, world), [(0, ["U000"]), (1, ["U001"])], num_workers=1)
