"""When a History column first listed each article, kept apart from its shows.

- news.first_listed_at: the earliest time of an impression whose History lists the article.
  ``first_seen_at`` is the earlier of it and the article's first show; the shows can be
  recounted from the stored impressions when a corrected line moves one (a misdated line no
  longer ages its articles for good), the listings cannot (the store keeps each user's latest
  History only), so they are kept here. Filled for stored rows from what the store holds: the
  stored Histories (each user's latest), and a first-seen time earlier than every stored show
  (only a listing sets that). A store whose lines were corrected before this revision may hold
  a first-seen time that a moved line set: it is taken for a listing here, and only a store
  rebuilt from the corrected files drops it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 08:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | Sequence[str] | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    news = sa.table('news', sa.column('news_id', sa.String), sa.column('first_seen_at', sa.DateTime),
                    sa.column('first_listed_at', sa.DateTime))
    impressions = sa.table('impressions', sa.column('id', sa.BigInteger), sa.column('time', sa.DateTime))
    items = sa.table('impression_items', sa.column('impression_pk', sa.BigInteger), sa.column('news_id', sa.String))
    users = sa.table('users', sa.column('user_id', sa.String), sa.column('history_at', sa.DateTime))
    clicks = sa.table('clicks', sa.column('user_id', sa.String), sa.column('news_id', sa.String),
                      sa.column('history_pos', sa.Integer))
    conn = op.get_bind()
    # Read before the ALTER TABLE, whose lock on news (PostgreSQL's ACCESS EXCLUSIVE) then lasts
    # the update only, not this pass over every show (impression_items has no index on news_id).
    first_shown = dict(conn.execute(
        sa.select(items.c.news_id, sa.func.min(impressions.c.time))
        .select_from(items.join(impressions, impressions.c.id == items.c.impression_pk))
        .group_by(items.c.news_id)).tuples().all())
    # Known listings: the stored Histories (each user's latest, at users.history_at), and a
    # first-seen time earlier than every stored show of the article (only a listing sets that).
    listed = dict(conn.execute(
        sa.select(clicks.c.news_id, sa.func.min(users.c.history_at))
        .select_from(clicks.join(users, users.c.user_id == clicks.c.user_id))
        .where(clicks.c.history_pos.is_not(None), users.c.history_at.is_not(None))
        .group_by(clicks.c.news_id)).tuples().all())
    for news_id, seen in conn.execute(sa.select(news.c.news_id, news.c.first_seen_at)
                                      .where(news.c.first_seen_at.is_not(None))).tuples():
        if news_id not in first_shown or seen < first_shown[news_id]:
            listed[news_id] = min(seen, listed.get(news_id, seen))
    op.add_column('news', sa.Column('first_listed_at', sa.DateTime(), nullable=True))
    if listed:
        conn.execute(news.update().where(news.c.news_id == sa.bindparam('key')).values(first_listed_at=sa.bindparam('at')),
                     [{"key": n, "at": t} for n, t in listed.items()])


def downgrade() -> None:
    op.drop_column('news', 'first_listed_at')
