"""What the category affinity's content clusters (``model.affinity_clusters``) cost.

Three parts, at MIND-small size, on synthetic arrays of that size (no store: the store's read
of the skips is the same with or without clusters, and ``bench_skip_counts.py`` times it):

- training: the spherical k-means of each modality's content anchors (``ContentClusters.fit``)
  on the training window's articles;
- every scoring path: coding every article by its nearest centre (``ContentClusters.codes``),
  once per version (predict, evaluate) or worker (the nightly);
- per chunk or shard: counting the skipped (user, article) pairs per key
  (``SkipCounts.from_pairs``) with the two publisher's keys only, and with the two content
  clusters as well; the clicks per key in the histories (``history_key_counts``) likewise.

Sizes: ``--articles`` articles (65k, MIND-small's), anchors of 16 columns per modality, text and
image (10% without a cover); a ``predict`` chunk of ``--readers`` readers (16.5k) with
``--pairs`` skipped pairs (2.2M, bench_skip_counts' measured chunk) and ``--candidates``
candidates (740k: 20,000 impressions of ~37) with histories of 50.

Usage:
    .venv/bin/python benchmarks/bench_cluster_cost.py

Prints and writes benchmarks/results/cluster_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "cluster_cost.json"


def best_of(fn, repeats: int = 3) -> float:
    """The fastest of ``repeats`` runs of ``fn()``, in seconds (the machine is shared)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--articles", type=int, default=65_000)
    parser.add_argument("--clusters", type=int, default=16)
    parser.add_argument("--readers", type=int, default=16_500)
    parser.add_argument("--pairs", type=int, default=2_200_000)
    parser.add_argument("--candidates", type=int, default=740_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import faiss

    from recsys.models.affinity import ContentClusters, SkipCounts, history_key_counts

    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    n, a = args.articles, 16
    anchors = rng.normal(size=(n, 2 * a)).astype(np.float32)
    for b in range(2):
        anchors[:, b * a : (b + 1) * a] /= np.linalg.norm(anchors[:, b * a : (b + 1) * a], axis=1, keepdims=True)
    anchors[rng.random(n) < 0.1, a:] = 0.0  # no cover
    train_rows = np.arange(int(0.8 * n))
    fitted = {}
    fit_s = best_of(lambda: fitted.update(c=ContentClusters.fit(anchors, ("text", "image"), train_rows, args.clusters, 0)))
    clusters = fitted["c"]
    codes_s = best_of(lambda: clusters.codes(anchors))
    publisher = np.column_stack([rng.integers(0, 17, n), rng.integers(0, 260, n)])
    both = np.column_stack([publisher, clusters.codes(anchors)])

    users = np.array([f"U{i}" for i in range(args.readers)], dtype=object)
    who, items = rng.integers(0, args.readers, args.pairs), rng.integers(0, n, args.pairs)
    count_s = {name: best_of(lambda c=codes: SkipCounts.from_pairs(users, who, items, c))
               for name, codes in (("publisher", publisher), ("publisher_and_clusters", both))}
    lists = args.candidates // 37
    offsets = np.arange(lists + 1, dtype=np.int64) * 50
    history = rng.integers(0, n, lists * 50)
    owner = np.repeat(np.arange(lists), 37)[: args.candidates]
    candidates = rng.integers(0, n, len(owner))
    history_s = {name: best_of(lambda c=codes: history_key_counts(owner, c[candidates], offsets, history, c))
                 for name, codes in (("publisher", publisher), ("publisher_and_clusters", both))}
    out = {
        "benchmark": "cluster_cost", "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "fit_seconds": round(fit_s, 3), "fit_articles": len(train_rows),
        "codes_seconds": round(codes_s, 4),
        "skip_count_seconds": {k: round(v, 3) for k, v in count_s.items()},
        "history_count_seconds": {k: round(v, 3) for k, v in history_s.items()},
    }
    print(json.dumps(out, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
