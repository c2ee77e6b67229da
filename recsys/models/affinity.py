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

Where a publisher's categories are coarse (one category holding several themes), the same
counts are read per *content cluster* as well (``ContentClusters``, ``model.affinity_clusters``):
each modality's content anchors (the fixed reduced encoder features the served vectors carry)
clustered by spherical k-means at training time, one more key per modality. A fresh article's
cluster is that of its nearest centre, so the key is carried by content, not ids.

Codes are built from the category strings at scoring time (``KeyVocabulary``): the weights
read counts and shares, never a particular category, so a category the training never saw is
read like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd

from recsys.data.interactions import Impressions, candidate_impression_rows
from recsys.models.linear_blend import LinearBlend

# The publisher's keys: the codes of ``KeyVocabulary``, the first columns of every item-code table.
KEYS = ("category", "subcategory")
KEY_FEATURES = ("log_clicks", "log_skips", "click_share", "skip_share", "lift")


def design_features(keys: tuple[str, ...]) -> tuple[str, ...]:
    """The design matrix's columns, in order, for the given keys."""
    return ("logit", *(f"{key}_{kind}" for key in keys for kind in KEY_FEATURES), "log_history", "log_skips")


# The design of the publisher's keys alone.
FEATURES = design_features(KEYS)
# Rows a fit reads at most (a random sample of impressions beyond): 23 weights need far fewer.
MAX_FIT_ROWS = 2_000_000
# Spherical k-means of the content clusters: iterations, restarts (the best objective is kept:
# one start can split a theme and merge two others), and points per centre read at most.
KMEANS_ITERATIONS = 25
KMEANS_RESTARTS = 3
KMEANS_POINTS_PER_CENTRE = 256


def affinity_design(logits: np.ndarray, clicks: np.ndarray, skips: np.ndarray, history: np.ndarray,
                    skipped: np.ndarray) -> np.ndarray:
    """(c, 3 + 5 K) float64 design matrix (``design_features`` of the K keys) of c candidates.

    Args:
        logits: (c,) served logits (uncalibrated, the content prior included).
        clicks: (c, K) articles of each of the candidate's keys in its user's history.
        skips: (c, K) distinct articles of those keys its user skipped.
        history: (c,) length of the user's history.
        skipped: (c,) distinct articles the user skipped.
    """
    c = np.asarray(clicks, dtype=np.float64)
    s = np.asarray(skips, dtype=np.float64)
    c, s = c.reshape(len(c), -1), s.reshape(len(s), -1)
    n = np.asarray(history, dtype=np.float64)[:, None]
    m = np.asarray(skipped, dtype=np.float64)[:, None]
    lift = np.log((c + 0.5) / (s + 0.5)) - np.log((n + 0.5) / (m + 0.5))
    per_key = np.stack([np.log1p(c), np.log1p(s), c / np.maximum(n, 1.0), s / np.maximum(m, 1.0), lift], axis=2)
    return np.column_stack([np.asarray(logits, dtype=np.float64), per_key.reshape(len(c), -1), np.log1p(n), np.log1p(m)])


@dataclass(frozen=True)
class ContentClusters:
    """Spherical k-means centres of each content-anchor block of the served item vectors.

    Attributes:
        blocks: the modality of each clustered anchor block (``RankingModel.anchor_blocks``
            order, text first); a modality with no usable rows at training (no covers) is absent.
        offsets: the first anchor column of each block, counted from the first anchor column.
        centres: per block, (k, anchor_dim) unit centres as nested tuples (comparable, JSON).
    """

    blocks: tuple[str, ...]
    offsets: tuple[int, ...]
    centres: tuple[tuple[tuple[float, ...], ...], ...]

    def __post_init__(self) -> None:
        if not (len(self.blocks) == len(self.offsets) == len(self.centres)) or not self.blocks:
            raise ValueError(f"content clusters: {len(self.blocks)} blocks, {len(self.offsets)} offsets and "
                             f"{len(self.centres)} centre tables, expected one of each per block (at least one)")
        for name, offset, table in zip(self.blocks, self.offsets, self.centres):
            widths = {len(row) for row in table}
            if offset < 0 or len(table) < 1 or len(widths) != 1 or widths == {0} or not np.isfinite(table).all():
                raise ValueError(f"content clusters of block {name!r}: offset {offset} and {len(table)} centres of "
                                 f"widths {sorted(widths)}, expected an offset >= 0 and at least one finite centre")

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(f"{name}_cluster" for name in self.blocks)

    @classmethod
    def fit(cls, anchors: np.ndarray, blocks: tuple[str, ...], rows: np.ndarray, k: int,
            seed: int) -> "ContentClusters | None":
        """Fit ``k`` centres per anchor block on ``anchors[rows]``.

        Args:
            anchors: (n, len(blocks) * a) content anchors (``RankingModel.content_anchors``):
                per block unit rows, zero where the modality is missing (no cover).
            blocks: the modality of each block.
            rows: the item rows to fit on (the training window's articles).
            k: centres per block; fewer where a block has fewer usable rows.
            seed: seeds the k-means.

        Returns:
            The clusters of the blocks with at least 2 usable rows; None when no block has.
        """
        import faiss

        width = anchors.shape[1] // max(len(blocks), 1)
        kept, offsets, centres = [], [], []
        for b, name in enumerate(blocks):
            x = np.ascontiguousarray(anchors[np.asarray(rows, dtype=np.int64), b * width : (b + 1) * width], dtype=np.float32)
            x = x[np.square(x).sum(axis=1) > 0.5]  # unit rows; a missing modality's are zero
            size = min(k, len(x))
            if size < 2:
                continue
            # FAISS keeps the seed in a C int; model seeds go to 2**32 - 1.
            km = faiss.Kmeans(width, size, niter=KMEANS_ITERATIONS, nredo=KMEANS_RESTARTS, seed=int(seed) % 2**31,
                              spherical=True, verbose=False,
                              min_points_per_centroid=1, max_points_per_centroid=KMEANS_POINTS_PER_CENTRE)
            km.train(x)
            kept.append(name)
            offsets.append(b * width)
            centres.append(tuple(tuple(float(v) for v in row) for row in km.centroids))
        return cls(tuple(kept), tuple(offsets), tuple(centres)) if kept else None

    def codes(self, anchors: np.ndarray) -> np.ndarray:
        """(n, len(blocks)) int64 nearest centre of each row's anchor block; -1 where the block
        is zero (the modality is missing).

        Args:
            anchors: (n, A) the content-anchor columns of served item vectors.
        """
        out = np.empty((len(anchors), len(self.blocks)), dtype=np.int64)
        for b, (offset, table) in enumerate(zip(self.offsets, self.centres)):
            centres = np.asarray(table, dtype=np.float32)
            x = np.asarray(anchors[:, offset : offset + centres.shape[1]], dtype=np.float32)
            if x.shape[1] != centres.shape[1]:
                raise ValueError(f"content clusters of block {self.blocks[b]!r} read anchor columns {offset} .. "
                                 f"{offset + centres.shape[1] - 1}; the vectors have {anchors.shape[1]} anchor columns")
            scores = x @ centres.T
            scores[:, np.square(centres).sum(axis=1) < 0.5] = -np.inf  # an empty centre (``expressed_in``) is no one's
            out[:, b] = np.where(np.square(x).sum(axis=1) > 0.5, np.argmax(scores, axis=1), -1)
        return out

    def expressed_in(self, anchors: np.ndarray, codes: np.ndarray, rows: np.ndarray) -> "ContentClusters":
        """The same clusters with centres in another anchor space (networks trained again on a
        basis fitted on more articles): each centre the normalised mean of ``anchors`` (n, A)
        of the articles of ``rows`` that ``codes`` (n, len(blocks)) put in it. A centre with
        none of them is zero, and ``codes`` never gives it."""
        rows = np.asarray(rows, dtype=np.int64)
        tables = []
        for b, (offset, table) in enumerate(zip(self.offsets, self.centres)):
            width = len(table[0])
            x = np.asarray(anchors[rows, offset : offset + width], dtype=np.float64)
            member = codes[rows, b]
            sums = np.zeros((len(table), width))
            np.add.at(sums, member[member >= 0], x[member >= 0])
            sums /= np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
            tables.append(tuple(tuple(float(v) for v in row) for row in sums.astype(np.float32)))
        return ContentClusters(self.blocks, self.offsets, tuple(tables))

    def to_dict(self) -> dict:
        return {"blocks": list(self.blocks), "offsets": list(self.offsets),
                "centres": [[list(row) for row in table] for table in self.centres]}

    @classmethod
    def from_dict(cls, d: dict) -> "ContentClusters":
        return cls(tuple(str(b) for b in d["blocks"]), tuple(int(o) for o in d["offsets"]),
                   tuple(tuple(tuple(float(v) for v in row) for row in table) for table in d["centres"]))


def _affinity_keys(clusters: ContentClusters | None) -> tuple[str, ...]:
    """The affinity's keys: the publisher's, then those of ``clusters``."""
    return KEYS + (clusters.keys if clusters is not None else ())


def keyed_codes(publisher_codes: np.ndarray, clusters: ContentClusters | None, anchors: np.ndarray | None) -> np.ndarray:
    """(n, K) int64 key codes of n articles: the publisher's (n, 2) (``KeyVocabulary.codes``),
    then each of ``clusters``' codes of their anchors (n, A) (read only with clusters)."""
    codes = np.asarray(publisher_codes, dtype=np.int64).reshape(-1, len(KEYS))
    if clusters is None:
        return codes
    if anchors is None or len(anchors) != len(codes):
        raise ValueError(f"the category affinity's content clusters need the anchors of the {len(codes)} articles")
    return np.column_stack([codes, clusters.codes(anchors)])


@dataclass(frozen=True)
class AffinityCalibration(LinearBlend):
    """``logit' = intercept + weights . affinity_design(...)``, fitted on validation; ``weights``
    one per ``features`` column: 13 for the publisher's keys, 5 more per content-cluster key.

    Attributes:
        clusters: the content clusters whose codes follow the publisher's keys (None: none).
    """

    clusters: ContentClusters | None = None

    FEATURES: ClassVar[tuple[str, ...]] = FEATURES
    LABEL: ClassVar[str] = "category affinity"

    @property
    def keys(self) -> tuple[str, ...]:
        return _affinity_keys(self.clusters)

    @property
    def features(self) -> tuple[str, ...]:
        return design_features(self.keys)

    def item_codes(self, publisher_codes: np.ndarray, anchors: np.ndarray | None) -> np.ndarray:
        """(n, len(keys)) int64 key codes of n articles: the publisher's (n, 2)
        (``KeyVocabulary.codes``), then each content cluster's of their anchors (n, A) (the
        served vectors' anchor columns; read only with clusters)."""
        return keyed_codes(publisher_codes, self.clusters, anchors)

    def logits(self, logits: np.ndarray, clicks: np.ndarray, skips: np.ndarray, history: np.ndarray,
               skipped: np.ndarray) -> np.ndarray:
        """(c,) float64 logits with the affinity (arguments as ``affinity_design``)."""
        return self.apply(affinity_design(logits, clicks, skips, history, skipped))

    def to_dict(self) -> dict:
        out = super().to_dict()
        if self.clusters is not None:
            out["clusters"] = self.clusters.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "AffinityCalibration":
        """Raises ValueError for columns other than those of its keys, bad clusters or weights
        that are not finite numbers. A bundle of before the content clusters reads as without."""
        try:
            clusters = None if d.get("clusters") is None else ContentClusters.from_dict(d["clusters"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"{cls.LABEL}: unreadable content clusters ({type(e).__name__}: {e})") from e
        expected = design_features(_affinity_keys(clusters))
        if list(d.get("features", expected)) != list(expected):
            raise ValueError(f"{cls.LABEL} over {d['features']}, expected {list(expected)}")
        return cls(tuple(float(w) for w in d["weights"]), float(d["intercept"]), clusters)


def fit_affinity_calibration(
    logits: np.ndarray, clicks: np.ndarray, skips: np.ndarray, history: np.ndarray, skipped: np.ndarray,
    labels: np.ndarray, owner: np.ndarray, *, seed: int = 0, clusters: ContentClusters | None = None,
) -> AffinityCalibration:
    """A logistic regression of ``labels`` (c,) 0/1 on ``affinity_design`` (other arguments as
    there; ``clusters``: those whose codes follow the publisher's in ``clicks`` and ``skips``).
    ``owner`` (c,) gives each candidate's impression: beyond ``MAX_FIT_ROWS`` candidates a
    random sample of whole impressions (seeded) is read.

    The columns are standardised for the fit (its L2 penalty then weighs them alike) and the
    weights mapped back, so that the stored weights read the raw design.

    Raises:
        ValueError: the labels are not both 0 and 1.
    """
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels)
    keep = AffinityCalibration.fit_rows(labels, owner, MAX_FIT_ROWS, seed)
    x = affinity_design(logits[keep], clicks[keep], skips[keep], history[keep], skipped[keep])
    mean, scale = x.mean(0), x.std(0)
    scale[scale < 1e-9] = 1.0  # a constant column (no skips at all): its weight stays 0
    model = LogisticRegression(C=1.0, max_iter=2000).fit((x - mean) / scale, labels[keep])
    weights = model.coef_[0] / scale
    return AffinityCalibration(tuple(float(w) for w in weights), float(model.intercept_[0] - weights @ mean), clusters)


@dataclass(frozen=True)
class KeyVocabulary:
    """Integer codes of the keys (category, and subcategory within it) of a set of articles."""

    categories: pd.Index
    subcategories: pd.Index

    @classmethod
    def of(cls, categories, subcategories) -> "KeyVocabulary":
        return cls(pd.Index(pd.unique(np.asarray(categories, dtype=object))), _sub_keys(categories, subcategories).unique())

    def codes(self, categories, subcategories) -> np.ndarray:
        """(n, 2) int64 codes of each article's category and subcategory; -1 where unknown."""
        return np.column_stack([self.categories.get_indexer(np.asarray(categories, dtype=object)),
                                self.subcategories.get_indexer(_sub_keys(categories, subcategories))]).astype(np.int64)

    @property
    def sizes(self) -> tuple[int, int]:
        return len(self.categories), len(self.subcategories)


def key_codes(categories, subcategories) -> np.ndarray:
    """(n, 2) int64 codes of n articles' categories and subcategories, numbered among themselves."""
    return KeyVocabulary.of(categories, subcategories).codes(categories, subcategories)


def _sub_keys(categories, subcategories) -> pd.MultiIndex:
    """(category, subcategory) pairs: a subcategory is read within its category (MIND reuses
    no subcategory name across categories; another feed may)."""
    return pd.MultiIndex.from_arrays([np.asarray(categories, dtype=object), np.asarray(subcategories, dtype=object)])


@dataclass(frozen=True)
class SkippedArticles:
    """The distinct articles each of a set of users was shown and did not click, from the
    (user, article) pairs ``repository.read_skipped`` returns, before they are counted per key.
    The pairs are de-duplicated once here (an article skipped in two impressions counts once):
    a chunk scored by several versions counts them per key of each version's codes.

    Attributes:
        user_ids: (u,) unique user ids.
        user_index: (q,) the user of each skip, an index into ``user_ids``; sorted, with
            ``item_rows``, and each pair once.
        item_rows: (q,) the article of each skip, an item row.
    """

    user_ids: np.ndarray
    user_index: np.ndarray
    item_rows: np.ndarray

    def __post_init__(self) -> None:
        who, rows = np.asarray(self.user_index, dtype=np.int64), np.asarray(self.item_rows, dtype=np.int64)
        width = int(rows.max(initial=-1)) + 1
        pairs = np.unique(who * max(width, 1) + rows)
        object.__setattr__(self, "user_index", pairs // max(width, 1))
        object.__setattr__(self, "item_rows", pairs % max(width, 1))

    def counts(self, item_codes: np.ndarray) -> "SkipCounts":
        """``SkipCounts`` per key of ``item_codes`` (n, K) (``AffinityCalibration.item_codes``)."""
        users = pd.Index(np.asarray(self.user_ids, dtype=object))
        user_code, rows = self.user_index, self.item_rows
        sizes = tuple(int(item_codes[:, k].max(initial=-1)) + 1 for k in range(item_codes.shape[1]))
        keys, sums = [], []
        for k, size in enumerate(sizes):
            codes = item_codes[rows, k]
            known = codes >= 0
            unique, counts = np.unique(user_code[known] * size + codes[known], return_counts=True)
            keys.append(unique)
            sums.append(counts.astype(np.int64))
        totals = np.bincount(user_code, minlength=len(users)).astype(np.int64)
        return SkipCounts(users, tuple(keys), tuple(sums), totals, sizes)


@dataclass(frozen=True)
class SkipCounts:
    """Per user, the distinct articles they skipped, per key code, from the store.

    Attributes:
        users: the users read (``users[i]`` is user code i), with or without skips.
        pair_keys: per key, (q,) sorted int64 ``user code * key size + key code``.
        pair_counts: per key, (q,) the skips of each pair.
        totals: (len(users),) the distinct articles each user skipped.
        sizes: the key sizes the pair keys were built with (one more than the largest code).
    """

    users: pd.Index
    pair_keys: tuple[np.ndarray, ...]
    pair_counts: tuple[np.ndarray, ...]
    totals: np.ndarray
    sizes: tuple[int, ...]

    @classmethod
    def from_pairs(cls, user_ids: np.ndarray, user_index: np.ndarray, item_rows: np.ndarray,
                   item_codes: np.ndarray) -> "SkipCounts":
        """Count skips from (user, article) pairs, as ``repository.read_skipped`` returns them.

        Args:
            user_ids: (u,) unique user ids.
            user_index: (q,) the user of each skip, an index into ``user_ids``.
            item_rows: (q,) the article of each skip, a row of ``item_codes``; a pair repeated
                (an article skipped in two impressions) counts once.
            item_codes: (n, K) key codes of every article (``AffinityCalibration.item_codes``);
                an article whose key is -1 counts in its user's total only.
        """
        return SkippedArticles(user_ids, user_index, item_rows).counts(item_codes)

    def lookup(self, user_ids: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Skips of each (user, candidate) pair: ((c, K) of the candidate's keys, (c,) in all).

        Args:
            user_ids: (c,) the user of each pair; a user not read has none.
            codes: (c, K) the candidate's key codes (the ``item_codes`` the counts were built
                from; -1 reads 0).
        """
        user_code = self.users.get_indexer(np.asarray(user_ids, dtype=object)).astype(np.int64)
        known_user = user_code >= 0
        out = np.zeros((len(user_code), len(self.sizes)), dtype=np.int64)
        for k, size in enumerate(self.sizes):
            ok = known_user & (codes[:, k] >= 0) & (codes[:, k] < size)
            out[ok, k] = _sorted_lookup(self.pair_keys[k], self.pair_counts[k], user_code[ok] * size + codes[ok, k])
        totals = np.zeros(len(user_code), dtype=np.int64)
        totals[known_user] = self.totals[user_code[known_user]]
        return out, totals


def history_key_counts(owner: np.ndarray, candidate_codes: np.ndarray, history_offsets: np.ndarray,
                       history_items: np.ndarray, item_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clicks of each candidate's keys in its list's history.

    Args:
        owner: (c,) the list (impression or user) of each candidate.
        candidate_codes: (c, K) the candidate's key codes.
        history_offsets: (m + 1,) CSR offsets of the lists' histories.
        history_items: (h,) item rows of the histories.
        item_codes: (n, K) key codes of every item row.

    Returns:
        ((c, K) history articles of each of the candidate's keys, (c,) history length).
    """
    owner = np.asarray(owner, dtype=np.int64)
    lengths = np.diff(np.asarray(history_offsets, dtype=np.int64))
    hist_owner = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    out = np.zeros((len(owner), item_codes.shape[1]), dtype=np.int64)
    for k in range(item_codes.shape[1]):
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


def affinity_inputs(impressions: Impressions, skips: SkipCounts, item_codes: np.ndarray, history_len: int):
    """``pair_inputs`` of every candidate of ``impressions``, each read against its impression's
    history and user."""
    return pair_inputs(candidate_impression_rows(impressions), impressions.user_ids, impressions.candidate_items,
                       impressions.history_offsets, impressions.history_items, skips, item_codes, history_len)


def pair_inputs(owner: np.ndarray, list_users: np.ndarray, candidate_items: np.ndarray, history_offsets: np.ndarray,
                history_items: np.ndarray, skips: SkipCounts, item_codes: np.ndarray, history_len: int):
    """``(clicks, skips, history, skipped)`` of (list, candidate) pairs, the inputs of
    ``AffinityCalibration.logits`` after the logits: the candidate's keys' clicks in its list's
    history as the user encoder reads it (its first ``history_len``, the newest), its user's
    skips of them in ``skips``, and both totals.

    Args:
        owner: (c,) the list (an impression, or a user of the nightly's shard) of each pair.
        list_users: (m,) the user id of each list.
        candidate_items: (c,) the candidate's item row of each pair.
        history_offsets / history_items: the lists' histories (CSR, newest first).
        item_codes: (n, K) key codes of every item row (``AffinityCalibration.item_codes``;
            those ``skips`` was built from).
        history_len: the model's history cap: a history read for several models may be longer.
    """
    codes = item_codes[candidate_items]
    offsets, items = first_of_each(history_offsets, history_items, history_len)
    clicks, history = history_key_counts(owner, codes, offsets, items, item_codes)
    skipped_keys, skipped = skips.lookup(np.asarray(list_users, dtype=object)[owner], codes)
    return clicks, skipped_keys, history, skipped


def first_of_each(offsets: np.ndarray, items: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """The CSR lists ``(offsets (m + 1,), items)`` cut to their first ``cap`` entries each."""
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.minimum(np.diff(offsets), cap)
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    owner = np.repeat(np.arange(len(lengths)), lengths)
    return out, np.asarray(items)[offsets[:-1][owner] + np.arange(out[-1]) - out[:-1][owner]]
