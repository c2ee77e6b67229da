"""encode_items: only new or changed articles are encoded; the no-image path is explicit."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest

from fake_encoders import FakeImageEncoder, FakeTextEncoder
from recsys.columns import (
    ABSTRACT,
    CATEGORY,
    CONTENT_HASH,
    IMAGE_CORRUPT,
    IMAGE_MISSING,
    IMAGE_OK,
    IMAGE_PATH,
    IMAGE_STATUS,
    NEWS_ID,
    TITLE,
)
from recsys.encoders.cache import FeatureCache
from recsys.encoders.pipeline import article_text, encode_items, text_info_for
from recsys.errors import DamagedFileError, ModelMismatchError, SchemaError
from shard_damage import flip_byte_in_member, flip_header_byte_in_member


def make_news(images_dir, n: int = 10) -> pd.DataFrame:
    """n articles; every third has no image, article 4's image was found corrupt at ingest."""
    rows = []
    for i in range(n):
        news_id = f"N{i}"
        status, rel = IMAGE_OK, f"{news_id}.jpg"
        if i % 3 == 2:
            status, rel = IMAGE_MISSING, None
        else:
            (images_dir / rel).write_bytes(b"bad" if i == 4 else f"pixels of {news_id}".encode())
            status = IMAGE_CORRUPT if i == 4 else status
        rows.append(
            {
                NEWS_ID: news_id,
                CATEGORY: ["sports", "news", "finance"][i % 3],
                TITLE: f"Headline number {i}",
                ABSTRACT: f"Abstract {i}." if i % 2 else None,
                IMAGE_PATH: rel,
                IMAGE_STATUS: status,
                CONTENT_HASH: f"hash-{i}",
            }
        )
    return pd.DataFrame(rows)


@pytest.fixture
def news(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    return make_news(images), images


def assert_same_features(a, b):
    np.testing.assert_array_equal(a.news_ids, b.news_ids)
    np.testing.assert_array_equal(a.text, b.text)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.has_image, b.has_image)
    np.testing.assert_array_equal(a.categories, b.categories)
    assert (a.text_encoder, a.image_encoder) == (b.text_encoder, b.image_encoder)


def test_a_sigterm_that_a_library_swallowed_still_stops_the_encoding(news, fake_encoders, tmp_path):
    from recsys.interrupts import Terminated, sigterm_unwinds
    from tests.signals import swallowed_sigterm

    frame, images = news
    text_enc, image_enc = fake_encoders
    cache = FeatureCache(tmp_path / "cache", text_enc.info, image_enc.info)
    with sigterm_unwinds():
        swallowed_sigterm()
        with pytest.raises(Terminated):
            encode_items(frame, images, text_enc, image_enc, cache, batch_size=4)
    assert text_enc.calls == []


def test_features_are_row_aligned_with_an_explicit_no_image_path(news, fake_encoders):
    frame, images = news
    text_enc, image_enc = fake_encoders
    features = encode_items(frame, images, text_enc, image_enc, None, batch_size=4)
    assert len(features) == 10
    assert features.news_ids.tolist() == frame[NEWS_ID].tolist()
    assert features.categories.tolist() == frame[CATEGORY].tolist()
    assert features.text.shape == (10, 8) and features.text.dtype == np.float32
    assert features.image.shape == (10, 4) and features.image.dtype == np.float32
    expected_has_image = [i % 3 != 2 and i != 4 for i in range(10)]
    assert features.has_image.tolist() == expected_has_image
    assert not features.image[~features.has_image].any()
    assert (features.image[features.has_image] > 0).all()
    # Articles without an "ok" image are never handed to the image encoder.
    paths = image_enc.paths_seen
    assert sum(p is not None for p in paths) == 6 and paths[2] is None and paths[4] is None
    np.testing.assert_array_equal(features.text[3], text_enc.encode(["Headline number 3"])[0])
    assert features.text_encoder == text_enc.info and features.image_encoder == image_enc.info


def test_a_missing_category_is_empty_not_nan(news, fake_encoders):
    frame, images = news
    frame.loc[1, CATEGORY] = None
    features = encode_items(frame, images, *fake_encoders, None, batch_size=4)
    assert features.categories[1] == ""
    assert features.categories[0] == "sports"


def test_rows_the_image_encoder_could_not_read_are_zeros_whatever_it_returned(news):
    # The has_image flag, not the encoder's filler, decides: a failed row must never look
    # like a picture, even from an encoder that leaves something in it.
    class FillingImageEncoder(FakeImageEncoder):
        def encode(self, paths, batch_size: int = 32):
            features, ok = super().encode(paths, batch_size)
            features[~ok] = 7.0
            return features, ok

    frame, images = news
    features = encode_items(frame, images, FakeTextEncoder(), FillingImageEncoder(), None, batch_size=4)
    assert features.has_image.tolist() == [i % 3 != 2 and i != 4 for i in range(10)]
    assert not features.image[~features.has_image].any()


def test_second_run_encodes_nothing(news, tmp_path, fake_encoders):
    frame, images = news
    text_enc, image_enc = fake_encoders
    cache = FeatureCache(tmp_path / "cache", text_enc.info, image_enc.info)
    first = encode_items(frame, images, text_enc, image_enc, cache, batch_size=4)
    assert text_enc.num_encoded == 10 and len(image_enc.paths_seen) == 10

    text_again, image_again = FakeTextEncoder(), FakeImageEncoder()
    reopened = FeatureCache(tmp_path / "cache", text_again.info, image_again.info)
    second = encode_items(frame, images, text_again, image_again, reopened, batch_size=4)
    assert text_again.calls == [] and image_again.calls == []
    assert_same_features(first, second)


class Blocked(Exception):
    """Not an OSError (as TimeoutError is), which the code under test may catch."""


@contextmanager
def time_limit(seconds: float):
    """Turn a call that would block for ever into ``Blocked``."""

    def expire(signum, frame):
        raise Blocked(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _unmounted(path):  # the images folder unmounted or moved during one run
    path.unlink()


def _copied_over(path):  # ingest decoded it; then it was copied over in place, or truncated
    path.write_bytes(b"bad")


def _named_pipe(path):  # opening one for reading blocks until a writer comes: the encode would hang
    path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize("break_cover", [_unmounted, _copied_over, _named_pipe])
def test_a_cover_that_fails_at_encode_time_is_not_cached(news, tmp_path, fake_encoders, caplog, break_cover):
    # That run has no picture for the article. The content hash still covers the bytes ingest
    # read, so a cached "no image" would outlive the repair: the next run, with the file back,
    # encodes it instead.
    frame, images = news
    text_enc, image_enc = fake_encoders
    picture = (images / "N1.jpg").read_bytes()
    break_cover(images / "N1.jpg")
    with time_limit(10):
        first = encode_items(frame, images, text_enc, image_enc,
                             FeatureCache(tmp_path / "cache", text_enc.info, image_enc.info), batch_size=4)
    assert first.has_image.tolist() == [i % 3 != 2 and i not in (1, 4) for i in range(10)]
    assert not first.image[1].any()
    np.testing.assert_array_equal(first.text[1], text_enc.encode(["Headline number 1"])[0])
    assert f"1 cover images that ingest found usable cannot be read or decoded now ({images / 'N1.jpg'})" in caplog.text

    (images / "N1.jpg").unlink(missing_ok=True)
    (images / "N1.jpg").write_bytes(picture)
    text_again, image_again = FakeTextEncoder(), FakeImageEncoder()
    second = encode_items(frame, images, text_again, image_again, FeatureCache(tmp_path / "cache", text_again.info, image_again.info))
    assert image_again.paths_seen == [images / "N1.jpg"]  # only the one that failed
    assert second.has_image.tolist() == [i % 3 != 2 and i != 4 for i in range(10)]
    # The picture's own vector (the fake encodes the file's bytes), to float16 precision.
    np.testing.assert_allclose(second.image[1], FakeImageEncoder().encode([images / "N1.jpg"])[0][0], rtol=1e-3)
    reference = encode_items(frame, images, FakeTextEncoder(), FakeImageEncoder(), FeatureCache(tmp_path / "fresh", text_enc.info, image_enc.info))
    assert_same_features(second, reference)


def test_a_damaged_cache_shard_gets_its_articles_encoded_again(news, tmp_path, fake_encoders, caplog):
    frame, images = news
    text_enc, image_enc = fake_encoders
    encode_items(frame, images, text_enc, image_enc, FeatureCache(tmp_path / "cache", text_enc.info, image_enc.info), batch_size=4)
    shards = sorted((tmp_path / "cache").glob("*/shard-*.npz"))
    assert len(shards) == 3  # articles 0-3, 4-7, 8-9
    flip_byte_in_member(shards[1], "image.npy")

    text_again, image_again = FakeTextEncoder(), FakeImageEncoder()
    cache = FeatureCache(tmp_path / "cache", text_again.info, image_again.info)
    calls = []
    features = encode_items(frame, images, text_again, image_again, cache, batch_size=4, progress=calls.append)
    assert sorted(t for call in text_again.calls for t in call) == [f"Headline number {i}" for i in range(4, 8)]
    assert sum(calls) == 10
    assert f"feature cache shard {shards[1]} is unreadable" in caplog.text
    reference = encode_items(frame, images, FakeTextEncoder(), FakeImageEncoder(), None)
    np.testing.assert_array_equal(features.text, reference.text)
    np.testing.assert_allclose(features.image, reference.image, rtol=1e-3)  # float16 storage
    np.testing.assert_array_equal(features.has_image, reference.has_image)

    # Moved aside: the next command neither warns nor encodes anything.
    caplog.clear()
    text_third, image_third = FakeTextEncoder(), FakeImageEncoder()
    third = encode_items(frame, images, text_third, image_third, FeatureCache(tmp_path / "cache", text_third.info, image_third.info))
    assert text_third.calls == [] and "unreadable" not in caplog.text
    assert_same_features(third, features)


def test_a_damaged_shard_whose_articles_an_older_shard_also_holds_is_read_from_that_one(news, tmp_path, caplog):
    # Two encoders that ran at once both stored the same new articles; the newer shard is
    # damaged. Looking up again finds every article (in the older shard): that is progress.
    frame, images = news
    encoders = [(FakeTextEncoder(), FakeImageEncoder()) for _ in range(2)]
    caches = [FeatureCache(tmp_path / "cache", t.info, i.info) for t, i in encoders]  # both open before either writes
    for (text_enc, image_enc), cache in zip(encoders, caches):
        encode_items(frame, images, text_enc, image_enc, cache)
        assert text_enc.num_encoded == 10
    older, newer = sorted((tmp_path / "cache").glob("*/shard-*.npz"))
    flip_byte_in_member(newer, "image.npy")

    text_again, image_again = FakeTextEncoder(), FakeImageEncoder()
    cache = FeatureCache(tmp_path / "cache", text_again.info, image_again.info)
    features = encode_items(frame, images, text_again, image_again, cache)
    assert text_again.calls == [] and image_again.calls == []
    assert f"feature cache shard {newer} is unreadable" in caplog.text and older.exists()
    reference = encode_items(frame, images, FakeTextEncoder(), FakeImageEncoder(), None)
    np.testing.assert_array_equal(features.text, reference.text)
    np.testing.assert_allclose(features.image, reference.image, rtol=1e-3)  # float16 storage
    np.testing.assert_array_equal(features.has_image, reference.has_image)


def test_a_damaged_file_error_that_left_out_no_shard_is_raised_not_retried(news, tmp_path, fake_encoders, monkeypatch):
    frame, images = news
    text_enc, image_enc = fake_encoders
    cache = FeatureCache(tmp_path / "cache", text_enc.info, image_enc.info)
    encode_items(frame, images, text_enc, image_enc, cache)

    def damaged_without_leaving_out(news_ids):
        raise DamagedFileError("shard X is unreadable")

    monkeypatch.setattr(cache, "load", damaged_without_leaving_out)
    with pytest.raises(DamagedFileError, match="shard X is unreadable"):
        encode_items(frame, images, FakeTextEncoder(), FakeImageEncoder(), cache)


@pytest.mark.parametrize("member", ["news_ids.npy", "text.npy"])
def test_a_shard_with_a_damaged_npy_header_gets_its_articles_encoded_again(tmp_path, member, caplog):
    # Members over 4096 bytes: np.load parses the header before the zip CRC check fails, and
    # a flipped header byte raised tokenize.TokenError, which stopped the open (news_ids) or
    # the read (text) instead of counting as damage.
    images = tmp_path / "images"
    images.mkdir()
    frame = make_news(images, n=1000)
    text_enc, image_enc = FakeTextEncoder(), FakeImageEncoder()
    encode_items(frame, images, text_enc, image_enc, FeatureCache(tmp_path / "cache", text_enc.info, image_enc.info), batch_size=1000)
    (shard,) = (tmp_path / "cache").glob("*/shard-*.npz")
    flip_header_byte_in_member(shard, member)

    text_again, image_again = FakeTextEncoder(), FakeImageEncoder()
    cache = FeatureCache(tmp_path / "cache", text_again.info, image_again.info)
    features = encode_items(frame, images, text_again, image_again, cache, batch_size=1000)
    assert text_again.num_encoded == 1000
    assert f"feature cache shard {shard} is unreadable" in caplog.text
    assert not shard.exists() and (shard.parent / f".{shard.name}.unreadable.tmp").exists()
    reference = encode_items(frame, images, FakeTextEncoder(), FakeImageEncoder(), None)
    np.testing.assert_array_equal(features.text, reference.text)
    np.testing.assert_allclose(features.image, reference.image, rtol=1e-3)  # float16 storage
    np.testing.assert_array_equal(features.has_image, reference.has_image)

    text_third, image_third = FakeTextEncoder(), FakeImageEncoder()
    third = encode_items(frame, images, text_third, image_third, FeatureCache(tmp_path / "cache", text_third.info, image_third.info))
    assert text_third.calls == []
    assert_same_features(third, features)


def test_a_read_only_cache_still_gives_the_features_of_new_articles(news, tmp_path, fake_encoders, monkeypatch, caplog):
    # A user who can only read the workspace's cache encodes what it lacks, in memory.
    from recsys.encoders import cache as cache_module

    frame, images = news
    text_enc, image_enc = fake_encoders
    encode_items(frame.iloc[:6], images, text_enc, image_enc, FeatureCache(tmp_path / "cache", text_enc.info, image_enc.info))

    def read_only(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cache_module, "open", read_only, raising=False)  # the cache's only writes
    text_again, image_again = FakeTextEncoder(), FakeImageEncoder()
    cache = FeatureCache(tmp_path / "cache", text_again.info, image_again.info)
    features = encode_items(frame, images, text_again, image_again, cache, batch_size=2)
    assert sorted(t for call in text_again.calls for t in call) == [f"Headline number {i}" for i in range(6, 10)]
    reference = encode_items(frame, images, FakeTextEncoder(), FakeImageEncoder(), None)
    np.testing.assert_array_equal(features.text, reference.text)
    np.testing.assert_allclose(features.image, reference.image, rtol=1e-3)  # float16 storage
    np.testing.assert_array_equal(features.has_image, reference.has_image)
    assert caplog.text.count(f"feature cache {cache.path} cannot be written ([Errno 13] Permission denied") == 1


def test_changed_content_hash_reencodes_only_that_article(news, tmp_path, fake_encoders):
    frame, images = news
    text_enc, image_enc = fake_encoders
    cache = FeatureCache(tmp_path / "cache", text_enc.info, image_enc.info)
    encode_items(frame, images, text_enc, image_enc, cache)
    changed = frame.copy()
    changed.loc[5, TITLE] = "A corrected headline"
    changed.loc[5, CONTENT_HASH] = "hash-5-v2"
    text_enc.calls.clear()
    image_enc.calls.clear()
    features = encode_items(changed, images, text_enc, image_enc, cache)
    assert text_enc.calls == [["A corrected headline"]]
    assert len(image_enc.paths_seen) == 1
    np.testing.assert_array_equal(features.text[5], text_enc.encode(["A corrected headline"])[0])


def test_new_articles_are_added_in_order(news, tmp_path, fake_encoders):
    frame, images = news
    text_enc, image_enc = fake_encoders
    cache = FeatureCache(tmp_path / "cache", text_enc.info, image_enc.info)
    encode_items(frame.iloc[:6], images, text_enc, image_enc, cache)
    text_enc.calls.clear()
    shuffled = frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
    features = encode_items(shuffled, images, text_enc, image_enc, cache)
    assert sorted(t for call in text_enc.calls for t in call) == [f"Headline number {i}" for i in range(6, 10)]
    assert features.news_ids.tolist() == shuffled[NEWS_ID].tolist()
    fresh = encode_items(shuffled, images, FakeTextEncoder(), FakeImageEncoder(), None)
    np.testing.assert_array_equal(features.text, fresh.text)
    np.testing.assert_allclose(features.image, fresh.image, rtol=1e-3)  # float16 storage
    np.testing.assert_array_equal(features.has_image, fresh.has_image)


def test_crash_midway_then_rerun_completes(news, tmp_path):
    frame, images = news
    crashing = FakeTextEncoder(fail_on_call=3)
    image_enc = FakeImageEncoder()
    cache = FeatureCache(tmp_path / "cache", crashing.info, image_enc.info)
    with pytest.raises(KeyboardInterrupt, match="simulated crash"):
        encode_items(frame, images, crashing, image_enc, cache, batch_size=3)
    assert len(FeatureCache(tmp_path / "cache", crashing.info, image_enc.info)) == 6  # two full batches kept

    text_enc = FakeTextEncoder()
    resumed = encode_items(frame, images, text_enc, FakeImageEncoder(), FeatureCache(tmp_path / "cache", text_enc.info, image_enc.info))
    assert text_enc.num_encoded == 4
    clean = encode_items(frame, images, FakeTextEncoder(), FakeImageEncoder(), FeatureCache(tmp_path / "clean", text_enc.info, image_enc.info))
    assert_same_features(resumed, clean)


def test_progress_reports_add_up_to_the_catalogue(news, tmp_path, fake_encoders):
    frame, images = news
    text_enc, image_enc = fake_encoders
    cache = FeatureCache(tmp_path / "cache", text_enc.info, image_enc.info)
    calls = []
    encode_items(frame.iloc[:4], images, text_enc, image_enc, cache, batch_size=3, progress=calls.append)
    assert calls == [3, 1]
    calls.clear()
    encode_items(frame, images, text_enc, image_enc, cache, batch_size=3, progress=calls.append)
    assert calls == [4, 3, 3]


def test_cache_of_other_encoders_is_refused(news, tmp_path, fake_encoders):
    frame, images = news
    text_enc, image_enc = fake_encoders
    cache = FeatureCache(tmp_path / "cache", FakeTextEncoder(name="other-text").info, image_enc.info)
    with pytest.raises(ModelMismatchError, match=r"is for encoders other-text \(1\) and fake-image \(1\), not fake-text"):
        encode_items(frame, images, text_enc, image_enc, cache)
    # The image encoder alone differing is refused as well: its vectors are not these.
    cache = FeatureCache(tmp_path / "cache", text_enc.info, FakeImageEncoder(name="other-image").info)
    with pytest.raises(ModelMismatchError, match=r"is for encoders fake-text \(1\) and other-image \(1\)"):
        encode_items(frame, images, text_enc, image_enc, cache)


def test_use_abstract_changes_the_text_and_its_identity(news, tmp_path, fake_encoders):
    frame, images = news
    text_enc, image_enc = fake_encoders
    cache = FeatureCache(tmp_path / "cache", text_enc.info, image_enc.info)
    titles_only = encode_items(frame, images, text_enc, image_enc, cache)
    text_enc.calls.clear()
    with_abstract = encode_items(frame, images, text_enc, image_enc, cache, use_abstract=True)
    # Cached title-only vectors are not reused for title + abstract.
    assert text_enc.num_encoded == 10
    assert "Headline number 1. Abstract 1." in text_enc.calls[0]
    assert "Headline number 0" in text_enc.calls[0]  # no abstract: title alone
    assert with_abstract.text_encoder.name == "fake-text+abstract"
    assert titles_only.text_encoder.name == "fake-text"
    assert not np.array_equal(with_abstract.text[1], titles_only.text[1])
    np.testing.assert_array_equal(with_abstract.text[0], titles_only.text[0])
    assert text_info_for(text_enc.info, use_abstract=False) == text_enc.info


@pytest.mark.parametrize(
    "title, abstract, expected",
    [("Title", "Body.", "Title. Body."), ("Why?", "Because.", "Why? Because."), (None, "Body", "Body"), ("T", float("nan"), "T"), (" T ", "", "T")],
)
def test_article_text(title, abstract, expected):
    assert article_text(title, abstract, use_abstract=True) == expected
    assert article_text("Title", "Body", use_abstract=False) == "Title"


def test_absolute_image_paths_without_images_dir(news, fake_encoders):
    frame, images = news
    text_enc, image_enc = fake_encoders
    absolute = frame.copy()
    absolute[IMAGE_PATH] = [str(images / p) if pd.notna(p) else None for p in frame[IMAGE_PATH]]
    features = encode_items(absolute, None, text_enc, image_enc, None)
    assert features.has_image.sum() == 6


def test_image_not_ok_at_ingest_is_not_read(news, fake_encoders):
    frame, images = news
    text_enc, image_enc = fake_encoders
    flagged = frame.copy()
    flagged[IMAGE_STATUS] = IMAGE_CORRUPT  # paths still set, but ingest refused them
    features = encode_items(flagged, images, text_enc, image_enc, None)
    assert not features.has_image.any()
    assert all(p is None for p in image_enc.paths_seen)


def test_empty_catalogue(news, tmp_path, fake_encoders):
    frame, images = news
    text_enc, image_enc = fake_encoders
    features = encode_items(frame.iloc[:0], images, text_enc, image_enc, FeatureCache(tmp_path, text_enc.info, image_enc.info))
    assert len(features) == 0 and features.text.shape == (0, 8) and features.image.shape == (0, 4)


def test_missing_column_is_a_schema_error(news, fake_encoders):
    frame, images = news
    with pytest.raises(SchemaError, match=r"news table: field 'content_hash' has 'missing', expected a column 'content_hash'"):
        encode_items(frame.drop(columns=[CONTENT_HASH]), images, *fake_encoders)


def test_repeated_news_id_is_a_schema_error(news, fake_encoders):
    frame, images = news
    repeated = pd.concat([frame, frame.iloc[[3]]], ignore_index=True)
    with pytest.raises(SchemaError, match=r"field 'news_id' has 'N3', expected unique news ids \(row 10 repeats it\)"):
        encode_items(repeated, images, *fake_encoders)


def test_missing_content_hash_is_a_schema_error(news, fake_encoders):
    frame, images = news
    frame.loc[2, CONTENT_HASH] = None
    with pytest.raises(SchemaError, match=r"field 'content_hash' has None, expected a content hash for news id 'N2'"):
        encode_items(frame, images, *fake_encoders)


def test_batch_size_must_be_positive(news, fake_encoders):
    frame, images = news
    with pytest.raises(ValueError, match="batch_size is 0"):
        encode_items(frame, images, *fake_encoders, batch_size=0)


@pytest.mark.slow
def test_real_encoders_end_to_end(tmp_path, sample_photos, text_encoder, image_encoder):
    frame = pd.DataFrame(
        {
            NEWS_ID: ["N1", "N2", "N3"],
            CATEGORY: ["travel", "lifestyle", "news"],
            TITLE: ["Ancient temples draw record crowds", "Spring flowers bloom early", "Navy pioneer honoured"],
            ABSTRACT: [None, None, None],
            IMAGE_PATH: [sample_photos["china"].name, None, str(sample_photos["grace_hopper"])],
            IMAGE_STATUS: [IMAGE_OK, IMAGE_MISSING, IMAGE_OK],
            CONTENT_HASH: ["a", "b", "c"],
        }
    )
    images_dir = sample_photos["china"].parent  # the absolute path of N3 overrides it
    cache = FeatureCache(tmp_path, text_encoder.info, image_encoder.info)
    first = encode_items(frame, images_dir, text_encoder, image_encoder, cache)
    assert first.has_image.tolist() == [True, False, True]
    assert first.text.shape == (3, 384) and first.image.shape == (3, 1024)
    np.testing.assert_allclose(np.linalg.norm(first.text, axis=1), 1.0, atol=1e-5)
    direct, _ = image_encoder.encode([sample_photos["china"]])
    cosine = first.image[0] @ direct[0] / (np.linalg.norm(first.image[0]) * np.linalg.norm(direct[0]))
    assert cosine >= 0.999  # float16 storage
    second = encode_items(frame, images_dir, text_encoder, image_encoder, FeatureCache(tmp_path, text_encoder.info, image_encoder.info))
    assert_same_features(first, second)


@pytest.mark.parametrize("column", ["text", "image", "has_image", "categories"])
def test_item_features_refuse_a_column_of_another_length(column):
    from recsys.encoders.item_features import EncoderInfo, ItemFeatures

    columns = {"text": np.zeros((3, 2), np.float32), "image": np.zeros((3, 2), np.float32),
               "has_image": np.zeros(3, bool), "categories": np.array(["a", "b", "c"], dtype=object)}
    columns[column] = columns[column][:2]
    info = EncoderInfo("enc", "1", 2)
    with pytest.raises(ValueError, match=f"ItemFeatures.{column} has 2 rows, expected 3"):
        ItemFeatures(np.array(["N1", "N2", "N3"], dtype=object), text_encoder=info, image_encoder=info, **columns)


def test_encoder_info_round_trips_through_its_dict():
    from recsys.encoders.item_features import EncoderInfo

    info = EncoderInfo("all-MiniLM-L6-v2-int8", "sha256:0123abcd+len:128", 384)
    as_dict = info.to_dict()
    assert as_dict == {"name": "all-MiniLM-L6-v2-int8", "version": "sha256:0123abcd+len:128", "dim": 384}
    assert EncoderInfo.from_dict(as_dict) == info
