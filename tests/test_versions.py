"""Model version folders: staging leaves nothing behind for ever."""

from __future__ import annotations

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
