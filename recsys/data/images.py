"""Cover images: where they are, whether they are usable, and the limits that keep them safe."""

from __future__ import annotations

# Files larger than this are not opened at all (status "too_large").
MAX_IMAGE_BYTES = 20 * 1024 * 1024
# Decompression-bomb guard: more pixels than this is refused (status "too_large").
MAX_IMAGE_PIXELS = 40_000_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
