"""User vectors per second: batches padded to their longest history vs batches of like lengths.

``RankingModel.user_vectors`` pads each batch of users to its longest history, and the user
encoder's self-attention costs H^2 per user. It now sorts users by history length before it
batches them. This benchmark times both on the history lengths of a real behaviors file:

- ``padded_per_batch``: ``user_vectors`` called on each run of ``--batch`` consecutive users,
  as before (each batch padded to its longest history);
- ``batched_by_length``: one call over all users (sorted by length inside).

The history items are drawn at random (speed does not depend on which articles), the item
embeddings are random rows of the model's width, and the model is a saved bundle (any trained
version; its weights do not change the speed). Threads: ``--threads`` for TensorFlow.

    .venv/bin/python benchmarks/bench_user_vectors.py --model-dir W/models/VERSION/model \\
        --behaviors /tmp/bts150/later/behaviors.tsv
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np

from bench_train_data import write_results  # benchmarks/ is on sys.path when run as a script

RESULTS = Path(__file__).resolve().parent / "results" / "user_vectors.json"


def history_lengths(path: Path, limit: int) -> np.ndarray:
    """Lengths of the History column (4th) of the first ``limit`` lines of a behaviors file."""
    lengths = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            history = line.rstrip("\n").split("\t")[3]
            lengths.append(len(history.split()))
            if len(lengths) >= limit:
                break
    return np.array(lengths, dtype=np.int64)


def best_of(repeats: int, work) -> tuple[float, np.ndarray]:
    """The shortest of ``repeats`` timed runs (the machine's other load only slows a run down)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        out = work()
        best = min(best, time.perf_counter() - started)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True, help="a saved model bundle (a version's model/)")
    parser.add_argument("--behaviors", type=Path, required=True, help="behaviors.tsv whose History lengths are used")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=65_000, help="rows of the random item embeddings")
    parser.add_argument("--batch", type=int, default=1024, help="users per forward pass (user_vectors' default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from recsys.models.bundle import RankingModel
    from recsys.threads import configure_threads

    configure_threads(args.threads)
    model = RankingModel.load(args.model_dir)
    rng = np.random.default_rng(0)
    lengths = history_lengths(args.behaviors, args.users)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = rng.integers(0, args.items, size=offsets[-1])
    emb = rng.standard_normal((args.items, model.config.serving_dim)).astype(np.float32)
    m, cap = len(lengths), model.config.history_len
    model.user_vectors(offsets[: args.batch + 1], items, emb)  # warm-up: traces the function

    def padded_per_batch() -> np.ndarray:
        parts = []
        for lo in range(0, m, args.batch):
            hi = min(lo + args.batch, m)
            parts.append(model.user_vectors(offsets[lo : hi + 1] - offsets[lo], items[offsets[lo] : offsets[hi]], emb,
                                            batch_size=args.batch))
        return np.concatenate(parts)

    before_s, before = best_of(args.repeats, padded_per_batch)
    after_s, after = best_of(args.repeats, lambda: model.user_vectors(offsets, items, emb, batch_size=args.batch))
    capped = np.minimum(lengths, cap)
    results = {
        "benchmark": "user_vectors",
        "host": platform.node(),
        "model_dir": str(args.model_dir),
        "behaviors": str(args.behaviors),
        "users": int(m),
        "batch": args.batch,
        "threads": args.threads,
        "history_len_cap": int(cap),
        "history_mean": round(float(capped.mean()), 2),
        "history_at_cap_fraction": round(float((capped == cap).mean()), 3),
        "history_empty_fraction": round(float((capped == 0).mean()), 3),
        "padded_per_batch": {"seconds": round(before_s, 3), "users_per_second": round(m / before_s)},
        "batched_by_length": {"seconds": round(after_s, 3), "users_per_second": round(m / after_s)},
        "speedup": round(before_s / after_s, 2),
        "max_abs_difference": float(np.abs(before - after).max()),
    }
    print(f"{m} users, mean capped history {capped.mean():.1f} ({(capped == cap).mean():.0%} at the cap of {cap})")
    print(f"padded per batch : {before_s:6.2f} s  {m / before_s:8.0f} users/s")
    print(f"batched by length: {after_s:6.2f} s  {m / after_s:8.0f} users/s  ({before_s / after_s:.2f}x; "
          f"max |difference| {results['max_abs_difference']:.1e})")
    write_results(args.out, results)


if __name__ == "__main__":
    main()
