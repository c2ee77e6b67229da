"""Cover pictures for the sample world: one drawing family per visual style.

Each style is a recognisable family (its own palette range and composition) whose members all
differ: positions, sizes, counts, angles and exact colours come from a per-cover random
generator, so two covers of one style never match pixel for pixel. Styles are drawn with
NumPy and Pillow only, at thumbnail size, so tens of thousands of covers take a minute or so.
"""

from __future__ import annotations

import colorsys
import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

STYLE_NAMES = (
    "stripes",
    "gradient_shapes",
    "landscape",
    "mosaic",
    "neon_rings",
    "duotone_photo",
    "halftone",
    "waves",
    "bokeh",
    "skyline",
)
NUM_STYLES = len(STYLE_NAMES)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """(3,) float RGB in [0, 255] from hue in degrees and saturation/value in [0, 1]."""
    return np.array(colorsys.hsv_to_rgb((h % 360.0) / 360.0, s, v)) * 255.0


def _colour(rng: np.random.Generator, hue: tuple, sat: tuple, val: tuple) -> np.ndarray:
    """(3,) RGB of a colour drawn uniformly from (low, high) ranges of hue, saturation, value."""
    return _hsv(rng.uniform(*hue), rng.uniform(*sat), rng.uniform(*val))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(size, size) float y and x coordinates in [0, 1)."""
    axis = np.arange(size, dtype=np.float32) / size
    return np.meshgrid(axis, axis, indexing="ij")


def _lerp(c0: np.ndarray, c1: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(h, w, 3) blend of two colours by t of shape (h, w)."""
    return c0[None, None, :] * (1.0 - t[..., None]) + c1[None, None, :] * t[..., None]


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) smooth noise in [0, 1]: a coarse random grid upsampled bicubically."""
    coarse = rng.random((cells, cells), dtype=np.float32)
    img = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(img), 0.0, 1.0)


def _to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def _stripes(rng: np.random.Generator, size: int) -> Image.Image:
    """Warm diagonal stripes of varying width, softly shaded."""
    y, x = _grid(size)
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(4, 11)
    coord = (x * np.cos(angle) + y * np.sin(angle)) * freq + rng.uniform(0, 1)
    colours = [_colour(rng, (-15, 45), (0.55, 0.95), (0.6, 1.0)) for _ in range(rng.integers(2, 5))]
    band = np.floor(coord).astype(np.int64) % len(colours)
    pixels = np.stack(colours)[band]
    shade = 0.75 + 0.25 * (x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1) + 1) / 2
    return _to_image(pixels * shade[..., None])


def _gradient_shapes(rng: np.random.Generator, size: int) -> Image.Image:
    """Blue-violet gradient with translucent pastel polygons and ellipses."""
    y, x = _grid(size)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip((x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle) + 0.5, 0, 1)
    base = _lerp(_colour(rng, (200, 240), (0.6, 0.9), (0.3, 0.6)), _colour(rng, (250, 300), (0.4, 0.8), (0.7, 1.0)), t)
    img = _to_image(base).convert("RGBA")
    overlay = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for _ in range(rng.integers(3, 7)):
        colour = tuple(int(c) for c in _colour(rng, (160, 340), (0.1, 0.4), (0.85, 1.0))) + (int(rng.integers(110, 200)),)
        cx, cy, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(size * 0.08, size * 0.3)]
        if rng.random() < 0.5:
            draw.ellipse((cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r), fill=colour)
        else:
            k = int(rng.integers(3, 6))
            phase = rng.uniform(0, 2 * np.pi)
            angles = phase + 2 * np.pi * np.arange(k) / k
            draw.polygon(list(zip((cx + r * np.cos(angles)).tolist(), (cy + r * np.sin(angles)).tolist())), fill=colour)
    return Image.alpha_composite(img, overlay).convert("RGB")


def _landscape(rng: np.random.Generator, size: int) -> Image.Image:
    """Sky gradient over layered noisy ridges in greens and browns, sometimes a sun."""
    y, x = _grid(size)
    sky = _lerp(_colour(rng, (190, 215), (0.3, 0.6), (0.85, 1.0)), _colour(rng, (30, 60), (0.1, 0.4), (0.9, 1.0)), y)
    pixels = sky.copy()
    if rng.random() < 0.6:
        sx, sy, sr = rng.uniform(0.15, 0.85), rng.uniform(0.1, 0.35), rng.uniform(0.05, 0.1)
        sun = ((x - sx) ** 2 + (y - sy) ** 2) < sr**2
        pixels[sun] = _colour(rng, (40, 55), (0.5, 0.8), (0.95, 1.0))
    layers = int(rng.integers(2, 5))
    cols = np.arange(size) / size
    for i in range(layers):
        depth = (i + 1) / layers
        ridge = np.zeros(size)
        for octave in range(1, 4):
            ridge += np.sin(cols * rng.uniform(2, 6) * octave + rng.uniform(0, 2 * np.pi)) * 0.12 / octave
        ridge += 0.35 + 0.45 * depth
        hue = (70, 140) if rng.random() < 0.7 else (20, 40)  # mostly greens, some browns
        colour = _colour(rng, hue, (0.35, 0.7), (0.75 - 0.45 * depth, 0.9 - 0.45 * depth))
        mask = y > ridge[None, :]
        pixels[mask] = colour
    texture = _value_noise(rng, size, 24)
    return _to_image(pixels * (0.88 + 0.24 * texture[..., None]))


def _mosaic(rng: np.random.Generator, size: int) -> Image.Image:
    """Grid of earthy and teal tiles with dark grout lines."""
    cell = int(rng.integers(8, 22))
    n = size // cell + 2
    hues = rng.choice([rng.uniform(15, 50), rng.uniform(165, 190)], size=(n, n), p=[0.7, 0.3])
    tiles = np.stack(
        [_hsv(h, s, v) for h, s, v in zip(hues.ravel(), rng.uniform(0.3, 0.8, n * n), rng.uniform(0.45, 0.95, n * n))]
    ).reshape(n, n, 3)
    offset = rng.integers(0, cell, 2)
    idx = (np.arange(size)[:, None] + offset[0]) // cell, (np.arange(size)[None, :] + offset[1]) // cell
    pixels = tiles[idx[0], idx[1]]
    grout = ((np.arange(size) + offset[0]) % cell == 0)[:, None] | ((np.arange(size) + offset[1]) % cell == 0)[None, :]
    pixels[grout] = _colour(rng, (20, 40), (0.2, 0.4), (0.15, 0.3))
    return _to_image(pixels)


def _neon_rings(rng: np.random.Generator, size: int) -> Image.Image:
    """Glowing magenta and cyan ring outlines on a near-black background."""
    img = Image.new("RGB", (size, size), tuple(int(c) for c in _colour(rng, (230, 280), (0.5, 0.9), (0.03, 0.15))))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(3, 8)):
        cx, cy = rng.uniform(0, size, 2)
        hue = (170, 200) if rng.random() < 0.5 else (290, 330)  # cyan or magenta
        colour = tuple(int(c) for c in _colour(rng, hue, (0.7, 1.0), (0.85, 1.0)))
        width = int(rng.integers(2, 5))
        for r in np.arange(rng.uniform(4, 12), rng.uniform(size * 0.3, size * 0.7), rng.uniform(6, 14)):
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=width)
    glow = img.filter(ImageFilter.GaussianBlur(2.5))
    return Image.blend(glow, img, 0.6)


# Real photos that ship inside installed packages (read as files: importing the packages
# themselves would cost seconds in every worker process).
_PHOTO_FILES = (
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    """Grey-level real photos shipped with scikit-learn and matplotlib, read offline."""
    photos = []
    for package, relative in _PHOTO_FILES:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"the '{package}' package is not installed; it ships the photo {relative}")
        with Image.open(Path(spec.origin).parent / relative) as photo:
            photos.append(np.asarray(photo.convert("L"), dtype=np.float32))
    return tuple(photos)


def _duotone_photo(rng: np.random.Generator, size: int) -> Image.Image:
    """Random crop of a real photo, flipped and mapped to a navy-to-gold duotone."""
    photos = _photos()
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape
    side = int(rng.uniform(0.3, 0.9) * min(h, w))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = photo[top : top + side, left : left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    grey = np.asarray(Image.fromarray(crop, mode="F").resize((size, size), Image.Resampling.BILINEAR)) / 255.0
    grey = np.clip((grey - grey.mean()) * rng.uniform(1.1, 1.6) + 0.5, 0, 1)
    dark = _colour(rng, (215, 245), (0.6, 0.95), (0.15, 0.35))
    light = _colour(rng, (35, 60), (0.45, 0.85), (0.9, 1.0))
    return _to_image(_lerp(dark, light, grey))


def _halftone(rng: np.random.Generator, size: int) -> Image.Image:
    """Red-pink halftone dots on cream whose radius follows a random gradient."""
    y, x = _grid(size)
    spacing = rng.uniform(5, 10) / size
    angle = rng.uniform(0, np.pi / 2)
    u = (x * np.cos(angle) + y * np.sin(angle)) / spacing
    v = (-x * np.sin(angle) + y * np.cos(angle)) / spacing
    dist = np.hypot(u - np.round(u), v - np.round(v))
    cx, cy = rng.uniform(0, 1, 2)
    radius = 0.12 + 0.38 * np.clip(1 - np.hypot(x - cx, y - cy) * rng.uniform(0.8, 1.5), 0, 1)
    ink = dist < radius
    # Paper darkens towards one corner; the ink drifts between two reds across the picture.
    paper = _colour(rng, (35, 55), (0.08, 0.2), (0.93, 1.0))
    pixels = paper[None, None, :] * (1.0 - 0.12 * (x * rng.uniform(0, 1) + y * rng.uniform(0, 1)))[..., None]
    inks = _lerp(_colour(rng, (340, 370), (0.6, 0.95), (0.7, 0.95)), _colour(rng, (340, 370), (0.6, 0.95), (0.5, 0.9)), x)
    pixels[ink] = inks[ink]
    return _to_image(pixels)


def _waves(rng: np.random.Generator, size: int) -> Image.Image:
    """Horizontal bands bent by overlapping sine waves, in blues and teals."""
    y, x = _grid(size)
    warp = sum(
        rng.uniform(0.02, 0.08) * np.sin(2 * np.pi * (x * rng.uniform(0.5, 3) + rng.uniform(0, 1))) for _ in range(3)
    )
    bands = (y + warp) * rng.uniform(5, 12)
    colours = np.stack([_colour(rng, (175, 225), (0.4, 0.9), (0.35, 0.95)) for _ in range(int(rng.integers(3, 6)))])
    idx = np.floor(bands).astype(np.int64) % len(colours)
    frac = bands - np.floor(bands)
    pixels = colours[idx] * (0.8 + 0.2 * frac[..., None])
    return _to_image(pixels)


def _bokeh(rng: np.random.Generator, size: int) -> Image.Image:
    """Blurred amber light discs over a dark warm gradient."""
    y, _ = _grid(size)
    base = _lerp(_colour(rng, (10, 35), (0.5, 0.9), (0.05, 0.2)), _colour(rng, (20, 45), (0.5, 0.9), (0.25, 0.45)), y)
    img = _to_image(base).convert("RGBA")
    overlay = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for _ in range(rng.integers(8, 20)):
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(size * 0.04, size * 0.16)
        colour = tuple(int(c) for c in _colour(rng, (30, 55), (0.3, 0.8), (0.8, 1.0))) + (int(rng.integers(90, 200)),)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    overlay = overlay.filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 3.5)))
    return Image.alpha_composite(img, overlay).convert("RGB")


def _skyline(rng: np.random.Generator, size: int) -> Image.Image:
    """Sunset gradient behind dark building silhouettes with lit windows."""
    y, _ = _grid(size)
    pixels = _lerp(_colour(rng, (260, 300), (0.4, 0.8), (0.35, 0.6)), _colour(rng, (10, 40), (0.6, 0.95), (0.85, 1.0)), y)
    building = _colour(rng, (220, 260), (0.2, 0.5), (0.06, 0.18))
    window = _colour(rng, (40, 55), (0.4, 0.8), (0.85, 1.0))
    x0 = -int(rng.integers(0, 8))
    while x0 < size:
        width = int(rng.integers(size // 14, size // 5))
        top = int(rng.uniform(0.3, 0.8) * size)
        pixels[top:, max(x0, 0) : x0 + width] = building
        lit = rng.random(((size - top) // 5 + 1, width // 4 + 1)) < rng.uniform(0.2, 0.6)
        for wy, wx in zip(*np.nonzero(lit)):
            py, px = top + 2 + wy * 5, x0 + 1 + wx * 4
            if px >= 0 and py < size - 1 and px + 2 <= min(size, x0 + width):
                pixels[py : py + 2, px : px + 2] = window
        x0 += width + int(rng.integers(0, 4))
    return _to_image(pixels)


_DRAWERS: tuple[Callable[[np.random.Generator, int], Image.Image], ...] = (
    _stripes,
    _gradient_shapes,
    _landscape,
    _mosaic,
    _neon_rings,
    _duotone_photo,
    _halftone,
    _waves,
    _bokeh,
    _skyline,
)


def draw_cover(style: int, rng: np.random.Generator, size: int = 112) -> Image.Image:
    """Draw one cover picture of a visual style.

    Args:
        style: index into ``STYLE_NAMES``.
        rng: the cover's own generator; the same state draws the same picture.
        size: side of the square picture in pixels.

    Returns:
        An RGB ``PIL.Image`` of shape (size, size).

    Raises:
        ValueError: if ``style`` is not a style index or ``size`` is below 32.
    """
    if not 0 <= style < NUM_STYLES:
        raise ValueError(f"style {style} is not a style index, expected 0..{NUM_STYLES - 1}")
    if size < 32:
        raise ValueError(f"cover size {size} is too small, expected at least 32 pixels")
    return _DRAWERS[style](rng, size)
