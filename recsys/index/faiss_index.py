"""Inner-product search over item embeddings with FAISS, keyed by news id.

Item embeddings are L2-normalised, so the inner product is the cosine similarity. Rows of the
FAISS index are numbered 0..n-1 in insertion order; a stored array maps each row to its news
id (FAISS only knows int64 labels) and another holds each row's publication time for the age
filter.

Index kinds:
    flat: ``IndexFlatIP``, exact. Replacing an id removes its row (later rows shift down).
    hnsw: ``IndexHNSWFlat``, approximate. HNSW cannot remove a vector, so a replaced id leaves
        a tombstone: the old row stays in the graph, is never returned, and ``compact()``
        rebuilds the graph without it.
    ivf: ``IndexIVFFlat`` with an exact inner-product coarse quantizer (spherical k-means),
        approximate. Replaced rows are tombstoned too, so row numbers stay stable.
    auto: flat up to ``exact_max_items`` items, hnsw beyond (see docs/index.md for the
        measurements behind that choice).

An approximate index calibrates its search breadth when built (``calibrate``): the smallest
ef_search / nprobe whose recall@100 against exact search reaches ``target_recall`` (0.95) on
queries drawn from the catalogue itself, recorded in the manifest.

Filters (tombstones, the age filter) are applied inside FAISS with an ``IDSelectorBitmap``
for the approximate kinds; a candidate set of at most ``exact_max_items`` rows is searched
exactly instead, which is faster than walking a graph for a few allowed items and never
misses one. Per-query exclusions (the articles a user already clicked) are removed after the
search, which over-fetches by the number of excluded rows and retries with a larger k and a
wider search when an approximate index still comes back short.

The saved folder (its files, atomic replacement, consistent reads) is ``recsys.index.folder``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from recsys.errors import ConfigError, ModelMismatchError, NotFoundError, RecsysError, disk_error, disk_errors
from recsys.index.folder import (
    ALIVE_FILE, FORMAT, FORMAT_VERSION, IDS_FILE, INDEX_FILE, INDEX_FILES, MANIFEST_FILE, MANIFEST_KEYS,
    OPTIONAL_MANIFEST_KEYS, PUBLISHED_FILE, IndexFormatError, SavedFolder, fsync, followed, is_index_directory,
    parse_manifest, read_rows, read_saved, remove_stale_saves, restore_interrupted_save, saved_at, swap_in,
)
from recsys.threads import default_threads

log = logging.getLogger(__name__)

FLAT = "flat"
HNSW = "hnsw"
IVF = "ivf"
AUTO = "auto"
KINDS = (AUTO, FLAT, HNSW, IVF)
APPROXIMATE_AUTO_KIND = HNSW

# Build-time defaults (docs/index.md). The search breadths (ef_search, nprobe) are starting
# values only: build calibrates them to the target recall unless params set them or
# target_recall is None. None means "derived from n".
DEFAULT_PARAMS: dict[str, dict[str, int | None]] = {
    FLAT: {},
    HNSW: {"M": 32, "ef_construction": 80, "ef_search": 256},
    IVF: {"nlist": None, "nprobe": None},
}


# Rows per block when an exact search runs over a subset of rows: bounds the copy to 64 MiB
# at dim 128 whatever the index size.
_EXACT_BLOCK_ROWS = 131_072
# Approximate rounds (each doubling k and the search breadth) before the remaining short
# queries fall back to exact search over the allowed rows.
_MAX_APPROXIMATE_ROUNDS = 4
# Search breadths tried by calibrate(), smallest first: the first reaching the target wins.
_EF_SEARCH_LADDER = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
_CALIBRATION_K = 100
_CALIBRATION_QUERIES = 256
# How many vectors a batched exact search (BLAS) compares in the time HNSW or IVF compares
# one (random memory access, no matrix product): measured ~11 at 1000 queries per batch on
# the 2-core machine (benchmarks/bench_index.py); small batches gain less from BLAS.
_EXACT_ADVANTAGE_BATCHED = 10.0
_EXACT_ADVANTAGE_SMALL = 2.0
_BATCHED_QUERIES = 64


@dataclasses.dataclass(frozen=True, eq=False)
class Hits:
    """Search results of one query, best first.

    Iterating yields ``(news_id, score)`` tuples, so ``list(hits)`` is the plain-list form.

    Attributes:
        news_ids: (m,) str, m <= k.
        scores: (m,) float32 inner products, non-increasing.
    """

    news_ids: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.news_ids)

    def __iter__(self) -> Iterator[tuple[str, float]]:
        return zip(self.news_ids.tolist(), self.scores.tolist())


_NO_HITS = Hits(np.array([], dtype=str), np.array([], dtype=np.float32))


class FaissIndex:
    """Nearest-neighbour search over item embeddings by inner product, keyed by news id.

    Create one with ``FaissIndex.build`` or ``FaissIndex.load``; the constructor is internal.
    """

    def __init__(
        self,
        index: faiss.Index,
        news_ids: np.ndarray,
        published: np.ndarray,
        alive: np.ndarray,
        *,
        kind: str,
        params: dict[str, int],
        exact_max_items: int,
        num_threads: int,
        built_at: str,
        build_seconds: float,
        manifest_extra: dict[str, Any] | None = None,
        calibration: dict[str, Any] | None = None,
        requested_kind: str | None = None,
    ):
        self._index = index
        self._ids = news_ids
        self._published = published
        self._alive = alive
        self._kind = kind
        self._params = dict(params)
        self._exact_max_items = exact_max_items
        self._num_threads = num_threads
        self._built_at = built_at
        self._build_seconds = build_seconds
        self.manifest_extra: dict[str, Any] = dict(manifest_extra or {})
        self._calibration = calibration
        self._requested_kind = requested_kind
        self._rebuild_row_map()

    # ------------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        news_ids: Sequence[str] | np.ndarray,
        vectors: np.ndarray,
        *,
        published: np.ndarray | None = None,
        kind: str = AUTO,
        exact_max_items: int = 100_000,
        params: Mapping[str, int] | None = None,
        num_threads: int | None = None,
        target_recall: float | None = 0.95,
    ) -> FaissIndex:
        """Build an index over item embeddings.

        Args:
            news_ids: (n,) unique news ids.
            vectors: (n, dim) float32 item embeddings, L2-normalised (scores are inner
                products). Pass shape (0, dim) for an empty index.
            published: (n,) datetime64 publication times (stored at second precision, NaT
                for unknown), or None when unknown for every item.
            kind: "flat" (exact), "hnsw", "ivf" (approximate) or "auto": flat up to
                ``exact_max_items`` items, hnsw beyond.
            exact_max_items: the largest item count auto searches exactly; also the largest
                filtered candidate set that an approximate index searches exactly.
            params: overrides of ``DEFAULT_PARAMS`` for the kind (for auto: of the
                approximate kind; ignored when auto picks flat). hnsw: M, ef_construction,
                ef_search. ivf: nlist (default ~4*sqrt(n) rounded to a power of two, at most n/39), nprobe (default
                nlist/8, at least 8).
            num_threads: FAISS (OpenMP) threads for this index's work; None means every core
                available to the process.
            target_recall: for an approximate kind, ``calibrate`` picks the smallest search
                breadth (ef_search / nprobe) whose recall@100 against exact search reaches it
                on a sample of the items; when params set that breadth, recall is only
                measured. None skips calibration.

        Returns:
            The index.

        Raises:
            ConfigError: unknown kind or parameter name, or a bad parameter value.
            ValueError: malformed ids, vectors or times, or duplicate news ids.
        """
        ids = _as_ids(news_ids, "news_ids")
        x = _as_vectors(vectors, "vectors", dim=None, rows=len(ids))
        pub = _as_published(published, len(ids))
        _check_unique(ids)
        if not isinstance(exact_max_items, int) or exact_max_items < 0:
            raise ConfigError(f"exact_max_items must be an integer >= 0, got {exact_max_items!r}")
        _check_target_recall(target_recall)
        resolved = resolve_kind(kind, len(ids), exact_max_items)
        if resolved == IVF and len(ids) == 0:
            raise ValueError("kind='ivf' needs at least one vector to train its coarse quantizer, got 0")
        checked = _check_params(APPROXIMATE_AUTO_KIND if kind == AUTO else resolved, params)
        full_params = {} if resolved == FLAT else _derive_params(resolved, checked, len(ids))
        threads = _set_threads(num_threads)

        start = time.perf_counter()
        index = _new_index(resolved, x.shape[1], full_params)
        if resolved == IVF:
            index.train(x)
            # A direct map lets vector() reconstruct rows; it is kept up to date by add().
            index.make_direct_map(True)
        index.add(x)
        built = cls(
            index, ids, pub, np.ones(len(ids), dtype=bool),
            kind=resolved, params=full_params, exact_max_items=exact_max_items,
            num_threads=threads, built_at=_utc_now(), build_seconds=0.0, requested_kind=kind,
        )
        if resolved != FLAT and target_recall is not None and len(ids):
            breadth = _SEARCH_PARAMS[resolved][0]
            built.calibrate(target_recall=target_recall, tune=breadth not in checked)
        built._build_seconds = time.perf_counter() - start
        return built

    def add(
        self,
        news_ids: Sequence[str] | np.ndarray,
        vectors: np.ndarray,
        published: np.ndarray | None = None,
    ) -> None:
        """Add articles without touching the others; an id already present is replaced.

        A flat index removes the replaced rows (later rows shift down). HNSW and IVF keep the
        old row as a tombstone that search never returns; ``compact()`` drops tombstones. An
        IVF index assigns new vectors to its existing centroids (no retraining).

        Args:
            news_ids: (m,) unique news ids.
            vectors: (m, dim) float32 embeddings.
            published: (m,) datetime64 publication times, or None (unknown).

        Raises:
            ValueError: malformed input, a dimension other than the index's, duplicates.
        """
        ids = _as_ids(news_ids, "news_ids")
        x = _as_vectors(vectors, "vectors", dim=self.dim, rows=len(ids))
        pub = _as_published(published, len(ids))
        _check_unique(ids)
        if len(ids) == 0:
            return
        self._use_threads()
        old_rows = np.array([self._row_of[i] for i in ids.tolist() if i in self._row_of], dtype=np.int64)
        self._drop_rows(old_rows)
        first_new_row = len(self._ids)
        self._index.add(x)
        self._ids = np.concatenate([self._ids, ids])
        self._published = np.concatenate([self._published, pub])
        self._alive = np.concatenate([self._alive, np.ones(len(ids), dtype=bool)])
        if len(old_rows) and self._kind == FLAT:
            self._rebuild_row_map()
        else:
            self._row_of.update(zip(ids.tolist(), range(first_new_row, first_new_row + len(ids))))

    def remove(self, news_ids: Sequence[str] | np.ndarray) -> int:
        """Remove articles (ids the index does not hold are passed over); returns how many it held.

        As ``add`` replaces: a flat index drops the rows, HNSW and IVF keep them as tombstones
        that search never returns (``compact()`` drops them).
        """
        ids = _as_ids(news_ids, "news_ids")
        rows = np.array(sorted(self._row_of[i] for i in set(ids.tolist()) if i in self._row_of), dtype=np.int64)
        if len(rows) == 0:
            return 0
        self._use_threads()
        self._drop_rows(rows)
        self._rebuild_row_map()
        return len(rows)

    def _drop_rows(self, rows: np.ndarray) -> None:
        """Take rows out of search: a flat index removes them (later rows shift down), HNSW and IVF
        mark them tombstones. The row map is the caller's to rebuild."""
        if len(rows) == 0:
            return
        if self._kind == FLAT:
            self._index.remove_ids(rows)
            keep = np.ones(len(self._ids), dtype=bool)
            keep[rows] = False
            self._ids, self._published, self._alive = self._ids[keep], self._published[keep], self._alive[keep]
        else:
            self._alive[rows] = False

    def compact(self) -> None:
        """Rebuild the approximate index without its tombstones (from the stored vectors).

        No re-encoding is needed. HNSW rebuilds its graph (as slow as a build); IVF keeps its
        trained centroids and re-adds the live vectors. A flat index has no tombstones.
        """
        if self.num_tombstones == 0:
            return
        self._use_threads()
        live = np.flatnonzero(self._alive)
        x = self._gather(live)
        if self._kind == IVF:
            self._index.reset()
            self._index.make_direct_map(True)
        else:
            self._index = _new_index(self._kind, self.dim, self._params)
        self._index.add(x)
        self._ids, self._published = self._ids[live], self._published[live]
        self._alive = np.ones(len(live), dtype=bool)
        self._rebuild_row_map()

    def calibrate(self, *, target_recall: float = 0.95, tune: bool = True) -> dict[str, Any] | None:
        """Measure recall@100 against exact search; optionally tune the search breadth to it.

        Queries stand for unseen points of the catalogue's distribution (a user vector, a new
        article): up to 256 live items drawn at random (seed 0), each moved in a random
        direction by its distance to its nearest neighbour, so they sit between items at the
        local spacing of the data. (Querying with the items themselves overstates recall: the
        graph holds a node exactly there.) The exact top-100 comes from a flat search over the
        live rows. With ``tune`` the breadth
        (hnsw: ef_search, ivf: nprobe) becomes the smallest of a ladder (hnsw: 32 .. 4096;
        ivf: powers of two up to nlist) that reaches ``target_recall``; if none does, the
        largest is kept and a warning is logged. Costs one exact search of the sample (about
        a second per million items at dim 128) plus a few approximate ones. Call it again
        after large ``add`` batches if the catalogue changed character.

        Args:
            target_recall: recall@100 to reach, in (0, 1].
            tune: change the breadth (True) or only measure the current one (False).

        Returns:
            The calibration record (also in ``calibration`` and the saved manifest): k,
            num_queries, target_recall, param, value, recall, tuned, num_items (the live items
            it was measured on). None for a flat or empty index, which are exact.
        """
        _check_target_recall(target_recall)
        live = np.flatnonzero(self._alive)
        if self._kind == FLAT or len(live) == 0:
            return None
        self._use_threads()
        rng = np.random.default_rng(0)
        probes = np.sort(rng.choice(live, size=min(_CALIBRATION_QUERIES, len(live)), replace=False))
        q = self._calibration_queries(probes, live, rng)
        k = min(_CALIBRATION_K, len(live))
        _, truth = self._exact_search_rows(q, live, k)
        selector_bits = None if len(live) == len(self._ids) else np.packbits(self._alive, bitorder="little")
        name = _SEARCH_PARAMS[self._kind][0]
        if not tune:
            ladder = [self._params[name]]
        elif self._kind == HNSW:
            # A breadth beyond the item count adds nothing.
            ladder = sorted({min(v, max(_EF_SEARCH_LADDER[0], len(live))) for v in _EF_SEARCH_LADDER})
        else:
            nlist = self._params["nlist"]
            ladder = sorted({min(2**i, nlist) for i in range(nlist.bit_length() + 1)})
        for value in ladder:
            labels, _ = self._approximate_search(q, k, value, selector_bits)
            recall = float(np.mean([len(np.intersect1d(t, f)) for t, f in zip(truth, labels)]) / k)
            if recall >= target_recall:
                break
        if recall < target_recall:
            log.warning(
                "%s index of %d items: recall@%d is %.3f at %s=%d, below the target %.3f",
                self._kind, len(live), k, recall, name, value, target_recall,
            )
        self._params[name] = int(value)
        self._calibration = {
            "k": k, "num_queries": len(probes), "target_recall": target_recall,
            "param": name, "value": int(value), "recall": round(recall, 4), "tuned": tune, "num_items": int(len(live)),
        }
        return dict(self._calibration)

    def _calibration_queries(self, probes: np.ndarray, live: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(len(probes), dim): each probe item moved randomly by its nearest-neighbour distance."""
        x = self._gather(probes)
        _, nearest = self._exact_search_rows(x, live, min(2, len(live)))
        # The best match is the item itself (barring duplicates); the second is its neighbour.
        neighbour = self._gather(nearest[:, -1])
        step = np.linalg.norm(x - neighbour, axis=1, keepdims=True)
        direction = rng.standard_normal(x.shape).astype(np.float32)
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        q = x + step * direction
        # Keep each query's norm (1 for L2-normalised embeddings).
        q *= np.linalg.norm(x, axis=1, keepdims=True) / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(q, dtype=np.float32)

    def set_search_params(self, **params: int) -> None:
        """Change the search-time breadth: ``ef_search`` (hnsw) or ``nprobe`` (ivf).

        Larger values raise recall and cost time; the values are saved with the index. A
        breadth set so is kept: a later ``calibrate`` by the nightly job (after a compaction,
        or once the catalogue has grown) measures its recall instead of tuning it away, so the
        calibration record says ``tuned: false`` and, until measured, ``recall: null``.

        Raises:
            ConfigError: a parameter that is not a search-time parameter of this kind, or a
                value that is not an integer >= 1 (nprobe: at most nlist).
        """
        allowed = _SEARCH_PARAMS[self._kind]
        checked = _check_params(self._kind, params)
        for key, value in checked.items():
            if key not in allowed:
                raise ConfigError(
                    f"index parameter {key!r} is fixed at build time for kind {self._kind!r}, "
                    f"search-time parameters: {', '.join(allowed) or 'none'}"
                )
            if key == "nprobe" and value > self._params["nlist"]:
                raise ConfigError(f"index parameter 'nprobe' is {value}, expected at most nlist = {self._params['nlist']}")
        self._params.update(checked)
        if checked and self._calibration is not None:
            name = allowed[0]
            self._calibration = {**self._calibration, "value": self._params[name], "recall": None, "tuned": False}

    # ------------------------------------------------------------------ properties

    @property
    def kind(self) -> str:
        """The resolved kind: "flat", "hnsw" or "ivf"."""
        return self._kind

    @property
    def params(self) -> dict[str, int]:
        """The kind's parameters in effect (a copy)."""
        return dict(self._params)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def exact_max_items(self) -> int:
        """The most items "auto" searches exactly; also the largest filtered candidate set an
        approximate index searches exactly. Settable (and saved), as the config changes."""
        return self._exact_max_items

    @exact_max_items.setter
    def exact_max_items(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"exact_max_items must be an integer >= 0, got {value!r}")
        self._exact_max_items = value

    @property
    def calibration(self) -> dict[str, Any] | None:
        """The last ``calibrate`` record (recall@100 vs exact search), None if never run."""
        return None if self._calibration is None else dict(self._calibration)

    @property
    def requested_kind(self) -> str | None:
        """The kind ``build`` was asked for ("auto", or the explicit kind); None for an index
        saved before it was recorded. Settable (and saved) for such an index."""
        return self._requested_kind

    @requested_kind.setter
    def requested_kind(self, value: str) -> None:
        if value not in KINDS:
            raise ConfigError(f"index kind {value!r} is unknown, expected one of {', '.join(KINDS)}")
        self._requested_kind = value

    @property
    def num_threads(self) -> int:
        return self._num_threads

    @property
    def num_tombstones(self) -> int:
        """Replaced rows still held by an approximate index (see ``compact``)."""
        return int(len(self._alive) - np.count_nonzero(self._alive))

    @property
    def news_ids(self) -> np.ndarray:
        """(n,) str: the live news ids in row order."""
        return self._ids[self._alive]

    @property
    def built_at(self) -> str:
        return self._built_at

    @property
    def build_seconds(self) -> float:
        return self._build_seconds

    def __len__(self) -> int:
        return len(self._row_of)

    def __contains__(self, news_id: object) -> bool:
        return news_id in self._row_of

    def __repr__(self) -> str:
        return f"FaissIndex(kind={self._kind!r}, dim={self.dim}, items={len(self)}, params={self._params})"

    # ------------------------------------------------------------------ lookup

    def vector(self, news_id: str) -> np.ndarray:
        """The stored embedding of one article.

        Returns:
            (dim,) float32.

        Raises:
            NotFoundError: the news id is not in the index.
        """
        return self.vectors([news_id])[0]

    def vectors(self, news_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """The stored embeddings of several articles.

        Returns:
            (m, dim) float32, in the order asked.

        Raises:
            NotFoundError: a news id is not in the index (the message names it).
        """
        return self._gather(self._rows_of(_as_ids(news_ids, "news_ids")))

    def published(self, news_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """The stored publication times of several articles.

        Returns:
            (m,) datetime64[s] in the order asked (NaT: unknown).

        Raises:
            NotFoundError: a news id is not in the index (the message names it).
        """
        return self._published[self._rows_of(_as_ids(news_ids, "news_ids"))].copy()

    def set_published(self, news_ids: Sequence[str] | np.ndarray, published: np.ndarray) -> None:
        """Replace the publication times of articles already in the index; vectors stay.

        Args:
            news_ids: (m,) unique news ids, all in the index.
            published: (m,) datetime64 publication times (NaT: unknown).

        Raises:
            ValueError: malformed times or duplicate ids.
            NotFoundError: a news id is not in the index; nothing is changed then.
        """
        ids = _as_ids(news_ids, "news_ids")
        pub = _as_published(published, len(ids))
        _check_unique(ids)
        self._published[self._rows_of(ids)] = pub

    def content_fingerprint(self) -> str:
        """A 16-hex-digit digest of everything a search or a lookup reads.

        SHA-256 over the kind, the search parameters, ``exact_max_items`` and every row (tombstones
        included, in row order): its news id, whether it is live, its publication time and its
        stored vector. Any ``add`` (a new or re-embedded article), ``set_published``, ``compact``
        or re-tuning changes it; the same saved index loaded again gives the same one. The
        vectors are hashed where FAISS stores them (flat, hnsw; ivf reconstructs them in blocks):
        about 0.4 s for 1M articles of 144 float32 (576 MB) on one core.
        """
        digest = hashlib.sha256()
        header = {"kind": self._kind, "params": self._params, "dim": self.dim, "rows": len(self._ids),
                  "exact_max_items": self._exact_max_items, "ids": self._ids.dtype.str}
        digest.update(json.dumps(header, sort_keys=True).encode("utf-8"))
        for array in (self._ids, self._alive, self._published.astype("datetime64[s]").view(np.int64)):
            digest.update(np.ascontiguousarray(array).view(np.uint8))
        if self._kind in (FLAT, HNSW):
            flat = faiss.downcast_index(self._index.storage if self._kind == HNSW else self._index)
            if flat.ntotal:
                digest.update(faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).view(np.uint8))
        else:
            for start in range(0, len(self._ids), _EXACT_BLOCK_ROWS):
                rows = np.arange(start, min(start + _EXACT_BLOCK_ROWS, len(self._ids)), dtype=np.int64)
                digest.update(np.ascontiguousarray(self._gather(rows), dtype=np.float32).view(np.uint8))
        return digest.hexdigest()[:16]

    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        missing = [i for i in ids.tolist() if i not in self._row_of]
        if missing:
            shown = ", ".join(repr(i) for i in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise NotFoundError(f"news id {shown} not in the index ({len(self)} items)")
        return np.array([self._row_of[i] for i in ids.tolist()], dtype=np.int64)

    # ------------------------------------------------------------------ search

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude: Sequence[Collection[str] | None] | None = None,
        published_after: np.datetime64 | dt.datetime | str | None = None,
    ) -> list[Hits]:
        """The k items with the largest inner product to each query, best first.

        Every query gets min(k, number of eligible items) results: never FAISS's -1 padding,
        never an excluded, too old or replaced item.

        Args:
            queries: (q, dim) float32 query vectors (user vectors, or item vectors for
                "similar articles").
            k: results per query, >= 0.
            exclude: one collection of news ids per query that must not be returned (e.g. the
                articles the user already clicked); ids not in the index are ignored.
            published_after: keep only items published at or after this time (naive UTC);
                items with an unknown publication time are dropped when it is given.

        Returns:
            q ``Hits``, one per query.

        Raises:
            ValueError: malformed queries, k, exclude or published_after.
        """
        q = _as_vectors(queries, "queries", dim=self.dim, rows=None)
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
            raise ValueError(f"k must be an integer >= 0, got {k!r}")
        k = int(k)
        num_queries = len(q)
        if exclude is not None and len(exclude) != num_queries:
            raise ValueError(f"exclude must hold one collection per query: {len(exclude)} for {num_queries} queries")
        allowed = self._allowed_rows_mask(published_after)
        num_allowed = len(self._ids) if allowed is None else int(np.count_nonzero(allowed))
        if k == 0 or num_allowed == 0:
            return [_NO_HITS] * num_queries
        excluded = self._excluded_rows(exclude, allowed, num_queries)
        # Excluded rows are allowed rows, distinct, so each query's eligible count is exact.
        targets = np.array([min(k, num_allowed - len(e)) for e in excluded], dtype=np.int64)
        self._use_threads()

        hits: list[Hits | None] = [_NO_HITS if t == 0 else None for t in targets]
        pending = np.flatnonzero(targets > 0)
        if self._kind == FLAT or (allowed is not None and self._filtered_exact_is_cheaper(len(pending), num_allowed, k)):
            self._exact_round(q, pending, allowed, k, excluded, targets, hits)
            return hits  # type: ignore[return-value]

        selector_bits = None if allowed is None else np.packbits(allowed, bitorder="little")
        # Each retry round doubles k and the breadth.
        for growth in (2**r for r in range(_MAX_APPROXIMATE_ROUNDS)):
            if len(pending) == 0:
                break
            k_search = min(num_allowed, k * growth + max(len(excluded[i]) for i in pending))
            breadth = self._filtered_breadth(num_allowed, growth)
            labels, scores = self._approximate_search(q[pending], k_search, breadth, selector_bits)
            pending = self._collect(pending, labels, scores, excluded, targets, hits)
        # Whatever is still short after widening is searched exactly: results are complete.
        self._exact_round(q, pending, allowed, k, excluded, targets, hits)
        return hits  # type: ignore[return-value]

    def _filtered_breadth(self, num_allowed: int, growth: int = 1) -> int:
        """ef_search / nprobe for a search whose filter keeps num_allowed of the rows.

        A filter keeping a fraction f of the rows leaves ~f of the visited candidates usable,
        so the breadth grows by 1/f to keep recall where it is unfiltered.
        """
        base = self._params[_SEARCH_PARAMS[self._kind][0]]
        return math.ceil(base * growth * len(self._ids) / num_allowed)

    def _filtered_exact_is_cheaper(self, num_queries: int, num_allowed: int, k: int) -> bool:
        """Whether scanning the allowed rows exactly beats the widened approximate search.

        Always true up to exact_max_items allowed rows. Beyond, the approximate cost is
        estimated in vectors compared per query (HNSW: ~M per unit of ef, as measured; IVF:
        the probed lists plus the centroids) and weighed by how much cheaper a batched
        exact comparison is.
        """
        if num_allowed <= self._exact_max_items:
            return True
        breadth = self._filtered_breadth(num_allowed)
        if self._kind == HNSW:
            compared = self._params["M"] * max(min(breadth, len(self._ids)), k)
        else:
            nlist = self._params["nlist"]
            compared = min(breadth, nlist) * len(self._ids) / nlist + nlist
        advantage = _EXACT_ADVANTAGE_BATCHED if num_queries >= _BATCHED_QUERIES else _EXACT_ADVANTAGE_SMALL
        return num_allowed <= advantage * compared

    def _exact_round(self, q, pending, allowed, k, excluded, targets, hits) -> None:
        """Exact search for the pending queries over the allowed rows (None: every row)."""
        if len(pending) == 0:
            return
        num_allowed = len(self._ids) if allowed is None else int(np.count_nonzero(allowed))
        k_search = min(num_allowed, k + max(len(excluded[i]) for i in pending))
        if allowed is None and self._kind == FLAT:
            scores, labels = self._index.search(q[pending], k_search)
        else:
            rows = np.arange(len(self._ids)) if allowed is None else np.flatnonzero(allowed)
            scores, labels = self._exact_search_rows(q[pending], rows, k_search)
        short = self._collect(pending, labels, scores, excluded, targets, hits)
        if len(short):
            raise RuntimeError(f"exact search returned fewer results than eligible items for queries {short[:5]}")

    def _approximate_search(self, q: np.ndarray, k_search: int, breadth: int, selector_bits):
        """One approximate search with the given ef_search (hnsw) or nprobe (ivf).

        Returns:
            labels (q, k_search) int64 rows, -1 padded, and scores (q, k_search) float32.
        """
        selector = None
        if selector_bits is not None:
            selector = faiss.IDSelectorBitmap(len(self._ids), faiss.swig_ptr(selector_bits))
        if self._kind == HNSW:
            params = faiss.SearchParametersHNSW(efSearch=max(min(breadth, len(self._ids)), k_search))
        else:
            params = faiss.SearchParametersIVF(nprobe=min(breadth, self._params["nlist"]))
        if selector is not None:
            params.sel = selector
        scores, labels = self._index.search(q, k_search, params=params)
        return labels, scores

    def _collect(self, pending, labels, scores, excluded, targets, hits) -> np.ndarray:
        """Turn raw FAISS rows into Hits for queries that got their target; return the rest."""
        still_short = []
        for position, query in enumerate(pending.tolist()):
            row_labels = labels[position]
            keep = row_labels >= 0
            if len(excluded[query]):
                keep &= ~np.isin(row_labels, excluded[query])
            kept = row_labels[keep][: targets[query]]
            if len(kept) < targets[query]:
                still_short.append(query)
                continue
            hits[query] = Hits(self._ids[kept], scores[position][keep][: targets[query]].astype(np.float32))
        return np.array(still_short, dtype=np.int64)

    def _exact_search_rows(self, q: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over a subset of rows, in blocks so memory stays bounded.

        Returns:
            scores (q, k) float32 and row labels (q, k) int64, best first.
        """
        best_scores = np.empty((len(q), 0), dtype=np.float32)
        best_labels = np.empty((len(q), 0), dtype=np.int64)
        for start in range(0, len(rows), _EXACT_BLOCK_ROWS):
            block = rows[start : start + _EXACT_BLOCK_ROWS]
            scores, labels = faiss.knn(q, self._gather(block), min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
            scores = np.concatenate([best_scores, scores], axis=1)
            labels = np.concatenate([best_labels, block[labels]], axis=1)
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            best_scores = np.take_along_axis(scores, order, axis=1)
            best_labels = np.take_along_axis(labels, order, axis=1)
        return best_scores, best_labels

    def _allowed_rows_mask(self, published_after) -> np.ndarray | None:
        """(rows,) bool of rows search may return, or None when every row may be returned."""
        mask = None if self.num_tombstones == 0 else self._alive
        if published_after is None:
            return mask
        cutoff = _as_time(published_after)
        recent = self._published >= cutoff  # NaT compares False: unknown times are dropped
        return recent if mask is None else recent & mask

    def _excluded_rows(self, exclude, allowed, num_queries) -> list[np.ndarray]:
        """Per query, the distinct allowed rows of its excluded news ids."""
        if exclude is None:
            return [np.empty(0, dtype=np.int64)] * num_queries
        out = []
        for position, ids in enumerate(exclude):
            if ids is None:
                ids = ()
            if isinstance(ids, str):
                raise ValueError(f"exclude[{position}] must be a collection of news ids, got the string {ids!r}")
            rows = {self._row_of[i] for i in ids if i in self._row_of}
            if allowed is not None:
                rows = {r for r in rows if allowed[r]}
            out.append(np.array(sorted(rows), dtype=np.int64))
        return out

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | os.PathLike, *, manifest_extra: Mapping[str, Any] | None = None) -> Path:
        """Write the index to a directory, atomically.

        The files are written into a temporary sibling directory which is then renamed into
        place, so ``directory`` is either the previous complete index or the new complete
        one. Replacing an existing index renames it aside first; if the process dies between
        the two renames the previous index survives as ``.<name>.old-*`` beside it, and a
        ``load``, ``exists`` or ``save`` more than ``RESTORE_GRACE_SECONDS`` later puts it back.
        Leftovers of killed saves older than ``STALE_SAVE_SECONDS`` are removed after a
        successful save.

        Layout: index.faiss, news_ids.npy (str), published.npy (datetime64[s]), alive.npy
        (bool, False for tombstones), manifest.json.

        Args:
            directory: target directory; it must not exist or hold a previous index. A
                symlink is followed: the folder it points to is replaced and the link stays.
            manifest_extra: JSON-serialisable entries merged into manifest.json (e.g. encoder
                names and dims, model version); defaults to the ones this index was loaded
                with. Keys must not collide with the index's own manifest keys.

        Returns:
            The directory.

        Raises:
            ValueError: a manifest_extra key collides with a reserved key.
            RecsysError: the directory exists and is not an index directory, or its folder
                cannot be written (DiskError: the disk is full or read-only).
        """
        given = Path(directory)
        directory = followed(given)
        if directory != given and not directory.parent.is_dir():
            raise RecsysError(f"index {given} links to {directory}, whose folder {directory.parent} does not exist "
                              "(a disk not mounted?); nothing was written")
        restore_interrupted_save(directory)
        extra = dict(self.manifest_extra if manifest_extra is None else manifest_extra)
        clashing = sorted(set(extra) & {*MANIFEST_KEYS, *OPTIONAL_MANIFEST_KEYS})
        if clashing:
            raise ValueError(f"manifest_extra keys {clashing} are reserved for the index manifest")
        if directory.exists() and not is_index_directory(directory):
            raise RecsysError(
                f"refusing to replace {directory}: it is not an index directory "
                f"(expected only {', '.join(INDEX_FILES)})"
            )
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self._kind,
            "params": self._params,
            "metric": "inner_product",
            "dim": self.dim,
            "num_items": len(self),
            "num_rows": len(self._ids),
            "num_tombstones": self.num_tombstones,
            "exact_max_items": self._exact_max_items,
            "built_at": self._built_at,
            "build_seconds": round(self._build_seconds, 3),
            "saved_at": _utc_now(),
            "faiss_version": faiss.__version__,
            "calibration": self._calibration,
            "requested_kind": self._requested_kind,
            **extra,
        }
        text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"  # fails before any write

        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex}"
        try:
            tmp.mkdir()
        except OSError as exc:  # permissions, a read-only file system, a full disk
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_error("save the index", given, exc) from exc
            raise RecsysError(f"cannot save the index {given}: an index is written beside {directory} and renamed into "
                              f"place, so {directory.parent} must be writable ({exc.strerror})") from exc
        # A full disk: FAISS raises RuntimeError("... (No space left on device)"), NumPy an OSError.
        with disk_errors("save the index", given):
            try:
                faiss.write_index(self._index, str(tmp / INDEX_FILE))
                np.save(tmp / IDS_FILE, self._ids, allow_pickle=False)
                np.save(tmp / PUBLISHED_FILE, self._published, allow_pickle=False)
                np.save(tmp / ALIVE_FILE, self._alive, allow_pickle=False)
                (tmp / MANIFEST_FILE).write_text(text, encoding="utf-8")
                for name in INDEX_FILES:
                    fsync(tmp / name)
                swap_in(tmp, directory)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        remove_stale_saves(directory)
        if directory != given:  # what saves left beside the link before links were followed
            remove_stale_saves(given)
        self.manifest_extra = extra
        return given

    @staticmethod
    def exists(directory: str | os.PathLike) -> bool:
        """Whether ``directory`` holds a saved index, every file and a manifest that parses (after
        putting back one that a killed save moved aside); an emptied folder holds none."""
        directory = followed(Path(directory))
        restore_interrupted_save(directory)
        return saved_at(directory) is not None

    @staticmethod
    def save_identity(directory: str | os.PathLike) -> tuple | None:
        """Which save the folder holds: each save swaps a new folder in, whose (device, inode)
        differs from the folder it replaces; with the manifest's ``saved_at``, as a file system
        may give a later save a freed inode again. None when there is no folder."""
        directory = followed(Path(directory))
        try:
            status = os.stat(directory)
        except FileNotFoundError:
            return None
        return status.st_dev, status.st_ino, saved_at(directory)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        *,
        expected: Mapping[str, Any] | None = None,
        num_threads: int | None = None,
    ) -> FaissIndex:
        """Load an index written by ``save``.

        Args:
            directory: the index directory.
            expected: manifest entries the caller requires (e.g. ``{"dim": 128,
                "encoders": {...}}``); checked before the index itself is read.
            num_threads: FAISS threads for this index's work; None means every core.

        Returns:
            The index, with ``manifest_extra`` holding the caller's manifest entries.

        Raises:
            NotFoundError: no index at that path.
            ModelMismatchError: an expected entry is missing or differs (the message names
                the key, the saved value and the expected one).
            IndexFormatError: a file is missing, unreadable or inconsistent with the others.
            IndexBusyError: saves replaced the folder during every read of it.
        """
        directory = followed(Path(directory))
        restore_interrupted_save(directory)
        return read_saved(directory, lambda folder: cls._read(folder, expected, num_threads))

    @classmethod
    def _read(cls, folder: SavedFolder, expected: Mapping[str, Any] | None, num_threads: int | None) -> FaissIndex:
        directory = folder.directory
        manifest_path = directory / MANIFEST_FILE
        manifest = parse_manifest(folder)
        for key, want in (expected or {}).items():
            want = json.loads(json.dumps(want))  # compare as JSON: tuples saved as lists
            if key not in manifest:
                raise ModelMismatchError(f"{manifest_path}: key {key!r} is missing, expected {want!r}")
            if manifest[key] != want:
                raise ModelMismatchError(
                    f"{manifest_path}: key {key!r} is {manifest[key]!r} in the saved index, expected {want!r}"
                )
        ids, published, alive = read_rows(folder)
        threads = _set_threads(num_threads)
        try:
            # Streamed: the file's bytes held whole and then copied by FAISS tripled the peak.
            index = folder.read(INDEX_FILE, lambda file: faiss.read_index(faiss.PyCallbackIOReader(file.read)))
        except RuntimeError as err:
            raise IndexFormatError(f"{directory / INDEX_FILE}: FAISS cannot read it ({err})") from err
        kind = manifest.get("kind")
        if kind not in (FLAT, HNSW, IVF) or not isinstance(index, _INDEX_TYPES[kind]):
            raise IndexFormatError(
                f"{directory / INDEX_FILE}: holds a {type(index).__name__}, manifest kind is {kind!r}"
            )
        for name, array in ((IDS_FILE, ids), (PUBLISHED_FILE, published), (ALIVE_FILE, alive)):
            if len(array) != index.ntotal:
                raise IndexFormatError(f"{directory / name}: {len(array)} rows, {INDEX_FILE} holds {index.ntotal}")
        if manifest.get("dim") != index.d:
            raise IndexFormatError(f"{manifest_path}: field 'dim' is {manifest.get('dim')!r}, {INDEX_FILE} has {index.d}")
        extra = {key: value for key, value in manifest.items() if key not in (*MANIFEST_KEYS, *OPTIONAL_MANIFEST_KEYS)}
        return cls(
            index, ids, published, alive,
            kind=kind, params=manifest["params"], exact_max_items=manifest["exact_max_items"],
            num_threads=threads, built_at=manifest["built_at"], build_seconds=manifest["build_seconds"],
            manifest_extra=extra, calibration=manifest["calibration"], requested_kind=manifest.get("requested_kind"),
        )

    # ------------------------------------------------------------------ internals

    def _rebuild_row_map(self) -> None:
        live = np.flatnonzero(self._alive)
        self._row_of: dict[str, int] = dict(zip(self._ids[live].tolist(), live.tolist()))

    def _use_threads(self) -> None:
        # OpenMP's thread count is per calling thread (a Ray actor's method thread starts at the
        # default, every core), and other code may have changed it.
        faiss.omp_set_num_threads(self._num_threads)

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), dim) float32 copies of the stored vectors of the given rows."""
        if self._kind in (FLAT, HNSW):
            flat = faiss.downcast_index(self._index.storage if self._kind == HNSW else self._index)
            stored = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
            return stored[rows]  # fancy indexing copies, so the view never escapes
        return self._index.reconstruct_batch(rows)


_INDEX_TYPES = {FLAT: faiss.IndexFlatIP, HNSW: faiss.IndexHNSWFlat, IVF: faiss.IndexIVFFlat}
_SEARCH_PARAMS = {FLAT: (), HNSW: ("ef_search",), IVF: ("nprobe",)}


def _new_index(kind: str, dim: int, params: Mapping[str, int]) -> faiss.Index:
    if kind == FLAT:
        return faiss.IndexFlatIP(dim)
    if kind == HNSW:
        index = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
        index.hnsw.efSearch = params["ef_search"]
        return index
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
    index.nprobe = params["nprobe"]
    # k-means on a sample of at most 64 points per list (FAISS's default is 256): at 1M items
    # and 4096 lists that makes training ~4x cheaper; the recall figures in docs/index.md
    # were measured with it.
    index.cp.max_points_per_centroid = 64
    # The IVF index must own its quantizer, or Python frees it while FAISS still uses it.
    index.own_fields = True
    quantizer.this.disown()
    return index


def resolve_kind(kind: str, num_items: int, exact_max_items: int) -> str:
    """The kind ``build`` makes of ``kind`` for ``num_items`` items: "auto" is flat up to
    ``exact_max_items``, HNSW beyond. Raises ConfigError for an unknown kind."""
    if kind not in KINDS:
        raise ConfigError(f"index kind {kind!r} is unknown, expected one of {', '.join(KINDS)}")
    if kind != AUTO:
        return kind
    return FLAT if num_items <= exact_max_items else APPROXIMATE_AUTO_KIND


def _check_params(kind: str, params: Mapping[str, int] | None) -> dict[str, int]:
    params = dict(params or {})
    allowed = DEFAULT_PARAMS[kind]
    for key, value in params.items():
        if key not in allowed:
            expected = ", ".join(allowed) if allowed else "none"
            raise ConfigError(f"index parameter {key!r} is unknown for kind {kind!r}, expected {expected}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"index parameter {key!r} is {value!r}, expected an integer >= 1")
    return params


def _derive_params(kind: str, params: dict[str, int], num_items: int) -> dict[str, int]:
    """The kind's defaults, overridden by params, with the size-dependent ones filled in."""
    full = {**DEFAULT_PARAMS[kind], **params}
    if kind == IVF:
        if full["nlist"] is None:
            # ~4*sqrt(n) lists, at least 39 training points per list (FAISS's minimum).
            target = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(num_items))))
            full["nlist"] = max(1, min(target, num_items // 39))
        elif num_items and full["nlist"] > num_items:
            raise ConfigError(f"index parameter 'nlist' is {full['nlist']}, expected at most the {num_items} items")
        if full["nprobe"] is None:
            # An eighth of the lists, but at least 8: small indexes are nearly exhaustive.
            full["nprobe"] = min(full["nlist"], max(8, full["nlist"] // 8))
    return full


def _check_target_recall(target_recall: float | None) -> None:
    if target_recall is not None and (
        not isinstance(target_recall, (int, float)) or isinstance(target_recall, bool) or not 0 < target_recall <= 1
    ):
        raise ConfigError(f"target_recall must be in (0, 1] or None, got {target_recall!r}")


def _set_threads(num_threads: int | None) -> int:
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ConfigError(f"num_threads must be an integer >= 1 or None, got {num_threads!r}")
    threads = num_threads or default_threads()
    faiss.omp_set_num_threads(threads)
    return threads


def _as_ids(news_ids, name: str) -> np.ndarray:
    """(n,) unicode array of news ids; rejects non-strings instead of converting them."""
    array = np.asarray(news_ids)
    if array.ndim != 1:
        if array.size == 0:
            return np.array([], dtype=str)
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.dtype.kind == "O":
        bad = next((i for i in array.tolist() if not isinstance(i, str)), None)
        if bad is not None:
            raise ValueError(f"{name} must be strings, got {bad!r}")
        array = array.astype(str) if len(array) else np.array([], dtype=str)
    elif array.dtype.kind != "U":
        if len(array) == 0:
            return np.array([], dtype=str)
        raise ValueError(f"{name} must be strings, got dtype {array.dtype}")
    if len(array) and (array == "").any():
        raise ValueError(f"{name} must not contain empty strings")
    return array


def _check_unique(ids: np.ndarray) -> None:
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) != len(ids):
        duplicates = unique[counts > 1][:5].tolist()
        raise ValueError(f"news ids must be unique, repeated: {duplicates}")


def _as_vectors(vectors, name: str, *, dim: int | None, rows: int | None) -> np.ndarray:
    """(n, dim) C-contiguous float32 array, checked for shape and finiteness."""
    array = np.ascontiguousarray(vectors, dtype=np.float32)
    want = f"({'n' if rows is None else rows}, {'dim' if dim is None else dim})"
    if array.ndim != 2 or (dim is not None and array.shape[1] != dim) or (rows is not None and len(array) != rows):
        raise ValueError(f"{name} must have shape {want}, got {array.shape}")
    if array.shape[1] == 0:
        raise ValueError(f"{name} must have at least one dimension, got shape {array.shape}")
    if not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise ValueError(f"{name} row {bad} holds NaN or infinity")
    return array


def _as_published(published, rows: int) -> np.ndarray:
    if published is None:
        return np.full(rows, np.datetime64("NaT"), dtype="datetime64[s]")
    array = np.asarray(published)
    if array.dtype.kind != "M" or array.shape != (rows,):
        raise ValueError(f"published must be datetime64 of shape ({rows},), got {array.dtype} of shape {array.shape}")
    return array.astype("datetime64[s]")


def _as_time(value) -> np.datetime64:
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    try:
        cutoff = np.datetime64(value, "s")
    except (TypeError, ValueError) as err:
        raise ValueError(f"published_after must be a datetime64, datetime or ISO string, got {value!r}") from err
    if np.isnat(cutoff):
        raise ValueError("published_after must be a time, got NaT")
    return cutoff


def _utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
