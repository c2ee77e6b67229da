"""Progressive JPEGs with many scans, the CPU bomb of the format (each scan is a pass over
every pixel, and nothing in the format bounds their number)."""

from __future__ import annotations

import io

from PIL import Image


def progressive_jpeg(side: int = 64, *, extra_scans: int = 0) -> tuple[bytes, int]:
    """A progressive JPEG of ``side`` x ``side`` with its last scan written ``extra_scans``
    more times (a valid file: a repeated refinement scan decodes), and its number of scans.

    The count is the file's SOS markers: a file Pillow writes has no embedded thumbnail, and
    entropy-coded data never holds 0xFF 0xDA, so here each one starts a scan.
    """
    out = io.BytesIO()
    Image.new("RGB", (side, side), (90, 140, 200)).save(out, "JPEG", progressive=True, quality=90)
    data = out.getvalue()
    assert data.endswith(b"\xff\xd9")
    last_scan = data[data.rindex(b"\xff\xda"):-2]
    data = data[:-2] + last_scan * extra_scans + b"\xff\xd9"
    return data, data.count(b"\xff\xda")


def with_thumbnail(data: bytes, thumbnail: bytes) -> bytes:
    """``data`` with ``thumbnail`` (a whole JPEG) inside an APP1 segment after its SOI, where
    cameras put their EXIF thumbnails."""
    body = b"Exif\x00\x00" + thumbnail
    return data[:2] + b"\xff\xe1" + (len(body) + 2).to_bytes(2, "big") + body + data[2:]


def progressive_mpo(side: int = 64, *, extra_scans: int = 0, later_scans: int = 0) -> tuple[bytes, int]:
    """A two-picture MPO (a camera's stereo pair) whose first picture, the one Pillow decodes,
    has its last scan written ``extra_scans`` more times, and whose second picture has its last
    scan written ``later_scans`` more times; and the first picture's number of scans.

    The second picture's offset in the MP index goes stale, which Pillow does not check until
    it seeks to it; the first picture decodes as it is.
    """
    out = io.BytesIO()
    first, second = (Image.new("RGB", (side, side), colour) for colour in ((90, 140, 200), (200, 40, 20)))
    first.save(out, "MPO", save_all=True, append_images=[second], progressive=True, quality=90)
    data = out.getvalue()
    end = data.index(b"\xff\xd9") + 2
    picture = data[:end]
    last_scan = picture[picture.rindex(b"\xff\xda"):-2]
    picture = picture[:-2] + last_scan * extra_scans + b"\xff\xd9"
    later = data[end:]  # Pillow writes it progressive or not, by release
    later = later[:-2] + later[later.rindex(b"\xff\xda"):-2] * later_scans + b"\xff\xd9"
    return picture + later, picture.count(b"\xff\xda")
