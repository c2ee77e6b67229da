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
    # Absolute resolved path of the cover, inside the images folder given at ingest; NULL
    # when there is no usable image (see image_status).
    Column("image_path", Text, nullable=True),
    Column("image_status", String(16), nullable=False),
    # sha256 of the cover file's bytes whenever it could be read (an empty or corrupt one too),
    # so that a later news file without covers keeps a bad cover's status and content hash.
    Column("image_sha256", String(64), nullable=True),
    # sha256 of the fields the encoders read (title, abstract, category, image bytes).
    Column("content_hash", String(64), nullable=False),
    # MIND has no publication time: the first impression that showed the article, or listed it
    # in a History, stands in.
    Column("first_seen_at", DateTime, nullable=True),
    # The first impression whose History listed it: kept apart because a corrected line's shows
    # can be recounted from the stored impressions, its History column cannot.
    Column("first_listed_at", DateTime, nullable=True),
    Column("updated_at", DateTime, nullable=False),
)

users = Table(
    "users",
    metadata,
    Column("user_id", String(ID_LEN), primary_key=True),
    Column("first_seen_at", DateTime, nullable=True),
    Column("last_seen_at", DateTime, nullable=True),
    # Time of the impression whose History column the clicks table holds: ingest replaces a
    # user's history only with one from a later impression, so an older file ingested later
    # does not roll it back.
    Column("history_at", DateTime, nullable=True),
    # Fingerprint of that History, so that seeing the same History again rewrites nothing.
    Column("history_hash", String(32), nullable=True),
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

# The two big tables (impression_items, clicks) carry no foreign keys: ingest is their only
# writer and checks every reference itself (news ids against the store and the news file,
# impression_pk from the impression it just wrote). PostgreSQL checks a foreign key with a
# per-row trigger; measured here, the two keys of impression_items made its COPY 3-4x slower,
# enough on their own to miss the 90 s MIND-small ingest goal. Nothing deletes impressions,
# news or users.
# SQLite stores both without rowid (one B-tree for the primary key instead of two). Neither
# has a secondary index: every query reads them by primary-key prefix (an impression's items,
# a user's clicks), and each extra index cost ~15% of the ingest time (migration 0002).
impression_items = Table(
    "impression_items",
    metadata,
    Column("impression_pk", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),  # impressions.id
    Column("position", Integer, primary_key=True),  # 0-based, display order
    Column("news_id", String(ID_LEN), nullable=False),  # news.news_id
    # NULL in unlabelled (test) behaviors files.
    Column("label", SmallInteger, nullable=True),
    sqlite_with_rowid=False,
)

# Click history: the MIND History column (history_pos set, clicked_at NULL) and clicks seen
# in labelled impressions (clicked_at set). One row per (user, article). No foreign keys,
# see impression_items.
clicks = Table(
    "clicks",
    metadata,
    Column("user_id", String(ID_LEN), primary_key=True),  # users.user_id
    Column("news_id", String(ID_LEN), primary_key=True),  # news.news_id
    # 0-based index in the latest History column seen for the user (the last is the newest).
    Column("history_pos", Integer, nullable=True),
    Column("clicked_at", DateTime, nullable=True),
    sqlite_with_rowid=False,
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
    Column("holder", String(255), nullable=True),  # host:pid of the process that recorded it
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
    Column("heartbeat_at", DateTime, nullable=True),  # refreshed while the holder works
)
