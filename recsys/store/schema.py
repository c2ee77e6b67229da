"""Tables of the store (SQLAlchemy 2 Core).

Migrations under ``migrations/`` create and upgrade these tables; this module is the
reference they are generated from. Times are naive UTC datetimes (MIND times carry no zone).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
)

# Stable constraint names so that migrations can refer to them on every backend.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

ID_LEN = 64

news = Table(
    "news",
    metadata,
    Column("news_id", String(ID_LEN), primary_key=True),
    Column("category", String(128), nullable=False),
    Column("subcategory", String(128), nullable=False),
    Column("title", Text, nullable=False),
    Column("abstract", Text, nullable=False),
    Column("url", Text, nullable=False),
    Column("title_entities", Text, nullable=False),
    Column("abstract_entities", Text, nullable=False),
    # Path relative to the images folder given at ingest; NULL when there is no usable image.
    Column("image_path", Text, nullable=True),
    Column("image_status", String(16), nullable=False),
    # sha256 of the fields the encoders read (title, abstract, category, image bytes).
    Column("content_hash", String(64), nullable=False),
    # MIND has no publication time: the first impression that showed the article stands in.
    Column("first_seen_at", DateTime, nullable=True),
    Column("updated_at", DateTime, nullable=False),
)

users = Table(
    "users",
    metadata,
    Column("user_id", String(ID_LEN), primary_key=True),
    Column("first_seen_at", DateTime, nullable=True),
    Column("last_seen_at", DateTime, nullable=True),
)

impressions = Table(
    "impressions",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    # MIND impression ids restart at 1 in every file, so the key is (source, impression_id).
    Column("source", String(255), nullable=False),
    Column("impression_id", BigInteger, nullable=False),
    Column("user_id", String(ID_LEN), ForeignKey("users.user_id"), nullable=False),
    Column("time", DateTime, nullable=False),
    UniqueConstraint("source", "impression_id", name="uq_impressions_source_impression_id"),
    Index("ix_impressions_time", "time"),
    Index("ix_impressions_user_time", "user_id", "time"),
)

impression_items = Table(
    "impression_items",
    metadata,
    Column("impression_pk", BigInteger().with_variant(Integer, "sqlite"), ForeignKey("impressions.id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("news_id", String(ID_LEN), ForeignKey("news.news_id"), nullable=False),
    # NULL in unlabelled (test) behaviors files.
    Column("label", SmallInteger, nullable=True),
    Index("ix_impression_items_news", "news_id"),
)

# Click history: the MIND History column (history_pos set, clicked_at NULL) and clicks seen
# in labelled impressions (clicked_at set). One row per (user, article).
clicks = Table(
    "clicks",
    metadata,
    Column("user_id", String(ID_LEN), ForeignKey("users.user_id"), primary_key=True),
    Column("news_id", String(ID_LEN), ForeignKey("news.news_id"), primary_key=True),
    Column("history_pos", Integer, nullable=True),
    Column("clicked_at", DateTime, nullable=True),
    Index("ix_clicks_user", "user_id", "clicked_at"),
    Index("ix_clicks_clicked_at", "clicked_at"),
)

quarantine = Table(
    "quarantine",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("file", Text, nullable=False),
    Column("line", Integer, nullable=False),
    Column("field", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_at", DateTime, nullable=False),
    UniqueConstraint("file", "line", name="uq_quarantine_file_line"),
)

model_versions = Table(
    "model_versions",
    metadata,
    Column("version", String(64), primary_key=True),
    Column("path", Text, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("is_current", Boolean, nullable=False, default=False),
    Column("manifest", JSON, nullable=False),
)

runs = Table(
    "runs",
    metadata,
    Column("run_id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("kind", String(32), nullable=False),  # ingest | train | nightly | evaluate
    Column("status", String(16), nullable=False),  # running | complete | failed
    Column("started_at", DateTime, nullable=False),
    Column("finished_at", DateTime, nullable=True),
    Column("model_version", String(64), nullable=True),
    Column("counts", JSON, nullable=False),
    Column("timings", JSON, nullable=False),
    Column("message", Text, nullable=True),
    Index("ix_runs_kind_status", "kind", "status", "run_id"),
)

# Shards of a nightly run already written, so that a rerun resumes instead of redoing them.
run_shards = Table(
    "run_shards",
    metadata,
    Column("run_id", BigInteger().with_variant(Integer, "sqlite"), ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True),
    Column("shard", Integer, primary_key=True),
    Column("num_users", Integer, nullable=False),
    Column("num_recommendations", Integer, nullable=False),
    Column("finished_at", DateTime, nullable=False),
)

recommendations = Table(
    "recommendations",
    metadata,
    Column("run_id", BigInteger().with_variant(Integer, "sqlite"), ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True),
    Column("user_id", String(ID_LEN), primary_key=True),
    Column("rank", SmallInteger, primary_key=True),
    Column("news_id", String(ID_LEN), nullable=False),
    Column("score", Float, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Index("ix_recommendations_user_run", "user_id", "run_id"),
)

# A named lock held in the store so that two nightly runs cannot overlap.
locks = Table(
    "locks",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(255), nullable=False),  # host:pid
    Column("run_id", BigInteger, nullable=True),
    Column("acquired_at", DateTime, nullable=False),
)
