"""Is the category affinity's logistic regression the right fit for its columns? A measured
experiment on the columns ``bench_user_reader.py --dump DIR`` wrote.

The affinity (``recsys.models.affinity``) combines the served logit with its per-key counts by a
pointwise logistic regression (scikit-learn, C = 1, standardised columns) fitted on the
validation window. Other fits of the same columns, on the same validation window, read on the
test file as per-impression AUC (share of the oracle's gap):

- the logistic regression at other strengths (C = 0.01 .. 10);
- a listwise conditional logit (``bench_skip_feedback.fit_listwise``), blind to differences
  between impressions as per-impression AUC is;
- the logit times each key column added (interactions with the networks' confidence);
- gradient-boosted trees (scikit-learn's ``HistGradientBoostingClassifier``, early stopping on
  a fifth of the rows) and a small multilayer perceptron (16 units), which can read any
  interaction of the columns.

Nothing is trained here: it reads the dumped columns (the served logits without the file
exposure and the affinity's columns for the product's own keys) and labels. Nothing here is
used by the product.

Usage:
  python benchmarks/bench_user_reader.py --seeds 101 102 103 --users 3000 --news 2500 --impressions 9000 --dump /tmp/dump
  python benchmarks/bench_affinity_fits.py /tmp/dump [--tag TAG]

Prints a table and writes benchmarks/results/affinity_fits[_TAG].json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def fits(z) -> dict[str, float]:
    """Per-impression AUC on the test file of each fit of one world's dumped columns."""
    from bench_skip_feedback import fit_listwise
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    from recsys.models.training import mean_impression_auc

    def auc(scores) -> float:
        return float(mean_impression_auc(z["labels_test"], scores, z["offsets_test"])[0])

    xv = np.column_stack([z["served_valid"], z["keys_valid"]])
    xt = np.column_stack([z["served_test"], z["keys_test"]])
    mean, scale = xv.mean(0), xv.std(0) + 1e-9
    xv, xt = (xv - mean) / scale, (xt - mean) / scale
    y = z["labels_valid"]
    rows = {"served model": auc(z["served_test"])}
    for c in (0.01, 0.1, 1.0, 10.0):
        fit = LogisticRegression(C=c, max_iter=3000).fit(xv, y)
        rows[f"logistic regression, C = {c:g}" + (" (the product's)" if c == 1.0 else "")] = auc(fit.decision_function(xt))
    rows["listwise conditional logit"] = auc(xt @ fit_listwise(xv, y, z["offsets_valid"]))
    cross = [np.column_stack([x, x[:, :1] * x[:, 1:]]) for x in (xv, xt)]
    rows["logistic regression + logit x each column"] = auc(
        LogisticRegression(C=1.0, max_iter=3000).fit(cross[0], y).decision_function(cross[1]))
    for leaves in (8, 15):
        trees = HistGradientBoostingClassifier(learning_rate=0.05, max_leaf_nodes=leaves, max_iter=300, min_samples_leaf=100,
                                               l2_regularization=1.0, early_stopping=True, validation_fraction=0.2,
                                               random_state=0).fit(xv, y)
        rows[f"boosted trees, {leaves} leaves"] = auc(trees.decision_function(xt))
    mlp = MLPClassifier(hidden_layer_sizes=(16,), alpha=1e-2, max_iter=300, early_stopping=True, random_state=0).fit(xv, y)
    p = np.clip(mlp.predict_proba(xt)[:, 1], 1e-7, 1 - 1e-7)
    rows["perceptron, 16 units"] = auc(np.log(p / (1 - p)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dump", type=Path, help="the folder bench_user_reader.py --dump wrote")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    files = sorted(args.dump.glob("seed*.npz"))
    if not files:
        raise SystemExit(f"{args.dump}: no seed*.npz; run bench_user_reader.py --dump {args.dump} first")
    results = []
    for path in files:
        t0 = time.perf_counter()
        z = np.load(path)
        oracle = float(z["oracle"])
        rows = {name: {"impression_auc": a, "gap_closed": (a - 0.5) / (oracle - 0.5)} for name, a in fits(z).items()}
        results.append({"world": path.stem, "oracle": oracle, "valid_candidates": int(len(z["labels_valid"])),
                        "rows": rows, "seconds": round(time.perf_counter() - t0, 1)})
        print(f"\n{path.stem}, oracle {oracle:.4f}")
        for name, r in rows.items():
            print(f"  {name:<48} {r['impression_auc']:.4f} {100 * r['gap_closed']:5.1f}%")
    mean = {name: float(np.mean([r["rows"][name]["gap_closed"] for r in results])) for name in results[0]["rows"]}
    print("\nmean gap closed:")
    for name, value in mean.items():
        print(f"  {name:<48} {100 * value:5.1f}%")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / (f"affinity_fits_{args.tag}.json" if args.tag else "affinity_fits.json")
    out.write_text(json.dumps({"dump": str(args.dump), "date": time.strftime("%Y-%m-%d"), "worlds": results,
                               "mean_gap_closed": mean}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
