"""Fixtures for the index tests."""

from __future__ import annotations

import numpy as np
import pytest
from index_data import news_ids, sphere_mixture


@pytest.fixture
def small_world():
    """300 clustered items of dim 16 with publication times over 30 days, and 20 queries."""
    items, queries = sphere_mixture(300, 16, cluster_size=30, seed=1, num_queries=20)
    rng = np.random.default_rng(2)
    published = np.datetime64("2024-01-01T00:00:00") + rng.integers(0, 30 * 86400, len(items)).astype("timedelta64[s]")
    return news_ids(len(items)), items, published, queries
