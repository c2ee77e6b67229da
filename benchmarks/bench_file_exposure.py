"""Would counting how often the scored file itself shows each candidate rank better? The
experiment behind the file exposure of `predict` and `evaluate` (issue 4: fresh articles have no popularity signal).

Half of a test window's candidates are articles published after training: the model's side
features (clicks and shows in the 24 h before the store's end) read nothing for them, so
their popularity is unknown. The file being scored does show them, though, and how often an
article is shown says how hard the publisher pushes it (top MIND solutions counted impressions
in the test file). This asks what that is worth before anything is built: for each held-out
world, train the default model (``recsys train``), score the test file with it (as served), and
read the per-impression AUC of

- the served model,
- the candidate's shows in the scored file in the 24 h before the impression (strictly
  before, so no impression reads itself or a later one; labels are never read): log1p(count),
- the served model's logit + w * log1p(count), with w chosen on the other half of the
  impressions (two folds by impression row parity, each fitted on the other; the grid below),
  so that no impression is scored with a weight fitted on itself,
- the served model's logit with the file's exposure evidence for fresh candidates (their earlier
  shows in the file and the hours since their first one) and for the others, combined by a
  logistic regression cross-fitted on the labels of the other half (``logistic_blend``),
- the same with, for the candidates the store has shown, their popularity over the whole store
  (not the side features' 24 h window: shows, clicks and a smoothed click-through logit), alone
  and on top of the file's exposure: does a longer popularity window carry more than the model
  already reads?

over all candidates and over fresh ones (never shown in the store). The served model reads as
``recsys evaluate --no-file-exposure`` does (popularity at the store's end). This was the experiment
before the product read the file's exposure: ``recsys predict`` and ``recsys evaluate`` now
apply the same five columns with weights ``recsys train`` fits on its validation window
(``recsys.models.exposure``), which ``bench_quality.py`` and ``bench_quality_foreign.py``
measure; the cross-fitted blend here, fitted on the test file's own labels, is the reference
it is compared with. The nightly job cannot read it (tomorrow's shows are unknown tonight).

Usage:
  python benchmarks/bench_file_exposure.py --seeds 101 102 103
  python benchmarks/bench_file_exposure.py --foreign            # seeds 201-203, tag 'foreign'

Prints a table and writes benchmarks/results/file_exposure.json (file_exposure_<tag>.json).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

WINDOW = np.timedelta64(24, "h")
WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)


def file_shows(imps, window: np.timedelta64 = WINDOW) -> np.ndarray:
    """(c,) int64: for each candidate, how many impressions of the same file showed the same
    article in ``[t - window, t)``, t its own impression's time (the side features' own count)."""
    from recsys.data.interactions import InteractionLog, candidate_impression_rows

    items = imps.candidate_items
    times = imps.times[candidate_impression_rows(imps)]
    # Every show of the file, its label never read (clicks all 0): only the show count is used.
    log = InteractionLog.from_events(items, times, np.zeros(len(items), np.int8), int(items.max()) + 1)
    return log.window_counts(items, times, window=window)[1]


def file_history(imps) -> tuple[np.ndarray, np.ndarray]:
    """(c,) int64 shows of each candidate's article in the same file strictly before its
    impression (all of them, not a window) and (c,) float64 hours since the first of those (0
    when none): how hard the file pushes an article, and for how long it has."""
    from recsys.data.interactions import candidate_impression_rows, first_shown

    times = imps.times[candidate_impression_rows(imps)].astype("datetime64[s]")
    span = times.max() - times.min() + np.timedelta64(1, "s")
    counts = file_shows(imps, window=span)
    # With an earlier show, the file's first show of the article is the first of those.
    first = first_shown([imps], int(imps.candidate_items.max()) + 1)[imps.candidate_items]
    hours = np.where(counts > 0, (times - first) / np.timedelta64(1, "h"), 0.0)
    return counts, hours


def exposure_columns(imps, fresh: np.ndarray) -> list[np.ndarray]:
    """The file's exposure: for fresh candidates log1p(earlier shows in the file), log1p(hours
    since their first show in the file) and a fresh flag; for the others log1p(earlier shows).
    The model's own popularity features read nothing for fresh articles, so the file's
    evidence enters for them apart."""
    counts, hours = file_history(imps)
    f = fresh.astype(np.float64)
    return [f * np.log1p(counts), f * np.log1p(hours), f, (1 - f) * np.log1p(counts)]


def store_popularity_columns(imps, log, fresh: np.ndarray) -> list[np.ndarray]:
    """For the candidates the store has shown, popularity over the whole store at its end, not
    the side features' 24 h window: log1p(shows), log1p(clicks) and a smoothed click-through
    logit log((clicks + 1) / (shows - clicks + 20)); 0 for fresh candidates."""
    items = imps.candidate_items
    at = np.full(len(items), log.end)
    clicks, shows = log.window_counts(items, at, window=at[0] - log.times.min())
    seen = 1.0 - fresh.astype(np.float64)
    ctr = np.log((clicks + 1.0) / (shows - clicks + 20.0))
    return [seen * np.log1p(shows), seen * np.log1p(clicks), seen * ctr]


def logistic_blend(imps, logits: np.ndarray, columns: list[np.ndarray]) -> tuple[np.ndarray, list[list[float]]]:
    """The served logit and ``columns`` combined by a logistic regression on the labels of the
    other fold (two folds by impression row parity, as ``cross_fitted``)."""
    from sklearn.linear_model import LogisticRegression

    from recsys.data.interactions import candidate_impression_rows

    x = np.column_stack([logits, *columns])
    fold = candidate_impression_rows(imps) % 2
    out, coefs = np.empty_like(logits), []
    for k in (0, 1):
        model = LogisticRegression(C=1.0, max_iter=1000).fit(x[fold != k], imps.labels[fold != k])
        coefs.append([round(float(c), 4) for c in model.coef_[0]])
        out[fold == k] = model.decision_function(x[fold == k])
    return out, coefs


def cross_fitted(imps, logits: np.ndarray, feature: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """logits + w * feature, w from ``WEIGHTS`` maximising the mean per-impression AUC on the
    other fold (impression rows of the other parity); the scores and the two weights."""
    from bench_quality import subset_auc

    from recsys.data.interactions import candidate_impression_rows

    fold = candidate_impression_rows(imps) % 2
    out, chosen = np.empty_like(logits), []
    for k in (0, 1):
        fit = fold != k
        best = max(WEIGHTS, key=lambda w: subset_auc(imps, logits + w * feature, fit))
        chosen.append(best)
        out[fold == k] = (logits + best * feature)[fold == k]
    return out, chosen


def run_seed(seed: int, args, root: Path) -> dict:
    from bench_quality import config_overrides, file_impressions, fresh_candidates, ingested_world, oracle_auc, test_file_row
    from recsys.config import load_config
    from recsys.pipelines.scoring import VersionScorer, load_scoring_catalogue
    from recsys.pipelines.train import run_train
    from recsys.versions import get_version

    t0 = time.perf_counter()
    world, ws, engine, _ = ingested_world(seed, args, root, foreign=args.foreign)
    oracle = oracle_auc(world)
    config = load_config(None, config_overrides(args))
    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    version = run_train(engine, ws, config, make_current=False)["version"]
    scorer = VersionScorer(get_version(engine, version), catalogue)
    test = file_impressions(world / "behaviors_test.tsv", catalogue, logged_clicks=True, history_len=scorer.history_len)
    # Read as `recsys evaluate --no-file-exposure` does (`--features-at popularity-at-end`).
    logits = scorer.model.score_impressions(test, scorer.embeddings, catalogue.log, catalogue.first_seen,
                                            popularity_until=catalogue.end, logits=True).astype(np.float64)
    fresh = fresh_candidates(test, catalogue)
    shows = np.log1p(file_shows(test)).astype(np.float64)
    # Ties broken by a tiny, fixed jitter: many candidates share a count.
    jitter = np.random.default_rng(0).random(len(shows)) * 1e-6
    blended, weights = cross_fitted(test, logits, shows)

    out = {"seed": seed, "oracle": oracle, "rows": {}, "weights": weights,
           "shows_fresh_mean": float(np.expm1(shows[fresh]).mean()), "shows_seen_mean": float(np.expm1(shows[~fresh]).mean())}
    out["rows"]["served model"] = test_file_row(test, logits, oracle, fresh)
    out["rows"]["shows in the file, last 24 h"] = test_file_row(test, shows + jitter, oracle, fresh)
    out["rows"]["served model + w * shows (cross-fitted w)"] = test_file_row(test, blended, oracle, fresh)
    expo, store = exposure_columns(test, fresh), store_popularity_columns(test, catalogue.log, fresh)
    exposure, coefs = logistic_blend(test, logits, expo)
    out["rows"]["served model + file exposure (cross-fitted logistic)"] = test_file_row(test, exposure, oracle, fresh)
    out["logistic_coefficients"] = coefs
    popular, _ = logistic_blend(test, logits, store)
    out["rows"]["served model + the store's whole-log popularity (cross-fitted logistic)"] = test_file_row(test, popular, oracle, fresh)
    both, out["logistic_coefficients_with_store"] = logistic_blend(test, logits, expo + store)
    out["rows"]["served model + file exposure + whole-log popularity"] = test_file_row(test, both, oracle, fresh)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    engine.dispose()
    return out


def main() -> None:
    # this folder is on sys.path when run as a script
    from bench_quality import run_experiment, show_rows

    def show(res: dict) -> None:
        show_rows(res, 42, {"fresh": lambda r: f"{r['fresh_auc']:.4f}", "seen": lambda r: f"{r['seen_auc']:.4f}"},
                  note=f"; weights {res['weights']}, mean shows fresh {res['shows_fresh_mean']:.1f} / seen {res['shows_seen_mean']:.1f}")

    run_experiment(__doc__, "file_exposure", run_seed, show, width=42)


if __name__ == "__main__":
    main()
