"""Write a MIND-large-size world of ``bench_ingest``'s kind fast, for the memory figures of
``recsys train`` beyond the 600k-impression store (docs/model.md, "At MIND-large size").

``bench_ingest.write_world`` draws each History and each impression's candidates with its own
``rng.choice(p=...)`` call (about 0.35 ms each): 2M impressions take tens of minutes before a
line is ingested. This draws all of them at once from the popularity's cumulative
distribution, with the same distributions: the same news.tsv (``write_news``, same seed),
lognormal popularity, Histories of 0-59 articles per user, Poisson(mean - 2) + 2 candidates
(at most 300) listed once each in order of first draw, each clicked with probability 0.04 plus
one clicked for sure, times uniform over 6 days from 2019-11-09. The random stream differs, so
the files are not ``write_world``'s for the same seed; 2k impressions gave 36.9 candidates per
impression against its 37.0.

    .venv/bin/python benchmarks/write_large_world.py --impressions 1200000 --users 400000 --out /tmp/large/store
    .venv/bin/recsys --workspace /tmp/large/ws --db sqlite:////tmp/large/store/bench.db ingest \\
        --news /tmp/large/store/news.tsv --behaviors /tmp/large/store/behaviors.tsv
    .venv/bin/python benchmarks/bench_train_data.py --impressions 1200000 --users 400000 --store /tmp/large/store \\
        --out benchmarks/results/train_data_1200k.json

Prints the row counts and the seconds taken.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_ingest import write_news  # noqa: E402


def write_large_world(out: Path, *, num_news: int, num_users: int, num_impressions: int, mean_candidates: float,
                      seed: int, start: datetime = datetime(2019, 11, 9), days: float = 6.0) -> dict:
    """Write ``news.tsv`` and a labelled ``behaviors.tsv`` into ``out``; returns row counts."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    news_ids = write_news(out, rng, num_news)
    popularity = rng.lognormal(0.0, 1.0, num_news)
    cdf = np.cumsum(popularity / popularity.sum())
    cdf /= cdf[-1]

    def draw(n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), num_news - 1)

    history_len = rng.integers(0, 60, num_users)
    history_ids = news_ids[draw(int(history_len.sum()))]
    starts = np.concatenate([[0], np.cumsum(history_len)])
    histories = [" ".join(history_ids[starts[u]:starts[u + 1]]) for u in range(num_users)]
    seconds = np.sort(rng.integers(0, int(days * 24 * 3600), num_impressions))
    users = rng.integers(0, num_users, num_impressions)
    counts = np.clip(rng.poisson(mean_candidates - 2, num_impressions) + 2, 2, 300)
    picks = draw(int(counts.sum()))
    owner = np.repeat(np.arange(num_impressions, dtype=np.int64), counts)
    # Each article once per impression, in order of first draw (a repeat, clicked and not, is a bad row).
    _, first = np.unique(owner * num_news + picks, return_index=True)
    keep = np.sort(first)
    picks, owner = picks[keep], owner[keep]
    per_impression = np.bincount(owner, minlength=num_impressions)
    offsets = np.concatenate([[0], np.cumsum(per_impression)])
    clicked = rng.random(len(picks)) < 0.04
    clicked[offsets[:-1] + (rng.random(num_impressions) * per_impression).astype(np.int64)] = True
    positives = np.array([f"{n}-1" for n in news_ids], dtype=object)
    negatives = np.array([f"{n}-0" for n in news_ids], dtype=object)
    items = np.where(clicked, positives[picks], negatives[picks])
    with open(out / "behaviors.tsv", "w", encoding="utf-8", newline="\n") as f:
        for i in range(num_impressions):
            t = start + timedelta(seconds=int(seconds[i]))
            hour = t.hour % 12 or 12
            when = f"{t.month}/{t.day}/{t.year} {hour}:{t.minute:02d}:{t.second:02d} {'PM' if t.hour >= 12 else 'AM'}"
            f.write(f"{i + 1}\tU{users[i]}\t{when}\t{histories[users[i]]}\t{' '.join(items[offsets[i]:offsets[i + 1]])}\n")
    return {"news": num_news, "users": num_users, "impressions": num_impressions, "impression_items": int(len(picks)),
            "history_ids": int(history_len.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--news", type=int, default=65_000)
    parser.add_argument("--users", type=int, default=700_000)
    parser.add_argument("--impressions", type=int, default=2_200_000)
    parser.add_argument("--candidates", type=float, default=37.0, help="mean candidates per impression")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    t0 = time.perf_counter()
    counts = write_large_world(args.out, num_news=args.news, num_users=args.users, num_impressions=args.impressions,
                               mean_candidates=args.candidates, seed=args.seed)
    print(json.dumps({**counts, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
