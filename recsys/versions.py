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
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, insert, select, update

from recsys.atomic import atomic_open, remove_stale
from recsys.clock import utc_now
from recsys.errors import DamagedFileError, ModelMismatchError, NotFoundError
from recsys.store import schema as s
from recsys.store.database import PUBLISH_LOCK_KEY, serialized_transaction

MANIFEST = "manifest.json"
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
    database commit, the directory is an orphan that no reader ever sees.
    """
    write_json_atomic(staged / MANIFEST, manifest)
    final = models_dir / version
    os.replace(staged, final)
    # Serialised: two trainings publishing at once would each clear the flags the other had
    # not yet set (PostgreSQL, read committed) and both insert a current version.
    with serialized_transaction(engine, PUBLISH_LOCK_KEY) as conn:
        if make_current:
            conn.execute(update(s.model_versions).values(is_current=False))
        conn.execute(
            insert(s.model_versions).values(
                version=version, path=str(final), created_at=utc_now(), is_current=make_current, manifest=manifest
            )
        )
    return ModelVersion(version, final, manifest)


def get_version(engine: Engine, version: str | None = None) -> ModelVersion:
    """The named version, or the current one.

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
            raise NotFoundError(f"model version '{version}' does not exist (see the model_versions table)")
        raise NotFoundError("no current model version: run `recsys train` first")
    path = Path(row.path)
    if not (path / MANIFEST).exists():
        raise NotFoundError(f"model version '{row.version}' is registered but its directory {path} is missing")
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedFileError(f"{path / MANIFEST}: the manifest of model version '{row.version}' cannot be read "
                               f"({type(err).__name__}: {err}); train again, or restore the version's folder") from err
    if not isinstance(manifest, dict):
        raise DamagedFileError(f"{path / MANIFEST}: expected a JSON object, found {type(manifest).__name__}")
    return ModelVersion(row.version, path, manifest)


def list_versions(engine: Engine) -> list[dict]:
    mv = s.model_versions.c
    with engine.connect() as conn:
        rows = conn.execute(select(mv.version, mv.path, mv.created_at, mv.is_current, mv.manifest).order_by(mv.created_at)).all()
    return [dict(r._mapping) for r in rows]


def check_encoders(manifest: dict, text_info: dict, image_info: dict, *, what: str) -> None:
    """Refuse to combine a version with features from other encoders.

    Raises:
        ModelMismatchError: naming the encoder, the saved identity and the given one.
    """
    for key, given in (("text_encoder", text_info), ("image_encoder", image_info)):
        saved = manifest.get(key)
        if saved != given:
            # The text variant is part of the identity: a '+abstract' name is [encoders]
            # use_abstract = true, the version's '+len:N' is text_max_length = N.
            keys = " ([encoders] use_abstract and text_max_length)" if key == "text_encoder" else ""
            raise ModelMismatchError(
                f"{what} was built with {key} {saved}, but the configured encoder is {given}; "
                f"retrain, or configure the encoder the version was built with{keys}"
            )
