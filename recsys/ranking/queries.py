"""Store reads of the nightly job that ``recsys.store.repository`` does not offer.

The repository reads active users from a start time only and the popularity log up to an end
time only; the nightly job needs both bounds (only the active-user and popularity windows
before ``as_of`` are worth loading), plus cheap markers of what the store holds so that a
rerun can tell whether its inputs changed. ``as_of`` is never earlier than the store's latest
impression (``run_nightly`` refuses it): histories and the index have no past view.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd
from sqlalchemy import Engine, and_, exists, func, select

from recsys.store import schema as s
from recsys.store.repository import last_impression_pk


def active_user_ids(engine: Engine, *, since: datetime, until: datetime) -> np.ndarray:
    """Users shown at least one impression in ``[since, until]``, sorted by id.

    Sorted in Python, not by the database's collation, so shards are the same on every backend.

    Returns:
        (u,) object array of user ids.
    """
    im = s.impressions.c
    with engine.connect() as conn:
        query = select(im.user_id).where(and_(im.time >= since, im.time <= until)).distinct()
        rows = conn.execute(query).scalars().all()
    return np.array(sorted(rows), dtype=object)


def count_without_clicks(engine: Engine, user_ids: np.ndarray) -> int:
    """How many of ``user_ids`` have no click at all (the cold-start users)."""
    c, u = s.clicks.c, s.users.c
    ids = [str(user) for user in user_ids]
    # One index probe per user (EXISTS), not every click of the chunk's users counted distinct
    # (benchmarks/bench_pg_store.py). An id missing from ``users`` counts as without clicks:
    # the callers' ids come from impressions, whose user_id is a foreign key to ``users``
    # (``clicks`` has none).
    clicked = exists().where(c.user_id == u.user_id)
    with_clicks = 0
    with engine.connect() as conn:
        # IN lists are chunked: both backends cap the number of bound parameters.
        for start in range(0, len(ids), 5000):
            chunk = ids[start : start + 5000]
            with_clicks += conn.execute(select(func.count()).where(u.user_id.in_(chunk), clicked)).scalar()
    return len(ids) - with_clicks


def first_seen_times(engine: Engine, news_ids: np.ndarray) -> np.ndarray:
    """First impression time of each article, aligned with ``news_ids``.

    Returns:
        (n,) datetime64[s]; NaT for articles never shown or unknown to the store.
    """
    n = s.news.c
    with engine.connect() as conn:
        rows = conn.execute(select(n.news_id, n.first_seen_at)).all()
    frame = pd.DataFrame(rows, columns=["news_id", "first_seen_at"])
    times = pd.Series(pd.to_datetime(frame["first_seen_at"]).to_numpy(), index=pd.Index(frame["news_id"]))
    aligned = times.reindex(pd.Index(news_ids, dtype=object))
    return aligned.to_numpy(dtype="datetime64[ns]").astype("datetime64[s]")


def index_key_codes(engine: Engine, news_ids: np.ndarray) -> np.ndarray:
    """(n, 2) int64 codes of the categories and subcategories of ``news_ids`` (the index rows)
    as the store holds them, -1 for an article it lacks: the category affinity's keys
    (``recsys.models.affinity``)."""
    from recsys.models.affinity import key_codes

    n = s.news.c
    with engine.connect() as conn:
        frame = pd.DataFrame(conn.execute(select(n.news_id, n.category, n.subcategory)).all(),
                             columns=["news_id", "category", "subcategory"])
    frame = frame.set_index("news_id").reindex(pd.Index(news_ids, dtype=object))
    known = frame["category"].notna().to_numpy()
    codes = np.full((len(frame), 2), -1, dtype=np.int64)
    if known.any():
        cats, subs = frame["category"].to_numpy(dtype=object)[known], frame["subcategory"].to_numpy(dtype=object)[known]
        codes[known] = key_codes(cats, subs)
    return codes


def store_marker(engine: Engine) -> dict:
    """Cheap counters that change whenever behaviors are ingested (part of a run's plan)."""
    with engine.connect() as conn:
        clicks = conn.execute(select(func.count()).select_from(s.clicks)).scalar()
    return {"last_impression_pk": last_impression_pk(engine), "clicks": int(clicks or 0)}
