"""Evaluation time: accumulate impressions, bootstrap every metric, write the report.

Generates a synthetic MIND-like validation set (default 150k impressions, about 37 candidates
each, about 4% clicks, at least one click per impression as in MIND) scored by two models
and the random and popularity baselines (optionally an oracle), then times, without any model
scoring: streaming the impressions into ``ImpressionMetrics`` (one ``add`` per impression, or
``add_batch`` with ``--batch-size``), ``result()`` (per-impression metrics, pooled AUC, log
loss, calibration, breakdowns by category / image / article age / history length, and 1000
bootstrap resamples), and ``build_result`` + ``write_report``. One more timing, the exact
pooled-AUC bootstrap of one model (``--exact-resamples``), shows what the linearised one saves.

    .venv/bin/python benchmarks/bench_evaluate.py                      # full size
    .venv/bin/python benchmarks/bench_evaluate.py --impressions 5000   # quick check

Prints the figures and writes them to benchmarks/results/bench_evaluate.json. CPU seconds are
reported beside wall seconds: on a shared machine wall/CPU shows the contention.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from recsys.evaluation.report import build_result, write_report
from recsys.metrics.accumulator import (
    ARTICLE_AGE_ORDER,
    HISTORY_LENGTH_ORDER,
    ImpressionMetrics,
    article_age_buckets,
    history_length_bucket,
)
from recsys.metrics.bootstrap import exact_pooled_auc_samples

CATEGORIES = np.array(
    "news sports finance lifestyle weather health foodanddrink travel autos video tv music movies "
    "entertainment kids middleeast northamerica".split()
)


def make_world(num_impressions: int, mean_candidates: float, seed: int, oracle: bool) -> dict:
    """Flat CSR arrays of a synthetic evaluation set."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.gamma(2.0, mean_candidates / 2.0, num_impressions)), 2, 300).astype(np.int64)
    offsets = np.r_[0, np.cumsum(lengths)]
    c = int(offsets[-1])
    impression = np.repeat(np.arange(num_impressions), lengths)
    user_bias = rng.normal(0, 0.5, num_impressions)[impression]
    item_appeal = rng.normal(0, 1, c)
    logit = -3.6 + item_appeal + user_bias
    truth = 1 / (1 + np.exp(-logit))
    labels = (rng.random(c) < truth).astype(np.int8)
    # MIND impressions hold at least one click: click the most appealing candidate if none.
    clicks = np.bincount(impression, weights=labels, minlength=num_impressions)
    for i in np.flatnonzero(clicks == 0):
        labels[offsets[i] + np.argmax(truth[offsets[i] : offsets[i + 1]])] = 1
    popularity = np.round(np.exp(item_appeal * 1.5 + rng.normal(0, 1, c)))  # counts, many ties
    scores = {
        "v2": 1 / (1 + np.exp(-(logit + rng.normal(0, 0.5, c)))),
        "v1": 1 / (1 + np.exp(-(logit + rng.normal(0, 0.9, c)))),
        "random": rng.random(c),
        "popularity": popularity,
    }
    if oracle:
        scores["oracle"] = truth
    # Article age buckets, 2% unknown.
    age_hours = rng.exponential(30, c)
    age = article_age_buckets(np.where(rng.random(c) < 0.02, np.nan, age_hours))
    return {
        "offsets": offsets,
        "labels": labels,
        "scores": scores,
        "category": CATEGORIES[rng.integers(0, len(CATEGORIES), c)],
        "has_image": rng.random(c) < 0.85,
        "article_age": age,
        "history_length": [history_length_bucket(int(h)) for h in rng.geometric(0.05, num_impressions) - 1],
    }


def accumulate(world: dict, *, num_resamples: int, batch_size: int) -> ImpressionMetrics:
    acc = ImpressionMetrics(
        list(world["scores"]),
        item_groups=("category", "has_image", "article_age"),
        impression_groups=("history_length",),
        group_order={"article_age": ARTICLE_AGE_ORDER, "history_length": HISTORY_LENGTH_ORDER},
        num_resamples=num_resamples,
    )
    offsets, labels, scores = world["offsets"], world["labels"], world["scores"]
    m = len(offsets) - 1
    if batch_size <= 0:
        for i in range(m):
            lo, hi = offsets[i], offsets[i + 1]
            acc.add(
                labels[lo:hi],
                {name: s[lo:hi] for name, s in scores.items()},
                item_groups={g: world[g][lo:hi] for g in ("category", "has_image", "article_age")},
                impression_groups={"history_length": world["history_length"][i]},
            )
    else:
        for start in range(0, m, batch_size):
            end = min(start + batch_size, m)
            lo, hi = offsets[start], offsets[end]
            acc.add_batch(
                labels[lo:hi],
                {name: s[lo:hi] for name, s in scores.items()},
                offsets[start : end + 1] - lo,
                item_groups={g: world[g][lo:hi] for g in ("category", "has_image", "article_age")},
                impression_groups={"history_length": world["history_length"][start:end]},
            )
    return acc


class Clock:
    """Wall and process CPU seconds of a block."""

    def __enter__(self):
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.start
        self.cpu = time.process_time() - self.cpu_start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=150_000)
    parser.add_argument("--mean-candidates", type=float, default=37.0)
    parser.add_argument("--num-resamples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=0, help="0: one add() per impression; N: add_batch of N")
    parser.add_argument("--exact-resamples", type=int, default=20, help="exact pooled-AUC resamples timed (0: skip)")
    parser.add_argument("--oracle", action="store_true", help="also score a true-probability oracle")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_evaluate.json")
    args = parser.parse_args(argv)

    world = make_world(args.impressions, args.mean_candidates, args.seed, args.oracle)
    num_candidates = int(world["offsets"][-1])
    print(f"{args.impressions:,} impressions, {num_candidates:,} candidates, {int(world['labels'].sum()):,} clicks, "
          f"models {list(world['scores'])}")

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    load_before = os.getloadavg()[0]
    with Clock() as add_clock:
        acc = accumulate(world, num_resamples=args.num_resamples, batch_size=args.batch_size)
    with Clock() as result_clock:
        result = build_result(
            acc,
            kinds={"random": "baseline", "popularity": "baseline", **({"oracle": "oracle"} if args.oracle else {})},
            behaviors_file="synthetic",
            model_versions=["v1", "v2"],
        )
    with tempfile.TemporaryDirectory() as tmp, Clock() as report_clock:
        json_path, html_path = write_report(result, tmp)
        report_bytes = json_path.stat().st_size + html_path.stat().st_size
    total_wall = add_clock.wall + result_clock.wall + report_clock.wall
    total_cpu = add_clock.cpu + result_clock.cpu + report_clock.cpu

    exact = None
    if args.exact_resamples:
        with Clock() as exact_clock:
            exact_pooled_auc_samples(world["labels"], world["scores"]["v2"], world["offsets"],
                                     num_resamples=args.exact_resamples, seed=args.seed)
        exact = {"resamples": args.exact_resamples, "wall_s": exact_clock.wall,
                 "wall_s_per_resample": exact_clock.wall / args.exact_resamples}

    figures = {
        "impressions": args.impressions,
        "candidates": num_candidates,
        "models": list(world["scores"]),
        "num_resamples": args.num_resamples,
        "batch_size": args.batch_size,
        "accumulate_wall_s": add_clock.wall,
        "accumulate_cpu_s": add_clock.cpu,
        "result_wall_s": result_clock.wall,
        "result_cpu_s": result_clock.cpu,
        "report_wall_s": report_clock.wall,
        "report_cpu_s": report_clock.cpu,
        "total_wall_s": total_wall,
        "total_cpu_s": total_cpu,
        "goal_s": 180.0,
        "peak_rss_mb_after_generating_data": rss_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "report_bytes": report_bytes,
        "exact_pooled_auc": exact,
        "v2_impression_auc": result["models"]["v2"]["metrics"]["impression_auc"],
        "load_average_1m": [load_before, os.getloadavg()[0]],  # before and after: other processes' demand
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    print(f"accumulate {add_clock.wall:7.1f} s wall ({add_clock.cpu:6.1f} s CPU)")
    print(f"result     {result_clock.wall:7.1f} s wall ({result_clock.cpu:6.1f} s CPU)")
    print(f"report     {report_clock.wall:7.1f} s wall ({report_clock.cpu:6.1f} s CPU)")
    print(f"total      {total_wall:7.1f} s wall ({total_cpu:6.1f} s CPU), goal < 180 s; "
          f"peak RSS {figures['peak_rss_mb']:.0f} MB ({rss_before:.0f} MB after generating the data)")
    if exact:
        print(f"exact pooled-AUC bootstrap: {exact['wall_s_per_resample']:.2f} s per resample per model")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{args.out.name}.", dir=args.out.parent)
    with os.fdopen(fd, "w") as out:
        json.dump(figures, out, indent=2)
        out.write("\n")
    os.chmod(tmp_name, 0o644)
    os.replace(tmp_name, args.out)
    print(f"wrote {args.out}")
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
