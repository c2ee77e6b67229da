"""`recsys index build` and `recsys similar`: item embeddings of the catalogue in FAISS."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import Engine

from recsys import release
from recsys.columns import CATEGORY, CONTENT_HASH, IMAGE_OK, IMAGE_STATUS, NEWS_ID, TITLE
from recsys.config import Config, Workspace
from recsys.errors import ConfigError, NotFoundError, RecsysError
from recsys.pipelines.features import first_seen_array, load_catalogue, load_version_model
from recsys.store import repository as repo
from recsys.threads import configure_threads
from recsys.versions import ModelVersion, get_version, list_versions

log = logging.getLogger("recsys.index")

# The index manifest's record of the store's catalogue (and settings) that its last save read.
CATALOGUE_STATE = "catalogue_state"
# Libraries whose release can move the embeddings or the index file: a new one refreshes once.
_EMBEDDING_LIBRARIES = ("tensorflow", "keras", "faiss-cpu", "onnxruntime", "tokenizers", "numpy")


def published_times(engine: Engine, news: pd.DataFrame, *, models_dir: Path | None = None) -> np.ndarray:
    """(n,) datetime64[s] publication stand-in: first shown or listed in a History, else the
    time an index first stamped it, else "now" of the store.

    MIND has no publication time. An article never shown or listed yet is new: the first
    index that holds it stamps it with the store's latest impression time, so the freshness
    filter keeps it, and it ages from there. A full build (a new model version's index, or
    `recsys index build`) reads that stamp back from the indexes already saved (the earliest,
    where several hold it): stamped anew, every never-shown article of the back catalogue was
    fresh again after each retraining. The indexes are read where ``version_folder`` finds
    them in the workspace of ``models_dir``.
    """
    first_seen = first_seen_array(news)
    _, latest = repo.time_range(engine)
    now = np.datetime64(latest, "s") if latest is not None else np.datetime64("now", "s")
    unseen = np.isnat(first_seen)
    stamped = np.full(len(news), np.datetime64("NaT", "s"))
    if unseen.any():
        saved = [_saved_stamps(ModelVersion(v["version"], Path(v["path"]), v["manifest"]))
                 for v in list_versions(engine, models_dir=models_dir)]
        stamps = [pd.Series(published, index=ids) for ids, published in filter(None, saved)]
        if stamps:
            earliest = pd.concat(stamps).groupby(level=0).min()
            stamped[unseen] = earliest.reindex(news[NEWS_ID].to_numpy()[unseen]).to_numpy(dtype="datetime64[s]")
    return np.where(unseen, np.where(np.isnat(stamped), now, stamped), first_seen)


def _saved_stamps(mv: ModelVersion) -> tuple[np.ndarray, np.ndarray] | None:
    """``read_published`` of one version's index; None, with a warning, when it cannot be read:
    another version's damaged index (a candidate's, an old one's) must not stop the night."""
    from recsys.index.folder import IndexFormatError, read_published

    try:
        return read_published(mv.index_dir)
    except IndexFormatError as exc:
        log.warning("the index of model version %s cannot be read (%s): its first-seen stamps of never-shown articles "
                    "are not reused; rebuild it with `recsys index build --model %s`", mv.version, exc, mv.version)
        return None


def catalogue_state(news: pd.DataFrame, config: Config) -> str:
    """Digest of all that a refresh of a version's index reads besides the version itself:
    each article's id, cover status, content hash and first-seen time (``read_news_state``'s
    columns, in its order), the ``[index]`` and ``[encoders]`` settings with a custom image
    model's file content, and the running code (``release``) and libraries.

    ``refresh_index`` and ``index build`` record it in the index manifest; a night that finds
    the store's digest equal to it has nothing to encode, embed, restamp or rebuild
    (``nightly.index_is_current``). A custom image model is identified by its file, since the
    job checks only that file's presence before its ingest; the refresh checks its identity.
    """
    from recsys.encoders.text import file_sha256

    frame = pd.DataFrame({
        NEWS_ID: news[NEWS_ID], IMAGE_STATUS: news[IMAGE_STATUS], CONTENT_HASH: news[CONTENT_HASH],
        "first_seen": first_seen_array(news).astype("int64"),  # NaT reads as int64's minimum
    })
    image_model = Path(config.encoders.image_model) if config.encoders.image_model else None
    settings = {
        "code": release(), "libraries": {name: _installed(name) for name in _EMBEDDING_LIBRARIES},
        "index": dataclasses.asdict(config.index), "encoders": dataclasses.asdict(config.encoders),
        "image_model_sha256": file_sha256(image_model) if image_model and image_model.is_file() else None,
        "articles": len(frame),
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    # A fixed hash key: the same rows give the same digest in every process.
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def recorded_state(news: pd.DataFrame, features, config: Config) -> str | None:
    """The ``catalogue_state`` an index embedded from ``features`` (rows of ``news``) records:
    None when a cover that ingest found usable could not be read for them (moved, unmounted, an
    I/O error). ``encode_items`` caches no such row and encodes it again at its next call, but
    the store's digest is unchanged, so a recorded digest would have let every night skip the
    refresh and serve the article's no-cover vector until some other article changed. None
    matches no store: the next night refreshes and reads the cover again."""
    unread = (news[IMAGE_STATUS].to_numpy(dtype=object) == IMAGE_OK) & ~features.has_image
    return None if unread.any() else catalogue_state(news, config)


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def index_manifest(mv: ModelVersion) -> dict:
    """What a version's index must have been built with; a manifest lacking a key is named
    (``ModelVersion.field``), not a KeyError."""
    return {"model_version": mv.version, **{key: mv.field(key) for key in ("text_encoder", "image_encoder", "embedding_dim")}}


def run_index_build(engine: Engine, workspace: Workspace, config: Config, *, version: str | None = None) -> dict:
    """Embed every article with the version's item tower and write ``<version>/index``.

    The save holds the store's lock, as the nightly job and the ingest do: a build that swapped
    the index under a night's ranking failed the run, and one that saved beside the night's
    index refresh could crash both saves. The encoding before it (hours for a cold cache at
    MIND size) does not, so no night or ingest is refused meanwhile.

    Raises:
        RunLockedError: a nightly job or an ingest held the lock when the index was ready;
            nothing was written.
        RecsysError: another job saved the version's index after this build began; nothing
            was written.
    """
    from recsys.errors import RunLockedError
    from recsys.index.faiss_index import FaissIndex
    from recsys.ranking.lock import NIGHTLY_LOCK, acquire_lock

    configure_threads(config.runtime.threads or None)
    mv = get_version(engine, version, models_dir=workspace.models_dir)
    found = FaissIndex.save_identity(mv.index_dir)  # the save this build would replace
    t0 = time.perf_counter()
    news, features = load_catalogue(engine, workspace, config, versions=[mv])
    model = load_version_model(mv, features)
    embeddings = model.item_embeddings(features)
    t_embed = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = FaissIndex.build(
        features.news_ids, embeddings, published=published_times(engine, news, models_dir=workspace.models_dir),
        kind=config.index.kind, exact_max_items=config.index.exact_max_items, num_threads=config.runtime.threads or None,
    )
    try:
        with acquire_lock(engine, NIGHTLY_LOCK):
            if FaissIndex.save_identity(mv.index_dir) != found:
                # A night refreshed it while this build read the store: it may hold articles
                # ingested since, which this older snapshot would drop until the next night.
                raise RecsysError(
                    f"the index of model version {mv.version} was saved by another job (a nightly refresh) after "
                    "this build began: nothing was saved, as it may hold articles this build did not read; run "
                    "`recsys index build` again")
            index.save(mv.index_dir, manifest_extra={**index_manifest(mv), CATALOGUE_STATE: recorded_state(news, features, config)})
    except RunLockedError as exc:
        raise RunLockedError(f"{exc}; the index of model version {mv.version} was built but not saved: run "
                             "`recsys index build` again once that run ends") from exc
    t_build = time.perf_counter() - t0
    log.info("index of %d articles (%s) written to %s", len(index), index.kind, mv.index_dir)
    return {
        "version": mv.version, "path": str(mv.index_dir), "items": len(index), "kind": index.kind,
        "embed_s": round(t_embed, 2), "build_s": round(t_build, 2),
    }


def load_index(mv: ModelVersion, *, num_threads: int | None = None, current: bool = True):
    """The version's FAISS index, refusing one built for other encoders or dims. ``current``:
    the version is the one the nightly serves (and so refreshes), said in the errors.

    Raises:
        NotFoundError: the version has no index (none, or an emptied folder).
        IndexFormatError: its index is damaged; the message says how to build it again.
        IndexBusyError: saves replaced it during every read.
        ModelMismatchError: its index was built for other encoders or dims.
    """
    from recsys.index import FaissIndex, IndexFormatError

    build = f"`recsys index build --model {mv.version}`" + (" (the next nightly also builds it)" if current else "")
    no_index = NotFoundError(f"model version {mv.version} has no index yet: run {build}")
    try:  # no exists() first: it reads path by path, and a save under way would read as "no index"
        return FaissIndex.load(mv.index_dir, expected=index_manifest(mv), num_threads=num_threads)
    except NotFoundError:
        raise no_index from None
    except IndexFormatError as exc:
        if mv.index_dir.is_dir() and not any(mv.index_dir.iterdir()):  # emptied by hand
            raise no_index from None
        raise IndexFormatError(f"{exc}; build it again with {build}") from exc


def run_similar(engine: Engine, workspace: Workspace, *, news_id: str, k: int, version: str | None = None,
                num_threads: int | None = None) -> list[dict]:
    """The ``k`` articles nearest to ``news_id`` (itself excluded), best first; FAISS runs on
    ``num_threads`` (``[runtime] threads``; None: every core)."""
    if k < 1:
        raise ConfigError(f"k is {k}, expected at least 1")
    mv = get_version(engine, version, models_dir=workspace.models_dir)
    try:
        current = mv.version == get_version(engine, models_dir=workspace.models_dir).version
    except NotFoundError:  # no version is current yet
        current = False
    index = load_index(mv, num_threads=num_threads, current=current)
    if news_id not in index:
        # A typo and an article ingested since the index was refreshed call for different things.
        stored = not repo.read_news_titles(engine, [news_id]).empty
        adds = "the next nightly adds it, or run " if current else "run "
        raise NotFoundError(
            f"news id '{news_id}' is not in the index of model version {mv.version}: "
            + (f"the store holds it, ingested since the index was last refreshed; {adds}"
               f"`recsys index build --model {mv.version}`" if stored else "the store holds no article with that id")
        )
    hits = index.search(index.vector(news_id)[None, :], k, exclude=[{news_id}])[0]
    meta = repo.read_news_titles(engine, hits.news_ids)
    return [
        {"rank": rank, "news_id": nid, "score": float(score), "title": meta.at[nid, TITLE], "category": meta.at[nid, CATEGORY]}
        for rank, (nid, score) in enumerate(hits, start=1)
    ]
