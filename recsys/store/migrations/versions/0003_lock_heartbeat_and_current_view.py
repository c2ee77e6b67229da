"""A heartbeat on locks, and the view product surfaces read recommendations through.

- locks.heartbeat_at: the holder refreshes it while it works, so that a job on another host
  that is slow to ingest or encode (no shard written yet) is not taken for dead, and a job
  that was taken over can tell.
- current_recommendations: the rows of the latest complete nightly run only. The table also
  holds the rows of runs in progress and of failed runs; a reader that picks max(run_id) from
  it would see a half-written list.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 23:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | Sequence[str] | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CURRENT_VIEW = """
CREATE VIEW current_recommendations AS
SELECT run_id, user_id, rank, news_id, score, created_at
FROM recommendations
WHERE run_id = (SELECT max(run_id) FROM runs WHERE kind = 'nightly' AND status = 'complete')
"""


def upgrade() -> None:
    with op.batch_alter_table('locks') as batch:
        batch.add_column(sa.Column('heartbeat_at', sa.DateTime(), nullable=True))
    op.execute(CURRENT_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW current_recommendations")
    with op.batch_alter_table('locks') as batch:
        batch.drop_column('heartbeat_at')
