"""Rows of the ``runs`` table for steps other than the nightly job (ingest, train)."""

from __future__ import annotations

from contextlib import contextmanager

from sqlalchemy import Engine, insert, update

from recsys.store import schema as s
from recsys.versions import utcnow


@contextmanager
def recorded_run(engine: Engine, kind: str, *, model_version: str | None = None):
    """Insert a ``running`` row, yield a dict to fill with counts/timings, then mark it.

    The row ends ``complete`` or ``failed`` (with the error message); the error propagates.
    """
    with engine.begin() as conn:
        run_id = conn.execute(
            insert(s.runs).values(kind=kind, status="running", started_at=utcnow(), model_version=model_version, counts={}, timings={})
        ).inserted_primary_key[0]
    record: dict = {"run_id": run_id, "counts": {}, "timings": {}, "model_version": model_version}
    try:
        yield record
    except BaseException as exc:
        with engine.begin() as conn:
            conn.execute(
                update(s.runs).where(s.runs.c.run_id == run_id).values(
                    status="failed", finished_at=utcnow(), message=f"{type(exc).__name__}: {exc}"[:2000],
                    counts=record["counts"], timings=record["timings"],
                )
            )
        raise
    with engine.begin() as conn:
        conn.execute(
            update(s.runs).where(s.runs.c.run_id == run_id).values(
                status="complete", finished_at=utcnow(), counts=record["counts"], timings=record["timings"],
                model_version=record["model_version"],
            )
        )
