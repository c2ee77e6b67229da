"""What the category affinity's skips cost to read from the store.

The affinity (``recsys.models.affinity``) counts, per user, the distinct articles they were
shown and did not click, per category and subcategory. The store gives the (user, article)
pairs (``repository.read_skipped``) and ``SkipCounts.from_pairs`` counts them. Three commands
read them:

- ``recsys train``: the validation window's users, before the window (once per training);
- ``recsys predict`` / ``evaluate``: each chunk's users (20,000 impressions a chunk);
- the nightly job: each shard's users (``nightly.shard_size``, 2,000 by default), beside the
  shard's histories (``read_user_histories``), which are timed too for scale.

Each read is timed with its counting. ``grouped_sql_*`` times the first version, which grouped
in the database (``count(DISTINCT news_id)`` per user, category and subcategory over a join of
the items, their impressions and the articles), on the same users. The world is
bench_train_data's MIND-small-size one (65k articles, 50k users, 150k impressions, ~37
candidates; no covers), on SQLite and on PostgreSQL (a fresh database, dropped afterwards).

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


def grouped_sql(engine, users, until=None) -> int:
    """The first version's read: grouped in the database; returns its rows."""
    import sqlalchemy as sa

    from recsys.store import schema as s

    im, it, n = s.impressions.c, s.impression_items.c, s.news.c
    query = (sa.select(im.user_id, n.category, n.subcategory, sa.func.count(it.news_id.distinct()))
             .select_from(s.impression_items.join(s.impressions, it.impression_pk == im.id)
                          .join(s.news, n.news_id == it.news_id))
             .where(it.label == 0, *([im.time < until] if until is not None else []))
             .group_by(im.user_id, n.category, n.subcategory))
    ids = [str(u) for u in users]
    rows = 0
    with engine.connect() as conn:
        for start in range(0, len(ids), 5000):
            rows += len(conn.execute(query.where(im.user_id.in_(ids[start:start + 5000]))).all())
    return rows


def measure(url: str) -> dict:
    import sqlalchemy as sa

    from recsys.models.affinity import SkipCounts
    from recsys.pipelines.features import item_key_codes
    from recsys.store import repository as repo
    from recsys.store import schema as s
    from recsys.store.database import open_store

    engine = open_store(url)
    news = repo.read_news(engine)
    news_ids = news["news_id"].to_numpy(dtype=object)
    codes = item_key_codes(news)
    _, last = repo.time_range(engine, labelled_only=True)
    valid_start = last - timedelta(days=1)
    im = s.impressions.c
    with engine.connect() as conn:
        rows = conn.execute(sa.select(im.user_id, im.time).order_by(im.time, im.id)).all()
    users_by_time = np.array([u for u, _ in rows], dtype=object)
    times = np.array([t for _, t in rows])
    every_user = np.unique(users_by_time)
    out = {"impressions": len(rows), "users": len(every_user), "articles": len(news),
           "categories": int(codes[:, 0].max()) + 1, "subcategories": int(codes[:, 1].max()) + 1}

    def counted(users, until=None) -> tuple[int, SkipCounts, float]:
        t0 = time.perf_counter()
        who, items = repo.read_skipped(engine, users, news_ids, until=until)
        counts = SkipCounts.from_pairs(users, who, items, codes)
        return len(who), counts, time.perf_counter() - t0

    def grouped(users, until=None) -> float:
        t0 = time.perf_counter()
        grouped_sql(engine, users, until)
        return time.perf_counter() - t0

    valid_users = np.unique(users_by_time[times >= valid_start])
    pairs, counts, seconds = counted(valid_users, valid_start)
    out["train"] = {"users": len(valid_users), "seconds": round(seconds, 3), "pairs_read": pairs,
                    "distinct_skips": int(counts.totals.sum()), "grouped_sql_seconds": round(grouped(valid_users, valid_start), 3)}
    chunk_users = np.unique(users_by_time[-CHUNK_IMPRESSIONS:])
    pairs, counts, seconds = counted(chunk_users)
    out["predict_chunk"] = {"impressions": CHUNK_IMPRESSIONS, "users": len(chunk_users), "seconds": round(seconds, 3),
                            "pairs_read": pairs, "grouped_sql_seconds": round(grouped(chunk_users), 3),
                            "skip_counts_mb": round(sum(a.nbytes for a in (*counts.pair_keys, *counts.pair_counts,
                                                                              counts.totals)) / 2**20, 2)}
    shuffled = np.random.default_rng(0).permutation(every_user)
    skip_s, grouped_s, history_s = [], [], []
    for i in range(SHARDS):
        shard = shuffled[i * SHARD:(i + 1) * SHARD]
        skip_s.append(counted(shard)[2])
        grouped_s.append(grouped(shard))
        t0 = time.perf_counter()
        repo.read_user_histories(engine, shard, news_ids)
        history_s.append(time.perf_counter() - t0)
    out["nightly_shard"] = {"users": SHARD, "shards": SHARDS, "skip_seconds_mean": round(float(np.mean(skip_s)), 4),
                            "skip_seconds_max": round(float(np.max(skip_s)), 4),
                            "grouped_sql_seconds_mean": round(float(np.mean(grouped_s)), 4),
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
