"""PostgreSQL planning of the nightly's store reads: each shard's histories and the cold-start count.

Three commits of 2026-12-06 rest on figures from a manual hunt at 156k users / 5M clicks:

* ``repository._stream`` runs ``SET LOCAL cursor_tuple_fraction = 1.0`` before its server-side
  cursor: planned for a tenth of its rows (PostgreSQL's default 0.1), a shard's history read
  (``read_user_histories``, an IN list of 2000 user ids against ``clicks``) scanned the whole
  table (0.7-0.9 s a shard) instead of using the primary key (0.1 s);
* ``queries.count_without_clicks`` probes ``clicks`` once per user (EXISTS against ``users``)
  instead of ``count(DISTINCT clicks.user_id)`` over every click of the chunk's users
  (0.55 s -> 0.1 s per 5000 users);
* a PostgreSQL ingest ends with ANALYZE of the tables it wrote.

This benchmark creates its own database ``recsys_bench_<random>`` on the server of
``--admin-url`` (dropped at the end, also on an error or Ctrl-C), migrates it with
``open_store``, and fills it by COPY with synthetic rows: ``--news`` articles, ``--users``
users of which ``--no-click-share`` have no click, and for the others a uniform 1 to
2 x ``--clicks-per-user`` - 1 distinct articles each (mean ``--clicks-per-user``), four fifths
of them History rows (``history_pos`` set) and a fifth clicks seen in impressions
(``clicked_at`` set). Each user's clicks are written together, users in random order, as an
ingest writes a behaviors file's Histories. Autovacuum is switched off on the written tables so
that nothing analyzes them behind the benchmark's back.

Then, for ``--shards`` shards of ``--shard-size`` distinct random user ids (users with and
without clicks), in two phases: with no statistics (what the nightly met right after an ingest
before the ingest analyzed), then after ``ingest._refresh_statistics`` (the ingest's ANALYZE):

* ``read_user_histories(engine, ids, news_ids)`` as the code is now (``new``), and with the old
  planning (``old``): the same code, with the one statement the commit added,
  ``SET LOCAL cursor_tuple_fraction = 1.0``, dropped by a filter on ``psycopg.Connection.execute``
  for the duration (every other statement goes through). The filter counts what it dropped and
  a probe through ``_stream`` reads the setting each way, so the results show that the old
  mode really ran with the server's default. Both must return identical histories, whose
  lengths must match the generated rows;
* the cold-start count of the same ids in chunks of 5000: ``count_without_clicks`` (``new``,
  EXISTS) against the old query, ``count(DISTINCT clicks.user_id) WHERE user_id IN chunk``
  (``old``); both must equal the count taken from the generated rows.

Each (phase, read, mode) block runs on a fresh engine, one untimed warm-up call first; after
the block the engine is closed (its backend flushes its statistics on exit) and the block's
sequential and index scans of ``clicks`` (``pg_stat_user_tables``, warm-up included) are
recorded: they show which plan each mode got.

    .venv/bin/python benchmarks/bench_pg_store.py                     # 200k users, ~4.5M clicks
    .venv/bin/python benchmarks/bench_pg_store.py --users 5000 --shards 3 --shard-size 500   # quick check

Prints a table (per-call median, p90, min, max seconds) and writes it with the arguments, the
host's and server's facts to benchmarks/results/pg_store.json (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results" / "pg_store.json"
SET_FRACTION = "SET LOCAL cursor_tuple_fraction"  # the statement repository._stream added
COUNT_CHUNK = 5000  # count_without_clicks's IN-list chunk
WRITTEN_TABLES = ("news", "users", "clicks")
BASE_TIME = pd.Timestamp("2019-11-15 00:00:00")


def make_world(args) -> SimpleNamespace:
    """Users, articles and each clicking user's distinct articles (CSR), as arrays."""
    rng = np.random.default_rng(args.seed)
    width = 2 * args.clicks_per_user - 1  # lengths are uniform on 1..width, mean clicks_per_user
    if width > args.news:
        raise SystemExit(f"--news must be at least 2 x --clicks-per-user - 1 = {width}")
    user_ids = np.array([f"U{i}" for i in range(args.users)], dtype=object)
    news_ids = np.array([f"N{i}" for i in range(args.news)], dtype=object)
    clicking = rng.random(args.users) >= args.no_click_share
    lengths = np.where(clicking, rng.integers(1, width + 1, args.users), 0)
    order = rng.permutation(args.users)  # the order users' clicks are written in
    return SimpleNamespace(rng=rng, user_ids=user_ids, news_ids=news_ids, lengths=lengths, order=order, width=width)


def click_chunks(world: SimpleNamespace, users_per_chunk: int = 20000):
    """The clicks table's rows as COPY text, users in ``world.order``, one chunk at a time."""
    rng = world.rng
    num_news = len(world.news_ids)
    for start in range(0, len(world.order), users_per_chunk):
        users = world.order[start : start + users_per_chunk]
        lengths = world.lengths[users]
        # Distinct articles per user: sorted draws spread by their rank, then shuffled.
        drawn = np.sort(rng.integers(0, num_news - world.width + 1, (len(users), world.width)), axis=1)
        drawn = rng.permuted(drawn + np.arange(world.width), axis=1)
        keep = np.arange(world.width) < lengths[:, None]
        pos = np.broadcast_to(np.arange(world.width), drawn.shape)[keep]
        history = np.ceil(0.8 * lengths).astype(np.int64)  # the first 80% are History rows
        is_history = pos < np.repeat(history, lengths)
        seconds = rng.integers(0, 7 * 86400, len(pos))
        frame = pd.DataFrame({
            "user_id": np.repeat(world.user_ids[users], lengths),
            "news_id": world.news_ids[drawn[keep]],
            "history_pos": pd.Series(pos, dtype="Int64").where(is_history),
            "clicked_at": pd.Series(BASE_TIME + pd.to_timedelta(seconds, unit="s")).where(~is_history),
        })
        yield len(frame), frame.to_csv(sep="\t", header=False, index=False, na_rep="\\N", date_format="%Y-%m-%d %H:%M:%S")


def fill(engine, world: SimpleNamespace) -> dict:
    """COPY the synthetic rows into the migrated store; returns seconds and row counts."""
    timings, counts = {}, {}
    now = "2019-11-22 00:00:00"
    raw = engine.raw_connection()
    try:
        conn = raw.driver_connection
        with conn.cursor() as cur:
            for table in WRITTEN_TABLES:  # nothing analyzes them but the benchmark
                cur.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
            t0 = time.perf_counter()
            news = pd.DataFrame({
                "news_id": world.news_ids, "category": "news", "subcategory": "newsus",
                "title": [f"title {i}" for i in range(len(world.news_ids))], "abstract": "",
                "url": "https://example.invalid/", "title_entities": "[]", "abstract_entities": "[]",
                "image_status": "missing", "content_hash": "0" * 64, "first_seen_at": now, "updated_at": now,
            })
            with cur.copy(f"COPY news ({', '.join(news.columns)}) FROM STDIN") as copy:
                copy.write(news.to_csv(sep="\t", header=False, index=False))
            users = pd.DataFrame({"user_id": world.user_ids[world.order], "first_seen_at": now, "last_seen_at": now})
            with cur.copy("COPY users (user_id, first_seen_at, last_seen_at) FROM STDIN") as copy:
                copy.write(users.to_csv(sep="\t", header=False, index=False))
            timings["news_users_s"] = time.perf_counter() - t0
            counts.update(news=len(news), users=len(users))
            t0 = time.perf_counter()
            clicks = 0
            with cur.copy("COPY clicks (user_id, news_id, history_pos, clicked_at) FROM STDIN") as copy:
                for rows, text in click_chunks(world):
                    copy.write(text)
                    clicks += rows
            timings["clicks_s"] = time.perf_counter() - t0
            counts["clicks"] = clicks
        conn.commit()
    finally:
        raw.close()
    if counts["clicks"] != int(world.lengths.sum()):
        raise SystemExit(f"wrote {counts['clicks']} clicks, generated {int(world.lengths.sum())}")
    return {"seconds": {k: round(v, 2) for k, v in timings.items()}, "rows": counts}


@contextlib.contextmanager
def old_planning():
    """``SET LOCAL cursor_tuple_fraction`` dropped from every psycopg connection for the block: the
    streamed reads run as they did before commit 3c471fe; yields the count of dropped statements."""
    import psycopg

    real = psycopg.Connection.execute
    dropped = [0]

    def execute(self, query, *args, **kwargs):
        if isinstance(query, str) and query.startswith(SET_FRACTION):
            dropped[0] += 1
            return self.cursor()
        return real(self, query, *args, **kwargs)

    psycopg.Connection.execute = execute
    try:
        yield dropped
    finally:
        psycopg.Connection.execute = real


def streamed_fraction(engine) -> str:
    """cursor_tuple_fraction as a query streamed by ``repository._stream`` sees it."""
    import sqlalchemy as sa

    from recsys.store import repository as repo

    with engine.connect() as conn:
        query = sa.select(sa.func.current_setting("cursor_tuple_fraction"))
        return str(pd.concat(list(repo._stream(conn, query, ["fraction"])))["fraction"].iloc[0])


def clicks_scans(url: str) -> tuple[int, int]:
    """(sequential, index) scans of ``clicks`` counted by the server so far."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            seq, idx = conn.execute(sa.text(
                "SELECT seq_scan, coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = 'clicks'")).one()
    finally:
        engine.dispose()
    return int(seq), int(idx)


def old_count_without_clicks(engine, user_ids) -> int:
    """The cold-start count before commit 90124fe: every click of the chunk's users, counted distinct."""
    from sqlalchemy import func, select

    from recsys.store import schema as s

    c = s.clicks.c
    ids = [str(u) for u in user_ids]
    with_clicks = 0
    with engine.connect() as conn:
        for start in range(0, len(ids), COUNT_CHUNK):
            chunk = ids[start : start + COUNT_CHUNK]
            with_clicks += conn.execute(select(func.count(c.user_id.distinct())).where(c.user_id.in_(chunk))).scalar()
    return len(ids) - with_clicks


def run_block(url: str, calls, fn, *, old: bool) -> dict:
    """One untimed warm-up call, then each call timed, on a fresh engine; the clicks scans it made."""
    from recsys.store.database import create_engine_for

    seq0, idx0 = clicks_scans(url)
    engine = create_engine_for(url)
    seconds, outputs = [], []
    with old_planning() if old else contextlib.nullcontext([0]) as dropped:
        fraction = streamed_fraction(engine)
        fn(engine, calls[0])  # warm-up
        for arg in calls:
            t0 = time.perf_counter()
            outputs.append(fn(engine, arg))
            seconds.append(time.perf_counter() - t0)
    engine.dispose()  # the backend exits and flushes its table statistics
    time.sleep(1.0)
    seq1, idx1 = clicks_scans(url)
    s = np.array(seconds)
    return {
        "outputs": outputs,
        "stats": {"calls": len(s), "median_s": round(float(np.median(s)), 4), "p90_s": round(float(np.percentile(s, 90)), 4),
                  "min_s": round(float(s.min()), 4), "max_s": round(float(s.max()), 4), "total_s": round(float(s.sum()), 3),
                  "streamed_cursor_tuple_fraction": fraction, "set_local_dropped": dropped[0],
                  "clicks_seq_scans": seq1 - seq0, "clicks_idx_scans": idx1 - idx0},
    }


def phase(url: str, world: SimpleNamespace, shards: np.ndarray, news_ids: np.ndarray) -> dict:
    """Histories and cold-start counts, each mode, on the store as it is now."""
    from recsys.ranking.queries import count_without_clicks
    from recsys.store.repository import read_user_histories

    def histories(engine, ids):
        return read_user_histories(engine, ids, news_ids)

    out = {}
    blocks = {mode: run_block(url, list(shards), histories, old=mode == "old") for mode in ("new", "old")}
    for (new_off, new_items), (old_off, old_items), ids in zip(blocks["new"]["outputs"], blocks["old"]["outputs"], shards):
        assert np.array_equal(new_off, old_off) and np.array_equal(new_items, old_items), "histories differ between modes"
        expected = world.lengths[np.array([int(u[1:]) for u in ids])]
        assert np.array_equal(np.diff(new_off), expected), "history lengths differ from the generated rows"
    out["read_user_histories"] = {mode: block["stats"] for mode, block in blocks.items()}
    out["history_rows_per_shard"] = int(np.mean([len(items) for _, items in blocks["new"]["outputs"]]))
    if blocks["old"]["stats"]["set_local_dropped"] < len(shards) + 1:
        raise SystemExit("the old planning did not drop the SET LOCAL of every streamed read")

    ids = shards.ravel()
    chunks = [ids[i : i + COUNT_CHUNK] for i in range(0, len(ids), COUNT_CHUNK)]
    counted = {"new": run_block(url, chunks, count_without_clicks, old=False),
               "old": run_block(url, chunks, old_count_without_clicks, old=False)}
    expected = [int((world.lengths[np.array([int(u[1:]) for u in chunk])] == 0).sum()) for chunk in chunks]
    for mode, block in counted.items():
        assert block["outputs"] == expected, f"count_without_clicks ({mode}) {block['outputs']} != generated {expected}"
    out["count_without_clicks"] = {mode: block["stats"] for mode, block in counted.items()}
    out["count_users_per_chunk"] = [len(chunk) for chunk in chunks]
    out["cold_start_users"] = int(sum(expected))
    return out


def server_facts(url: str) -> dict:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            facts = {"server_version": conn.execute(sa.text("SHOW server_version")).scalar()}
            for name in ("shared_buffers", "effective_cache_size", "work_mem", "random_page_cost",
                         "cursor_tuple_fraction", "autovacuum"):
                facts[name] = conn.execute(sa.text(f"SHOW {name}")).scalar()
            facts["clicks_mb"] = round(conn.execute(sa.text("SELECT pg_table_size('clicks')")).scalar() / 2**20, 1)
            facts["clicks_pk_mb"] = round(conn.execute(sa.text("SELECT pg_relation_size('pk_clicks')")).scalar() / 2**20, 1)
    finally:
        engine.dispose()
    return facts


def has_statistics(url: str) -> bool:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return bool(conn.execute(sa.text("SELECT count(*) FROM pg_stats WHERE tablename = 'clicks'")).scalar())
    finally:
        engine.dispose()


def print_table(results: dict) -> None:
    print(f"{'phase':<16} {'read':<22} {'mode':<4} {'calls':>5} {'median s':>9} {'p90 s':>8} {'min s':>8} "
          f"{'max s':>8} {'seq scans':>9} {'idx scans':>9}")
    for phase_name in ("before_analyze", "after_analyze"):
        p = results.get(phase_name)
        if p is None:
            continue
        for read in ("read_user_histories", "count_without_clicks"):
            for mode, st in p[read].items():
                print(f"{phase_name:<16} {read:<22} {mode:<4} {st['calls']:>5} {st['median_s']:>9.4f} {st['p90_s']:>8.4f} "
                      f"{st['min_s']:>8.4f} {st['max_s']:>8.4f} {st['clicks_seq_scans']:>9} {st['clicks_idx_scans']:>9}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                        help="a role that may create databases, and a database to connect to")
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--news", type=int, default=3000)
    parser.add_argument("--clicks-per-user", type=int, default=25, help="mean distinct articles of a user with clicks")
    parser.add_argument("--no-click-share", type=float, default=0.1, help="share of users without any click")
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--shard-size", type=int, default=2000, help="users per shard (the nightly's default)")
    parser.add_argument("--skip-before-analyze", action="store_true", help="only time the store after ANALYZE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from bench_train_data import write_results  # benchmarks/ is on sys.path when run as a script

    from recsys.store.database import open_store
    from recsys.store.ingest import _refresh_statistics

    load_before = os.getloadavg()
    world = make_world(args)
    if args.shards * args.shard_size > args.users:
        raise SystemExit("--shards x --shard-size must not exceed --users (shards are distinct users)")
    shards = world.rng.choice(world.user_ids, args.shards * args.shard_size, replace=False).reshape(args.shards, args.shard_size)
    news_ids = np.sort(world.news_ids)  # an ItemFeatures' order
    results: dict = {}
    from bench_run_io import fresh_store  # benchmarks/ is on sys.path when run as a script
    from sqlalchemy.engine import make_url

    with fresh_store("postgresql", Path(), args.admin_url) as url:
        print(f"database {make_url(url).database}")
        t0 = time.perf_counter()
        engine = open_store(url)
        results["migrate_s"] = round(time.perf_counter() - t0, 2)
        results["fill"] = fill(engine, world)
        print(f"filled: {results['fill']}")
        if not args.skip_before_analyze:
            if has_statistics(url):
                raise SystemExit("clicks already has statistics before the ANALYZE (autovacuum?)")
            results["before_analyze"] = phase(url, world, shards, news_ids)
        t0 = time.perf_counter()
        _refresh_statistics(engine, SimpleNamespace(news=1, impressions=1))  # the ingest's ANALYZE
        results["analyze_s"] = round(time.perf_counter() - t0, 2)
        engine.dispose()
        if not has_statistics(url):
            raise SystemExit("the ingest's ANALYZE left clicks without statistics")
        results["after_analyze"] = phase(url, world, shards, news_ids)
        results["server"] = server_facts(url)

    import recsys

    results = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "admin_url"},
        "code": str(Path(recsys.__file__).parent), "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],  # the machine may be shared
        **results,
    }
    print_table(results)
    print(json.dumps({k: results[k] for k in ("migrate_s", "fill", "analyze_s", "server", "load_average_before",
                                             "load_average_after")}))
    write_results(args.out, results)
    return results


if __name__ == "__main__":
    main()
