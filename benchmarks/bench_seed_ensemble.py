"""Would averaging models trained with different seeds rank better? A measured experiment (issue 4).

Training on a few thousand impressions is noisy: two seeds of the same model (weights, dropout,
batch order) differ by several thousandths of AUC. Averaging the logits of K such models is the
textbook way to remove that part of the error, at K times the training and scoring cost. This
asks how much it buys before anything is built: for each held-out world, train the default
model ``recsys train`` would train with ``model.seed`` = 0, 1, ..., K-1, score the test file with
each (each as served: its logged-click histories, its fitted content prior), and read the
per-impression AUC of

- each member alone (seed 0 is exactly the default model of bench_quality.py),
- the mean of the members' logits over the first 2, 3, ..., K members,

over all candidates and over fresh ones (never shown in the store). Nothing here is used by the
product.

Usage:
  python benchmarks/bench_seed_ensemble.py --seeds 101 102 103
  python benchmarks/bench_seed_ensemble.py --foreign            # seeds 201-203, tag 'foreign'

Prints a table and writes benchmarks/results/seed_ensemble.json (seed_ensemble_<tag>.json).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

MEMBERS = 3


def run_seed(seed: int, args, root: Path) -> dict:
    from bench_quality import config_overrides, file_impressions, fresh_candidates, ingested_world, oracle_auc, test_file_row
    from recsys.config import load_config
    from recsys.pipelines.scoring import VersionScorer, load_scoring_catalogue
    from recsys.pipelines.train import run_train
    from recsys.versions import get_version

    t0 = time.perf_counter()
    world, ws, engine, _ = ingested_world(seed, args, root, foreign=args.foreign)
    oracle = oracle_auc(world)
    # The store does not change between the trainings: one catalogue and one test file serve all.
    catalogue = load_scoring_catalogue(engine, ws, load_config(None, config_overrides(args)), news=None, images=None)
    out = {"seed": seed, "oracle": oracle, "rows": {}, "train_seconds": []}
    logits, test = [], None
    for member in range(MEMBERS):
        config = load_config(None, {**config_overrides(args), "model.seed": member})
        t = time.perf_counter()
        version = run_train(engine, ws, config, make_current=False)["version"]
        out["train_seconds"].append(round(time.perf_counter() - t, 1))
        scorer = VersionScorer(get_version(engine, version), catalogue)
        if test is None:
            test = file_impressions(world / "behaviors_test.tsv", catalogue, logged_clicks=True, history_len=scorer.history_len)
        logits.append(scorer.model.score_impressions(test, scorer.embeddings, catalogue.log, catalogue.first_seen,
                                                     logits=True).astype(np.float64))
    fresh = fresh_candidates(test, catalogue)

    for member, scores in enumerate(logits):
        out["rows"][f"seed {member} alone"] = test_file_row(test, scores, oracle, fresh)
    for k in range(2, MEMBERS + 1):
        out["rows"][f"mean logit of seeds 0-{k - 1}"] = test_file_row(test, np.mean(logits[:k], axis=0), oracle, fresh)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    engine.dispose()
    return out


def main() -> None:
    # this folder is on sys.path when run as a script
    from bench_quality import run_experiment, show_rows

    def show(res: dict) -> None:
        show_rows(res, 28, {"fresh": lambda r: f"{r['fresh_auc']:.4f}"}, note=f"; training {res['train_seconds']} s")

    run_experiment(__doc__, "seed_ensemble", run_seed, show, width=28)


if __name__ == "__main__":
    main()
