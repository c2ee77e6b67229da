"""Image tower: safe decoding of cover images and a frozen Keras image model.

``load_image_rgb`` turns any cover file into a (size, size, 3) uint8 array or raises
``ImageDecodeError``; ``ImageEncoder`` runs batches of them through ImageNet MobileNet v1 (the
default) or any Keras image model file. A cover that cannot be decoded yields ``ok=False``,
never a zero vector passed off as a picture.
"""

from __future__ import annotations

import io
import logging
import stat
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from recsys.data.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_JPEG_SCANS, decoding_rules, too_many_scans
from recsys.encoders.item_features import EncoderInfo
from recsys.errors import ConfigError, RecsysError

log = logging.getLogger(__name__)

# What Pillow raises on broken files (found by its own fuzzing): truncated data, bad chunks,
# malformed EXIF, unsupported mode conversions.
_PIL_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, TypeError, IndexError, KeyError)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
# EXIF orientation -> the transpose that shows the picture upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageDecodeError(RecsysError):
    """A cover image cannot be used.

    Args:
        path: the image file.
        reason: why, e.g. ``"file is empty (0 bytes)"``.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"cover image {self.path}: {reason}")


def load_image_rgb(path: str | Path, size: int) -> np.ndarray:
    """Decode a cover image safely into a square RGB array.

    Refuses anything but a regular file, and files over ``MAX_IMAGE_BYTES``, before opening them and images over
    ``MAX_IMAGE_PIXELS`` from their header, or JPEGs of more than ``MAX_JPEG_SCANS`` scans, before decoding. Applies the EXIF orientation
    (a damaged EXIF block never makes a cover unusable: ingest does not read it either, and
    an orientation that cannot be read leaves the picture as stored);
    converts palette, greyscale, CMYK and 16-bit images to 8-bit RGB and composites
    transparent ones on white. The image is scaled so that its shorter side is ``size`` and
    the centre is cropped (as ImageNet models were evaluated), so wide covers lose their edges
    rather than gaining bars.

    Args:
        path: the image file (any format Pillow reads; the extension is not trusted).
        size: output width and height in pixels.

    Returns:
        (size, size, 3) uint8 RGB.

    Raises:
        ImageDecodeError: the file is missing, not a regular file (a named pipe, a folder:
            never opened), empty, too large, not an image, truncated or otherwise
            undecodable; the message names the file and the reason.
    """
    if size < 1:
        raise ValueError(f"image size is {size}, expected at least 1 pixel")
    path = Path(path)
    try:
        status = path.stat()
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot be read ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(status.st_mode):
        # Never opened: reading a named pipe or a device blocks or never ends.
        raise ImageDecodeError(path, f"is {_file_kind(status.st_mode)}, not a regular file")
    num_bytes = status.st_size
    if num_bytes == 0:
        raise ImageDecodeError(path, "file is empty (0 bytes)")
    if num_bytes > MAX_IMAGE_BYTES:
        raise ImageDecodeError(path, f"file is {num_bytes} bytes, over the limit of {MAX_IMAGE_BYTES} bytes")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_IMAGE_BYTES + 1)
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot be read ({exc.strerror or exc})") from exc
    if len(data) > MAX_IMAGE_BYTES:  # grew since stat
        raise ImageDecodeError(path, f"file is over the limit of {MAX_IMAGE_BYTES} bytes")
    try:
        with decoding_rules():  # the same verdicts as ingest's check
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ImageDecodeError(
                        path, f"image is {width}x{height} = {width * height} pixels, over the limit of {MAX_IMAGE_PIXELS}"
                    )
                if width < 1 or height < 1:
                    raise ImageDecodeError(path, f"image is {width}x{height} pixels")
                if too_many_scans(image.format, data):
                    raise ImageDecodeError(path, f"progressive JPEG of more than {MAX_JPEG_SCANS} scans, refused as a "
                                                 "decompression bomb (each scan is a pass over every pixel)")
                # JPEG: let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below `size`.
                image.draft(None, (size, size))
                image.load()
                rgb = _to_rgb(_upright(image, path))
                fitted = ImageOps.fit(rgb, (size, size), method=Image.Resampling.BICUBIC)
                return np.asarray(fitted, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(path, "not a recognised image format") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(path, f"too many pixels, refused as a decompression bomb ({exc})") from exc
    except _PIL_DECODE_ERRORS as exc:
        raise ImageDecodeError(path, f"cannot be decoded ({type(exc).__name__}: {exc})") from exc


def _upright(image: Image.Image, path: Path) -> Image.Image:
    """``image`` turned as its EXIF orientation says; as stored when that cannot be read.

    Not ``ImageOps.exif_transpose``: it also rewrites the EXIF block without the orientation,
    which fails on any damaged tag (struct.error) although only the orientation matters. On a
    truncated block Pillow warns (ignored by ``decoding_rules``) and returns what it parsed.
    """
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        method = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    except _PIL_DECODE_ERRORS as exc:
        log.warning("cover image %s: EXIF cannot be read (%s: %s); used as stored, unrotated", path, type(exc).__name__, exc)
        return image
    return image if method is None else image.transpose(method)


def _file_kind(mode: int) -> str:
    """What a path that is not a regular file is, for messages ("a named pipe")."""
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a device"


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB version of any Pillow image; transparency is composited on white, whether
    it is an alpha channel or a transparent colour (a PNG tRNS chunk, in any mode)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own conversion clips 16-bit values at 255; scale the full range instead.
        raw = np.asarray(image)
        grey = Image.fromarray(np.clip(np.rint(raw.astype(np.float32) / 257.0), 0, 255).astype(np.uint8))
        transparent = image.info.get("transparency")
        if not isinstance(transparent, int):
            return grey.convert("RGB")
        # Matched on the 16-bit values: after scaling, its neighbours would turn transparent too.
        alpha = Image.fromarray(np.where(raw == transparent, 0, 255).astype(np.uint8))
        image = Image.merge("LA", (grey, alpha))
    elif "transparency" in image.info and image.mode not in _ALPHA_MODES:
        image = image.convert("RGBA")  # P, L, 1 and RGB: Pillow turns the tRNS colour into alpha
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


class ImageEncoder:
    """Frozen image model: cover files in, pooled feature vectors out.

    Every image model here takes (batch, size, size, 3) float32 RGB in [0, 255] and does its own
    scaling (the default MobileNet has it as its first layer; Keras applications such as
    EfficientNet include it). A plugged model that expects other inputs must be saved with a
    ``keras.layers.Rescaling`` layer in front.

    Args:
        model_path: a Keras model file (``.keras``) producing (batch, dim) or
            (batch, h, w, c) (then average-pooled over h and w); None means ImageNet
            MobileNet v1 1.0 (1024-d), built once from the ``nudity`` package and cached.
        image_size: square input size. Must equal the model's input size when the model
            fixes one.
        num_threads: TensorFlow threads for this process (``recsys.threads.configure_threads``);
            None leaves the process setting alone.
        cache_dir: where the default MobileNet is cached; None means
            ``mobilenet.default_cache_dir()``.

    Raises:
        ConfigError: the model file is missing, not a ``.keras`` file, unreadable, or has
            input or output shapes the encoder cannot use.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        image_size: int = 224,
        num_threads: int | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        from recsys.encoders.text import file_sha256
        from recsys.threads import configure_threads

        if num_threads is not None:
            configure_threads(num_threads)
        if image_size < 1:
            raise ConfigError(f"encoders.image_size is {image_size}, expected a positive number of pixels")
        self.image_size = int(image_size)
        self._cache_dir = Path(cache_dir) if cache_dir else None
        self._loaded = None
        self._forward_fn = None
        if model_path is None:
            # Loaded by the first cover to encode: a catalogue the feature cache holds whole
            # (predict, evaluate, a night without new articles) needs no MobileNet (1-2 s to load).
            from recsys.encoders import mobilenet

            self.model_path = None
            mobilenet.frozen_graph_path()  # its package missing is a ConfigError now, not at the first cover
            self._info = self.default_info(self.image_size)
        else:
            self.model_path = Path(model_path)
            self._loaded = self._load_custom(self.model_path)
            name, version = self.model_path.stem, f"sha256:{file_sha256(self.model_path)[:16]}"
            self._info = _info(name, version, self.image_size, self._check_shapes())

    @property
    def _model(self):
        """The Keras model (the default MobileNet loaded at its first use)."""
        if self._loaded is None:
            from recsys.encoders import mobilenet

            self._loaded = mobilenet.load_mobilenet(self.image_size, cache_dir=self._cache_dir)
            dim = self._check_shapes()
            if dim != self._info.dim:  # load_mobilenet checks its shapes; the identity must follow them
                raise ConfigError(f"the default MobileNet outputs {dim} features, its identity says {self._info.dim}")
        return self._loaded

    def _forward(self, images):
        """``_call_model`` as one traced graph for every batch size: far cheaper per call than eager."""
        if self._forward_fn is None:
            import tensorflow as tf

            self._model  # loaded here, eagerly: not inside the trace
            spec = tf.TensorSpec((None, self.image_size, self.image_size, 3), tf.float32)
            self._forward_fn = tf.function(self._call_model, input_signature=[spec], autograph=False)
        return self._forward_fn(images)

    @property
    def info(self) -> EncoderInfo:
        """Name, version (with the input size) and output dimension."""
        return self._info

    @staticmethod
    def default_info(image_size: int = 224) -> EncoderInfo:
        """The default MobileNet's ``info`` at ``image_size``, without loading TensorFlow
        (``recsys model use`` checks a version's encoders with it)."""
        from recsys.encoders import mobilenet

        if image_size < 1:  # as the loaded encoder refuses it
            raise ConfigError(f"encoders.image_size is {image_size}, expected a positive number of pixels")
        return _info(mobilenet.MOBILENET_NAME, mobilenet.graph_package_version(), int(image_size), mobilenet.MOBILENET_DIM)

    @staticmethod
    def check_file(path: Path) -> None:
        """Raises ConfigError when ``path`` cannot be a Keras model file, without TensorFlow (the
        nightly job checks ``[encoders]`` before its ingest, in a process that never loads it)."""
        if not path.is_file():
            raise ConfigError(f"image model file {path} does not exist")
        if path.suffix != ".keras":
            raise ConfigError(f"image model file {path} is not a native Keras file, expected a name ending in .keras")
        if not zipfile.is_zipfile(path):  # every .keras file is a zip archive
            raise ConfigError(f"image model file {path} cannot be loaded by Keras: it is not a .keras archive")

    def _load_custom(self, path: Path):
        import keras

        self.check_file(path)
        try:
            return keras.saving.load_model(path, compile=False)
        except Exception as exc:  # Keras raises ValueError, TypeError, OSError, zipfile errors...
            raise ConfigError(f"image model file {path} cannot be loaded by Keras: {exc}") from exc

    def _check_shapes(self) -> int:
        where = f"image model {self.model_path or self._model.name}"
        inputs = self._model.inputs
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[-1] != 3:
            shapes = [tuple(i.shape) for i in inputs]
            raise ConfigError(f"{where} has inputs {shapes}, expected one (batch, height, width, 3) RGB input")
        height, width = inputs[0].shape[1:3]
        if (height, width) != (None, None) and (height, width) != (self.image_size, self.image_size):
            raise ConfigError(
                f"{where} takes {height}x{width} images but encoders.image_size is {self.image_size}; set it to match"
            )
        out = tuple(self._model.output_shape)
        if len(out) not in (2, 4) or not isinstance(out[-1], int):
            raise ConfigError(f"{where} outputs shape {out}, expected (batch, dim) or (batch, h, w, channels)")
        return int(out[-1])

    def _call_model(self, images):
        import tensorflow as tf

        model = self._model
        features = model(images, training=False)
        return tf.reduce_mean(features, axis=(1, 2)) if len(model.output_shape) == 4 else features

    def encode(self, paths: Sequence[Path | str | None], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Features of cover images; a missing or undecodable image is reported, not fatal.

        Args:
            paths: n image files; None where an article has no usable image.
            batch_size: images per model call (decoded images held in memory at once).

        Returns:
            features: (n, dim) float32; rows where ``ok`` is False are zeros.
            ok: (n,) bool, True where the image was decoded and encoded.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size is {batch_size}, expected at least 1")
        features = np.zeros((len(paths), self._info.dim), dtype=np.float32)
        ok = np.zeros(len(paths), dtype=bool)
        todo = [i for i, p in enumerate(paths) if p is not None]
        for start in range(0, len(todo), batch_size):
            rows, pixels = [], []
            for i in todo[start : start + batch_size]:
                try:
                    pixels.append(load_image_rgb(paths[i], self.image_size))
                except ImageDecodeError as exc:
                    log.warning("%s; the article is encoded without an image", exc)
                    continue
                rows.append(i)
            if rows:
                batch = np.stack(pixels).astype(np.float32)
                features[rows] = np.asarray(self._forward(batch), dtype=np.float32)
                ok[rows] = True
        return features, ok


def _info(name: str, version: str, image_size: int, dim: int) -> EncoderInfo:
    # The input size is part of the identity: features at another size are other features.
    return EncoderInfo(name=name, version=f"{version}+px:{image_size}", dim=dim)
