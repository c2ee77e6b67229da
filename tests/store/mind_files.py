"""Writing small MIND files for tests, and dumping the store to compare two of them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa

from recsys.data.mind import format_time
from recsys.store import schema


def news_line(news_id: str, *, category: str = "news", subcategory: str = "newsus", title: str | None = None,
              abstract: str = "", url: str = "https://assets.msn.com/x", title_entities: str = "[]",
              abstract_entities: str = "[]") -> str:
    """One news.tsv line (no newline)."""
    title = f"Title of {news_id}" if title is None else title
    return "\t".join((news_id, category, subcategory, title, abstract, url, title_entities, abstract_entities))


def behavior_line(impression_id: int | str, user_id: str, time: datetime | str, history: Sequence[str] | str,
                  impressions: Sequence[str] | str) -> str:
    """One behaviors.tsv line; ``impressions`` like ``["N1-1", "N2-0"]`` or ``"N1-1 N2-0"``."""
    when = format_time(time) if isinstance(time, datetime) else time
    hist = history if isinstance(history, str) else " ".join(history)
    imps = impressions if isinstance(impressions, str) else " ".join(impressions)
    return "\t".join((str(impression_id), user_id, when, hist, imps))


def write_lines(path: Path, lines: Iterable[str | bytes], *, newline: str = "\n") -> Path:
    """Write lines (text as UTF-8, bytes as given) each followed by ``newline``."""
    end = newline.encode()
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode("utf-8")) + end)
    return path


# Columns that record when or in which order rows were written, not what they say.
VOLATILE = {"news": {"updated_at"}, "quarantine": {"id", "created_at"}, "impressions": {"id"}}


def dump_store(engine: sa.Engine) -> dict[str, list[tuple]]:
    """Every row the ingest writes, sorted, without surrogate keys and write times.

    Impression items are keyed by (source, impression_id) instead of the surrogate pk, which
    PostgreSQL sequences do not reuse after a rollback.
    """
    out: dict[str, list[tuple]] = {}
    with engine.connect() as conn:
        for table in (schema.news, schema.users, schema.impressions, schema.clicks, schema.quarantine):
            cols = [c for c in table.c if c.name not in VOLATILE.get(table.name, set())]
            out[table.name] = sorted(tuple(r) for r in conn.execute(sa.select(*cols)))
        im, it = schema.impressions, schema.impression_items
        query = sa.select(im.c.source, im.c.impression_id, it.c.position, it.c.news_id, it.c.label).join(
            im, im.c.id == it.c.impression_pk
        )
        out["impression_items"] = sorted(tuple(r) for r in conn.execute(query))
        out["orphan_items"] = [tuple(r) for r in conn.execute(
            sa.select(it.c.impression_pk).where(~it.c.impression_pk.in_(sa.select(im.c.id)))
        )]
    return out


def wipe_store(engine: sa.Engine) -> None:
    """Delete every row the ingest writes (tables stay, migrated)."""
    with engine.begin() as conn:
        for table in (schema.impression_items, schema.clicks, schema.impressions, schema.users, schema.news,
                      schema.quarantine):
            conn.execute(sa.delete(table))
