"""Synthetic item embeddings and a NumPy reference search for the index tests."""

from __future__ import annotations

import numpy as np


def sphere_mixture(num_items: int, dim: int, *, cluster_size: int = 64, spread: float = 1.0, seed: int = 0,
                   num_queries: int = 0):
    """Items and queries from a mixture of Gaussians on the unit sphere, float32.

    Returns:
        items (num_items, dim) and queries (num_queries, dim), L2-normalised.
    """
    rng = np.random.default_rng(seed)
    num_clusters = max(1, num_items // cluster_size)
    centres = rng.standard_normal((num_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(n: int) -> np.ndarray:
        x = centres[rng.integers(num_clusters, size=n)] + spread * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return draw(num_items), draw(num_queries)


def news_ids(n: int, start: int = 0) -> np.ndarray:
    return np.array([f"N{i}" for i in range(start, start + n)])


def brute_force(items: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int, eligible: np.ndarray | None = None):
    """NumPy reference: per query, (ids, scores) of the k largest inner products among eligible rows."""
    scores = queries.astype(np.float64) @ items.astype(np.float64).T
    if eligible is not None:
        scores = np.where(eligible, scores, -np.inf)
    out = []
    for row in scores:
        order = np.argsort(-row, kind="stable")
        order = order[np.isfinite(row[order])][:k]
        out.append((ids[order], row[order]))
    return out
