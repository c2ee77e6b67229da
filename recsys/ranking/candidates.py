"""Per-shard ranking: user vectors -> FAISS candidates -> CTR scores -> top k (pure compute).

Nothing here touches SQL: the engines read a shard's histories, call ``rank_users`` and write
the result. Everything is vectorised over the shard: one ``user_vectors`` call, one batched
FAISS search, and every (user, candidate) pair of the shard scored in a few large batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from recsys.columns import NEWS_ID, RANK, SCORE, USER_ID
from recsys.errors import ConfigError
from recsys.data.interactions import InteractionLog
from recsys.models.affinity import SkipCounts, pair_inputs
from recsys.models.linear_blend import sigmoid
from recsys.models.side_features import SideFeatures

# Pairs scored per ``model.score`` call: big enough to amortise the call, small enough that the
# gathered (pairs, user_dim) and (pairs, serving_dim) matrices stay a few tens of MB (user
# vectors with the content prior's second moment are 672 wide: 16k pairs gather 44 MB).
SCORE_BATCH = 16_384


@dataclass(frozen=True)
class Catalogue:
    """The articles that can be recommended tonight, row-aligned.

    Attributes:
        news_ids: (n,) object array of news ids (the rows of the index).
        embeddings: (n, serving_dim) float32 item embeddings (``RankingModel.item_embeddings``).
        side: (n, S) float32 side features of each article at the run's time: at serving time
            popularity and age depend on the article only, so they are computed once a night
            for every article rather than once per (user, candidate) pair.
        codes: (n, K) int64 key codes (``RankingModel.affinity_item_codes``: category,
            subcategory, then the content clusters) for a model with the category affinity;
            None: none.
    """

    news_ids: np.ndarray
    embeddings: np.ndarray
    side: np.ndarray
    codes: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.news_ids)
        if len(self.embeddings) != n or len(self.side) != n or (self.codes is not None and len(self.codes) != n):
            raise ValueError(
                f"Catalogue has {n} news ids, {len(self.embeddings)} embeddings and {len(self.side)} side rows"
                + ("" if self.codes is None else f" and {len(self.codes)} key codes")
            )

    def __len__(self) -> int:
        return len(self.news_ids)

    @cached_property
    def lookup(self) -> pd.Index:
        """news id -> row (a hash index, built once per catalogue)."""
        lookup = pd.Index(self.news_ids)
        if not lookup.is_unique:
            raise ValueError(f"Catalogue news ids repeat, e.g. {lookup[lookup.duplicated()][0]!r}")
        return lookup


def item_side_features(
    side_features: SideFeatures, now: np.datetime64, log: InteractionLog, first_seen: np.ndarray,
    *, popularity_at: np.datetime64 | None = None,
) -> np.ndarray:
    """Side features of every article at time ``now``.

    Args:
        side_features: the model's side-feature definition (``model.config.side_features``).
        now: the run's time (the store's latest impression time); ages are read at it.
        log: labelled shows and clicks, item rows as in ``first_seen``.
        first_seen: (n,) datetime64 first appearance of each article (NaT: brand new).
        popularity_at: read popularity here instead of at ``now`` (the store's last labelled
            show, when later impressions carry no labels).

    Returns:
        (n, S) float32, equal to ``model.side_features`` of each (article, now) pair.
    """
    n = len(first_seen)
    rows = np.arange(n, dtype=np.int64)
    ages = np.full(n, np.datetime64(now, "s"))
    times = ages if popularity_at is None else np.full(n, np.datetime64(popularity_at, "s"))
    return np.asarray(side_features.compute(rows, times, log, first_seen, age_times=ages), dtype=np.float32)


def popular_items(
    log: InteractionLog,
    published: np.ndarray,
    *,
    now: np.datetime64,
    window: np.timedelta64,
    fresh_after: np.datetime64 | None,
    limit: int | None = None,
) -> np.ndarray:
    """Fresh articles ordered by recent popularity: the cold-start candidates.

    Popularity is clicks, then shows, in ``[now - window, now)``; ties go to the newer
    article, then the lower row. Freshness follows the rule of the index's
    ``published_after`` filter, which the users with a history get: articles published
    before ``fresh_after``, or at an unknown time (NaT), are left out.

    Args:
        log: labelled shows and clicks.
        published: (n,) datetime64 publication time of each article: the index's
            (``FaissIndex.published``), so that cold and warm users share one freshness.
        now: the run's time.
        window: popularity look-back.
        fresh_after: freshness cut-off, or None for no cut-off.
        limit: at most this many rows; None for every fresh article.

    Returns:
        (<= limit,) int64 item rows, most popular first.
    """
    n = len(published)
    rows = np.arange(n, dtype=np.int64)
    clicks, shows = log.window_counts(rows, np.full(n, np.datetime64(now, "s")), window=window)
    published = np.asarray(published).astype("datetime64[s]")
    if fresh_after is None:
        fresh = np.ones(n, dtype=bool)
    else:
        fresh = published >= np.datetime64(fresh_after, "s")  # NaT compares False
    recency = np.where(np.isnat(published), np.iinfo(np.int64).min, published.astype(np.int64))
    order = np.lexsort((rows, -recency, -np.asarray(shows, np.float64), -np.asarray(clicks, np.float64)))
    return order[fresh[order]][:limit].astype(np.int64)


def rank_users(
    user_ids: np.ndarray,
    history_offsets: np.ndarray,
    history_items: np.ndarray,
    model,
    catalogue: Catalogue,
    index,
    *,
    num_candidates: int = 200,
    k: int = 10,
    published_after: np.datetime64 | None = None,
    popular: np.ndarray | None = None,
    timings: dict | None = None,
    clicked: tuple[np.ndarray, np.ndarray] | None = None,
    skips: SkipCounts | None = None,
) -> pd.DataFrame:
    """Top-k recommendations for a shard of users.

    Users with a history get their user vector's nearest articles from the index (already
    clicked and stale articles filtered out by the index); users without one (cold start) get
    the first ``num_candidates`` ``popular`` articles they did not click as candidates, ranked
    for the model's cold-start user vector.
    Every candidate is scored by the CTR model; the k best are kept. Users with fewer than k
    candidates get fewer rows: never duplicates, never padding.

    Args:
        user_ids: (m,) user ids of the shard.
        history_offsets: (m + 1,) int64 CSR offsets into ``history_items``.
        history_items: (h,) int rows into ``catalogue`` of each user's clicks, most recent first.
        model: a ``RankingModel``.
        catalogue: the articles, embeddings and side features, rows as in the index.
        index: a ``FaissIndex`` holding the catalogue's articles.
        num_candidates: articles retrieved per user before scoring (N).
        k: recommendations kept per user.
        published_after: freshness cut-off handed to the index.
        popular: (c,) item rows of cold-start candidates, most popular first; it should reach
            past ``num_candidates`` (every fresh article) so that a reader's clicks can be skipped.
        timings: if given, seconds per stage are added to it.
        clicked: (offsets (m + 1,), items) of every article each user clicked, which are never
            recommended; default: the history. A model that reads the History column only
            (``logged_clicks = false``) does not see the clicks of impressions, but they count here.
        skips: the users' skip counts, built from ``catalogue.codes``; required (with the codes)
            by a model with the category affinity, which the scores then read.

    Returns:
        DataFrame with USER_ID, RANK (1-based), NEWS_ID, SCORE; users in input order, best
        first.

    Raises:
        ConfigError: k or num_candidates below 1.
        ValueError: history offsets that do not match the users; a model with the category
            affinity without ``skips`` or ``catalogue.codes``.
    """
    if k < 1 or num_candidates < 1:
        raise ConfigError(f"k is {k} and num_candidates is {num_candidates}, expected both at least 1")
    user_ids = np.asarray(user_ids, dtype=object)
    history_offsets = np.asarray(history_offsets, dtype=np.int64)
    history_items = np.asarray(history_items, dtype=np.int64)
    m = len(user_ids)
    if len(history_offsets) != m + 1:
        raise ValueError(f"history offsets have {len(history_offsets)} entries for {m} users, expected {m + 1}")
    affinity = model.config.category_affinity
    if affinity is not None and (skips is None or catalogue.codes is None):
        raise ValueError("the model reads the category affinity: rank_users needs skips and catalogue.codes")
    timings = {} if timings is None else timings
    if m == 0 or len(catalogue) == 0:  # an empty index: nothing to recommend, no user vector to read
        return _empty_result()
    clicked_offsets, clicked_items = (history_offsets, history_items) if clicked is None else (
        np.asarray(clicked[0], dtype=np.int64), np.asarray(clicked[1], dtype=np.int64))
    if len(clicked_offsets) != m + 1:
        raise ValueError(f"clicked offsets have {len(clicked_offsets)} entries for {m} users, expected {m + 1}")

    clock = time.perf_counter()
    vectors = np.asarray(model.user_vectors(history_offsets, history_items, catalogue.embeddings), dtype=np.float32)
    clock = _tick(timings, "user_vectors", clock)

    lengths = np.diff(history_offsets)
    warm = np.flatnonzero(lengths > 0)
    cold = np.flatnonzero(lengths == 0)
    pair_users, pair_items = [], []
    if len(warm):
        exclude = [set(catalogue.news_ids[clicked_items[clicked_offsets[u]:clicked_offsets[u + 1]]]) for u in warm]
        # The index holds serving_dim columns; the user vector's first serving_dim are the query
        # (any content-prior second-moment columns after them are for the scorer only).
        query = vectors[warm, : catalogue.embeddings.shape[1]]
        found = index.search(query, num_candidates, exclude=exclude, published_after=published_after)
        counts, found_ids = _flatten_search(found)
        rows = _rows_of(catalogue, found_ids)
        pair_users.append(np.repeat(warm, counts))
        pair_items.append(rows)
    clock = _tick(timings, "search", clock)
    clicked_keys = _clicked_keys(clicked_offsets, clicked_items, len(catalogue))
    if len(cold) and popular is not None and len(popular):
        cold_users, cold_items = _popular_pairs(
            cold, np.asarray(popular, dtype=np.int64), np.diff(clicked_offsets)[cold], clicked_keys, num_candidates,
            len(catalogue),
        )
        pair_users.append(cold_users)
        pair_items.append(cold_items)
    users = np.concatenate(pair_users) if pair_users else np.zeros(0, np.int64)
    items = np.concatenate(pair_items) if pair_items else np.zeros(0, np.int64)
    users, items = _clean_pairs(users, items, clicked_keys, len(catalogue))
    timings["candidates"] = timings.get("candidates", 0) + len(items)

    scores = np.empty(len(items), dtype=np.float64)
    score = model.score if affinity is None else model.logits
    for start in range(0, len(items), SCORE_BATCH):
        stop = start + SCORE_BATCH
        u, i = users[start:stop], items[start:stop]
        scores[start:stop] = np.asarray(
            score(vectors[u], catalogue.embeddings[i], catalogue.side[i]), dtype=np.float64
        ).reshape(-1)
    if affinity is not None:
        # As the fit read them: the history the user encoder reads (its first history_len), the store's skips.
        inputs = pair_inputs(users, user_ids, items, history_offsets, history_items, skips, catalogue.codes,
                             model.config.history_len)
        scores = sigmoid(affinity.logits(scores, *inputs))
    clock = _tick(timings, "score", clock)

    keep_users, keep_ranks, keep_items, keep_scores = _top_k(users, items, scores, k)
    frame = pd.DataFrame({
        USER_ID: user_ids[keep_users],
        RANK: keep_ranks,
        NEWS_ID: catalogue.news_ids[keep_items],
        SCORE: keep_scores,
    })
    _tick(timings, "top_k", clock)
    return frame


def _empty_result() -> pd.DataFrame:
    return pd.DataFrame({
        USER_ID: np.zeros(0, dtype=object), RANK: np.zeros(0, dtype=np.int64),
        NEWS_ID: np.zeros(0, dtype=object), SCORE: np.zeros(0, dtype=np.float64),
    })


def _tick(timings: dict, stage: str, since: float) -> float:
    now = time.perf_counter()
    timings[stage] = timings.get(stage, 0.0) + (now - since)
    return now


def _flatten_search(found) -> tuple[np.ndarray, np.ndarray]:
    """Per-query result counts and the flat news ids of ``FaissIndex.search``'s ``Hits`` list."""
    counts = np.fromiter((len(hits) for hits in found), dtype=np.int64, count=len(found))
    if counts.sum() == 0:
        return counts, np.zeros(0, dtype=object)
    return counts, np.concatenate([hits.news_ids for hits in found]).astype(object)


def _rows_of(catalogue: Catalogue, news_ids: np.ndarray) -> np.ndarray:
    """Catalogue rows of news ids; -1 for an id the catalogue lacks (dropped later)."""
    if len(news_ids) == 0:
        return np.zeros(0, np.int64)
    return catalogue.lookup.get_indexer(news_ids).astype(np.int64)


def _clicked_keys(clicked_offsets: np.ndarray, clicked_items: np.ndarray, num_items: int) -> np.ndarray:
    """(c,) int64 ``user * num_items + item`` of every (user position, clicked row) pair."""
    clicked_users = np.repeat(np.arange(len(clicked_offsets) - 1, dtype=np.int64), np.diff(clicked_offsets))
    return clicked_users * np.int64(num_items) + clicked_items


def _popular_pairs(
    cold: np.ndarray, popular: np.ndarray, cold_clicks: np.ndarray, clicked_keys: np.ndarray,
    num_candidates: int, num_items: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Each cold-start user's first ``num_candidates`` popular articles that they did not click.

    A reader without a usable history may still have clicked (impression clicks that a model
    trained on the History column does not read), and what they clicked is popular by
    construction: cutting the list before dropping their clicks would leave them short of k
    while more fresh articles wait. The index skips the clicks of users with a history the
    same way, before its cut.

    Args:
        cold: (c,) int64 positions of the cold-start users in the shard.
        popular: (p,) int64 item rows, most popular first.
        cold_clicks: (c,) number of articles each cold-start user clicked.
        clicked_keys: ``_clicked_keys`` of every user of the shard.

    Returns:
        (users, items): int64 pairs of user positions and item rows, users in ``cold`` order.
    """
    cands = popular[: num_candidates + int(cold_clicks.max())]
    keys = cold[:, None] * np.int64(num_items) + cands[None, :]  # (c, len(cands))
    unclicked = ~np.isin(keys, clicked_keys)
    keep = unclicked & (np.cumsum(unclicked, axis=1) <= num_candidates)
    return np.broadcast_to(cold[:, None], keep.shape)[keep], np.broadcast_to(cands, keep.shape)[keep]


def _clean_pairs(users, items, clicked_keys, num_items):
    """Drop unknown articles, articles the user clicked (``_clicked_keys``), and repeated
    (user, article) pairs."""
    valid = (items >= 0) & (items < num_items)
    users, items = users[valid], items[valid]
    keys = users * np.int64(num_items) + items
    keep = ~np.isin(keys, clicked_keys)
    _, first = np.unique(keys[keep], return_index=True)
    chosen = np.flatnonzero(keep)[np.sort(first)]
    return users[chosen], items[chosen]


def _top_k(users, items, scores, k):
    """The k best pairs of each user: (users, 1-based ranks, items, scores), users ascending."""
    if len(users) == 0:
        return users, np.zeros(0, np.int64), items, scores
    # Best score first; ties broken by item row so that every engine picks the same list.
    order = np.lexsort((items, -scores, users))
    users, items, scores = users[order], items[order], scores[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(users)]))
    ranks = np.arange(len(users)) - group_start + 1
    keep = ranks <= k
    return users[keep], ranks[keep], items[keep], scores[keep]
