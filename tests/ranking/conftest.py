"""Fixtures of the ranking tests: a store on each backend and a few rows in it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import insert

from recsys.store import schema as s


@pytest.fixture
def store(engine):
    """The migrated store of tests/conftest.py's ``engine``, on SQLite and on PostgreSQL."""
    return engine


@pytest.fixture
def store_url(db_url, store) -> str:
    """URL of ``store`` (for subprocesses)."""
    return db_url


def _add_news(engine, news_ids, *, category="news", first_seen_at=datetime(2019, 11, 10)):
    rows = [
        {
            "news_id": n, "category": category, "subcategory": "sub", "title": f"title of {n}", "abstract": "",
            "url": "", "title_entities": "[]", "abstract_entities": "[]", "image_path": None,
            "image_status": "missing", "content_hash": "0" * 64, "first_seen_at": first_seen_at,
            "updated_at": first_seen_at,
        }
        for n in news_ids
    ]
    with engine.begin() as conn:
        conn.execute(insert(s.news), rows)


def _add_users(engine, user_ids):
    with engine.begin() as conn:
        conn.execute(insert(s.users), [{"user_id": u} for u in user_ids])


@pytest.fixture
def add_news():
    """``add_news(engine, news_ids, *, category, first_seen_at)`` inserts minimal articles."""
    return _add_news


@pytest.fixture
def add_users():
    """``add_users(engine, user_ids)`` inserts users."""
    return _add_users


# ----------------------------------------------------------------------------------------
# A small world for the nightly job: articles, users, impressions, clicks, a model, an index.

AS_OF = datetime(2019, 11, 15, 12, 0, 0)
CATEGORIES = ("sports", "news", "finance", "travel", "health")
# Each category holds both: a subcategory name shared by two categories is two keys to the
# category affinity.
SUBCATEGORIES = ("local", "national")
NUM_NEWS = 150
NUM_OLD = 30  # first seen 10 days before AS_OF: outside a 3-day freshness window
NUM_NEVER_SHOWN = 10  # no first_seen_at (NaT)
NUM_WARM = 45
NUM_COLD = 15
NUM_INACTIVE = 5


@dataclass(frozen=True)
class World:
    """What the test world holds, to check recommendations against."""

    news_ids: np.ndarray
    categories: np.ndarray
    first_seen: list  # datetime or None per article
    active_users: list
    cold_users: list
    inactive_users: list
    clicks: dict  # user -> list of news ids
    model_dir: Path
    index_dir: Path
    subcategories: np.ndarray
    as_of: datetime = AS_OF  # the store's latest impression time


def _build_world(root: Path) -> World:
    from recsys.encoders.item_features import EncoderInfo, ItemFeatures
    from recsys.index.faiss_index import FaissIndex
    from recsys.models.bundle import RankingModel
    from recsys.models.side_features import SideFeatures

    rng = np.random.default_rng(7)
    news_ids = np.array([f"N{i:03d}" for i in range(NUM_NEWS)], dtype=object)
    categories = np.array([CATEGORIES[i % len(CATEGORIES)] for i in range(NUM_NEWS)], dtype=object)
    subcategories = np.array([SUBCATEGORIES[(i // len(CATEGORIES)) % len(SUBCATEGORIES)] for i in range(NUM_NEWS)],
                             dtype=object)
    first_seen = []
    for i in range(NUM_NEWS):
        if i < NUM_OLD:
            first_seen.append(AS_OF - timedelta(days=10, hours=i))
        elif i < NUM_NEWS - NUM_NEVER_SHOWN:
            first_seen.append(AS_OF - timedelta(minutes=int(rng.integers(10, 60 * 60))))
        else:
            first_seen.append(None)
    warm = [f"U{i:03d}" for i in range(NUM_WARM)]
    cold = [f"U{i:03d}" for i in range(NUM_WARM, NUM_WARM + NUM_COLD)]
    inactive = [f"U{i:03d}" for i in range(NUM_WARM + NUM_COLD, NUM_WARM + NUM_COLD + NUM_INACTIVE)]
    clicks = {u: list(rng.choice(news_ids, size=int(rng.integers(3, 12)), replace=False)) for u in warm + inactive}

    text, image = EncoderInfo("text-test", "1", 16), EncoderInfo("image-test", "1", 8)
    model = RankingModel.create(
        text, image, CATEGORIES, embedding_dim=16, history_len=8, side_features=SideFeatures(24.0), seed=3,
        scorer_hidden_units=(8,),
    )
    features = ItemFeatures(
        news_ids, rng.normal(size=(NUM_NEWS, 16)).astype(np.float32), rng.normal(size=(NUM_NEWS, 8)).astype(np.float32),
        rng.random(NUM_NEWS) < 0.8, categories, text, image,
    )
    # Served as trained models are: with content anchors fitted and both terms of the content
    # prior on, so every ranking test runs through the (D + A)-wide item embeddings and the
    # (D + A + Q)-wide user vectors, whose first D + A columns are the retrieval query.
    model.item_tower.get_layer("fusion").adapt(features.text, features.image, features.has_image)
    model = model.with_content_prior(1.5, 2.0)
    embeddings = model.item_embeddings(features)
    published = np.array([np.datetime64(t, "s") if t else np.datetime64("NaT", "s") for t in first_seen])
    index = FaissIndex.build(news_ids.astype(str), embeddings, published=published, kind="flat", num_threads=1)
    model_dir, index_dir = root / "model-v1", root / "index-v1"
    model.save(model_dir)
    index.save(index_dir)
    return World(news_ids, categories, first_seen, warm + cold, cold, inactive, clicks, model_dir, index_dir, subcategories)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    """The world's model bundle and index (built once) and its contents."""
    return _build_world(tmp_path_factory.mktemp("world"))


# The category affinity of ``affinity_model_dir`` (recsys.models.affinity), one weight per
# design column: the publisher's keys, then (the "clusters" variant) one text and one image
# content cluster.
AFFINITY_WEIGHTS = [1.3, 0.4, -0.8, 2.0, -1.5, 0.3, 0.2, -0.1, 0.5, -0.6, 0.05]
CLUSTER_WEIGHTS = [0.6, -0.3, 1.1, -0.9, 0.35, -0.45, 0.25, 0.7, -0.5, 0.15]
AFFINITY_TOTAL_WEIGHTS = [-0.2, 0.25]
AFFINITY_INTERCEPT = -0.7


@pytest.fixture(scope="session", params=["publisher", "clusters"])
def affinity_model_dir(request, world, tmp_path_factory) -> Path:
    """The world's model bundle with a category affinity added to its config (what ``recsys
    train`` fits by default), over the same networks: keyed by the publisher's category and
    subcategory, or by those and 3 content clusters per modality whose centres are the anchors
    of some of the world's articles."""
    import json
    import shutil

    from recsys.index.faiss_index import FaissIndex
    from recsys.models.affinity import FEATURES, ContentClusters, design_features

    model = tmp_path_factory.mktemp("affinity") / f"model-affinity-{request.param}"
    shutil.copytree(world.model_dir, model)
    config = json.loads((model / "config.json").read_text())
    assert config.get("category_affinity") is None
    affinity = {"features": list(FEATURES), "weights": AFFINITY_WEIGHTS + AFFINITY_TOTAL_WEIGHTS,
                "intercept": AFFINITY_INTERCEPT}
    if request.param == "clusters":
        anchors = FaissIndex.load(world.index_dir).vectors(world.news_ids)[:, config["embedding_dim"]:]
        width = anchors.shape[1] // 2
        with_image = np.flatnonzero(np.square(anchors[:, width:]).sum(axis=1) > 0.5)
        clusters = ContentClusters(("text", "image"), (0, width), (
            tuple(tuple(float(v) for v in anchors[i, :width]) for i in (0, 1, 2)),
            tuple(tuple(float(v) for v in anchors[i, width:]) for i in with_image[:3])))
        affinity = {"features": list(design_features(("category", "subcategory", *clusters.keys))),
                    "weights": AFFINITY_WEIGHTS + CLUSTER_WEIGHTS + AFFINITY_TOTAL_WEIGHTS,
                    "intercept": AFFINITY_INTERCEPT, "clusters": clusters.to_dict()}
    config["category_affinity"] = affinity
    (model / "config.json").write_text(json.dumps(config))
    return model


def _populate(engine, world: World) -> None:
    """Write the world into an empty store: news, users, impressions with items, clicks."""
    rng = np.random.default_rng(11)
    shown_fresh = [n for n, t in zip(world.news_ids, world.first_seen) if t is not None and t > AS_OF - timedelta(days=3)]
    news_rows, impression_rows, item_rows, click_rows = [], [], [], []
    for n, category, subcategory, seen in zip(world.news_ids, world.categories, world.subcategories, world.first_seen):
        news_rows.append({
            "news_id": n, "category": category, "subcategory": subcategory, "title": f"title of {n}", "abstract": "",
            "url": "", "title_entities": "[]", "abstract_entities": "[]", "image_path": None,
            "image_status": "missing", "content_hash": "0" * 64, "first_seen_at": seen, "updated_at": AS_OF,
        })
    users = world.active_users + world.inactive_users
    for pk, user in enumerate(users, start=1):
        if user in world.inactive_users:
            when = AS_OF - timedelta(days=20)
        else:
            # The last active user's impression is the store's latest: AS_OF itself.
            when = AS_OF if user == world.active_users[-1] else AS_OF - timedelta(minutes=int(rng.integers(1, 2 * 24 * 60)))
        impression_rows.append({"id": pk, "source": "test/behaviors", "impression_id": pk, "user_id": user, "time": when})
        shown = rng.choice(shown_fresh, size=5, replace=False)
        for position, n in enumerate(shown):
            item_rows.append({"impression_pk": pk, "position": position, "news_id": n, "label": int(position == 0)})
    for user, clicked in world.clicks.items():
        for position, n in enumerate(clicked):
            click_rows.append({"user_id": user, "news_id": n, "history_pos": position, "clicked_at": None})
    with engine.begin() as conn:
        conn.execute(insert(s.news), news_rows)
        conn.execute(insert(s.users), [{"user_id": u, "first_seen_at": AS_OF, "last_seen_at": AS_OF} for u in users])
        conn.execute(insert(s.impressions), impression_rows)
        conn.execute(insert(s.impression_items), item_rows)
        conn.execute(insert(s.clicks), click_rows)


@pytest.fixture
def world_store(store, world):
    """A store holding the world."""
    _populate(store, world)
    return store
