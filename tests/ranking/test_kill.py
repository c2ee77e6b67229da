"""kill -9 in the middle of a nightly run: the previous run stays, the rerun resumes cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest
from sqlalchemy import func, select

from recsys.columns import NEWS_ID, RANK, SCORE, USER_ID
from recsys.errors import RunLockedError
from recsys.ranking import runs
from recsys.ranking.lock import this_host
from recsys.ranking.nightly import run_nightly
from recsys.store import schema as s
from tests.ranking.stored import run_rows

# rerank: each run ranks the same inputs again (else a night already done is returned as it is).
SETTINGS = dict(shard_size=5, k=10, num_candidates=40, active_days=7, freshness_days=3, keep_runs=3, rerank=True)

# The killed run: worker processes, and a progress callback that slows the driver so that the
# kill lands after a few shards (two shards per worker in flight: the workers wait for it).
SCRIPT = textwrap.dedent("""
    import sys, time
    from contextlib import contextmanager
    from recsys.store.database import create_engine_for
    from recsys.ranking.nightly import run_nightly

    @contextmanager
    def slow_progress(description, total):
        yield lambda n: time.sleep(1.0)

    if __name__ == "__main__":
        url, model_dir, index_dir = sys.argv[1:4]
        run_nightly(create_engine_for(url), model_dir=model_dir, index_dir=index_dir, num_workers=1,
                    progress=slow_progress, **{settings})
""").replace("{settings}", repr(SETTINGS))


def _shards_of_newer_runs(engine, run_id) -> int:
    rs = s.run_shards.c
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(s.run_shards).where(rs.run_id > run_id)).scalar()


@pytest.mark.slow
def test_kill_9_then_rerun(world_store, store_url, world, tmp_path, caplog):
    first = run_nightly(world_store, model_dir=world.model_dir, index_dir=world.index_dir, num_workers=0, **SETTINGS)
    before = run_rows(world_store, first["run_id"])
    script = tmp_path / "nightly_job.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), store_url, str(world.model_dir), str(world.index_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300
        while _shards_of_newer_runs(world_store, first["run_id"]) == 0:
            if proc.poll() is not None:
                pytest.fail(f"nightly subprocess ended early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("nightly subprocess wrote no shard within 300 s")
            time.sleep(0.05)
        # A second run while the first is alive is refused and names the holder.
        with pytest.raises(RunLockedError, match=rf"held by {this_host()}:{proc.pid} \(nightly run \d+\) since"):
            run_nightly(world_store, model_dir=world.model_dir, index_dir=world.index_dir, num_workers=0, **SETTINGS)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()

    killed = runs.get_run(world_store, first["run_id"] + 1)
    assert killed.status == "running"
    assert 0 < len(runs.finished_shards(world_store, killed.run_id)) < killed.plan["num_shards"]
    # The previous run is still the one readers see, intact.
    assert runs.latest_run(world_store).run_id == first["run_id"]
    pd.testing.assert_frame_equal(run_rows(world_store, first["run_id"]), before)
    user = world.active_users[0]
    assert runs.recommendations_for_user(world_store, user).attrs["run_id"] == first["run_id"]

    time.sleep(1.5)  # the orphaned worker notices its driver is gone and exits
    with caplog.at_level("WARNING", logger="recsys.ranking.lock"):
        rerun = run_nightly(world_store, model_dir=world.model_dir, index_dir=world.index_dir, num_workers=0, **SETTINGS)
    assert f"took over stale lock 'nightly' from {this_host()}:{proc.pid}" in caplog.text
    assert rerun["run_id"] == killed.run_id and rerun["resumed"] and rerun["counts"]["shards_resumed"] > 0
    after = run_rows(world_store, rerun["run_id"])
    assert not after.duplicated([USER_ID, RANK]).any()
    assert len(after) == rerun["counts"]["recommendations"] == len(before)
    pd.testing.assert_frame_equal(after[[USER_ID, RANK, NEWS_ID]], before[[USER_ID, RANK, NEWS_ID]])
    pd.testing.assert_series_equal(after[SCORE], before[SCORE], check_exact=False, rtol=1e-5)
    assert runs.latest_run(world_store).run_id == rerun["run_id"]


@pytest.mark.slow
def test_a_worker_killed_by_a_signal_stops_the_run_resumably(world_store, world, monkeypatch):
    # multiprocessing.Pool replaced a dead worker and lost its shard: the driver waited for
    # ever, holding the lock. The out-of-memory killer is the usual cause.
    import multiprocessing
    import threading

    from recsys.ranking import nightly
    from recsys.ranking.engines import WorkerDiedError

    real_run_local = nightly.run_local

    def run_local_killing_the_workers(setup, shards, *, num_workers, on_result=None):
        def kill_after_first(result):
            on_result(result)
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGKILL)

        return real_run_local(setup, shards, num_workers=num_workers, on_result=kill_after_first)

    monkeypatch.setattr(nightly, "run_local", run_local_killing_the_workers)
    outcome: dict = {}

    def job():
        try:
            run_nightly(world_store, model_dir=world.model_dir, index_dir=world.index_dir, num_workers=1, **SETTINGS)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    thread.join(timeout=300)
    assert not thread.is_alive(), "the nightly job hung after its worker was killed"
    assert isinstance(outcome.get("error"), WorkerDiedError), outcome
    assert "out-of-memory killer" in str(outcome["error"])
    monkeypatch.undo()

    stopped = runs.get_run(world_store, 1)
    assert stopped.status == "running"
    written = len(runs.finished_shards(world_store, 1))
    assert 0 < written < stopped.plan["num_shards"]
    # The lock was released: the next attempt runs at once and resumes the run.
    rerun = run_nightly(world_store, model_dir=world.model_dir, index_dir=world.index_dir, num_workers=0, **SETTINGS)
    assert rerun["run_id"] == 1 and rerun["resumed"] and rerun["counts"]["shards_resumed"] == written
    clean = run_nightly(world_store, model_dir=world.model_dir, index_dir=world.index_dir, num_workers=0, **SETTINGS)
    pd.testing.assert_frame_equal(run_rows(world_store, 1)[[USER_ID, RANK, NEWS_ID]], run_rows(world_store, clean["run_id"])[[USER_ID, RANK, NEWS_ID]])


@pytest.mark.slow
@pytest.mark.ray
def test_a_ray_worker_that_keeps_dying_stops_the_run_resumably(world_store, world):
    # Ray Data replaces a dead actor and retries its shard, by default for ever: a shard that
    # kills its worker every time (out of memory) hung the job while it held the lock. Here every
    # actor process is killed as soon as it appears.
    import threading

    import psutil

    from recsys.ranking.engines import RAY_ACTOR_RESTARTS, WorkerDiedError

    stop, killed = threading.Event(), set()

    def kill_the_actors():
        while not stop.is_set():
            for process in psutil.process_iter(["pid", "name"]):
                if "RayShardActor" in (process.info["name"] or ""):
                    try:
                        process.kill()
                        killed.add(process.info["pid"])
                    except psutil.Error:
                        pass
            stop.wait(0.1)

    outcome: dict = {}

    def job():
        try:
            run_nightly(world_store, model_dir=world.model_dir, index_dir=world.index_dir, engine_name="ray",
                        num_workers=1, **SETTINGS)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    killer = threading.Thread(target=kill_the_actors, daemon=True)
    killer.start()
    try:
        thread = threading.Thread(target=job, daemon=True)
        thread.start()
        thread.join(timeout=300)
        assert not thread.is_alive(), "the nightly job hung while its Ray worker kept dying"
    finally:
        stop.set()
        killer.join()
    assert isinstance(outcome.get("error"), WorkerDiedError), outcome
    assert f"died {RAY_ACTOR_RESTARTS + 1} times" in str(outcome["error"])
    assert len(killed) >= RAY_ACTOR_RESTARTS + 1
    stopped = runs.get_run(world_store, 1)
    assert stopped.status == "running"
    # The lock was released: the next attempt runs at once, resumes the run and ends as a clean run does.
    rerun = run_nightly(world_store, model_dir=world.model_dir, index_dir=world.index_dir, num_workers=0, **SETTINGS)
    assert rerun["run_id"] == 1 and rerun["resumed"] and rerun["status"] == "complete"
    clean = run_nightly(world_store, model_dir=world.model_dir, index_dir=world.index_dir, num_workers=0, **SETTINGS)
    pd.testing.assert_frame_equal(run_rows(world_store, 1)[[USER_ID, RANK, NEWS_ID]], run_rows(world_store, clean["run_id"])[[USER_ID, RANK, NEWS_ID]])
