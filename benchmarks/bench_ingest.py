"""Ingest speed and memory on a MIND-small-size world, into SQLite and into PostgreSQL.

Writes news.tsv and behaviors.tsv directly (NumPy draws, no images), then runs ``ingest``
once per backend in a child process, so that each backend's peak RSS (``ru_maxrss``) is
its own; then, into the loaded store, the next six days of the same users and the first file
again, each under a new source, then a corrected copy of the first file (labels moved) and a
re-timed one (every 100th line an hour later) under its own source (``later_ingests``). PostgreSQL gets a fresh database that is dropped afterwards.

Full size (the goal is < 90 s and < 1.5 GB per backend on the 2-core machine):
    .venv/bin/python benchmarks/bench_ingest.py --news 65000 --users 50000 --impressions 150000
Quick check:
    .venv/bin/python benchmarks/bench_ingest.py --news 2000 --users 1000 --impressions 3000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "bench_ingest.json"
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
CATEGORIES = ("news", "sports", "finance", "lifestyle", "travel", "health", "autos", "video", "weather", "music")
WORDS = tuple(
    "market storm team wins city report new plan school record star price court fire vote season "
    "study car bank heat coach film game deal rise fall police rain music health week trade".split()
)


def write_news(out: Path, rng: np.random.Generator, num_news: int) -> np.ndarray:
    """Write ``out/news.tsv``: ``num_news`` articles N1.. with a category and an 8-word title; their ids."""
    news_ids = np.array([f"N{i}" for i in range(1, num_news + 1)], dtype=object)
    with open(out / "news.tsv", "w", encoding="utf-8", newline="\n") as f:
        cats = rng.integers(0, len(CATEGORIES), num_news)
        title_words = rng.integers(0, len(WORDS), (num_news, 8))
        for i in range(num_news):
            title = " ".join(WORDS[w] for w in title_words[i]).capitalize()
            entities = '[{"Label": "X", "Type": "P", "WikidataId": "Q1", "Confidence": 1.0, "OccurrenceOffsets": [0], "SurfaceForms": ["X"]}]'
            f.write(f"{news_ids[i]}\t{CATEGORIES[cats[i]]}\tsub{cats[i]}\t{title}\t{title} abstract.\t"
                    f"https://example.com/{news_ids[i]}\t{entities}\t[]\n")
    return news_ids


def write_world(out: Path, *, num_news: int, num_users: int, num_impressions: int, mean_candidates: float,
                seed: int, start: datetime = datetime(2019, 11, 9), days: float = 6.0) -> dict:
    """Write ``news.tsv`` and ``behaviors.tsv`` (labelled, ``days`` from ``start``) into ``out``;
    returns row counts."""
    rng = np.random.default_rng(seed)
    news_ids = write_news(out, rng, num_news)
    # Per-user History, fixed as in MIND (the clicks before the behaviours window).
    popularity = rng.lognormal(0.0, 1.0, num_news)
    popularity /= popularity.sum()
    history_len = rng.integers(0, 60, num_users)
    histories = [" ".join(news_ids[rng.choice(num_news, n, p=popularity)]) if n else "" for n in history_len]
    negatives = np.array([f"{n}-0" for n in news_ids], dtype=object)
    positives = np.array([f"{n}-1" for n in news_ids], dtype=object)
    seconds = np.sort(rng.integers(0, int(days * 24 * 3600), num_impressions))
    users = rng.integers(0, num_users, num_impressions)
    counts = np.clip(rng.poisson(mean_candidates - 2, num_impressions) + 2, 2, 300)
    num_items = 0
    with open(out / "behaviors.tsv", "w", encoding="utf-8", newline="\n") as f:
        for i in range(num_impressions):
            # Drawn with replacement (fast), then each article once, in order of first draw: an
            # impression listing an article twice, clicked and not, is a bad row (`data/mind.py`).
            picks = rng.choice(num_news, int(counts[i]), p=popularity)
            _, first = np.unique(picks, return_index=True)
            picks = picks[np.sort(first)]
            k = len(picks)
            clicked = rng.random(k) < 0.04
            clicked[rng.integers(0, k)] = True
            items = " ".join(np.where(clicked, positives[picks], negatives[picks]))
            t = start + timedelta(seconds=int(seconds[i]))
            hour = t.hour % 12 or 12
            when = f"{t.month}/{t.day}/{t.year} {hour}:{t.minute:02d}:{t.second:02d} {'PM' if t.hour >= 12 else 'AM'}"
            f.write(f"{i + 1}\tU{users[i]}\t{when}\t{histories[users[i]]}\t{items}\n")
            num_items += k
    return {"news": num_news, "users": num_users, "impressions": num_impressions, "impression_items": num_items,
            "history_ids": int(history_len.sum())}


def write_corrected(path: Path, out: Path, every: int = 100) -> Path:
    """A copy of behaviors file ``path`` whose every ``every``-th line has its clicks moved to
    the next candidate (the last one's to the first): a corrected re-delivery."""
    def move_clicks(cells: list[str]) -> None:
        items = cells[4].split()
        labels = [item[-1] for item in items]
        labels = labels[-1:] + labels[:-1]
        cells[4] = " ".join(item[:-1] + label for item, label in zip(items, labels))

    return _write_changed(path, out, every, move_clicks)


def write_retimed(path: Path, out: Path, every: int = 100, hours: int = 1) -> Path:
    """A copy of behaviors file ``path`` whose every ``every``-th line is ``hours`` later: a
    correction of some lines' times (a time-zone fix), which moves those impressions under
    their ids, so the ingest recounts what they gave (first-seen times, Histories, clicks)."""
    from recsys.data.mind import format_time, parse_time

    def later(cells: list[str]) -> None:
        cells[2] = format_time(parse_time(cells[2]) + timedelta(hours=hours))

    return _write_changed(path, out, every, later)


def _write_changed(path: Path, out: Path, every: int, change) -> Path:
    """Copy ``path`` to ``out``, ``change`` (given a line's cells, edits them) applied to every
    ``every``-th line."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(path, encoding="utf-8") as src, open(out, "w", encoding="utf-8", newline="\n") as dst:
        for i, line in enumerate(src):
            if i % every == 0:
                cells = line.rstrip("\n").split("\t")
                change(cells)
                line = "\t".join(cells) + "\n"
            dst.write(line)
    return out


def run_child(backend: str, url: str, folder: Path, batch_size: int) -> dict:
    """Ingest into a fresh store; runs inside the child process."""
    from recsys.store.database import open_store
    from recsys.store.ingest import ingest
    from recsys.store.stats import store_stats

    engine = open_store(url)
    start = time.perf_counter()
    report = ingest(engine, news_path=folder / "news.tsv", behaviors_path=folder / "behaviors.tsv",
                    quarantine_dir=folder / "quarantine", batch_size=batch_size)
    wall = time.perf_counter() - start
    stats = store_stats(engine)
    # Three behaviors files into the loaded store: under new sources, the next days of the same
    # users (what a nightly ingest is) and the first file again (a re-delivered file, whose
    # every impression the store holds under the first source); then, under the first source,
    # a corrected copy of the first file (every impression id held: replaced in place, and the
    # clicks of its corrected lines recounted), and a copy with every 100th line an hour later
    # (those impressions move under their ids: first-seen times and Histories recounted too).
    later = {}
    corrected = write_corrected(folder / "behaviors.tsv", folder / "corrected" / "behaviors.tsv")
    retimed = write_retimed(folder / "behaviors.tsv", folder / "retimed" / "behaviors.tsv")
    for name, path, source in (("next_days", folder / "next" / "behaviors.tsv", "next_days"),
                               ("same_file_again", folder / "behaviors.tsv", "same_file_again"),
                               ("corrected_file", corrected, report.source),
                               ("retimed_file", retimed, report.source)):
        started = time.perf_counter()
        again = ingest(engine, behaviors_path=path, source=source, quarantine_dir=folder / "quarantine", batch_size=batch_size)
        later[name] = {"wall_s": round(time.perf_counter() - started, 2), "impressions": again.impressions,
                       "impressions_stored_elsewhere": getattr(again, "impressions_stored_elsewhere", None),
                       "impressions_repeated": getattr(again, "impressions_repeated", None),
                       "clicks_withdrawn": getattr(again, "clicks_withdrawn", None),
                       "impressions_changed": getattr(again, "impressions_changed", None),
                       "first_seen_recounted": getattr(again, "first_seen_recounted", None)}
    engine.dispose()
    return {
        "backend": backend,
        "wall_s": round(wall, 2),
        "elapsed": {k: round(v, 2) for k, v in report.elapsed.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rows_per_s": round((stats["news"] + stats["impressions"] + stats["impression_items"] + stats["clicks"]) / wall),
        "impression_items_per_s": round(stats["impression_items"] / wall),
        "num_bad_rows": report.num_bad_rows,
        "store": stats,
        "later_ingests": later,
    }


def _admin(url: str):
    import sqlalchemy as sa

    return sa.create_engine(url, isolation_level="AUTOCOMMIT")


def add_world_args(parser: argparse.ArgumentParser) -> None:
    """The world's size and seed (``write_world``) and the PostgreSQL server; shared with bench_train_data."""
    parser.add_argument("--news", type=int, default=65_000)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--impressions", type=int, default=150_000)
    parser.add_argument("--candidates", type=float, default=37.0, help="mean candidates per impression")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pg-url", default=os.environ.get("RECSYS_TEST_PG_URL", DEFAULT_PG),
                        help="a PostgreSQL server database to create the benchmark database from")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_args(parser)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--world", help="folder to write the two worlds into and keep, or to reuse them from "
                                         "(the same size arguments); default: a temporary folder")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.url, Path(args.folder), args.batch_size)))
        return

    results: dict = {"args": {k: v for k, v in vars(args).items() if k not in ("child", "url", "folder")}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        folder = Path(args.world or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "next" / "behaviors.tsv").is_file():
            results["world"] = {"reused": str(folder)}  # written by an earlier run with --world
        else:
            start = time.perf_counter()
            results["world"] = write_world(folder, num_news=args.news, num_users=args.users,
                                           num_impressions=args.impressions, mean_candidates=args.candidates, seed=args.seed)
            (folder / "next").mkdir()
            write_world(folder / "next", num_news=args.news, num_users=args.users, num_impressions=args.impressions,
                        mean_candidates=args.candidates, seed=args.seed + 1, start=datetime(2019, 11, 15))
            results["world"]["write_s"] = round(time.perf_counter() - start, 2)
        results["world"]["behaviors_mb"] = round((folder / "behaviors.tsv").stat().st_size / 2**20, 1)
        print(f"world: {results['world']}", flush=True)
        for backend in args.backends.split(","):
            cleanup = None
            if backend == "sqlite":
                url = f"sqlite:///{Path(tmp) / 'bench.db'}"
            elif backend == "postgresql":
                import sqlalchemy as sa
                from sqlalchemy.engine import make_url

                name = f"recsys_bench_{uuid.uuid4().hex[:8]}"
                server = make_url(args.pg_url).set(drivername="postgresql+psycopg")
                try:
                    admin = _admin(server)
                    with admin.connect() as conn:
                        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
                except sa.exc.OperationalError as exc:
                    print(f"postgresql: skipped, server unreachable ({str(exc.orig).splitlines()[0]})")
                    results["runs"].append({"backend": backend, "skipped": "server unreachable"})
                    continue
                url = server.set(database=name).render_as_string(hide_password=False)

                def cleanup(admin=admin, name=name):
                    with admin.connect() as conn:
                        conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"), {"d": name})
                        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
                    admin.dispose()
            else:
                parser.error(f"unknown backend {backend!r}, expected sqlite or postgresql")
            load = os.getloadavg()  # the machine may be shared: figures go with the load they met
            try:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", backend, "--url", url, "--folder", str(folder),
                     "--batch-size", str(args.batch_size)],
                    check=True, capture_output=True, text=True,
                )
            except subprocess.CalledProcessError as exc:
                sys.stderr.write(exc.stderr)
                raise
            finally:
                if cleanup is not None:
                    cleanup()
            run = json.loads(out.stdout.strip().splitlines()[-1])
            run["load_average_before"] = [round(x, 2) for x in load]
            print(f"{backend}: {run['wall_s']} s, peak RSS {run['peak_rss_mb']} MB, "
                  f"{run['rows_per_s']} rows/s ({run['impression_items_per_s']} items/s), stages {run['elapsed']}", flush=True)
            print(f"{backend}: then {run['later_ingests']}", flush=True)
            results["runs"].append(run)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = RESULTS.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp_path, RESULTS)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
