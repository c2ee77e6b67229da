"""The catalogue as the commands read it: the store's articles, encoded with the configured
frozen encoders through the feature cache, and the model version that embeds them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import Engine

from recsys.columns import CATEGORY, FIRST_SEEN_AT, SUBCATEGORY
from recsys.config import Config, Workspace
from recsys.encoders.item_features import ItemFeatures
from recsys.errors import RecsysError
from recsys.progress import progress
from recsys.store import repository as repo
from recsys.versions import ModelVersion, check_encoders

MAX_CACHE_SHARDS = 256


def build_encoders(config: Config, *, num_threads: int | None = None):
    """The text and image encoders named by ``[encoders]`` (bundled defaults when empty)."""
    from recsys.encoders.image import ImageEncoder

    enc = config.encoders
    threads = num_threads or config.runtime.threads or None
    return _text_encoder(config, threads), ImageEncoder(enc.image_model or None, image_size=enc.image_size, num_threads=threads)


def _text_encoder(config: Config, num_threads: int | None):
    """The text encoder ``[encoders]`` names: one construction, so that the identity ``model use``
    checks and the one features are cached under cannot drift apart."""
    from recsys.encoders.text import TextEncoder

    enc = config.encoders
    return TextEncoder(enc.text_model or None, enc.tokenizer or None, max_length=enc.text_max_length, num_threads=num_threads)


def configured_encoder_infos(config: Config, *, load_image_model: bool = True) -> tuple[dict, dict | None]:
    """The ``(text_encoder, image_encoder)`` identities that ``[encoders]`` gives the features, as
    ``versions.check_encoders`` compares them with a version's manifest; nothing is encoded.

    The text encoder is opened (onnxruntime, a fraction of a second); the default image
    encoder's identity is known without TensorFlow, a custom image model is loaded to read its
    output size, or with ``load_image_model=False`` only its file is checked (image identity None).
    """
    from recsys.encoders.image import ImageEncoder
    from recsys.encoders.pipeline import text_info_for

    enc = config.encoders
    text = _text_encoder(config, 1)
    if enc.image_model and not load_image_model:
        ImageEncoder.check_file(Path(enc.image_model))
        image = None
    elif enc.image_model:
        image = ImageEncoder(enc.image_model, image_size=enc.image_size, num_threads=config.runtime.threads or None).info
    else:
        image = ImageEncoder.default_info(enc.image_size)
    return text_info_for(text.info, use_abstract=enc.use_abstract).to_dict(), image and image.to_dict()


def encode_news(news: pd.DataFrame, workspace: Workspace, config: Config, *, encoders=None,
                versions: Sequence[ModelVersion] = ()) -> ItemFeatures:
    """Features of ``news`` rows (store columns), encoding only what the cache lacks.

    Image paths in the store are absolute (checked at ingest to lie inside the images folder).

    Args:
        versions: model versions the features are for: one built with other encoders is
            refused before anything is encoded (a whole catalogue takes minutes to hours).

    Raises:
        ModelMismatchError: a version of ``versions`` was built with other encoders.
    """
    from recsys.encoders.cache import FeatureCache
    from recsys.encoders.pipeline import encode_items, text_info_for

    text, image = encoders or build_encoders(config)
    for mv in versions:
        check_encoders(mv, text_info_for(text.info, use_abstract=config.encoders.use_abstract).to_dict(),
                       image.info.to_dict())
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


def load_catalogue(engine: Engine, workspace: Workspace, config: Config, *,
                   versions: Sequence[ModelVersion] = ()) -> tuple[pd.DataFrame, ItemFeatures]:
    """The store's articles (``repository.read_news``) and their features, row-aligned;
    ``versions`` as in ``encode_news``."""
    news = repo.read_news(engine)
    if news.empty:
        raise RecsysError("the store holds no articles: run `recsys ingest --news news.tsv` first")
    return news, encode_news(news, workspace, config, versions=versions)


def item_key_codes(news: pd.DataFrame) -> np.ndarray:
    """(n, 2) int64 codes of the articles' categories and subcategories, row-aligned with
    ``news`` (the category affinity's keys, ``recsys.models.affinity``)."""
    from recsys.models.affinity import key_codes

    return key_codes(news[CATEGORY], news[SUBCATEGORY])


def first_seen_array(news: pd.DataFrame) -> np.ndarray:
    """(n,) datetime64[s] first time each article was shown or listed in a History; NaT when never."""
    return pd.to_datetime(news[FIRST_SEEN_AT]).to_numpy().astype("datetime64[s]")


def load_version_model(mv: ModelVersion, features: ItemFeatures):
    """The version's ``RankingModel``, refusing features from other encoders."""
    from recsys.models.bundle import RankingModel

    return RankingModel.load(mv.model_dir, text_encoder=features.text_encoder, image_encoder=features.image_encoder)
