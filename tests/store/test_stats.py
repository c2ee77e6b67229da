"""store_stats: every key, on an empty store and after an ingest, on both backends."""

from __future__ import annotations

import json

import sqlalchemy as sa

from recsys.columns import IMAGE_STATUSES
from recsys.store import schema
from recsys.store.ingest import ingest
from recsys.store.stats import store_stats

REQUIRED = {"news", "news_with_image", "users", "impressions", "impression_items", "labelled_items", "clicks", "quarantined"}


def test_empty_store_counts_zero(engine):
    stats = store_stats(engine)
    assert REQUIRED <= stats.keys()
    assert all(v == 0 for v in stats.values())
    assert {f"image_{status}" for status in IMAGE_STATUSES} <= stats.keys()


def test_counts_after_ingest_match_the_tables(engine, small_world, quarantine_dir, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text(small_world["behaviors"].read_text() + "not a row\n")
    ingest(engine, news_path=small_world["news"], behaviors_path=bad, quarantine_dir=quarantine_dir)
    stats = store_stats(engine)
    json.dumps(stats)  # JSON-ready for `recsys stats --json`
    with engine.connect() as conn:
        def count(table, *where):
            return conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one()

        items = schema.impression_items
        expected = {
            "news": count(schema.news),
            "news_with_image": count(schema.news, schema.news.c.image_status == "ok"),
            "users": count(schema.users),
            "impressions": count(schema.impressions),
            "impression_items": count(items),
            "labelled_items": count(items, items.c.label.is_not(None)),
            "clicked_items": count(items, items.c.label == 1),
            "clicks": count(schema.clicks),
            "quarantined": count(schema.quarantine),
        }
    assert {k: stats[k] for k in expected} == expected
    # And against the small world worked out by hand.
    assert expected == {"news": 6, "news_with_image": 0, "users": 3, "impressions": 4, "impression_items": 10,
                        "labelled_items": 10, "clicked_items": 4, "clicks": 7, "quarantined": 1}
    assert stats["image_missing"] == 6 and sum(stats[f"image_{s}"] for s in IMAGE_STATUSES) == 6
    assert stats["sources"] == 1  # one behaviors file, whose 4 impressions all name it
    # A status another tool wrote is counted under its own name, not dropped from the total.
    with engine.begin() as conn:
        conn.execute(sa.update(schema.news).where(schema.news.c.news_id == sa.select(sa.func.min(schema.news.c.news_id))
                                                  .scalar_subquery()).values(image_status="other-tool"))
    stats = store_stats(engine)
    assert (stats["image_missing"], stats["image_other-tool"]) == (5, 1)
    assert sum(v for k, v in stats.items() if k.startswith("image_")) == stats["news"] == 6
