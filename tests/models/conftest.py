"""Fixtures for the CTR model tests: a small synthetic world with a known click model."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.threads import configure_threads
from recsys.data.interactions import InteractionLog, first_shown
from recsys.models.synthetic import make_synthetic_world

# Fast but learnable: 600 items, 300 users, 1.4k train and 300 validation impressions; the
# test window is larger (1.3k impressions: scoring is cheap) so that test AUCs are precise.
WORLD_SIZE = dict(num_items=600, num_users=300, num_impressions=3000, candidates_per_impression=20,
                  window_shares=(0.47, 0.1, 0.43))
# Training settings for the quality tests on that world.
TRAIN_ARGS = dict(epochs=10, batch_size=16, learning_rate=2e-3, patience=4)


@pytest.fixture(scope="session", autouse=True)
def _threads():
    configure_threads()  # this process's share of the cores (tests/conftest.py)


@pytest.fixture(scope="session")
def train_args() -> dict:
    return dict(TRAIN_ARGS)


@pytest.fixture(scope="session")
def world():
    return make_synthetic_world(**WORLD_SIZE, seed=0)


@pytest.fixture(scope="session")
def log(world):
    """Labelled interactions of the train and validation windows."""
    return InteractionLog.from_impressions([world.train, world.valid], len(world.features))


@pytest.fixture(scope="session")
def first_seen(world):
    """First show of every item over all windows (shows only: no labels are read)."""
    return first_shown([world.train, world.valid, world.test], len(world.features))


@pytest.fixture(scope="session")
def serving_time(world):
    """The nightly job's clock for the test window: the end of the logged data."""
    return world.valid.times.max() + np.timedelta64(1, "s")


@pytest.fixture(scope="session")
def small_world():
    """A tiny world for fast, untrained-model tests."""
    return make_synthetic_world(num_items=200, num_users=40, num_impressions=120, candidates_per_impression=8,
                                text_dim=24, image_dim=32, seed=1)
