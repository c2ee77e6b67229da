"""Cover-image checks: every status, case-insensitive extensions, and no escape from the folder."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from recsys.columns import IMAGE_BAD_NAME, IMAGE_CORRUPT, IMAGE_EMPTY, IMAGE_MISSING, IMAGE_OK, IMAGE_TOO_LARGE
from recsys.data.images import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_JPEG_SCANS,
    ImageCheck,
    inspect_image,
    jpeg_scans,
    list_images,
)
from tests.jpeg_scans import progressive_jpeg, progressive_mpo, with_thumbnail


def image_bytes(fmt: str, size=(48, 32), seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny (wrong) data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    return folder


def check(folder, news_id):
    """inspect_image with and without a listing must agree."""
    without = inspect_image(folder, news_id)
    with_listing = inspect_image(folder, news_id, listing=list_images(folder))
    assert without == with_listing
    return without


@pytest.mark.parametrize(("fmt", "ext"), [("JPEG", ".jpg"), ("JPEG", ".jpeg"), ("PNG", ".png"), ("WEBP", ".webp"), ("JPEG", ".JPG"), ("PNG", ".Png")])
def test_valid_images_are_ok_with_their_sha256(images, fmt, ext):
    data = image_bytes(fmt)
    (images / f"N1{ext}").write_bytes(data)
    assert check(images, "N1") == ImageCheck(f"N1{ext}", IMAGE_OK, hashlib.sha256(data).hexdigest())


def test_missing_image(images):
    (images / "N2.jpg").write_bytes(image_bytes("JPEG"))
    assert check(images, "N1") == ImageCheck(None, IMAGE_MISSING, None)


def test_the_news_id_is_case_sensitive(images):
    (images / "n1.jpg").write_bytes(image_bytes("JPEG"))
    assert check(images, "N1").status == IMAGE_MISSING
    assert check(images, "n1").status == IMAGE_OK


def test_first_extension_in_order_wins(images):
    (images / "N1.png").write_bytes(image_bytes("PNG"))
    (images / "N1.jpg").write_bytes(image_bytes("JPEG"))
    assert check(images, "N1").path == "N1.jpg"


def test_extensions_are_tried_jpg_jpeg_png_webp(images):
    # The documented order, every pair of it: the first usable file wins.
    for ext, fmt in ((".webp", "WEBP"), (".png", "PNG"), (".jpeg", "JPEG")):
        (images / f"N1{ext}").write_bytes(image_bytes(fmt))
        assert check(images, "N1").path == f"N1{ext}"


def test_an_extension_in_two_cases_picks_the_first_name_in_sorted_order(images):
    # "N1.JPG" < "N1.jpg" (upper case sorts first), whatever the directory order.
    (images / "N1.jpg").write_bytes(image_bytes("JPEG", seed=1))
    upper = image_bytes("JPEG", seed=2)
    (images / "N1.JPG").write_bytes(upper)
    assert check(images, "N1") == ImageCheck("N1.JPG", IMAGE_OK, hashlib.sha256(upper).hexdigest())


@pytest.mark.parametrize("news_id", ["N_1", "N-1", "a" * 64])
def test_ids_of_letters_digits_underscore_and_hyphen_up_to_64_name_their_cover(images, news_id):
    (images / f"{news_id}.png").write_bytes(image_bytes("PNG"))
    assert check(images, news_id).path == f"{news_id}.png"


def test_zero_byte_file_is_empty(images):
    (images / "N1.jpg").write_bytes(b"")
    assert check(images, "N1") == ImageCheck(None, IMAGE_EMPTY, hashlib.sha256(b"").hexdigest(), "0 bytes")


def test_random_bytes_are_corrupt(images):
    data = os.urandom(2000)
    (images / "N1.png").write_bytes(data)
    assert check(images, "N1") == ImageCheck(None, IMAGE_CORRUPT, hashlib.sha256(data).hexdigest(),
                                             "not a JPEG, PNG or WebP image")


@pytest.mark.parametrize(("fmt", "ext"), [("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp")])
def test_truncated_images_are_corrupt(images, fmt, ext):
    data = image_bytes(fmt, size=(256, 256))
    (images / f"N1{ext}").write_bytes(data[: len(data) // 2])
    if fmt != "WEBP":  # (Pillow's WebP reader decodes on open)
        # The header alone looks fine: only a full decode finds the missing half.
        with Image.open(images / f"N1{ext}") as img:
            assert img.size == (256, 256)
    assert check(images, "N1").status == IMAGE_CORRUPT


def test_png_with_a_bad_checksum_is_corrupt(images):
    data = bytearray(image_bytes("PNG"))
    data[-20] ^= 0xFF  # inside the last IDAT chunk or its CRC
    (images / "N1.png").write_bytes(bytes(data))
    assert check(images, "N1").status == IMAGE_CORRUPT


@pytest.mark.parametrize(("fmt", "ext"), [("PNG", ".jpg"), ("WEBP", ".jpg"), ("JPEG", ".png"), ("JPEG", ".webp")])
def test_an_image_under_another_image_extension_is_ok(images, fmt, ext):
    # Image CDNs serve WebP or PNG under .jpg names; the encoder decodes by content.
    data = image_bytes(fmt)
    (images / f"N1{ext}").write_bytes(data)
    assert check(images, "N1") == ImageCheck(f"N1{ext}", IMAGE_OK, hashlib.sha256(data).hexdigest())


def test_a_camera_jpeg_with_a_multi_picture_index_is_ok(images):
    # Cameras write a large preview after the main picture (MPF); Pillow calls such files MPO.
    out = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(out, format="MPO", save_all=True, append_images=[Image.new("RGB", (20, 15))])
    with Image.open(io.BytesIO(out.getvalue())) as img:
        assert img.format == "MPO"
    (images / "N1.jpg").write_bytes(out.getvalue())
    assert check(images, "N1") == ImageCheck("N1.jpg", IMAGE_OK, hashlib.sha256(out.getvalue()).hexdigest())


def test_a_damaged_first_file_does_not_hide_a_good_second_one(images):
    good = image_bytes("PNG")
    (images / "N1.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (images / "N1.png").write_bytes(good)
    assert check(images, "N1") == ImageCheck("N1.png", IMAGE_OK, hashlib.sha256(good).hexdigest())
    # None usable: the first file's status, in extension order.
    (images / "N2.jpg").write_bytes(b"")
    (images / "N2.webp").write_bytes(os.urandom(500))
    assert check(images, "N2") == ImageCheck(None, IMAGE_EMPTY, hashlib.sha256(b"").hexdigest(), "0 bytes")


def test_other_formats_under_an_image_extension_are_corrupt(images):
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="GIF")
    (images / "N1.png").write_bytes(out.getvalue())
    assert check(images, "N1").status == IMAGE_CORRUPT


def test_more_pixels_than_the_limit_is_too_large(images):
    width = 8000
    height = MAX_IMAGE_PIXELS // width + 1
    (images / "N1.png").write_bytes(png_header_only(width, height))
    assert check(images, "N1").status == IMAGE_TOO_LARGE


def test_exactly_the_pixel_limit_is_not_too_large(images):
    # 8000 x 5000 = 40 000 000 = MAX_IMAGE_PIXELS: allowed, so the header-only file is then
    # decoded and found corrupt (its data chunk is far too short), not refused for its size.
    assert 8000 * 5000 == MAX_IMAGE_PIXELS
    (images / "N1.png").write_bytes(png_header_only(8000, 5000))
    assert check(images, "N1").status == IMAGE_CORRUPT


def test_decompression_bomb_beyond_pillows_own_limit_is_too_large(images):
    # 40000 x 40000 = 1.6e9 pixels: Pillow itself raises DecompressionBombError on open.
    (images / "N1.png").write_bytes(png_header_only(40_000, 40_000))
    assert check(images, "N1").status == IMAGE_TOO_LARGE


def test_between_pillows_warning_and_error_limits_is_too_large(images):
    # ~100 M pixels: Pillow only warns here; the warning must not leak and the image is refused.
    (images / "N1.png").write_bytes(png_header_only(10_000, 10_000))
    assert check(images, "N1").status == IMAGE_TOO_LARGE


def test_a_real_compressed_bomb_is_refused_without_decoding(images):
    # 7000 x 6000 black PNG: a few KB on disk, 42 M pixels (126 MB decoded).
    Image.new("1", (7000, 6000)).save(images / "N1.png")
    assert (images / "N1.png").stat().st_size < 100_000
    assert check(images, "N1").status == IMAGE_TOO_LARGE


def test_jpeg_scans_are_counted_from_the_markers():
    plain, _ = progressive_jpeg(extra_scans=0)
    for extra in (0, 5):
        data, scans = progressive_jpeg(extra_scans=extra)
        assert scans > 1 + extra  # a progressive file has several scans of its own
        assert jpeg_scans(data) == scans
        # A thumbnail in an APP segment is skipped, not counted, and does not end the walk.
        assert jpeg_scans(with_thumbnail(data, plain)) == scans
    assert jpeg_scans(image_bytes("JPEG")) == 1  # baseline
    # The count stops at the first picture's EOI (an MPO's later pictures, here after some
    # padding, are not decoded).
    data, scans = progressive_jpeg(extra_scans=5)
    assert jpeg_scans(data + bytes(16) + data) == scans
    assert jpeg_scans(image_bytes("PNG")) == 0
    data, scans = progressive_jpeg(extra_scans=50)
    assert jpeg_scans(data, limit=20) == 21  # stops counting past the limit
    # Junk between segments and fill bytes before a marker: skipped, as libjpeg skips them and
    # decodes on (a count that stopped at the junk byte let any number of scans through).
    app0_end = 4 + int.from_bytes(data[4:6], "big")
    assert data[app0_end] == 0xFF
    for junk in (b"\x00", b"junk\xff\x00", b"\xff\xff\xff"):
        assert jpeg_scans(data[:app0_end] + junk + data[app0_end:], limit=10**6) == scans
    assert jpeg_scans(b"\xff\xd8" + b"\xff" * 100_000) == 0  # a run of fill bytes, at C speed


def test_a_run_of_0xff_that_no_marker_ends_is_walked_in_linear_time(images):
    # "\xff+" then a marker byte, searched for, was tried again from every byte of such a run:
    # quadratic, 15 s for 40 KB after a scan (weeks for a 20 MiB cover), in ingest's check of
    # a file Pillow opens as a 16x16 JPEG.
    baseline = image_bytes("JPEG", size=(16, 16))
    sos = baseline.index(b"\xff\xda")
    header = baseline[: sos + 2 + int.from_bytes(baseline[sos + 2 : sos + 4], "big")]
    data = header + b"\xff" * 60_000 + b"\x00" + b"\xff\xd9"
    start = time.perf_counter()
    assert jpeg_scans(data) == 1  # one SOS; 0xFF 0x00 is no marker, then EOI
    assert time.perf_counter() - start < 2  # about 40 s before
    (images / "N1.jpg").write_bytes(data)
    assert check(images, "N1").sha256 == hashlib.sha256(data).hexdigest()


def test_a_progressive_jpeg_of_too_many_scans_is_too_large_without_decoding(images):
    data, scans = progressive_jpeg(extra_scans=MAX_JPEG_SCANS)
    assert scans > MAX_JPEG_SCANS
    (images / "N1.jpg").write_bytes(data)
    assert check(images, "N1").status == IMAGE_TOO_LARGE
    app0_end = 4 + int.from_bytes(data[4:6], "big")
    (images / "N3.jpg").write_bytes(data[:app0_end] + b"\x00" + data[app0_end:])  # decodes all the same
    assert check(images, "N3").status == IMAGE_TOO_LARGE
    data, scans = progressive_jpeg(extra_scans=MAX_JPEG_SCANS - 20)
    assert scans <= MAX_JPEG_SCANS
    (images / "N2.jpg").write_bytes(data)
    assert check(images, "N2").status == IMAGE_OK


def test_an_mpo_is_held_to_the_scan_limit_by_the_picture_pillow_decodes(images):
    # A camera's stereo pair opens as MPO, not JPEG: its first picture is what gets decoded.
    data, scans = progressive_mpo(extra_scans=MAX_JPEG_SCANS)
    assert scans > MAX_JPEG_SCANS and jpeg_scans(data) == MAX_JPEG_SCANS + 1
    with Image.open(io.BytesIO(data)) as opened:
        assert (opened.format, opened.n_frames) == ("MPO", 2)
    (images / "N1.jpg").write_bytes(data)
    assert check(images, "N1").status == IMAGE_TOO_LARGE
    # Under the limit in its first picture, over it with the second's (which is never decoded).
    data, scans = progressive_mpo(extra_scans=MAX_JPEG_SCANS - 15, later_scans=20)
    assert scans <= MAX_JPEG_SCANS < data.count(b"\xff\xda")
    (images / "N2.jpg").write_bytes(data)
    assert check(images, "N2").status == IMAGE_OK


def test_a_jpeg_of_exactly_the_scan_limit_is_ok(images):
    _, own = progressive_jpeg(extra_scans=0)
    data, scans = progressive_jpeg(extra_scans=MAX_JPEG_SCANS - own)
    assert scans == MAX_JPEG_SCANS
    (images / "N1.jpg").write_bytes(data)
    assert check(images, "N1").status == IMAGE_OK
    data, scans = progressive_jpeg(extra_scans=MAX_JPEG_SCANS - own + 1)
    (images / "N2.jpg").write_bytes(data)
    assert check(images, "N2").status == IMAGE_TOO_LARGE


def test_the_reasons_say_what_is_wrong_with_the_picture(images):
    (images / "N1.png").write_bytes(png_header_only(8000, 6000))
    assert check(images, "N1").reason == "8000x6000 = 48000000 pixels, over the limit of 40000000"
    (images / "N2.jpg").write_bytes(progressive_jpeg(extra_scans=MAX_JPEG_SCANS)[0])
    assert check(images, "N2").reason == f"a JPEG of more than {MAX_JPEG_SCANS} scans"
    (images / "N3.jpg").write_bytes(image_bytes("JPEG")[:300])
    assert check(images, "N3").reason.startswith("cannot be decoded (OSError: ")
    (images / "N4.jpg").write_bytes(image_bytes("GIF"))
    assert check(images, "N4").reason == "not a JPEG, PNG or WebP image"  # Pillow is not asked to read GIF


def test_a_cover_that_cannot_be_read_says_why(images, monkeypatch):
    # A permission to fix, not a damaged picture: the log must say so. As root (CI) the
    # permission bits do not stop a read, so the refusal is simulated at open().
    (images / "N1.jpg").write_bytes(image_bytes("JPEG"))
    real_open = open

    def refusing_open(path, *args, **kwargs):
        if str(path).endswith("N1.jpg"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing_open)
    assert check(images, "N1") == ImageCheck(None, IMAGE_CORRUPT, None, "cannot be read: Permission denied")


def test_file_over_the_byte_limit_is_too_large_without_being_read(images):
    with open(images / "N1.jpg", "wb") as f:
        f.truncate(MAX_IMAGE_BYTES + 1)  # sparse: costs no disk
    assert check(images, "N1") == ImageCheck(None, IMAGE_TOO_LARGE, None,
                                             f"{MAX_IMAGE_BYTES + 1} bytes, over the limit of {MAX_IMAGE_BYTES}")


def test_file_of_exactly_the_byte_limit_is_read(images):
    with open(images / "N1.jpg", "wb") as f:
        f.truncate(MAX_IMAGE_BYTES)  # sparse zeros: read, hashed, and not an image
    check_ = check(images, "N1")
    assert (check_.status, check_.reason) == (IMAGE_CORRUPT, "not a JPEG, PNG or WebP image")
    assert check_.sha256 == hashlib.sha256(bytes(MAX_IMAGE_BYTES)).hexdigest()


def test_symlink_leaving_the_folder_is_a_bad_name(images, tmp_path):
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(image_bytes("JPEG"))
    (images / "N1.jpg").symlink_to(outside)
    (images / "N2.jpg").symlink_to("../secret.jpg")
    outside_folder = ImageCheck(None, IMAGE_BAD_NAME, None, f"a link to {outside.resolve()}, outside the images folder")
    assert check(images, "N1") == outside_folder
    assert check(images, "N2") == outside_folder


def test_symlink_inside_the_folder_points_at_its_target(images):
    (images / "shared").mkdir()
    data = image_bytes("JPEG")
    (images / "shared" / "cover.jpg").write_bytes(data)
    (images / "N1.jpg").symlink_to(images / "shared" / "cover.jpg")
    assert check(images, "N1") == ImageCheck("shared/cover.jpg", IMAGE_OK, hashlib.sha256(data).hexdigest())


def test_dangling_symlink_is_missing_and_a_loop_is_a_bad_name(images):
    (images / "N1.jpg").symlink_to(images / "gone.jpg")
    (images / "N2.jpg").symlink_to(images / "N2.jpg")
    assert check(images, "N1").status == IMAGE_MISSING
    loop = check(images, "N2")
    assert (loop.status, loop.sha256) == (IMAGE_BAD_NAME, None)
    assert loop.reason.startswith("cannot be resolved (Symlink loop")


def test_symlink_to_a_file_with_another_extension_is_a_bad_name(images):
    (images / "cover.gif").write_bytes(image_bytes("JPEG"))
    (images / "N1.jpg").symlink_to(images / "cover.gif")
    assert check(images, "N1") == ImageCheck(None, IMAGE_BAD_NAME, None, "a link to cover.gif, whose extension is not an image's")


def test_a_folder_named_like_an_image_is_a_bad_name(images):
    (images / "N1.jpg").mkdir()
    assert check(images, "N1") == ImageCheck(None, IMAGE_BAD_NAME, None, "not a regular file")


@pytest.mark.parametrize("news_id", ["../N1", "N1/../../x", "", "N 1", "a" * 65])
def test_ids_that_could_name_another_path_are_bad_names(images, news_id):
    assert inspect_image(images, news_id) == ImageCheck(None, IMAGE_BAD_NAME, None, "the news id cannot name a file")


def test_images_folder_that_is_a_symlink_is_followed(images, tmp_path):
    (images / "N1.png").write_bytes(image_bytes("PNG"))
    link = tmp_path / "link"
    link.symlink_to(images)
    assert check(link, "N1").status == IMAGE_OK


def test_missing_images_folder_means_missing_images(tmp_path):
    assert inspect_image(tmp_path / "nope", "N1") == ImageCheck(None, IMAGE_MISSING, None)


def test_running_out_of_memory_while_decoding_is_not_a_corrupt_cover(images, monkeypatch):
    # It was caught with every decoder error and stored the cover as corrupt for good.
    from recsys.data import images as images_module

    (images / "N1.jpg").write_bytes(image_bytes("JPEG"))

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(images_module.Image, "open", out_of_memory)
    with pytest.raises(MemoryError):
        inspect_image(images, "N1")
