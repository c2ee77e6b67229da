"""Would averaging models trained with different seeds rank better? A measured experiment (issue 4).

Training on a few thousand impressions is noisy: two seeds of the same model (weights, dropout,
batch order) differ by several thousandths of AUC. Averaging the logits of K such models is the
textbook way to remove that part of the error, at K times the training and scoring cost. This
asks how much it buys before anything is built: for each held-out world, train the default
model ``recsys train`` would train with ``model.seed`` = 0, 1, ..., K-1, score the test file with
each as the product scores it (``VersionScorer``: its logged-click histories, content prior,
category affinity and calibrations), with the file's exposure (``evaluate``'s default) and
without (``--no-file-exposure``, what the nightly serves), and read the per-impression AUC of

- each member alone (seed 0 is exactly the default model of bench_quality.py),
- the mean of the members' served logits over the first 2, 3, ..., K members,

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


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


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
    # The store does not change between the trainings: one catalogue and one test file serve all.
    catalogue = load_scoring_catalogue(engine, ws, load_config(None, config_overrides(args)), news=None, images=None)
    path = world / "behaviors_test.tsv"
    times = feature_times(catalogue, "popularity-at-end")
    shows = read_file_shows(path, catalogue)
    out = {"seed": seed, "oracle": oracle, "rows": {}, "train_seconds": []}
    # Per reading, each member's served logit: with the file's exposure (evaluate's default) and
    # without (--no-file-exposure, what the nightly serves).
    logits: dict[str, list[np.ndarray]] = {"": [], ", no file exposure": []}
    read = fresh = None
    for member in range(MEMBERS):
        config = load_config(None, {**config_overrides(args), "model.seed": member})
        t = time.perf_counter()
        version = get_version(engine, run_train(engine, ws, config, make_current=False)["version"])
        out["train_seconds"].append(round(time.perf_counter() - t, 1))
        served = VersionScorer(version, catalogue, times=times, shows=shows)
        if read is None:
            imps, _ = next(iter_behavior_chunks(path, catalogue, chunk_size=10**7, history_len=served.history_len))
            read = served.read(imps)
            fresh = fresh_candidates(read, catalogue)
        logits[""].append(_logit(served.score_read(read)))
        logits[", no file exposure"].append(_logit(VersionScorer(version, catalogue, times=times).score_read(read)))
    for reading, members in logits.items():
        for member, scores in enumerate(members):
            out["rows"][f"seed {member} alone{reading}"] = test_file_row(read, scores, oracle, fresh)
        for k in range(2, MEMBERS + 1):
            out["rows"][f"mean logit of seeds 0-{k - 1}{reading}"] = test_file_row(
                read, np.mean(members[:k], axis=0), oracle, fresh)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    engine.dispose()
    return out


def main() -> None:
    # this folder is on sys.path when run as a script
    from bench_quality import run_experiment, show_rows

    def show(res: dict) -> None:
        show_rows(res, 48, {"fresh": lambda r: f"{r['fresh_auc']:.4f}"}, note=f"; training {res['train_seconds']} s")

    run_experiment(__doc__, "seed_ensemble", run_seed, show, width=48)


if __name__ == "__main__":
    main()
