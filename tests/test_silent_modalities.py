"""`recsys train` tries the model without a modality whose content says nothing about the clicks."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from recsys.config import Workspace, load_config
from recsys.pipelines.ingest import run_ingest
from recsys.pipelines.train import run_train, without_silent_modalities
from recsys.store.database import open_store

CATEGORIES = ("news", "sports", "finance", "lifestyle", "autos", "tv")
WORDS = "the a season star recipe market stocks car review royal family dog storm deal city team".split()


@pytest.mark.parametrize(("modalities", "silent", "any_cover", "expected"), [
    ("text,image", ["text", "image"], False, "image"),  # random titles, no covers: category, popularity, age
    ("text,image", ["text"], True, "image"),
    ("text,image", ["image"], True, "text"),  # covers of noise
    ("text,image", ["image"], False, None),  # no cover: a zero block, not a silent one
    ("text,image", [], True, None),
    ("text,image", ["text", "image"], True, None),  # both silent: nothing left to try
    ("text", ["text"], False, "image"),
    ("text", ["text"], True, None),
    ("image", ["image"], False, None),
])
def test_which_model_is_tried_without_the_silent_modalities(modalities, silent, any_cover, expected):
    assert without_silent_modalities(modalities, silent, any_cover) == expected


def _weak_text_world(root: Path) -> Path:
    """Clicks follow the reader's 2 liked categories of 6; titles are random words; no covers."""
    rng = random.Random(3)
    ids = [f"N{i}" for i in range(100, 400)]
    category = {n: rng.choice(CATEGORIES) for n in ids}
    (root / "news.tsv").write_text("".join(
        "\t".join([n, category[n], "sub", " ".join(rng.choice(WORDS) for _ in range(8)), "", "u", "[]", "[]"]) + "\n"
        for n in ids))
    readers = [f"U{i}" for i in range(120)]
    taste = {u: set(rng.sample(CATEGORIES, 2)) for u in readers}
    back = ids[:100]
    history = {u: [n for n in back if category[n] in taste[u]][: rng.randint(1, 15)] for u in readers}
    lines, start = [], datetime(2019, 11, 9)
    for i in range(1, 900):
        u, t = rng.choice(readers), start + timedelta(hours=rng.uniform(0, 96))
        cands = rng.sample(ids[100:], 15)
        labels = [int(rng.random() < (0.3 if category[n] in taste[u] else 0.02)) for n in cands]
        labels[0] = labels[0] or int(not any(labels))
        when = f"{t.month}/{t.day}/{t.year} {t.hour % 12 or 12}:{t.minute:02d}:{t.second:02d} {'PM' if t.hour >= 12 else 'AM'}"
        lines.append("\t".join([str(i), u, when, " ".join(history[u]), " ".join(f"{n}-{y}" for n, y in zip(cands, labels))]))
    (root / "behaviors.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.slow
def test_train_keeps_the_better_of_the_model_and_the_one_without_its_silent_text(tmp_path, caplog):
    world = _weak_text_world(tmp_path)
    ws = Workspace(tmp_path / "ws").ensure()
    engine = open_store(ws.default_db_url)
    run_ingest(engine, ws, news=world / "news.tsv", behaviors=world / "behaviors.tsv", images=None)
    config = load_config(None, {"model.epochs": 2, "model.embedding_dim": 32, "model.anchor_dim": 4})

    result = run_train(engine, ws, config)
    manifest = json.loads((Path(result["path"]) / "manifest.json").read_text())
    tried = manifest["history"]["modalities_tried"]
    assert manifest["history"]["requested_anchor_similarity_auc"]["text"] < 0.52
    assert set(tried) == {"text,image", "image"} and "training a model on image as well" in caplog.text
    assert manifest["modalities"] == max(tried, key=tried.get) and manifest["modalities_requested"] == "text,image"
    assert manifest["model_config"]["modalities"] == manifest["modalities"]  # ablations are trained alike
    assert manifest["metrics"]["val_auc"] == pytest.approx(tried[manifest["modalities"]])

    exact = json.loads((Path(run_train(engine, ws, config, exact_modalities=True)["path"]) / "manifest.json").read_text())
    assert (exact["modalities"], list(exact["history"]["modalities_tried"])) == ("text,image", ["text,image"])
    engine.dispose()
