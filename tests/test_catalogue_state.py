"""The digest a night compares with its index's record to skip the refresh: it must change with
everything the refresh reads, and with nothing else."""

from __future__ import annotations

import pandas as pd
import pytest

import recsys
from recsys.config import load_config
from recsys.pipelines.nightly import catalogue_state


def _news() -> pd.DataFrame:
    return pd.DataFrame({
        "news_id": ["N1", "N2", "N3"],
        "category": ["news", "sports", "news"],
        "title": ["a", "b", "c"],  # read_news's other columns: not part of the digest
        "image_status": ["ok", "missing", "ok"],
        "content_hash": ["h1", "h2", "h3"],
        "first_seen_at": pd.to_datetime(["2019-11-11 09:00:00", None, "2019-11-12 10:00:00"]),
    })


@pytest.mark.parametrize("change", [
    lambda n: n.assign(content_hash=["h1", "h2'", "h3"]),  # a title or a cover changed
    lambda n: n.assign(image_status=["ok", "ok", "ok"]),
    lambda n: n.assign(first_seen_at=n["first_seen_at"].where(n["news_id"] != "N3", pd.Timestamp("2019-11-10"))),
    lambda n: n.assign(first_seen_at=n["first_seen_at"].fillna(pd.Timestamp("2019-11-13"))),  # N2 shown at last
    lambda n: n.iloc[:2],  # an article fewer
    lambda n: pd.concat([n, n.iloc[:1].assign(news_id="N4")], ignore_index=True),  # one more, alike
    lambda n: n.assign(news_id=["N1", "N3", "N2"]),  # ids swapped between rows
])
def test_the_digest_follows_what_the_refresh_reads(change):
    config = load_config(None)
    assert catalogue_state(change(_news()), config) != catalogue_state(_news(), config)


def test_the_digest_reads_the_content_through_its_hash_and_is_the_same_in_every_call():
    # The store's content hash covers title, abstract, category, subcategory and cover bytes
    # (store.ingest.content_hash): the digest reads it, not the text again.
    config = load_config(None)
    state = catalogue_state(_news(), config)
    assert len(state) == 64 and state == catalogue_state(_news(), load_config(None))
    assert catalogue_state(_news().assign(title=["x", "y", "z"], category=["a", "b", "c"]), config) == state


def test_the_digest_follows_the_index_settings_and_the_running_code(monkeypatch):
    config = load_config(None)
    state = catalogue_state(_news(), config)
    assert catalogue_state(_news(), load_config(None, {"index.exact_max_items": 5})) != state
    assert catalogue_state(_news(), load_config(None, {"index.kind": "hnsw"})) != state
    monkeypatch.setattr("recsys.pipelines.nightly.release", lambda: recsys.release() + "-other")
    assert catalogue_state(_news(), config) != state
