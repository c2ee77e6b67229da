"""Cover images: where they are, whether they are usable, and the limits that keep them safe."""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from PIL import Image, UnidentifiedImageError

from recsys.columns import IMAGE_BAD_NAME, IMAGE_CORRUPT, IMAGE_EMPTY, IMAGE_MISSING, IMAGE_OK, IMAGE_TOO_LARGE

# Files larger than this are not opened at all (status "too_large").
MAX_IMAGE_BYTES = 20 * 1024 * 1024
# Decompression-bomb guard: more pixels than this is refused (status "too_large").
MAX_IMAGE_PIXELS = 40_000_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# CPU-bomb guard: a progressive JPEG is decoded scan by scan, each a pass over every pixel, and
# nothing in the format bounds their number: 259 KB repeating one scan 2000 times took 48 s to
# decode at 6000x6000 (a 20 MiB file could hold hours). Encoders write 10 or so (libjpeg's
# progressive script has 10, mozjpeg's tuned ones fewer than 64). As libjpeg-turbo's
# `djpeg -maxscans` does, more is refused (status "too_large").
MAX_JPEG_SCANS = 100

# Pillow's plugins tried on a cover, whatever its extension: image CDNs often serve WebP or
# PNG under a .jpg name, and the encoder decodes by content too.
_DECODERS = ("JPEG", "PNG", "WEBP")
# Formats those plugins report: "MPO" is a JPEG with a multi-picture index (camera JPEGs
# that embed a large preview), which decodes as the first picture.
_ACCEPTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP")
_NEWS_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Inside a scan's entropy-coded data 0xFF is followed by 0x00 (a stuffed byte) or a restart
# marker (D0-D7): anything else ends the scan.
_END_OF_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7]")
# A marker: 0xFF (any number of them: fill bytes) and a byte that is neither 0xFF nor 0x00,
# found by its last 0xFF: "\xff+" there was tried again from every byte of a run of 0xFF that no
# such byte ends (40 KB of 0xFF and a 0x00 after a scan took 15 s, a 20 MiB cover weeks).
_NEXT_MARKER = re.compile(rb"\xff[^\xff\x00]")


class ImageCheck(NamedTuple):
    """What ``inspect_image`` found for one article.

    Attributes:
        path: the image's path relative to the images folder (POSIX separators), or None
            when there is no usable image.
        status: one of ``recsys.columns.IMAGE_STATUSES``.
        sha256: hex digest of the file bytes when the file could be read (also for a corrupt
            file, so that replacing it changes the article's content hash), else None.
        reason: for an unusable file, what is wrong with it, for the log (``"cannot be read:
            Permission denied"``, ``"6000x9000 = 54000000 pixels, over the limit of 40000000"``);
            None for ok and missing.
    """

    path: str | None
    status: str
    sha256: str | None
    reason: str | None = None


def list_images(images_dir: Path) -> dict[str, str]:
    """Map ``<stem><lower-cased extension>`` -> real file name for the covers in ``images_dir``.

    ``inspect_image`` takes this listing so that a whole ingest lists the folder once
    instead of once per article. Only names with an image extension are kept.
    """
    listing: dict[str, str] = {}
    with os.scandir(images_dir) as entries:
        for entry in entries:
            stem, dot, ext = entry.name.rpartition(".")
            key = f"{stem}.{ext.lower()}"
            if dot and key.endswith(IMAGE_EXTENSIONS):
                # "N1.JPG" and "N1.jpg" both present: keep the first in sorted order, so the
                # choice does not depend on directory order.
                if key not in listing or entry.name < listing[key]:
                    listing[key] = entry.name
    return listing


def image_names(listing: Mapping[str, str], news_id: str) -> list[str]:
    """The file names in ``listing`` (``list_images``) that may hold ``news_id``'s cover, in the
    order ``IMAGE_EXTENSIONS`` checks them."""
    return [listing[news_id + ext] for ext in IMAGE_EXTENSIONS if news_id + ext in listing]


def inspect_image(images_dir: Path, news_id: str, *, listing: Mapping[str, str] | None = None) -> ImageCheck:
    """Find and check the cover image of ``news_id``: ``<NewsID>.<jpg|jpeg|png|webp>``.

    The extension is matched case-insensitively (the id is not); when several files match,
    they are checked in the order of ``IMAGE_EXTENSIONS`` and the first usable one wins (a
    damaged ``N1.jpg`` does not hide a good ``N1.png``); when none is usable, the first one's
    status is returned. The file must stay inside ``images_dir`` once symlinks are resolved.
    Checks, in order: size (empty, over ``MAX_IMAGE_BYTES``), the header (JPEG, PNG or WebP
    content, whichever of the image extensions it carries; at most ``MAX_IMAGE_PIXELS``),
    ``verify()`` for PNG (chunk checksums), and a full decode, which is what catches
    truncated files.

    Args:
        images_dir: the folder of cover images.
        news_id: the article id.
        listing: ``list_images(images_dir)``, to avoid listing the folder on every call.

    Returns:
        ``ImageCheck(path, status, sha256)``; ``path`` is set only when status is IMAGE_OK.
        Never raises for a bad file: the status says what is wrong with it.

    Decoding briefly changes the process's warning filters (to refuse Pillow's
    decompression-bomb warning), so call it from one thread at a time.
    """
    if not _NEWS_ID_RE.fullmatch(news_id):
        return ImageCheck(None, IMAGE_BAD_NAME, None, "the news id cannot name a file")
    root = Path(images_dir).resolve()
    if listing is None:
        try:
            listing = list_images(root)
        except OSError:
            return ImageCheck(None, IMAGE_MISSING, None)
    first = None
    for name in image_names(listing, news_id):
        check = _check_file(root, root / name)
        if check.status == IMAGE_OK:
            return check
        first = first or check
    return first or ImageCheck(None, IMAGE_MISSING, None)


def check_image_file(path: str | Path) -> ImageCheck:
    """Check the cover at ``path`` (an absolute ``image_path`` an earlier ingest stored) as
    ``inspect_image`` checks a file found in a folder, its own folder being the root.

    Returns:
        ``ImageCheck(name, status, sha256)``; ``name`` is the file's name when status is
        IMAGE_OK.
    """
    path = Path(path)
    try:
        root = path.parent.resolve()
    except (OSError, RuntimeError):
        return ImageCheck(None, IMAGE_MISSING, None)
    return _check_file(root, path)


def _check_file(root: Path, candidate: Path) -> ImageCheck:
    try:
        target = candidate.resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        return ImageCheck(None, IMAGE_BAD_NAME, None, f"cannot be resolved ({exc})")
    if not target.is_relative_to(root):
        return ImageCheck(None, IMAGE_BAD_NAME, None, f"a link to {target}, outside the images folder")
    if not target.exists():
        return ImageCheck(None, IMAGE_MISSING, None)
    if not target.is_file():
        return ImageCheck(None, IMAGE_BAD_NAME, None, "not a regular file")
    relative = target.relative_to(root).as_posix()
    if not target.name.lower().endswith(IMAGE_EXTENSIONS):  # a link to a file with another extension
        return ImageCheck(None, IMAGE_BAD_NAME, None, f"a link to {target.name}, whose extension is not an image's")
    try:
        size = target.stat().st_size
        if size == 0:
            return ImageCheck(None, IMAGE_EMPTY, hashlib.sha256(b"").hexdigest(), "0 bytes")
        if size > MAX_IMAGE_BYTES:
            return ImageCheck(None, IMAGE_TOO_LARGE, None, f"{size} bytes, over the limit of {MAX_IMAGE_BYTES}")
        with open(target, "rb") as f:
            data = f.read(MAX_IMAGE_BYTES + 1)
    except OSError as exc:  # a permission, an I/O error: the operator's to fix, so the log says which
        return ImageCheck(None, IMAGE_CORRUPT, None, f"cannot be read: {exc.strerror or exc}")
    digest = hashlib.sha256(data).hexdigest()
    if len(data) > MAX_IMAGE_BYTES:  # grew since stat
        return ImageCheck(None, IMAGE_TOO_LARGE, digest, f"over the limit of {MAX_IMAGE_BYTES} bytes")
    status, reason = _decode_status(data)
    return ImageCheck(relative if status == IMAGE_OK else None, status, digest, reason)


def jpeg_scans(data: bytes, *, limit: int = MAX_JPEG_SCANS) -> int:
    """The number of scans (SOS segments) of the first picture of a JPEG, counted up to
    ``limit + 1``, by walking its markers without decoding anything.

    Only the segment structure is read, so an embedded thumbnail (inside an APP segment) is
    not counted, and an MPO's later pictures, after the first EOI, are not either (Pillow
    decodes the first). Bytes between segments that are not a marker are skipped up to the
    next one, as libjpeg skips them ("extraneous bytes before marker") and decodes on: a count
    that stopped there let one junk byte hide any number of scans.

    Args:
        data: the file's bytes (anything; 0 for what does not start like a JPEG).
        limit: stop counting past this many.
    """
    if not data.startswith(b"\xff\xd8"):
        return 0
    scans, at, end = 0, 2, len(data)
    while scans <= limit:
        found = _NEXT_MARKER.search(data, at)  # past junk and fill bytes
        if found is None:
            return scans
        marker, at = data[found.end() - 1], found.end()
        if marker == 0xD9:  # EOI
            return scans
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            continue
        if at + 2 > end:
            return scans
        at += int.from_bytes(data[at:at + 2], "big")
        if marker == 0xDA:  # SOS: its header, then entropy-coded data up to the next marker
            scans += 1
            found = _END_OF_SCAN.search(data, at)
            if found is None:
                return scans
            at = found.start()
    return scans


def too_many_scans(image_format: str | None, data: bytes) -> bool:
    """Whether ``data``, opened by Pillow as ``image_format``, is a JPEG of more than
    ``MAX_JPEG_SCANS`` scans (``jpeg_scans``): refused by ingest's check and the encoder alike."""
    return image_format in ("JPEG", "MPO") and jpeg_scans(data) > MAX_JPEG_SCANS


@contextmanager
def decoding_rules() -> Iterator[None]:
    """Warning filters for decoding a cover, shared by ingest's check and the image encoder so
    that both reach the same verdict whatever the process's own filters (``-W error``).

    Pillow warns (not raises) between its own decompression-bomb limit and twice it: refused,
    as an error. Its other warnings (a corrupt EXIF block) say nothing about the pixels:
    ignored, so a damaged EXIF never makes a cover unusable. Changes the process's warning
    filters while it lasts: one thread at a time.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _decode_status(data: bytes) -> tuple[str, str | None]:
    """``(status, reason)`` of a cover's bytes; the reason is None for an ok one."""
    try:
        with decoding_rules():
            with Image.open(io.BytesIO(data), formats=_DECODERS) as image:
                if image.format not in _ACCEPTED_FORMATS:
                    return IMAGE_CORRUPT, f"a {image.format} image, not a JPEG, PNG or WebP"
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    return IMAGE_TOO_LARGE, f"{width}x{height} = {width * height} pixels, over the limit of {MAX_IMAGE_PIXELS}"
                if width < 1 or height < 1:
                    return IMAGE_CORRUPT, f"{width}x{height} pixels"
                if too_many_scans(image.format, data):
                    return IMAGE_TOO_LARGE, f"a JPEG of more than {MAX_JPEG_SCANS} scans"
                if image.format != "PNG":
                    image.load()  # a full decode is what finds truncated files
                    return IMAGE_OK, None
                image.verify()  # PNG chunk checksums, which decoding alone skips
            # verify() leaves the image unusable; decoding needs a fresh open.
            with Image.open(io.BytesIO(data), formats=_DECODERS) as image:
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return IMAGE_TOO_LARGE, f"refused as a decompression bomb ({exc})"
    except UnidentifiedImageError:
        return IMAGE_CORRUPT, "not a JPEG, PNG or WebP image"
    except MemoryError:  # the machine's problem, not the file's: do not store the cover as corrupt
        raise
    except Exception as exc:  # noqa: BLE001 - decoders of damaged files raise many types (OSError, SyntaxError, struct.error, ...)
        return IMAGE_CORRUPT, f"cannot be decoded ({type(exc).__name__}: {exc})"
    return IMAGE_OK, None
