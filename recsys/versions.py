"""Model versions: one directory per version under ``<workspace>/models/`` plus a row in the
store's ``model_versions`` table. A version becomes visible (and current) only after its
directory is complete: it is written under a temporary name and renamed in one step.

Layout of a version directory::

    manifest.json      encoders, dims, training window, data counts, metrics, seed
    model/             the CTR model bundle (Keras files + config, see recsys.models.bundle)
    index/             the FAISS index and its id map (written by ``recsys index build``)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, insert, select, update

from recsys.atomic import atomic_open, remove_stale
from recsys.clock import utc_now
from recsys.errors import DamagedFileError, ModelMismatchError, NotFoundError
from recsys.store import schema as s
from recsys.store.database import PUBLISH_LOCK_KEY, serialized_transaction, shown_store, wait_for_transaction_lock

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# recsys.models.bundle.MODEL_FILES, named here so that `model list` and `model use` check a
# bundle without importing TensorFlow.
BUNDLE_MODEL_FILES = ("item_tower.keras", "user_encoder.keras", "scorer.keras")
# A staging folder unchanged this long belongs to a training killed before it published.
STALE_STAGING_SECONDS = 3600


@dataclass(frozen=True)
class ModelVersion:
    version: str
    path: Path
    manifest: dict

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def index_dir(self) -> Path:
        return self.path / "index"

    def field(self, key: str):
        """The manifest's ``key``.

        Raises:
            DamagedFileError: the manifest lacks it (edited by hand, or written by an older
                training), naming manifest.json and the key.
        """
        if key not in self.manifest:
            raise DamagedFileError(f"{self.path / MANIFEST}: key '{key}' is missing from the manifest of model version "
                                   f"'{self.version}'; train again, or restore the version's folder from a backup")
        return self.manifest[key]


def read_bundle_config(model_dir: Path) -> dict:
    """A model bundle's config.json, read without loading TensorFlow (see recsys.models.bundle):
    the nightly driver and the scoring commands read the side-feature window from it.

    Raises:
        NotFoundError: the bundle has no config.json.
        DamagedFileError: it is there but cannot be read (truncated, not JSON), as
            ``RankingModel.load`` reports it.
        ModelMismatchError: it lacks ``embedding_dim`` or ``side_features``.
    """
    path = model_dir / "config.json"
    if not path.is_file():
        raise NotFoundError(f"model bundle {model_dir} has no config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedFileError(f"{path}: the file is there but cannot be read as the model config ({type(exc).__name__}: "
                               f"{exc}); the model version is damaged: train again, or restore the version's folder "
                               "from a backup") from exc
    missing = [key for key in ("embedding_dim", "side_features") if key not in config]
    if missing:
        raise ModelMismatchError(f"{path}: keys {missing} are missing from the model config")
    return config


def check_bundle_files(model_dir: Path) -> dict:
    """A model bundle's config.json (``read_bundle_config``), after checking that each of its
    Keras files is there and is a zip archive, as every ``.keras`` file is. That reads each
    file's last bytes, not its weights: a deleted or truncated file is found by `model use`
    and `model list`, not by the nightly that loads it.

    Raises:
        NotFoundError: config.json or a Keras file is missing.
        DamagedFileError: config.json cannot be read, or a Keras file is not a zip archive
            (truncated, overwritten).
        ModelMismatchError: config.json lacks keys.
    """
    config = read_bundle_config(model_dir)
    for name in BUNDLE_MODEL_FILES:
        path = model_dir / name
        if not path.is_file():
            raise NotFoundError(f"model bundle {model_dir} has no {name}; the model version is damaged: train again, "
                                "or restore the version's folder from a backup")
        if not zipfile.is_zipfile(path):  # False as well when the file cannot be opened
            raise DamagedFileError(f"{path}: the file is there ({path.stat().st_size} bytes) but is not a .keras zip "
                                   "archive (truncated or overwritten); the model version is damaged: train again, or "
                                   "restore the version's folder from a backup")
    return config


def new_version_name() -> str:
    return utc_now().strftime("v%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def staging_dir(models_dir: Path, version: str) -> Path:
    """A fresh temporary directory in which a version is assembled (seconds before it is
    published); those of killed trainings older than ``STALE_STAGING_SECONDS`` are removed."""
    remove_stale(models_dir.glob(".tmp-*"), STALE_STAGING_SECONDS, why="staged by a training that did not finish")
    tmp = models_dir / f".tmp-{version}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_json_atomic(path: Path, obj: dict) -> None:
    with atomic_open(path, "w") as out:
        out.write(json.dumps(obj, indent=2, sort_keys=True, default=str))


def publish_version(engine: Engine, models_dir: Path, version: str, staged: Path, manifest: dict, *, make_current: bool = True) -> ModelVersion:
    """Rename the staged directory into place and register it (current if asked), atomically.

    The directory rename happens first; if the process dies between the rename and the
    database commit, the directory is an orphan that no reader ever sees. A registration that
    fails (a full store, say) removes the directory again before the error goes on, unless the
    store cannot tell whether the version was registered after all.
    """
    write_json_atomic(staged / MANIFEST, manifest)
    final = models_dir / version
    os.replace(staged, final)
    try:
        # Serialised: two trainings publishing at once would each clear the flags the other
        # had not yet set (PostgreSQL, read committed) and both insert a current version.
        with serialized_transaction(engine, PUBLISH_LOCK_KEY) as conn:
            if make_current:
                conn.execute(update(s.model_versions).values(is_current=False))
            conn.execute(
                insert(s.model_versions).values(
                    version=version, path=str(final), created_at=utc_now(), is_current=make_current, manifest=manifest
                )
            )
    except BaseException:
        _unpublish(engine, version, final)
        raise
    return ModelVersion(version, final, manifest)


def _unpublish(engine: Engine, version: str, final: Path) -> None:
    """Remove the folder of a version whose registration failed; kept when the store cannot
    say that it holds no such version (a commit whose connection dropped may have landed)."""
    try:
        with engine.connect() as conn:
            # A registration whose connection dropped may still be committing on the server: its
            # transaction holds this lock, so waiting for it lets its row be seen.
            wait_for_transaction_lock(conn, PUBLISH_LOCK_KEY)
            registered = conn.execute(select(s.model_versions.c.version).where(s.model_versions.c.version == version)).first()
    except Exception as exc:  # noqa: BLE001 - the registration's own error goes on
        log.warning("model version folder %s kept: its registration failed and the store cannot say whether it "
                    "holds the version (%s)", final, exc)
        return
    if registered is None:
        shutil.rmtree(final, ignore_errors=True)
        if final.exists():
            log.warning("could not remove %s, the folder of a model version whose registration failed", final)


def version_folder(version: str, recorded: str | Path, stored_manifest, models_dir: Path | None) -> Path:
    """The folder a command reads and writes for ``version``.

    The store records the absolute path the version was published at. When the workspace's own
    ``models_dir`` holds a folder of that name whose manifest is the store's copy of it (the
    workspace copied or moved together with its store: a staging copy, a restored backup), that
    folder is the version's: a copy that read the recorded path wrote its nightly articles into
    the original's index. Otherwise the recorded path (a version another workspace published in a
    store both use).

    Args:
        recorded: ``model_versions.path``.
        stored_manifest: ``model_versions.manifest``, the copy written at publishing.
        models_dir: the workspace's ``models/``; None: the recorded path.
    """
    recorded = Path(recorded)
    if models_dir is None:
        return recorded
    own = models_dir / version
    if own == recorded:
        return recorded
    try:
        manifest = json.loads((own / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return recorded  # no such folder here (or not one to trust): the recorded one's errors say more
    # As JSON text: key order aside, a copy's manifest is the store's to the character.
    if json.dumps(manifest, sort_keys=True) != json.dumps(stored_manifest, sort_keys=True, default=str):
        return recorded
    return own


def get_version(engine: Engine, version: str | None = None, *, models_dir: Path | None = None) -> ModelVersion:
    """The named version, or the current one; its folder as ``version_folder`` finds it in the
    workspace whose ``models_dir`` is given.

    Raises:
        NotFoundError: no such version, or no current version yet (train first).
    """
    mv = s.model_versions.c
    query = select(mv.version, mv.path, mv.manifest)
    # Newest first: a store written before publishing was serialised may hold two current rows.
    query = query.where(mv.version == version) if version else (
        query.where(mv.is_current.is_(True)).order_by(mv.created_at.desc(), mv.version.desc()).limit(1))
    with engine.connect() as conn:
        row = conn.execute(query).first()
    if row is None:
        if version:
            raise NotFoundError(f"model version '{version}' does not exist (see `recsys model list`)")
        with engine.connect() as conn:
            registered = conn.execute(select(mv.version).limit(1)).first() is not None
        # Named: a relative SQLite URL from a scheduler's temporary folder opens (or creates) another store.
        raise NotFoundError(f"no current model version in the store at {shown_store(engine.url)}: " + (
            "versions exist but none is current (trained with --keep-current?): `recsys model use VERSION` serves one "
            "(see `recsys model list`)" if registered else "run `recsys train` first"))
    path = version_folder(row.version, row.path, row.manifest, models_dir)
    return ModelVersion(row.version, path, read_manifest(row.version, path))


def read_manifest(version: str, path: Path) -> dict:
    """The manifest in a registered version's folder.

    Raises:
        NotFoundError: the folder (or its manifest) is missing.
        DamagedFileError: the manifest cannot be read as a JSON object.
    """
    if not (path / MANIFEST).exists():
        raise NotFoundError(f"model version '{version}' is registered but its directory {path} is missing")
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedFileError(f"{path / MANIFEST}: the manifest of model version '{version}' cannot be read "
                               f"({type(err).__name__}: {err}); train again, or restore the version's folder") from err
    if not isinstance(manifest, dict):
        raise DamagedFileError(f"{path / MANIFEST}: expected a JSON object, found {type(manifest).__name__}")
    return manifest


def list_versions(engine: Engine, *, models_dir: Path | None = None) -> list[dict]:
    """Every registered version's row (version, path, created_at, is_current, manifest), oldest
    first; ``path`` the folder ``version_folder`` finds in the workspace of ``models_dir``."""
    mv = s.model_versions.c
    with engine.connect() as conn:
        rows = conn.execute(select(mv.version, mv.path, mv.created_at, mv.is_current, mv.manifest)
                            .order_by(mv.created_at, mv.version)).all()
    return [{**r._mapping, "path": str(version_folder(r.version, r.path, r.manifest, models_dir))} for r in rows]


# How many version names a refusal lists (the newest); `recsys model list` shows them all.
SHOWN_VERSIONS = 10


def set_current(engine: Engine, version: str, *,
                encoders: tuple[dict, dict] | Callable[[], tuple[dict, dict]] | None = None,
                models_dir: Path | None = None) -> str | None:
    """Make ``version`` the one current version (``recsys model use``, a rollback); returns the
    version that was current before (None when none was). Using the current version again
    changes nothing but still leaves it the only current row.

    Under the publishing lock, so that a training publishing at the same moment cannot leave
    two current versions. Whether the version has an index is not checked: the next nightly
    (or ``recsys index build``) builds a missing one.

    Args:
        encoders: the configured ``(text_encoder, image_encoder)`` identities (``EncoderInfo``
            dicts), or a function giving them, called once the version is known to exist (it
            may open the encoders); a version built with other encoders is refused
            (``check_encoders``).
        models_dir: the workspace's ``models/``, where the version's folder is looked for first
            (``version_folder``).

    Raises:
        NotFoundError: no such version (the message lists the newest known ones), or its folder
            is missing.
        DamagedFileError: its manifest or its model's config.json cannot be read, or a Keras
            file of its model is not a zip archive (``check_bundle_files``).
        ModelMismatchError: it was built with other encoders than ``encoders``, or its model
            bundle lacks keys.
    """
    mv = s.model_versions.c
    with engine.connect() as conn:
        known = conn.execute(select(mv.version).order_by(mv.created_at, mv.version)).scalars().all()
    if version not in known:
        if not known:
            raise NotFoundError(f"model version '{version}' does not exist: the store holds no model version yet "
                                "(run `recsys train` first)")
        shown = ", ".join(known[-SHOWN_VERSIONS:])
        more = f" (the newest {SHOWN_VERSIONS} of {len(known)}; `recsys model list` shows them all)" \
            if len(known) > SHOWN_VERSIONS else " (see `recsys model list`)"
        raise NotFoundError(f"model version '{version}' does not exist; known versions: {shown}{more}")
    chosen = get_version(engine, version, models_dir=models_dir)
    # The nightly loads the model from this folder: a bundle without its config or with a
    # deleted or truncated Keras file would fail there, at night.
    check_bundle_files(chosen.model_dir)
    if encoders is not None:
        check_encoders(chosen, *(encoders() if callable(encoders) else encoders))
    with serialized_transaction(engine, PUBLISH_LOCK_KEY) as conn:
        # Newest first, as get_version reads it: an old store may hold two current rows.
        previous = conn.execute(select(mv.version).where(mv.is_current.is_(True))
                                .order_by(mv.created_at.desc(), mv.version.desc()).limit(1)).scalar_one_or_none()
        conn.execute(update(s.model_versions).where(mv.version != version).values(is_current=False))
        conn.execute(update(s.model_versions).where(mv.version == version).values(is_current=True))
    return previous


def check_encoders(mv: ModelVersion, text_info: dict, image_info: dict | None) -> None:
    """Refuse to combine a version with features from other encoders. ``image_info`` None: the
    image encoder is not compared (a custom image model, whose identity needs TensorFlow).

    Raises:
        ModelMismatchError: naming the encoder, the saved identity and the given one.
        DamagedFileError: the manifest records no identity (``ModelVersion.field``).
    """
    what = f"model version {mv.version}"
    for key, given in (("text_encoder", text_info), ("image_encoder", image_info)):
        saved = mv.field(key)
        if given is not None and saved != given:
            # The text variant is part of the identity: a '+abstract' name is [encoders]
            # use_abstract = true, the version's '+len:N' is text_max_length = N.
            keys = " ([encoders] use_abstract and text_max_length)" if key == "text_encoder" else ""
            raise ModelMismatchError(
                f"{what} was built with {key} {saved}, but the configured encoder is {given}; "
                f"retrain, or configure the encoder the version was built with{keys}"
            )


def describe_versions(engine: Engine, *, models_dir: Path | None = None) -> list[dict]:
    """One summary per registered version, oldest first (``recsys model list``): its training
    settings, window and validation metrics from the manifest, whether it is current and whether
    its index exists. A version whose folder is missing, or whose manifest or model bundle is
    damaged (``check_bundle_files``), is listed too, ``status`` "missing" or "damaged" with the
    reason in ``problem``; the figures of a version without a readable manifest come from the
    copy of the manifest in the store. ``path``: the folder ``version_folder`` finds in the
    workspace of ``models_dir``."""
    from recsys.index.faiss_index import FaissIndex

    out = []
    for row in list_versions(engine, models_dir=models_dir):
        path = Path(row["path"])
        status, problem = "ok", None
        try:
            manifest = read_manifest(row["version"], path)
        except (NotFoundError, DamagedFileError) as exc:
            status = "missing" if isinstance(exc, NotFoundError) else "damaged"
            problem, manifest = str(exc), row["manifest"] if isinstance(row["manifest"], dict) else {}
        else:
            try:
                check_bundle_files(ModelVersion(row["version"], path, manifest).model_dir)
            except (NotFoundError, DamagedFileError, ModelMismatchError) as exc:
                status, problem = "damaged", str(exc)
        window, metrics, data = (manifest.get(key) if isinstance(manifest.get(key), dict) else {}
                                 for key in ("training_window", "metrics", "data"))
        out.append({
            "version": row["version"],
            "created_at": row["created_at"].isoformat(sep=" ", timespec="seconds") if row["created_at"] else None,
            "current": bool(row["is_current"]),
            "status": status,
            "modalities": manifest.get("modalities"),
            "fusion": manifest.get("fusion"),
            "since": window.get("since"),
            "until": window.get("until"),
            "valid_start": window.get("valid_start"),
            "source": window.get("source"),
            "val_auc": metrics.get("val_auc"),
            # The served model's since 2026-12-07; before, the manifest recorded the networks'
            # under this name (0.265 where the served model scores 0.223): listed as that, so
            # that versions of both kinds are never compared on one column.
            "val_log_loss": metrics.get("val_log_loss") if "val_log_loss_networks" in metrics else None,
            "val_log_loss_networks": metrics.get("val_log_loss_networks", metrics.get("val_log_loss")),
            "best_epoch": metrics.get("best_epoch"),
            "train_impressions": data.get("train_impressions"),
            "valid_impressions": data.get("valid_impressions"),
            "valid_scoreable_impressions": data.get("valid_scoreable_impressions"),  # None before it was recorded
            "index": status != "missing" and FaissIndex.exists(ModelVersion(row["version"], path, manifest).index_dir),
            "path": str(path),
            "problem": problem,
        })
    return out
