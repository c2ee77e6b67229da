"""Model version folders: staging leaves nothing behind for ever."""

from __future__ import annotations

import json
import os
import threading
import time

from sqlalchemy import select, update

from recsys import atomic, versions
from recsys.store import schema


def test_staging_removes_the_folders_of_killed_trainings_after_an_hour(tmp_path, monkeypatch):
    models = tmp_path / "models"
    killed = versions.staging_dir(models, "v20261101-000000-aaaaaa")
    (killed / "model").mkdir()
    (killed / "model" / "scorer.keras").write_bytes(b"weights")
    published = models / "v20261031-000000-bbbbbb"
    published.mkdir()
    versions.staging_dir(models, "v20261101-000100-cccccc")
    assert killed.exists()  # young: that training may be saving right now

    later = time.time() + versions.STALE_STAGING_SECONDS + 60
    monkeypatch.setattr(atomic.time, "time", lambda: later)
    saving = models / ".tmp-v20261101-000100-cccccc"
    os.utime(saving, (later - 5, later - 5))  # another training still writing into its folder
    fresh = versions.staging_dir(models, "v20261101-010000-dddddd")
    assert not killed.exists()
    assert saving.exists() and published.exists() and fresh.is_dir()


def _stage(models, version: str):
    staged = versions.staging_dir(models, version)
    (staged / "model").mkdir()
    return staged


def test_two_trainings_publishing_at_once_leave_one_current_version(engine, tmp_path, monkeypatch):
    models = tmp_path / "models"
    versions.publish_version(engine, models, "v0", _stage(models, "v0"), {"seed": 0})
    # The first publisher pauses between clearing the flags and inserting its row (where it
    # reads the clock), while the second one starts publishing.
    first_cleared, real_utcnow = threading.Event(), versions.utc_now

    def slow_utcnow():
        if threading.current_thread().name == "first":
            first_cleared.set()
            time.sleep(1.0)
        return real_utcnow()

    monkeypatch.setattr(versions, "utc_now", slow_utcnow)
    errors = []

    def publish(version):
        try:
            versions.publish_version(engine, models, version, _stage(models, version), {"seed": 1})
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    first = threading.Thread(target=publish, args=("v1",), name="first")
    second = threading.Thread(target=publish, args=("v2",), name="second")
    first.start()
    assert first_cleared.wait(10)
    second.start()
    first.join(30)
    second.join(30)
    assert errors == []
    mv = schema.model_versions.c
    with engine.connect() as conn:
        current = conn.execute(select(mv.version).where(mv.is_current.is_(True))).scalars().all()
    assert current == ["v2"]  # the later publisher's, alone
    assert versions.get_version(engine).version == "v2"


def test_current_version_is_the_newest_when_an_old_store_holds_two(engine, tmp_path):
    models = tmp_path / "models"
    for version in ("v1", "v2"):
        versions.publish_version(engine, models, version, _stage(models, version), {"seed": 0})
    with engine.begin() as conn:  # as an unserialised publish could have left it
        conn.execute(update(schema.model_versions).values(is_current=True))
    assert versions.get_version(engine).version == "v2"


def test_a_truncated_version_manifest_is_named_as_damaged(engine, tmp_path):
    # It gave a bare JSONDecodeError (exit 2) naming no file.
    import pytest

    from recsys.errors import DamagedFileError

    models = tmp_path / "models"
    versions.publish_version(engine, models, "v1", _stage(models, "v1"), {"seed": 0, "modalities": "text,image"})
    manifest = versions.get_version(engine, "v1").path / versions.MANIFEST
    manifest.write_text(manifest.read_text()[:10])
    with pytest.raises(DamagedFileError, match=rf"{manifest}: the manifest of model version 'v1' cannot be read \(JSONDecodeError"):
        versions.get_version(engine, "v1")


# --- choosing the current version (`recsys model use`) -----------------------------------

TEXT = {"name": "all-MiniLM-L6-v2-int8+abstract", "version": "tok+len:128", "dim": 384}
IMAGE = {"name": "mobilenet_v1_1.0_imagenet", "version": "nudity==0.2.3+px:224", "dim": 1024}


def _publish(engine, models, version: str, *, make_current: bool = True, **manifest):
    """A version as a training publishes it; its Keras files are empty zip archives (what
    ``check_bundle_files`` reads of them)."""
    import zipfile

    staged = _stage(models, version)
    (staged / "model" / "config.json").write_text('{"embedding_dim": 8, "side_features": {}}')
    for name in versions.BUNDLE_MODEL_FILES:
        zipfile.ZipFile(staged / "model" / name, "w").close()
    manifest = {"text_encoder": TEXT, "image_encoder": IMAGE, "modalities": "text,image", "fusion": "gated", **manifest}
    return versions.publish_version(engine, models, version, staged, manifest, make_current=make_current)


def _current(engine) -> list[str]:
    mv = schema.model_versions.c
    with engine.connect() as conn:
        return conn.execute(select(mv.version).where(mv.is_current.is_(True))).scalars().all()


def test_set_current_rolls_back_to_an_older_version_and_leaves_it_the_only_current_one(engine, tmp_path):
    models = tmp_path / "models"
    for version in ("v1", "v2", "v3"):
        _publish(engine, models, version)
    assert versions.set_current(engine, "v1", encoders=(TEXT, IMAGE)) == "v3"
    assert _current(engine) == ["v1"]
    assert versions.get_version(engine).version == "v1"  # what the next nightly, predict and evaluate read
    # Again: nothing changes, and it says which was current.
    assert versions.set_current(engine, "v1") == "v1"
    assert _current(engine) == ["v1"]


def test_set_current_leaves_one_current_row_in_a_store_that_holds_two(engine, tmp_path):
    models = tmp_path / "models"
    for version in ("v1", "v2"):
        _publish(engine, models, version)
    with engine.begin() as conn:  # as an unserialised publish could have left it
        conn.execute(update(schema.model_versions).values(is_current=True))
    assert versions.set_current(engine, "v2") == "v2"
    assert _current(engine) == ["v2"]


def test_set_current_refuses_an_unknown_version_naming_it_and_the_known_ones(engine, tmp_path):
    import pytest

    from recsys.errors import NotFoundError

    with pytest.raises(NotFoundError, match=r"model version 'v9' does not exist: the store holds no model version yet"):
        versions.set_current(engine, "v9")
    models = tmp_path / "models"
    for version in ("v1", "v2"):
        _publish(engine, models, version)
    with pytest.raises(NotFoundError, match=r"^model version 'v9' does not exist; known versions: v1, v2 \(see `recsys model list`\)$"):
        versions.set_current(engine, "v9")
    assert _current(engine) == ["v2"]


def test_set_current_refuses_a_version_whose_folder_or_model_is_gone(engine, tmp_path):
    import shutil

    import pytest

    from recsys.errors import DamagedFileError, NotFoundError

    models = tmp_path / "models"
    for version in ("v1", "v2", "v3", "v4"):
        _publish(engine, models, version)
    shutil.rmtree(models / "v1")
    with pytest.raises(NotFoundError, match=rf"model version 'v1' is registered but its directory {models / 'v1'} is missing"):
        versions.set_current(engine, "v1")
    (models / "v2" / versions.MANIFEST).write_text("{")
    with pytest.raises(DamagedFileError, match=r"the manifest of model version 'v2' cannot be read"):
        versions.set_current(engine, "v2")
    (models / "v3" / "model" / "config.json").unlink()  # the nightly could not load the model
    with pytest.raises(NotFoundError, match=rf"model bundle {models / 'v3' / 'model'} has no config.json"):
        versions.set_current(engine, "v3")
    assert _current(engine) == ["v4"]


def test_a_version_with_a_deleted_or_truncated_model_file_is_refused_and_listed_as_damaged(engine, tmp_path):
    # `model use` and `model list` accepted it; the nightly then failed at night.
    import pytest

    from recsys.errors import DamagedFileError, NotFoundError

    models = tmp_path / "models"
    for version in ("v1", "v2", "v3"):
        _publish(engine, models, version)
    (models / "v1" / "model" / "scorer.keras").unlink()
    truncated = models / "v2" / "model" / "item_tower.keras"
    truncated.write_bytes(truncated.read_bytes()[:10])
    with pytest.raises(NotFoundError, match=rf"^model bundle {models / 'v1' / 'model'} has no scorer.keras; the model "
                                            r"version is damaged"):
        versions.set_current(engine, "v1")
    with pytest.raises(DamagedFileError, match=rf"^{truncated}: the file is there \(10 bytes\) but is not a .keras zip "
                                               r"archive \(truncated or overwritten\)"):
        versions.set_current(engine, "v2")
    assert _current(engine) == ["v3"]
    rows = versions.describe_versions(engine)
    assert [(r["version"], r["status"]) for r in rows] == [("v1", "damaged"), ("v2", "damaged"), ("v3", "ok")]
    assert "has no scorer.keras" in rows[0]["problem"] and str(truncated) in rows[1]["problem"]
    assert rows[0]["modalities"] == "text,image"  # the manifest still reads: its figures are shown


def test_a_manifest_missing_a_key_is_named_not_a_key_error(engine, tmp_path):
    # `recsys similar` said "internal error: KeyError: 'text_encoder'" (exit 2).
    import pytest

    from recsys.errors import DamagedFileError
    from recsys.pipelines.index import index_manifest

    models = tmp_path / "models"
    _publish(engine, models, "v1", embedding_dim=8)
    _publish(engine, models, "v2")
    assert index_manifest(versions.get_version(engine, "v1")) == {
        "model_version": "v1", "text_encoder": TEXT, "image_encoder": IMAGE, "embedding_dim": 8}
    manifest = models / "v1" / versions.MANIFEST
    edited = json.loads(manifest.read_text())
    del edited["text_encoder"]
    manifest.write_text(json.dumps(edited))
    named = rf"^{manifest}: key 'text_encoder' is missing from the manifest of model version 'v1'; train again"
    with pytest.raises(DamagedFileError, match=named):
        index_manifest(versions.get_version(engine, "v1"))
    with pytest.raises(DamagedFileError, match=named):  # it said "built with text_encoder None"
        versions.set_current(engine, "v1", encoders=(TEXT, IMAGE))
    with pytest.raises(DamagedFileError, match=rf"^{models / 'v2' / versions.MANIFEST}: key 'embedding_dim' is missing"):
        index_manifest(versions.get_version(engine, "v2"))
    assert _current(engine) == ["v2"]


def test_set_current_refuses_a_version_built_with_other_encoders(engine, tmp_path):
    import pytest

    from recsys.errors import ModelMismatchError

    models = tmp_path / "models"
    _publish(engine, models, "v1")
    _publish(engine, models, "v2")
    titles_only = {**TEXT, "name": "all-MiniLM-L6-v2-int8"}
    with pytest.raises(ModelMismatchError, match=r"model version v1 was built with text_encoder .*int8\+abstract'.* but the "
                                                 r"configured encoder is .*use_abstract and text_max_length"):
        versions.set_current(engine, "v1", encoders=(titles_only, IMAGE))
    with pytest.raises(ModelMismatchError, match=r"model version v1 was built with image_encoder"):
        versions.set_current(engine, "v1", encoders=(TEXT, {**IMAGE, "version": "nudity==0.2.3+px:160"}))
    assert _current(engine) == ["v2"]


def test_a_version_published_without_making_it_current_leaves_the_current_one(engine, tmp_path):
    # `recsys train --keep-current`: a candidate, served only after `recsys model use`.
    models = tmp_path / "models"
    _publish(engine, models, "v1")
    _publish(engine, models, "v2", make_current=False)
    assert _current(engine) == ["v1"] and versions.get_version(engine).version == "v1"
    assert versions.get_version(engine, "v2").version == "v2"
    assert versions.set_current(engine, "v2") == "v1"
    assert versions.get_version(engine).version == "v2"


def test_describe_versions_lists_every_version_even_a_missing_or_damaged_one(engine, tmp_path):
    import shutil

    models = tmp_path / "models"
    window = {"since": "2019-11-09T00:00:00", "valid_start": "2019-11-13T00:00:00", "until": "2019-11-14T00:00:00",
              "source": None}
    _publish(engine, models, "v1", training_window=window, metrics={"val_auc": 0.61, "best_epoch": 2},
             data={"train_impressions": 100, "valid_impressions": 20, "valid_scoreable_impressions": 17})
    _publish(engine, models, "v2", fusion="concat", metrics={"val_auc": 0.63, "val_log_loss": 0.2654})
    _publish(engine, models, "v3", modalities="text")
    _publish(engine, models, "v4", make_current=False)
    import numpy as np

    from recsys.index import FaissIndex

    FaissIndex.build(np.array(["N1", "N2"]), np.eye(2, 4, dtype=np.float32), num_threads=1).save(models / "v1" / "index")
    (models / "v4" / "index").mkdir()  # an emptied folder holds no index
    (models / "v2" / versions.MANIFEST).write_text("[1]")
    shutil.rmtree(models / "v3")
    rows = versions.describe_versions(engine)
    assert [(r["version"], r["current"], r["status"], r["index"]) for r in rows] == [
        ("v1", False, "ok", True), ("v2", False, "damaged", False), ("v3", True, "missing", False), ("v4", False, "ok", False)]
    first = rows[0]
    assert (first["modalities"], first["fusion"], first["since"], first["until"], first["val_auc"], first["best_epoch"],
            first["train_impressions"]) == ("text,image", "gated", window["since"], window["until"], 0.61, 2, 100)
    # A version trained before 2026-12-07 recorded its networks' log loss as val_log_loss: listed
    # as what it is, not next to the served figures of newer versions.
    assert [(r["val_log_loss"], r["val_log_loss_networks"]) for r in rows[:2]] == [(None, None), (None, 0.2654)]
    _publish(engine, models, "v5", metrics={"val_log_loss": 0.2232, "val_log_loss_networks": 0.2654})
    assert [(r["val_log_loss"], r["val_log_loss_networks"]) for r in versions.describe_versions(engine)
            if r["version"] == "v5"] == [(0.2232, 0.2654)]
    # What val_auc averages over; None for a version trained before it was recorded.
    assert (first["valid_scoreable_impressions"], rows[3]["valid_scoreable_impressions"]) == (17, None)
    # A damaged or missing folder: the reason, and the figures of the store's copy of the manifest.
    assert "expected a JSON object, found list" in rows[1]["problem"] and rows[1]["fusion"] == "concat"
    assert "is missing" in rows[2]["problem"] and rows[2]["modalities"] == "text"
    assert rows[0]["problem"] is None and rows[0]["created_at"] <= rows[3]["created_at"]


def test_set_current_reads_the_encoders_only_for_a_version_that_exists(engine, tmp_path):
    # A typo paid for opening the encoders first, and a broken [encoders] setting then hid the
    # typo behind its own error.
    import pytest

    from recsys.errors import ConfigError, NotFoundError

    _publish(engine, tmp_path / "models", "v1")
    asked = []

    def encoders():
        asked.append(True)
        raise ConfigError("text model file /nope/model.onnx does not exist")

    with pytest.raises(NotFoundError, match="model version 'v9' does not exist"):
        versions.set_current(engine, "v9", encoders=encoders)
    assert not asked
    with pytest.raises(ConfigError, match="/nope/model.onnx"):
        versions.set_current(engine, "v1", encoders=encoders)
    assert versions.set_current(engine, "v1", encoders=lambda: (TEXT, IMAGE)) == "v1"


def test_no_current_version_points_at_model_use_when_versions_exist(engine, tmp_path):
    import pytest

    from recsys.errors import NotFoundError

    import re

    from recsys.store.database import mask_url

    store = re.escape(mask_url(engine.url))
    with pytest.raises(NotFoundError, match=rf"^no current model version in the store at {store}: run `recsys train` first$"):
        versions.get_version(engine)
    _publish(engine, tmp_path / "models", "v1", make_current=False)  # a first `train --keep-current`
    with pytest.raises(NotFoundError, match=r"none is current .*`recsys model use VERSION` serves one"):
        versions.get_version(engine)


def _registration_fails(monkeypatch):
    """The store refuses the registration's commit: a SQLite store on a full disk."""
    import sqlite3
    from contextlib import contextmanager

    from sqlalchemy.exc import OperationalError

    real = versions.serialized_transaction

    @contextmanager
    def full_store(engine, key):
        with real(engine, key) as conn:
            yield conn
            raise OperationalError("COMMIT", {}, sqlite3.OperationalError("database or disk is full"))

    monkeypatch.setattr(versions, "serialized_transaction", full_store)


def test_a_version_whose_registration_fails_leaves_no_folder(engine, tmp_path, monkeypatch):
    # The folder was renamed into place before the commit and stayed: an unregistered version.
    import pytest
    from sqlalchemy.exc import OperationalError

    models = tmp_path / "models"
    versions.publish_version(engine, models, "v0", _stage(models, "v0"), {"seed": 0})
    _registration_fails(monkeypatch)
    with pytest.raises(OperationalError, match="database or disk is full"):
        versions.publish_version(engine, models, "v1", _stage(models, "v1"), {"seed": 1})
    assert sorted(p.name for p in models.iterdir()) == ["v0"]
    assert versions.get_version(engine).version == "v0"
    assert [row["version"] for row in versions.list_versions(engine)] == ["v0"]


def test_a_version_the_store_may_hold_keeps_its_folder(engine, tmp_path, monkeypatch, caplog):
    # A commit whose connection dropped may have landed: a registered version without its
    # folder would be worse than an orphan folder.
    import pytest
    from sqlalchemy.exc import OperationalError

    from contextlib import contextmanager

    models = tmp_path / "models"

    def unreachable(*args, **kwargs):
        raise OperationalError("SELECT", {}, ConnectionError("server closed the connection"))

    class Statements:
        def execute(self, *args, **kwargs):
            pass

    @contextmanager
    def dropped_at_commit(engine, key):
        yield Statements()
        unreachable()  # the connection dropped during the commit

    monkeypatch.setattr(versions, "serialized_transaction", dropped_at_commit)
    monkeypatch.setattr(engine, "connect", unreachable)
    with pytest.raises(OperationalError, match="server closed the connection"):
        versions.publish_version(engine, models, "v1", _stage(models, "v1"), {"seed": 1})
    assert (models / "v1" / versions.MANIFEST).exists()
    assert "store cannot say whether it holds the version" in caplog.text


# --- a workspace copied or moved together with its store ---------------------------------------


def test_a_copied_workspace_reads_and_writes_its_own_version_folders(engine, tmp_path):
    # The store records each folder's absolute path: a copy of the workspace and its store read the
    # original's folders, and its nightly added articles to the original's index.
    import shutil

    original, copy = tmp_path / "original" / "models", tmp_path / "copy" / "models"
    _publish(engine, original, "v1", seed=1, metrics={"val_auc": 0.61})
    _publish(engine, original, "v2", seed=2)
    shutil.copytree(original, copy)
    assert versions.get_version(engine).path == original / "v2"  # no workspace given: the recorded path
    assert versions.get_version(engine, models_dir=copy).path == copy / "v2"
    assert versions.get_version(engine, "v1", models_dir=copy).path == copy / "v1"
    assert versions.get_version(engine, "v1", models_dir=original).path == original / "v1"
    assert [r["path"] for r in versions.list_versions(engine, models_dir=copy)] == [str(copy / "v1"), str(copy / "v2")]
    assert [r["path"] for r in versions.describe_versions(engine, models_dir=copy)] == [str(copy / "v1"), str(copy / "v2")]
    # Moved rather than copied: the recorded folder is gone, the workspace's own one serves.
    shutil.rmtree(original)
    assert versions.set_current(engine, "v1", encoders=(TEXT, IMAGE), models_dir=copy) == "v2"
    assert [r["status"] for r in versions.describe_versions(engine, models_dir=copy)] == ["ok", "ok"]
    assert [r["status"] for r in versions.describe_versions(engine)] == ["missing", "missing"]


def test_a_workspace_folder_of_the_same_name_but_another_manifest_is_not_the_stores_version(engine, tmp_path):
    # Another store's version that happens to share the name (or a folder edited by hand): the
    # store's own record stands.
    other = tmp_path / "other" / "models"
    published = _publish(engine, tmp_path / "models", "v1", seed=1)
    staged = versions.staging_dir(other, "v1")
    versions.write_json_atomic(staged / versions.MANIFEST, {**published.manifest, "seed": 2})
    staged.rename(other / "v1")
    assert versions.get_version(engine, models_dir=other).path == published.path
    (other / "v1" / versions.MANIFEST).write_text("not json")  # unreadable: not trusted either
    assert versions.get_version(engine, models_dir=other).path == published.path
    (other / "v1" / versions.MANIFEST).unlink()
    assert versions.get_version(engine, models_dir=other).path == published.path
    assert versions.get_version(engine, models_dir=tmp_path / "nowhere").path == published.path
