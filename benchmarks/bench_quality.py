"""Quality of the CTR model on held-out sample worlds (issue: "The CTR model", Quality).

For each seed: generate a world the model has never seen, ingest its news and training
behaviors, train the multimodal model and its text-only and image-only ablations, and
evaluate all of them on the later test window with the oracle (true click probabilities),
random and most-popular baselines. About half of the test window's candidates are articles
published after training (never clicked in the training window), so the "fresh" rows show
how well content alone carries the prediction.

The test window is evaluated twice: as ``recsys evaluate`` does by default (impressions after
the store's end read the file's earlier shows of each candidate through the model's
file-exposure calibration) and with ``--no-file-exposure`` (what the nightly job can serve:
tomorrow's shows are unknown tonight), rows ``*_without_file_exposure``.

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
    # The impressions behind these AUCs: the filter reads labels only, so every name keeps the same ones.
    out["num_impressions"] = len(aucs)
    return out


def file_impressions(path: Path, catalogue, logged_clicks: bool, history_len: int = 50):
    """A behaviors file as one ``Impressions`` over the catalogue's rows, histories capped at
    ``history_len`` and, with ``logged_clicks``, led by the store's clicks before each impression
    (as the model is served)."""
    from recsys.data.interactions import with_logged_clicks
    from recsys.pipelines.scoring import iter_behavior_chunks

    imps, _ = next(iter_behavior_chunks(path, catalogue, chunk_size=10**7, history_len=history_len))
    return with_logged_clicks(imps, catalogue.clicks, history_len) if logged_clicks else imps


def fresh_candidates(imps, catalogue) -> np.ndarray:
    """(c,) bool: candidates never shown in the store (first shown at or after its log's end)."""
    shown = catalogue.first_seen[imps.candidate_items]
    return np.isnat(shown) | (shown >= catalogue.log.end)


def subset_auc(imps, scores: np.ndarray, keep: np.ndarray) -> float:
    """Mean per-impression AUC of ``scores`` over the candidates where ``keep`` is True."""
    from recsys.data.interactions import candidate_impression_rows

    return masked_auc(imps.labels, scores, candidate_impression_rows(imps), len(imps), keep)


def masked_auc(labels: np.ndarray, scores: np.ndarray, owner: np.ndarray, num_impressions: int, keep: np.ndarray) -> float:
    """Mean per-impression AUC over the candidates where ``keep`` is True; ``owner`` (n,) gives
    each candidate's impression row, candidates grouped by impression."""
    from recsys.models.training import mean_impression_auc

    offsets = np.concatenate([[0], np.cumsum(np.bincount(owner[keep], minlength=num_impressions))])
    return float(mean_impression_auc(labels[keep], scores[keep], offsets)[0])


def test_file_row(imps, scores: np.ndarray, oracle: float, fresh: np.ndarray) -> dict:
    """An experiment's row on the test file: AUC per impression over all candidates, the share
    of the random-to-oracle gap it closes, and the AUC over the ``fresh`` and the other candidates."""
    a = subset_auc(imps, scores, np.ones(len(scores), bool))
    return {"impression_auc": a, "gap_closed": (a - 0.5) / (oracle - 0.5),
            "fresh_auc": subset_auc(imps, scores, fresh), "seen_auc": subset_auc(imps, scores, ~fresh)}


def show_rows(res: dict, width: int, columns: dict | None = None, *, note: str = "") -> None:
    """Print one world's rows of an experiment: AUC and gap closed, then each of ``columns``
    (header -> function of a row giving its text)."""
    columns = columns or {}
    print(f"\nseed {res['seed']} ({res['seconds']} s{note}), oracle {res['oracle']:.4f}")
    print(f"  {'':<{width}} {'AUC':>6} {'gap':>6} " + " ".join(f"{h:>6}" for h in columns))
    for name, r in res["rows"].items():
        cells = " ".join(f"{fn(r):>6}" for fn in columns.values())
        print(f"  {name:<{width}} {r['impression_auc']:.4f} {100 * r['gap_closed']:5.1f}% {cells}")


def oracle_auc(world: Path) -> float:
    """Per-impression AUC of the true click probabilities of the test file (truth.tsv)."""
    import pandas as pd

    from recsys.models.training import mean_impression_auc

    truth = pd.read_csv(world / "truth.tsv", sep="\t", header=None, names=["split", "iid", "nid", "pos", "p", "y"])
    truth = truth[truth["split"] == "test"].sort_values(["iid", "pos"])
    offsets = np.concatenate([[0], np.cumsum(truth.groupby("iid", sort=True).size().to_numpy())])
    return mean_impression_auc(truth["y"].to_numpy(), truth["p"].to_numpy(), offsets)[0]


def hidden_label_ceiling(world: Path, catalogue, *, logged_clicks: bool) -> dict:
    """How much of the oracle's gap the click histories can carry at best.

    The oracle knows every user's hidden topic and style affinities; a model only sees the
    clicked history. This reference is given the generator's hidden topic and style of every
    article (which no model sees) and learns from the training impressions, with a logistic
    regression, the click from: the share of the user's history with the candidate's topic,
    the share with its style, whether the history is empty, and the candidate's clicks and
    shows in the training window (a training sample's own left out). It reads the same
    histories as the model (``logged_clicks``: the History column led by the user's earlier
    clicks). Its per-impression AUC on the test window estimates the best a model that reads
    histories can reach; it is not an upper bound in the strict sense.
    """
    from recsys.data.sample import read_world

    hidden = read_world(world)
    hidden_row = {n: i for i, n in enumerate(hidden.news_ids)}
    rows = np.array([hidden_row[n] for n in catalogue.features.news_ids])
    return label_share_reference(world, catalogue, [hidden.news_topic[rows], hidden.news_style[rows]],
                                 logged_clicks=logged_clicks)


def label_share_reference(world: Path, catalogue, labels: list[np.ndarray], *, logged_clicks: bool) -> dict:
    """A logistic regression on the share of the history that shares each of ``labels`` (per
    catalogue row, e.g. topic and style) with the candidate, an empty-history flag, and the
    candidate's clicks and shows in the training file (a training sample's own left out);
    fitted on behaviors_train.tsv, its per-impression AUC read on behaviors_test.tsv."""
    from sklearn.linear_model import LogisticRegression

    from recsys.models.training import mean_impression_auc

    n = len(catalogue.features)
    train = file_impressions(world / "behaviors_train.tsv", catalogue, logged_clicks)
    test = file_impressions(world / "behaviors_test.tsv", catalogue, logged_clicks)
    clicks = np.bincount(train.candidate_items, weights=train.labels, minlength=n)
    shows = np.bincount(train.candidate_items, minlength=n).astype(float)

    def features(imps, leave_one_out: bool):
        xs = []
        for i in range(len(imps)):
            cand, hist = imps.candidates(i), imps.history(i)
            shares = [(label[cand][:, None] == label[hist][None, :]).mean(axis=1) if len(hist) else np.zeros(len(cand))
                      for label in labels]
            # A training sample's own show and click are left out of its popularity.
            own_click, own_show = (imps.candidate_labels(i), 1.0) if leave_one_out else (0.0, 0.0)
            xs.append(np.column_stack([*shares, np.full(len(cand), float(len(hist) == 0)),
                                       np.log1p(clicks[cand] - own_click), np.log1p(shows[cand] - own_show)]))
        return np.concatenate(xs)

    model = LogisticRegression(max_iter=2000).fit(features(train, True), train.labels)
    auc, _ = mean_impression_auc(test.labels, model.decision_function(features(test, False)), test.candidate_offsets)
    return {"impression_auc": float(auc), "logged_clicks": logged_clicks}


def content_similarity_reference(world: Path, catalogue, *, logged_clicks: bool) -> dict:
    """A training-free baseline: how similar the candidate is to what the user clicked.

    Score = mean over the history of the cosine similarity of the frozen text features plus
    that of the frozen image features (each centred on the catalogue's mean, an article
    without a cover contributing 0 to the image term), equal weights, no parameter fitted on
    any window. Empty history: 0 for every candidate. Histories as the model reads them
    (``logged_clicks``). If the trained model does not beat it, the learned part is not yet
    earning its keep.
    """
    from recsys.models.training import mean_impression_auc

    features = catalogue.features

    def unit(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if not np.any(rows):  # e.g. no article has a cover (a MIND download): the term is 0
            return np.zeros(x.shape)
        x = x.astype(np.float64) - x[rows].mean(axis=0)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    with_image = np.asarray(features.has_image, dtype=bool)
    text = unit(features.text, np.arange(len(features)))
    image = unit(features.image, with_image) * with_image[:, None]
    test = file_impressions(world / "behaviors_test.tsv", catalogue, logged_clicks)
    scores = np.zeros(len(test.candidate_items))
    for i in range(len(test)):
        cand, hist = test.candidates(i), test.history(i)
        if len(hist):
            lo = test.candidate_offsets[i]
            scores[lo : lo + len(cand)] = (text[cand] @ text[hist].T).mean(axis=1) + (image[cand] @ image[hist].T).mean(axis=1)
    auc, _ = mean_impression_auc(test.labels, scores, test.candidate_offsets)
    return {"impression_auc": float(auc), "logged_clicks": logged_clicks}


def run_seed(seed: int, args, root: Path) -> dict:
    from recsys.config import load_config
    from recsys.pipelines.evaluate import run_evaluate
    from recsys.pipelines.scoring import load_scoring_catalogue
    from recsys.pipelines.train import run_train

    t0 = time.perf_counter()
    world, ws, engine, _ = ingested_world(seed, args, root)
    config = load_config(None, config_overrides(args))
    versions = {}
    for modalities in ("text", "image", "text,image"):
        cfg = replace(config, model=replace(config.model, modalities=modalities))
        result = run_train(engine, ws, cfg, make_current=(modalities == "text,image"),
                           exact_modalities=(modalities != "text,image"))  # the ablations are what they say
        versions[modalities] = result["version"]
    rows, fresh, seen = evaluated_rows(engine, ws, config, world, ws.reports_dir / "quality", versions, file_exposure=True)
    off = dict(zip(("rows", "fresh", "seen"), evaluated_rows(
        engine, ws, config, world, ws.reports_dir / "quality-no-exposure", versions, file_exposure=False)))
    oracle = next(r["impression_auc"] for r in rows.values() if r["kind"] == "oracle")
    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    references = {}
    for name, fn in (("hidden_label_ceiling", hidden_label_ceiling), ("content_similarity", content_similarity_reference)):
        for logged in (True, False):
            ref = fn(world, catalogue, logged_clicks=logged)
            ref["gap_closed"] = (ref["impression_auc"] - 0.5) / (oracle - 0.5)
            references[name + ("" if logged else "_history_column_only")] = ref
    return {"seed": seed, "rows": rows, "fresh": fresh, "seen": seen, **references,
            **{f"{key}_without_file_exposure": value for key, value in off.items()},
            "seconds": round(time.perf_counter() - t0, 1)}


def evaluated_rows(engine, ws, config, world: Path, out: Path, versions: dict[str, str], *, file_exposure: bool):
    """``recsys evaluate`` of the world's test file with the current version and its ablations:
    (rows by model name, AUC on fresh candidates only, AUC on the others)."""
    from recsys.pipelines.evaluate import run_evaluate

    report = run_evaluate(engine, ws, config, behaviors=world / "behaviors_test.tsv", out=out, ablations=True,
                          truth=world / "truth.tsv", num_resamples=200, file_exposure=file_exposure)
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
    return (rows, subset_rows(world, out, versions, fresh_only=True), subset_rows(world, out, versions, fresh_only=False))


def add_world_arguments(parser: argparse.ArgumentParser) -> None:
    """The held-out worlds' seeds and size, config overrides and a results tag, shared by the
    quality benchmarks."""
    parser.add_argument("--seeds", type=int, nargs="+", default=[101, 102, 103])
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--news", type=int, default=2500)
    parser.add_argument("--impressions", type=int, default=9000)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for training, a TOML value: --set encoders.use_abstract=true")
    parser.add_argument("--tag", default="", help="write results/<name>_<tag>.json (a variant beside the default run)")


def run_experiment(doc: str, name: str, run_seed, show, *, width: int = 48, add_arguments=None) -> None:
    """The main of an experiment benchmark: parse its arguments (``parse_experiment_args``, plus
    those ``add_arguments(parser)`` adds), ``run_seed`` on every held-out world with ``show``
    after each, print each row's mean gap closed over the seeds and write
    ``results/<name>[_<tag>].json``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if add_arguments is not None:
        add_arguments(parser)
    args = parse_experiment_args(parser)
    results = on_held_out_worlds(args, run_seed, f"recsys-{name}-", show=show)
    mean_gap = mean_gap_closed(results)
    print("\nmean gap closed over seeds:")
    for row, value in mean_gap.items():
        print(f"  {row:<{width}} {100 * value:5.1f}%")
    write_results(name, args, results, mean_gap_closed=mean_gap)


def parse_experiment_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The world arguments plus ``--epochs`` and ``--foreign`` (the worlds of
    ``bench_quality_foreign.py``: seeds 201-203 unless others are given, results tag 'foreign'),
    parsed."""
    add_world_arguments(parser)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--foreign", action="store_true",
                        help="worlds of bench_quality_foreign.py's click model (seeds 201-203), results tag 'foreign'")
    args = parser.parse_args()
    if args.foreign:
        args.seeds = args.seeds if args.seeds != [101, 102, 103] else [201, 202, 203]
        args.tag = args.tag or "foreign"
    return args


def ingested_world(seed: int, args: argparse.Namespace, root: Path, *, foreign: bool = False, test_days: int = 2):
    """Write the held-out world of ``seed`` under ``root`` (``foreign``: the second click model's
    of ``bench_quality_foreign.py``, no covers; else the generator's, its test file spanning
    ``test_days``) and ingest its news and training behaviors into a new workspace; ``(world
    folder, workspace, engine, the writer's summary)``."""
    from recsys.config import Workspace
    from recsys.data.sample import generate_sample
    from recsys.pipelines.ingest import run_ingest
    from recsys.store.database import open_store

    world = root / f"world-{seed}"
    if foreign:
        from bench_quality_foreign import write_world

        world.mkdir()
        summary = write_world(world, seed=seed, users=args.users, news=args.news, impressions=args.impressions)
    else:
        summary = generate_sample(world, num_users=args.users, num_news=args.news, num_impressions=args.impressions, seed=seed,
                                  test_days=test_days)
    ws = Workspace(root / f"ws-{seed}").ensure()
    engine = open_store(ws.default_db_url)
    run_ingest(engine, ws, news=world / "news.tsv", behaviors=world / "behaviors_train.tsv",
               images=None if foreign else world / "images")
    return world, ws, engine, summary


def config_overrides(args: argparse.Namespace) -> dict:
    """{"model.epochs": --epochs, plus every --set KEY=VALUE with VALUE read as TOML}."""
    import tomllib

    overrides = {"model.epochs": args.epochs} if hasattr(args, "epochs") else {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
    return overrides


def on_held_out_worlds(args: argparse.Namespace, run_seed, prefix: str, *, show=None, keep: Path | None = None) -> list[dict]:
    """``run_seed(seed, args, root)`` for every seed of ``args.seeds``, in order, in one root folder.

    Shared by the quality benchmarks. The root is ``keep`` (left in place) or a temporary folder
    named ``prefix...`` (removed at the end, also on failure); ``show(result)`` runs after each
    seed so that a long run prints as it goes.
    """
    root = keep or Path(tempfile.mkdtemp(prefix=prefix))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for seed in args.seeds:
            results.append(run_seed(seed, args, root))
            if show is not None:
                show(results[-1])
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return results


def mean_gap_closed(results: list[dict]) -> dict[str, float]:
    """{row name: mean over seeds of its ``gap_closed``}, for the rows of the first seed's result
    that have one (every seed has the same rows)."""
    return {name: float(np.mean([r["rows"][name]["gap_closed"] for r in results]))
            for name, row in results[0]["rows"].items() if row["gap_closed"] is not None}


def write_results(name: str, args: argparse.Namespace, results: list[dict], **extra) -> None:
    """benchmarks/results/<name>.json: the arguments, this host, every seed's result and ``extra``."""
    out = {"benchmark": name, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "host": platform.node(), "results": results, **extra}
    name += f"_{args.tag}" if getattr(args, "tag", "") else ""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / f'{name}.json'}")


def print_rows(rows: dict) -> None:
    """One line per row of a seed's result: name, kind, per-impression AUC, gap closed, log loss."""
    for name, r in rows.items():
        gap = "" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.1f}%"
        ll = "" if r["log_loss"] is None else f"{r['log_loss']:.4f}"
        print(f"  {name:<48} {r['kind']:<9} {r['impression_auc']:>8.4f} {gap:>7} {ll:>8}")


def _show_seed(res: dict) -> None:
    print(f"\nseed {res['seed']} ({res['seconds']} s)")
    print(f"  {'model':<48} {'kind':<9} {'AUC/imp':>8} {'gap':>7} {'logloss':>8}")
    print_rows(res["rows"])
    for key, label in (("hidden_label_ceiling", "reference: hidden topic/style shares of the history (LR)"),
                       ("content_similarity", "reference: content similarity to the history, no training")):
        for suffix, note in (("", ""), ("_history_column_only", ", History column only")):
            c = res[key + suffix]
            print(f"  {label + note:<78} {c['impression_auc']:>8.4f} {100 * c['gap_closed']:.1f}%")
    for subset in ("fresh", "seen"):
        print(f"  {subset} candidates only (AUC/imp):", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res[subset].items()})
    if "rows_without_file_exposure" in res:
        print("  --no-file-exposure (what the nightly can serve):")
        print_rows(res["rows_without_file_exposure"])
        print("  fresh candidates only (AUC/imp):",
              {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res["fresh_without_file_exposure"].items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_arguments(parser)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--keep", type=Path, default=None, help="keep worlds and workspaces here")
    args = parser.parse_args()
    results = on_held_out_worlds(args, run_seed, "recsys-quality-", show=_show_seed, keep=args.keep)
    summary = {}
    for suffix in ("", "_without_file_exposure"):
        for kind_label in ("text+image", "text only", "image only", "most popular", "random"):
            gaps = [r["gap_closed"] for res in results for n, r in res["rows" + suffix].items()
                    if n.startswith(kind_label) and r["gap_closed"] is not None]
            if gaps:
                summary[kind_label + suffix] = {"mean_gap_closed": float(np.mean(gaps)), "min_gap_closed": float(np.min(gaps))}
        for subset in ("fresh", "seen"):
            gaps = []
            for res in results:
                f = res[subset + suffix]
                if f.get("text,image") is not None and f.get("oracle"):
                    gaps.append((f["text,image"] - 0.5) / (f["oracle"] - 0.5))
            summary[f"{subset}_gap_closed_text+image{suffix}"] = gaps
    for key in ("hidden_label_ceiling", "content_similarity"):
        for suffix in ("", "_history_column_only"):
            summary[f"{key}{suffix}_gap_closed"] = [res[key + suffix]["gap_closed"] for res in results]
    print("\nsummary:", json.dumps(summary, indent=1))
    write_results("quality", args, results, summary=summary)


if __name__ == "__main__":
    main()
