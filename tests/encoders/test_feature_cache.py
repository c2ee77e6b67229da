"""Feature cache: round trip, content hashes, encoder isolation, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
import time

import numpy as np
import pytest

from recsys import atomic
from recsys.encoders import cache as cache_module
from recsys.encoders.cache import MANIFEST_NAME, FeatureCache, cache_folder_name
from recsys.encoders.item_features import EncoderInfo
from recsys.errors import DamagedFileError, ModelMismatchError, NotFoundError
from shard_damage import flip_byte_in_member

TEXT = EncoderInfo("text-enc", "1.0", 6)
IMAGE = EncoderInfo("image-enc", "2.0", 5)


def features(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(n, TEXT.dim)).astype(np.float32)
    image = rng.uniform(0, 6, size=(n, IMAGE.dim)).astype(np.float32)
    has_image = rng.uniform(size=n) > 0.3
    return text, image, has_image


def test_put_then_load_round_trips(tmp_path):
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    ids = [f"N{i}" for i in range(7)]
    text, image, has_image = features(7)
    cache.put(ids, ["h"] * 7, text, image, has_image)

    reopened = FeatureCache(tmp_path, TEXT, IMAGE)
    assert len(reopened) == 7
    order = ["N3", "N0", "N6"]
    got_text, got_image, got_has = reopened.load(order)
    rows = [3, 0, 6]
    np.testing.assert_array_equal(got_text, text[rows])
    assert got_text.dtype == np.float32 and got_image.dtype == np.float32
    expected_image = np.where(has_image[rows, None], image[rows], 0.0)
    np.testing.assert_allclose(got_image, expected_image, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(got_has, has_image[rows])


def test_image_features_are_stored_as_float16(tmp_path):
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    text, image, has_image = features(3)
    cache.put(["a", "b", "c"], ["h"] * 3, text, image, np.ones(3, bool))
    (shard,) = cache.path.glob("shard-*.npz")
    with np.load(shard) as z:
        assert z["image"].dtype == np.float16
        assert z["text"].dtype == np.float32
    _, loaded, _ = cache.load(["a", "b", "c"])
    np.testing.assert_array_equal(loaded, image.astype(np.float16).astype(np.float32))


def test_rows_without_image_are_stored_as_zeros(tmp_path):
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    text, image, _ = features(2)
    cache.put(["a", "b"], ["h", "h"], text, image, np.array([True, False]))
    _, loaded, has_image = cache.load(["a", "b"])
    assert has_image.tolist() == [True, False]
    assert not loaded[1].any() and loaded[0].any()


def test_lookup_matches_id_and_content_hash(tmp_path):
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    text, image, has_image = features(2)
    cache.put(["a", "b"], ["h1", "h2"], text, image, has_image)
    found = cache.lookup(["a", "b", "b", "zzz"], ["h1", "h2", "changed", "h1"])
    assert found.tolist() == [True, True, False, False]


def test_newer_shard_wins_for_a_changed_article(tmp_path):
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    old = features(1, seed=1)
    new = features(1, seed=2)
    cache.put(["a"], ["v1"], *old)
    cache.put(["a"], ["v2"], *new)
    reopened = FeatureCache(tmp_path, TEXT, IMAGE)
    assert reopened.lookup(["a", "a"], ["v1", "v2"]).tolist() == [False, True]
    np.testing.assert_array_equal(reopened.load(["a"])[0], new[0])


def test_compact_keeps_the_live_entries_in_one_shard(tmp_path):
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    for seed in range(4):
        cache.put([f"N{seed}", "shared"], [f"h{seed}", f"s{seed}"], *features(2, seed))
    before = cache.load([f"N{i}" for i in range(4)] + ["shared"])
    cache.compact()
    assert cache.num_shards == 1
    assert len(list(cache.path.glob("shard-*.npz"))) == 1
    reopened = FeatureCache(tmp_path, TEXT, IMAGE)
    after = reopened.load([f"N{i}" for i in range(4)] + ["shared"])
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert reopened.lookup(["shared"], ["s3"]).tolist() == [True]


def test_a_reader_outlives_another_process_compacting_the_cache(tmp_path, caplog):
    """An evaluate that opened the cache before the nightly job compacted it reads on."""
    writer = FeatureCache(tmp_path, TEXT, IMAGE)
    text, image, has_image = features(9)
    ids = [f"N{i}" for i in range(9)]
    for lo in range(0, 9, 3):  # three shards
        writer.put(ids[lo:lo + 3], ["h"] * 3, text[lo:lo + 3], image[lo:lo + 3], has_image[lo:lo + 3])
    reader = FeatureCache(tmp_path, TEXT, IMAGE)
    assert reader.num_shards == 3
    writer.compact()
    got_text, got_image, got_has = reader.load(ids[::-1])
    np.testing.assert_array_equal(got_text, text[::-1])
    np.testing.assert_allclose(got_image, np.where(has_image[:, None], image, 0)[::-1], rtol=1e-3, atol=1e-2)
    np.testing.assert_array_equal(got_has, has_image[::-1])
    assert reader.num_shards == 1 and "unreadable" not in caplog.text


def test_a_compaction_never_hides_a_shard_written_after_it_listed_the_cache(tmp_path):
    """Two processes: one encodes an article again while the other, which had listed the cache
    before, compacts it; the newer features stay the ones read, by every later reader."""
    a = FeatureCache(tmp_path, TEXT, IMAGE)
    old_text, old_image, old_has = features(2, seed=1)
    a.put(["X", "Y"], ["h1", "y1"], old_text, old_image, old_has)
    a.put(["Z"], ["z1"], *features(1, seed=2))
    b = FeatureCache(tmp_path, TEXT, IMAGE)  # lists the two shards
    new_text, new_image, new_has = features(1, seed=3)
    a.put(["X"], ["h2"], new_text, new_image, new_has)  # X's content changed; b does not know
    b.compact()
    for reader in (FeatureCache(tmp_path, TEXT, IMAGE), b):
        assert reader.lookup(["X", "Y"], ["h2", "y1"]).tolist() == [True, True]
        np.testing.assert_array_equal(reader.load(["X"])[0], new_text)
        np.testing.assert_array_equal(reader.load(["Y"])[0], old_text[1:])

    # A compaction that finds its shards already merged by another process gives up.
    c = FeatureCache(tmp_path, TEXT, IMAGE)
    FeatureCache(tmp_path, TEXT, IMAGE).compact()
    c.compact()
    assert c.lookup(["X"], ["h2"]).tolist() == [True]
    np.testing.assert_array_equal(FeatureCache(tmp_path, TEXT, IMAGE).load(["X"])[0], new_text)


def test_other_encoders_get_their_own_folder(tmp_path):
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    cache.put(["a"], ["h"], *features(1))
    other = FeatureCache(tmp_path, EncoderInfo("text-enc", "1.1", 6), IMAGE)
    assert other.path != cache.path
    assert other.lookup(["a"], ["h"]).tolist() == [False]
    assert cache_folder_name(TEXT, IMAGE).startswith("text-enc__image-enc__")


def test_an_encoder_name_with_a_slash_names_one_folder(tmp_path):
    # Hugging Face ids hold a slash: the folder must stay one level under the root.
    text = EncoderInfo("sentence-transformers/all-MiniLM-L6-v2", "1", 6)
    name = cache_folder_name(text, IMAGE)
    assert name.startswith("sentence-transformers-all-MiniLM-L6-v2__image-enc__")
    assert FeatureCache(tmp_path, text, IMAGE).path.parent == tmp_path


def test_manifest_recording_other_encoders_is_refused(tmp_path):
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    manifest = json.loads((cache.path / MANIFEST_NAME).read_text())
    assert manifest["text_encoder"] == TEXT.to_dict() and manifest["image_encoder"] == IMAGE.to_dict()
    manifest["image_encoder"]["dim"] = 999
    (cache.path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelMismatchError, match=r"holds image_encoder .*'dim': 999.* was asked for"):
        FeatureCache(tmp_path, TEXT, IMAGE)


def test_manifest_recording_another_image_dtype_is_refused(tmp_path):
    # Image vectors stored as float32 by another version must not be read as float16.
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    manifest = json.loads((cache.path / MANIFEST_NAME).read_text())
    assert manifest["image_dtype"] == "float16"
    manifest["image_dtype"] = "float32"
    (cache.path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelMismatchError, match="image_dtype 'float32'"):
        FeatureCache(tmp_path, TEXT, IMAGE)


def test_unreadable_manifest_is_refused(tmp_path):
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    (cache.path / MANIFEST_NAME).write_text("{broken")
    with pytest.raises(ModelMismatchError, match=r"manifest .* cannot be read"):
        FeatureCache(tmp_path, TEXT, IMAGE)


def test_put_with_wrong_dimension_is_refused(tmp_path):
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    text, image, has_image = features(2)
    with pytest.raises(ModelMismatchError, match=r"text features have shape \(2, 3\), but encoder text-enc .* dim 6"):
        cache.put(["a", "b"], ["h", "h"], text[:, :3], image, has_image)


def test_put_with_misaligned_rows_or_repeats_is_refused(tmp_path):
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    text, image, has_image = features(2)
    with pytest.raises(ValueError, match="put got 2 news ids but 1 rows of image"):
        cache.put(["a", "b"], ["h", "h"], text, image[:1], has_image)
    with pytest.raises(ValueError, match="repeated news ids"):
        cache.put(["a", "a"], ["h", "h"], text, image, has_image)
    with pytest.raises(ValueError, match="lookup got 2 news ids but 1 content hashes"):
        cache.lookup(["a", "b"], ["h"])


def test_load_of_unknown_ids_names_them(tmp_path):
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    cache.put(["a"], ["h"], *features(1))
    with pytest.raises(NotFoundError, match=r"no features for news ids N1, N2, N3, N4, N5 and 2 more"):
        cache.load(["a"] + [f"N{i}" for i in range(1, 8)])


def test_failed_writes_leave_nothing_behind_and_warn_once_per_error(tmp_path, monkeypatch, caplog):
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    errors = [OSError(28, "No space left on device"), OSError(28, "No space left on device"),
              OSError(5, "Input/output error"), OSError(28, "No space left on device")]

    def failing(*args, **kwargs):
        raise errors.pop(0)

    monkeypatch.setattr(np, "savez", failing)
    for news_id in "abcd":
        cache.put([news_id], ["h"], *features(1))
    assert errors == []  # each batch was tried: these errors may pass
    assert sorted(p.name for p in cache.path.iterdir()) == [MANIFEST_NAME]
    assert len(cache) == 0 and cache.lookup(list("abcd"), ["h"] * 4).tolist() == [False] * 4
    assert caplog.text.count(f"feature cache {cache.path} could not be written ([Errno 28] No space left on device)") == 1
    assert caplog.text.count(f"feature cache {cache.path} could not be written ([Errno 5] Input/output error)") == 1


def _disk_full_once(monkeypatch) -> list:
    """np.savez fails with ENOSPC on its first call from now on, then writes; returns the calls."""
    real_savez, calls = np.savez, []

    def full_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real_savez(*args, **kwargs)

    monkeypatch.setattr(np, "savez", full_once)
    return calls


def test_a_write_error_that_passes_loses_only_its_batch(tmp_path, monkeypatch, caplog):
    # A full disk that a cleanup freed: the batches after it are stored (a first encode of
    # MIND-large takes hours, and a later kill must not lose them all).
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    _disk_full_once(monkeypatch)
    text, image, has_image = features(5)
    for i in range(5):
        cache.put([f"N{i}"], ["h"], text[i:i + 1], image[i:i + 1], has_image[i:i + 1])
    reopened = FeatureCache(tmp_path, TEXT, IMAGE)
    assert reopened.lookup([f"N{i}" for i in range(5)], ["h"] * 5).tolist() == [False, True, True, True, True]
    got_text, _, got_has = reopened.load([f"N{i}" for i in range(1, 5)])
    np.testing.assert_array_equal(got_text, text[1:])
    np.testing.assert_array_equal(got_has, has_image[1:])
    assert caplog.text.count("could not be written ([Errno 28] No space left on device); later writes are tried again") == 1


def test_after_a_full_disk_a_write_waits_for_room(tmp_path, monkeypatch):
    # Tried on every batch of a long encode, each write filled a full disk to its last byte
    # before failing, under the store and the index that share it. Tried again once there is
    # room for twice the shard.
    import collections

    from recsys.encoders import cache as cache_module

    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    calls = _disk_full_once(monkeypatch)
    free = {"bytes": 10}
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: usage(10**9, 10**9, free["bytes"]))
    text, image, has_image = features(5)
    for i in range(3):
        cache.put([f"N{i}"], ["h"], text[i:i + 1], image[i:i + 1], has_image[i:i + 1])
    assert len(calls) == 1  # the failed write; the next two found no room and did not try
    free["bytes"] = 10**9
    for i in range(3, 5):
        cache.put([f"N{i}"], ["h"], text[i:i + 1], image[i:i + 1], has_image[i:i + 1])
    assert len(calls) == 3
    assert FeatureCache(tmp_path, TEXT, IMAGE).lookup([f"N{i}" for i in range(5)], ["h"] * 5).tolist() == [
        False, False, False, True, True]
    # Compaction, the largest write, waits for room too.
    calls = _disk_full_once(monkeypatch)  # its first call fails again
    cache.put(["N9"], ["h"], *features(1, seed=3))
    free["bytes"] = 10
    cache.compact()
    assert len(calls) == 1 and cache.num_shards == 2


def test_after_a_full_disk_room_means_twice_the_shard(tmp_path, monkeypatch):
    import collections

    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    calls = _disk_full_once(monkeypatch)
    usage = collections.namedtuple("usage", "total used free")
    # One article's shard: text 6 float32 (24 bytes) + image 5 float16 (10) + id "N1" as <U2 (8)
    # + hash "h" as <U1 (4) = 46 bytes.
    shard_bytes = 24 + 10 + 8 + 4
    free = {"bytes": 10**9}
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: usage(10**9, 10**9, free["bytes"]))
    cache.put(["N0"], ["h"], *features(1))  # fails: the disk is full
    free["bytes"] = 2 * shard_bytes - 1
    cache.put(["N1"], ["h"], *features(1, seed=1))
    assert len(calls) == 1  # room for the shard once, not twice: not tried
    free["bytes"] = 2 * shard_bytes
    cache.put(["N1"], ["h"], *features(1, seed=1))
    assert len(calls) == 2 and cache.lookup(["N1"], ["h"]).tolist() == [True]
    # A write that succeeded ends the wait: the next one is tried whatever the free space says.
    free["bytes"] = 0
    cache.put(["N2"], ["h"], *features(1, seed=2))
    assert len(calls) == 3 and cache.lookup(["N2"], ["h"]).tolist() == [True]


def test_a_read_only_cache_serves_what_it_holds_and_stores_nothing(tmp_path, monkeypatch, caplog):
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    text, image, has_image = features(2)
    cache.put(["a", "b"], ["h", "h"], text, image, has_image)
    cache.put(["c"], ["h"], *features(1, seed=1))

    real_open = open

    def read_only(path, mode="r", *args, **kwargs):  # what a read-only mount answers (root ignores chmod)
        if any(m in mode for m in "wax+"):
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(cache_module, "open", read_only, raising=False)
    reader = FeatureCache(tmp_path, TEXT, IMAGE)
    got_text, _, got_has = reader.load(["b", "a"])
    np.testing.assert_array_equal(got_text, text[[1, 0]])
    np.testing.assert_array_equal(got_has, has_image[[1, 0]])
    reader.put(["d"], ["h"], *features(1, seed=2))
    reader.compact()  # two shards, but nothing can be written: left as it is
    assert reader.lookup(["a", "c", "d"], ["h"] * 3).tolist() == [True, True, False]
    assert reader.num_shards == 2
    assert caplog.text.count(f"feature cache {reader.path} cannot be written") == 1


@pytest.mark.parametrize(("code", "message"), [(1, "Operation not permitted"), (13, "Permission denied"),
                                               (30, "Read-only file system")])
def test_a_write_refused_for_good_stops_later_writes(tmp_path, monkeypatch, code, message):
    # EPERM, EACCES and EROFS last the whole command: after the first, no write is tried.
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    calls = []

    def refusing(*args, **kwargs):
        calls.append(1)
        raise OSError(code, message)

    monkeypatch.setattr(np, "savez", refusing)
    for news_id in "abc":
        cache.put([news_id], ["h"], *features(1))
    assert len(calls) == 1
    assert len(cache) == 0


def test_a_cache_folder_that_cannot_be_created_gives_an_empty_cache(tmp_path, caplog):
    (tmp_path / "cache").write_bytes(b"a file where the cache folder should be")
    cache = FeatureCache(tmp_path / "cache" / "features", TEXT, IMAGE)
    assert f"feature cache {cache.path} cannot be written" in caplog.text
    cache.put(["a"], ["h"], *features(1))
    assert len(cache) == 0 and cache.lookup(["a"], ["h"]).tolist() == [False]
    with pytest.raises(NotFoundError, match="no features for news ids a"):
        cache.load(["a"])


def test_unreadable_shard_is_skipped_and_leftover_temp_files_ignored(tmp_path, caplog):
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    cache.put(["a"], ["h"], *features(1))
    (cache.path / "shard-00000000000000000001-deadbeef.npz").write_bytes(b"garbage")
    (cache.path / ".shard-99999999999999999999-x.npz.123.abcd.tmp").write_bytes(b"half written")
    reopened = FeatureCache(tmp_path, TEXT, IMAGE)
    assert reopened.lookup(["a"], ["h"]).tolist() == [True]
    assert "is unreadable" in caplog.text



def test_opening_removes_temp_files_of_killed_writers_after_an_hour(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    cache.put(["a"], ["h"], *features(1))
    killed = cache.path / ".shard-00000000000000000002-ab.npz.123.abcd.tmp"
    killed.write_bytes(b"half written")
    FeatureCache(tmp_path, TEXT, IMAGE)
    assert killed.exists()  # young: its writer may still be running

    later = time.time() + cache_module.STALE_TEMP_SECONDS + 60
    monkeypatch.setattr(atomic.time, "time", lambda: later)
    writing = cache.path / ".shard-00000000000000000003-cd.npz.456.ef01.tmp"
    writing.write_bytes(b"being written")
    os.utime(writing, (later - 5, later - 5))  # a live writer keeps its mtime fresh
    reopened = FeatureCache(tmp_path, TEXT, IMAGE)
    assert not killed.exists() and writing.exists()
    assert reopened.lookup(["a"], ["h"]).tolist() == [True]


def test_folders_of_other_encoders_go_after_30_days_unused(tmp_path, monkeypatch):
    old = FeatureCache(tmp_path, EncoderInfo("text-enc", "0.9", 6), IMAGE)
    old.put(["a"], ["h"], *features(1))
    used = FeatureCache(tmp_path, TEXT, EncoderInfo("image-enc", "1.9", 5))
    not_a_cache = tmp_path / "notes"
    not_a_cache.mkdir()
    FeatureCache(tmp_path, TEXT, IMAGE)
    assert old.path.exists()  # used today

    later = time.time() + cache_module.UNUSED_FOLDER_SECONDS + 60
    monkeypatch.setattr(atomic.time, "time", lambda: later)
    os.utime(used.path, (later - 86400, later - 86400))  # opened yesterday
    current = FeatureCache(tmp_path, TEXT, IMAGE)
    assert not old.path.exists()
    assert used.path.exists() and not_a_cache.exists() and current.path.exists()


def test_a_link_to_another_cache_folder_is_never_removed(tmp_path, monkeypatch):
    # A symlink beside the caches points at someone else's folder: not this cache's to tidy.
    elsewhere = tmp_path / "elsewhere"
    target = FeatureCache(elsewhere, EncoderInfo("text-enc", "0.9", 6), IMAGE)
    target.put(["a"], ["h"], *features(1))
    root = tmp_path / "root"
    root.mkdir()
    link = root / target.path.name
    link.symlink_to(target.path, target_is_directory=True)
    later = time.time() + cache_module.UNUSED_FOLDER_SECONDS + 60
    monkeypatch.setattr(atomic.time, "time", lambda: later)
    FeatureCache(root, TEXT, IMAGE)
    assert link.is_symlink() and len(list(target.path.glob("shard-*.npz"))) == 1



def test_a_cache_folder_this_user_cannot_read_does_not_stop_the_open(tmp_path, monkeypatch, caplog):
    other = FeatureCache(tmp_path, EncoderInfo("text-enc", "0.9", 6), IMAGE)
    real_is_file = Path.is_file

    def private(self):  # someone else's 0700 folder (root reads everything, so refuse by hand)
        if self.parent == other.path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", private)
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    cache.put(["a"], ["h"], *features(1))
    assert cache.lookup(["a"], ["h"]).tolist() == [True] and other.path.exists()


def test_opening_marks_the_folder_used(tmp_path):
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    past = time.time() - 10 * 86400
    os.utime(cache.path, (past, past))
    FeatureCache(tmp_path, TEXT, IMAGE)
    assert cache.path.stat().st_mtime > past + 9 * 86400


def test_killed_writer_loses_at_most_the_batch_in_flight(tmp_path):
    """SIGKILL a process that keeps writing shards: every shard left on disk is readable."""
    script = textwrap.dedent(
        f"""
        import numpy as np
        from recsys.encoders.cache import FeatureCache
        from recsys.encoders.item_features import EncoderInfo
        cache = FeatureCache({str(tmp_path)!r}, EncoderInfo("text-enc", "1.0", 6), EncoderInfo("image-enc", "2.0", 5))
        rng = np.random.default_rng(0)
        for batch in range(100000):
            ids = [f"N{{batch}}-{{i}}" for i in range(500)]
            cache.put(ids, ["h"] * 500, rng.normal(size=(500, 6)), rng.normal(size=(500, 5)), np.ones(500, bool))
            print(batch, flush=True)
        """
    )
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as proc:
        try:
            for _ in range(3):  # wait until a few batches are on disk, then kill mid-write
                proc.stdout.readline()
            time.sleep(0.01)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    assert len(cache) >= 3 * 500 and len(cache) % 500 == 0
    assert cache.num_shards == len(list(cache.path.glob("shard-*.npz")))
    # The batches on disk are exactly the first ones, each complete.
    written = [f"N{b}-{i}" for b in range(len(cache) // 500) for i in range(500)]
    text, _, has_image = cache.load(written)
    assert np.isfinite(text).all() and has_image.all()


def test_a_shard_with_a_damaged_vector_member_is_left_out_and_moved_aside(tmp_path, caplog):
    # A compacted shard damaged inside image.npy: indexing reads only ids and hashes, so the
    # damage shows when the vectors are read. Those articles must count as not cached, and
    # the shard must not warn again on every later command.
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    cache.put(["a", "b"], ["h", "h"], *features(2))
    cache.put(["c"], ["h"], *features(1, seed=1))
    cache.compact()
    (shard,) = cache.path.glob("shard-*.npz")
    flip_byte_in_member(shard, "image.npy")

    reopened = FeatureCache(tmp_path, TEXT, IMAGE)
    assert reopened.lookup(["a", "b", "c"], ["h"] * 3).tolist() == [True, True, True]
    with pytest.raises(DamagedFileError, match=rf"shard {shard} is unreadable \(BadZipFile: Bad CRC-32.*must be encoded again"):
        reopened.load(["a", "c"])
    assert reopened.lookup(["a", "b", "c"], ["h"] * 3).tolist() == [False, False, False]
    assert f"feature cache shard {shard} is unreadable" in caplog.text
    assert not shard.exists() and (cache.path / f".{shard.name}.unreadable.tmp").exists()

    caplog.clear()
    again = FeatureCache(tmp_path, TEXT, IMAGE)
    assert len(again) == 0 and "unreadable" not in caplog.text
    again.put(["a"], ["h"], *features(1))  # encoded again, cached again
    assert FeatureCache(tmp_path, TEXT, IMAGE).lookup(["a"], ["h"]).tolist() == [True]


def test_a_shard_that_cannot_be_read_now_is_left_where_it_is(tmp_path, monkeypatch, caplog):
    # Permissions or an I/O error that may pass: not proof of damage, so nothing is moved.
    cache = FeatureCache(tmp_path, TEXT, IMAGE)
    cache.put(["a"], ["h"], *features(1))
    (shard,) = cache.path.glob("shard-*.npz")
    reopened = FeatureCache(tmp_path, TEXT, IMAGE)

    def io_error(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(cache_module.np, "load", io_error)
    with pytest.raises(DamagedFileError, match=r"is unreadable \(OSError: \[Errno 5\] Input/output error\)"):
        reopened.load(["a"])
    assert shard.exists() and reopened.lookup(["a"], ["h"]).tolist() == [False]
