"""Safe decoding of cover images: modes, orientation, limits and broken files."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from recsys.columns import IMAGE_OK
from recsys.data.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_JPEG_SCANS, check_image_file
from recsys.encoders.image import ImageDecodeError, load_image_rgb
from tests.jpeg_scans import progressive_jpeg, progressive_mpo

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def halves(width: int, height: int, left=RED, right=BLUE) -> Image.Image:
    """An RGB image whose left half is ``left`` and right half ``right``."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = left
    pixels[:, width // 2 :] = right
    return Image.fromarray(pixels)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width`` x ``height`` pixels (the data is one row)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 4)) + chunk(b"IEND", b"")


def test_rgb_jpeg_is_resized_and_centre_cropped(tmp_path):
    path = tmp_path / "wide.jpg"
    # 300x100: the centre crop keeps the middle third, which is split red | blue.
    halves(300, 100).save(path, quality=95)
    out = load_image_rgb(path, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert np.abs(out[32, 5].astype(int) - RED).max() < 40
    assert np.abs(out[32, 58].astype(int) - BLUE).max() < 40


@pytest.mark.parametrize(
    "mode, suffix",
    [("L", ".png"), ("P", ".png"), ("RGBA", ".png"), ("LA", ".png"), ("CMYK", ".jpg"), ("1", ".png"), ("RGB", ".webp")],
)
def test_every_colour_mode_becomes_rgb(tmp_path, mode, suffix):
    gradient = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1))
    grey = Image.fromarray(gradient)
    source = grey.convert(mode) if mode != "RGB" else Image.merge("RGB", [grey] * 3)
    path = tmp_path / f"img{suffix}"
    source.save(path)
    out = load_image_rgb(path, 24)
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    # Every mode keeps the dark-to-light gradient from left to right.
    assert out[:, :4].mean() + 60 < out[:, -4:].mean()


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((20, 20), 32896, np.uint16)).save(path)  # 32896 / 257 = 128
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    out = load_image_rgb(path, 10)
    assert np.all(out == 128)


def test_transparent_pixels_are_composited_on_white(tmp_path):
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[:, :10] = (255, 0, 0, 255)  # opaque red
    rgba[:, 10:] = (0, 0, 255, 0)  # fully transparent blue
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba).save(path)
    out = load_image_rgb(path, 20)
    assert tuple(out[10, 2]) == RED
    assert tuple(out[10, 17]) == WHITE


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (10, 10), 1)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    path = tmp_path / "palette.png"
    image.save(path, transparency=1)
    assert tuple(load_image_rgb(path, 10)[5, 5]) == WHITE


def test_a_transparent_colour_in_an_rgb_png_is_composited_on_white(tmp_path):
    pixels = np.zeros((20, 20, 3), np.uint8)  # left half black: the tRNS colour
    pixels[:, 10:] = (200, 30, 60)
    path = tmp_path / "rgb_trns.png"
    Image.fromarray(pixels).save(path, transparency=(0, 0, 0))
    out = load_image_rgb(path, 20)
    assert tuple(out[10, 3]) == WHITE
    assert tuple(out[10, 16]) == (200, 30, 60)


def _grey16_png(values: np.ndarray, *, transparent: int) -> bytes:
    """A 16-bit greyscale PNG with a tRNS value, written chunk by chunk (PNG spec, colour type 0)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = values.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)  # filter type 0 per row
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0))
            + chunk(b"tRNS", struct.pack(">H", transparent)) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_a_transparent_value_in_a_sixteen_bit_grey_png_is_composited_on_white(tmp_path):
    values = np.zeros((30, 30), np.uint16)  # left third 0: the tRNS value
    values[:, 10:20] = 1  # 1 / 257 rounds to 0, but it is not the transparent value: black
    values[:, 20:] = 32896  # 32896 / 257 = 128
    path = tmp_path / "grey16_trns.png"
    path.write_bytes(_grey16_png(values, transparent=0))  # Pillow 10's writer refuses this mode's tRNS
    with Image.open(path) as check:
        assert check.mode.startswith("I") and check.info["transparency"] == 0
    out = load_image_rgb(path, 30)
    assert tuple(out[15, 4]) == WHITE
    assert tuple(out[15, 14]) == (0, 0, 0)
    assert tuple(out[15, 25]) == (128, 128, 128)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    halves(80, 40).save(path, exif=exif, quality=95)
    out = load_image_rgb(path, 32)
    # Displayed upright the image is 40x80 with red on top and blue below.
    assert np.abs(out[2, 16].astype(int) - RED).max() < 40
    assert np.abs(out[29, 16].astype(int) - BLUE).max() < 40
    assert np.abs(out[2, 2].astype(int) - out[2, 29].astype(int)).max() < 40  # top row is all red


def rotated_jpeg_with_a_damaged_tag(path) -> None:
    """halves(80, 40) with EXIF orientation 6 and a DateTime entry whose tag id was hit by a bit
    flip: it now reads as BitsPerSample (a number) holding text, as fuzzed camera files do."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x0132] = "2019:01:01 00:00:00"
    data = exif.tobytes()
    entry = b"\x01\x32\x00\x02"  # big-endian: tag 0x0132 (DateTime), type 2 (ASCII)
    assert data.count(entry) == 1
    halves(80, 40).save(path, exif=data.replace(entry, b"\x01\x02\x00\x02"), quality=95)


def test_a_damaged_exif_tag_does_not_stop_the_orientation(tmp_path):
    # ImageOps.exif_transpose rewrote the whole EXIF block and raised struct.error on it; ingest,
    # which does not read EXIF, had found the cover usable.
    path = tmp_path / "damaged_tag.jpg"
    rotated_jpeg_with_a_damaged_tag(path)
    assert check_image_file(path).status == IMAGE_OK
    out = load_image_rgb(path, 32)
    assert np.abs(out[2, 16].astype(int) - RED).max() < 40  # upright: red on top, blue below
    assert np.abs(out[29, 16].astype(int) - BLUE).max() < 40


def test_an_unreadable_exif_orientation_leaves_the_picture_as_stored(tmp_path):
    path = tmp_path / "truncated_exif.jpg"
    # One IFD entry (the orientation) announced, its 12 bytes cut short.
    halves(80, 40).save(path, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03", quality=95)
    assert check_image_file(path).status == IMAGE_OK
    out = load_image_rgb(path, 32)
    assert np.abs(out[16, 2].astype(int) - RED).max() < 40  # as stored: red left, blue right
    assert np.abs(out[16, 29].astype(int) - BLUE).max() < 40


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match=r"empty.jpg: file is empty \(0 bytes\)"):
        load_image_rgb(path, 32)


def test_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError, match=r"nope.jpg: cannot be read \(No such file or directory\)"):
        load_image_rgb(tmp_path / "nope.jpg", 32)


def test_a_named_pipe_or_a_folder_is_refused_without_being_opened(tmp_path):
    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)  # opening it for reading would block until a writer comes
    with pytest.raises(ImageDecodeError, match=r"pipe.jpg: is a named pipe, not a regular file"):
        load_image_rgb(pipe, 32)
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(ImageDecodeError, match=r"folder.jpg: is a folder, not a regular file"):
        load_image_rgb(tmp_path / "folder.jpg", 32)


def test_non_image_bytes_with_a_jpg_name(tmp_path):
    path = tmp_path / "fake.jpg"
    path.write_bytes(b"<html><body>404 Not Found</body></html>")
    with pytest.raises(ImageDecodeError, match=r"fake.jpg: not a recognised image format") as info:
        load_image_rgb(path, 32)
    assert info.value.path == str(path)


def test_truncated_file(tmp_path):
    full = tmp_path / "full.jpg"
    halves(200, 200).save(full, quality=95)
    path = tmp_path / "truncated.jpg"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImageDecodeError, match=r"truncated.jpg: cannot be decoded \(OSError: image file is truncated"):
        load_image_rgb(path, 32)


def test_file_over_the_byte_limit_is_not_opened(tmp_path):
    path = tmp_path / "huge.jpg"
    with open(path, "wb") as f:
        f.truncate(MAX_IMAGE_BYTES + 1)  # sparse: no real disk used
    with pytest.raises(ImageDecodeError, match=rf"huge.jpg: file is {MAX_IMAGE_BYTES + 1} bytes, over the limit"):
        load_image_rgb(path, 32)


def test_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path):
    side = int(MAX_IMAGE_PIXELS**0.5) + 1
    path = tmp_path / "big.png"
    path.write_bytes(png_declaring(side, side))
    with pytest.raises(ImageDecodeError, match=rf"big.png: image is {side}x{side} = {side * side} pixels, over the limit"):
        load_image_rgb(path, 32)


@pytest.mark.parametrize("side", [10_000, 100_000])
def test_decompression_bomb_is_refused(tmp_path, side):
    # 10000^2 is past Pillow's warning threshold, 100000^2 past its hard limit.
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(side, side))
    assert path.stat().st_size < 100
    with pytest.raises(ImageDecodeError, match=r"bomb.png: too many pixels, refused as a decompression bomb"):
        load_image_rgb(path, 32)


# An MPO (a camera's stereo pair) is held to the limit by the picture Pillow decodes, its first.
@pytest.mark.parametrize("progressive", [progressive_jpeg, progressive_mpo], ids=["jpeg", "mpo"])
def test_a_progressive_jpeg_of_too_many_scans_is_refused_before_decoding(tmp_path, progressive):
    path = tmp_path / "scans.jpg"
    path.write_bytes(progressive(extra_scans=MAX_JPEG_SCANS)[0])
    with pytest.raises(ImageDecodeError, match=rf"scans.jpg: progressive JPEG of more than {MAX_JPEG_SCANS} scans"):
        load_image_rgb(path, 32)
    # Under the limit the repeated scans decode to the picture.
    path.write_bytes(progressive(extra_scans=MAX_JPEG_SCANS - 20)[0])
    assert np.abs(load_image_rgb(path, 32).astype(int) - (90, 140, 200)).max() <= 3


def test_size_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="image size is 0, expected at least 1 pixel"):
        load_image_rgb(tmp_path / "x.jpg", 0)


def test_small_images_are_upscaled(tmp_path):
    path = tmp_path / "tiny.png"
    halves(4, 4).save(path)
    assert load_image_rgb(path, 32).shape == (32, 32, 3)
