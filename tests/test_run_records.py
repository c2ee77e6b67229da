"""A standalone ingest holds the store's lock; runs whose process was killed do not stay
``running`` for ever (SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from datetime import timedelta

import pytest
from sqlalchemy import func, insert, select

from recsys.config import Workspace
from recsys.errors import RunLockedError
from recsys.pipelines.ingest import run_ingest
from recsys.pipelines.runlog import abandon_dead_runs, ingest_marks, ingests_since, recorded_run, running_runs
from recsys.ranking.lock import acquire_lock, current_holder, read_lock, this_host, utc_now
from recsys.store import ingest as store_ingest
from recsys.store import schema as s
from tests.lost_connection import connection_lost_at
from tests.signals import swallowed_sigterm

HOST = this_host()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from recsys.data.sample import generate_sample

    root = tmp_path_factory.mktemp("world")
    generate_sample(root, num_users=20, num_news=100, num_impressions=30, seed=5, image_size=32)
    return root


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant_run(engine, kind: str, holder: str | None, started_at=None) -> int:
    with engine.begin() as conn:
        return conn.execute(insert(s.runs).values(
            kind=kind, status="running", started_at=started_at or utc_now() - timedelta(minutes=5),
            counts={}, timings={}, holder=holder,
        )).inserted_primary_key[0]


def _runs(engine) -> dict[int, tuple]:
    r = s.runs.c
    with engine.connect() as conn:
        return {row.run_id: (row.kind, row.status, row.message) for row in conn.execute(select(r.run_id, r.kind, r.status, r.message))}


def _count(engine, table) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar()


def test_an_ingest_refuses_to_start_while_another_job_holds_the_lock(engine, world, tmp_path):
    """Two ingests at once would race on the same users' histories; one ranking night would
    read half of an ingest. The second job stops before it writes anything."""
    ws = Workspace(tmp_path / "ws").ensure()
    with acquire_lock(engine, holder="other-host:4242", run_id=9):  # a live job elsewhere
        with pytest.raises(RunLockedError, match=r"lock 'nightly' is held by other-host:4242 \(run 9\)"):
            run_ingest(engine, ws, news=world / "news.tsv", behaviors=world / "behaviors_train.tsv", images=None)
    assert _count(engine, s.news) == 0 and _count(engine, s.impressions) == 0
    assert _runs(engine) == {}  # refused before it recorded a run
    assert read_lock(engine) is None


def test_a_standalone_ingest_holds_the_lock_under_its_run_id_and_releases_it(engine, world, tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws").ensure()
    seen = []
    real_ingest = store_ingest.ingest

    def watched(eng, **kwargs):
        seen.append(read_lock(eng))
        return real_ingest(eng, **kwargs)

    monkeypatch.setattr(store_ingest, "ingest", watched)
    summary = run_ingest(engine, ws, news=world / "news.tsv", behaviors=world / "behaviors_train.tsv", images=None)
    assert summary["impressions"] == _count(engine, s.impressions) > 0
    (ingest_run,) = [run_id for run_id, (kind, status, _) in _runs(engine).items() if kind == "ingest" and status == "complete"]
    assert [(lk.holder, lk.run_id) for lk in seen] == [(current_holder(), ingest_run)]
    assert read_lock(engine) is None


def test_an_ingest_after_a_killed_one_takes_its_lock_and_marks_its_run_failed(engine, world, tmp_path):
    ws = Workspace(tmp_path / "ws").ensure()
    pid = _dead_pid()
    killed = _plant_run(engine, "ingest", f"{HOST}:{pid}")
    elsewhere = _plant_run(engine, "ingest", "other-host:17")  # its lock is gone: that process is too
    training = _plant_run(engine, "train", "other-host:18")  # not an ingest: left alone
    with engine.begin() as conn:
        conn.execute(insert(s.locks).values(name="nightly", holder=f"{HOST}:{pid}", run_id=killed, acquired_at=utc_now()))
    run_ingest(engine, ws, news=world / "news.tsv", behaviors=None, images=None)
    runs = _runs(engine)
    assert runs[killed][1] == "failed" and f"process {pid} no longer exists" in runs[killed][2]
    assert runs[elsewhere][1] == "failed" and "no process holds the store's lock" in runs[elsewhere][2]
    assert runs[training] == ("train", "running", None)
    assert sorted(status for kind, status, _ in runs.values() if kind == "ingest") == ["complete", "failed", "failed"]
    assert read_lock(engine) is None


def test_a_run_is_marked_failed_only_when_its_process_is_known_to_be_gone(engine):
    """Trainings take no lock (two may run at once): a row is abandoned when its process on
    this host is gone or its pid was reused since; a row from another host is left alone."""
    dead = _plant_run(engine, "train", f"{HOST}:{_dead_pid()}")
    reused = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        reused_run = _plant_run(engine, "train", f"{HOST}:{reused.pid}", started_at=utc_now() - timedelta(hours=1))
        alive = _plant_run(engine, "train", current_holder(), started_at=utc_now())  # this process, started before its run
        remote = _plant_run(engine, "train", "other-host:99")
        before_holders = _plant_run(engine, "train", None)  # written before runs recorded a holder
        ingest_run = _plant_run(engine, "ingest", f"{HOST}:{_dead_pid()}")
        assert sorted(abandon_dead_runs(engine, "train")) == sorted([dead, reused_run])
    finally:
        reused.kill()
        reused.wait()
    runs = _runs(engine)
    assert runs[dead][1] == "failed" and "no longer exists" in runs[dead][2]
    assert runs[reused_run][1] == "failed" and "started after the run started" in runs[reused_run][2]
    for run_id in (alive, remote, before_holders, ingest_run):
        assert runs[run_id][1] == "running"


def test_recorded_run_records_its_process_and_clears_dead_runs_of_its_kind(engine):
    dead = _plant_run(engine, "train", f"{HOST}:{_dead_pid()}")
    with recorded_run(engine, "train", model_version="v1") as record:
        pass
    r = s.runs.c
    with engine.connect() as conn:
        row = conn.execute(select(r.status, r.holder).where(r.run_id == record["run_id"])).one()
    assert tuple(row) == ("complete", f"{HOST}:{os.getpid()}")
    assert _runs(engine)[dead][1] == "failed"


def test_running_runs_lists_only_the_runs_whose_process_may_be_alive(engine):
    """A training started after a killed ingest was told an ingest was still running."""
    dead = _plant_run(engine, "ingest", f"{HOST}:{_dead_pid()}")
    remote = _plant_run(engine, "ingest", "other-host:99")
    _plant_run(engine, "train", "other-host:98")  # another kind
    assert [run_id for run_id, *_ in running_runs(engine, "ingest")] == [remote]
    assert _runs(engine)[dead][1] == "failed"


def test_ingests_since_names_those_running_at_the_marks_and_those_started_after(engine):
    """An ingest still writing when a read began wrote during it, as one started later did;
    one that ended before the marks did not."""
    with recorded_run(engine, "ingest"):
        pass
    earlier = _plant_run(engine, "ingest", "other-host:97")  # running at the marks (another host: left alone)
    marks = ingest_marks(engine)
    _plant_run(engine, "train", "other-host:96")
    later = _plant_run(engine, "ingest", "other-host:95")
    assert [run_id for run_id, *_ in ingests_since(engine, marks)] == [earlier, later]


def test_a_failed_run_keeps_the_counts_and_timings_it_filled_and_its_error(engine):
    """What a run did before it failed (rows ingested, seconds spent) is what the operator
    needs to judge a retry: the failed row keeps it, as the complete row would."""
    with pytest.raises(ValueError, match="disk on fire"):
        with recorded_run(engine, "train", model_version="v1") as record:
            record["counts"]["impressions"] = 7
            record["timings"]["read"] = 1.5
            raise ValueError("disk on fire")
    r = s.runs.c
    with engine.connect() as conn:
        row = conn.execute(select(r.status, r.counts, r.timings, r.message).where(r.run_id == record["run_id"])).one()
    assert (row.status, row.counts, row.timings) == ("failed", {"impressions": 7}, {"read": 1.5})
    assert "disk on fire" in row.message


def test_a_store_that_fails_the_failed_mark_does_not_replace_the_runs_own_error(engine, monkeypatch, caplog):
    """The run's error is what the operator must see; the store failing as well (it went away)
    is logged beside it, and the run is left running for a later run to abandon."""
    from sqlalchemy.exc import OperationalError

    from recsys.pipelines import runlog

    def store_gone(*args, **kwargs):
        raise OperationalError("UPDATE runs ...", {}, Exception("server closed the connection unexpectedly"))

    with pytest.raises(ValueError, match="the run's own error"):
        with recorded_run(engine, "train") as record:
            monkeypatch.setattr(runlog, "update", store_gone)
            raise ValueError("the run's own error")
    assert _runs(engine)[record["run_id"]][1] == "running"
    assert f"could not mark train run {record['run_id']} failed (OperationalError" in caplog.text
    assert "server closed the connection unexpectedly" in caplog.text


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_mid_ingest_releases_the_lock_and_fails_the_run(engine, world, tmp_path, monkeypatch, capsys, signum):
    """Airflow's timeout sends SIGTERM: the process died holding the lock, so a retry on another
    host was refused for 15 minutes (until the lock went stale). Now it unwinds like Ctrl-C. So
    does SIGHUP (an operator's ssh session dropping during a manual run), which left the lock
    and a run 'running' behind."""
    import time

    from recsys.cli import main

    real_ingest = store_ingest.ingest

    def terminated_midway(eng, **kwargs):
        assert read_lock(eng) is not None  # held while ingesting
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises at the next bytecode, long before this ends
        return real_ingest(eng, **kwargs)

    monkeypatch.setattr(store_ingest, "ingest", terminated_midway)
    before = signal.getsignal(signum)
    code = main(["--workspace", str(tmp_path / "ws"), "--db", str(engine.url.render_as_string(hide_password=False)),
                 "ingest", "--news", str(world / "news.tsv"), "--behaviors", str(world / "behaviors_train.tsv")])
    assert (code, capsys.readouterr().err.strip().splitlines()[-1]) == (2, f"terminated ({signum.name})")
    assert read_lock(engine) is None
    ((kind, status, message),) = _runs(engine).values()
    assert (kind, status, message) == ("ingest", "failed", "Terminated")  # not "Terminated: "
    assert _count(engine, s.news) == 0
    assert signal.getsignal(signum) == before  # main() leaves the process's handler as it was


def test_a_sigterm_that_a_library_swallowed_still_stops_the_ingest(engine, world, tmp_path, monkeypatch, capsys):
    # An exception raised by the SIGTERM handler can be swallowed where it lands (Cython's
    # module set-up in `import ray` does): the job went on as if never terminated.
    from recsys.cli import main

    real_ingest = store_ingest.ingest

    def swallowed_then_ingest(eng, **kwargs):
        swallowed_sigterm()
        return real_ingest(eng, **kwargs)

    monkeypatch.setattr(store_ingest, "ingest", swallowed_then_ingest)
    code = main(["--workspace", str(tmp_path / "ws"), "--db", str(engine.url.render_as_string(hide_password=False)),
                 "ingest", "--news", str(world / "news.tsv"), "--behaviors", str(world / "behaviors_train.tsv")])
    assert (code, capsys.readouterr().err.strip().splitlines()[-1]) == (2, "terminated (SIGTERM)")
    assert read_lock(engine) is None and _count(engine, s.news) == 0
    ((kind, status, _),) = _runs(engine).values()
    assert (kind, status) == ("ingest", "failed")


def test_an_ingest_that_loses_the_store_mid_way_exits_1_naming_it_and_records_the_same_line(engine, world, tmp_path, capsys):
    # It exited 2 with psycopg's text, 20 lines of SQL and SQLAlchemy's link, which runs.message kept.
    from recsys.cli import main
    from recsys.store.database import mask_url

    url = engine.url.render_as_string(hide_password=False)
    with connection_lost_at("SELECT users.user_id, users.history_at") as cut:
        code = main(["--workspace", str(tmp_path / "ws"), "--db", url, "ingest", "--news", str(world / "news.tsv"),
                     "--behaviors", str(world / "behaviors_train.tsv")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert cut and code == 1
    assert re.fullmatch(rf"error: lost the connection to the store at {re.escape(mask_url(engine.url))} \([^)]+\): what "
                        r"was committed is kept; run the command again once the store answers \(.*\)", last)
    ((kind, status, message),) = _runs(engine).values()
    assert (kind, status, message) == ("ingest", "failed", "StoreUnavailableError: " + last.removeprefix("error: "))
    assert read_lock(engine) is None and _count(engine, s.impressions) == 0


@pytest.mark.parametrize("drops", [1, 2])
def test_an_ingest_whose_complete_mark_loses_the_store_keeps_its_data_and_says_so(engine, world, tmp_path, caplog, drops):
    # Everything was committed, yet the ingest exited 2 and its run stayed 'running' (later
    # abandoned with empty counts). Once: tried again on a fresh connection; twice: logged.
    ws = Workspace(tmp_path / "ws").ensure()
    with connection_lost_at("UPDATE runs SET status", times=drops) as cut:
        summary = run_ingest(engine, ws, news=world / "news.tsv", behaviors=world / "behaviors_train.tsv", images=None)
    assert len(cut) == drops
    assert summary["impressions"] == _count(engine, s.impressions) > 0
    ((run_id, (kind, status, _)),) = _runs(engine).items()
    assert "marking it complete lost the store's connection; trying again" in caplog.text
    if drops == 1:
        assert status == "complete"
    else:
        assert status == "running"
        assert re.search(rf"ingest run {run_id}: everything it wrote is stored, but the run could not be marked complete "
                         r"\(StoreUnavailableError: lost the connection", caplog.text)
    assert read_lock(engine) is None


def test_a_bug_in_marking_a_run_complete_is_raised_not_logged_as_a_store_failure(engine):
    # Only a store that fails is left to the next run: a count the JSON column cannot take was
    # logged as "could not be marked complete" and the command exited 0, its run left running.
    import numpy as np
    import sqlalchemy as sa

    with pytest.raises((sa.exc.StatementError, TypeError), match="not JSON serializable"):  # psycopg: TypeError
        with recorded_run(engine, "ingest") as record:
            record["counts"] = {"impressions": np.int64(5)}
    ((kind, status, _),) = _runs(engine).values()
    assert (kind, status) == ("ingest", "running")
