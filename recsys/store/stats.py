"""Counts of what the store holds (``recsys stats``)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import Engine

from recsys.columns import IMAGE_OK, IMAGE_STATUSES
from recsys.store import schema


def store_stats(engine: Engine) -> dict:
    """Row counts of the store, in one read transaction.

    Returns:
        A JSON-ready dict with ``news``, ``news_with_image`` (image status "ok"), ``users``,
        ``impressions``, ``impression_items``, ``labelled_items``, ``clicked_items``,
        ``clicks`` (rows of the clicks table: History entries and clicked candidates),
        ``quarantined`` (bad rows of the latest ingest of each file), ``sources`` (distinct
        behaviors files) and ``image_<status>`` (articles per image status, every status of
        ``recsys.columns.IMAGE_STATUSES`` present, e.g. ``image_ok``, ``image_corrupt``).
    """
    count = sa.func.count()
    items = schema.impression_items
    queries = {
        "news": sa.select(count).select_from(schema.news),
        "users": sa.select(count).select_from(schema.users),
        "impressions": sa.select(count).select_from(schema.impressions),
        "impression_items": sa.select(count).select_from(items),
        "labelled_items": sa.select(count).select_from(items).where(items.c.label.is_not(None)),
        "clicked_items": sa.select(count).select_from(items).where(items.c.label == 1),
        "clicks": sa.select(count).select_from(schema.clicks),
        "quarantined": sa.select(count).select_from(schema.quarantine),
        "sources": sa.select(sa.func.count(sa.distinct(schema.impressions.c.source))),
    }
    with engine.connect() as conn, conn.begin():
        stats = {name: int(conn.execute(query).scalar_one()) for name, query in queries.items()}
        query = sa.select(schema.news.c.image_status, count).group_by(schema.news.c.image_status)
        by_status = {status: n for status, n in conn.execute(query)}
    stats["news_with_image"] = int(by_status.get(IMAGE_OK, 0))
    order = ["news", "news_with_image", "users", "impressions", "impression_items", "labelled_items",
             "clicked_items", "clicks", "quarantined", "sources"]
    out = {key: stats[key] for key in order}
    for status in IMAGE_STATUSES:
        out[f"image_{status}"] = int(by_status.pop(status, 0))
    # A status written by another tool still shows up rather than vanishing from the total.
    out.update({f"image_{k}": int(v) for k, v in sorted(by_status.items(), key=lambda kv: str(kv[0]))})
    return out
