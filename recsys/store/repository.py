"""Read queries the pipeline makes. Every function returns DataFrames or NumPy arrays.

Item references come back as row indices into a caller-given ordering of news ids (the rows
of an ``ItemFeatures``) so the model code never sees SQL or string ids in hot paths.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd
from sqlalchemy import Engine, and_, func, select

from recsys.columns import (
    ABSTRACT,
    CATEGORY,
    CONTENT_HASH,
    IMAGE_PATH,
    IMAGE_STATUS,
    IMPRESSION_ID,
    LABEL,
    NEWS_ID,
    POSITION,
    SUBCATEGORY,
    TIME,
    TITLE,
    USER_ID,
)
from recsys.models.samples import ClickLog, Impressions, InteractionLog
from recsys.store import schema as s


def read_news(engine: Engine) -> pd.DataFrame:
    """Every article, ordered by news id.

    Returns:
        DataFrame with NEWS_ID, CATEGORY, SUBCATEGORY, TITLE, ABSTRACT, IMAGE_PATH,
        IMAGE_STATUS, CONTENT_HASH and ``first_seen_at``.
    """
    n = s.news.c
    query = select(
        n.news_id, n.category, n.subcategory, n.title, n.abstract, n.image_path, n.image_status,
        n.content_hash, n.first_seen_at,
    ).order_by(n.news_id)
    with engine.connect() as conn:
        df = pd.read_sql(query, conn)
    df.columns = [NEWS_ID, CATEGORY, SUBCATEGORY, TITLE, ABSTRACT, IMAGE_PATH, IMAGE_STATUS, CONTENT_HASH, "first_seen_at"]
    return df


def time_range(
    engine: Engine, *, source: str | None = None, labelled_only: bool = False
) -> tuple[datetime | None, datetime | None]:
    """First and last impression time in the store (None, None when it holds none).

    Args:
        source: only impressions of this behaviors file.
        labelled_only: only impressions with at least one labelled candidate (what training
            reads; an unlabelled test file ingested for its articles does not count).
    """
    im, it = s.impressions.c, s.impression_items.c
    query = select(func.min(im.time), func.max(im.time))
    if source is not None:
        query = query.where(im.source == source)
    if labelled_only:
        query = query.where(select(it.impression_pk).where(it.impression_pk == im.id, it.label.is_not(None)).exists())
    with engine.connect() as conn:
        lo, hi = conn.execute(query).one()
    return lo, hi


def _row_lookup(news_ids: np.ndarray) -> pd.Series:
    return pd.Series(np.arange(len(news_ids), dtype=np.int32), index=pd.Index(news_ids, name=NEWS_ID))


def _csr(group_keys: np.ndarray, num_groups: int) -> np.ndarray:
    """Offsets (num_groups + 1,) for a flat array sorted by integer group key."""
    counts = np.bincount(group_keys, minlength=num_groups)
    offsets = np.zeros(num_groups + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def read_user_histories(
    engine: Engine,
    user_ids: np.ndarray,
    news_ids: np.ndarray,
    *,
    include_impression_clicks: bool = True,
    max_len: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Click histories of ``user_ids`` in one query, most recent first.

    Order: clicks seen in impressions (newest first), then the MIND History column (its last
    entry is the most recent). Articles missing from ``news_ids`` are dropped.

    Args:
        user_ids: (u,) user ids.
        news_ids: (n,) the item ordering the returned rows index into.
        include_impression_clicks: False keeps only the History column (the training input,
            which cannot leak the labels of the impressions being learned).
        max_len: keep at most this many per user.

    Returns:
        (offsets (u + 1,) int64, items (h,) int32 rows into ``news_ids``).
    """
    c = s.clicks.c
    query = select(c.user_id, c.news_id, c.history_pos, c.clicked_at)
    if not include_impression_clicks:
        query = query.where(c.history_pos.is_not(None))
    ids = list(map(str, user_ids))
    frames = []
    with engine.connect() as conn:
        # IN lists are chunked: PostgreSQL and SQLite both cap bound parameters.
        for start in range(0, len(ids), 5000):
            frames.append(pd.read_sql(query.where(c.user_id.in_(ids[start : start + 5000])), conn))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[USER_ID, NEWS_ID, "history_pos", "clicked_at"])
    return _history_csr(df, user_ids, news_ids, max_len=max_len, by_time=include_impression_clicks)


def _history_csr(df: pd.DataFrame, user_ids: np.ndarray, news_ids: np.ndarray, *, max_len: int | None, by_time: bool):
    user_row = pd.Series(np.arange(len(user_ids)), index=pd.Index(user_ids))
    item_row = _row_lookup(news_ids)
    df = df[df[NEWS_ID].isin(item_row.index)].copy()
    df["u"] = user_row.reindex(df[USER_ID].to_numpy()).to_numpy()
    df["i"] = item_row.reindex(df[NEWS_ID].to_numpy()).to_numpy()
    # Recent first: timed clicks newest first, then history entries from the end of the list.
    # Without impression clicks the History column's own order rules (an article that is in
    # it and was also clicked later must not jump ahead).
    df["has_time"] = df["clicked_at"].notna() & by_time
    df["t"] = pd.to_datetime(df["clicked_at"]).astype("int64", copy=False) if len(df) and by_time else 0
    df["hp"] = df["history_pos"].fillna(-1)
    df = df.sort_values(["u", "has_time", "t", "hp"], ascending=[True, False, False, False], kind="stable")
    if max_len is not None:
        df = df.groupby("u", sort=False).head(max_len)
    offsets = _csr(df["u"].to_numpy(dtype=np.int64), len(user_ids))
    return offsets, df["i"].to_numpy(dtype=np.int32)


def read_impressions(
    engine: Engine,
    news_ids: np.ndarray,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    source: str | None = None,
    history_len: int | None = None,
    labelled_only: bool = False,
) -> Impressions:
    """Impressions with time in ``[since, until)`` as arrays, in time order.

    Histories are the MIND History column of each user (clicks before the log started), so a
    training impression never sees its own labels.
    """
    im, it = s.impressions.c, s.impression_items.c
    cond = []
    if since is not None:
        cond.append(im.time >= since)
    if until is not None:
        cond.append(im.time < until)
    if source is not None:
        cond.append(im.source == source)
    query = (
        select(im.id, im.impression_id, im.user_id, im.time, it.position, it.news_id, it.label)
        .join(s.impression_items, it.impression_pk == im.id)
        .where(and_(*cond) if cond else True)
        .order_by(im.time, im.id, it.position)
    )
    with engine.connect() as conn:
        df = pd.read_sql(query, conn)
    df.columns = ["pk", IMPRESSION_ID, USER_ID, TIME, POSITION, NEWS_ID, LABEL]
    if labelled_only:
        df = df[df[LABEL].notna()]
    return impressions_from_frame(df, news_ids, engine=engine, history_len=history_len)


def impressions_from_frame(
    df: pd.DataFrame, news_ids: np.ndarray, *, engine: Engine | None = None, history_len: int | None = None,
    histories: tuple[np.ndarray, np.ndarray] | None = None,
) -> Impressions:
    """Build ``Impressions`` from one row per impression item (grouped by ``pk``, in order).

    Histories come from the store (``engine``) unless given as CSR over the frame's users.
    """
    item_row = _row_lookup(news_ids)
    unknown = ~df[NEWS_ID].isin(item_row.index)
    if unknown.any():
        bad = df.loc[unknown, NEWS_ID].iloc[0]
        raise KeyError(f"news id {bad!r} has no features")
    first = ~df["pk"].duplicated()
    heads = df[first]
    impression_index = np.cumsum(first.to_numpy()) - 1
    cand_offsets = _csr(impression_index, len(heads))
    labels = df[LABEL].fillna(-1).to_numpy(dtype=np.int8)
    users = heads[USER_ID].to_numpy(dtype=object)
    if histories is None:
        unique_users = pd.unique(users)
        if engine is None:
            raise ValueError("impressions_from_frame needs an engine or histories")
        u_off, u_items = read_user_histories(engine, unique_users, news_ids, include_impression_clicks=False, max_len=history_len)
    else:
        unique_users, (u_off, u_items) = histories[0], histories[1]
    # Expand per-user histories to per-impression CSR.
    pos = pd.Series(np.arange(len(unique_users)), index=pd.Index(unique_users)).reindex(users).to_numpy()
    lengths = (u_off[1:] - u_off[:-1])[pos]
    h_off = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(lengths, out=h_off[1:])
    starts = np.repeat(u_off[:-1][pos], lengths)
    within = np.arange(h_off[-1]) - np.repeat(h_off[:-1], lengths)
    h_items = u_items[starts + within] if len(within) else np.zeros(0, dtype=np.int32)
    return Impressions(
        impression_ids=heads[IMPRESSION_ID].to_numpy(dtype=np.int64),
        user_ids=users,
        times=pd.to_datetime(heads[TIME]).to_numpy().astype("datetime64[s]"),
        history_offsets=h_off,
        history_items=h_items.astype(np.int32),
        candidate_offsets=cand_offsets,
        candidate_items=item_row.reindex(df[NEWS_ID].to_numpy()).to_numpy(dtype=np.int32),
        labels=labels,
    )


def _labelled_items(
    engine: Engine, news_ids: np.ndarray, columns: dict, where, *, since: datetime | None = None,
    until: datetime | None = None,
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Impression items matching ``where`` in ``[since, until)``, on articles of ``news_ids``.

    The read behind the popularity log and the click log. Items of articles missing from
    ``news_ids`` are dropped (they have no features to score or embed).

    Args:
        columns: {name: column} of ``impressions`` / ``impression_items`` to read.
        where: a condition on those tables (which labels).

    Returns:
        ``(frame, rows, times)`` of the kept items: the columns, their rows into ``news_ids``
        (int64) and their impressions' times (datetime64[s]).
    """
    im, it = s.impressions.c, s.impression_items.c
    cond = [where]
    if since is not None:
        cond.append(im.time >= since)
    if until is not None:
        cond.append(im.time < until)
    query = select(*columns.values(), it.news_id, im.time).join(s.impressions, it.impression_pk == im.id).where(and_(*cond))
    with engine.connect() as conn:
        frame = pd.DataFrame(conn.execute(query).all(), columns=[*columns, NEWS_ID, TIME])
    if frame.empty:
        return frame, np.zeros(0, np.int64), np.zeros(0, "datetime64[s]")
    rows = pd.Index(news_ids, dtype=object).get_indexer(frame[NEWS_ID].to_numpy(dtype=object))
    known = rows >= 0
    times = pd.to_datetime(frame[TIME]).to_numpy(dtype="datetime64[ns]").astype("datetime64[s]")
    return frame[known], rows[known].astype(np.int64), times[known]


def read_interaction_log(
    engine: Engine, news_ids: np.ndarray, *, since: datetime | None = None, until: datetime | None = None
) -> InteractionLog:
    """Labelled shows and clicks in ``[since, until)`` as an ``InteractionLog`` over ``news_ids``.

    This is the popularity log of the side features. Shows of articles missing from
    ``news_ids`` are dropped (they cannot be scored).
    """
    it = s.impression_items.c
    frame, rows, times = _labelled_items(engine, news_ids, {LABEL: it.label}, it.label.is_not(None), since=since, until=until)
    return InteractionLog.from_events(rows, times, frame[LABEL].to_numpy(dtype=np.int8), len(news_ids))


def read_click_log(engine: Engine, news_ids: np.ndarray, *, until: datetime | None = None) -> ClickLog:
    """Clicks of labelled impressions before ``until`` as a ``ClickLog`` over ``news_ids``.

    The impression clicks that lead each History column (``samples.with_logged_clicks``).
    Clicks on articles missing from ``news_ids`` are dropped (they have no embedding).
    """
    frame, rows, times = _labelled_items(
        engine, news_ids, {USER_ID: s.impressions.c.user_id}, s.impression_items.c.label == 1, until=until
    )
    return ClickLog.from_events(frame[USER_ID].to_numpy(dtype=object), times, rows)


def read_news_titles(engine: Engine, news_ids) -> pd.DataFrame:
    """Title and category of the given articles, indexed by news id (for printing lists)."""
    n = s.news.c
    ids = list(map(str, news_ids))
    with engine.connect() as conn:
        df = pd.read_sql(select(n.news_id, n.title, n.category).where(n.news_id.in_(ids)), conn)
    df.columns = [NEWS_ID, TITLE, CATEGORY]
    return df.set_index(NEWS_ID)
