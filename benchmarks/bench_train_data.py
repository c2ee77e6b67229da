"""Memory and time of `recsys train`'s data preparation, from the store to the first batch.

Before the first training step, `recsys train` reads the training and validation windows
from the store (``pipelines.train.read_windows``: the impressions, their histories, the click
log and the history filter) and the popularity log, leads every history with the user's logged
clicks (``interactions.with_logged_clicks``), and fits and computes the side features of every
training (impression, candidate) pair (``SideFeatures``). At MIND-large size (about 2.2M
training impressions, 80M pairs) these steps decide whether training fits in memory at all.

The store is a MIND-format world written by ``bench_ingest.write_world`` (NumPy draws, no
images) and ingested into SQLite. Each stage runs the product's functions in one child process;
a sampler records the peak RSS during the stage above the RSS when it started
(``peak_above_start_mb``: what the stage needs on top of what earlier stages hold), and the
stage's retained RSS. Bytes per pair divide by the window's (impression, candidate) pairs.

On PostgreSQL (``--backend postgresql``) the world is ingested into a fresh database of the
server that is dropped afterwards; the reads then go through server-side cursors.

Usage (the store is kept in --store and reused when it exists, so that runs compare alike):
    .venv/bin/python benchmarks/bench_train_data.py --impressions 150000 --store /tmp/bench_train_store
    .venv/bin/python benchmarks/bench_train_data.py --impressions 600000 --store /tmp/bench_train_store_600k \\
        --out benchmarks/results/train_data_600k.json
    .venv/bin/python benchmarks/bench_train_data.py --impressions 150000 --store /tmp/bench_train_store \\
        --backend postgresql --out benchmarks/results/train_data_postgresql.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil

from bench_ingest import add_world_args  # benchmarks/ is on sys.path when run as a script

RESULTS = Path(__file__).resolve().parent / "results" / "train_data.json"
HISTORY_LEN = 50
VALID_DAYS = 1.0


class StagePeak:
    """RSS of this process sampled every ``interval_s`` seconds; ``peak`` since the last ``reset``."""

    def __init__(self, interval_s: float = 0.02):
        self._me = psutil.Process()
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        return self._me.memory_info().rss

    def reset(self) -> int:
        now = self.rss()
        self.peak = now
        return now

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def stage(self, stages: dict, name: str, work, *, label: str = ""):
        """``work()``, with its seconds and its RSS (peak above its start, retained, after) in
        ``stages[name]``; returns what it returned."""
        start = self.reset()
        t0 = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - t0
        end = self.rss()
        stages[name] = {"seconds": round(seconds, 2), "peak_above_start_mb": _mb(self.peak - start),
                        "retained_mb": _mb(end - start), "rss_after_mb": _mb(end)}
        print(f"{label}{name}: {stages[name]}", flush=True)
        return result


def _mb(n: float) -> float:
    return round(n / 2**20, 1)


def run_child(url: str) -> dict:
    """The stages on the store at ``url``; runs inside the child process."""
    import numpy as np

    from recsys.data.interactions import with_logged_clicks
    from recsys.models.side_features import SideFeatures
    from recsys.pipelines.features import first_seen_array
    from recsys.pipelines.train import read_training_log, read_windows, train_window
    from recsys.store import repository as repo
    from recsys.store.database import open_store
    from recsys.threads import configure_threads

    configure_threads(2)
    engine = open_store(url)
    news = repo.read_news(engine)
    news_ids = news["news_id"].to_numpy(dtype=object)
    first_seen = first_seen_array(news)
    since, valid_start, until = train_window(engine, None, None, VALID_DAYS)
    sampler = StagePeak()
    stages: dict = {}

    def stage(name: str, work):
        return sampler.stage(stages, name, work)

    baseline = sampler.rss()

    def read():
        train, valid, clicks = read_windows(engine, news_ids, since, valid_start, until, source=None, history_len=HISTORY_LEN)
        events = read_training_log(engine, news_ids, since, until, window_hours=24.0, feature_clock_hours=0.0)
        return train, valid, clicks, events

    train, valid, clicks, events = stage("read_windows", read)
    train, valid = stage("logged_clicks", lambda: (with_logged_clicks(train, clicks, HISTORY_LEN),
                                                   with_logged_clicks(valid, clicks, HISTORY_LEN)))

    def side():
        times = np.repeat(train.times, np.diff(train.candidate_offsets))
        spec = SideFeatures(24.0).fit(train.candidate_items, times, events, first_seen)
        return spec, spec.compute(train.candidate_items, times, events, first_seen)

    spec, features = stage("side_features", side)
    sampler.close()
    pairs = int(len(train.candidate_items))
    for values in stages.values():
        values["peak_above_start_bytes_per_train_pair"] = round(values["peak_above_start_mb"] * 2**20 / pairs, 1)
    arrays = {
        "train": sum(getattr(train, f).nbytes for f in ("impression_ids", "times", "history_offsets", "history_items",
                                                       "candidate_offsets", "candidate_items", "labels")),
        "side_features": features.nbytes,
        "interaction_log": events.item_rows.nbytes + events.times.nbytes + events.clicks.nbytes,
        "click_log": clicks.times.nbytes + clicks.items.nbytes + clicks.offsets.nbytes,
    }
    engine.dispose()
    return {
        "window": {"since": str(since), "valid_start": str(valid_start), "until": str(until),
                   "train_impressions": len(train), "train_pairs": pairs, "valid_impressions": len(valid),
                   "valid_pairs": int(len(valid.candidate_items)), "clicks": len(clicks), "log_events": len(events),
                   "mean_history": round(float(np.diff(train.history_offsets).mean()), 1)},
        "baseline_rss_mb": _mb(baseline),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "stages": stages,
        "numpy_arrays_mb": {k: _mb(v) for k, v in arrays.items()},
        "side_feature_mean": list(spec.mean),
        "side_feature_std": list(spec.std),
        "side_feature_checksum": float(np.asarray(features, dtype=np.float64).sum()),
        "history_checksum": int(train.history_items.astype(np.int64).sum()),
    }


def write_files(folder: Path, args) -> None:
    """The world's news.tsv and behaviors.tsv in ``folder``, unless they are there."""
    from bench_ingest import write_world

    if (folder / "behaviors.tsv").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    world = write_world(folder, num_news=args.news, num_users=args.users, num_impressions=args.impressions,
                        mean_candidates=args.candidates, seed=args.seed)
    print(f"world written in {time.perf_counter() - t0:.0f} s: {world}", flush=True)


def ingest_into(url: str, folder: Path) -> None:
    from recsys.store.database import open_store
    from recsys.store.ingest import ingest

    t0 = time.perf_counter()
    engine = open_store(url)
    ingest(engine, news_path=folder / "news.tsv", behaviors_path=folder / "behaviors.tsv", quarantine_dir=folder / "quarantine")
    engine.dispose()
    print(f"ingested in {time.perf_counter() - t0:.0f} s", flush=True)


def sqlite_store(folder: Path, args) -> str:
    """Write and ingest the world into ``folder/bench.db`` unless it is there; returns the URL."""
    db = folder / "bench.db"
    if db.exists():
        print(f"reusing the store {db}", flush=True)
        return f"sqlite:///{db}"
    write_files(folder, args)
    ingest_into(f"sqlite:///{folder / 'bench.db.partial'}", folder)
    os.replace(folder / "bench.db.partial", db)  # an interrupted build is not reused
    return f"sqlite:///{db}"


@contextlib.contextmanager
def postgresql_store(folder: Path, args):
    """A fresh PostgreSQL database holding the world, dropped afterwards; yields its URL."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    write_files(folder, args)
    name = f"recsys_bench_{uuid.uuid4().hex[:8]}"
    server = make_url(args.pg_url).set(drivername="postgresql+psycopg")
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        url = server.set(database=name).render_as_string(hide_password=False)
        ingest_into(url, folder)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"), {"d": name})
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_args(parser)
    parser.add_argument("--store", type=Path, help="folder of the world's files and SQLite store, kept and reused "
                        "(default: a temporary one)")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite",
                        help="postgresql: ingest the world into a fresh database of --pg-url's server, dropped afterwards")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child)))
        return

    with tempfile.TemporaryDirectory(prefix="bench_train_data_") as tmp:
        folder = args.store or Path(tmp)
        with (postgresql_store(folder, args) if args.backend == "postgresql"
              else contextlib.nullcontext(sqlite_store(folder, args))) as url:
            proc = subprocess.run([sys.executable, __file__, "--child", url], capture_output=True, text=True)
        sys.stderr.write(proc.stderr[-4000:] if proc.returncode else "")
        if proc.returncode:
            raise SystemExit(f"the child failed with exit {proc.returncode}")
        lines = proc.stdout.strip().splitlines()
        for line in lines[:-1]:
            print(line)
        run = json.loads(lines[-1])
    import recsys

    results = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("child", "pg_url")},
               "code": str(Path(recsys.__file__).parent), "machine": platform.machine(), "cpu_count": os.cpu_count(), **run}
    print(json.dumps({k: results[k] for k in ("window", "max_rss_mb", "numpy_arrays_mb")}, indent=1))
    write_results(args.out, results)


def write_results(out: Path, results: dict) -> None:
    """Write ``results`` as JSON to ``out`` through a temporary file (a killed run leaves the old one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp_path, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
