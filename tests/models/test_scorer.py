"""The scorer: its formula against a numpy reference, calibration, config round trip."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from recsys.models.scorer import Scorer, build_scorer

DIM, SIDE = 8, 3


def _pairs(p: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((p, DIM)).astype(np.float32),
        rng.standard_normal((p, DIM)).astype(np.float32),
        rng.standard_normal((p, SIDE)).astype(np.float32),
    )


def _scorer(**kwargs) -> Scorer:
    keras.utils.set_random_seed(0)
    scorer = Scorer(**kwargs)
    scorer(*_pairs())
    return scorer


def _reference_logits(scorer: Scorer, user, candidate, side) -> np.ndarray:
    h = np.concatenate([user * candidate, side], axis=1)
    for i, (kernel, bias) in enumerate(zip(scorer.mlp_kernels, scorer.mlp_biases)):
        h = h @ np.asarray(kernel) + np.asarray(bias)
        if i < len(scorer.hidden_units):
            h = np.maximum(h, 0.0)
    return float(np.asarray(scorer.dot_scale)) * np.sum(user * candidate, axis=1) + h[:, 0] + float(np.asarray(scorer.bias))


@pytest.mark.parametrize("hidden_units", [(), (32,), (16, 8)])
def test_logits_match_numpy_reference(hidden_units):
    scorer = _scorer(hidden_units=hidden_units)
    for w in scorer.trainable_weights:  # move away from the zero-initialised biases
        w.assign(np.asarray(w) + 0.05)
    pairs = _pairs()
    np.testing.assert_allclose(np.asarray(scorer.logits(*pairs)), _reference_logits(scorer, *pairs), rtol=1e-5, atol=1e-5)
    probs = np.asarray(scorer(*pairs))
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-_reference_logits(scorer, *pairs))), atol=1e-6)


def test_calibration_is_applied_to_the_logit():
    scorer = _scorer()
    pairs = _pairs()
    logits = np.asarray(scorer.logits(*pairs))
    scorer.set_calibration(2.0, -1.0)
    np.testing.assert_allclose(np.asarray(scorer(*pairs)), 1 / (1 + np.exp(-(2.0 * logits - 1.0))), atol=1e-6)
    assert {w.name for w in scorer.non_trainable_weights} == {"calibration_slope", "calibration_intercept"}


def test_get_config_round_trip_and_save_load(tmp_path):
    scorer = _scorer(hidden_units=(4,))
    clone = Scorer.from_config(scorer.get_config())
    clone(*_pairs())
    clone.set_weights(scorer.get_weights())
    assert clone.get_config() == scorer.get_config()
    np.testing.assert_allclose(np.asarray(clone(*_pairs())), np.asarray(scorer(*_pairs())), atol=1e-6)

    model = build_scorer(DIM, SIDE, hidden_units=(4,))
    model.get_layer("scorer").set_calibration(0.5, 0.25)
    model.save(tmp_path / "scorer.keras")
    loaded = keras.saving.load_model(tmp_path / "scorer.keras")
    np.testing.assert_allclose(np.asarray(loaded(list(_pairs()))), np.asarray(model(list(_pairs()))), atol=1e-6)
    assert float(np.asarray(loaded.get_layer("scorer").calibration_slope)) == 0.5


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match=r"hidden_units is \(0,\), expected positive integers"):
        Scorer(hidden_units=(0,))
    with pytest.raises(ValueError, match="user dim 8 differs from candidate dim 4"):
        Scorer()(np.zeros((2, 8), np.float32), np.zeros((2, 4), np.float32), np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="embedding_dim is 0"):
        build_scorer(0, 3)
