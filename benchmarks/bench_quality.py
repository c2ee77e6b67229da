"""Quality of the CTR model on held-out sample worlds (issue: "The CTR model", Quality).

For each seed: generate a world the model has never seen, ingest its news and training
behaviors, train the multimodal model and its text-only and image-only ablations, and
evaluate all of them on the later test window with the oracle (true click probabilities),
random and most-popular baselines. About half of the test window's candidates are articles
published after training (never clicked in the training window), so the "fresh" rows show
how well content alone carries the prediction.

Prints a table and writes benchmarks/results/quality.json.

Usage:
  python benchmarks/bench_quality.py --seeds 101 102 103 --users 3000 --news 2500 --impressions 9000
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def subset_rows(world: Path, report_dir: Path, versions: dict[str, str], *, fresh_only: bool) -> dict:
    """Per-impression AUC restricted to fresh candidates (never shown in training) or to the rest.

    Uses the prediction files and truth.tsv only, so it is independent of the report code.
    """
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from recsys.data.mind import iter_behaviors
    from recsys.evaluation.prediction_file import read_predictions

    train_ids = set()
    for row in iter_behaviors(world / "behaviors_train.tsv"):
        train_ids.update(row.news_ids)
    truth = pd.read_csv(world / "truth.tsv", sep="\t", header=None, names=["split", "iid", "nid", "pos", "p", "y"])
    truth = truth[truth["split"] == "test"]
    by_imp = {iid: g for iid, g in truth.groupby("iid")}
    out = {}
    scores_of = {name: dict((int(i), 1.0 / r) for i, r in read_predictions(report_dir / f"prediction-{v}.txt")) for name, v in versions.items()}
    for name in list(versions) + ["oracle"]:
        aucs = []
        for iid, g in by_imp.items():
            fresh = ~g["nid"].isin(train_ids).to_numpy()
            fresh = fresh if fresh_only else ~fresh
            y = g["y"].to_numpy()[fresh]
            if fresh.sum() < 2 or y.min() == y.max():
                continue
            s = g["p"].to_numpy()[fresh] if name == "oracle" else scores_of[name][int(iid)][fresh]
            aucs.append(roc_auc_score(y, s))
        out[name] = float(np.mean(aucs)) if aucs else None
    out["num_impressions"] = len([1 for g in by_imp.values()])
    return out


def hidden_label_ceiling(world: Path) -> dict:
    """How much of the oracle's gap the click histories can carry at best.

    The oracle knows every user's hidden topic and style affinities; a model only sees the
    clicked history. This reference is given the generator's hidden topic and style of every
    article (which no model sees) and learns from the training impressions, with a logistic
    regression, the click from: the share of the user's history with the candidate's topic,
    the share with its style, whether the history is empty, and the candidate's clicks and
    shows in the training window (a training sample's own left out). Its per-impression AUC on the test window estimates the best a model
    that reads histories can reach; it is not an upper bound in the strict sense.
    """
    from sklearn.linear_model import LogisticRegression

    from recsys.data.mind import iter_behaviors
    from recsys.data.sample import read_world
    from recsys.models.training import mean_impression_auc

    hidden = read_world(world)
    row_of = {n: i for i, n in enumerate(hidden.news_ids)}
    clicks, shows = np.zeros(len(row_of)), np.zeros(len(row_of))

    def features(path: Path, leave_one_out: bool):
        xs, ys, groups = [], [], []
        for row in iter_behaviors(path):
            cand = np.array([row_of[n] for n in row.news_ids])
            hist = np.array([row_of[n] for n in row.history], dtype=np.int64)
            if len(hist):
                topic = (hidden.news_topic[cand][:, None] == hidden.news_topic[hist][None, :]).mean(axis=1)
                style = (hidden.news_style[cand][:, None] == hidden.news_style[hist][None, :]).mean(axis=1)
            else:
                topic = style = np.zeros(len(cand))
            # A training sample's own show and click are left out of its popularity.
            own_click, own_show = (np.asarray(row.labels), 1.0) if leave_one_out else (0.0, 0.0)
            xs.append(np.column_stack([topic, style, np.full(len(cand), float(len(hist) == 0)),
                                       np.log1p(clicks[cand] - own_click), np.log1p(shows[cand] - own_show)]))
            ys.append(np.asarray(row.labels))
            groups.append(len(cand))
        return np.concatenate(xs), np.concatenate(ys), np.asarray(groups)

    for row in iter_behaviors(world / "behaviors_train.tsv"):  # popularity in the training window
        cand = np.array([row_of[n] for n in row.news_ids])
        np.add.at(shows, cand, 1)
        np.add.at(clicks, cand, np.asarray(row.labels))
    x_train, y_train, _ = features(world / "behaviors_train.tsv", leave_one_out=True)
    x_test, y_test, groups = features(world / "behaviors_test.tsv", leave_one_out=False)
    model = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    offsets = np.concatenate([[0], np.cumsum(groups)])
    auc, _ = mean_impression_auc(y_test, model.decision_function(x_test), offsets)
    return {"impression_auc": float(auc)}


def content_similarity_reference(world: Path, engine, ws, config) -> dict:
    """A training-free baseline: how similar the candidate is to what the user clicked.

    Score = mean over the history of the cosine similarity of the frozen text features plus
    that of the frozen image features (each centred on the catalogue's mean, an article
    without a cover contributing 0 to the image term), equal weights, no parameter fitted on
    any window. Empty history: 0 for every candidate. If the trained model does not beat it,
    the learned part is not yet earning its keep.
    """
    from recsys.data.mind import iter_behaviors
    from recsys.models.training import mean_impression_auc
    from recsys.pipelines.scoring import load_scoring_catalogue

    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    features = catalogue.features

    def unit(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x[rows].mean(axis=0)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    with_image = np.asarray(features.has_image, dtype=bool)
    text = unit(features.text, np.arange(len(features)))
    image = unit(features.image, with_image) * with_image[:, None]
    labels, scores, sizes = [], [], []
    for row in iter_behaviors(world / "behaviors_test.tsv"):
        cand = np.array([catalogue.row_of[n] for n in row.news_ids])
        hist = np.array([catalogue.row_of[n] for n in row.history], dtype=np.int64)
        if len(hist):
            scores.append((text[cand] @ text[hist].T).mean(axis=1) + (image[cand] @ image[hist].T).mean(axis=1))
        else:
            scores.append(np.zeros(len(cand)))
        labels.append(np.asarray(row.labels))
        sizes.append(len(cand))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    auc, _ = mean_impression_auc(np.concatenate(labels), np.concatenate(scores), offsets)
    return {"impression_auc": float(auc)}


def run_seed(seed: int, args, root: Path) -> dict:
    from recsys.config import Workspace, load_config
    from recsys.data.sample import generate_sample
    from recsys.pipelines.evaluate import run_evaluate
    from recsys.pipelines.ingest import run_ingest
    from recsys.pipelines.train import run_train
    from recsys.store.database import open_store

    world = root / f"world-{seed}"
    t0 = time.perf_counter()
    generate_sample(world, num_users=args.users, num_news=args.news, num_impressions=args.impressions, seed=seed)
    ws = Workspace(root / f"ws-{seed}").ensure()
    engine = open_store(ws.default_db_url)
    config = load_config(None, {"model.epochs": args.epochs})
    run_ingest(engine, ws, news=world / "news.tsv", behaviors=world / "behaviors_train.tsv", images=world / "images")
    versions = {}
    for modalities in ("text", "image", "text,image"):
        cfg = replace(config, model=replace(config.model, modalities=modalities))
        result = run_train(engine, ws, cfg, make_current=(modalities == "text,image"))
        versions[modalities] = result["version"]
    report = run_evaluate(engine, ws, config, behaviors=world / "behaviors_test.tsv", out=ws.reports_dir / "quality",
                          ablations=True, truth=world / "truth.tsv", num_resamples=200)
    metrics = json.loads(Path(report["metrics_json"]).read_text())
    rows = {}
    for name, m in metrics["models"].items():
        rows[name] = {
            "kind": m["kind"],
            "impression_auc": m["metrics"]["impression_auc"]["value"],
            "ci": [m["metrics"]["impression_auc"]["ci_low"], m["metrics"]["impression_auc"]["ci_high"]],
            "gap_closed": m["gap_closed"],
            "log_loss": m["metrics"]["log_loss"]["value"],
        }
    fresh = subset_rows(world, ws.reports_dir / "quality", versions, fresh_only=True)
    seen = subset_rows(world, ws.reports_dir / "quality", versions, fresh_only=False)
    oracle = next(r["impression_auc"] for r in rows.values() if r["kind"] == "oracle")
    ceiling = hidden_label_ceiling(world)
    ceiling["gap_closed"] = (ceiling["impression_auc"] - 0.5) / (oracle - 0.5)
    knn = content_similarity_reference(world, engine, ws, config)
    knn["gap_closed"] = (knn["impression_auc"] - 0.5) / (oracle - 0.5)
    return {"seed": seed, "rows": rows, "fresh": fresh, "seen": seen, "hidden_label_ceiling": ceiling,
            "content_similarity": knn,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[101, 102, 103])
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--news", type=int, default=2500)
    parser.add_argument("--impressions", type=int, default=9000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--keep", type=Path, default=None, help="keep worlds and workspaces here")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="recsys-quality-"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for seed in args.seeds:
            res = run_seed(seed, args, root)
            results.append(res)
            print(f"\nseed {seed} ({res['seconds']} s)")
            print(f"  {'model':<48} {'kind':<9} {'AUC/imp':>8} {'gap':>7} {'logloss':>8}")
            for name, r in res["rows"].items():
                gap = "" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.1f}%"
                ll = "" if r["log_loss"] is None else f"{r['log_loss']:.4f}"
                print(f"  {name:<48} {r['kind']:<9} {r['impression_auc']:>8.4f} {gap:>7} {ll:>8}")
            c = res["hidden_label_ceiling"]
            print(f"  {'reference: hidden topic/style shares of the history (LR)':<58} {c['impression_auc']:>8.4f} "
                  f"{100 * c['gap_closed']:.1f}%")
            c = res["content_similarity"]
            print(f"  {'reference: content similarity to the history, no training':<58} {c['impression_auc']:>8.4f} "
                  f"{100 * c['gap_closed']:.1f}%")
            for subset in ("fresh", "seen"):
                print(f"  {subset} candidates only (AUC/imp):", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res[subset].items()})
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    summary = {}
    for kind_label in ("text+image", "text only", "image only", "most popular", "random"):
        gaps = [r["gap_closed"] for res in results for n, r in res["rows"].items() if n.startswith(kind_label) and r["gap_closed"] is not None]
        if gaps:
            summary[kind_label] = {"mean_gap_closed": float(np.mean(gaps)), "min_gap_closed": float(np.min(gaps))}
    for subset in ("fresh", "seen"):
        gaps = []
        for res in results:
            f = res[subset]
            if f.get("text,image") is not None and f.get("oracle"):
                gaps.append((f["text,image"] - 0.5) / (f["oracle"] - 0.5))
        summary[f"{subset}_gap_closed_text+image"] = gaps
    summary["hidden_label_ceiling_gap_closed"] = [res["hidden_label_ceiling"]["gap_closed"] for res in results]
    summary["content_similarity_gap_closed"] = [res["content_similarity"]["gap_closed"] for res in results]
    out = {
        "benchmark": "quality", "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "host": platform.node(), "results": results, "summary": summary,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps(out, indent=2))
    print("\nsummary:", json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
