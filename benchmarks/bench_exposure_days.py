"""Does the file-exposure calibration, fitted on a one-day validation window, read every day of a
longer scored file as well as its first? A measured check.

``recsys train`` fits the file-exposure calibration (docs/model.md, "Exposure in the scored
file") on its validation window (a day by default) read as a later file. A scored file can be
longer: the sample's test files span two days. For each held-out world, train the default
model (``recsys train``), score the test file as ``recsys evaluate`` does (with the file's
exposure, ``--features-at popularity-at-end``), and per day of the file compare the share of the
oracle's gap closed by

- the product (the validation-fitted calibration),
- the same model without the file's exposure (``--no-file-exposure``),
- the same exposure columns as the product reads them, fitted on that day's own labels (two
  folds by impression parity, each scored by the other's fit): what a calibration fitted for
  that day could reach.

The gap between the first and the last is what the validation fit loses on each day. A fourth
column reads the product's calibration with every earlier show of the file, as it was read
before the calibration kept its window (``window_hours``): how much the window matters on a
file much longer than the validation window (``--test-days``: the generator's test file spans
that many days, 2 by default; the same number of test impressions in all). Nothing here is
used by the product.

Usage:
  python benchmarks/bench_exposure_days.py --seeds 101 102 103 --users 3000 --news 2500 --impressions 9000 [--tag TAG]
  python benchmarks/bench_exposure_days.py --seeds 101 102 103 --users 3000 --news 2500 --impressions 9000 --test-days 5 --tag five_days

Prints a table and writes benchmarks/results/exposure_days[_TAG].json.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def run_seed(seed: int, args, root: Path) -> dict:
    from bench_quality import config_overrides, ingested_world, oracle_auc, subset_auc
    from sklearn.linear_model import LogisticRegression

    from recsys.config import load_config
    from recsys.data.interactions import candidate_impression_rows
    from recsys.models.exposure import exposure_design
    from recsys.models.linear_blend import sigmoid
    from recsys.pipelines.scoring import (VersionScorer, feature_times, iter_behavior_chunks, load_scoring_catalogue,
                                          read_file_shows)
    from recsys.pipelines.train import run_train
    from recsys.versions import get_version

    t0 = time.perf_counter()
    world, ws, engine, _ = ingested_world(seed, args, root, foreign=args.foreign, test_days=args.test_days)
    config = load_config(None, config_overrides(args))
    run_train(engine, ws, config)
    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    mv = get_version(engine)
    path = world / "behaviors_test.tsv"
    times = feature_times(catalogue, "popularity-at-end")
    shows = read_file_shows(path, catalogue)
    served = VersionScorer(mv, catalogue, times=times, shows=shows)
    plain = VersionScorer(mv, catalogue, times=times)
    imps, _ = next(iter_behavior_chunks(path, catalogue, chunk_size=10**7, history_len=served.history_len))
    read = served.read(imps)
    product, without = served.score_read(read).astype(np.float64), plain.score_read(read).astype(np.float64)
    calibration = served.exposure
    # None: the code before the window (the before_window run), whose earlier() takes none
    window = getattr(calibration, "window_hours", None)
    owner = candidate_impression_rows(read)
    counts, hours = shows.earlier(read.candidate_items, read.times[owner],
                                  **({"window_hours": window} if window is not None else {}))
    clipped = np.clip(without, 1e-12, 1 - 1e-12)
    logit_without = np.log(clipped / (1 - clipped))
    fresh_candidates = served.fresh[read.candidate_items]
    design = exposure_design(logit_without, counts, hours, fresh_candidates)
    # The product's own reading, rebuilt here: what the column below changes is only the window.
    np.testing.assert_allclose(sigmoid(calibration.apply(design)), product, atol=1e-4)
    # The same calibration reading every earlier show of the file (no window).
    every_counts, every_hours = shows.earlier(read.candidate_items, read.times[owner])
    every_show = calibration.logits(logit_without, every_counts, every_hours, fresh_candidates)
    oracle = oracle_auc(world)
    gap = lambda a: (a - 0.5) / (oracle - 0.5)  # noqa: E731
    day = ((read.times - read.times.min()) // np.timedelta64(1, "D")).astype(np.int64)
    out = {"seed": seed, "oracle": oracle, "window_hours": window, "days": {}, "rows": {}}
    for d in np.unique(day):
        keep = (day == d)[owner]
        refit = np.zeros(len(product))
        for fold in (0, 1):
            fit, score = keep & (owner % 2 != fold), keep & (owner % 2 == fold)
            model = LogisticRegression(C=1.0, max_iter=2000).fit(design[fit], read.labels[fit])
            refit[score] = model.decision_function(design[score])
        fresh = keep & fresh_candidates
        out["days"][int(d)] = {
            "impressions": int((day == d).sum()), "fresh_mean_hours": float(hours[fresh & (counts > 0)].mean()),
            "product": gap(subset_auc(read, product, keep)), "no_file_exposure": gap(subset_auc(read, without, keep)),
            "every_earlier_show": gap(subset_auc(read, every_show, keep)),
            "fitted_on_the_day": gap(subset_auc(read, refit, keep))}
    everything = np.ones(len(product), dtype=bool)
    for name, scores in (("product", product), ("no file exposure", without), ("every earlier show", every_show)):
        a = subset_auc(read, scores, everything)
        out["rows"][name] = {"impression_auc": a, "gap_closed": gap(a)}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    engine.dispose()
    return out


def show(res: dict) -> None:
    print(f"\nseed {res['seed']} ({res['seconds']} s), oracle {res['oracle']:.4f}, window {res['window_hours']} h")
    print(f"  {'day':>3} {'impr.':>6} {'fresh h':>8} {'product':>8} {'no expo':>8} {'every':>8} {'day fit':>8} {'lost':>6}")
    for d, r in res["days"].items():
        every = f"{100 * r['every_earlier_show']:>7.1f}%" if "every_earlier_show" in r else f"{'':>8}"
        print(f"  {d:>3} {r['impressions']:>6} {r['fresh_mean_hours']:>8.1f} {100 * r['product']:>7.1f}% "
              f"{100 * r['no_file_exposure']:>7.1f}% {every} {100 * r['fitted_on_the_day']:>7.1f}% "
              f"{100 * (r['fitted_on_the_day'] - r['product']):>5.1f}")


def main() -> None:
    import argparse

    # this folder is on sys.path when run as a script
    from bench_quality import mean_gap_closed, on_held_out_worlds, parse_experiment_args, write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test-days", type=int, default=2, help="days the generator's test file spans")
    args = parse_experiment_args(parser)
    if args.foreign and args.test_days != 2:
        raise SystemExit("--test-days: the second click model's worlds have a fixed test file")
    results = on_held_out_worlds(args, run_seed, "recsys-exposure-days-", show=show)
    days = sorted({d for r in results for d in r["days"]})
    by_day = {d: {k: float(np.mean([r["days"][d][k] for r in results if d in r["days"]]))
                  for k in ("product", "no_file_exposure", "every_earlier_show", "fitted_on_the_day")} for d in days}
    print("\nmean gap closed over seeds, per day of the file:")
    for d, r in by_day.items():
        print(f"  day {d}: product {100 * r['product']:.1f}%, no file exposure {100 * r['no_file_exposure']:.1f}%, "
              f"every earlier show {100 * r['every_earlier_show']:.1f}%, "
              f"fitted on the day {100 * r['fitted_on_the_day']:.1f}% (lost {100 * (r['fitted_on_the_day'] - r['product']):.1f})")
    mean = mean_gap_closed(results)
    print("  all days: " + ", ".join(f"{name} {100 * v:.1f}%" for name, v in mean.items()))
    write_results("exposure_days", args, results, mean_gap_closed=mean, mean_per_day=by_day)


if __name__ == "__main__":
    main()
