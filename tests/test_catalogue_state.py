"""The digest a night compares with its index's record to skip the refresh: it must change with
everything the refresh reads, and with nothing else."""

from __future__ import annotations

import pandas as pd
import pytest

import recsys
from recsys.config import load_config
from recsys.pipelines.index import catalogue_state


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


@pytest.mark.parametrize("overrides", [
    {"index.exact_max_items": 5}, {"index.kind": "hnsw"},
    {"encoders.image_size": 160}, {"encoders.use_abstract": False}, {"encoders.text_max_length": 16},
])
def test_the_digest_follows_the_settings_the_refresh_reads(overrides):
    assert catalogue_state(_news(), load_config(None, overrides)) != catalogue_state(_news(), load_config(None))


def test_the_digest_follows_the_running_code_and_libraries(monkeypatch):
    import recsys.pipelines.index as index_module

    config = load_config(None)
    state = catalogue_state(_news(), config)
    monkeypatch.setattr(index_module, "release", lambda: recsys.release() + "-other")
    assert catalogue_state(_news(), config) != state
    monkeypatch.undo()
    real = index_module._installed
    monkeypatch.setattr(index_module, "_installed", lambda name: "9.9" if name == "faiss-cpu" else real(name))
    assert catalogue_state(_news(), config) != state


def test_the_digest_follows_a_custom_image_models_file_not_only_its_name(tmp_path):
    # The job checks only that the file is there before its ingest; the refresh checks what it is.
    model = tmp_path / "covers.keras"
    model.write_bytes(b"one model")
    config = load_config(None, {"encoders.image_model": str(model)})
    state = catalogue_state(_news(), config)
    model.write_bytes(b"another model")
    assert catalogue_state(_news(), config) != state
