"""The user encoder: attention pooling over clicked items, masking, cold start."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from recsys.models.user_encoder import UserEncoder, build_user_encoder

DIM, H = 16, 7


def _history(b: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    history = rng.standard_normal((b, H, DIM)).astype(np.float32)
    lengths = np.array([7, 3, 0, 1])[:b]
    mask = (np.arange(H)[None, :] < lengths[:, None]).astype(np.float32)
    return history, mask


def _encoder(**kwargs) -> UserEncoder:
    keras.utils.set_random_seed(0)
    encoder = UserEncoder(**kwargs)
    encoder(*_history())
    return encoder


def test_get_config_round_trip_gives_same_outputs():
    encoder = _encoder(num_heads=2, attention_dim=8, dropout=0.2)
    clone = UserEncoder.from_config(encoder.get_config())
    clone(*_history())
    clone.set_weights(encoder.get_weights())
    assert clone.get_config() == encoder.get_config()
    np.testing.assert_allclose(np.asarray(clone(*_history())), np.asarray(encoder(*_history())), atol=1e-6)
    # Dropout acts only in training, so equal outputs do not show it came back: the rate itself does.
    assert encoder.get_config()["dropout"] == 0.2 and clone.dropout == 0.2


def test_cold_start_user_gets_the_learned_vector():
    encoder = _encoder()
    history, mask = _history()
    out = np.asarray(encoder(history, mask))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[2], np.asarray(encoder.cold_start), atol=1e-6)
    # An all-padding batch (every user cold) is well defined too.
    np.testing.assert_allclose(
        np.asarray(encoder(history, np.zeros_like(mask))), np.tile(np.asarray(encoder.cold_start), (4, 1)), atol=1e-6
    )


def test_padding_slots_do_not_change_the_result():
    encoder = _encoder()
    history, mask = _history()
    noisy = np.where(mask[..., None] > 0, history, 1e3).astype(np.float32)
    np.testing.assert_allclose(np.asarray(encoder(noisy, mask)), np.asarray(encoder(history, mask)), atol=1e-5)


def test_order_of_clicks_does_not_matter_without_positions():
    # Attention is permutation-equivariant and the pooling permutation-invariant.
    encoder = _encoder()
    history, mask = _history()
    perm = np.array([2, 0, 1, 3, 4, 5, 6])
    shuffled = history.copy()
    shuffled[0] = history[0, perm]
    np.testing.assert_allclose(np.asarray(encoder(shuffled, mask))[0], np.asarray(encoder(history, mask))[0], atol=1e-5)


def test_functional_model_saves_and_loads(tmp_path):
    model = build_user_encoder(DIM, num_heads=2)
    model.save(tmp_path / "user.keras")
    loaded = keras.saving.load_model(tmp_path / "user.keras")
    np.testing.assert_allclose(np.asarray(loaded(list(_history()))), np.asarray(model(list(_history()))), atol=1e-6)


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="num_heads is 0, expected a positive integer"):
        UserEncoder(num_heads=0)
    with pytest.raises(ValueError, match="dropout is -0.1"):
        UserEncoder(dropout=-0.1)
    with pytest.raises(ValueError, match="dropout is 1.0, expected 0 <= dropout < 1"):
        UserEncoder(dropout=1.0)
    with pytest.raises(ValueError, match="embedding dim 16 is not divisible by num_heads 3"):
        UserEncoder(num_heads=3)(*_history())
    with pytest.raises(ValueError, match="embedding_dim is 0"):
        build_user_encoder(0)
