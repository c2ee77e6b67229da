"""What fitting the content prior's weights costs after the training epochs, and that its terms
read directly (``RankingModel.content_prior_terms``, what ``train_ctr`` does) are the terms the
served model adds.

``train_ctr`` searches the prior's per-modality weights on sums of each candidate's networks'
logit and its prior terms over the validation window. Until 2026-12-08 it obtained each of the
four terms (mean and mean squared similarity, text and image) by scoring the whole window again
with a model serving that term alone; now it reads them once from the served anchor columns.
This script times both on one validation window, a model with anchors (untrained networks: the
cost does not depend on the weights), and reports the largest difference between the two
readings of the terms.

Sizes: ``--impressions`` validation impressions (20,000: about a day of MIND-small) of
``--candidates`` candidates (37), histories of up to 50 clicks, ``--items`` articles (65,000), the
default encoders' dimensions (384 text, 1024 image), ``--anchor-dim`` anchors per modality (16).

Usage:
    .venv/bin/python benchmarks/bench_prior_fit.py [--impressions 20000]

Prints and writes benchmarks/results/prior_fit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "prior_fit.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impressions", type=int, default=20_000)
    parser.add_argument("--candidates", type=int, default=37)
    parser.add_argument("--items", type=int, default=65_000)
    parser.add_argument("--users", type=int, default=16_000)
    parser.add_argument("--anchor-dim", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from recsys.threads import configure_threads

    configure_threads(args.threads)
    from recsys.data.interactions import InteractionLog, first_shown
    from recsys.models.bundle import RankingModel
    from recsys.models.synthetic import make_synthetic_world
    from recsys.models.training import _embeddings_for, evaluate_logits

    t0 = time.perf_counter()
    world = make_synthetic_world(num_items=args.items, num_users=args.users, num_impressions=args.impressions * 2,
                                 candidates_per_impression=args.candidates, window_shares=(0.45, 0.5, 0.05), seed=0)
    valid, features = world.valid, world.features
    log = InteractionLog.from_impressions([world.train, world.valid], len(features))
    first_seen = first_shown([world.train, world.valid], len(features))
    model = RankingModel.create(features.text_encoder, features.image_encoder, sorted(set(features.categories)),
                                embedding_dim=128, anchor_dim=args.anchor_dim, seed=0)
    model.item_tower.get_layer("fusion").adapt(features.text, features.image, features.has_image)
    print(f"world: {len(valid)} validation impressions, {len(valid.candidate_items)} candidates "
          f"({time.perf_counter() - t0:.0f} s to build)", flush=True)

    blocks = model.anchor_blocks
    timings = {}
    t0 = time.perf_counter()
    base = evaluate_logits(model, features, valid, log, first_seen).astype(np.float64)
    timings["networks_pass_s"] = time.perf_counter() - t0

    # Before: one scoring of the window per term, by a model serving that term alone.
    t0 = time.perf_counter()
    before = []
    for moment in (False, True):
        for b in range(blocks):
            unit = np.eye(blocks)[b]
            served = model.with_content_prior(0.0, unit) if moment else model.with_content_prior(unit)
            before.append(evaluate_logits(served, features, valid, log, first_seen) - base)
    timings["terms_by_scoring_s"] = time.perf_counter() - t0

    # Now: the terms read once from the served anchor columns.
    t0 = time.perf_counter()
    unit = model.with_content_prior(1.0, 1.0)
    now = unit.content_prior_terms(valid, _embeddings_for(unit, features, valid))
    timings["terms_read_s"] = time.perf_counter() - t0

    difference = float(np.max(np.abs(np.stack(before, axis=1) - now)))
    result = {
        "benchmark": "prior_fit",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "loadavg_1m": os.getloadavg()[0]},
        "validation_impressions": len(valid),
        "validation_candidates": int(len(valid.candidate_items)),
        "anchor_blocks": blocks,
        "anchor_dim": args.anchor_dim,
        **{k: round(v, 2) for k, v in timings.items()},
        "speedup": round(timings["terms_by_scoring_s"] / timings["terms_read_s"], 1),
        "max_abs_term_difference": difference,
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
