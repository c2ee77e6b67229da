"""The digest of each article's cover file, whatever its status.

- news.image_sha256: sha256 of the cover's bytes when the file could be read (also for an
  empty or corrupt one), else NULL. A later news file that brings no cover for the article
  (ingested without ``--images``) keeps the stored status and digest, so the content hash, which
  reads the digest, does not change and the article is not encoded again. Rows stored before
  this revision hold NULL; a corrupt cover among them hashes once more when next re-ingested.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 07:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | Sequence[str] | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ALTER TABLE, as in 0004: ADD/DROP COLUMN need no table copy on SQLite.
def upgrade() -> None:
    op.add_column('news', sa.Column('image_sha256', sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column('news', 'image_sha256')
