"""Parquet export of a nightly run: one row per user and rank, for downstream systems."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import Engine

from recsys.columns import NEWS_ID, RANK, RUN_ID, SCORE, USER_ID
from recsys.errors import NotFoundError, RecsysError, disk_errors
from recsys.ranking.runs import COMPLETE, NIGHTLY, get_run, latest_run
from recsys.store.repository import iter_run_rows

EXPORT_SCHEMA = pa.schema([
    pa.field(RUN_ID, pa.int64(), nullable=False),
    pa.field(USER_ID, pa.string(), nullable=False),
    pa.field(RANK, pa.int16(), nullable=False),
    pa.field(NEWS_ID, pa.string(), nullable=False),
    pa.field(SCORE, pa.float64(), nullable=False),
    # The store's times are naive UTC; the file says so, or readers take them for local times.
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
])


def export_run(engine: Engine, out_dir: Path, *, run_id: int | None = None, chunk_rows: int = 200_000) -> Path:
    """Write a run's recommendations to ``out_dir/recommendations-run-<id>.parquet``.

    Rows are streamed from the store in chunks (memory bounded) into a temporary file that
    is renamed into place at the end, so a reader never sees a half-written export.

    Args:
        engine: the store.
        out_dir: folder to write into (created if missing).
        run_id: the run; defaults to the latest complete nightly run.
        chunk_rows: rows fetched and written per row group.

    Returns:
        The absolute path of the Parquet file (a scheduler runs the job in a temporary folder
        it deletes after, so a path relative to it would name nothing).

    Raises:
        NotFoundError: no such run, or no complete run when ``run_id`` is None, or the run was
            pruned between its lookup and the read (nothing is written then).
        DiskError: the disk is full or read-only (the message names the file).
        RecsysError: another system error writing the file (a folder in its place, no permission).
    """
    if run_id is None:
        latest = latest_run(engine)
        if latest is None:
            raise NotFoundError("no nightly run has completed yet: nothing to export")
        run_id = latest.run_id
    else:
        run = get_run(engine, run_id)
        if run.kind != NIGHTLY:  # an ingest or a training: it has no lists, not empty ones
            raise NotFoundError(f"run {run_id} is a{'n' if run.kind[0] in 'aeiou' else ''} {run.kind} run, not a nightly "
                                "run: only complete nightly runs have recommendations to export")
        if run.status != COMPLETE:
            raise NotFoundError(f"run {run_id} is {run.status}: only complete runs can be exported")
    out_dir = Path(out_dir).absolute()
    path = out_dir / f"recommendations-run-{run_id}.parquet"
    tmp = out_dir / f".{path.name}.{os.getpid()}.tmp"
    try:
        _write(engine, run_id, path, tmp, chunk_rows)
    except OSError as exc:  # a folder in the file's place, no permission: the operator's to fix, not a bug
        raise RecsysError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def _write(engine: Engine, run_id: int, path: Path, tmp: Path, chunk_rows: int) -> None:
    """``export_run``'s write: the rows into ``tmp``, then renamed to ``path``."""
    out_dir = path.parent
    written = 0
    with disk_errors("write", path):  # pyarrow's "[Errno 28] Error writing bytes to file" names none
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            with pq.ParquetWriter(tmp, EXPORT_SCHEMA) as writer:
                for df in iter_run_rows(engine, run_id, rows=chunk_rows):
                    df["created_at"] = df["created_at"].dt.tz_localize("UTC")
                    writer.write_table(pa.Table.from_pandas(df, schema=EXPORT_SCHEMA, preserve_index=False))
                    written += len(df)
            # The read is one statement, so it sees the run whole or not at all; none at all may be a
            # prune that committed after the lookup, and an empty file would publish empty lists.
            if written == 0 and (status := get_run(engine, run_id).status) != COMPLETE:
                raise NotFoundError(f"run {run_id} became {status} while it was exported (a newer run pruned it): "
                                    "nothing was written; export the latest run")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
