"""The process that started each run, so that a run whose process was killed is not left
``running`` for ever.

- runs.holder: ``host:pid`` of the process recording the run. A later run of the same kind
  on that host marks it failed when the process is gone (or the pid was reused since).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 17:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | Sequence[str] | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ALTER TABLE, not a batch copy: SQLite cannot rename a copied ``runs`` into place while
# the current_recommendations view refers to it (and ADD/DROP COLUMN need no copy there).
def upgrade() -> None:
    op.add_column('runs', sa.Column('holder', sa.String(length=255), nullable=True))


def downgrade() -> None:
    op.drop_column('runs', 'holder')
