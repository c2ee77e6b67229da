"""Initial schema: every table of recsys/store/schema.py.

Revision ID: 0001
Revises:
Create Date: 2026-11-23 16:08:10.441288
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0001'
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'clicks',
        sa.Column('user_id', sa.String(length=64), nullable=False),
        sa.Column('news_id', sa.String(length=64), nullable=False),
        sa.Column('history_pos', sa.Integer(), nullable=True),
        sa.Column('clicked_at', sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint('user_id', 'news_id', name=op.f('pk_clicks')),
        sqlite_with_rowid=False,
    )
    op.create_index('ix_clicks_clicked_at', 'clicks', ['clicked_at'], unique=False)
    op.create_index('ix_clicks_user', 'clicks', ['user_id', 'clicked_at'], unique=False)

    op.create_table(
        'impression_items',
        sa.Column('impression_pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('position', sa.Integer(), nullable=False),
        sa.Column('news_id', sa.String(length=64), nullable=False),
        sa.Column('label', sa.SmallInteger(), nullable=True),
        sa.PrimaryKeyConstraint('impression_pk', 'position', name=op.f('pk_impression_items')),
        sqlite_with_rowid=False,
    )
    op.create_index('ix_impression_items_news', 'impression_items', ['news_id'], unique=False)

    op.create_table(
        'locks',
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('holder', sa.String(length=255), nullable=False),
        sa.Column('run_id', sa.BigInteger(), nullable=True),
        sa.Column('acquired_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('name', name=op.f('pk_locks'))
    )
    op.create_table(
        'model_versions',
        sa.Column('version', sa.String(length=64), nullable=False),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('is_current', sa.Boolean(), nullable=False),
        sa.Column('manifest', sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint('version', name=op.f('pk_model_versions'))
    )
    op.create_table(
        'news',
        sa.Column('news_id', sa.String(length=64), nullable=False),
        sa.Column('category', sa.String(length=128), nullable=False),
        sa.Column('subcategory', sa.String(length=128), nullable=False),
        sa.Column('title', sa.Text(), nullable=False),
        sa.Column('abstract', sa.Text(), nullable=False),
        sa.Column('url', sa.Text(), nullable=False),
        sa.Column('title_entities', sa.Text(), nullable=False),
        sa.Column('abstract_entities', sa.Text(), nullable=False),
        sa.Column('image_path', sa.Text(), nullable=True),
        sa.Column('image_status', sa.String(length=16), nullable=False),
        sa.Column('content_hash', sa.String(length=64), nullable=False),
        sa.Column('first_seen_at', sa.DateTime(), nullable=True),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('news_id', name=op.f('pk_news'))
    )
    op.create_table(
        'quarantine',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
        sa.Column('file', sa.Text(), nullable=False),
        sa.Column('line', sa.Integer(), nullable=False),
        sa.Column('field', sa.String(length=64), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_quarantine')),
        sa.UniqueConstraint('file', 'line', name='uq_quarantine_file_line')
    )
    op.create_table(
        'runs',
        sa.Column('run_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
        sa.Column('kind', sa.String(length=32), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('started_at', sa.DateTime(), nullable=False),
        sa.Column('finished_at', sa.DateTime(), nullable=True),
        sa.Column('model_version', sa.String(length=64), nullable=True),
        sa.Column('counts', sa.JSON(), nullable=False),
        sa.Column('timings', sa.JSON(), nullable=False),
        sa.Column('message', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('run_id', name=op.f('pk_runs'))
    )
    op.create_index('ix_runs_kind_status', 'runs', ['kind', 'status', 'run_id'], unique=False)

    op.create_table(
        'users',
        sa.Column('user_id', sa.String(length=64), nullable=False),
        sa.Column('first_seen_at', sa.DateTime(), nullable=True),
        sa.Column('last_seen_at', sa.DateTime(), nullable=True),
        sa.Column('history_at', sa.DateTime(), nullable=True),
        sa.Column('history_hash', sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint('user_id', name=op.f('pk_users'))
    )
    op.create_table(
        'impressions',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
        sa.Column('source', sa.String(length=255), nullable=False),
        sa.Column('impression_id', sa.BigInteger(), nullable=False),
        sa.Column('user_id', sa.String(length=64), nullable=False),
        sa.Column('time', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['user_id'], ['users.user_id'], name=op.f('fk_impressions_user_id_users')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_impressions')),
        sa.UniqueConstraint('source', 'impression_id', name='uq_impressions_source_impression_id')
    )
    op.create_index('ix_impressions_time', 'impressions', ['time'], unique=False)
    op.create_index('ix_impressions_user_time', 'impressions', ['user_id', 'time'], unique=False)

    op.create_table(
        'recommendations',
        sa.Column('run_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('user_id', sa.String(length=64), nullable=False),
        sa.Column('rank', sa.SmallInteger(), nullable=False),
        sa.Column('news_id', sa.String(length=64), nullable=False),
        sa.Column('score', sa.Float(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['run_id'], ['runs.run_id'], name=op.f('fk_recommendations_run_id_runs'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('run_id', 'user_id', 'rank', name=op.f('pk_recommendations'))
    )
    op.create_index('ix_recommendations_user_run', 'recommendations', ['user_id', 'run_id'], unique=False)

    op.create_table(
        'run_shards',
        sa.Column('run_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('shard', sa.Integer(), nullable=False),
        sa.Column('num_users', sa.Integer(), nullable=False),
        sa.Column('num_recommendations', sa.Integer(), nullable=False),
        sa.Column('finished_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['run_id'], ['runs.run_id'], name=op.f('fk_run_shards_run_id_runs'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('run_id', 'shard', name=op.f('pk_run_shards'))
    )


def downgrade() -> None:
    op.drop_table('run_shards')
    op.drop_index('ix_recommendations_user_run', table_name='recommendations')

    op.drop_table('recommendations')
    op.drop_index('ix_impressions_user_time', table_name='impressions')
    op.drop_index('ix_impressions_time', table_name='impressions')

    op.drop_table('impressions')
    op.drop_table('users')
    op.drop_index('ix_runs_kind_status', table_name='runs')

    op.drop_table('runs')
    op.drop_table('quarantine')
    op.drop_table('news')
    op.drop_table('model_versions')
    op.drop_table('locks')
    op.drop_index('ix_impression_items_news', table_name='impression_items')

    op.drop_table('impression_items')
    op.drop_index('ix_clicks_user', table_name='clicks')
    op.drop_index('ix_clicks_clicked_at', table_name='clicks')

    op.drop_table('clicks')
