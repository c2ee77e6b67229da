"""The `recsys` command end to end on MIND-format data that the sample generator did not write.

The product is judged on MIND data it has never seen, so this world is laid out as the real
MIND-small download is, not as ``generate_sample`` writes it: ``train/`` and ``dev/`` folders
each with their own news.tsv and behaviors.tsv, no cover images at all, real-style entity JSON,
empty abstracts and histories, unicode titles, a category that appears only in dev, dev
articles that train's news.tsv lacks, and an unlabelled copy of dev's behaviors. Nothing here
checks quality (tests/models does); it checks that every command runs and that what it writes
agrees with the input files and with scikit-learn.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tests.store.mind_files import behavior_line, news_line, write_lines
from tests.test_cli import run

pytestmark = pytest.mark.slow

CATEGORIES = {
    "sports": ("football_nfl", ["Bears", "quarterback", "touchdown", "playoff", "coach"]),
    "finance": ("markets", ["stocks", "Dow", "earnings", "Fed", "rates"]),
    "foodanddrink": ("recipes", ["Thanksgiving", "pie", "turkey", "recipe", "café"]),
    "news": ("newsus", ["Senate", "impeachment", "governor", "vote", "court"]),
    "weather": ("weathertopstories", ["storm", "snow", "forecast", "cold", "wind"]),
}
DEV_ONLY_CATEGORY = ("kids", ("kidsfun", ["cartoon", "puzzle", "zoo", "crayons", "recess"]))
ENTITY = '[{"Label": "Chicago Bears", "Type": "O", "WikidataId": "Q205033", "Confidence": 1.0, "OccurrenceOffsets": [0], "SurfaceForms": ["Bears"]}]'


def article(rng: np.random.Generator, news_id: str, category: str, subcategory: str, words: list[str]) -> str:
    picked = rng.choice(words, size=3, replace=False)
    title = f"“{picked[0].capitalize()}” {picked[1]} and {picked[2]}: what we know — {news_id}"
    abstract = "" if rng.random() < 0.3 else f"The {picked[1]} story, explained. ¿Qué pasa? {' '.join(picked)}."
    return news_line(news_id, category=category, subcategory=subcategory, title=title, abstract=abstract,
                     url=f"https://assets.msn.com/labs/mind/{news_id}.html",
                     title_entities=ENTITY if category == "sports" else "[]", abstract_entities="[]")


@pytest.fixture(scope="module")
def mind(tmp_path_factory) -> Path:
    """A MIND-small-shaped download: train/ (Nov 9-14) and dev/ (Nov 15), no images."""
    rng = np.random.default_rng(11)
    root = tmp_path_factory.mktemp("mind")
    (root / "train").mkdir()
    (root / "dev").mkdir()
    cats = list(CATEGORIES)
    train_news = {f"N{1000 + i}": cats[i % len(cats)] for i in range(150)}
    dev_new = {f"N{5000 + i}": (cats[i % len(cats)] if i % 4 else DEV_ONLY_CATEGORY[0]) for i in range(40)}
    specs = dict(CATEGORIES, **dict([DEV_ONLY_CATEGORY]))
    lines = {n: article(rng, n, c, specs[c][0], specs[c][1]) for n, c in {**train_news, **dev_new}.items()}
    write_lines(root / "train" / "news.tsv", [lines[n] for n in train_news])
    write_lines(root / "dev" / "news.tsv", [lines[n] for n in list(train_news)[::2]] + [lines[n] for n in dev_new])

    users = [f"U{87000 + u}" for u in range(70)]
    liked = {u: set(rng.choice(cats, size=2, replace=False)) for u in users}
    history = {u: [] if i % 9 == 0 else list(rng.choice(
        [n for n, c in train_news.items() if c in liked[u]], size=int(rng.integers(1, 12)), replace=False))
        for i, u in enumerate(users)}

    def behaviors(first_id: int, count: int, start: datetime, hours: float, pool: dict) -> list[str]:
        out = []
        ids = list(pool)
        for k in range(count):
            u = users[int(rng.integers(len(users)))]
            shown = rng.choice(ids, size=int(rng.integers(2, 15)), replace=False)
            p = np.where([pool[n] in liked[u] for n in shown], 0.45, 0.05)
            clicks = (rng.random(len(shown)) < p).astype(int)
            clicks[int(rng.integers(len(shown)))] |= int(clicks.sum() == 0)  # MIND: at least one click
            when = start + timedelta(seconds=int(hours * 3600 * k / count))
            out.append(behavior_line(first_id + k, u, when, history[u], [f"{n}-{c}" for n, c in zip(shown, clicks)]))
        return out

    write_lines(root / "train" / "behaviors.tsv", behaviors(1, 500, datetime(2019, 11, 9), 5 * 24, train_news))
    dev_pool = {**{n: train_news[n] for n in list(train_news)[::2]}, **dev_new}
    dev = behaviors(1, 120, datetime(2019, 11, 15), 24, dev_pool)
    write_lines(root / "dev" / "behaviors.tsv", dev)
    unlabelled = []
    for line in dev:
        cols = line.split("\t")
        cols[4] = " ".join(tok.rsplit("-", 1)[0] for tok in cols[4].split())
        unlabelled.append("\t".join(cols))
    write_lines(root / "dev" / "behaviors_unlabelled.tsv", unlabelled)
    return root


def rows(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]


def test_every_command_runs_on_a_mind_download_without_images(mind: Path, tmp_path: Path, capsys, caplog):
    ws = ["--workspace", str(tmp_path / "ws")]
    train, dev = mind / "train", mind / "dev"
    code, out, err = run(capsys, *ws, "ingest", "--news", str(train / "news.tsv"), "--behaviors", str(train / "behaviors.tsv"))
    assert code == 0, err
    code, out, err = run(capsys, *ws, "stats", "--json")
    stats = json.loads(out)
    assert stats["news"] == 150 and stats["news_with_image"] == 0 and stats["quarantined"] == 0
    assert stats["impressions"] == len(rows(train / "behaviors.tsv"))

    code, out, err = run(capsys, *ws, "train", "--epochs", "2")
    assert code == 0, err
    assert json.loads(out)["current"] is True
    assert "no article in the store has a usable cover" in caplog.text  # text,image by default: say so
    code, out, err = run(capsys, *ws, "index", "build")
    assert code == 0, err
    # Every article here is shown within the log's first hours, so none is "fresh" in the
    # default 3 days (the run would recommend nothing and fail): a week covers the log.
    (tmp_path / "ws" / "recsys.toml").write_text("[nightly]\nfreshness_days = 7\n")
    code, out, err = run(capsys, *ws, "nightly", "--k", "5", "--workers", "1")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["run"]["status"] == "complete" and summary["run"]["counts"]["recommendations"] > 0
    assert summary["run"]["counts"]["users"] == len({r[1] for r in rows(train / "behaviors.tsv")})

    # Dev names articles that only dev/news.tsv has: without --news that is a clear error.
    pred = tmp_path / "prediction.txt"
    code, out, err = run(capsys, *ws, "predict", "--behaviors", str(dev / "behaviors_unlabelled.tsv"), "--out", str(pred))
    assert code == 1
    assert "behaviors_unlabelled.tsv" in err and re.search(r"N50\d\d", err)
    assert not pred.exists()

    code, out, err = run(capsys, *ws, "predict", "--behaviors", str(dev / "behaviors_unlabelled.tsv"), "--out", str(pred),
                         "--news", str(dev / "news.tsv"))
    assert code == 0, err
    dev_rows = rows(dev / "behaviors.tsv")
    lines = pred.read_text().splitlines()
    assert len(lines) == len(dev_rows)
    scored_ranks = []
    for line, row in zip(lines, dev_rows):
        m = re.fullmatch(r"(\d+) \[([0-9,]+)\]", line)
        assert m and m.group(1) == row[0], line
        ranks = [int(x) for x in m.group(2).split(",")]
        assert sorted(ranks) == list(range(1, len(row[4].split()) + 1))
        scored_ranks.append(np.array(ranks))

    # The labelled dev file: the report's AUC is the one worked out from the prediction file.
    report = tmp_path / "report"
    code, out, err = run(capsys, *ws, "evaluate", "--behaviors", str(dev / "behaviors.tsv"), "--out", str(report),
                         "--news", str(dev / "news.tsv"), "--baselines")
    assert code == 0, err
    metrics = json.loads((report / "metrics.json").read_text())
    model = next(m for m in metrics["models"].values() if m["kind"] == "model")
    aucs = []
    for ranks, row in zip(scored_ranks, dev_rows):
        y = np.array([int(tok[-1]) for tok in row[4].split()])
        if 0 < y.sum() < len(y):
            aucs.append(roc_auc_score(y, 1.0 / ranks))
    assert model["metrics"]["impression_auc"]["value"] == pytest.approx(np.mean(aucs), abs=1e-9)
    kinds = sorted(m["kind"] for m in metrics["models"].values())
    # The image-only ablation trains without a single cover; no truth.tsv, so no oracle row.
    assert kinds == ["ablation", "ablation", "baseline", "baseline", "model"], kinds
    for m in metrics["models"].values():
        assert 0.0 <= m["metrics"]["impression_auc"]["value"] <= 1.0
