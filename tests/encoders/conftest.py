"""Fixtures for the encoder tests: real sample photos, a shared MobileNet cache, fake encoders."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from fake_encoders import FakeImageEncoder, FakeTextEncoder


@pytest.fixture(scope="session")
def sample_photos(tmp_path_factory) -> dict[str, Path]:
    """Three real photos that ship offline: a temple, a flower, Grace Hopper in uniform."""
    import matplotlib
    from sklearn.datasets import load_sample_images

    folder = tmp_path_factory.mktemp("photos")
    photos = {}
    samples = load_sample_images()
    for filename, pixels in zip(samples.filenames, samples.images):
        name = Path(filename).stem  # china, flower
        photos[name] = folder / f"{name}.png"
        Image.fromarray(pixels).save(photos[name])
    photos["grace_hopper"] = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return photos


@pytest.fixture(scope="session")
def mobilenet_cache_dir(tmp_path_factory) -> Path:
    """One cache folder for every test that needs the default MobileNet (built once)."""
    return tmp_path_factory.mktemp("recsys-cache")


@pytest.fixture(scope="session")
def image_encoder(mobilenet_cache_dir):
    from recsys.encoders.image import ImageEncoder

    return ImageEncoder(image_size=224, num_threads=2, cache_dir=mobilenet_cache_dir)


@pytest.fixture(scope="session")
def text_encoder():
    from recsys.encoders.text import TextEncoder

    return TextEncoder(max_length=48, num_threads=2)


@pytest.fixture
def fake_encoders():
    return FakeTextEncoder(), FakeImageEncoder()
