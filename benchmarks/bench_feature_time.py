"""At what time should a later window's side features be read? A measured experiment (issue 4).

Popularity (clicks and shows in the 24 h before ``t``) and age are computed at a time ``t``.
``recsys evaluate`` / ``recsys predict`` score each impression of a behaviors file at its own
time, with the store's log: for an impression a day after the store's last event the popularity
window holds no data, so every article reads as unpopular. The nightly job instead scores with
tonight's statistics. This benchmark measures both on held-out worlds, for two trainings:

- ``clock 0``: the default, training and validation features at each impression's own time;
- ``clock 24``: ``model.feature_clock_hours = 24``, training and validation features at the last
  UTC midnight (what a nightly job serves: an article published since has no shows, age 0).

Each model scores the test file twice: at each impression's time (what ``evaluate`` does) and
at ``min(t, end of the store's log)`` (``score_impressions(features_until=...)``). Rows: AUC
per impression over all candidates, over fresh ones (never shown in the store) and over seen
ones, with the mean predicted probability of each group against its click rate.

Usage:
  python benchmarks/bench_feature_time.py --seeds 101 102 103
  python benchmarks/bench_feature_time.py --foreign            # seeds 201-203, tag 'foreign'

Prints a table and writes benchmarks/results/feature_time.json (feature_time_<tag>.json).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

CLOCKS = (0.0, 24.0)


def run_seed(seed: int, args, root: Path) -> dict:
    from bench_quality import config_overrides, ingested_world
    from bench_skip_feedback import oracle_auc
    from recsys.config import load_config
    from recsys.models.samples import with_logged_clicks
    from recsys.models.training import mean_impression_auc
    from recsys.pipelines.scoring import VersionScorer, iter_behavior_chunks, load_scoring_catalogue
    from recsys.pipelines.train import run_train
    from recsys.versions import get_version

    t0 = time.perf_counter()
    world, ws, engine, _ = ingested_world(seed, args, root, foreign=args.foreign)
    oracle = oracle_auc(world)
    out = {"seed": seed, "oracle": oracle, "rows": {}}
    for clock in CLOCKS:
        config = load_config(None, {**config_overrides(args), "model.feature_clock_hours": clock})
        run_train(engine, ws, config)
        catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
        scorer = VersionScorer(get_version(engine), catalogue)
        test, _ = next(iter_behavior_chunks(world / "behaviors_test.tsv", catalogue, chunk_size=10**7,
                                            history_len=scorer.history_len))
        led = with_logged_clicks(test, catalogue.clicks, scorer.history_len)
        owner = np.repeat(np.arange(len(test)), np.diff(test.candidate_offsets))
        shown = catalogue.first_seen[test.candidate_items]
        fresh = np.isnat(shown) | (shown >= catalogue.log.end)

        def auc(scores, keep):
            offsets = np.concatenate([[0], np.cumsum(np.bincount(owner[keep], minlength=len(test)))])
            return float(mean_impression_auc(test.labels[keep], scores[keep], offsets)[0])

        for reading, until in (("impression time", None), ("store's end", catalogue.log.end)):
            scores = scorer.model.score_impressions(led, scorer.embeddings, catalogue.log, catalogue.first_seen,
                                                    features_until=until)
            a = auc(scores, np.ones(len(scores), bool))
            out["rows"][f"clock {clock:g}, features at {reading}"] = {
                "impression_auc": a, "gap_closed": (a - 0.5) / (oracle - 0.5),
                "fresh_auc": auc(scores, fresh), "seen_auc": auc(scores, ~fresh),
                "mean_p_fresh": float(scores[fresh].mean()), "mean_p_seen": float(scores[~fresh].mean()),
                "click_rate_fresh": float((test.labels[fresh] == 1).mean()),
                "click_rate_seen": float((test.labels[~fresh] == 1).mean())}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    engine.dispose()
    return out


def main() -> None:
    # this folder is on sys.path when run as a script
    from bench_quality import run_experiment

    def show(res: dict) -> None:
        print(f"\nseed {res['seed']} ({res['seconds']} s), oracle {res['oracle']:.4f}")
        print(f"  {'':<42} {'AUC':>6} {'gap':>6} {'fresh':>6} {'seen':>6}  mean p fresh/seen (click rate)")
        for name, r in res["rows"].items():
            print(f"  {name:<42} {r['impression_auc']:.4f} {100 * r['gap_closed']:5.1f}% {r['fresh_auc']:.4f} "
                  f"{r['seen_auc']:.4f}  {r['mean_p_fresh']:.4f} / {r['mean_p_seen']:.4f} "
                  f"({r['click_rate_fresh']:.4f} / {r['click_rate_seen']:.4f})")

    run_experiment(__doc__, "feature_time", run_seed, show, width=42)


if __name__ == "__main__":
    main()
