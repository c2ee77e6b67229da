"""The store's clock: times are naive UTC datetimes everywhere (SQLite has no time zones)."""

from __future__ import annotations

from datetime import datetime, timezone


def utc_now() -> datetime:
    """The current time as a naive UTC datetime, as the store keeps times."""
    return datetime.now(timezone.utc).replace(tzinfo=None)
