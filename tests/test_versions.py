"""Model version folders: staging leaves nothing behind for ever."""

from __future__ import annotations

import os
import time

from recsys import atomic, versions


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
