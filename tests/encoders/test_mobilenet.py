"""The Keras MobileNet rebuilt from the frozen graph: same numbers, sensible features, cached file."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.encoders import mobilenet
from recsys.encoders.image import load_image_rgb
from recsys.errors import ConfigError

pytestmark = pytest.mark.slow

MILITARY_UNIFORM = 653  # ImageNet class 652 in the 1001-class (background = 0) TF-slim head


def frozen_graph_features(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features and logits of the original frozen graph, run as-is (TF1 graph import)."""
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(mobilenet.frozen_graph_path().read_bytes())
    wrapped = tf.compat.v1.wrap_function(lambda: tf.compat.v1.import_graph_def(graph_def, name=""), [])
    run = wrapped.prune(
        feeds=wrapped.graph.get_tensor_by_name(mobilenet.GRAPH_INPUT),
        fetches=[
            wrapped.graph.get_tensor_by_name(mobilenet.GRAPH_POOLED),
            wrapped.graph.get_tensor_by_name("MobilenetV1/Predictions/Reshape:0"),
        ],
    )
    pooled, logits = [], []
    for image in images:  # the graph's input placeholder has batch size 1
        p, lg = run(tf.constant(image[None] / 127.5 - 1.0, dtype=tf.float32))
        pooled.append(p.numpy().reshape(-1))
        logits.append(lg.numpy().reshape(-1))
    return np.stack(pooled), np.stack(logits)


@pytest.fixture(scope="module")
def photos_224(sample_photos) -> dict[str, np.ndarray]:
    return {name: load_image_rgb(path, 224) for name, path in sample_photos.items()}


@pytest.fixture(scope="module")
def model(mobilenet_cache_dir):
    return mobilenet.load_mobilenet(224, cache_dir=mobilenet_cache_dir)


def test_rebuilt_model_matches_the_frozen_graph(model, photos_224):
    images = np.stack(list(photos_224.values())).astype(np.float32)
    expected, _ = frozen_graph_features(images)
    got = np.asarray(model(images, training=False))
    assert got.shape == (3, 1024)
    assert np.abs(got - expected).max() < 1e-3
    assert expected.max() > 1.0  # real activations, not an all-zero comparison


def test_classifies_grace_hopper_as_military_uniform(model, photos_224):
    """The 1001-class head from the graph, applied to our pooled features, agrees with the graph."""
    constants = mobilenet.read_graph_constants(mobilenet.frozen_graph_path())
    weights = constants[mobilenet.GRAPH_LOGITS_WEIGHTS][0, 0]
    biases = constants[mobilenet.GRAPH_LOGITS_BIASES]
    image = photos_224["grace_hopper"][None].astype(np.float32)
    logits = np.asarray(model(image, training=False)) @ weights + biases
    assert int(np.argmax(logits)) == MILITARY_UNIFORM
    _, graph_logits = frozen_graph_features(image)
    assert int(np.argmax(graph_logits)) == MILITARY_UNIFORM


def test_crops_of_one_photo_are_closer_than_other_photos(model, sample_photos):
    from PIL import Image

    crops, owners = [], []
    for name, path in sample_photos.items():
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            w, h = rgb.size
            for box in ((0, 0, int(w * 0.7), h), (int(w * 0.3), 0, w, h)):  # left and right 70%
                crops.append(np.asarray(rgb.crop(box).resize((224, 224))))
                owners.append(name)
    features = np.asarray(model(np.stack(crops).astype(np.float32), training=False))
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    sims = unit @ unit.T
    owners = np.array(owners)
    for i in range(len(crops)):
        same = sims[i, (owners == owners[i]) & (np.arange(len(crops)) != i)].max()
        other = sims[i, owners != owners[i]].max()
        assert same > other + 0.1, (owners[i], same, other)


def test_float16_storage_keeps_real_features(model, photos_224):
    features = np.asarray(model(np.stack(list(photos_224.values())).astype(np.float32), training=False))
    rounded = features.astype(np.float16).astype(np.float32)
    cosine = (features * rounded).sum(1) / (np.linalg.norm(features, axis=1) * np.linalg.norm(rounded, axis=1))
    assert cosine.min() >= 0.999
    assert features.min() >= 0.0 and features.max() <= 6.0  # ReLU6 activations, well inside float16


def test_cached_file_is_reused(mobilenet_cache_dir, model, monkeypatch):
    (path,) = (mobilenet_cache_dir / "encoders").glob("mobilenet_v1_1.0_imagenet_224-*.keras")
    mtime = path.stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached model should have been loaded")

    monkeypatch.setattr(mobilenet, "build_mobilenet", no_rebuild)
    again = mobilenet.load_mobilenet(224, cache_dir=mobilenet_cache_dir)
    assert path.stat().st_mtime_ns == mtime
    x = np.random.default_rng(0).uniform(0, 255, size=(2, 224, 224, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(again(x, training=False)), np.asarray(model(x, training=False)))


def test_unreadable_cached_file_is_rebuilt(tmp_path, caplog):
    first = mobilenet.load_mobilenet(64, cache_dir=tmp_path)
    (path,) = (tmp_path / "encoders").glob("mobilenet_v1_1.0_imagenet_64-*.keras")
    path.write_bytes(b"not a zip file")
    rebuilt = mobilenet.load_mobilenet(64, cache_dir=tmp_path)
    assert "is unreadable" in caplog.text
    assert path.stat().st_size > 1_000_000
    assert [p.name for p in (tmp_path / "encoders").iterdir()] == [path.name]  # no temporary left
    x = np.full((1, 64, 64, 3), 100.0, np.float32)
    np.testing.assert_allclose(np.asarray(rebuilt(x)), np.asarray(first(x)), atol=1e-6)


def test_cached_file_with_other_shapes_is_rebuilt(tmp_path, caplog):
    import keras

    from recsys.encoders.text import file_sha256

    sha = file_sha256(mobilenet.frozen_graph_path())[:16]
    path = tmp_path / "encoders" / f"{mobilenet.MOBILENET_NAME}_64-{sha}.keras"
    path.parent.mkdir()
    inputs = keras.Input((64, 64, 3))
    keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs)).save(path)  # (None, 3) output
    model = mobilenet.load_mobilenet(64, cache_dir=tmp_path)
    assert "has shapes (None, 64, 64, 3) -> (None, 3); rebuilding it" in caplog.text
    assert model.output_shape == (None, 1024)
    assert keras.saving.load_model(path).output_shape == (None, 1024)


def test_a_cache_folder_that_cannot_be_made_leaves_the_model_in_memory(tmp_path, caplog, photos_224):
    blocked = tmp_path / "cache"
    blocked.write_bytes(b"a file where the cache folder should be")
    model = mobilenet.load_mobilenet(224, cache_dir=blocked)
    assert f"could not cache MobileNet in {blocked / 'encoders'} ([Errno 20] Not a directory" in caplog.text
    images = np.stack(list(photos_224.values())).astype(np.float32)
    expected, _ = frozen_graph_features(images)
    assert np.abs(np.asarray(model(images, training=False)) - expected).max() < 1e-3


def test_a_read_only_cache_folder_leaves_the_model_in_memory(tmp_path, monkeypatch, caplog):
    import keras

    def read_only(self, filepath, *args, **kwargs):  # what a read-only mount answers (root ignores chmod)
        raise OSError(30, "Read-only file system", str(filepath))

    monkeypatch.setattr(keras.Model, "save", read_only)
    model = mobilenet.load_mobilenet(64, cache_dir=tmp_path)
    assert f"could not cache MobileNet in {tmp_path / 'encoders'} ([Errno 30] Read-only file system" in caplog.text
    assert model.input_shape == (None, 64, 64, 3) and model.output_shape == (None, 1024)
    assert list((tmp_path / "encoders").iterdir()) == []


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RECSYS_CACHE_DIR", str(tmp_path / "explicit"))
    assert mobilenet.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("RECSYS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert mobilenet.default_cache_dir() == tmp_path / "xdg" / "recsys"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert mobilenet.default_cache_dir() == tmp_path / "home" / ".cache" / "recsys"


def test_graph_missing_a_weight_is_a_config_error():
    with pytest.raises(ConfigError, match=r"MobileNet frozen graph has no constant 'MobilenetV1/Conv2d_0/weights'"):
        mobilenet.mobilenet_layer_weights({})


def test_unreadable_graph_is_a_config_error(tmp_path):
    bad = tmp_path / "graph.pb"
    bad.write_bytes(b"\xff\xff\xff not a protobuf")
    with pytest.raises(ConfigError, match=r"frozen graph .*graph.pb cannot be read"):
        mobilenet.read_graph_constants(bad)


def test_too_small_input_is_a_config_error():
    with pytest.raises(ConfigError, match="MobileNet image_size is 16, expected at least 32 pixels"):
        mobilenet.build_mobilenet(16)


def test_missing_package_is_a_config_error(monkeypatch):
    monkeypatch.setattr(mobilenet, "GRAPH_PACKAGE", "no_such_package_recsys")
    with pytest.raises(ConfigError, match=r"package 'no_such_package_recsys' \(MobileNet weights\) is not installed"):
        mobilenet.frozen_graph_path()


def test_a_missing_package_stops_the_image_encoder_when_it_is_made(monkeypatch):
    # MobileNet itself is loaded at the first cover; its package is looked for at once.
    from recsys.encoders.image import ImageEncoder

    monkeypatch.setattr(mobilenet, "GRAPH_PACKAGE", "no_such_package_recsys")
    with pytest.raises(ConfigError, match=r"package 'no_such_package_recsys' \(MobileNet weights\) is not installed"):
        ImageEncoder(image_size=224)
