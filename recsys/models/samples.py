"""Impressions and item statistics in array form: what the CTR model trains and scores on.

The pipelines build these from the store (or straight from MIND files); the model code never
touches SQL. Ragged lists (histories, candidates) are stored CSR-style: ``offsets`` of length
``m + 1`` into a flat array, so impression ``i`` owns ``flat[offsets[i]:offsets[i+1]]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ItemStats:
    """Per-article statistics aligned with the rows of an ``ItemFeatures``.

    Attributes:
        clicks: (n,) float32 clicks in the popularity window.
        shows: (n,) float32 times shown in the popularity window.
        first_seen: (n,) datetime64[s], first time the article was shown (NaT if never):
            MIND has no publication time, so this stands in for it when computing age.
    """

    clicks: np.ndarray
    shows: np.ndarray
    first_seen: np.ndarray


@dataclass(frozen=True)
class Impressions:
    """``m`` impressions with item references as row indices into an ``ItemFeatures``.

    Attributes:
        impression_ids: (m,) int64 MIND impression ids.
        user_ids: (m,) object array of user ids.
        times: (m,) datetime64[s] impression times.
        history_offsets: (m + 1,) int64 offsets into ``history_items``.
        history_items: (h,) int32 item rows of the user's clicked history, most recent first.
        candidate_offsets: (m + 1,) int64 offsets into ``candidate_items`` / ``labels``.
        candidate_items: (c,) int32 item rows of the candidates, in impression order.
        labels: (c,) int8, 1 clicked, 0 not clicked, -1 unknown (unlabelled test files).
    """

    impression_ids: np.ndarray
    user_ids: np.ndarray
    times: np.ndarray
    history_offsets: np.ndarray
    history_items: np.ndarray
    candidate_offsets: np.ndarray
    candidate_items: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.impression_ids)

    def history(self, i: int) -> np.ndarray:
        return self.history_items[self.history_offsets[i] : self.history_offsets[i + 1]]

    def candidates(self, i: int) -> np.ndarray:
        return self.candidate_items[self.candidate_offsets[i] : self.candidate_offsets[i + 1]]

    def candidate_labels(self, i: int) -> np.ndarray:
        return self.labels[self.candidate_offsets[i] : self.candidate_offsets[i + 1]]
