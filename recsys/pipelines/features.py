"""Encode the catalogue with the configured frozen encoders, through the feature cache."""

from __future__ import annotations


import pandas as pd

from recsys.config import Config, Workspace
from recsys.encoders.item_features import ItemFeatures
from recsys.progress import progress

MAX_CACHE_SHARDS = 256


def build_encoders(config: Config, *, num_threads: int | None = None):
    """The text and image encoders named by ``[encoders]`` (bundled defaults when empty)."""
    from recsys.encoders.image import ImageEncoder
    from recsys.encoders.text import TextEncoder

    enc = config.encoders
    threads = num_threads or config.runtime.threads or None
    text = TextEncoder(enc.text_model or None, enc.tokenizer or None, max_length=enc.text_max_length, num_threads=threads)
    image = ImageEncoder(enc.image_model or None, image_size=enc.image_size, num_threads=threads)
    return text, image


def encode_news(news: pd.DataFrame, workspace: Workspace, config: Config, *, encoders=None) -> ItemFeatures:
    """Features of ``news`` rows (store columns), encoding only what the cache lacks.

    Image paths in the store are absolute (checked at ingest to lie inside the images folder).
    """
    from recsys.encoders.cache import FeatureCache
    from recsys.encoders.pipeline import encode_items

    text, image = encoders or build_encoders(config)
    cache = FeatureCache(workspace.features_dir, text.info, image.info)
    with progress("encoding articles", total=len(news)) as advance:
        features = encode_items(
            news, None, text, image, cache, use_abstract=config.encoders.use_abstract,
            batch_size=config.encoders.batch_size, progress=advance,
        )
    # Every night appends a small shard; merge them now and then so opening stays fast.
    if cache.num_shards > MAX_CACHE_SHARDS:
        cache.compact()
    return features


