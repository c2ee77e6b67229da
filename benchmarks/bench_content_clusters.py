"""Would a reader's clicks and skips per *content cluster* improve the served model? A measured
experiment.

The reader's category affinity (``model.category_affinity``) counts a reader's clicks and skips
per publisher category and subcategory. Where the publisher's labels are coarse (a category
holding several themes), those counts say little; the hidden-label reader of
bench_quality_ceiling.py gets 6 points of the gap from skips read per theme. Themes can be
approximated without labels: cluster the articles' item embeddings (spherical k-means, FAISS)
and use the cluster of each article as one more key, next to category and subcategory. A fresh
article gets the cluster of its nearest centre, so the key is carried by content, not ids.

For each held-out world, train the default model (``recsys train``), fit k-means on the item
embeddings of the articles first seen before the validation window, then add to the served
logits (no file exposure, no affinity: ``bench_user_category.py``'s reading) a regression over
the per-key features of ``bench_user_category.key_features`` for the keys named in each row,
fitted on the validation window (pointwise logistic regression), read as per-impression AUC on
the test file. As a diagnostic (not read by anything), the adjusted mutual information of each
clustering with the sample generator's hidden topic and cover style. Rows: the publisher's keys alone; clusters of the fused item embeddings (K
centres) alone and with the publisher's keys; clusters of the content anchors (the pretrained
features the prior reads). Nothing here is used by the product.

Usage:
  python benchmarks/bench_content_clusters.py --seeds 101 102 103 --users 3000 --news 2500 --impressions 9000
  python benchmarks/bench_content_clusters.py --foreign

Prints a table and writes benchmarks/results/content_clusters.json (content_clusters_foreign.json).
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import numpy as np

CLUSTER_COUNTS = (16, 32, 64)


def kmeans_codes(vectors: np.ndarray, fit_rows: np.ndarray, k: int, seed: int, usable: np.ndarray | None = None) -> np.ndarray:
    """(n,) index of the nearest of ``k`` spherical k-means centres fitted on ``vectors[fit_rows]``;
    rows where ``usable`` is False get code ``k``."""
    import faiss

    usable = np.ones(len(vectors), bool) if usable is None else np.asarray(usable, bool)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    train = x[fit_rows[usable[fit_rows]]]
    if len(train) < k:  # no covers (the second click model's worlds): one code for all
        return np.full(len(x), k, dtype=np.int64)
    km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed, spherical=True, verbose=False)
    km.train(train)
    codes = km.index.search(x, 1)[1][:, 0].astype(np.int64)
    return np.where(usable, codes, k)


def rate_features(imps, clicked, skipped, codes: list[np.ndarray], strength: float = 2.0) -> np.ndarray:
    """(c, 3 * len(codes)) per key: the raw click and skip counts (a likelihood ratio is linear in
    them) and the log-odds of the user's click rate on the key, shrunk towards their overall rate
    with ``strength`` pseudo-shows. The clicks are ``clicked``'s lists (the histories the model
    reads, or the clicks of the logged impressions alone, whose shows the skips are)."""
    out = []
    for i in range(len(imps)):
        cand = imps.candidates(i)
        hist = clicked.history_items[clicked.history_offsets[i] : clicked.history_offsets[i + 1]]
        skip = skipped.history_items[skipped.history_offsets[i] : skipped.history_offsets[i + 1]]
        rate = (len(hist) + 1.0) / (len(hist) + len(skip) + 2.0)
        cols = []
        for code in codes:
            size = int(code.max()) + 1
            c = np.bincount(code[hist], minlength=size)[code[cand]].astype(np.float64)
            s = np.bincount(code[skip], minlength=size)[code[cand]].astype(np.float64)
            shrunk = (c + strength * rate) / (c + s + strength)
            cols += [c, s, np.log(shrunk / (1 - shrunk)) - np.log(rate / (1 - rate))]
        out.append(np.stack(cols, axis=1))
    return np.concatenate(out)


def run_seed(seed: int, args, root: Path) -> dict:
    from bench_quality import oracle_auc
    from bench_skip_feedback import served_world
    from bench_user_category import KEY_COLUMNS, impression_auc, key_features, skip_lists
    from sklearn.linear_model import LogisticRegression

    from recsys.columns import CATEGORY, NEWS_ID, SUBCATEGORY

    t0 = time.perf_counter()
    setup = served_world(seed, args, root)
    engine, catalogue, model, embeddings = setup.engine, setup.catalogue, setup.model, setup.embeddings
    skips, valid, test = setup.skips, setup.valid, setup.test
    by_id = catalogue.news.set_index(NEWS_ID)
    publisher = [np.unique(by_id.loc[catalogue.features.news_ids, key].to_numpy(str), return_inverse=True)[1]
                 for key in (CATEGORY, SUBCATEGORY)]
    valid_start = np.datetime64(datetime.fromisoformat(setup.version.manifest["training_window"]["valid_start"]), "s")
    first_seen = catalogue.first_seen
    fit_rows = np.flatnonzero(~np.isnat(first_seen) & (first_seen < valid_start))
    d = model.config.embedding_dim
    features = catalogue.features
    # Articles without a usable cover have zero image rows: they get a cluster of their own.
    spaces = {"fused": (embeddings[:, :d], None), "text": (features.text, None),
              "image": (features.image, features.has_image)}
    blocks = model.anchor_blocks
    if blocks == 2:  # the served vectors' own content anchors, one block per modality (text first)
        a = (embeddings.shape[1] - d) // 2
        spaces["text anchors"] = (embeddings[:, d : d + a], None)
        spaces["image anchors"] = (embeddings[:, d + a :], features.has_image)

    auc = impression_auc
    served = [model.score_impressions(x, embeddings, catalogue.log, catalogue.first_seen, logits=True).astype(np.float64)
              for x in (valid, test)]
    skip_of = [skip_lists(x, skips) for x in (valid, test)]
    logged_of = [skip_lists(x, catalogue.clicks) for x in (valid, test)]  # the logged impressions' clicks alone
    oracle = oracle_auc(setup.world)
    gap = lambda a: (a - 0.5) / (oracle - 0.5)  # noqa: E731
    a = auc(test, served[1])
    out = {"seed": seed, "oracle": oracle, "fit_articles": int(len(fit_rows)),
           "rows": {"served model": {"impression_auc": a, "gap_closed": gap(a)}}}

    def row(name: str, codes: list[np.ndarray], rates: str = "") -> None:
        feats = [key_features(x, s, codes) for x, s in zip((valid, test), skip_of)]
        if rates:
            clicked = [x for x in (valid, test)] if rates == "history" else logged_of
            feats = [np.column_stack([f, rate_features(x, c, s, codes)])
                     for f, x, c, s in zip(feats, (valid, test), clicked, skip_of)]
        xv, xt = (np.column_stack([s_, f]) for s_, f in zip(served, feats))
        mu, sd = xv.mean(0), xv.std(0) + 1e-9
        fit = LogisticRegression(max_iter=2000).fit((xv - mu) / sd, valid.labels)
        a = auc(test, fit.decision_function((xt - mu) / sd))
        out["rows"][name] = {"impression_auc": a, "gap_closed": gap(a), "columns": len(KEY_COLUMNS) * len(codes) + 2}
        print(f"  seed {seed} {name:<52} {a:.4f} ({100 * gap(a):.1f}%)", flush=True)

    hidden = None
    if not args.foreign:
        from sklearn.metrics import adjusted_mutual_info_score

        from recsys.data import sample

        truth = sample.read_world(setup.world)
        rows = {n: i for i, n in enumerate(truth.news_ids)}
        order = np.array([rows[n] for n in features.news_ids])
        hidden = {"topic": truth.news_topic[order], "style": truth.news_style[order]}
        out["adjusted_mutual_information"] = {
            "category": {label: round(float(adjusted_mutual_info_score(t, publisher[0])), 3) for label, t in hidden.items()}}
    row("served + category and subcategory", publisher)
    for k in CLUSTER_COUNTS:
        codes = {name: kmeans_codes(vectors, fit_rows, k, seed, usable) for name, (vectors, usable) in spaces.items()}
        for name in codes:
            row(f"served + {name} clusters {k}", [codes[name]])
            if hidden is not None:  # a diagnostic only: how well the clusters recover the hidden labels
                out.setdefault("adjusted_mutual_information", {})[f"{name} {k}"] = {
                    label: round(float(adjusted_mutual_info_score(truth, codes[name])), 3) for label, truth in hidden.items()}
        row(f"served + text and image clusters {k}", [codes["text"], codes["image"]])
        row(f"served + category, subcategory, text and image clusters {k}", publisher + [codes["text"], codes["image"]])
        if "text anchors" in codes:
            row(f"served + text and image anchor clusters {k}", [codes["text anchors"], codes["image anchors"]])
            row(f"served + category, subcategory, text and image anchor clusters {k}",
                publisher + [codes["text anchors"], codes["image anchors"]])
            row(f"served + category, subcategory, text and image anchor clusters {k}, rate features",
                publisher + [codes["text anchors"], codes["image anchors"]], rates="history")
            row(f"served + category, subcategory, text and image anchor clusters {k}, logged-click rate features",
                publisher + [codes["text anchors"], codes["image anchors"]], rates="logged")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    engine.dispose()
    return out


def main() -> None:
    # this folder is on sys.path when run as a script
    from bench_quality import run_experiment, show_rows

    run_experiment(__doc__, "content_clusters", run_seed, lambda res: show_rows(res, 60), width=60)


if __name__ == "__main__":
    main()
