"""Should the served networks also learn from the validation window? A measured experiment (issue 4).

``recsys train`` holds the last day of its window out to choose the epoch, fit the content
prior's weights and calibrate; by default the served networks never learn from that day, the
newest one. ``model.refit = true`` trains them again, from the same seed, on both windows for
the kept number of epochs, and serves them with the weights and calibration fitted on the
held-out day. For each held-out world this trains the default model and the refit one (the same
first training: same seed, same data) and scores the test file with each, reading side features
as ``recsys evaluate`` does by default. Rows: AUC per impression over all candidates, over fresh
ones (never shown in the store) and over seen ones, and the log loss.

Usage:
  python benchmarks/bench_refit.py --seeds 101 102 103
  python benchmarks/bench_refit.py --foreign             # seeds 201-203, tag 'foreign'
  python benchmarks/bench_refit.py --seeds 101 --users 12000 --impressions 36000 --tag users12k

Prints a table and writes benchmarks/results/refit.json (refit_<tag>.json).
"""

from __future__ import annotations

import time
from pathlib import Path


def run_seed(seed: int, args, root: Path) -> dict:
    from bench_quality import config_overrides, file_impressions, fresh_candidates, ingested_world, oracle_auc, test_file_row
    from recsys.config import load_config
    from recsys.metrics.classification import log_loss
    from recsys.pipelines.scoring import DEFAULT_FEATURES_AT, VersionScorer, feature_times, load_scoring_catalogue
    from recsys.pipelines.train import run_train
    from recsys.versions import get_version

    t0 = time.perf_counter()
    world, ws, engine, _ = ingested_world(seed, args, root, foreign=args.foreign)
    oracle = oracle_auc(world)
    catalogue = load_scoring_catalogue(engine, ws, load_config(None, config_overrides(args)), news=None, images=None)
    at = feature_times(catalogue, DEFAULT_FEATURES_AT)
    out = {"seed": seed, "oracle": oracle, "rows": {}}
    test = fresh = None
    for name, refit in (("default (networks trained on the training window)", False),
                        ("refit on training + validation windows", True)):
        started = time.perf_counter()
        summary = run_train(engine, ws, load_config(None, {**config_overrides(args), "model.refit": refit}))
        scorer = VersionScorer(get_version(engine), catalogue)
        if test is None:
            test = file_impressions(world / "behaviors_test.tsv", catalogue, logged_clicks=True, history_len=scorer.history_len)
            fresh = fresh_candidates(test, catalogue)
        scores = scorer.model.score_impressions(test, scorer.embeddings, catalogue.log, catalogue.first_seen,
                                                popularity_until=at.popularity_until, age_until=at.age_until)
        labelled = test.labels >= 0
        out["rows"][name] = {
            **test_file_row(test, scores, oracle, fresh), "log_loss": float(log_loss(test.labels[labelled], scores[labelled])),
            "best_epoch": summary["metrics"]["best_epoch"], "refit": summary["metrics"].get("refit"),
            "train_seconds": round(time.perf_counter() - started, 1)}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    engine.dispose()
    return out


def main() -> None:
    # this folder is on sys.path when run as a script
    from bench_quality import run_experiment, show_rows

    columns = {"fresh": lambda r: f"{r['fresh_auc']:.4f}", "seen": lambda r: f"{r['seen_auc']:.4f}",
               "logloss": lambda r: f"{r['log_loss']:.4f}", "epochs": lambda r: str(r["best_epoch"]),
               "train s": lambda r: str(r["train_seconds"])}
    run_experiment(__doc__, "refit", run_seed, lambda res: show_rows(res, 52, columns), width=52)


if __name__ == "__main__":
    main()
