"""Per-shard ranking against a brute-force NumPy reference, cold start, short lists, errors."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from recsys.columns import NEWS_ID, RANK, SCORE, USER_ID
from recsys.errors import ConfigError
from recsys.index.faiss_index import FaissIndex
from recsys.models.bundle import RankingModel
from recsys.data.interactions import InteractionLog
from recsys.ranking.candidates import Catalogue, item_side_features, popular_items, rank_users

AS_OF = datetime(2019, 11, 15, 12, 0, 0)  # the world's latest impression (conftest.World.as_of)


@pytest.fixture(scope="module")
def parts(world):
    assert world.as_of == AS_OF
    model = RankingModel.load(world.model_dir)
    index = FaissIndex.load(world.index_dir, num_threads=1)
    news_ids = np.asarray(index.news_ids, dtype=object)
    first_seen = np.array(
        [np.datetime64(t, "s") if t else np.datetime64("NaT", "s") for t in world.first_seen], dtype="datetime64[s]"
    )
    rng = np.random.default_rng(0)
    events = rng.integers(0, len(news_ids), 400)
    times = np.datetime64(AS_OF, "s") - rng.integers(1, 48 * 3600, 400).astype("timedelta64[s]")
    log = InteractionLog.from_events(events, times, rng.random(400) < 0.3, len(news_ids))
    side = item_side_features(model.config.side_features, np.datetime64(AS_OF, "s"), log, first_seen)
    catalogue = Catalogue(news_ids, index.vectors(news_ids), side)
    return model, index, catalogue, log, first_seen


def _histories(world, users, news_ids):
    row = {n: i for i, n in enumerate(news_ids)}
    lists = [[row[n] for n in world.clicks.get(u, [])] for u in users]
    offsets = np.zeros(len(users) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in lists])
    return offsets, np.array([r for x in lists for r in x], dtype=np.int64)


def _reference(model, catalogue, first_seen, vectors, clicked_rows, cutoff, k):
    """Brute force: score every fresh, unclicked article for the user; the k best."""
    eligible = np.flatnonzero(~np.isnat(first_seen) & (first_seen >= cutoff))
    eligible = np.setdiff1d(eligible, clicked_rows)
    users = np.repeat(vectors[None, :], len(eligible), axis=0)
    scores = model.score(users, catalogue.embeddings[eligible], catalogue.side[eligible])
    order = np.lexsort((eligible, -scores.astype(np.float64)))[:k]
    return list(catalogue.news_ids[eligible[order]]), scores[order]


def test_matches_brute_force_when_every_article_is_a_candidate(world, parts):
    model, index, catalogue, _, first_seen = parts
    users = world.active_users[:20]
    offsets, items = _histories(world, users, catalogue.news_ids)
    cutoff = np.datetime64(AS_OF - timedelta(days=3), "s")
    timings = {}
    got = rank_users(
        np.array(users, dtype=object), offsets, items, model, catalogue, index,
        num_candidates=len(catalogue), k=10, published_after=cutoff, popular=np.arange(5), timings=timings,
    )
    assert list(got.columns) == [USER_ID, RANK, NEWS_ID, SCORE]
    vectors = model.user_vectors(offsets, items, catalogue.embeddings)
    for i, user in enumerate(users):
        mine = got[got[USER_ID] == user]
        clicked = items[offsets[i]:offsets[i + 1]]
        want_ids, want_scores = _reference(model, catalogue, first_seen, vectors[i], clicked, cutoff, 10)
        assert mine[NEWS_ID].tolist() == want_ids
        np.testing.assert_allclose(mine[SCORE].to_numpy(), want_scores, rtol=1e-5)
        assert mine[RANK].tolist() == list(range(1, 11))
    assert {"user_vectors", "search", "score", "top_k"} <= set(timings) and timings["candidates"] > 0


def test_clicks_the_model_does_not_read_are_still_never_recommended(world, parts):
    """``clicked`` (every click) can hold more than the history the model reads: a model trained
    on the History column only does not see impression clicks, but must not recommend them."""
    model, index, catalogue, _, first_seen = parts
    users = world.active_users[:8] + world.cold_users[:2]
    offsets, items = _histories(world, users, catalogue.news_ids)
    cutoff = np.datetime64(AS_OF - timedelta(days=3), "s")
    fresh = np.flatnonzero(~np.isnat(first_seen) & (first_seen >= cutoff))
    # Each user also clicked three fresh articles: the first three of a plain run's list.
    plain = rank_users(np.array(users, dtype=object), offsets, items, model, catalogue, index,
                       num_candidates=len(catalogue), k=3, published_after=cutoff, popular=fresh)
    lookup = {n: i for i, n in enumerate(catalogue.news_ids)}
    extra = [[lookup[n] for n in plain.loc[plain[USER_ID] == u, NEWS_ID]] for u in users]
    assert all(len(e) == 3 for e in extra)
    clicked_items = np.concatenate([np.r_[items[offsets[i]:offsets[i + 1]], extra[i]] for i in range(len(users))]).astype(np.int64)
    clicked_offsets = np.r_[0, np.cumsum([offsets[i + 1] - offsets[i] + 3 for i in range(len(users))])]
    got = rank_users(np.array(users, dtype=object), offsets, items, model, catalogue, index,
                     num_candidates=len(catalogue), k=10, published_after=cutoff, popular=fresh,
                     clicked=(clicked_offsets, clicked_items))
    vectors = model.user_vectors(offsets, items, catalogue.embeddings)  # the model's input is unchanged
    for i, user in enumerate(users):
        mine = got[got[USER_ID] == user]
        assert not set(mine[NEWS_ID]) & set(catalogue.news_ids[extra[i]])
        if i < 8:  # warm users: brute force over every fresh article they did not click
            want_ids, want_scores = _reference(model, catalogue, first_seen, vectors[i],
                                               clicked_items[clicked_offsets[i]:clicked_offsets[i + 1]], cutoff, 10)
            assert mine[NEWS_ID].tolist() == want_ids
            np.testing.assert_allclose(mine[SCORE].to_numpy(), want_scores, rtol=1e-5)
        else:  # cold users: the popular articles less their clicks
            assert len(mine) == 10 and set(mine[NEWS_ID]) <= set(catalogue.news_ids[fresh])


def test_candidates_are_the_nearest_articles(world, parts):
    model, index, catalogue, _, first_seen = parts
    users = world.active_users[:10]
    offsets, items = _histories(world, users, catalogue.news_ids)
    cutoff = np.datetime64(AS_OF - timedelta(days=3), "s")
    got = rank_users(np.array(users, dtype=object), offsets, items, model, catalogue, index,
                     num_candidates=15, k=5, published_after=cutoff)
    vectors = model.user_vectors(offsets, items, catalogue.embeddings)
    # The query is the user vector's first serving_dim columns; the content prior's
    # second-moment columns after them only reach the scorer.
    width = model.config.serving_dim
    assert catalogue.embeddings.shape[1] == width and vectors.shape[1] == model.config.user_dim > width
    fresh = ~np.isnat(first_seen) & (first_seen >= cutoff)
    for i, user in enumerate(users):
        allowed = fresh.copy()
        allowed[items[offsets[i]:offsets[i + 1]]] = False
        sims = np.where(allowed, catalogue.embeddings @ vectors[i, :width], -np.inf)
        nearest = set(catalogue.news_ids[np.argsort(-sims)[:15]])
        picked = got.loc[got[USER_ID] == user, NEWS_ID]
        assert len(picked) == 5 and set(picked) <= nearest


def test_cold_start_users_rank_the_popular_articles(world, parts):
    model, index, catalogue, log, first_seen = parts
    users = np.array(world.cold_users[:3] + world.active_users[:1], dtype=object)
    offsets, items = _histories(world, list(users), catalogue.news_ids)
    assert list(np.diff(offsets)[:3]) == [0, 0, 0]
    cutoff = np.datetime64(AS_OF - timedelta(days=3), "s")
    popular = popular_items(log, first_seen, now=np.datetime64(AS_OF, "s"), window=np.timedelta64(24, "h"),
                            fresh_after=cutoff, limit=30)
    got = rank_users(users, offsets, items, model, catalogue, index, num_candidates=30, k=10,
                     published_after=cutoff, popular=popular)
    cold_lists = [got.loc[got[USER_ID] == u, NEWS_ID].tolist() for u in users[:3]]
    # Same cold-start vector, same candidates: the same list, drawn from the popular articles.
    assert cold_lists[0] == cold_lists[1] == cold_lists[2] and len(cold_lists[0]) == 10
    assert set(cold_lists[0]) <= set(catalogue.news_ids[popular])
    cold_vector = model.user_vectors(np.zeros(2, np.int64), np.zeros(0, np.int64), catalogue.embeddings)
    scores = model.score(np.repeat(cold_vector, len(popular), axis=0), catalogue.embeddings[popular], catalogue.side[popular])
    want = catalogue.news_ids[popular[np.lexsort((popular, -scores.astype(np.float64)))[:10]]]
    assert cold_lists[0] == list(want)
    # Without popular articles a cold-start user gets nothing, and is still not an error.
    none = rank_users(users[:1], offsets[:2], items[:0], model, catalogue, index, k=10, published_after=cutoff)
    assert none.empty


def test_fewer_candidates_than_k(parts):
    model, _, catalogue, _, _ = parts
    small = FaissIndex.build(catalogue.news_ids[:6].astype(str), catalogue.embeddings[:6], kind="flat", num_threads=1)
    tiny = Catalogue(catalogue.news_ids[:6], catalogue.embeddings[:6], catalogue.side[:6])
    users = np.array(["a", "b", "c"], dtype=object)
    # a clicked rows 0 and 1, b clicked everything, c clicked row 5.
    offsets = np.array([0, 2, 8, 9])
    items = np.array([0, 1, 0, 1, 2, 3, 4, 5, 5])
    got = rank_users(users, offsets, items, model, tiny, small, num_candidates=200, k=10)
    by_user = {u: g for u, g in got.groupby(USER_ID)}
    assert sorted(by_user["a"][NEWS_ID]) == sorted(tiny.news_ids[2:6])
    assert "b" not in by_user
    assert sorted(by_user["c"][NEWS_ID]) == sorted(tiny.news_ids[:5])
    assert by_user["c"][RANK].tolist() == [1, 2, 3, 4, 5]
    assert not got.duplicated([USER_ID, NEWS_ID]).any() and not got.duplicated([USER_ID, RANK]).any()
    assert got[NEWS_ID].isin(tiny.news_ids).all()


def test_empty_shard_and_bad_arguments(parts):
    model, index, catalogue, _, _ = parts
    empty = rank_users(np.array([], dtype=object), np.zeros(1, np.int64), np.zeros(0, np.int64), model, catalogue, index)
    assert empty.empty and list(empty.columns) == [USER_ID, RANK, NEWS_ID, SCORE]
    with pytest.raises(ConfigError, match="k is 0 and num_candidates is 200, expected both at least 1"):
        rank_users(np.array(["a"], dtype=object), np.zeros(2, np.int64), np.zeros(0), model, catalogue, index, k=0)
    with pytest.raises(ValueError, match="history offsets have 3 entries for 1 users, expected 2"):
        rank_users(np.array(["a"], dtype=object), np.zeros(3, np.int64), np.zeros(0), model, catalogue, index)


def test_popular_items_by_hand():
    now = np.datetime64("2019-11-15T12:00:00", "s")
    hour = np.timedelta64(1, "h")
    # item 0: 2 clicks; item 1: 1 click, 3 shows; item 2: 1 click, 1 show; item 3: old; item 4: unknown time.
    rows = np.array([0, 0, 1, 1, 1, 2, 3, 3, 3, 0])
    times = np.array([now - hour] * 9 + [now - 30 * hour])  # the last event is outside the 24 h window
    clicks = np.array([1, 1, 1, 0, 0, 1, 1, 1, 1, 1])
    log = InteractionLog.from_events(rows, times, clicks, 5)
    seen = np.array(
        ["2019-11-15T00:00", "2019-11-14T00:00", "2019-11-15T06:00", "2019-11-01T00:00", "NaT"], dtype="datetime64[s]"
    )
    order = popular_items(log, seen, now=now, window=24 * hour, fresh_after=now - 72 * hour, limit=10)
    assert order.tolist() == [0, 1, 2]  # an unknown time is not fresh, as in the index's filter
    seen[4] = now - hour
    assert popular_items(log, seen, now=now, window=24 * hour, fresh_after=now - 72 * hour, limit=10).tolist() == [0, 1, 2, 4]
    assert popular_items(log, seen, now=now, window=24 * hour, fresh_after=None, limit=2).tolist() == [3, 0]


def test_item_side_features_equal_per_pair_features(world, parts):
    model, _, catalogue, log, first_seen = parts
    rows = np.random.default_rng(1).integers(0, len(catalogue), 50)
    direct = model.side_features(rows, np.full(50, np.datetime64(AS_OF, "s")), log, first_seen)
    np.testing.assert_array_equal(catalogue.side[rows], direct)


def test_catalogue_checks():
    with pytest.raises(ValueError, match="Catalogue has 2 news ids, 1 embeddings and 2 side rows"):
        Catalogue(np.array(["a", "b"], dtype=object), np.zeros((1, 4)), np.zeros((2, 3)))
    repeated = Catalogue(np.array(["a", "a"], dtype=object), np.zeros((2, 4)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="Catalogue news ids repeat, e.g. 'a'"):
        _ = repeated.lookup
    assert isinstance(Catalogue(np.array(["a"], dtype=object), np.zeros((1, 4)), np.zeros((1, 3))).lookup, pd.Index)


def test_cold_start_users_who_clicked_popular_articles_still_get_k(world, parts):
    """A reader without a usable history may have clicked (impression clicks a History-only
    model does not read): the articles they clicked are skipped before the popular list is cut
    to num_candidates, as the index over-fetches for users with a history."""
    model, index, catalogue, log, first_seen = parts
    cutoff = np.datetime64(AS_OF - timedelta(days=3), "s")
    popular = popular_items(log, first_seen, now=np.datetime64(AS_OF, "s"), window=np.timedelta64(24, "h"),
                            fresh_after=cutoff, limit=len(catalogue))
    users = np.array(["cold-a", "cold-b", "cold-c"], dtype=object)
    # a clicked the three most popular articles, b the 2nd and the 11th, c nothing.
    clicks = [list(popular[:3]), [popular[1], popular[10]], []]
    clicked = (np.r_[0, np.cumsum([len(c) for c in clicks])], np.array([r for c in clicks for r in c], dtype=np.int64))
    got = rank_users(users, np.zeros(4, np.int64), np.zeros(0, np.int64), model, catalogue, index,
                     num_candidates=10, k=10, published_after=cutoff, popular=popular, clicked=clicked)
    cold_vector = model.user_vectors(np.zeros(2, np.int64), np.zeros(0, np.int64), catalogue.embeddings)
    for user, mine in zip(users, clicks):
        # Reference: the first 10 popular articles the user did not click, ranked by brute force.
        cands = np.array([r for r in popular if r not in mine][:10])
        scores = model.score(np.repeat(cold_vector, len(cands), axis=0), catalogue.embeddings[cands], catalogue.side[cands])
        order = np.lexsort((cands, -scores.astype(np.float64)))
        listed = got[got[USER_ID] == user]
        assert listed[NEWS_ID].tolist() == list(catalogue.news_ids[cands[order]])
        np.testing.assert_allclose(listed[SCORE].to_numpy(), scores[order], rtol=1e-5)


def test_an_empty_index_gives_empty_lists(parts):
    model, _, catalogue, _, _ = parts
    empty = FaissIndex.build(np.array([], dtype=str), np.zeros((0, catalogue.embeddings.shape[1]), np.float32),
                             kind="flat", num_threads=1)
    nothing = Catalogue(catalogue.news_ids[:0], catalogue.embeddings[:0], catalogue.side[:0])
    got = rank_users(np.array(["a", "b"], dtype=object), np.zeros(3, np.int64), np.zeros(0, np.int64), model,
                     nothing, empty, k=10, popular=np.zeros(0, np.int64))
    assert got.empty and list(got.columns) == [USER_ID, RANK, NEWS_ID, SCORE]


def test_popular_items_ties_go_to_the_newer_article_and_the_cutoff_itself_is_fresh():
    now = np.datetime64("2019-11-15T12:00:00", "s")
    hour = np.timedelta64(1, "h")
    cutoff = now - 72 * hour
    # Rows 0 and 1: one click and one show each, row 1 the newer; rows 2-4: nothing in the window.
    rows = np.array([0, 0, 1, 1])
    log = InteractionLog.from_events(rows, np.full(4, now - hour), np.array([1, 0, 1, 0]), 5)
    seen = np.array([now - 10 * hour, now - 5 * hour,  # 0 older than 1
                     cutoff,  # exactly at the cut-off: fresh, as the index's published_after keeps it
                     cutoff - np.timedelta64(1, "s"),  # a second before: stale
                     cutoff + hour], dtype="datetime64[s]")
    order = popular_items(log, seen, now=now, window=24 * hour, fresh_after=cutoff)
    assert order.tolist() == [1, 0, 4, 2]


def test_a_warm_users_clicked_nearest_articles_are_skipped_before_the_cut(world, parts):
    """The index leaves out what the user clicked before it cuts to num_candidates: a reader
    whose clicks are the nearest articles to their vector still gets k of the rest."""
    model, index, catalogue, _, _ = parts
    user, offsets, items, clicked, nearest = _clicked_the_nearest(world, model, catalogue)
    got = rank_users(user, offsets, items, model, catalogue, index, num_candidates=5, k=5, clicked=clicked)
    unclicked = [r for r in nearest if r not in set(clicked[1].tolist())]
    assert len(got) == 5 and set(got[NEWS_ID]) == set(catalogue.news_ids[unclicked[:5]])
    assert not set(got[NEWS_ID]) & set(catalogue.news_ids[clicked[1]])


class _IgnoresExclude:
    """An index that returns the clicked articles anyway."""

    def __init__(self, index):
        self._index = index

    def search(self, queries, k, *, exclude=None, published_after=None):
        return self._index.search(queries, k, published_after=published_after)


def test_clicked_articles_the_index_returns_are_still_dropped(world, parts):
    """rank_users drops the user's clicks itself (``_clean_pairs``), not only through the index."""
    model, index, catalogue, _, _ = parts
    user, offsets, items, clicked, nearest = _clicked_the_nearest(world, model, catalogue)
    got = rank_users(user, offsets, items, model, catalogue, _IgnoresExclude(index), num_candidates=10, k=10,
                     clicked=clicked)
    # The 10 nearest hold the 5 clicked (and maybe some of the history): only the others are left.
    want = [r for r in nearest[:10] if r not in set(clicked[1].tolist())]
    assert 0 < len(want) <= 5 and sorted(got[NEWS_ID]) == sorted(catalogue.news_ids[want])


def _clicked_the_nearest(world, model, catalogue):
    """A warm user who (besides their history) clicked the 5 articles nearest to their vector.

    Returns user ids, history offsets and items, ``clicked`` and every article, nearest first.
    """
    user = np.array(world.active_users[:1], dtype=object)
    offsets, items = _histories(world, list(user), catalogue.news_ids)
    vector = model.user_vectors(offsets, items, catalogue.embeddings)[0, : catalogue.embeddings.shape[1]]
    by_nearness = np.argsort(-(catalogue.embeddings.astype(np.float64) @ vector), kind="stable")
    clicked_items = np.unique(np.r_[items, by_nearness[:5]]).astype(np.int64)
    return user, offsets, items, (np.array([0, len(clicked_items)]), clicked_items), by_nearness


def test_ids_the_index_holds_but_the_catalogue_lacks_are_never_recommended(parts):
    """An id the index returns that the catalogue lacks is dropped; it must not become row -1
    (the catalogue's last article), which both users clicked."""
    model, _, catalogue, _, _ = parts
    wide = FaissIndex.build(catalogue.news_ids[:12].astype(str), catalogue.embeddings[:12], kind="flat", num_threads=1)
    narrow = Catalogue(catalogue.news_ids[:8], catalogue.embeddings[:8], catalogue.side[:8])  # lacks 4 of them
    users = np.array(["a", "b"], dtype=object)
    offsets = np.array([0, 2, 4])
    items = np.array([0, 7, 3, 7])  # a clicked rows 0 and 7, b rows 3 and 7
    got = rank_users(users, offsets, items, model, narrow, wide, num_candidates=12, k=12)
    by_user = {u: g for u, g in got.groupby(USER_ID)}
    assert sorted(by_user["a"][NEWS_ID]) == sorted(narrow.news_ids[[1, 2, 3, 4, 5, 6]])
    assert sorted(by_user["b"][NEWS_ID]) == sorted(narrow.news_ids[[0, 1, 2, 4, 5, 6]])
    assert by_user["a"][RANK].tolist() == by_user["b"][RANK].tolist() == [1, 2, 3, 4, 5, 6]


def test_equal_scores_rank_the_lower_row_first(parts):
    """Two articles with the same embedding and side features score the same: the lower row
    comes first, so that every engine picks the same list."""
    model, _, catalogue, _, _ = parts
    rows = np.array([0, 1, 2, 3, 4, 5])
    embeddings, side = catalogue.embeddings[rows].copy(), catalogue.side[rows].copy()
    embeddings[4], side[4] = embeddings[1], side[1]  # rows 1 and 4: twins
    tiny = Catalogue(catalogue.news_ids[rows], embeddings, side)
    twins = tiny.news_ids[[1, 4]]
    for order in ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]):  # whatever order the index holds them in
        index = FaissIndex.build(tiny.news_ids[order].astype(str), embeddings[order], kind="flat", num_threads=1)
        got = rank_users(np.array(["a"], dtype=object), np.array([0, 1]), np.array([0]), model, tiny, index,
                         num_candidates=10, k=10)
        listed = got[NEWS_ID].tolist()
        assert len(listed) == 5
        first, second = listed.index(twins[0]), listed.index(twins[1])
        assert second == first + 1 and got[SCORE].iloc[first] == got[SCORE].iloc[second]
