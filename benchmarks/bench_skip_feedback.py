"""Would skipped articles (shown, not clicked) improve the served model? A measured experiment.

The hidden-label reader of bench_quality_ceiling.py gains 6 points of the oracle's gap when it
also reads each user's skips. This asks what the product's own representation can get from
them, before anything is built into it: for each held-out world, train the default model
(``recsys train``), then add to its served logits, on the validation window and the test file,

    prior_clicks = <mean content anchors of the clicked history, anchors of the candidate>
    prior_skips  = <mean content anchors of the user's skips before t, anchors of the candidate>

(the anchors are the frozen encoders' features reduced to the item tower's principal
directions, exactly what the served content prior uses; skips are the user's shown-but-not-
clicked articles in labelled impressions of the store strictly before the impression, newest
first, capped). The weights of both terms are fitted on the validation window (a grid; the
skip weight may be negative or positive), as ``train_ctr`` fits the click prior's, and the
per-impression AUC is read on the test file. Nothing here is used by the product.

Rows per seed: the networks alone; networks + the fitted mean-similarity prior (what was served
when this was measured; the served prior has since gained a second-moment term, see
docs/model.md); networks + click prior + skip prior at each cap; the two priors alone.

A richer form, asked after the mean similarity gave half a point: the served model (both prior
terms) plus a logistic regression, fitted on the validation window, over *count* features per
modality of the clicks and of the newest 200 skips: the sum and mean of the anchor dot products
and of their squares, two kernel soft counts ``sum exp(beta (cos - 1))`` (beta 8 and 20), and the
list's length. A Bayesian reader's evidence about a topic is how often it was shown and clicked,
which a mean loses; the regression can weigh clicks against skips. Rows "served model + count
features" with clicks only and with clicks and skips.

Which of those could be served, and does the gain hold on another click model: rows for
subsets of the count features (", servable": without the kernel counts, i.e. only terms linear
in the candidate's anchors or their outer products, which user vectors can carry as they carry
the served prior; "skip means ..." and "skip sums ...": the skips' dot products and squares
alone; "nearest clicks": the cosine of the nearest clicked article and the mean of the 3
nearest, a multi-interest signal that no user vector carries), each fitted twice on the
validation window: by the pointwise logistic regression and (", listwise") by a conditional
logit over each impression's candidates, which like per-impression AUC ignores differences
between impressions. ``--foreign`` runs it all on the worlds of ``bench_quality_foreign.py``
(seeds 201-203, results ``skip_feedback_foreign.json``).

Usage:
  python benchmarks/bench_skip_feedback.py --seeds 101 102 103 --users 3000 --news 2500 --impressions 9000
  python benchmarks/bench_skip_feedback.py --foreign

Prints a table and writes benchmarks/results/skip_feedback.json (skip_feedback_foreign.json).
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np

CLICK_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # train_ctr's PRIOR_WEIGHTS
SKIP_WEIGHTS = (-32.0, -16.0, -8.0, -4.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0)
SKIP_CAPS = (20, 50, 200)


def count_features(imps, skipped, anchors: np.ndarray, blocks: int) -> np.ndarray:
    """(c, 2 * (8 * blocks + 1)) count features of every candidate against its impression's
    history (first half) and skip list (second half); see the module docstring."""
    k = anchors.shape[1] // blocks
    by_block = anchors.reshape(len(anchors), blocks, k).astype(np.float64)
    unit = by_block / np.maximum(np.linalg.norm(by_block, axis=2, keepdims=True), 1e-9)
    out = []
    for i in range(len(imps)):
        cand = imps.candidates(i)
        cols = []
        for lists in (imps, skipped):
            rows = lists.history_items[lists.history_offsets[i] : lists.history_offsets[i + 1]]
            n = max(len(rows), 1)
            for b in range(blocks):
                dots = by_block[cand, b] @ by_block[rows, b].T
                cos = unit[cand, b] @ unit[rows, b].T
                cols += [dots.sum(1), (dots**2).sum(1), dots.sum(1) / n, (dots**2).sum(1) / n,
                         np.exp(8 * (cos - 1)).sum(1), np.exp(20 * (cos - 1)).sum(1)]
                top = -np.sort(-cos, axis=1)[:, :3] if len(rows) else np.zeros((len(cand), 1))
                cols += [top[:, 0], top.mean(1)]  # the nearest listed article, the mean of the 3 nearest
            cols.append(np.full(len(cand), float(len(rows))))
        out.append(np.stack(cols, axis=1))
    return np.concatenate(out)


KINDS = ("sum", "sum2", "mean", "mean2", "kernel8", "kernel20", "max", "top3")  # count_features' columns per block
COUNTS = KINDS[:6]
# Linear in the candidate's anchors or their outer products, so a user vector can carry them
# (as it carries the served prior's mean and second moment); the kernels cannot.
SERVABLE = ("sum", "sum2", "mean", "mean2")


def feature_columns(blocks: int, lists: tuple[int, ...], kinds: tuple[str, ...], *, length: bool = True) -> list[int]:
    """Columns of ``count_features`` for the given lists (0 clicks, 1 skips) and kinds."""
    width = len(KINDS) * blocks + 1
    cols = []
    for lst in lists:
        cols += [lst * width + b * len(KINDS) + KINDS.index(k) for b in range(blocks) for k in kinds]
        if length:
            cols.append(lst * width + width - 1)
    return cols


def fit_listwise(x: np.ndarray, labels: np.ndarray, offsets: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """Weights ``w`` (f,) of a conditional logit: maximise the likelihood that each impression's
    clicked candidates win a softmax of ``x @ w`` over its candidates (+ ``l2/2 |w|^2``).

    Unlike a pointwise logistic regression this is blind to differences *between* impressions
    (per-user or per-time offsets), which is what per-impression AUC ranks. ``x`` (c, f) rows in
    candidate order, ``offsets`` (n + 1,) the impressions' candidate ranges, none empty.
    """
    from scipy.optimize import minimize

    owner = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    pos = labels == 1
    clicks = np.bincount(owner[pos], minlength=len(offsets) - 1).astype(np.float64)
    x_pos = x[pos].sum(0)

    def loss(w):
        z = x @ w
        top = np.maximum.reduceat(z, offsets[:-1])
        e = np.exp(z - top[owner])
        total = np.add.reduceat(e, offsets[:-1])
        lse = top + np.log(total)
        weight = clicks[owner] * e / total[owner]  # each click's softmax mass on every candidate
        value = -(z[pos].sum() - clicks @ lse) / pos.sum() + 0.5 * l2 * w @ w
        return value, -(x_pos - weight @ x) / pos.sum() + l2 * w

    start = np.zeros(x.shape[1])
    start[0] = 1.0  # the served model's logit alone
    return minimize(loss, start, jac=True, method="L-BFGS-B").x


def served_world(seed: int, args, root: Path):
    """The held-out world of ``seed`` ingested and the default model trained on it, with what the
    experiments read of it (shared with bench_user_category.py): the scoring catalogue, the
    version, its model and item embeddings, the validation window and the test file as the
    model reads them, and every user's skips in the store (label 0, a ``ClickLog``)."""
    from types import SimpleNamespace

    from bench_quality import config_overrides, file_impressions, ingested_world
    from recsys.config import load_config
    from recsys.data.interactions import ClickLog, with_logged_clicks
    from recsys.pipelines.scoring import VersionScorer, load_scoring_catalogue
    from recsys.pipelines.train import run_train
    from recsys.store import repository as repo
    from recsys.store import schema
    from recsys.versions import get_version

    world, ws, engine, _ = ingested_world(seed, args, root, foreign=args.foreign)
    config = load_config(None, config_overrides(args))
    run_train(engine, ws, config)
    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    version = get_version(engine)
    scorer = VersionScorer(version, catalogue)
    h = scorer.model.config.history_len
    users, rows, times = repo._labelled_items(  # the read behind read_click_log, with label 0
        engine, catalogue.features.news_ids, schema.impressions.c.user_id, object, schema.impression_items.c.label == 0
    )
    window = version.manifest["training_window"]
    valid = repo.read_impressions(engine, catalogue.features.news_ids, since=datetime.fromisoformat(window["valid_start"]),
                                  until=datetime.fromisoformat(window["until"]), history_len=h, labelled_only=True)
    return SimpleNamespace(
        world=world, engine=engine, catalogue=catalogue, version=version, model=scorer.model,
        embeddings=scorer.embeddings, skips=ClickLog.from_events(users, times, rows),
        valid=with_logged_clicks(valid, catalogue.clicks, h),
        test=file_impressions(world / "behaviors_test.tsv", catalogue, logged_clicks=True, history_len=h),
    )


def run_seed(seed: int, args, root: Path) -> dict:
    from bench_quality import oracle_auc
    from recsys.data.interactions import with_logged_clicks
    from recsys.models.training import mean_impression_auc

    t0 = time.perf_counter()
    setup = served_world(seed, args, root)
    world, engine, catalogue, model, embeddings = setup.world, setup.engine, setup.catalogue, setup.model, setup.embeddings
    skips, valid, test = setup.skips, setup.valid, setup.test
    d = model.config.embedding_dim
    if not model.config.prior_dim:
        raise SystemExit(f"seed {seed}: the trained model serves no content prior; nothing to compare against")
    anchors = embeddings[:, d:]  # unscaled: the served weight sits in the user vectors
    networks = model.with_content_prior(0.0)

    def mean_anchor_dot(imps, offsets, items) -> np.ndarray:
        """(c,) <mean anchors of each impression's list, anchors of its candidates>; 0 for an empty list."""
        lengths = np.diff(offsets)
        means = np.zeros((len(imps), anchors.shape[1]))
        np.add.at(means, np.repeat(np.arange(len(imps)), lengths), anchors[items])
        means /= np.maximum(lengths, 1)[:, None]
        owner = np.repeat(np.arange(len(imps)), np.diff(imps.candidate_offsets))
        return np.einsum("ij,ij->i", means[owner], anchors[imps.candidate_items])

    def skip_lists(imps, cap: int):
        """``imps`` with each history replaced by the user's skips: newest first, each article
        once, strictly before the impression, at most ``cap``."""
        empty = replace(imps, history_offsets=np.zeros(len(imps) + 1, np.int64), history_items=np.zeros(0, np.int32))
        return with_logged_clicks(empty, skips, cap)

    def terms(imps, cap: int):
        base = networks.score_impressions(imps, embeddings[:, :d], catalogue.log, catalogue.first_seen, logits=True)
        skipped = skip_lists(imps, cap)
        return (base.astype(np.float64), mean_anchor_dot(imps, imps.history_offsets, imps.history_items),
                mean_anchor_dot(imps, skipped.history_offsets, skipped.history_items), np.diff(skipped.history_offsets))

    def auc(imps, scores) -> float:
        return float(mean_impression_auc(imps.labels, scores, imps.candidate_offsets)[0])

    oracle = oracle_auc(world)
    gap = lambda a: (a - 0.5) / (oracle - 0.5)  # noqa: E731
    out = {"seed": seed, "oracle": oracle, "served_prior_weights": list(model.config.prior_weights), "rows": {}}
    for cap in SKIP_CAPS:
        vb, vc, vs, _ = terms(valid, cap)
        tb, tc, ts, tn = terms(test, cap)
        if cap == SKIP_CAPS[0]:
            wc = max(CLICK_WEIGHTS, key=lambda w: (auc(valid, vb + w * vc), -w))
            for name, scores, w in (("networks alone", tb, None), ("networks + mean-similarity prior", tb + wc * tc, [wc])):
                out["rows"][name] = {"impression_auc": auc(test, scores), "gap_closed": gap(auc(test, scores)), "weights": w}
        wc2, ws = max(((a, b) for a in CLICK_WEIGHTS for b in SKIP_WEIGHTS),
                      key=lambda w: (auc(valid, vb + w[0] * vc + w[1] * vs), -abs(w[1]), -w[0]))
        a = auc(test, tb + wc2 * tc + ws * ts)
        out["rows"][f"networks + click and skip priors, cap {cap}"] = {
            "impression_auc": a, "gap_closed": gap(a), "weights": [wc2, ws], "mean_skips": float(tn.mean())}
        wp = max(SKIP_WEIGHTS, key=lambda w: (auc(valid, vc + w * vs), -abs(w)))
        a = auc(test, tc + wp * ts)
        out["rows"][f"click and skip priors alone, cap {cap}"] = {"impression_auc": a, "gap_closed": gap(a), "weights": [1.0, wp]}
    # The served model plus a regression over count features (cap: the largest).
    from sklearn.linear_model import LogisticRegression

    served = [model.score_impressions(x, embeddings, catalogue.log, catalogue.first_seen, logits=True).astype(np.float64)
              for x in (valid, test)]
    counts = [count_features(x, skip_lists(x, SKIP_CAPS[-1]), anchors, model.anchor_blocks)
              for x in (valid, test)]
    a = auc(test, served[1])
    out["rows"]["served model"] = {"impression_auc": a, "gap_closed": gap(a), "weights": None}
    blocks = model.anchor_blocks
    for name, cols in (("clicks", feature_columns(blocks, (0,), COUNTS)),
                       ("clicks and skips", feature_columns(blocks, (0, 1), COUNTS)),
                       ("nearest clicks (max and top-3 cosine)", feature_columns(blocks, (0,), ("max", "top3"), length=False)),
                       ("clicks and skips, servable", feature_columns(blocks, (0, 1), SERVABLE)),
                       ("skip means of dot and dot^2", feature_columns(blocks, (1,), ("mean", "mean2"), length=False)),
                       ("skip sums of dot and dot^2", feature_columns(blocks, (1,), ("sum", "sum2"), length=False))):
        xv, xt = (np.column_stack([s_, c[:, cols]]) for s_, c in zip(served, counts))
        mu, sd = xv.mean(0), xv.std(0) + 1e-9
        fit = LogisticRegression(max_iter=2000).fit((xv - mu) / sd, valid.labels)
        a = auc(test, fit.decision_function((xt - mu) / sd))
        out["rows"][f"served model + count features, {name}"] = {"impression_auc": a, "gap_closed": gap(a), "weights": None}
        w = fit_listwise((xv - mu) / sd, valid.labels, valid.candidate_offsets)
        a = auc(test, ((xt - mu) / sd) @ w)
        out["rows"][f"served model + count features, {name}, listwise"] = {
            "impression_auc": a, "gap_closed": gap(a), "weights": [round(float(v), 4) for v in w]}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    engine.dispose()
    return out


def main() -> None:
    # this folder is on sys.path when run as a script
    from bench_quality import run_experiment, show_rows

    run_experiment(__doc__, "skip_feedback", run_seed, lambda res: show_rows(res, 48, {"weights": lambda r: str(r["weights"])}))


if __name__ == "__main__":
    main()
