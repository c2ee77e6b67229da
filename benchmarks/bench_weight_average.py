"""Does serving an average of the networks' weights along training rank better? (issue 4)

Two seeds of the same training differ by more than most changes measured here, and the mean
logit of three seeds gained 0.8-0.9 points of the gap over the average single model
(``bench_seed_ensemble.py``) at three times the training and scoring cost. An exponential
moving average of one training's weights over its last steps (``model.weight_average``, a
horizon in epochs; ``recsys.models.weight_average``) removes part of the same noise at no
serving cost. For each held-out world this trains the default model ``recsys train`` trains
(``model.weight_average`` = 0) and one per horizon of ``--horizons`` with the same seed, and
scores the test file as the product does: with the file's exposure (``evaluate``'s default)
and without (``--no-file-exposure``, what the nightly serves); AUC per impression over all
candidates and over fresh ones (never shown in the store).

Usage:
  python benchmarks/bench_weight_average.py --seeds 101 102 103 --users 3000 --news 2500 --impressions 9000
  python benchmarks/bench_weight_average.py --foreign           # seeds 201-203, tag 'foreign'

Prints a table and writes benchmarks/results/weight_average.json (weight_average_<tag>.json).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def run_seed(seed: int, args, root: Path) -> dict:
    from bench_quality import config_overrides, fresh_candidates, ingested_world, oracle_auc, test_file_row

    from recsys.config import load_config
    from recsys.pipelines.scoring import (VersionScorer, feature_times, iter_behavior_chunks, load_scoring_catalogue,
                                          read_file_shows)
    from recsys.pipelines.train import run_train
    from recsys.versions import get_version

    t0 = time.perf_counter()
    world, ws, engine, _ = ingested_world(seed, args, root, foreign=args.foreign)
    oracle = oracle_auc(world)
    catalogue = load_scoring_catalogue(engine, ws, load_config(None, config_overrides(args)), news=None, images=None)
    path = world / "behaviors_test.tsv"
    times = feature_times(catalogue, "popularity-at-end")
    shows = read_file_shows(path, catalogue)
    out = {"seed": seed, "oracle": oracle, "rows": {}, "train_seconds": {}, "best_epoch": {}}
    read = fresh = None
    for horizon in [0.0, *args.horizons]:
        config = load_config(None, {**config_overrides(args), "model.weight_average": horizon})
        t = time.perf_counter()
        result = run_train(engine, ws, config, make_current=False)
        name = "last step's weights (default)" if horizon == 0 else f"average over {horizon:g} epochs"
        out["train_seconds"][name] = round(time.perf_counter() - t, 1)
        version = get_version(engine, result["version"])
        out["best_epoch"][name] = version.manifest.get("metrics", {}).get("best_epoch")
        served = VersionScorer(version, catalogue, times=times, shows=shows)
        plain = VersionScorer(version, catalogue, times=times)
        if read is None:
            imps, _ = next(iter_behavior_chunks(path, catalogue, chunk_size=10**7, history_len=served.history_len))
            read = served.read(imps)
            fresh = fresh_candidates(read, catalogue)
        out["rows"][name] = test_file_row(read, served.score_read(read).astype(np.float64), oracle, fresh)
        out["rows"][f"{name}, no file exposure"] = test_file_row(
            read, plain.score_read(read).astype(np.float64), oracle, fresh)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    engine.dispose()
    return out


def main() -> None:
    # this folder is on sys.path when run as a script
    from bench_quality import run_experiment, show_rows

    def add_arguments(parser) -> None:
        parser.add_argument("--horizons", type=float, nargs="+", default=[0.5, 2.0],
                            help="model.weight_average values (epochs) to train beside the default 0")

    def show(res: dict) -> None:
        show_rows(res, 52, {"fresh": lambda r: f"{r['fresh_auc']:.4f}"},
                  note=f"; training {res['train_seconds']} s, best epochs {res['best_epoch']}")

    run_experiment(__doc__, "weight_average", run_seed, show, width=52, add_arguments=add_arguments)


if __name__ == "__main__":
    main()
