"""Benchmark sample-world generation: wall time, throughput and peak memory.

Generates a world into a temporary folder (removed afterwards unless ``--keep``), prints the
figures and writes them to ``benchmarks/results/generate.json``. Peak memory is the resident
set size of this process plus its cover-drawing workers, sampled with psutil.

Usage:
  python benchmarks/bench_generate.py --users 2000 --news 2600 --impressions 6000   # small, seconds
  python benchmarks/bench_generate.py --users 50000 --news 65000 --impressions 150000  # MIND-small size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


from recsys.data.sample import generate_sample

from peak_rss import PeakRSS  # benchmarks/peak_rss.py (scripts run with benchmarks/ on sys.path)

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--news", type=int, default=2600)
    parser.add_argument("--impressions", type=int, default=6000, help="training impressions (test adds a third)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="cover-drawing processes")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the generated world")
    args = parser.parse_args()

    load_at_start = os.getloadavg()[0]
    parent = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    out = args.out or parent / "world"
    try:
        with PeakRSS() as rss:
            began = time.perf_counter()
            summary = generate_sample(
                out, num_users=args.users, num_news=args.news, num_impressions=args.impressions, seed=args.seed,
                image_size=args.image_size, workers=args.workers,
            )
            wall = time.perf_counter() - began
    finally:
        if not args.keep:
            shutil.rmtree(parent, ignore_errors=True)
            if args.out is not None:
                shutil.rmtree(args.out, ignore_errors=True)

    items = summary["train_items"] + summary["test_items"]
    impressions = summary["train_impressions"] + summary["test_impressions"]
    figures = {
        "size": {"users": args.users, "news": args.news, "impressions": args.impressions, "seed": args.seed,
                 "image_size": args.image_size, "workers": args.workers},
        "wall_s": round(wall, 2),
        "impressions": {"train": summary["train_impressions"], "test": summary["test_impressions"]},
        "impressions_per_s": round(impressions / wall, 1),
        "impression_items": items,
        "news_with_image": summary["news_with_image"],
        "bytes_on_disk": summary["bytes"],
        "peak_rss_mb": round(rss.peak / 2**20, 1),
        "fresh_test_share": summary["fresh_test_share"],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    # Other work on the machine slows the wall time; the load says how busy it was.
                    "load_average_1m_at_start": round(load_at_start, 2)},
    }
    print(f"generated {args.news} news ({summary['news_with_image']} covers), {args.users} users, "
          f"{summary['train_impressions']} + {summary['test_impressions']} train + test impressions ({items} items)")
    print(f"wall time {figures['wall_s']} s, {figures['impressions_per_s']} impressions/s, "
          f"{summary['bytes'] / 2**20:.1f} MiB written, peak RSS {figures['peak_rss_mb']} MiB")
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / "generate.json"
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
