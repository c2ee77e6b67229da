"""At what time should a later window's side features be read? A measured experiment (issue 4).

Popularity (clicks and shows in the 24 h before ``t``) and age are computed at a time ``t``.
Read at each impression's own time with the store's log, an impression a day after the store's
last event gets a popularity window that holds no data, so every article reads as unpopular. The
nightly job instead scores with tonight's statistics. This benchmark measures where
``recsys evaluate`` / ``recsys predict`` should read them, on held-out worlds, for two trainings:

- ``clock 0``: the default, training and validation features at each impression's own time;
- ``clock 24``: ``model.feature_clock_hours = 24``, training and validation features at the last
  UTC midnight (what a nightly job serves: an article published since has no shows, age 0).

Each model scores the test file the three ways of ``--features-at``: both at each impression's
time (``impression``), both at ``min(t, end of the store's log)`` (``store-end``), and popularity
at ``min(t, end)`` with the age at ``t`` (``popularity-at-end``, the default since this
benchmark measured it). ``--file-first-seen`` adds the default reading with never-shown
articles dated by their first show in the test file (measured, not built: docs/model.md).
Rows: AUC per impression over all candidates, over fresh ones (never shown in the store) and
over seen ones, with the mean predicted probability of each group against its click rate.

Usage:
  python benchmarks/bench_feature_time.py --seeds 101 102 103
  python benchmarks/bench_feature_time.py --foreign            # seeds 201-203, tag 'foreign'
  python benchmarks/bench_feature_time.py --clocks 0 --users 12000 --impressions 36000 --tag users12k_clock0
  python benchmarks/bench_feature_time.py --clocks 0 --file-first-seen --tag clock0_file_first_seen

Prints a table and writes benchmarks/results/feature_time.json (feature_time_<tag>.json).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

CLOCKS = (0.0, 24.0)
# row label -> --features-at mode (recsys.pipelines.scoring.FEATURES_AT)
READINGS = {"impression time": "impression", "store's end": "store-end",
            "store's end, age at impression time": "popularity-at-end"}

# a candidate reading: articles the store never showed get their first show in the scored file
# as first_seen (the same definition the store uses for the rest), not "brand new" at every show
FILE_FIRST_SEEN = "store's end, age at impression time, unseen articles aged from the file"


def file_first_seen(imps, first_seen: np.ndarray) -> np.ndarray:
    """(n,) ``first_seen`` with each never-shown (NaT) article's earliest show among ``imps``."""
    from recsys.data.interactions import first_shown

    return np.where(np.isnat(first_seen), first_shown([imps], len(first_seen)), np.asarray(first_seen, dtype="datetime64[s]"))


def run_seed(seed: int, args, root: Path) -> dict:
    from bench_quality import config_overrides, file_impressions, fresh_candidates, ingested_world, oracle_auc, test_file_row
    from recsys.config import load_config
    from recsys.pipelines.scoring import VersionScorer, feature_times, load_scoring_catalogue
    from recsys.pipelines.train import run_train
    from recsys.versions import get_version

    t0 = time.perf_counter()
    world, ws, engine, _ = ingested_world(seed, args, root, foreign=args.foreign)
    oracle = oracle_auc(world)
    # The store does not change between the trainings: one catalogue and one test file serve both.
    catalogue = load_scoring_catalogue(engine, ws, load_config(None, config_overrides(args)), news=None, images=None)
    out = {"seed": seed, "oracle": oracle, "rows": {}}
    test = fresh = None
    readings = {**READINGS, **({FILE_FIRST_SEEN: "popularity-at-end"} if args.file_first_seen else {})}
    for clock in args.clocks:
        config = load_config(None, {**config_overrides(args), "model.feature_clock_hours": clock})
        run_train(engine, ws, config)
        scorer = VersionScorer(get_version(engine), catalogue)
        if test is None:
            test = file_impressions(world / "behaviors_test.tsv", catalogue, logged_clicks=True, history_len=scorer.history_len)
            fresh = fresh_candidates(test, catalogue)
            dated = file_first_seen(test, catalogue.first_seen) if args.file_first_seen else None
        for reading, mode in readings.items():
            at = feature_times(catalogue, mode)
            first_seen = dated if reading == FILE_FIRST_SEEN else catalogue.first_seen
            scores = scorer.model.score_impressions(test, scorer.embeddings, catalogue.log, first_seen,
                                                    popularity_until=at.popularity_until, age_until=at.age_until)
            out["rows"][f"clock {clock:g}, features at {reading}"] = {
                **test_file_row(test, scores, oracle, fresh),
                "mean_p_fresh": float(scores[fresh].mean()), "mean_p_seen": float(scores[~fresh].mean()),
                "click_rate_fresh": float((test.labels[fresh] == 1).mean()),
                "click_rate_seen": float((test.labels[~fresh] == 1).mean())}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    engine.dispose()
    return out


def main() -> None:
    # this folder is on sys.path when run as a script
    from bench_quality import run_experiment, show_rows

    columns = {"fresh": lambda r: f"{r['fresh_auc']:.4f}", "seen": lambda r: f"{r['seen_auc']:.4f}",
               "mean p fresh / seen (click rate)": lambda r: f"{r['mean_p_fresh']:.4f} / {r['mean_p_seen']:.4f} "
               f"({r['click_rate_fresh']:.4f} / {r['click_rate_seen']:.4f})"}

    def add_arguments(parser) -> None:
        parser.add_argument("--clocks", type=float, nargs="+", default=list(CLOCKS),
                            help="model.feature_clock_hours of each training (default: 0 24)")
        parser.add_argument("--file-first-seen", action="store_true",
                            help="also score with never-shown articles aged from their first show in the test file")

    run_experiment(__doc__, "feature_time", run_seed, lambda res: show_rows(res, 58, columns), width=58,
                   add_arguments=add_arguments)


if __name__ == "__main__":
    main()
