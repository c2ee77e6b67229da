"""Encode a catalogue of articles into ``ItemFeatures``, encoding only what the cache lacks."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.columns import ABSTRACT, CATEGORY, CONTENT_HASH, IMAGE_OK, IMAGE_PATH, IMAGE_STATUS, NEWS_ID, TITLE
from recsys.encoders.cache import FeatureCache
from recsys.encoders.item_features import EncoderInfo, ItemFeatures
from recsys.errors import DamagedFileError, ModelMismatchError, SchemaError
from recsys.interrupts import raise_if_terminated

REQUIRED_COLUMNS = (NEWS_ID, TITLE, ABSTRACT, CATEGORY, IMAGE_PATH, IMAGE_STATUS, CONTENT_HASH)
_ABSTRACT_SUFFIX = "+abstract"
log = logging.getLogger(__name__)


def text_info_for(info: EncoderInfo, *, use_abstract: bool) -> EncoderInfo:
    """The identity of the text column: title-only and title+abstract vectors differ."""
    return EncoderInfo(info.name + _ABSTRACT_SUFFIX, info.version, info.dim) if use_abstract else info


def article_text(title: object, abstract: object, *, use_abstract: bool) -> str:
    """``title`` or ``"title. abstract"``; missing values count as empty."""
    title = "" if pd.isna(title) else str(title).strip()
    abstract = "" if pd.isna(abstract) else str(abstract).strip()
    if not use_abstract or not abstract:
        return title
    if not title:
        return abstract
    return f"{title} {abstract}" if title[-1] in ".!?" else f"{title}. {abstract}"


def encode_items(
    news: pd.DataFrame,
    images_dir: Path | None,
    text_encoder,
    image_encoder,
    cache: FeatureCache | None = None,
    *,
    use_abstract: bool = False,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> ItemFeatures:
    """Frozen-encoder features of articles, row-aligned with ``news``.

    Articles whose (news id, content hash) is in ``cache`` are read from it (those of a cache
    shard found damaged on the way count as not cached, unless an older shard holds them
    too); the others are
    encoded in batches of ``batch_size`` and each batch is stored in the cache as soon as it
    is done, so memory stays bounded and an interrupted run resumes where it stopped. Images
    are encoded only where ``IMAGE_STATUS == "ok"``; an image that cannot be read or decoded
    now gives ``has_image`` False (and a zero row that must not be read as a picture), with a
    warning naming the file, and is not cached: ingest decoded it, so the file changed since,
    and a later call reads it again once it is restored.

    With ``use_abstract`` the text is ``"title. abstract"``; the text encoder's name gets a
    ``+abstract`` suffix in the result and such vectors are cached apart from title-only ones.

    Args:
        news: one row per article with columns NEWS_ID, TITLE, ABSTRACT, CATEGORY,
            IMAGE_PATH, IMAGE_STATUS, CONTENT_HASH (``recsys.columns``); ids unique.
        images_dir: the folder IMAGE_PATH is relative to; None when the paths are absolute.
        text_encoder: has ``info`` and ``encode(texts) -> (n, dim)`` (``TextEncoder``).
        image_encoder: has ``info`` and ``encode(paths) -> (features, ok)`` (``ImageEncoder``).
        cache: feature cache built for these two encoders; None encodes everything.
        use_abstract: append the abstract to the title.
        batch_size: articles per encoding step (and per cache shard).
        progress: called after each step with the number of articles that step completed;
            articles found in the cache are reported in one call first. The calls add up to
            ``len(news)``.

    Returns:
        ItemFeatures with n = len(news) rows in the order of ``news``. Image features of
        newly encoded articles come back with the cache's float16 rounding when a cache is
        used, so a first run and a cached rerun return identical arrays.

    Raises:
        SchemaError: a column is missing, a news id repeats, or a content hash is missing.
        ModelMismatchError: the cache was built for other encoders.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}, expected at least 1")
    _check_news(news)
    text_info = text_info_for(text_encoder.info, use_abstract=use_abstract)
    if cache is not None and (cache.text_info, cache.image_info) != (text_encoder.info, image_encoder.info):
        raise ModelMismatchError(
            f"feature cache {cache.path} is for encoders {cache.text_info.name} ({cache.text_info.version}) and "
            f"{cache.image_info.name} ({cache.image_info.version}), not {text_encoder.info.name} "
            f"({text_encoder.info.version}) and {image_encoder.info.name} ({image_encoder.info.version})"
        )
    n = len(news)
    ids = news[NEWS_ID].astype(str).to_numpy(dtype=object)
    # The cache key carries the text variant, so toggling use_abstract never reads stale text.
    keys = news[CONTENT_HASH].astype(str).to_numpy(dtype=object)
    if use_abstract:
        keys = np.array([k + _ABSTRACT_SUFFIX for k in keys], dtype=object)
    text = np.zeros((n, text_info.dim), dtype=np.float32)
    image = np.zeros((n, image_encoder.info.dim), dtype=np.float32)
    has_image = np.zeros(n, dtype=bool)
    cached = np.zeros(n, dtype=bool)
    if cache is not None:
        # Read first: articles of a shard found damaged are then encoded with the others.
        cached = _load_cached(cache, ids, keys, text, image, has_image)
    if progress is not None and cached.any():
        progress(int(cached.sum()))

    titles, abstracts = news[TITLE].to_numpy(dtype=object), news[ABSTRACT].to_numpy(dtype=object)
    image_paths = _image_paths(news, images_dir)
    todo = np.flatnonzero(~cached)
    unread_rows = []  # covers that failed this time: not cached
    for start in range(0, len(todo), batch_size):
        raise_if_terminated()  # a SIGTERM whose exception some library swallowed
        rows = todo[start : start + batch_size]
        batch_text = text_encoder.encode([article_text(titles[r], abstracts[r], use_abstract=use_abstract) for r in rows])
        batch_image, batch_ok = image_encoder.encode([image_paths[r] for r in rows])
        batch_text = np.asarray(batch_text, dtype=np.float32)
        batch_image = np.where(batch_ok[:, None], batch_image, 0.0).astype(np.float32)
        # Ingest decoded every "ok" cover, so one that fails now has changed since (copied
        # over in place, truncated, unmounted, an I/O error). The content hash still covers
        # the bytes ingest read: a cached "no image" would outlive the file's repair.
        unread = np.array([image_paths[r] is not None and not ok for r, ok in zip(rows, batch_ok)], dtype=bool)
        unread_rows.extend(rows[unread].tolist())
        if cache is not None:
            keep = ~unread
            cache.put(ids[rows[keep]], keys[rows[keep]], batch_text[keep], batch_image[keep], batch_ok[keep])
            batch_image = FeatureCache.as_stored(batch_image)  # as a cached rerun returns it
        text[rows], image[rows], has_image[rows] = batch_text, batch_image, batch_ok
        if progress is not None:
            progress(len(rows))
    if unread_rows:
        shown = ", ".join(str(image_paths[r]) for r in unread_rows[:5])
        more = f" and {len(unread_rows) - 5} more" if len(unread_rows) > 5 else ""
        log.warning(
            "%d cover images that ingest found usable cannot be read or decoded now (%s%s); those articles are "
            "encoded without an image this time and again at the next encode (each night refreshes the index until "
            "then; covers gone for good: ingest their news file again, which records them missing)",
            len(unread_rows), shown, more,
        )
    categories = news[CATEGORY].fillna("").astype(str).to_numpy(dtype=object)
    return ItemFeatures(ids, text, image, has_image, categories, text_info, image_encoder.info)


def _load_cached(cache: FeatureCache, ids: np.ndarray, keys: np.ndarray, text, image, has_image) -> np.ndarray:
    """Fill the rows cached with their content hash from ``cache``; returns which rows those are.

    A shard found unreadable on the way is left out by the cache: its articles are looked up
    again (an older shard may still hold them all with their current hash: two encoders that
    ran at once, a compaction killed before it deleted the old shards) and the rest is
    encoded by the caller. Each round leaves out one more shard, so this ends.
    """
    cached = cache.lookup(ids, keys)
    while cached.any():
        left_out = cache.num_left_out
        try:
            text[cached], image[cached], has_image[cached] = cache.load(ids[cached])
            return cached
        except DamagedFileError:
            # Progress is a shard left out, not fewer articles found: an older shard may hold
            # every one of them again.
            if cache.num_left_out == left_out:
                raise
            cached &= cache.lookup(ids, keys)
    return cached


def _check_news(news: pd.DataFrame) -> None:
    for column in REQUIRED_COLUMNS:
        if column not in news.columns:
            raise SchemaError("news table", None, column, "missing", f"a column '{column}' (have {list(news.columns)})")
    ids = news[NEWS_ID].astype(str)
    repeated = ids[ids.duplicated()]
    if len(repeated):
        row = int(np.flatnonzero(ids.duplicated().to_numpy())[0])
        raise SchemaError("news table", None, NEWS_ID, repeated.iloc[0], f"unique news ids (row {row} repeats it)")
    missing = news[CONTENT_HASH].isna().to_numpy()
    if missing.any():
        row = int(np.flatnonzero(missing)[0])
        raise SchemaError("news table", None, CONTENT_HASH, None, f"a content hash for news id {ids.iloc[row]!r}")


def _image_paths(news: pd.DataFrame, images_dir: Path | None) -> list[Path | None]:
    """Path of each article's cover, or None where ingest found no usable image."""
    paths: list[Path | None] = []
    for status, rel in zip(news[IMAGE_STATUS].to_numpy(dtype=object), news[IMAGE_PATH].to_numpy(dtype=object)):
        if status != IMAGE_OK or pd.isna(rel) or not str(rel):
            paths.append(None)
        else:
            paths.append(Path(images_dir) / str(rel) if images_dir is not None else Path(str(rel)))
    return paths
