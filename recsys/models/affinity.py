"""The reader's category affinity: how often a user clicked, and skipped, articles of a
candidate's category and subcategory, combined with the served logit.

The networks read a user's clicks only; what a reader was shown and passed over says as much
about their taste, and the publisher's own category labels say it directly. For each
(user, candidate) pair and each key (the candidate's category, and its subcategory within that
category):

    clicks c  = articles of that key in the history the model reads (History column and logged
                clicks, capped as the user encoder reads them)
    skips  s  = distinct articles of that key the user was shown and did not click, in the
                store's labelled impressions before the store's end (``SkipCounts``)
    features  = log1p(c), log1p(s), c / |history|, s / |skips|,
                lift = log((c + 0.5) / (s + 0.5)) - log((|history| + 0.5) / (|skips| + 0.5))

plus log1p(|history|) and log1p(|skips|). A logistic regression on the validation window, read
as a later day is served (clicks and skips before the window), fits one weight each with the
served logit (``fit_affinity_calibration``); ``recsys predict``, ``recsys evaluate`` and the
nightly job apply it (docs/model.md, "The reader's category affinity").

Codes are built from the category strings at scoring time (``KeyVocabulary``): the weights
read counts and shares, never a particular category, so a category the training never saw is
read like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from recsys.data.interactions import Impressions, candidate_impression_rows

KEYS = ("category", "subcategory")
KEY_FEATURES = ("log_clicks", "log_skips", "click_share", "skip_share", "lift")
# The design matrix's columns, in order.
FEATURES = ("logit", *(f"{key}_{kind}" for key in KEYS for kind in KEY_FEATURES), "log_history", "log_skips")
# Rows a fit reads at most (a random sample of impressions beyond): 13 weights need far fewer.
MAX_FIT_ROWS = 2_000_000
# A subcategory is read within its category: MIND reuses none across categories, another feed may.
_SEPARATOR = "\x1f"


def affinity_design(logits: np.ndarray, clicks: np.ndarray, skips: np.ndarray, history: np.ndarray,
                    skipped: np.ndarray) -> np.ndarray:
    """(c, 13) float64 design matrix (``FEATURES``) of c candidates.

    Args:
        logits: (c,) served logits (uncalibrated, the content prior included).
        clicks: (c, 2) articles of the candidate's category / subcategory in its user's history.
        skips: (c, 2) distinct articles of those keys its user skipped.
        history: (c,) length of the user's history.
        skipped: (c,) distinct articles the user skipped.
    """
    c = np.asarray(clicks, dtype=np.float64).reshape(-1, len(KEYS))
    s = np.asarray(skips, dtype=np.float64).reshape(-1, len(KEYS))
    n = np.asarray(history, dtype=np.float64)[:, None]
    m = np.asarray(skipped, dtype=np.float64)[:, None]
    lift = np.log((c + 0.5) / (s + 0.5)) - np.log((n + 0.5) / (m + 0.5))
    per_key = np.stack([np.log1p(c), np.log1p(s), c / np.maximum(n, 1.0), s / np.maximum(m, 1.0), lift], axis=2)
    return np.column_stack([np.asarray(logits, dtype=np.float64), per_key.reshape(len(c), -1), np.log1p(n), np.log1p(m)])


@dataclass(frozen=True)
class AffinityCalibration:
    """``logit' = intercept + weights . affinity_design(...)``, fitted on validation.

    Attributes:
        weights: (13,) one per ``FEATURES`` column.
        intercept: the constant.
    """

    weights: tuple[float, ...]
    intercept: float

    def __post_init__(self) -> None:
        if len(self.weights) != len(FEATURES) or not all(math.isfinite(w) for w in (*self.weights, self.intercept)):
            raise ValueError(f"category affinity: weights {list(self.weights)} and intercept {self.intercept!r}, "
                             f"expected {len(FEATURES)} finite weights ({', '.join(FEATURES)}) and a finite intercept")

    def logits(self, logits: np.ndarray, clicks: np.ndarray, skips: np.ndarray, history: np.ndarray,
               skipped: np.ndarray) -> np.ndarray:
        """(c,) float64 logits with the affinity (arguments as ``affinity_design``)."""
        return affinity_design(logits, clicks, skips, history, skipped) @ np.asarray(self.weights) + self.intercept

    def to_dict(self) -> dict:
        return {"features": list(FEATURES), "weights": list(self.weights), "intercept": self.intercept}

    @classmethod
    def from_dict(cls, d: dict) -> "AffinityCalibration":
        """Raises ValueError for columns other than ``FEATURES`` or weights that are not finite numbers."""
        if list(d.get("features", FEATURES)) != list(FEATURES):
            raise ValueError(f"category affinity over {d['features']}, expected {list(FEATURES)}")
        return cls(tuple(float(w) for w in d["weights"]), float(d["intercept"]))


def fit_affinity_calibration(
    logits: np.ndarray, clicks: np.ndarray, skips: np.ndarray, history: np.ndarray, skipped: np.ndarray,
    labels: np.ndarray, owner: np.ndarray, *, seed: int = 0,
) -> AffinityCalibration:
    """A logistic regression of ``labels`` (c,) 0/1 on ``affinity_design`` (other arguments as
    there). ``owner`` (c,) gives each candidate's impression: beyond ``MAX_FIT_ROWS`` candidates
    a random sample of whole impressions (seeded) is read.

    The columns are standardised for the fit (its L2 penalty then weighs them alike) and the
    weights mapped back, so that the stored weights read the raw design.

    Raises:
        ValueError: the labels are not both 0 and 1.
    """
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels)
    keep = np.ones(len(labels), dtype=bool)
    if len(labels) > MAX_FIT_ROWS:
        impressions = np.unique(owner)
        chosen = np.random.default_rng(seed).random(len(impressions)) < MAX_FIT_ROWS / len(labels)
        keep = np.isin(owner, impressions[chosen])
    if len(np.unique(labels[keep])) != 2:
        raise ValueError("the category affinity needs clicks and non-clicks")
    x = affinity_design(logits[keep], clicks[keep], skips[keep], history[keep], skipped[keep])
    mean, scale = x.mean(0), x.std(0)
    scale[scale < 1e-9] = 1.0  # a constant column (no skips at all): its weight stays 0
    model = LogisticRegression(C=1.0, max_iter=2000).fit((x - mean) / scale, labels[keep])
    weights = model.coef_[0] / scale
    return AffinityCalibration(tuple(float(w) for w in weights), float(model.intercept_[0] - weights @ mean))


@dataclass(frozen=True)
class KeyVocabulary:
    """Integer codes of the keys (category, and subcategory within it) of a set of articles."""

    categories: pd.Index
    subcategories: pd.Index

    @classmethod
    def of(cls, categories, subcategories) -> "KeyVocabulary":
        cats = np.asarray(categories, dtype=object)
        return cls(pd.Index(pd.unique(cats)), pd.Index(pd.unique(_sub_keys(cats, subcategories))))

    def codes(self, categories, subcategories) -> np.ndarray:
        """(n, 2) int64 codes of each article's category and subcategory; -1 where unknown."""
        cats = np.asarray(categories, dtype=object)
        return np.column_stack([self.categories.get_indexer(cats),
                                self.subcategories.get_indexer(_sub_keys(cats, subcategories))]).astype(np.int64)

    @property
    def sizes(self) -> tuple[int, int]:
        return len(self.categories), len(self.subcategories)


def _sub_keys(categories: np.ndarray, subcategories) -> np.ndarray:
    subs = np.asarray(subcategories, dtype=object)
    return np.array([f"{c}{_SEPARATOR}{s}" for c, s in zip(categories, subs)], dtype=object)


@dataclass(frozen=True)
class SkipCounts:
    """Per user, the distinct articles they skipped, per key code, from the store.

    Attributes:
        users: the users with at least one skip, in code order.
        pair_keys: per key, (q,) sorted int64 ``user code * key size + key code``.
        pair_counts: per key, (q,) the skips of each pair.
        totals: (len(users),) the distinct articles each user skipped.
        sizes: the vocabulary's sizes the pair keys were built with.
    """

    users: pd.Index
    pair_keys: tuple[np.ndarray, np.ndarray]
    pair_counts: tuple[np.ndarray, np.ndarray]
    totals: np.ndarray
    sizes: tuple[int, int]

    @classmethod
    def from_rows(cls, rows: pd.DataFrame, vocabulary: KeyVocabulary) -> "SkipCounts":
        """``rows`` (user_id, category, subcategory, skips): distinct skipped articles per user
        and (category, subcategory), as ``repository.read_skip_counts`` returns them. Each article
        has one category and subcategory, so the sums per category and per user are distinct
        counts too. Keys the vocabulary lacks count in the totals only (no candidate has them)."""
        users = pd.Index(pd.unique(rows["user_id"].to_numpy(dtype=object)))
        user_code = users.get_indexer(rows["user_id"].to_numpy(dtype=object)).astype(np.int64)
        counts = rows["skips"].to_numpy(dtype=np.int64)
        codes = vocabulary.codes(rows["category"].to_numpy(dtype=object), rows["subcategory"].to_numpy(dtype=object))
        keys, sums = [], []
        for k, size in enumerate(vocabulary.sizes):
            known = codes[:, k] >= 0
            combined = user_code[known] * size + codes[known, k]
            unique, inverse = np.unique(combined, return_inverse=True)
            keys.append(unique)
            sums.append(np.bincount(inverse, weights=counts[known], minlength=len(unique)).astype(np.int64))
        totals = np.bincount(user_code, weights=counts, minlength=len(users)).astype(np.int64)
        return cls(users, (keys[0], keys[1]), (sums[0], sums[1]), totals, vocabulary.sizes)

    @classmethod
    def empty(cls, vocabulary: KeyVocabulary) -> "SkipCounts":
        return cls.from_rows(pd.DataFrame({"user_id": [], "category": [], "subcategory": [], "skips": []}), vocabulary)

    def lookup(self, user_ids: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Skips of each (user, candidate) pair: ((c, 2) of the candidate's keys, (c,) in all).

        Args:
            user_ids: (c,) the user of each pair.
            codes: (c, 2) the candidate's key codes (``KeyVocabulary.codes``; -1 reads 0).
        """
        user_code = self.users.get_indexer(np.asarray(user_ids, dtype=object)).astype(np.int64)
        known_user = user_code >= 0
        out = np.zeros((len(user_code), len(KEYS)), dtype=np.int64)
        for k, size in enumerate(self.sizes):
            ok = known_user & (codes[:, k] >= 0)
            out[ok, k] = _sorted_lookup(self.pair_keys[k], self.pair_counts[k], user_code[ok] * size + codes[ok, k])
        totals = np.where(known_user, self.totals[np.maximum(user_code, 0)] if len(self.totals) else 0, 0)
        return out, totals.astype(np.int64)


def history_key_counts(owner: np.ndarray, candidate_codes: np.ndarray, history_offsets: np.ndarray,
                       history_items: np.ndarray, item_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clicks of each candidate's keys in its list's history.

    Args:
        owner: (c,) the list (impression or user) of each candidate.
        candidate_codes: (c, 2) the candidate's key codes.
        history_offsets: (m + 1,) CSR offsets of the lists' histories.
        history_items: (h,) item rows of the histories.
        item_codes: (n, 2) key codes of every item row.

    Returns:
        ((c, 2) history articles of the candidate's category / subcategory, (c,) history length).
    """
    owner = np.asarray(owner, dtype=np.int64)
    lengths = np.diff(np.asarray(history_offsets, dtype=np.int64))
    hist_owner = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    out = np.zeros((len(owner), len(KEYS)), dtype=np.int64)
    for k in range(len(KEYS)):
        hist_codes = item_codes[np.asarray(history_items, dtype=np.int64), k]
        size = int(max(item_codes[:, k].max(initial=-1), candidate_codes[:, k].max(initial=-1))) + 1
        known = hist_codes >= 0
        unique, counts = np.unique(hist_owner[known] * size + hist_codes[known], return_counts=True)
        ok = candidate_codes[:, k] >= 0
        out[ok, k] = _sorted_lookup(unique, counts, owner[ok] * size + candidate_codes[ok, k])
    return out, lengths[owner]


def _sorted_lookup(keys: np.ndarray, values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """(w,) int64 ``values`` at ``wanted`` among the sorted unique ``keys``; 0 where absent."""
    at = np.searchsorted(keys, wanted)
    inside = at < len(keys)
    hit = np.zeros(len(wanted), dtype=bool)
    hit[inside] = keys[at[inside]] == wanted[inside]
    out = np.zeros(len(wanted), dtype=np.int64)
    out[hit] = values[at[hit]]
    return out


def affinity_inputs(impressions: Impressions, skips: SkipCounts, item_codes: np.ndarray):
    """``(clicks, skips, history, skipped)`` of every candidate of ``impressions`` (the inputs of
    ``AffinityCalibration.logits`` after the logits): its keys' clicks in the impression's
    history, its user's skips of them in ``skips``, and both totals.

    Args:
        item_codes: (n, 2) key codes of every item row (``KeyVocabulary.codes``; the vocabulary
            ``skips`` was built with).
    """
    owner = candidate_impression_rows(impressions)
    codes = item_codes[impressions.candidate_items]
    clicks, history = history_key_counts(owner, codes, impressions.history_offsets, impressions.history_items, item_codes)
    skipped_keys, skipped = skips.lookup(impressions.user_ids[owner], codes)
    return clicks, skipped_keys, history, skipped
