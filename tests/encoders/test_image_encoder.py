"""ImageEncoder: batches of files in, pooled features and an ok mask out; pluggable Keras models."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.encoders.image import ImageEncoder, load_image_rgb
from recsys.errors import ConfigError

pytestmark = pytest.mark.slow


def test_info_of_the_default_model(image_encoder):
    info = image_encoder.info
    assert info.name == "mobilenet_v1_1.0_imagenet"
    assert info.version == "nudity==0.2.3+px:224"
    assert info.dim == 1024
    # What `recsys model use` checks a version against without loading TensorFlow.
    assert ImageEncoder.default_info(224) == info and ImageEncoder.default_info(160).version.endswith("+px:160")
    with pytest.raises(ConfigError, match="encoders.image_size is 0"):
        ImageEncoder.default_info(0)


def test_encode_reports_failures_without_crashing(image_encoder, sample_photos, tmp_path, caplog):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    paths = [sample_photos["china"], None, broken, sample_photos["flower"], tmp_path / "missing.png"]
    features, ok = image_encoder.encode(paths, batch_size=2)
    assert features.shape == (5, 1024) and features.dtype == np.float32
    assert ok.tolist() == [True, False, False, True, False]
    assert not features[~ok].any()
    assert (features[ok] >= 0).all() and features[ok].max() > 1.0
    assert "broken.jpg: not a recognised image format" in caplog.text


def test_batching_does_not_change_features(image_encoder, sample_photos):
    paths = list(sample_photos.values())
    together, _ = image_encoder.encode(paths, batch_size=32)
    alone = np.concatenate([image_encoder.encode([p])[0] for p in paths])
    np.testing.assert_allclose(together, alone, atol=1e-4)


def test_encoder_equals_the_model_on_decoded_pixels(image_encoder, sample_photos):
    path = sample_photos["grace_hopper"]
    features, _ = image_encoder.encode([path])
    direct = image_encoder._model(load_image_rgb(path, 224)[None].astype(np.float32), training=False)
    np.testing.assert_allclose(features, np.asarray(direct), atol=1e-5)


def test_empty_input(image_encoder):
    features, ok = image_encoder.encode([])
    assert features.shape == (0, 1024) and ok.shape == (0,)
    with pytest.raises(ValueError, match="batch_size is 0, expected at least 1"):
        image_encoder.encode([], batch_size=0)


def feature_map_model(path, size=None):
    """A tiny Keras model with a (batch, h, w, c) output, saved as ``path``."""
    import keras

    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(5, 3, strides=2, activation="relu", kernel_initializer="he_uniform")(x)
    model = keras.Model(inputs, x)
    model.save(path)
    return model


def test_keras_model_with_a_feature_map_is_average_pooled(tmp_path, sample_photos):
    model = feature_map_model(tmp_path / "tiny.keras")
    encoder = ImageEncoder(tmp_path / "tiny.keras", image_size=48)
    assert encoder.info.name == "tiny" and encoder.info.dim == 5
    assert encoder.info.version.startswith("sha256:") and encoder.info.version.endswith("+px:48")
    paths = [sample_photos["china"], sample_photos["flower"]]
    features, ok = encoder.encode(paths)
    assert ok.all()
    pixels = np.stack([load_image_rgb(p, 48) for p in paths]).astype(np.float32)
    expected = np.asarray(model(pixels)).mean(axis=(1, 2))
    np.testing.assert_allclose(features, expected, atol=1e-5)


def test_fixed_size_model_must_match_image_size(tmp_path):
    feature_map_model(tmp_path / "fixed.keras", size=64)
    assert ImageEncoder(tmp_path / "fixed.keras", image_size=64).info.dim == 5
    with pytest.raises(ConfigError, match=r"takes 64x64 images but encoders.image_size is 96; set it to match"):
        ImageEncoder(tmp_path / "fixed.keras", image_size=96)


def test_model_with_unusable_output_is_refused(tmp_path):
    import keras

    inputs = keras.Input((32, 32, 3))
    keras.Model(inputs, keras.layers.Conv1D(2, 3)(keras.layers.Reshape((32 * 32, 3))(inputs))).save(tmp_path / "seq.keras")
    with pytest.raises(ConfigError, match=r"outputs shape \(None, 1022, 2\), expected \(batch, dim\) or \(batch, h, w, channels\)"):
        ImageEncoder(tmp_path / "seq.keras", image_size=32)


def test_model_with_non_rgb_input_is_refused(tmp_path):
    import keras

    inputs = keras.Input((32, 32, 1))
    keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs)).save(tmp_path / "grey.keras")
    with pytest.raises(ConfigError, match=r"has inputs \[\(None, 32, 32, 1\)\], expected one \(batch, height, width, 3\) RGB input"):
        ImageEncoder(tmp_path / "grey.keras", image_size=32)


def test_bad_model_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"image model file .*absent.keras does not exist"):
        ImageEncoder(tmp_path / "absent.keras")
    (tmp_path / "model.h5").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"model.h5 is not a native Keras file, expected a name ending in .keras"):
        ImageEncoder(tmp_path / "model.h5")
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match=r"junk.keras cannot be loaded by Keras"):
        ImageEncoder(tmp_path / "junk.keras")


def test_image_size_must_be_positive():
    with pytest.raises(ConfigError, match="encoders.image_size is 0"):
        ImageEncoder(image_size=0)


def test_the_default_model_is_loaded_by_the_first_cover_it_encodes(mobilenet_cache_dir, sample_photos, monkeypatch):
    # predict, evaluate and a night without new articles read every feature from the cache, and
    # each loaded MobileNet first (1-2 s a command, three times for `evaluate --baselines`).
    from recsys.encoders import mobilenet

    loads = []
    real = mobilenet.load_mobilenet
    monkeypatch.setattr(mobilenet, "load_mobilenet", lambda *a, **kw: loads.append(a) or real(*a, **kw))
    encoder = ImageEncoder(image_size=224, num_threads=2, cache_dir=mobilenet_cache_dir)
    assert encoder.info == ImageEncoder.default_info(224)
    features, ok = encoder.encode([None, None])
    assert (features.shape, ok.tolist(), loads) == ((2, 1024), [False, False], [])
    features, ok = encoder.encode([sample_photos["flower"], None])
    assert ok.tolist() == [True, False] and features[0].max() > 1.0 and len(loads) == 1
    encoder.encode([sample_photos["china"]])
    assert len(loads) == 1
