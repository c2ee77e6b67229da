"""The nightly run's store I/O: writing its shards of recommendations, and the Parquet export.

The nightly job writes each shard's top-k lists in one transaction (``runs.write_shard``) and
``recsys nightly --export DIR`` then streams the run back out into Parquet
(``ranking.export.export_run``). At 4x MIND-small (190k users, k = 10) that is 1.9M rows each
way. This benchmark writes a run of ``--users`` users with ``--k`` recommendations each in
shards of ``--shard-size`` users into a fresh store (a temporary SQLite file, or a fresh
PostgreSQL database that is dropped afterwards), completes it, exports it, and checks that the
export holds every row. Users, articles and scores are random draws: the costs do not depend on them.

    .venv/bin/python benchmarks/bench_run_io.py --users 190000 --out benchmarks/results/run_io_sqlite.json
    .venv/bin/python benchmarks/bench_run_io.py --users 190000 --backend postgresql \\
        --out benchmarks/results/run_io_postgresql.json

Prints the figures and writes them to ``--out`` (default benchmarks/results/run_io_sqlite.json).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from bench_train_data import StagePeak, _mb, write_results  # benchmarks/ is on sys.path when run as a script

RESULTS = Path(__file__).resolve().parent / "results" / "run_io_sqlite.json"


@contextlib.contextmanager
def fresh_store(backend: str, folder: Path, pg_url: str):
    """A migrated, empty store; yields its URL (a PostgreSQL database is dropped afterwards)."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    if backend == "sqlite":
        yield f"sqlite:///{folder / 'store.db'}"
        return
    name = f"recsys_bench_{uuid.uuid4().hex[:8]}"
    server = make_url(pg_url).set(drivername="postgresql+psycopg")
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"), {"d": name})
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def shard_frames(num_users: int, k: int, shard_size: int, num_news: int, seed: int):
    """Each shard's recommendations, as the nightly's workers hand them to ``write_shard``."""
    from recsys.columns import NEWS_ID, RANK, SCORE, USER_ID

    rng = np.random.default_rng(seed)
    for start in range(0, num_users, shard_size):
        users = np.arange(start, min(start + shard_size, num_users))
        news = np.stack([rng.choice(num_news, k, replace=False) for _ in users])
        scores = np.sort(rng.random((len(users), k)))[:, ::-1]
        yield len(users), pd.DataFrame({
            USER_ID: np.repeat([f"U{u}" for u in users], k),
            RANK: np.tile(np.arange(1, k + 1, dtype=np.int16), len(users)),
            NEWS_ID: [f"N{n}" for n in news.ravel()],
            SCORE: scores.ravel(),
        })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=190_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--shard-size", type=int, default=2000, help="users per shard (the nightly's default)")
    parser.add_argument("--news", type=int, default=65_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test",
                        help="the server (and a database to connect to) for --backend postgresql")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from recsys.ranking import runs
    from recsys.ranking.export import export_run
    from recsys.store.database import open_store

    sampler = StagePeak()
    with tempfile.TemporaryDirectory(prefix="bench_run_io_") as tmp, fresh_store(args.backend, Path(tmp), args.pg_url) as url:
        engine = open_store(url)
        run_id = runs.create_run(engine, model_version="bench", plan={"k": args.k})
        write_s = make_s = 0.0
        rows = 0
        frames = shard_frames(args.users, args.k, args.shard_size, args.news, args.seed)
        for shard in range(-(-args.users // args.shard_size)):
            t0 = time.perf_counter()
            num_users, frame = next(frames)
            t1 = time.perf_counter()
            runs.write_shard(engine, run_id, shard, frame, num_users=num_users)
            make_s += t1 - t0
            write_s += time.perf_counter() - t1
            rows += len(frame)
        runs.complete_run(engine, run_id, counts={}, timings={}, num_shards=shard + 1)

        base = sampler.reset()
        t0 = time.perf_counter()
        path = export_run(engine, Path(tmp) / "exports", run_id=run_id)
        export_s = time.perf_counter() - t0
        export_peak = sampler.peak - base
        exported = pq.ParquetFile(path).metadata.num_rows
        size = path.stat().st_size
        engine.dispose()
    sampler.close()
    if exported != rows:
        raise SystemExit(f"the export holds {exported} rows, the run {rows}")

    import recsys

    results = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "pg_url"},
        "code": str(Path(recsys.__file__).parent), "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "rows": rows,
        "write_shards_s": round(write_s, 2), "write_rows_per_s": round(rows / write_s),
        "export_s": round(export_s, 2), "export_rows_per_s": round(rows / export_s),
        "export_peak_above_start_mb": _mb(export_peak), "export_file_mb": _mb(size),
    }
    print({k: v for k, v in results.items() if k not in ("args", "code")})
    write_results(args.out, results)


if __name__ == "__main__":
    main()
