"""Does anything beyond the category affinity's counts read a user's skips better? A measured
experiment.

The category affinity (``model.category_affinity`` with its content clusters) counts a user's
clicks and skips per key: the candidate's category, subcategory and nearest text and image
centre. A hard cluster code loses where in a cluster an article sits. Three continuous readings
of the same clicks and skips, in the content anchors' space (the served vectors' fixed
per-modality blocks, what every serving path has):

- skip moments: per modality, the mean dot product of the candidate with the user's skipped
  articles and its mean square (``bench_skip_feedback``'s ``mean`` / ``mean2``), and the number
  of skips;
- soft counts: per modality and list (clicks, skips), two Gaussian-kernel counts of the listed
  articles near the candidate (``kernel8`` / ``kernel20``), soft versions of a cluster count;
- a per-user ridge reader: per modality, the weights ``w`` of a ridge regression of +1 (click)
  and -1 (skip) on the listed articles' anchors, each list weighted to equal mass,
  ``w = (A' W A + lambda I)^-1 A' W y``; the candidate's score ``<w, a>``. With large lambda it
  is the clicks' mean minus the skips' mean; with small lambda it whitens by what the user was
  shown, so a theme shown often and clicked rarely counts against.

For each held-out world, train the default model (``recsys train``); add to its served logits
(no file exposure, no affinity: ``bench_content_clusters.py``'s reading) the affinity's columns
for the product's own keys (the publisher's and the version's fitted content clusters), and the
rows' columns, by a logistic regression on the validation window; read per-impression AUC on
the test file. Skips: the store's label-0 items strictly before each impression, each article
once, newest ``SKIP_CAP``.

A diagnostic follows (the rows ``fitted on the test file: ...``): the product's columns and the scored file's
exposure (``bench_file_exposure.exposure_columns``) fitted on the test file's own labels (two
folds by impression parity, each scored by the other's fit), an upper estimate of the product;
then with the store's whole-log popularity, and on the generator's worlds with the hidden
popularity latent of every article, which no data gives. What the latent adds is what better
popularity estimates could add at most; the rest of the oracle's gap is the readers' tastes.
Nothing here is used by the product.

Usage:
  python benchmarks/bench_user_reader.py --seeds 101 102 103 --users 3000 --news 2500 --impressions 9000
  python benchmarks/bench_user_reader.py --foreign [--dump DIR]

Prints a table and writes benchmarks/results/user_reader.json (user_reader_foreign.json).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

SKIP_CAP = 200
RIDGE_LAMBDAS = (0.1, 1.0)


def ridge_scores(imps, skipped, anchors: np.ndarray, blocks: int, lam: float) -> np.ndarray:
    """(c, blocks) per modality ``<w_u, a_c>`` of the per-user ridge reader (module docstring);
    0 where the user has no click or no skip of that modality."""
    k = anchors.shape[1] // blocks
    by_block = anchors.reshape(len(anchors), blocks, k).astype(np.float64)
    out = []
    for i in range(len(imps)):
        cand = imps.candidates(i)
        hist = imps.history_items[imps.history_offsets[i] : imps.history_offsets[i + 1]]
        skip = skipped.history_items[skipped.history_offsets[i] : skipped.history_offsets[i + 1]]
        cols = np.zeros((len(cand), blocks))
        for b in range(blocks):
            h = by_block[hist, b]
            s = by_block[skip, b]
            h = h[np.square(h).sum(1) > 0.5]  # a modality the article lacks (no cover) says nothing
            s = s[np.square(s).sum(1) > 0.5]
            if not len(h) or not len(s):
                continue
            gram = h.T @ h / len(h) + s.T @ s / len(s) + lam * np.eye(k)
            w = np.linalg.solve(gram, h.mean(0) - s.mean(0))
            cols[:, b] = by_block[cand, b] @ w
        out.append(cols)
    return np.concatenate(out)


def run_seed(seed: int, args, root: Path) -> dict:
    from bench_quality import oracle_auc
    from bench_skip_feedback import count_features, feature_columns, served_world
    from bench_user_category import impression_auc, key_features, skip_lists
    from sklearn.linear_model import LogisticRegression

    from recsys.columns import CATEGORY, NEWS_ID, SUBCATEGORY

    t0 = time.perf_counter()
    setup = served_world(seed, args, root)
    engine, catalogue, model, embeddings = setup.engine, setup.catalogue, setup.model, setup.embeddings
    valid, test = setup.valid, setup.test
    d = model.config.embedding_dim
    affinity = model.config.category_affinity
    if not model.config.prior_dim or affinity is None:
        raise SystemExit(f"seed {seed}: the trained model has no content prior or no category affinity")
    anchors = embeddings[:, d:]
    blocks = model.anchor_blocks
    by_id = catalogue.news.set_index(NEWS_ID)
    codes = [np.unique(by_id.loc[catalogue.features.news_ids, key].to_numpy(str), return_inverse=True)[1]
             for key in (CATEGORY, SUBCATEGORY)]
    if affinity.clusters is not None:  # the version's own clusters; -1 (no cover) gets a code of its own
        cluster_codes = affinity.clusters.codes(anchors)
        codes += [np.where(c < 0, c.max() + 1, c) for c in cluster_codes.T]

    splits = (valid, test)
    skipped = [skip_lists(x, setup.skips, SKIP_CAP) for x in splits]
    served = [model.score_impressions(x, embeddings, catalogue.log, catalogue.first_seen, logits=True).astype(np.float64)
              for x in splits]
    keys = [key_features(x, s, codes) for x, s in zip(splits, skipped)]
    counts = [count_features(x, s, anchors, blocks) for x, s in zip(splits, skipped)]
    ridges = {lam: [ridge_scores(x, s, anchors, blocks, lam) for x, s in zip(splits, skipped)] for lam in RIDGE_LAMBDAS}
    oracle = oracle_auc(setup.world)
    gap = lambda a: (a - 0.5) / (oracle - 0.5)  # noqa: E731
    a = impression_auc(test, served[1])
    out = {"seed": seed, "oracle": oracle, "keys": len(codes), "rows": {"served model": {"impression_auc": a, "gap_closed": gap(a)}}}

    def row(name: str, extra: list[np.ndarray] | None) -> None:
        xv, xt = (np.column_stack([s_, k_] + ([extra[i]] if extra is not None else []))
                  for i, (s_, k_) in enumerate(zip(served, keys)))
        mu, sd = xv.mean(0), xv.std(0) + 1e-9
        fit = LogisticRegression(max_iter=3000).fit((xv - mu) / sd, valid.labels)
        a = impression_auc(test, fit.decision_function((xt - mu) / sd))
        out["rows"][name] = {"impression_auc": a, "gap_closed": gap(a), "columns": xv.shape[1]}
        print(f"  seed {seed} {name:<56} {a:.4f} ({100 * gap(a):.1f}%)", flush=True)

    moments = feature_columns(blocks, (1,), ("mean", "mean2"))
    soft = feature_columns(blocks, (0, 1), ("kernel8", "kernel20"), length=False)
    row("served + the affinity's keys (the product, no exposure)", None)
    row("served + keys + skip moments", [c[:, moments] for c in counts])
    row("served + keys + soft counts of clicks and skips", [c[:, soft] for c in counts])
    for lam in RIDGE_LAMBDAS:
        row(f"served + keys + ridge reader, lambda {lam:g}", ridges[lam])
    row(f"served + keys + skip moments + ridge reader {RIDGE_LAMBDAS[0]:g}",
        [np.column_stack([c[:, moments], r]) for c, r in zip(counts, ridges[RIDGE_LAMBDAS[0]])])
    # What is left once the product's columns and the file's exposure are fitted on the test
    # file itself (two folds by impression parity, each fitted on the other): an upper estimate
    # of the product, then with the store's whole-log popularity and, on the generator's worlds,
    # the hidden popularity latent of every article (no data gives it).
    from bench_file_exposure import exposure_columns, logistic_blend, store_popularity_columns
    from bench_quality import fresh_candidates, test_file_row

    fresh = fresh_candidates(test, catalogue)
    product = list(keys[1].T)
    expo, store = exposure_columns(test, fresh), store_popularity_columns(test, catalogue.log, fresh)
    latent = []
    if not args.foreign:  # a diagnostic only: the generator's popularity latent, which no model reads
        from recsys.data import sample

        truth = sample.read_world(setup.world)
        at = {n: i for i, n in enumerate(truth.news_ids)}
        latent = [truth.news_popularity[[at[n] for n in catalogue.features.news_ids]][test.candidate_items].astype(np.float64)]
    diagnostic = {"product's columns": product, "product's columns + file exposure": product + expo,
                  "product's columns + file exposure + whole-log popularity": product + expo + store}
    if latent:
        diagnostic["product's columns + file exposure + the hidden popularity latent"] = product + expo + latent
        diagnostic["product's columns + file exposure + whole-log popularity + the hidden latent"] = product + expo + store + latent
    for name, columns in diagnostic.items():
        scores, _ = logistic_blend(test, served[1], [(c - c.mean()) / (c.std() + 1e-9) for c in columns])
        r = out["rows"][f"fitted on the test file: {name}"] = test_file_row(test, scores, oracle, fresh)
        print(f"  seed {seed} {'fitted on the test file: ' + name:<80} {r['impression_auc']:.4f} "
              f"({100 * r['gap_closed']:.1f}%; fresh {r['fresh_auc']:.4f})", flush=True)
    if args.dump:  # every column, for fits tried without training again
        args.dump.mkdir(parents=True, exist_ok=True)
        hidden = {"popularity": truth.news_popularity[[at[n] for n in catalogue.features.news_ids]]} if latent else {}
        np.savez(args.dump / f"seed{seed}.npz", oracle=oracle, news_ids=np.asarray(catalogue.features.news_ids, str),
                 world=str(setup.world), **hidden, **{
            f"{name}_{split}": value for split, i in (("valid", 0), ("test", 1)) for name, value in (
                ("served", served[i]), ("keys", keys[i]), ("counts", counts[i]),
                ("ridge", ridges[RIDGE_LAMBDAS[0]][i]), ("labels", splits[i].labels),
                ("offsets", splits[i].candidate_offsets), ("items", splits[i].candidate_items))})
    out["seconds"] = round(time.perf_counter() - t0, 1)
    engine.dispose()
    return out


def main() -> None:
    # this folder is on sys.path when run as a script
    from bench_quality import run_experiment, show_rows

    run_experiment(__doc__, "user_reader", run_seed, lambda res: show_rows(res, 100), width=100,
                   add_arguments=lambda p: p.add_argument("--dump", type=Path, default=None,
                                                          help="write each seed's columns to DUMP/seed<N>.npz"))


if __name__ == "__main__":
    main()
