"""A generated sample world ingested into a fresh workspace's SQLite store (tests that train)."""

from __future__ import annotations

from pathlib import Path

from recsys.config import Workspace
from recsys.pipelines.ingest import run_ingest
from recsys.store.database import open_store


def ingested_sample(root: Path, *, num_users: int, num_news: int, num_impressions: int, seed: int):
    """``(world, workspace, engine)``: ``root/world`` generated, its news and training behaviors
    (with covers) ingested into ``root/ws``. The caller disposes of the engine."""
    from recsys.data.sample import generate_sample

    world = root / "world"
    generate_sample(world, num_users=num_users, num_news=num_news, num_impressions=num_impressions, seed=seed)
    ws = Workspace(root / "ws").ensure()
    engine = open_store(ws.default_db_url)
    run_ingest(engine, ws, news=world / "news.tsv", behaviors=world / "behaviors_train.tsv", images=world / "images")
    return world, ws, engine
