"""Read queries the pipeline makes. Every function returns DataFrames or NumPy arrays.

Item references come back as row indices into a caller-given ordering of news ids (the rows
of an ``ItemFeatures``) so the model code never sees SQL or string ids in hot paths.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import datetime

import numpy as np
import pandas as pd
from sqlalchemy import Engine, and_, case, func, select, true

from recsys.columns import (
    CATEGORY,
    CONTENT_HASH,
    FIRST_SEEN_AT,
    IMAGE_STATUS,
    IMPRESSION_ID,
    LABEL,
    NEWS_FRAME_COLUMNS,
    NEWS_ID,
    RANK,
    SCORE,
    TIME,
    TITLE,
    USER_ID,
)
from recsys.data.interactions import ClickLog, Impressions, InteractionLog
from recsys.store import schema as s
from recsys.store.database import driver_errors


def bytewise(engine: Engine, column):
    """``column`` ordered byte by byte (code point order, as SQLite and Python compare strings).

    A PostgreSQL database created with an en_US or ICU collation orders ``N-1``, ``n1`` and
    ``N_1`` otherwise; an id's position breaks ties (the history cap, top-k, training order), so
    the same files would train and rank differently on the two backends.
    """
    return column.collate("C") if engine.dialect.name == "postgresql" else column


def read_news(engine: Engine) -> pd.DataFrame:
    """Every article, ordered by news id (code point order on every backend).

    Returns:
        DataFrame with the ``NEWS_FRAME_COLUMNS``.
    """
    return _read_news_columns(engine, NEWS_FRAME_COLUMNS)


def read_news_state(engine: Engine) -> pd.DataFrame:
    """What of each article an index refresh depends on, in ``read_news``'s order and types:
    news id, cover status, content hash and first-seen time (no titles: a nightly retry reads
    this to tell whether the index is already current)."""
    return _read_news_columns(engine, (NEWS_ID, IMAGE_STATUS, CONTENT_HASH, FIRST_SEEN_AT))


def _read_news_columns(engine: Engine, columns) -> pd.DataFrame:
    """These ``news`` columns (the frame's names are the table's) of every article, ordered by
    news id in code point order on every backend."""
    n = s.news.c
    query = select(*(n[name] for name in columns)).order_by(bytewise(engine, n.news_id))
    with engine.connect() as conn:
        df = pd.read_sql(query, conn)
    df.columns = list(columns)
    return df


def _labelled():
    """The condition on ``impressions`` that at least one of its candidates has a label (an
    unlabelled test file ingested for its articles has none)."""
    im, it = s.impressions.c, s.impression_items.c
    return select(it.impression_pk).where(it.impression_pk == im.id, it.label.is_not(None)).exists()


def time_range(
    engine: Engine, *, source: str | None = None, labelled_only: bool = False
) -> tuple[datetime | None, datetime | None]:
    """First and last impression time in the store (None, None when it holds none).

    Args:
        source: only impressions of this behaviors file.
        labelled_only: only impressions with at least one labelled candidate (what training
            reads; an unlabelled test file ingested for its articles does not count).
    """
    im = s.impressions.c
    cond = []
    if source is not None:
        cond.append(im.source == source)
    if labelled_only:
        cond.append(_labelled())
    # Each end walks the time index from its side and stops at the first match: with the
    # labelled filter, min()/max() made PostgreSQL join every impression item (0.8-1.0 s
    # against 0.09 s at 6M items, 50k unlabelled impressions last).
    ends = [select(im.time).where(*cond).order_by(order).limit(1).scalar_subquery() for order in (im.time.asc(), im.time.desc())]
    with engine.connect() as conn:
        lo, hi = conn.execute(select(*ends)).one()
    return lo, hi


def labelled_sources(engine: Engine) -> list[str]:
    """The sources (behaviors files) with at least one labelled impression, in code point order."""
    im = s.impressions.c
    with engine.connect() as conn:
        return sorted(conn.execute(select(im.source).where(_labelled()).distinct()).scalars().all())


def _window(since: datetime | None, until: datetime | None, source: str | None = None) -> list:
    """Conditions on ``impressions``: time in ``[since, until)`` (a None end: unbounded) and,
    unless None, of ``source``."""
    im = s.impressions.c
    cond = []
    if since is not None:
        cond.append(im.time >= since)
    if until is not None:
        cond.append(im.time < until)
    if source is not None:
        cond.append(im.source == source)
    return cond


def read_labelled_user_times(engine: Engine, *, first: datetime, last: datetime) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stored labelled impressions of ``[first, last]`` (both ends included), for telling
    which of a file's impressions the store holds with their clicks.

    Returns:
        ``(user_ids, times, sources)``: (m,) object, (m,) datetime64[s] (naive UTC), (m,) object.
    """
    im = s.impressions.c
    query = select(im.user_id, im.time, im.source).where(im.time >= first, im.time <= last, _labelled())
    columns = [USER_ID, TIME, "source"]
    with engine.connect() as conn:
        frames = list(_stream(conn, query, columns))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({c: [] for c in columns}, dtype=object)
    return df[USER_ID].to_numpy(object), _seconds(df[TIME]), df["source"].to_numpy(object)


WINDOW_LABEL_ASKS = ("labelled", "clicked", "skipped", "scoreable")


def window_labels(engine: Engine, *, since: datetime, until: datetime, source: str | None = None,
                  asks: tuple[str, ...] = WINDOW_LABEL_ASKS) -> dict[str, bool]:
    """Whether impressions with time in ``[since, until)`` (of ``source``) hold what ``asks``
    names: "labelled" (a labelled candidate), "clicked" (a click), "skipped" (a non-click),
    "scoreable" (an impression with both a click and a non-click); read without the rows.

    Each EXISTS walks the time index and stops at its first match: milliseconds when the answer
    is yes, whatever the window's size (``recsys train`` asks before encoding the catalogue); a
    "no" walks the whole window, so only what the caller reads is asked.
    """
    im, it = s.impressions.c, s.impression_items.c
    window = _window(since, until, source)

    def labelled(*conds):
        return select(it.impression_pk).where(it.impression_pk == im.id, *conds).exists()

    def some_impression(*conds):
        return select(im.id).where(*window, *conds).exists()

    exists = {"labelled": lambda: some_impression(labelled(it.label.is_not(None))),
              "clicked": lambda: some_impression(labelled(it.label == 1)),
              "skipped": lambda: some_impression(labelled(it.label == 0)),
              "scoreable": lambda: some_impression(labelled(it.label == 1), labelled(it.label == 0))}
    with engine.connect() as conn:
        row = conn.execute(select(*(exists[ask]() for ask in asks))).one()
    return {ask: bool(value) for ask, value in zip(asks, row)}


def window_label_counts(engine: Engine, *, since: datetime, until: datetime, source: str | None = None) -> tuple[int, int]:
    """(clicks, non-clicks) among the candidates of impressions with time in ``[since, until)``."""
    im, it = s.impressions.c, s.impression_items.c
    window = _window(since, until, source)
    counts = [func.coalesce(func.sum(case((it.label == label, 1), else_=0)), 0) for label in (1, 0)]
    query = select(*counts).select_from(s.impression_items.join(s.impressions, it.impression_pk == im.id)).where(*window)
    with engine.connect() as conn:
        clicks, non_clicks = conn.execute(query).one()
    return int(clicks), int(non_clicks)


def _row_lookup(news_ids: np.ndarray) -> pd.Series:
    return pd.Series(np.arange(len(news_ids), dtype=np.int32), index=pd.Index(news_ids, name=NEWS_ID))


def _csr(group_keys: np.ndarray, num_groups: int) -> np.ndarray:
    """Offsets (num_groups + 1,) for a flat array sorted by integer group key."""
    counts = np.bincount(group_keys, minlength=num_groups)
    offsets = np.zeros(num_groups + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


# Rows fetched and turned into arrays at a time. The drivers build a Python object per value;
# a window of MIND-large (80M impression items) read at once would hold tens of GB of them.
STREAM_ROWS = 1 << 18
# IN lists are chunked: PostgreSQL and SQLite both cap bound parameters.
_IN_CHUNK = 5000
# Server-side cursors are named; a name is unique within its connection.
_cursor_names = itertools.count()


def _stream(conn, query, columns: list[str], rows: int | None = None):
    """The query's result as DataFrames of at most ``rows`` rows (``STREAM_ROWS`` by default), fetched as a stream
    (a server-side cursor on PostgreSQL), so that only one chunk's Python objects are alive.

    Rows come from the driver's own cursor, inside ``conn``'s transaction: SQLAlchemy's Row
    objects and per-value type processing took half of a training read. Values are therefore
    the driver's: times are ``datetime`` on PostgreSQL and ISO strings on SQLite (callers read
    them with ``pd.to_datetime``).
    """
    if not conn.in_transaction():
        # Every read of ``conn`` shares one transaction (BEGIN on SQLite, the isolation level
        # set on PostgreSQL), as it does when SQLAlchemy executes the queries itself.
        conn.begin()
    driver_conn = conn.connection.dbapi_connection
    postgres = conn.dialect.name == "postgresql"
    if postgres:
        # Bound parameters, which psycopg adapts itself (times, text, integers; IN lists expanded).
        compiled = query.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
        sql, params = str(compiled), compiled.params
        cursor = driver_conn.cursor(name=f"recsys_stream_{next(_cursor_names)}")
    else:
        # Literal values rendered and quoted by SQLAlchemy, in the text form it stores times in
        # (sqlite3 would bind a datetime in another form, which compares differently as text).
        sql, params = str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})), None
        cursor = driver_conn.cursor()
    # The cursor is closed even when the caller stops early (a bad row): an unclosed
    # server-side cursor outlives its transaction on PostgreSQL.
    try:
        with driver_errors(conn, sql, params):
            if postgres:
                # PostgreSQL plans a cursor to fetch a tenth of its rows (cursor_tuple_fraction), and
                # for that chose a scan of the whole clicks table for each shard's histories (0.7-0.9 s
                # a shard at 5M clicks, 0.1 s with the index); every caller here reads to the end.
                driver_conn.execute("SET LOCAL cursor_tuple_fraction = 1.0")
            cursor.execute(sql) if params is None else cursor.execute(sql, params)
            while chunk := cursor.fetchmany(rows or STREAM_ROWS):
                yield pd.DataFrame.from_records(chunk, columns=columns)
    finally:
        cursor.close()


def _seconds(values: pd.Series) -> np.ndarray:
    # Not through datetime64[ns]: it ends in 2262 and wraps silently after.
    return pd.to_datetime(values).to_numpy().astype("datetime64[s]")


def read_user_histories(
    engine: Engine,
    user_ids: np.ndarray,
    news_ids: np.ndarray,
    *,
    include_impression_clicks: bool = True,
    max_len: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Click histories of ``user_ids``, most recent first.

    Order: clicks seen in impressions (newest first), then the MIND History column (its last
    entry is the most recent). Articles missing from ``news_ids`` are dropped. Users are read
    ``_IN_CHUNK`` at a time and capped before the next chunk is read, so memory follows the
    capped result, not every stored click.

    Args:
        user_ids: (u,) unique user ids.
        news_ids: (n,) the item ordering the returned rows index into.
        include_impression_clicks: False keeps only the History column (the training input;
            a later file's History may still list clicks of the impressions being learned,
            which ``interactions.without_later_clicks`` drops).
        max_len: keep at most this many per user.

    Returns:
        (offsets (u + 1,) int64, items (h,) int32 rows into ``news_ids``).
    """
    c = s.clicks.c
    query = select(c.user_id, c.news_id, c.history_pos, c.clicked_at)
    if not include_impression_clicks:
        query = query.where(c.history_pos.is_not(None))
    columns = [USER_ID, NEWS_ID, "history_pos", "clicked_at"]
    user_ids = np.asarray(user_ids, dtype=object)
    item_row = _row_lookup(news_ids)
    lengths, items = [], []
    with engine.connect() as conn:
        for start in range(0, len(user_ids), _IN_CHUNK):
            chunk = user_ids[start : start + _IN_CHUNK]
            parts = list(_stream(conn, query.where(c.user_id.in_(list(map(str, chunk)))), columns))
            df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({k: [] for k in columns})
            offsets, rows = _history_csr(df, chunk, item_row, max_len=max_len, by_time=include_impression_clicks)
            lengths.append(np.diff(offsets))
            items.append(rows)
    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    if lengths:
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
    return offsets, np.concatenate(items) if items else np.zeros(0, np.int32)


def _history_csr(df: pd.DataFrame, user_ids: np.ndarray, item_row: pd.Series, *, max_len: int | None, by_time: bool):
    user_row = pd.Series(np.arange(len(user_ids)), index=pd.Index(user_ids))
    found = item_row.index.get_indexer(df[NEWS_ID].to_numpy(dtype=object))  # -1: an article without features
    known = found >= 0
    df = df[known].copy()
    df["u"] = user_row.reindex(df[USER_ID].to_numpy()).to_numpy()
    df["i"] = item_row.to_numpy()[found[known]]
    # Recent first: timed clicks newest first, then history entries from the end of the list.
    # Without impression clicks the History column's own order rules (an article that is in
    # it and was also clicked later must not jump ahead).
    df["has_time"] = df["clicked_at"].notna() & by_time
    df["t"] = pd.to_datetime(df["clicked_at"]).astype("int64", copy=False) if len(df) and by_time else 0
    df["hp"] = df["history_pos"].fillna(-1)
    # The item row breaks the last ties (clicks of one impression share its time and have no
    # History position): the database returns rows in no set order, and which of them the cap
    # keeps must not depend on the query plan, the shard's other users or the backend. It
    # runs backwards, as reading ``ClickLog`` newest first does.
    df = df.sort_values(["u", "has_time", "t", "hp", "i"], ascending=[True, False, False, False, False], kind="stable")
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
    """Impressions with time in ``[since, until)`` as arrays, in time order (those of one
    second by user id, source and impression id).

    Histories are the user's stored MIND History column: the one of the user's latest
    impression in the store, which a later file may have extended with clicks from this very
    window. A training reader must drop those (``interactions.without_later_clicks``, as
    ``pipelines.train.read_windows`` does), or an impression would see its own labels. The rows are streamed ``STREAM_ROWS`` at a
    time into arrays: about 5 bytes per (impression, candidate) are kept, not the driver's
    Python objects.

    Args:
        since / until: the time window (either may be None: unbounded).
        source: only impressions of this source (the file they were ingested from); None: all.
        history_len: keep at most this many history items per user, most recent first; None: all.
        labelled_only: only labelled candidates; an impression without any is left out.

    Raises:
        KeyError: a candidate's news id is not in ``news_ids`` (it has no features).
    """
    im, it = s.impressions.c, s.impression_items.c
    cond = _window(since, until, source)
    window = and_(*cond) if cond else true()
    # Two queries: the items (three narrow columns per candidate) and the impressions' own
    # columns once per impression, not repeated on every candidate row (half the read time).
    # Impressions of one second are ordered by what they hold, not by the row id, which is
    # the order the lines were ingested in: training batches (and so the model) must not
    # depend on the line order of a file or on the backend's collation.
    by = (im.time, bytewise(engine, im.user_id), bytewise(engine, im.source), im.impression_id)
    items_query = (
        select(it.impression_pk, it.news_id, it.label)
        .join(s.impressions, it.impression_pk == im.id)
        .where(and_(window, it.label.is_not(None)) if labelled_only else window)
        .order_by(*by, it.position)
    )
    heads_query = select(im.id, im.impression_id, im.user_id, im.time).where(window).order_by(*by)
    lookup = pd.Index(news_ids, dtype=object)
    pks, starts, rows, labels = [], [], [], []
    last_pk, seen = None, 0  # the previous chunk's last impression, items read so far
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            # One snapshot for both queries (SQLite's BEGIN DEFERRED in WAL mode gives one already):
            # a re-ingest may move an impression's time or user between them.
            conn.execution_options(isolation_level="REPEATABLE READ")
        for df in _stream(conn, items_query, ["pk", NEWS_ID, LABEL]):
            found = lookup.get_indexer(df[NEWS_ID].to_numpy(dtype=object))
            if (found < 0).any():
                raise KeyError(f"news id {df[NEWS_ID].iloc[int(np.argmax(found < 0))]!r} has no features")
            rows.append(found.astype(np.int32))
            labels.append(df[LABEL].fillna(-1).to_numpy(dtype=np.int8))
            # Items arrive grouped by impression; one may continue from the previous chunk.
            pk = df["pk"].to_numpy(dtype=np.int64)
            first = np.ones(len(pk), dtype=bool)
            first[1:] = pk[1:] != pk[:-1]
            first[0] = pk[0] != last_pk
            begin = np.flatnonzero(first)
            starts.append(seen + begin)  # where each impression's items start among all items
            pks.append(pk[begin])
            last_pk, seen = pk[-1], seen + len(pk)
        # Aligned to the items' impressions: those without a labelled item are not used.
        heads = [pd.DataFrame({"pk": df["pk"].to_numpy(dtype=np.int64), IMPRESSION_ID: df[IMPRESSION_ID].to_numpy(dtype=np.int64),
                               USER_ID: df[USER_ID].to_numpy(dtype=object), TIME: _seconds(df[TIME])})
                 for df in _stream(conn, heads_query, ["pk", IMPRESSION_ID, USER_ID, TIME])]
    order = np.concatenate(pks) if pks else np.zeros(0, np.int64)
    head = (pd.concat(heads, ignore_index=True) if heads else
            pd.DataFrame({"pk": np.zeros(0, np.int64), IMPRESSION_ID: np.zeros(0, np.int64), USER_ID: np.zeros(0, object),
                          TIME: np.zeros(0, "datetime64[s]")}))
    at = pd.Index(head["pk"].to_numpy()).get_indexer(order)
    if (at < 0).any():  # both queries read one snapshot, so this is a broken store
        raise RuntimeError(f"impression pk {order[np.argmax(at < 0)]} has items but no impression row")
    head = head.iloc[at].reset_index(drop=True)
    cand_offsets = np.append(np.concatenate(starts) if starts else np.zeros(0, np.int64), seen).astype(np.int64)
    users = head[USER_ID].to_numpy(dtype=object)
    unique_users = pd.unique(users)
    u_off, u_items = read_user_histories(engine, unique_users, news_ids, include_impression_clicks=False, max_len=history_len)
    h_off, h_items = _per_impression(users, unique_users, u_off, u_items)
    return Impressions(
        impression_ids=head[IMPRESSION_ID].to_numpy(dtype=np.int64),
        user_ids=users,
        times=head[TIME].to_numpy(dtype="datetime64[s]"),
        history_offsets=h_off,
        history_items=h_items,
        candidate_offsets=cand_offsets,
        candidate_items=np.concatenate(rows) if rows else np.zeros(0, np.int32),
        labels=np.concatenate(labels) if labels else np.zeros(0, np.int8),
    )


def _per_impression(users: np.ndarray, unique_users: np.ndarray, u_off: np.ndarray, u_items: np.ndarray):
    """Per-user history CSR expanded to one history per impression: (offsets (m + 1,), items int32)."""
    pos = pd.Series(np.arange(len(unique_users)), index=pd.Index(unique_users)).reindex(users).to_numpy()
    lengths = (u_off[1:] - u_off[:-1])[pos]
    h_off = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(lengths, out=h_off[1:])
    starts = np.repeat(u_off[:-1][pos] - h_off[:-1], lengths)  # item k of the result is u_items[k + start]
    h_items = u_items[starts + np.arange(h_off[-1])] if h_off[-1] else np.zeros(0, dtype=np.int32)
    return h_off, h_items.astype(np.int32, copy=False)


def _labelled_items(
    engine: Engine, news_ids: np.ndarray, column, dtype, where, *, since: datetime | None = None,
    until: datetime | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One column of the impression items matching ``where`` in ``[since, until)``, on articles of
    ``news_ids``, streamed into arrays.

    The read behind the popularity log and the click log. Items of articles missing from
    ``news_ids`` are dropped (they have no features to score or embed).

    Args:
        column: a column of ``impressions`` / ``impression_items`` to read, as ``dtype``.
        where: a condition on those tables (which labels).

    Returns:
        ``(values, rows, times)`` of the kept items: the column, their rows into ``news_ids``
        (int32) and their impressions' times (datetime64[s]).
    """
    im, it = s.impressions.c, s.impression_items.c
    cond = [where, *_window(since, until)]
    query = select(column, it.news_id, im.time).join(s.impressions, it.impression_pk == im.id).where(and_(*cond))
    lookup = pd.Index(news_ids, dtype=object)
    values, rows, times = [np.zeros(0, dtype)], [np.zeros(0, np.int32)], [np.zeros(0, "datetime64[s]")]
    with engine.connect() as conn:
        for df in _stream(conn, query, ["value", NEWS_ID, TIME]):
            found = lookup.get_indexer(df[NEWS_ID].to_numpy(dtype=object))
            known = found >= 0
            values.append(df["value"].to_numpy(dtype=dtype)[known])
            rows.append(found[known].astype(np.int32))
            times.append(_seconds(df[TIME])[known])
    return np.concatenate(values), np.concatenate(rows), np.concatenate(times)


def read_interaction_log(
    engine: Engine, news_ids: np.ndarray, *, since: datetime | None = None, until: datetime | None = None
) -> InteractionLog:
    """Labelled shows and clicks in ``[since, until)`` as an ``InteractionLog`` over ``news_ids``.

    This is the popularity log of the side features. Shows of articles missing from
    ``news_ids`` are dropped (they cannot be scored).
    """
    it = s.impression_items.c
    labels, rows, times = _labelled_items(engine, news_ids, it.label, np.int8, it.label.is_not(None), since=since, until=until)
    return InteractionLog.from_events(rows, times, labels, len(news_ids))


def read_click_counts(engine: Engine, news_ids: np.ndarray, *, since: datetime, until: datetime) -> np.ndarray:
    """(n,) float64 clicks of each of ``news_ids`` in labelled impressions of ``[since, until)``.

    Reads the clicks only (about 4% of MIND's shows), not the window's whole popularity log.
    """
    it = s.impression_items.c
    _, rows, _ = _labelled_items(engine, news_ids, it.label, np.int8, it.label == 1, since=since, until=until)
    return np.bincount(rows, minlength=len(news_ids)).astype(np.float64)


def read_click_log(engine: Engine, news_ids: np.ndarray, *, until: datetime | None = None) -> ClickLog:
    """Clicks of labelled impressions before ``until`` as a ``ClickLog`` over ``news_ids``.

    The impression clicks that lead each History column (``interactions.with_logged_clicks``).
    Clicks on articles missing from ``news_ids`` are dropped (they have no embedding).
    """
    users, rows, times = _labelled_items(
        engine, news_ids, s.impressions.c.user_id, object, s.impression_items.c.label == 1, until=until
    )
    return ClickLog.from_events(users, times, rows)


def read_skipped(engine: Engine, user_ids, news_ids: np.ndarray, *, until: datetime | None = None,
                 through_pk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The articles each of ``user_ids`` was shown and did not click (label 0) in labelled
    impressions before ``until``: the skip evidence of the category affinity
    (``recsys.models.affinity.SkipCounts.from_pairs``).

    Streamed into two integer arrays (16 bytes a skip; a MIND-small night's 2,000-user shard
    holds about 200k), counted by the caller: the articles' categories are the catalogue's
    already, and the query needs no join with ``news`` (``benchmarks/bench_skip_counts.py``
    times it against grouping in the database).

    Args:
        user_ids: (u,) unique user ids, read ``_IN_CHUNK`` at a time.
        news_ids: (n,) the item ordering the returned rows index into; skips of articles
            missing from it are dropped.
        until: only impressions strictly before it (None: all).
        through_pk: only impressions stored by then (``impressions.id`` at most this, from
            ``last_impression_pk``): a command that reads chunk by chunk does not see an
            ingest that commits while it runs. None: all.

    Returns:
        ``(user_index, item_rows)``: (q,) int64 indices into ``user_ids`` and into ``news_ids``,
        one per skipped candidate (an article skipped twice is there twice).
    """
    im, it = s.impressions.c, s.impression_items.c
    query = select(im.user_id, it.news_id).join(s.impressions, it.impression_pk == im.id).where(
        it.label == 0, *_window(None, until), *([] if through_pk is None else [im.id <= through_pk]))
    ids = np.asarray([str(u) for u in user_ids], dtype=object)
    users, lookup = pd.Index(ids), pd.Index(news_ids, dtype=object)
    who, rows = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    with engine.connect() as conn:
        for start in range(0, len(ids), _IN_CHUNK):
            for df in _stream(conn, query.where(im.user_id.in_(list(ids[start : start + _IN_CHUNK]))), [USER_ID, NEWS_ID]):
                found = lookup.get_indexer(df[NEWS_ID].to_numpy(dtype=object))
                known = found >= 0
                who.append(users.get_indexer(df[USER_ID].to_numpy(dtype=object))[known].astype(np.int64))
                rows.append(found[known].astype(np.int64))
    return np.concatenate(who), np.concatenate(rows)


def last_impression_pk(engine: Engine) -> int:
    """The largest ``impressions.id`` stored (0 for none): ingest gives new impressions larger ones."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.max(s.impressions.c.id))).scalar() or 0)


def iter_run_recommendations(engine: Engine, run_id: int) -> Iterator[pd.DataFrame]:
    """A run's recommendations (``user_id``, ``rank``, ``news_id``), streamed in DataFrames of
    about ``STREAM_ROWS`` rows that each hold whole lists: every user's rows in one, by rank."""
    r = s.recommendations.c
    query = select(r.user_id, r.rank, r.news_id).where(r.run_id == run_id).order_by(bytewise(engine, r.user_id), r.rank)
    carry = None
    with engine.connect() as conn:
        for df in _stream(conn, query, [USER_ID, RANK, NEWS_ID]):
            if carry is not None:
                df = pd.concat([carry, df], ignore_index=True)
            # Rows come ordered by user, so the last user's rows end the chunk; they may go on in the next.
            last = (df[USER_ID] == df[USER_ID].iat[-1]).to_numpy()
            carry = df[last]
            if not last.all():
                yield df[~last].reset_index(drop=True)
    if carry is not None:
        yield carry.reset_index(drop=True)


def iter_run_rows(engine: Engine, run_id: int, *, rows: int | None = None) -> Iterator[pd.DataFrame]:
    """Every stored column of a run's recommendations (``run_id``, USER_ID, RANK, NEWS_ID,
    SCORE, ``created_at``), by user and rank, streamed in DataFrames of at most ``rows`` rows."""
    r = s.recommendations.c
    query = (select(r.run_id, r.user_id, r.rank, r.news_id, r.score, r.created_at)
             .where(r.run_id == run_id).order_by(bytewise(engine, r.user_id), r.rank))
    with engine.connect() as conn:
        for df in _stream(conn, query, ["run_id", USER_ID, RANK, NEWS_ID, SCORE, "created_at"], rows):
            # The driver's values: ISO text on SQLite, datetime on PostgreSQL.
            df["created_at"] = pd.to_datetime(df["created_at"])
            yield df


def read_news_titles(engine: Engine, news_ids) -> pd.DataFrame:
    """Title and category of the given articles, indexed by news id (for printing lists)."""
    n = s.news.c
    ids = list(map(str, news_ids))
    with engine.connect() as conn:  # in chunks: one IN list of 65,536 ids is past psycopg's parameters
        rows = [row for start in range(0, len(ids), _IN_CHUNK)
                for row in conn.execute(select(n.news_id, n.title, n.category)
                                        .where(n.news_id.in_(ids[start : start + _IN_CHUNK])))]
    return pd.DataFrame(rows, columns=[NEWS_ID, TITLE, CATEGORY]).set_index(NEWS_ID)
