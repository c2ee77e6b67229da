"""Would a user's click-through rate per category and subcategory improve the served model?
A measured experiment.

The skip-feedback experiment (bench_skip_feedback.py) read a user's skipped articles through
the content anchors and gained 0.5 to 1.5 points. A click model on real news data reads the
publisher's own labels more directly: how often this user clicked, and skipped, articles of the
candidate's category and subcategory before the impression. That is a standard CTR feature
(user x category), it names no internals of any generator, and a product can serve it through
the user vector (one column per category) if it pays. For each held-out world, train the
default model (``recsys train``), then add to its served logits (no file exposure: what the
nightly serves), on the validation window and the test file, a regression over

    per key (category, subcategory) of the candidate:
      clicks  c = the user's history articles (History column + logged clicks, as the model reads) of that key
      skips   s = the user's shown-but-not-clicked articles of that key in the store's labelled
                  impressions strictly before the impression (each article once, newest 1000)
      log1p(c), log1p(s), c / |history|, s / |skips|,
      lift = log((c + 0.5) / (s + 0.5)) - log((|history| + 0.5) / (|skips| + 0.5))
    and log1p(|history|), log1p(|skips|),

fitted on the validation window by a pointwise logistic regression and by a listwise
conditional logit (``bench_skip_feedback.fit_listwise``), read as per-impression AUC on the
test file. Nothing here is used by the product.

Usage:
  python benchmarks/bench_user_category.py --seeds 101 102 103 --users 3000 --news 2500 --impressions 9000
  python benchmarks/bench_user_category.py --foreign

Prints a table and writes benchmarks/results/user_category.json (user_category_foreign.json).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

SKIP_CAP = 1000
# Columns of key_features per key; the two totals follow the keys.
KEY_COLUMNS = ("log_clicks", "log_skips", "click_share", "skip_share", "lift")


def key_features(imps, skipped, codes: list[np.ndarray]) -> np.ndarray:
    """(c, 5 * len(codes) + 2) features of every candidate: per key code array (n_items,) the
    columns of KEY_COLUMNS, then log1p of the history's and the skip list's lengths."""
    out = []
    for i in range(len(imps)):
        cand = imps.candidates(i)
        hist = imps.history_items[imps.history_offsets[i] : imps.history_offsets[i + 1]]
        skip = skipped.history_items[skipped.history_offsets[i] : skipped.history_offsets[i + 1]]
        nc, ns = len(hist), len(skip)
        cols = []
        for code in codes:
            size = int(code.max()) + 1
            c = np.bincount(code[hist], minlength=size)[code[cand]].astype(np.float64)
            s = np.bincount(code[skip], minlength=size)[code[cand]].astype(np.float64)
            lift = np.log((c + 0.5) / (s + 0.5)) - np.log((nc + 0.5) / (ns + 0.5))
            cols += [np.log1p(c), np.log1p(s), c / max(nc, 1), s / max(ns, 1), lift]
        cols += [np.full(len(cand), np.log1p(nc)), np.full(len(cand), np.log1p(ns))]
        out.append(np.stack(cols, axis=1))
    return np.concatenate(out)


def skip_lists(imps, skips, cap: int = SKIP_CAP):
    """``imps`` with each user's skips in the store strictly before the impression (newest
    ``cap``, a ``ClickLog`` of label-0 items) in place of their histories."""
    from recsys.data.interactions import with_logged_clicks

    empty = replace(imps, history_offsets=np.zeros(len(imps) + 1, np.int64), history_items=np.zeros(0, np.int32))
    return with_logged_clicks(empty, skips, cap)


def impression_auc(imps, scores) -> float:
    """Mean per-impression AUC of ``scores`` over ``imps``."""
    from recsys.models.training import mean_impression_auc

    return float(mean_impression_auc(imps.labels, scores, imps.candidate_offsets)[0])


def columns(keys: tuple[int, ...], kinds: tuple[str, ...], n_keys: int = 2) -> list[int]:
    """Columns of ``key_features`` for the given keys (0 category, 1 subcategory) and kinds,
    plus the two totals."""
    cols = [k * len(KEY_COLUMNS) + KEY_COLUMNS.index(kind) for k in keys for kind in kinds]
    return cols + [n_keys * len(KEY_COLUMNS), n_keys * len(KEY_COLUMNS) + 1]


def run_seed(seed: int, args, root: Path) -> dict:
    from bench_quality import oracle_auc
    from bench_skip_feedback import fit_listwise, served_world
    from sklearn.linear_model import LogisticRegression

    from recsys.columns import CATEGORY, NEWS_ID, SUBCATEGORY

    t0 = time.perf_counter()
    setup = served_world(seed, args, root)
    world, engine, catalogue, model, embeddings = setup.world, setup.engine, setup.catalogue, setup.model, setup.embeddings
    skips, valid, test = setup.skips, setup.valid, setup.test
    by_id = catalogue.news.set_index(NEWS_ID)
    codes = [np.unique(by_id.loc[catalogue.features.news_ids, key].to_numpy(str), return_inverse=True)[1]
             for key in (CATEGORY, SUBCATEGORY)]

    auc = impression_auc
    served = [model.score_impressions(x, embeddings, catalogue.log, catalogue.first_seen, logits=True).astype(np.float64)
              for x in (valid, test)]
    feats = [key_features(x, skip_lists(x, skips), codes) for x in (valid, test)]
    oracle = oracle_auc(world)
    gap = lambda a: (a - 0.5) / (oracle - 0.5)  # noqa: E731
    a = auc(test, served[1])
    out = {"seed": seed, "oracle": oracle, "categories": int(codes[0].max()) + 1,
           "subcategories": int(codes[1].max()) + 1, "rows": {"served model": {"impression_auc": a, "gap_closed": gap(a)}}}
    clicks_only = ("log_clicks", "click_share")
    for name, cols in (("category clicks", columns((0,), clicks_only)),
                       ("category clicks and skips", columns((0,), KEY_COLUMNS)),
                       ("subcategory clicks and skips", columns((1,), KEY_COLUMNS)),
                       ("category and subcategory clicks", columns((0, 1), clicks_only)),
                       ("category and subcategory clicks and skips", columns((0, 1), KEY_COLUMNS))):
        xv, xt = (np.column_stack([s_, f[:, cols]]) for s_, f in zip(served, feats))
        mu, sd = xv.mean(0), xv.std(0) + 1e-9
        fit = LogisticRegression(max_iter=2000).fit((xv - mu) / sd, valid.labels)
        a = auc(test, fit.decision_function((xt - mu) / sd))
        out["rows"][f"served + {name}"] = {"impression_auc": a, "gap_closed": gap(a)}
        w = fit_listwise((xv - mu) / sd, valid.labels, valid.candidate_offsets)
        a = auc(test, ((xt - mu) / sd) @ w)
        out["rows"][f"served + {name}, listwise"] = {"impression_auc": a, "gap_closed": gap(a),
                                                    "weights": [round(float(v), 4) for v in w]}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    engine.dispose()
    return out


def main() -> None:
    # this folder is on sys.path when run as a script
    from bench_quality import run_experiment, show_rows

    run_experiment(__doc__, "user_category", run_seed, lambda res: show_rows(res, 56), width=56)


if __name__ == "__main__":
    main()
