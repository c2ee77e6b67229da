"""Rows of the ``runs`` table for steps other than the nightly job (ingest, train)."""

from __future__ import annotations

import logging
from contextlib import contextmanager

from sqlalchemy import Engine, and_, func, insert, or_, select, update

from recsys.errors import StoreUnavailableError
from recsys.ranking.lock import current_holder, local_process_gone
from recsys.store import schema as s
from recsys.store.database import STORE_FAILURES, failure_message, write_transaction
from recsys.clock import utc_now

log = logging.getLogger(__name__)


@contextmanager
def recorded_run(engine: Engine, kind: str, *, model_version: str | None = None, exclusive: bool = False):
    """Insert a ``running`` row, yield a dict to fill with counts/timings, then mark it.

    The row ends ``complete`` or ``failed`` (with the error message); the error propagates.
    First, runs of the same kind left ``running`` by a process that is gone are marked
    failed (see ``abandon_dead_runs``); ``exclusive``: the caller holds the store's lock
    for this kind of run, so every other ``running`` row of it is dead, on any host.

    When the work is done but the store fails the ``complete`` update (a lost connection is
    tried again once, on a fresh connection), that is logged and the work stands: it is stored.
    """
    abandon_dead_runs(engine, kind, every=exclusive)
    with engine.begin() as conn:
        run_id = conn.execute(
            insert(s.runs).values(
                kind=kind, status="running", started_at=utc_now(), model_version=model_version, counts={}, timings={},
                holder=current_holder(),
            )
        ).inserted_primary_key[0]
    record: dict = {"run_id": run_id, "counts": {}, "timings": {}, "model_version": model_version}
    try:
        yield record
    except BaseException as exc:
        try:
            with engine.begin() as conn:
                conn.execute(
                    update(s.runs).where(s.runs.c.run_id == run_id).values(
                        status="failed", finished_at=utc_now(), message=failure_message(exc, engine),
                        counts=record["counts"], timings=record["timings"],
                    )
                )
        except Exception as unrecorded:  # noqa: BLE001 - the store itself fails (it went away): keep the cause
            log.error("could not mark %s run %s failed (%s: %s); it stays running until a later run finds this "
                      "process gone", kind, run_id, type(unrecorded).__name__, unrecorded)
        raise
    _mark_complete(engine, kind, record)


def _mark_complete(engine: Engine, kind: str, record: dict) -> None:
    """Mark the run complete. Its work is committed by now, so a store that fails this (the
    connection lost, twice) is logged, not raised: the command did what it was asked to."""
    values = {"status": "complete", "finished_at": utc_now(), "counts": record["counts"], "timings": record["timings"],
              "model_version": record["model_version"]}
    for attempt in (1, 2):
        try:
            with engine.begin() as conn:
                # The same values again if the first try's commit landed before its connection dropped.
                conn.execute(update(s.runs).where(s.runs.c.run_id == record["run_id"]).values(**values))
            return
        except StoreUnavailableError as exc:
            failure = exc
            if attempt == 1:  # the pool has dropped the dead connection: the next one is fresh
                log.warning("%s run %s: marking it complete lost the store's connection; trying again", kind,
                            record["run_id"])
        except STORE_FAILURES as exc:
            failure = exc
            break
    log.error("%s run %s: everything it wrote is stored, but the run could not be marked complete (%s: %s); it stays "
              "running until a later %s run marks it abandoned", kind, record["run_id"], type(failure).__name__, failure,
              kind)


def abandon_dead_runs(engine: Engine, kind: str, *, every: bool = False) -> list[int]:
    """Mark failed the ``running`` runs of ``kind`` whose process was killed before it could
    record an outcome (``kill -9``, the out-of-memory killer, a reboot).

    A run is known dead when its process, on this host, is gone; a run from another host is
    left alone (this host cannot tell) unless ``every``, which the holder of the lock that
    runs of this kind take passes: no other run of the kind can be alive then.

    Returns:
        The ids of the runs marked failed.
    """
    return _sweep_running(engine, kind, every=every)[0]


def running_runs(engine: Engine, kind: str) -> list[tuple[int, str | None, object]]:
    """``(run_id, holder, started_at)`` of the runs of ``kind`` still running, after those of
    dead processes on this host are marked failed (``abandon_dead_runs``)."""
    return _sweep_running(engine, kind, every=False)[1]


def ingest_marks(engine: Engine) -> tuple[list[int], int]:
    """``(ids of the ingest runs running now, the highest ingest run id)``, to tell afterwards
    which ingests ran during a read (``ingests_since``) without comparing two hosts' clocks."""
    r = s.runs.c
    with engine.connect() as conn:
        running = conn.execute(
            select(r.run_id).where(and_(r.kind == "ingest", r.status == "running")).order_by(r.run_id)).scalars().all()
        highest = conn.execute(select(func.max(r.run_id)).where(r.kind == "ingest")).scalar()
    return [int(i) for i in running], int(highest or 0)


def ingests_since(engine: Engine, marks: tuple[list[int], int]) -> list[tuple[int, str | None, object]]:
    """``(run_id, holder, started_at)`` of the ingest runs that ran at some time since
    ``marks`` (``ingest_marks``) were taken: those running then, and those started after."""
    running, highest = marks
    r = s.runs.c
    with engine.connect() as conn:
        rows = conn.execute(
            select(r.run_id, r.holder, r.started_at)
            .where(and_(r.kind == "ingest", or_(r.run_id > highest, r.run_id.in_(running))))
            .order_by(r.run_id)
        ).all()
    return [(int(row.run_id), row.holder, row.started_at) for row in rows]


def last_run(engine: Engine, kind: str) -> tuple[int, str, str | None, dict] | None:
    """``(run_id, status, message, counts)`` of the latest run of ``kind``, or None."""
    r = s.runs.c
    with engine.connect() as conn:
        row = conn.execute(
            select(r.run_id, r.status, r.message, r.counts).where(r.kind == kind).order_by(r.run_id.desc()).limit(1)
        ).first()
    return None if row is None else (int(row.run_id), row.status, row.message, row.counts or {})


def _sweep_running(engine: Engine, kind: str, *, every: bool) -> tuple[list[int], list[tuple[int, str | None, object]]]:
    """``abandon_dead_runs``'s work in one read of the running rows: ``(ids marked failed,
    (run_id, holder, started_at) of the others, by run id)``."""
    r = s.runs.c
    with write_transaction(engine) as conn:
        rows = conn.execute(
            select(r.run_id, r.holder, r.started_at).where(and_(r.kind == kind, r.status == "running")).order_by(r.run_id)
        ).all()
        dead = {}
        for row in rows:
            reason = local_process_gone(row.holder, row.started_at, since_what="the run started") if row.holder else None
            if reason is None and every:
                reason = f"no process holds the store's lock for {kind} runs any more"
            if reason is not None:
                dead[row.run_id] = reason
        for run_id, reason in dead.items():
            conn.execute(
                update(s.runs).where(and_(r.run_id == run_id, r.status == "running")).values(
                    status="failed", finished_at=utc_now(),
                    message=f"abandoned: {reason}, and the run recorded no outcome (killed?)",
                )
            )
    for run_id, reason in dead.items():
        log.warning("%s run %d marked failed: %s before it recorded an outcome", kind, run_id, reason)
    alive = [(int(row.run_id), row.holder, row.started_at) for row in rows if row.run_id not in dead]
    return list(dead), alive

