"""The store lock: refusal with the holder's name, release, stale-lock takeover, races."""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import insert

from recsys.errors import RunLockedError
from recsys.ranking.lock import (
    LockLostError, StoreLock, acquire_lock, current_holder, read_lock, release_lock, this_host, utc_now,
)
from recsys.store import schema as s

HOST = this_host()


def _plant_lock(engine, holder, acquired_at, run_id=None, name="nightly"):
    with engine.begin() as conn:
        conn.execute(insert(s.locks).values(name=name, holder=holder, run_id=run_id, acquired_at=acquired_at))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_acquire_refused_with_holder_and_time(store):
    with acquire_lock(store, run_id=7) as lock:
        assert lock.holder == current_holder()
        since = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"
        with pytest.raises(RunLockedError, match=rf"lock 'nightly' is held by {HOST}:\d+ \(run 7\) since {since}"):
            acquire_lock(store, holder="other-host:1")
    assert read_lock(store) is None
    # Released: the next run takes it.
    with acquire_lock(store, holder="other-host:1"):
        assert read_lock(store).holder == "other-host:1"


def test_the_refusal_names_the_kind_of_the_holders_run(store):
    # Ingests, nightly jobs and index saves take the same lock: "(run 11)" left the operator to
    # look up which was in the way.
    from recsys.pipelines.runlog import recorded_run

    with recorded_run(store, "ingest") as record, acquire_lock(store, run_id=record["run_id"]):
        with pytest.raises(RunLockedError, match=rf"is held by {HOST}:\d+ \(ingest run {record['run_id']}\) since"):
            acquire_lock(store, holder="other-host:1")


def test_locks_by_name_are_independent(store):
    with acquire_lock(store, "nightly"), acquire_lock(store, "train"):
        assert read_lock(store, "train") is not None


def test_attach_run_is_recorded(store):
    with acquire_lock(store) as lock:
        lock.attach_run(42)
        assert read_lock(store).run_id == 42


def test_release_by_someone_else_does_nothing(store):
    with acquire_lock(store):
        assert release_lock(store, holder="intruder:1") is False
        assert read_lock(store) is not None


def test_dead_pid_on_this_host_is_taken_over(store, caplog):
    pid = _dead_pid()
    _plant_lock(store, f"{HOST}:{pid}", utc_now() - timedelta(minutes=1), run_id=3)
    with caplog.at_level(logging.WARNING, logger="recsys.ranking.lock"):
        lock = acquire_lock(store)
    assert read_lock(store).holder == current_holder()
    assert f"took over stale lock 'nightly' from {HOST}:{pid}" in caplog.text and ", run 3)" in caplog.text
    assert f"process {pid} no longer exists" in caplog.text
    lock.release()


def test_reused_pid_on_this_host_is_taken_over(store, caplog):
    # A live process started after the lock was taken cannot be the holder.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _plant_lock(store, f"{HOST}:{proc.pid}", utc_now() - timedelta(hours=1))
        with caplog.at_level(logging.WARNING, logger="recsys.ranking.lock"), acquire_lock(store):
            assert "started after the lock was taken" in caplog.text
            assert "run None" not in caplog.text  # a lock taken by an ingest, before any run: no run to name
    finally:
        proc.kill()
        proc.wait()


def test_live_pid_on_this_host_is_respected(store):
    # This process started before the lock was taken: a live holder, however short the timeout.
    _plant_lock(store, current_holder(), utc_now())
    with pytest.raises(RunLockedError, match="is held by"):
        acquire_lock(store, holder="other-host:2", stale_after=timedelta(seconds=0))


def test_a_holder_of_the_same_host_name_in_another_pid_namespace_is_another_host(store, monkeypatch):
    # Containers sharing the host's name (`--network host`) or two machines of one name: the
    # holder's pid means nothing here, and a pid absent here was read as a dead holder.
    from recsys.ranking import lock as lock_module

    pid = _dead_pid()
    _plant_lock(store, f"{HOST}:{pid}", utc_now() - timedelta(minutes=1))
    real_read = lock_module._read
    monkeypatch.setattr(lock_module, "_read", lambda path: "another-machine")
    assert lock_module.this_host() != HOST and lock_module.this_host().startswith(socket.gethostname() + "#")
    with pytest.raises(RunLockedError, match=rf"held by {HOST}:{pid} .*a holder on another host counts as gone after 0:15:00"):
        acquire_lock(store)
    monkeypatch.setattr(lock_module.os, "readlink", lambda path: "pid:[1]")  # a container's own pid namespace
    monkeypatch.setattr(lock_module, "_read", real_read)
    assert lock_module.this_host() != HOST
    with pytest.raises(RunLockedError, match="counts as gone after"):
        acquire_lock(store)
    monkeypatch.undo()
    acquire_lock(store).release()  # back in the holder's namespace: its pid is known dead


def test_other_host_stale_only_after_timeout(store, caplog):
    _plant_lock(store, "far-away:99", utc_now() - timedelta(minutes=30))
    with pytest.raises(RunLockedError, match=r"held by far-away:99 since .* counts as gone after 1:00:00 without activity"):
        acquire_lock(store, stale_after=timedelta(hours=1))
    with caplog.at_level(logging.WARNING, logger="recsys.ranking.lock"), acquire_lock(store, stale_after=timedelta(minutes=10)):
        assert "holder on another host, no activity since" in caplog.text


def test_other_host_with_recent_shards_is_alive(store):
    now = utc_now()
    with store.begin() as conn:
        conn.execute(insert(s.runs).values(run_id=5, kind="nightly", status="running", started_at=now, counts={}, timings={}))
        conn.execute(insert(s.run_shards).values(run_id=5, shard=0, num_users=1, num_recommendations=1, finished_at=now))
    _plant_lock(store, "far-away:99", now - timedelta(hours=3), run_id=5)
    with pytest.raises(RunLockedError, match=rf"\(nightly run 5\) .*\(last activity {now:%Y-%m-%d %H:%M:%S} UTC"):  # the shard
        acquire_lock(store, stale_after=timedelta(hours=1))


def test_racing_acquirers_one_wins(store):
    barrier = threading.Barrier(6)
    won, refused = [], []

    def contend(i):
        barrier.wait()
        try:
            won.append(acquire_lock(store, holder=f"host-{i}:1"))
        except RunLockedError:
            refused.append(i)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5
    assert read_lock(store).holder == won[0].holder and won[0].holder.startswith("host-")
    assert won[0].release()


def test_gives_up_when_the_lock_keeps_changing_hands(store, monkeypatch):
    from recsys.ranking import lock as lock_module

    _plant_lock(store, f"{HOST}:{_dead_pid()}", utc_now() - timedelta(minutes=1))
    # Every takeover loses the race to another process.
    monkeypatch.setattr(lock_module, "_take_over", lambda *args: False)
    with pytest.raises(RunLockedError, match="lock 'nightly' changed hands 5 times while being taken; try again"):
        acquire_lock(store)


def test_run_nightly_refuses_a_lock_that_is_not_the_held_nightly_lock(store, tmp_path):
    from recsys.ranking.nightly import run_nightly

    with acquire_lock(store, "train") as other:
        with pytest.raises(ValueError, match="must be the held 'nightly' lock, got 'train'"):
            run_nightly(store, model_dir=tmp_path, index_dir=tmp_path, lock=other)
    released = acquire_lock(store)
    released.release()
    with pytest.raises(ValueError, match="must be the held 'nightly' lock"):
        run_nightly(store, model_dir=tmp_path, index_dir=tmp_path, lock=released)
    assert read_lock(store) is None


def _plant_with_heartbeat(engine, holder, acquired_at, heartbeat_at):
    with engine.begin() as conn:
        conn.execute(insert(s.locks).values(name="nightly", holder=holder, run_id=None, acquired_at=acquired_at,
                                            heartbeat_at=heartbeat_at))


def test_the_holder_beats_a_heartbeat(store):
    with acquire_lock(store, heartbeat_every=timedelta(milliseconds=50)) as lock:
        deadline = time.monotonic() + 10
        while read_lock(store).heartbeat_at is None and time.monotonic() < deadline:
            time.sleep(0.05)
        first = read_lock(store).heartbeat_at
        assert first is not None and abs(utc_now() - first) < timedelta(seconds=10)
        time.sleep(0.3)
        assert read_lock(store).heartbeat_at > first
        assert lock.held and not lock.lost
    assert read_lock(store) is None


def test_a_recent_heartbeat_keeps_a_lock_from_another_host_alive(store, caplog):
    # Hours since it was taken and no shard written (a long ingest or encode), but beating.
    now = utc_now()
    beat = now - timedelta(minutes=1)
    _plant_with_heartbeat(store, "far-away:99", now - timedelta(hours=3), beat)
    # The message said "since <3 h ago> ... stale after 0:10:00", which read as stale already;
    # staleness runs from the last activity.
    with pytest.raises(RunLockedError) as refused:
        acquire_lock(store, stale_after=timedelta(minutes=10))
    assert f"since {now - timedelta(hours=3):%Y-%m-%d %H:%M:%S} UTC" in str(refused.value)
    assert (f"last activity {beat:%Y-%m-%d %H:%M:%S} UTC; a holder on another host counts as gone after 0:10:00 "
            f"without activity, so from {beat + timedelta(minutes=10):%Y-%m-%d %H:%M:%S} UTC") in str(refused.value)
    with store.begin() as conn:
        conn.execute(s.locks.update().values(heartbeat_at=now - timedelta(minutes=30)))
    with caplog.at_level(logging.WARNING, logger="recsys.ranking.lock"), acquire_lock(store, stale_after=timedelta(minutes=10)):
        assert "took over stale lock 'nightly' from far-away:99" in caplog.text


def test_a_lock_taken_over_is_known_lost_and_its_holder_writes_nothing(store):
    old = acquire_lock(store, holder="host-a:1", heartbeat_every=timedelta(hours=1))  # frozen: no beat
    new = acquire_lock(store, holder="host-b:2", stale_after=timedelta(0))  # judged it stale
    assert not old.lost  # it cannot know without asking the store
    with pytest.raises(LockLostError, match=r"lock 'nightly' is no longer held by host-a:1: host-b:2 took it over at"):
        old.check()
    assert old.lost
    with pytest.raises(LockLostError):
        old.attach_run(9)
    assert old.release() is False
    assert (read_lock(store).holder, read_lock(store).run_id) == ("host-b:2", None)
    new.check()
    new.release()
    with pytest.raises(LockLostError, match="it was released"):
        new.check()


def test_a_helper_process_sees_the_jobs_lock_lost_as_the_job_does(store):
    """``LockView``: what the index refresh's helper process checks before it writes."""
    import pickle

    from recsys.ranking.lock import LockView

    job = acquire_lock(store, holder="host-a:1", heartbeat_every=timedelta(hours=1))
    view = LockView(store, pickle.loads(pickle.dumps(job.state)))  # the state crosses to the helper
    view.check()
    acquire_lock(store, holder="host-b:2", stale_after=timedelta(0))
    with pytest.raises(LockLostError, match=r"lock 'nightly' is no longer held by host-a:1: host-b:2 took it over at"):
        view.check()
    with store.begin() as conn:
        conn.execute(s.locks.delete())
    with pytest.raises(LockLostError, match="its row was deleted"):
        view.check()


def test_the_heartbeat_notices_a_lock_cleared_by_hand(store, caplog, monkeypatch):
    from recsys.ranking import lock as lock_module

    # A slow logger (a loaded machine) must not let ``lost`` turn true before the reason is logged.
    log_error = lock_module.log.error

    def error_after_a_pause(*args, **kwargs):
        time.sleep(0.3)
        log_error(*args, **kwargs)

    monkeypatch.setattr(lock_module.log, "error", error_after_a_pause)
    with caplog.at_level(logging.ERROR, logger="recsys.ranking.lock"):
        lock = acquire_lock(store, heartbeat_every=timedelta(milliseconds=50))
        with store.begin() as conn:
            conn.execute(s.locks.delete())
        deadline = time.monotonic() + 10
        while not lock.lost and time.monotonic() < deadline:
            time.sleep(0.05)
    assert lock.lost
    assert "is no longer held by" in caplog.text
    with pytest.raises(LockLostError, match="its row was deleted"):
        lock.check()
    assert lock.release() is False


def test_a_release_that_fails_during_an_error_does_not_hide_the_error(store, monkeypatch, caplog):
    # A full disk failed the shard write, then the release: only the release's error was printed.
    from sqlalchemy.exc import OperationalError

    def full(self):  # as release() does: stop the heartbeat, then fail on the store
        self._stop.set()
        raise OperationalError("DELETE", {}, Exception("database or disk is full"))

    with pytest.raises(ValueError, match="the shard write failed"):
        with caplog.at_level(logging.ERROR, logger="recsys.ranking.lock"), acquire_lock(store):
            monkeypatch.setattr(StoreLock, "release", full)
            raise ValueError("the shard write failed")
    assert "could not release lock 'nightly' after an error (OperationalError" in caplog.text
    monkeypatch.undo()
    assert release_lock(store)  # it was left held, as after a crash


def test_a_release_that_loses_the_store_after_the_work_is_done_is_logged_not_raised(store, caplog):
    # The nightly job (after its run was complete and served) and `index build` (after its
    # save) exited 2 without their summary when the store dropped the connection at the release.
    from tests.lost_connection import connection_lost_at

    done = []
    with caplog.at_level(logging.WARNING, logger="recsys.ranking.lock"), connection_lost_at("DELETE FROM locks") as cut:
        with acquire_lock(store):
            done.append("the work")
    assert cut and done == ["the work"]
    assert re.search(r"could not release lock 'nightly' after the work was done \(StoreUnavailableError: lost the "
                     r"connection to the store at .*\); the next run takes it over as stale", caplog.text)
    assert read_lock(store).holder == current_holder()  # left held, as after a crash
    assert release_lock(store)


def test_a_lock_an_old_release_wrote_on_this_host_says_how_to_free_it(store):
    # Releases before the host key wrote `hostname:pid`; after an upgrade the lock of a killed
    # old job read as "another run is in progress" for 15 minutes with no hint (upgrade hunt).
    pid = _dead_pid()
    _plant_lock(store, f"{socket.gethostname()}:{pid}", utc_now() - timedelta(minutes=1))
    with pytest.raises(RunLockedError, match=rf"held by {socket.gethostname()}:{pid} .*counts as gone after 0:15:00 .*"
                                             r"as a recsys release before the key wrote it: if no recsys job runs on "
                                             r"this machine, .*`DELETE FROM locks WHERE name = 'nightly'` frees it now"):
        acquire_lock(store)
    _plant_lock(store, "far-away:99", utc_now() - timedelta(minutes=1), name="other")  # another host's: no hint
    with pytest.raises(RunLockedError) as refused:
        acquire_lock(store, "other")
    assert "release before the key" not in str(refused.value)


def test_a_sigterm_during_the_release_arrives_after_the_lock_is_gone(store):
    # Airflow's SIGTERM landing in the release's DELETE rolled it back: exit 2 with the lock
    # still held, so a retry on another host waited 15 minutes for it to go stale.
    import os
    import signal

    import sqlalchemy as sa

    from recsys.interrupts import Terminated, sigterm_unwinds

    def terminate_during_the_delete(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("DELETE FROM locks"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler would raise here, inside the statement

    sa.event.listen(store, "before_cursor_execute", terminate_during_the_delete)
    try:
        with sigterm_unwinds(), pytest.raises(Terminated):
            with acquire_lock(store):
                pass
    finally:
        sa.event.remove(store, "before_cursor_execute", terminate_during_the_delete)
    assert read_lock(store) is None
