"""Memory and time of what `recsys predict` / `evaluate` read from the store before scoring.

Side features count each article's shows and clicks in the 24 hours before an impression
(``models.side_features``), read from the store's popularity log. `predict` and `evaluate`
used to read the log of the whole store (29 bytes a labelled show, about 3 GB for MIND-large
train + dev); they now scan the behaviors file's times first (``data.mind.scan_behaviors``,
which also gives the report's checksum) and read only the part that file can count
(``pipelines.scoring.read_popularity_log``, ``ScoringSpan.log_window``).

The store is ``bench_train_data``'s (a ``bench_ingest.write_world`` world of 6 days, ingested
into SQLite; ``--store`` shares it with that benchmark). The file to score is a day after the
store, as MIND's dev file follows train (``later/behaviors.tsv``, a sixth of the impressions).
Each way of reading runs in its own child process; a sampler records the peak RSS during each
stage above the RSS when it started, and the child reports its max RSS.

    .venv/bin/python benchmarks/bench_scoring_data.py --impressions 150000 --store /tmp/bts150
    .venv/bin/python benchmarks/bench_scoring_data.py --impressions 600000 --users 200000 --store /tmp/bts600 \\
        --out benchmarks/results/scoring_data_600k.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from bench_ingest import add_world_args, write_world  # benchmarks/ is on sys.path when run as a script
from bench_train_data import StagePeak, _mb, sqlite_store, write_results

RESULTS = Path(__file__).resolve().parent / "results" / "scoring_data.json"
WINDOW_HOURS = 24.0  # the side features' default popularity window (models.side_features.SideFeatures)
MODES = ("whole_store", "file_span")


def run_child(url: str, later: Path, mode: str) -> dict:
    """Read what scoring ``later`` needs, the ``mode`` way; runs inside the child process."""
    from recsys.data.mind import scan_behaviors
    from recsys.pipelines.scoring import ScoringSpan, read_popularity_log
    from recsys.store import repository as repo
    from recsys.store.database import open_store
    from recsys.threads import configure_threads

    configure_threads(2)
    engine = open_store(url)
    news_ids = repo.read_news(engine)["news_id"].to_numpy(dtype=object)
    sampler = StagePeak()
    stages: dict = {}

    def stage(name: str, work):
        return sampler.stage(stages, name, work, label=f"{mode} ")

    baseline = sampler.rss()
    span = None
    if mode == "file_span":
        scan = stage("scan_file", lambda: scan_behaviors(later))
        span = ScoringSpan(scan.first, scan.last, WINDOW_HOURS)
    log, end = stage("popularity_log", lambda: read_popularity_log(engine, news_ids, span))
    clicks = stage("click_log", lambda: repo.read_click_log(engine, news_ids))
    sampler.close()
    engine.dispose()
    return {
        "baseline_rss_mb": _mb(baseline),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "stages": stages,
        "log_events": len(log),
        "log_first": str(log.times.min()) if len(log) else None,
        "store_end": str(end),
        "span": None if span is None else {"first": str(span.first), "last": str(span.last), "window_hours": span.window_hours},
        "log_mb": _mb(log.item_rows.nbytes + log.times.nbytes + log.clicks.nbytes),
        "clicks": len(clicks),
    }


def write_later_file(folder: Path, args) -> Path:
    """A day of behaviors after the store's six (``folder/later/behaviors.tsv``), unless it is there."""
    later = folder / "later"
    if not (later / "behaviors.tsv").exists():
        later.mkdir(parents=True, exist_ok=True)
        write_world(later, num_news=args.news, num_users=args.users, num_impressions=args.impressions // 6,
                    mean_candidates=args.candidates, seed=args.seed + 1, start=datetime(2019, 11, 15), days=1.0)
    return later / "behaviors.tsv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_args(parser)
    parser.add_argument("--store", type=Path, help="folder of the world's files and SQLite store, kept and reused "
                        "(default: a temporary one; the same folder as bench_train_data's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        url, later, mode = args.child
        print(json.dumps(run_child(url, Path(later), mode)))
        return

    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench_scoring_data_") as tmp:
        folder = args.store or Path(tmp)
        url = sqlite_store(folder, args)
        later = write_later_file(folder, args)
        for mode in MODES:
            proc = subprocess.run([sys.executable, __file__, "--child", url, str(later), mode], capture_output=True, text=True)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"the {mode} child failed with exit {proc.returncode}")
            lines = proc.stdout.strip().splitlines()
            for line in lines[:-1]:
                print(line)
            runs[mode] = json.loads(lines[-1])
        later_bytes = later.stat().st_size
    import recsys

    whole, part = runs["whole_store"], runs["file_span"]
    results = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("child", "pg_url")},
        "code": str(Path(recsys.__file__).parent), "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "later_file_mb": _mb(later_bytes),
        "scan_mb_per_s": round(later_bytes / 2**20 / max(part["stages"]["scan_file"]["seconds"], 1e-9), 1),
        "log_events_ratio": round(part["log_events"] / max(whole["log_events"], 1), 3),
        **runs,
    }
    print(json.dumps({m: {k: runs[m][k] for k in ("max_rss_mb", "log_events", "log_mb")} for m in MODES}, indent=1))
    write_results(args.out, results)


if __name__ == "__main__":
    main()
