"""A small world with a known click model (latent topics, visual styles, appeal and ageing),
built in memory for the tests and benchmarks of the CTR model (``make_synthetic_world``).

The MIND-format sample worlds of ``recsys.data.sample`` go through the files and the store;
this one hands ``Impressions`` and ``ItemFeatures`` straight to the model code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recsys.data.interactions import Impressions, gather_csr
from recsys.encoders.item_features import EncoderInfo, ItemFeatures


@dataclass(frozen=True)
class SyntheticWorld:
    """A generated world with a known click model.

    Attributes:
        features: item features of every article (text: topic centroid + noise, L2-normalised;
            image: style centroid + noise, some items without an image).
        train / valid / test: impressions in three consecutive time windows. The test window's
            candidates are half "fresh" articles published after the validation window.
        test_probabilities: (c_test,) true click probability of every test candidate (oracle).
        fresh_items: (f,) item rows published after the validation window (never in train/valid).
        published_at: (n,) datetime64[s] publication times.
        topics / styles: (n,) latent topic and style of each item.
    """

    features: ItemFeatures
    train: Impressions
    valid: Impressions
    test: Impressions
    test_probabilities: np.ndarray
    fresh_items: np.ndarray
    published_at: np.ndarray
    topics: np.ndarray
    styles: np.ndarray


def _distinct_draws(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, k: int) -> np.ndarray:
    """(m, k) integers, row ``r`` distinct draws from ``[lo[r], hi[r])`` in random order."""
    n = hi - lo
    if len(n) and n.min() < k:
        raise ValueError(f"only {n.min()} live articles for {k} candidates; use more items or fewer candidates")
    draws = rng.integers(0, n[:, None], size=(len(n), k))
    for _ in range(1000):
        draws.sort(axis=1)
        dup = np.zeros(draws.shape, dtype=bool)
        dup[:, 1:] = draws[:, 1:] == draws[:, :-1]
        if not dup.any():
            break
        rows = np.nonzero(dup)[0]
        draws[dup] = rng.integers(0, n[rows])
    order = np.argsort(rng.random(draws.shape), axis=1)
    return lo[:, None] + np.take_along_axis(draws, order, axis=1)


def make_synthetic_world(
    *,
    num_items: int = 600,
    num_users: int = 300,
    num_impressions: int = 2000,
    candidates_per_impression: int = 20,
    text_dim: int = 384,
    image_dim: int = 1024,
    num_topics: int = 12,
    num_styles: int = 8,
    missing_image_rate: float = 0.1,
    cold_user_rate: float = 0.05,
    fresh_item_rate: float = 0.15,
    max_history: int = 50,
    window_shares: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> SyntheticWorld:
    """Generate impressions whose clicks depend on topic (text), style (image), appeal and age.

    Timeline: articles are published from day -2 to day 6; users' histories are clicks on
    articles of days -2..0; train impressions cover days 0-5, validation day 5-6; fresh
    articles appear in the first 12 h of day 6 and the test window is day 6.5-7.5, where half
    of every impression's candidates are fresh. Candidates are articles at most 48 h old.
    Categories are coarse topics (two topics per category), so they hint at the topic only.

    Args:
        window_shares: how the impressions split between the train, valid and test windows.

    Returns:
        The world (see ``SyntheticWorld``).
    """
    rng = np.random.default_rng(seed)
    start = np.datetime64("2019-11-09T00:00:00", "s")
    live_hours = 48.0

    num_fresh = max(int(round(num_items * fresh_item_rate)), 1)
    num_old = num_items - num_fresh
    # Item rows sorted by publication time, so the live articles at t form a contiguous range.
    pub_hours = np.sort(np.concatenate([rng.uniform(-48.0, 144.0, num_old), rng.uniform(144.0, 156.0, num_fresh)]))
    topics = rng.integers(0, num_topics, num_items)
    styles = rng.integers(0, num_styles, num_items)
    appeal = rng.standard_normal(num_items)

    text_centroids = rng.standard_normal((num_topics, text_dim)).astype(np.float32)
    text_centroids /= np.linalg.norm(text_centroids, axis=1, keepdims=True)
    # Appeal shows in the content too (a catchy title, an eye-catching picture), weakly, so
    # that fresh articles are predictable from content alone.
    text_appeal = rng.standard_normal(text_dim).astype(np.float32)
    text_appeal /= np.linalg.norm(text_appeal)
    image_appeal = rng.standard_normal(image_dim).astype(np.float32)
    text = text_centroids[topics] + np.float32(0.3) * appeal[:, None].astype(np.float32) * text_appeal + rng.standard_normal((num_items, text_dim), dtype=np.float32) * np.float32(0.8 / np.sqrt(text_dim))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    style_centroids = rng.standard_normal((num_styles, image_dim)).astype(np.float32)
    image = np.empty((num_items, image_dim), dtype=np.float32)
    for lo in range(0, num_items, 8192):  # bounded memory for large worlds
        hi = min(lo + 8192, num_items)
        noise = rng.standard_normal((hi - lo, image_dim), dtype=np.float32)
        signal = style_centroids[styles[lo:hi]] + np.float32(0.5) * appeal[lo:hi, None].astype(np.float32) * image_appeal
        image[lo:hi] = np.maximum(signal + np.float32(1.2) * noise, 0.0)
    has_image = rng.random(num_items) >= missing_image_rate
    image[~has_image] = 0.0
    categories = np.array([f"category{t // 2}" for t in topics], dtype=object)
    features = ItemFeatures(
        news_ids=np.array([f"N{i}" for i in range(num_items)], dtype=object),
        text=text, image=image, has_image=has_image, categories=categories,
        text_encoder=EncoderInfo("synthetic-text", "1", text_dim),
        image_encoder=EncoderInfo("synthetic-image", "1", image_dim),
    )

    liked_topics = np.zeros((num_users, num_topics))
    liked_styles = np.zeros((num_users, num_styles))
    user_rows = np.arange(num_users)[:, None]
    liked_topics[user_rows, np.argsort(rng.random((num_users, num_topics)), axis=1)[:, :2]] = 1.0
    liked_styles[user_rows, np.argsort(rng.random((num_users, num_styles)), axis=1)[:, :2]] = 1.0

    def logits(users: np.ndarray, items: np.ndarray, age_hours: np.ndarray) -> np.ndarray:
        return (
            -3.5 + 2.5 * liked_topics[users, topics[items]] + 2.0 * liked_styles[users, styles[items]]
            + 0.7 * appeal[items] - 0.6 * age_hours / 24.0
        )

    # Histories: clicks on pre-period articles, drawn without replacement by preference
    # (Gumbel top-k at temperature 1/2), most recent first.
    pre_items = np.flatnonzero(pub_hours < 0.0)
    lengths = rng.integers(1, max_history + 1, num_users)
    lengths = np.minimum(lengths, len(pre_items))
    lengths[rng.random(num_users) < cold_user_rate] = 0
    user_offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=user_offsets[1:])
    user_history = np.empty(user_offsets[-1], dtype=np.int32)
    for lo in range(0, num_users if len(pre_items) else 0, 512):
        hi = min(lo + 512, num_users)
        users = np.arange(lo, hi)
        keys = 2.0 * logits(users[:, None], pre_items[None, :], np.zeros(1)) + rng.gumbel(size=(hi - lo, len(pre_items)))
        width = min(max_history, len(pre_items))
        top = np.argpartition(-keys, width - 1, axis=1)[:, :width] if width < len(pre_items) else np.argsort(-keys, axis=1)
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1), axis=1)
        for u in users:  # per-user slices of different lengths; runs once per world, not hot
            chosen = pre_items[top[u - lo, : lengths[u]]]
            user_history[user_offsets[u] : user_offsets[u + 1]] = chosen[np.argsort(-pub_hours[chosen], kind="stable")]

    def window(first_id: int, count: int, t0: float, t1: float, fresh_half: bool) -> tuple[Impressions, np.ndarray]:
        hours = np.sort(rng.uniform(t0, t1, count))
        users = rng.integers(0, num_users, count)
        k_max = candidates_per_impression * 3 // 2
        counts = rng.integers(max(candidates_per_impression // 2, 2), k_max + 1, count)
        old_hi = np.searchsorted(pub_hours, np.minimum(hours, 144.0), side="right")
        old_lo = np.searchsorted(pub_hours, hours - live_hours, side="left")
        if fresh_half:
            width = (k_max + 1) // 2
            num_fresh_cands = counts // 2
            pool = np.concatenate([
                _distinct_draws(rng, old_lo, old_hi, width),
                _distinct_draws(rng, np.full(count, num_old), np.full(count, num_items), width),
            ], axis=1)
            slot = np.arange(width)[None, :]
            keep = np.concatenate([slot < (counts - num_fresh_cands)[:, None], slot < num_fresh_cands[:, None]], axis=1)
        else:
            pool = _distinct_draws(rng, old_lo, old_hi, k_max)
            keep = np.arange(k_max)[None, :] < counts[:, None]
        # kept candidates first, in random order
        order = np.argsort(np.where(keep, rng.random(pool.shape), 2.0), axis=1)
        pool = np.take_along_axis(pool, order, axis=1)
        keep = np.arange(pool.shape[1])[None, :] < counts[:, None]
        cand_offsets = np.zeros(count + 1, dtype=np.int64)
        np.cumsum(counts, out=cand_offsets[1:])
        cand_items = pool[keep].astype(np.int32)
        cand_users = np.repeat(users, counts)
        age = np.maximum(np.repeat(hours, counts) - pub_hours[cand_items], 0.0)
        probs = 1.0 / (1.0 + np.exp(-logits(cand_users, cand_items, age)))
        labels = (rng.random(len(probs)) < probs).astype(np.int8)
        hist_offsets, hist_items = gather_csr(user_offsets, user_history, users)
        times = start + (hours * 3600).astype(np.int64).astype("timedelta64[s]")
        imps = Impressions(
            np.arange(first_id, first_id + count, dtype=np.int64),
            np.array([f"U{u}" for u in users], dtype=object),
            times, hist_offsets, hist_items.astype(np.int32), cand_offsets, cand_items, labels,
        )
        return imps, probs

    if len(window_shares) != 3 or min(window_shares) <= 0:
        raise ValueError(f"window_shares is {window_shares!r}, expected three positive shares (train, valid, test)")
    total = float(sum(window_shares))
    num_train = int(num_impressions * window_shares[0] / total)
    num_valid = int(num_impressions * window_shares[1] / total)
    num_test = num_impressions - num_train - num_valid
    train, _ = window(1, num_train, 0.0, 120.0, False)
    valid, _ = window(1 + num_train, num_valid, 120.0, 144.0, False)
    test, test_probs = window(1 + num_train + num_valid, num_test, 156.0, 180.0, True)
    published = start + (pub_hours * 3600).astype(np.int64).astype("timedelta64[s]")
    return SyntheticWorld(
        features, train, valid, test, test_probs, np.arange(num_old, num_items), published, topics, styles,
    )
