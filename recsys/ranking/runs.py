"""Nightly runs in the store: create, resume, write shards, switch atomically, prune, read.

A run's recommendations become visible only when the run's status turns ``complete``; that
update is a single statement in its own transaction, so readers (who always pick the latest
complete nightly run) switch from the old run to the new one at once. Each shard's
recommendations and its ``run_shards`` row are written in one transaction, so a run killed at
any moment holds whole shards only, and a rerun resumes the shards that are missing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from datetime import datetime

import pandas as pd
from sqlalchemy import Engine, and_, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from recsys.columns import CATEGORY, NEWS_ID, RANK, RUN_ID, SCORE, TITLE, USER_ID
from recsys.config import MAX_RANK
from recsys.errors import ConfigError, NotFoundError, StoreError
from recsys.ranking.lock import current_holder, utc_now
from recsys.store import schema as s
from recsys.store.bulk import bulk_writer
from recsys.store.database import write_transaction

NIGHTLY = "nightly"
RUNNING = "running"
COMPLETE = "complete"
FAILED = "failed"
# A complete run whose recommendations were deleted to keep the table small; its row stays as history.
PRUNED = "pruned"

RECOMMENDATION_COLUMNS = (USER_ID, RANK, NEWS_ID, SCORE)
# The stored row of one recommendation, in the order write_shard builds it.
_ROW_COLUMNS = ("run_id", "user_id", "rank", "news_id", "score", "created_at")


@dataclass(frozen=True)
class RunInfo:
    """One row of ``runs``.

    Attributes:
        run_id: the run's id.
        kind: "nightly" here.
        status: running | complete | failed | pruned.
        started_at / finished_at: naive UTC times.
        model_version: the model version that scored the run.
        counts: JSON counts; ``counts["plan"]`` holds the inputs the run was started with.
        timings: seconds per stage.
        message: why a run failed, if it did.
    """

    run_id: int
    kind: str
    status: str
    started_at: datetime | None
    finished_at: datetime | None
    model_version: str | None
    counts: dict
    timings: dict
    message: str | None

    @property
    def plan(self) -> dict:
        return dict(self.counts.get("plan", {}))


def plan_fingerprint(plan: dict) -> str:
    """A stable hash of a run's inputs: a rerun resumes a run only when they are identical."""
    text = json.dumps(plan, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def fingerprinted(plan: dict) -> dict:
    """``plan`` with its ``fingerprint``, as ``create_run`` stores it (one given is recomputed)."""
    return {**plan, "fingerprint": plan_fingerprint({k: v for k, v in plan.items() if k != "fingerprint"})}


def create_run(engine: Engine, *, model_version: str | None, plan: dict, started_at: datetime | None = None) -> int:
    """Insert a nightly run with status "running".

    Args:
        engine: the store.
        model_version: version of the model that scores the run.
        plan: JSON-able inputs of the run (as-of time, windows, k, shard count, ...); stored
            with its fingerprint under ``counts["plan"]`` so a rerun can find it.
        started_at: defaults to now (UTC).

    Returns:
        The new run id.
    """
    plan = fingerprinted(plan)
    with write_transaction(engine) as conn:
        result = conn.execute(
            insert(s.runs).values(
                kind=NIGHTLY, status=RUNNING, started_at=started_at or utc_now(), model_version=model_version,
                counts={"plan": plan}, timings={}, holder=current_holder(),
            )
        )
        return int(result.inserted_primary_key[0])


def get_run(engine: Engine, run_id: int) -> RunInfo:
    """The run with this id.

    Raises:
        NotFoundError: no such run.
    """
    with engine.connect() as conn:
        row = conn.execute(select(s.runs).where(s.runs.c.run_id == run_id)).mappings().first()
    if row is None:
        raise NotFoundError(f"run {run_id} does not exist")
    return _run_info(row)


def find_resumable_run(engine: Engine, plan: dict) -> RunInfo | None:
    """The latest running nightly run started with the same inputs, or None.

    Only the newest running run is considered: an older one was already superseded.
    """
    r = s.runs.c
    with engine.connect() as conn:
        row = conn.execute(
            select(s.runs).where(and_(r.kind == NIGHTLY, r.status == RUNNING)).order_by(r.run_id.desc()).limit(1)
        ).mappings().first()
    return _if_same_inputs(None if row is None else _run_info(row), plan)


def find_completed_run(engine: Engine, plan: dict) -> RunInfo | None:
    """The latest complete nightly run (the one readers see) when it was started with the same
    inputs, or None: a retry of a night already done, which would rank the same lists again."""
    return _if_same_inputs(latest_run(engine), plan)


def _if_same_inputs(info: RunInfo | None, plan: dict) -> RunInfo | None:
    fingerprint = fingerprinted(plan)["fingerprint"]
    return info if info is not None and info.plan.get("fingerprint") == fingerprint else None


def abandon_running_runs(engine: Engine, *, keep_run_id: int | None, message: str) -> list[int]:
    """Mark every other running nightly run failed and delete its recommendations.

    Called under the nightly lock, so no live process is writing those runs.

    Returns:
        The ids of the runs abandoned.
    """
    r = s.runs.c
    with write_transaction(engine) as conn:
        ids = conn.execute(
            select(r.run_id).where(and_(r.kind == NIGHTLY, r.status == RUNNING, r.run_id != (keep_run_id or -1)))
        ).scalars().all()
        for run_id in ids:
            _delete_run_rows(conn, run_id)
            conn.execute(
                update(s.runs).where(r.run_id == run_id).values(status=FAILED, finished_at=utc_now(), message=message)
            )
    return list(ids)


def finished_shards(engine: Engine, run_id: int) -> dict[int, tuple[int, int]]:
    """Shards of the run already written: shard -> (num_users, num_recommendations)."""
    rs = s.run_shards.c
    with engine.connect() as conn:
        rows = conn.execute(select(rs.shard, rs.num_users, rs.num_recommendations).where(rs.run_id == run_id)).all()
    return {int(row.shard): (int(row.num_users), int(row.num_recommendations)) for row in rows}


def write_shard(
    engine: Engine,
    run_id: int,
    shard: int,
    recommendations: pd.DataFrame,
    *,
    num_users: int,
    created_at: datetime | None = None,
) -> bool:
    """Write a shard's recommendations and its ``run_shards`` row in one transaction.

    Idempotent: a shard already written is left alone (its ``run_shards`` row is the key),
    so a retried or duplicated shard can never produce duplicate rows.

    Args:
        engine: the store.
        run_id: a running nightly run.
        shard: shard number.
        recommendations: DataFrame with USER_ID, RANK (1-based), NEWS_ID, SCORE.
        num_users: users in the shard (including those that got no recommendation).
        created_at: timestamp of the rows; defaults to now (UTC).

    Returns:
        True when written, False when the shard had already been written.

    Raises:
        StoreError: the run does not exist or is not running any more, a column is missing,
            or two rows share a (user, rank).
    """
    missing = [c for c in RECOMMENDATION_COLUMNS if c not in recommendations.columns]
    if missing:
        raise StoreError(f"shard {shard} of run {run_id}: recommendations lack columns {missing}")
    created_at = created_at or utc_now()
    # Plain tuples for the driver (bulk_writer): SQLAlchemy's per-row parameter processing
    # took two thirds of a shard's write.
    rows = list(zip(
        itertools.repeat(run_id), map(str, recommendations[USER_ID].tolist()), map(int, recommendations[RANK].tolist()),
        map(str, recommendations[NEWS_ID].tolist()), map(float, recommendations[SCORE].tolist()),
        itertools.repeat(created_at),
    ))
    r = s.runs.c
    try:
        with write_transaction(engine) as conn:
            status = conn.execute(select(r.status).where(r.run_id == run_id)).scalar()
            if status != RUNNING:
                raise StoreError(f"run {run_id} is {status or 'missing'}, not running: shard {shard} not written")
            # The shard row goes first: a concurrent writer of the same shard fails on its key.
            conn.execute(
                insert(s.run_shards).values(
                    run_id=run_id, shard=shard, num_users=num_users, num_recommendations=len(rows),
                    finished_at=utc_now(),
                )
            )
            bulk_writer(conn).insert(s.recommendations, _ROW_COLUMNS, rows)
    except IntegrityError as exc:
        if shard in finished_shards(engine, run_id):
            return False
        raise StoreError(
            f"shard {shard} of run {run_id}: rows break the key (run_id, user_id, rank) - a user got a rank twice"
        ) from exc
    return True


def complete_run(engine: Engine, run_id: int, *, counts: dict, timings: dict, num_shards: int) -> None:
    """The atomic switch: the run becomes the one readers see, with its counts and timings.

    Raises:
        StoreError: the run is not running, or not all of its shards are written.
    """
    r, rs = s.runs.c, s.run_shards.c
    with write_transaction(engine) as conn:
        row = conn.execute(select(r.status, r.counts).where(r.run_id == run_id)).first()
        if row is None or row.status != RUNNING:
            raise StoreError(f"run {run_id} is {row.status if row else 'missing'}, cannot complete it")
        done = conn.execute(select(func.count()).select_from(s.run_shards).where(rs.run_id == run_id)).scalar()
        if done != num_shards:
            raise StoreError(f"run {run_id} has {done} of {num_shards} shards written, cannot complete it")
        merged = {**counts, "plan": dict(row.counts or {}).get("plan", {})}
        conn.execute(
            update(s.runs).where(and_(r.run_id == run_id, r.status == RUNNING))
            .values(status=COMPLETE, finished_at=utc_now(), counts=merged, timings=timings)
        )


def record_timings(engine: Engine, run_id: int, timings: dict) -> None:
    """Replace a run's timings (the final ones, taken after the switch and the prune)."""
    with write_transaction(engine) as conn:
        conn.execute(update(s.runs).where(s.runs.c.run_id == run_id).values(timings=timings))


def users_with_recommendations(engine: Engine, run_id: int) -> int:
    """How many users the run wrote at least one recommendation for."""
    rec = s.recommendations.c
    with engine.connect() as conn:
        return int(conn.execute(select(func.count(rec.user_id.distinct())).where(rec.run_id == run_id)).scalar())


def fail_run(engine: Engine, run_id: int, message: str) -> None:
    """Mark a run failed with the reason; its rows are removed by the next prune."""
    r = s.runs.c
    with write_transaction(engine) as conn:
        conn.execute(
            update(s.runs).where(and_(r.run_id == run_id, r.status == RUNNING))
            .values(status=FAILED, finished_at=utc_now(), message=message[:2000])
        )


def prune_runs(engine: Engine, keep_runs: int) -> list[int]:
    """Delete the recommendations of complete nightly runs beyond the newest ``keep_runs``.

    The pruned runs keep their ``runs`` row (status "pruned") as history. Rows of failed runs
    older than the latest complete run are deleted too.

    Returns:
        The ids of the runs whose recommendations were deleted.

    Raises:
        ConfigError: ``keep_runs`` < 1 (readers always need the latest run).
    """
    if keep_runs < 1:
        raise ConfigError(f"nightly.keep_runs is {keep_runs}, expected at least 1")
    r = s.runs.c
    with write_transaction(engine) as conn:
        complete = conn.execute(
            select(r.run_id).where(and_(r.kind == NIGHTLY, r.status == COMPLETE)).order_by(r.run_id.desc())
        ).scalars().all()
        old = list(complete[keep_runs:])
        failed = []
        if complete:
            failed = conn.execute(
                select(r.run_id).where(and_(r.kind == NIGHTLY, r.status == FAILED, r.run_id < complete[0]))
            ).scalars().all()
        for run_id in old + list(failed):
            _delete_run_rows(conn, run_id)
        if old:
            conn.execute(update(s.runs).where(r.run_id.in_(old)).values(status=PRUNED))
    return sorted(old)


def latest_run(engine: Engine) -> RunInfo | None:
    """The latest complete nightly run: the one readers see. None before the first run."""
    r = s.runs.c
    with engine.connect() as conn:
        row = conn.execute(
            select(s.runs).where(and_(r.kind == NIGHTLY, r.status == COMPLETE)).order_by(r.run_id.desc()).limit(1)
        ).mappings().first()
    return None if row is None else _run_info(row)


def recommendations_for_user(engine: Engine, user_id: str, k: int = 10) -> pd.DataFrame:
    """The latest complete run's list for a user, best first.

    One query reads the run id and the rows together, so a run switching in between cannot
    mix two runs.

    Args:
        engine: the store.
        user_id: the user.
        k: at most this many rows.

    Returns:
        DataFrame with RANK, NEWS_ID, TITLE, CATEGORY, SCORE (empty for a known user the run
        gave nothing to); ``attrs["run_id"]`` names the run.

    Raises:
        ConfigError: k < 1.
        NotFoundError: the user is unknown (no recommendations and not in ``users``), or no
            nightly run has completed yet.
    """
    if k < 1:
        raise ConfigError(f"k is {k}, expected at least 1")
    k = min(k, MAX_RANK)  # ranks are small integers: a larger k asks for the whole list
    r, rec, n = s.runs.c, s.recommendations.c, s.news.c
    latest = (
        select(func.max(r.run_id)).where(and_(r.kind == NIGHTLY, r.status == COMPLETE)).scalar_subquery()
    )
    query = (
        select(rec.run_id, rec.rank, rec.news_id, n.title, n.category, rec.score)
        .select_from(s.recommendations.outerjoin(s.news, n.news_id == rec.news_id))
        .where(and_(rec.run_id == latest, rec.user_id == user_id, rec.rank <= k))
        .order_by(rec.rank)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
        if not rows:
            known = conn.execute(select(s.users.c.user_id).where(s.users.c.user_id == user_id)).first()
            run_id = conn.execute(select(latest)).scalar()
    frame = pd.DataFrame(
        [(int(x.rank), x.news_id, x.title, x.category, float(x.score)) for x in rows],
        columns=[RANK, NEWS_ID, TITLE, CATEGORY, SCORE],
    )
    if rows:
        frame.attrs[RUN_ID] = int(rows[0].run_id)
        return frame
    if known is None:
        raise NotFoundError(f"user {user_id!r} is unknown: not in the store and no recommendations")
    if run_id is None:
        raise NotFoundError("no nightly run has completed yet: run `recsys nightly` first")
    frame.attrs[RUN_ID] = int(run_id)
    return frame


def run_summary(engine: Engine, run_id: int) -> dict:
    """What a run did: status, times, model version, counts, timings and rows in the store.

    Raises:
        NotFoundError: no such run.
    """
    info = get_run(engine, run_id)
    with engine.connect() as conn:
        shards = conn.execute(
            select(func.count()).select_from(s.run_shards).where(s.run_shards.c.run_id == run_id)
        ).scalar()
        stored = conn.execute(
            select(func.count()).select_from(s.recommendations).where(s.recommendations.c.run_id == run_id)
        ).scalar()
    return summary_of(info, shards_written=int(shards), recommendations_stored=int(stored))


def summary_of(info: RunInfo, *, shards_written: int | None, recommendations_stored: int | None) -> dict:
    """``run_summary``'s dict of a run row and its counts of rows (times None where unknown)."""
    def shown(when: datetime | None) -> str | None:
        return when.isoformat(sep=" ", timespec="seconds") if when else None

    return {
        "run_id": info.run_id,
        "kind": info.kind,
        "status": info.status,
        "started_at": shown(info.started_at),
        "finished_at": shown(info.finished_at),
        "model_version": info.model_version,
        "counts": {k: v for k, v in info.counts.items() if k != "plan"},
        "plan": info.plan,
        "timings": info.timings,
        "shards_written": shards_written,
        "recommendations_stored": recommendations_stored,
        "message": info.message,
    }


def _delete_run_rows(conn, run_id: int) -> None:
    # Explicit deletes: SQLite only cascades when foreign keys are switched on.
    conn.execute(delete(s.recommendations).where(s.recommendations.c.run_id == run_id))
    conn.execute(delete(s.run_shards).where(s.run_shards.c.run_id == run_id))


def _run_info(row) -> RunInfo:
    return RunInfo(
        run_id=int(row["run_id"]), kind=row["kind"], status=row["status"], started_at=row["started_at"],
        finished_at=row["finished_at"], model_version=row["model_version"], counts=dict(row["counts"] or {}),
        timings=dict(row["timings"] or {}), message=row["message"],
    )
