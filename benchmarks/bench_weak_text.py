"""Titles that say nothing: does the model still learn what does (issue 4, robustness)?

A MIND-format world built here, not by the sample generator: each reader likes 3 of 10
categories and clicks a candidate of a liked category with probability 0.25, any other with
0.02; titles and abstracts are random words from one small vocabulary, so the frozen text
encoder's similarity carries no signal; there are no covers. Its History column lists liked
articles; train is five days of impressions, the held-out file the day after.

For each seed it runs ``recsys train`` (text+image asked for) and ``recsys evaluate
--baselines`` three times: as the product does (an anchor block whose similarity to the history
does not rank the training clicks starts weak, and a model without such a silent modality is
trained as well, the better on validation served); with the weak start but every modality kept
(``run_train(..., exact_modalities=True)``, as ``--modalities`` does); and as before both
(``training.ANCHOR_SIGNAL_AUC = 0`` too). Rows: per-impression AUC on the held-out day of the served model and of the ablations
the report trains beside it.

Usage:
  python benchmarks/bench_weak_text.py --seeds 1 2 3

Prints a table and writes benchmarks/results/weak_text.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CATEGORIES = ("news", "sports", "finance", "lifestyle", "foodanddrink", "autos", "tv", "video", "kids", "travel")
WORDS = ("the a season star recipe market stocks car review royal family kids dog cat storm election win loss record "
         "deal city team plan report week home show new old big").split()


def write_world(root: Path, seed: int, *, news: int = 700, users: int = 500, train_impressions: int = 2500,
                test_impressions: int = 800) -> None:
    """news.tsv, behaviors_train.tsv and behaviors_test.tsv of one category-driven world under ``root``."""
    rng = random.Random(seed)
    ids = [f"N{i}" for i in rng.sample(range(1000, 200_000), news)]
    category = {n: rng.choice(CATEGORIES) for n in ids}
    with open(root / "news.tsv", "w", encoding="utf-8") as f:
        for n in ids:
            title = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize()
            abstract = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30)))
            f.write("\t".join([n, category[n], category[n] + "sub", title, abstract, "https://example.com/" + n, "[]", "[]"]) + "\n")
    back, shown = ids[: news // 3], ids[news // 3 :]
    start = datetime(2019, 11, 9)
    born = {n: start + timedelta(hours=rng.uniform(0, 24 * 6)) for n in shown}
    readers = [f"U{i}" for i in rng.sample(range(10, 100_000), users)]
    taste = {u: set(rng.sample(CATEGORIES, 3)) for u in readers}
    history = {}
    for u in readers:
        liked = [n for n in back if category[n] in taste[u]]
        history[u] = rng.sample(liked, min(len(liked), rng.choice([0, rng.randint(1, 40)])))

    def impressions(first_id: int, count: int, since: datetime, hours: float) -> list[str]:
        lines = []
        for i in range(first_id, first_id + count):
            u, t = rng.choice(readers), since + timedelta(seconds=rng.uniform(0, hours * 3600))
            alive = [n for n in shown if born[n] <= t < born[n] + timedelta(hours=48)] or shown
            candidates = rng.sample(alive, min(len(alive), rng.randint(5, 40)))
            labels = [int(rng.random() < (0.25 if category[n] in taste[u] else 0.02)) for n in candidates]
            if not any(labels):
                labels[rng.randrange(len(labels))] = 1
            when = f"{t.month}/{t.day}/{t.year} {t.hour % 12 or 12}:{t.minute:02d}:{t.second:02d} {'PM' if t.hour >= 12 else 'AM'}"
            lines.append("\t".join([str(i), u, when, " ".join(history[u]), " ".join(f"{n}-{y}" for n, y in zip(candidates, labels))]))
        return lines

    (root / "behaviors_train.tsv").write_text("\n".join(impressions(1, train_impressions, start, 24 * 5)) + "\n")
    (root / "behaviors_test.tsv").write_text("\n".join(impressions(1, test_impressions, start + timedelta(days=5), 23)) + "\n")


VARIANTS = (  # (row, training.ANCHOR_SIGNAL_AUC (None: the product's, 0: every block strong), exact_modalities)
    ("default: anchors started from the data, silent modality dropped if validation agrees", None, False),
    ("anchors started from the data, every modality kept", None, True),
    ("before: anchors started strong, every modality kept", 0.0, True),
)


def run_seed(seed: int, root: Path) -> dict:
    from recsys.config import Workspace, load_config
    from recsys.models import training
    from recsys.pipelines import train as train_pipeline
    from recsys.pipelines.evaluate import run_evaluate
    from recsys.pipelines.ingest import run_ingest
    from recsys.store.database import open_store

    world = root / f"world-{seed}"
    world.mkdir()
    write_world(world, seed)
    rows = {}
    default_auc = training.ANCHOR_SIGNAL_AUC
    for k, (label, anchor_auc, exact) in enumerate(VARIANTS):
        training.ANCHOR_SIGNAL_AUC = default_auc if anchor_auc is None else anchor_auc
        try:
            ws = Workspace(root / f"ws-{seed}-{k}").ensure()
            engine = open_store(ws.default_db_url)
            run_ingest(engine, ws, news=world / "news.tsv", behaviors=world / "behaviors_train.tsv", images=None)
            started = time.perf_counter()
            trained = train_pipeline.run_train(engine, ws, load_config(None, {}), exact_modalities=exact)
            summary = run_evaluate(engine, ws, load_config(None, {}), behaviors=world / "behaviors_test.tsv",
                                   out=ws.reports_dir / "weak", ablations=True, num_resamples=10)
            engine.dispose()
        finally:
            training.ANCHOR_SIGNAL_AUC = default_auc
        report = json.loads(Path(summary["metrics_json"]).read_text())["models"]
        row = {"served model": next(m["metrics"]["impression_auc"]["value"] for m in report.values() if m["kind"] == "model")}
        row.update({name.split(" (")[0]: m["metrics"]["impression_auc"]["value"] for name, m in report.items()
                    if m["kind"] in ("ablation", "baseline")})
        manifest = json.loads((Path(trained["path"]) / "manifest.json").read_text())
        row.update(served_modalities=manifest["modalities"], seconds=round(time.perf_counter() - started, 1),
                   anchor_similarity_auc=manifest["history"].get("anchor_similarity_auc"))
        rows[label] = row
    return {"seed": seed, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="recsys-weak-text-"))
    try:
        results = [run_seed(seed, root) for seed in args.seeds]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    columns = ("served model", "text only", "image only", "most popular")
    print(f"\n{'':<95} {'served':>10} " + " ".join(f"{c:>12}" for c in columns))
    for res in results:
        for label, row in res["rows"].items():
            cells = " ".join(f"{row.get(c) if row.get(c) is not None else float('nan'):>12.4f}" for c in columns)
            print(f"seed {res['seed']} {label:<88} {row['served_modalities']:>10} {cells}")
    out = {"benchmark": "weak_text", "args": vars(args), "host": platform.node(), "results": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "weak_text.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'weak_text.json'}")


if __name__ == "__main__":
    main()
