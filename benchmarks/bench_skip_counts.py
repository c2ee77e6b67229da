"""What the category affinity's skip counts cost to read from the store.

The affinity (``recsys.models.affinity``) reads, per user, the distinct articles they were
shown and did not click, grouped by category and subcategory in the store
(``repository.read_skip_counts``). Three commands read them:

- ``recsys train``: the validation window's users, before the window (once per training);
- ``recsys predict`` / ``evaluate``: each chunk's users (20,000 impressions a chunk);
- the nightly job: each shard's users (``nightly.shard_size``, 2,000 by default), beside the
  shard's histories (``read_user_histories``), which are timed too for scale.

Each read is timed with the building of its ``SkipCounts``, on bench_train_data's
MIND-small-size world (65k articles, 50k users, 150k impressions, ~37 candidates; no covers),
on SQLite and on PostgreSQL (a fresh database, dropped afterwards).

Usage (the SQLite store is bench_train_data's, reused when it exists):
    .venv/bin/python benchmarks/bench_skip_counts.py --store /tmp/bts150

Prints and writes benchmarks/results/skip_counts.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np

from bench_ingest import add_world_args  # benchmarks/ is on sys.path when run as a script
from bench_train_data import postgresql_store, sqlite_store, write_results

RESULTS = Path(__file__).resolve().parent / "results" / "skip_counts.json"
SHARD = 2_000
SHARDS = 10
CHUNK_IMPRESSIONS = 20_000


def measure(url: str) -> dict:
    from recsys.models.affinity import SkipCounts
    from recsys.pipelines.features import item_key_codes
    from recsys.store import repository as repo
    from recsys.store.database import open_store

    engine = open_store(url)
    news = repo.read_news(engine)
    vocabulary, _ = item_key_codes(news)
    first, last = repo.time_range(engine, labelled_only=True)
    valid_start = last - timedelta(days=1)
    with engine.connect() as conn:
        import sqlalchemy as sa

        from recsys.store import schema as s

        im = s.impressions.c
        rows = conn.execute(sa.select(im.user_id, im.time).order_by(im.time, im.id)).all()
    users_by_time = np.array([u for u, _ in rows], dtype=object)
    times = np.array([t for _, t in rows])
    valid_users = np.unique(users_by_time[times >= valid_start])
    every_user = np.unique(users_by_time)
    out = {"impressions": len(rows), "users": len(every_user), "articles": len(news),
           "categories": vocabulary.sizes[0], "subcategories": vocabulary.sizes[1]}

    def timed(fn):
        t0 = time.perf_counter()
        value = fn()
        return value, time.perf_counter() - t0

    def read(**kwargs):
        frame = repo.read_skip_counts(engine, **kwargs)
        return frame, SkipCounts.from_rows(frame, vocabulary)

    (frame, counts), seconds = timed(lambda: read(until=valid_start, user_ids=valid_users))
    out["train"] = {"users": len(valid_users), "seconds": round(seconds, 3), "rows": len(frame),
                    "skips": int(counts.totals.sum())}
    chunk_users = np.unique(users_by_time[-CHUNK_IMPRESSIONS:])
    (frame, _), seconds = timed(lambda: read(until=None, user_ids=chunk_users))
    out["predict_chunk"] = {"impressions": CHUNK_IMPRESSIONS, "users": len(chunk_users), "seconds": round(seconds, 3),
                            "rows": len(frame)}
    (frame, counts), seconds = timed(lambda: read())
    out["whole_store"] = {"users": len(counts.users), "seconds": round(seconds, 3), "rows": len(frame),
                          "rows_per_user": round(len(frame) / max(len(counts.users), 1), 2),
                          "skips": int(counts.totals.sum()),
                          "skip_counts_mb": round(sum(a.nbytes for a in (*counts.pair_keys, *counts.pair_counts, counts.totals))
                                                  / 2**20, 2)}
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(every_user)
    skip_s, history_s = [], []
    for i in range(SHARDS):
        shard = shuffled[i * SHARD:(i + 1) * SHARD]
        _, seconds = timed(lambda: read(user_ids=shard))
        skip_s.append(seconds)
        _, seconds = timed(lambda: repo.read_user_histories(engine, shard, news["news_id"].to_numpy(dtype=object)))
        history_s.append(seconds)
    out["nightly_shard"] = {"users": SHARD, "shards": SHARDS, "skip_seconds_mean": round(float(np.mean(skip_s)), 4),
                            "skip_seconds_max": round(float(np.max(skip_s)), 4),
                            "history_seconds_mean": round(float(np.mean(history_s)), 4)}
    out["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    engine.dispose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_args(parser)
    parser.add_argument("--store", type=Path, help="folder of the world's files and SQLite store, kept and reused")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "pg_url"},
               "machine": platform.machine(), "cpu_count": os.cpu_count(), "backends": {}}
    with tempfile.TemporaryDirectory(prefix="bench_skip_counts_") as tmp:
        folder = args.store or Path(tmp)
        for backend in args.backends.split(","):
            with (postgresql_store(folder, args) if backend == "postgresql"
                  else contextlib.nullcontext(sqlite_store(folder, args))) as url:
                results["backends"][backend] = measure(url)
            print(backend, json.dumps(results["backends"][backend], indent=1), flush=True)
    write_results(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
