"""A small synthetic evaluation for the report tests: generated impressions, accumulator, report dict."""

from datetime import datetime, timezone

import numpy as np
import pandas as pd

from recsys.evaluation.report import beyond_accuracy, build_result
from recsys.metrics.accumulator import HISTORY_LENGTH_ORDER, ImpressionMetrics, history_length_bucket

MODELS = ("v2", "v1", "text_only", "random", "popularity", "oracle")
KINDS = {"text_only": "ablation", "random": "baseline", "popularity": "baseline", "oracle": "oracle"}


def make_accumulator(num_impressions: int = 250, seed: int = 0) -> ImpressionMetrics:
    rng = np.random.default_rng(seed)
    categories = np.array(["news", "sports", "finance", "lifestyle", "weather"])
    acc = ImpressionMetrics(
        MODELS,
        item_groups=("category", "has_image"),
        impression_groups=("history_length",),
        group_order={"history_length": HISTORY_LENGTH_ORDER},
        num_resamples=200,
        breakdown_resamples=100,
    )
    for i in range(num_impressions):
        n = int(rng.integers(3, 30))
        p = rng.beta(1, 8, n)
        labels = np.full(n, -1) if i % 50 == 9 else (rng.random(n) < p).astype(int)
        acc.add(
            labels,
            {
                "v2": np.clip(p + rng.normal(0, 0.03, n), 0, 1),
                "v1": np.clip(p + rng.normal(0, 0.08, n), 0, 1),
                "text_only": np.clip(p + rng.normal(0, 0.12, n), 0, 1),
                "random": rng.random(n),
                "popularity": rng.integers(0, 50, n).astype(float),
                "oracle": p,
            },
            item_groups={"category": categories[rng.integers(0, 5, n)], "has_image": rng.random(n) < 0.8},
            impression_groups={"history_length": history_length_bucket(int(rng.integers(0, 20)))},
        )
    return acc


def make_beyond_accuracy() -> dict:
    rng = np.random.default_rng(1)
    recs = pd.DataFrame(
        {
            "user_id": np.repeat([f"U{u}" for u in range(30)], 10),
            "rank": np.tile(np.arange(1, 11), 30),
            "news_id": [f"N{j}" for j in rng.integers(0, 200, 300)],
        }
    )
    return beyond_accuracy(
        recs,
        item_category={f"N{j}": ["news", "sports", "finance"][j % 3] for j in range(200)},
        item_first_seen={f"N{j}": pd.Timestamp("2019-11-10") + pd.Timedelta(hours=j) for j in range(200)},
        item_popularity={f"N{j}": float(j % 17) for j in range(200)},
        catalogue_size=250,
        new_since="2019-11-15",
    )


def make_result(**overrides) -> dict:
    options = {
        "kinds": KINDS,
        "behaviors_file": "MINDsmall_dev/behaviors.tsv",
        "data_window": "2019-11-15 to 2019-11-16",
        "model_versions": ["v1", "v2"],
        "encoders": {"text": "all-MiniLM-L6-v2 int8, 384-d", "image": "MobileNet v1, 1024-d"},
        "generated_at": datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc),
        "beyond_accuracy": make_beyond_accuracy(),
    }
    options.update(overrides)
    return build_result(make_accumulator(), **options)
