"""WeightAverage against a brute-force weighted mean, and its use inside a training step."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.models.weight_average import WeightAverage


def _brute_force(steps: list[np.ndarray], horizon: float) -> np.ndarray:
    """sum_s d^(t-s) w_s / sum_s d^(t-s) over the steps, d = 1 - 1/max(horizon, 1)."""
    d = 1.0 - 1.0 / max(horizon, 1.0)
    factors = np.array([d ** (len(steps) - 1 - s) for s in range(len(steps))])
    return np.tensordot(factors, np.stack(steps), axes=1) / factors.sum()


def test_two_steps_by_hand():
    v = tf.Variable([0.0, 10.0])
    average = WeightAverage([v], horizon_steps=2.0)  # d = 0.5
    for value in ([1.0, 10.0], [3.0, 4.0]):
        v.assign(value)
        average.update()
    # (0.5 * 1 + 1 * 3) / 1.5 and (0.5 * 10 + 1 * 4) / 1.5
    np.testing.assert_allclose(average.values()[0], [7 / 3, 6.0], rtol=1e-6)
    np.testing.assert_array_equal(v.numpy(), [3.0, 4.0])  # the variable itself is untouched


@settings(max_examples=25, deadline=None)
@given(steps=st.integers(1, 12), horizon=st.floats(0.1, 50.0), seed=st.integers(0, 2**16))
def test_the_average_is_the_weighted_mean_of_every_step(steps, horizon, seed):
    rng = np.random.default_rng(seed)
    a, b = tf.Variable(np.zeros((2, 3), np.float32)), tf.Variable(np.zeros(4, np.float32))
    average = WeightAverage([a, b], horizon_steps=horizon)
    seen_a, seen_b = [], []
    for _ in range(steps):
        seen_a.append(rng.normal(size=(2, 3)).astype(np.float32))
        seen_b.append(rng.normal(size=4).astype(np.float32))
        a.assign(seen_a[-1])
        b.assign(seen_b[-1])
        average.update()
    got_a, got_b = average.values()
    np.testing.assert_allclose(got_a, _brute_force(seen_a, horizon), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_b, _brute_force(seen_b, horizon), rtol=1e-4, atol=1e-5)


def test_a_horizon_of_one_step_or_less_is_the_last_steps_weights():
    v = tf.Variable(0.0)
    average = WeightAverage([v], horizon_steps=0.5)
    for value in (5.0, -2.0):
        v.assign(value)
        average.update()
    assert average.values()[0] == pytest.approx(-2.0)


def test_updates_inside_a_tf_function_step():
    v = tf.Variable([1.0, 1.0])
    average = WeightAverage([v], horizon_steps=4.0)

    @tf.function
    def step(delta):
        v.assign_add(delta)
        average.update()

    seen = []
    for delta in ([1.0, 0.0], [2.0, -1.0], [0.5, 0.5]):
        step(tf.constant(delta))
        seen.append(v.numpy().copy())
    np.testing.assert_allclose(average.values()[0], _brute_force(seen, 4.0), rtol=1e-6)


def test_swapped_in_shows_the_average_then_restores_the_current_weights_even_on_error():
    v = tf.Variable(0.0)
    average = WeightAverage([v], horizon_steps=2.0)
    for value in (2.0, 8.0):
        v.assign(value)
        average.update()
    expected = (0.5 * 2.0 + 8.0) / 1.5
    with average.swapped_in():
        assert float(v.numpy()) == pytest.approx(expected)
    assert float(v.numpy()) == 8.0
    with pytest.raises(RuntimeError), average.swapped_in():
        raise RuntimeError("an evaluation failed")
    assert float(v.numpy()) == 8.0
    average.assign()
    assert float(v.numpy()) == pytest.approx(expected)


@pytest.mark.parametrize("horizon", [0.0, -1.0, float("nan")])
def test_a_horizon_must_be_above_zero(horizon):
    with pytest.raises(ValueError, match="horizon_steps"):
        WeightAverage([tf.Variable(0.0)], horizon_steps=horizon)


def test_no_average_before_the_first_step():
    with pytest.raises(ValueError, match="no step"):
        WeightAverage([tf.Variable(0.0)], horizon_steps=3.0).values()


def test_a_long_training_keeps_the_average_to_float32_precision():
    """20,000 steps over a horizon of 5,000 (a MIND-size training): float32 running sums drifted
    by 1.3e-5 here; the mean itself, with its weight in float64, stays within 1e-6."""
    rng = np.random.default_rng(0)
    steps = (0.1 + 0.01 * rng.standard_normal((20_000, 8))).astype(np.float32)
    v = tf.Variable(steps[0])
    average = WeightAverage([v], horizon_steps=5_000.0)

    @tf.function
    def run(all_steps):
        for i in tf.range(tf.shape(all_steps)[0]):
            v.assign(all_steps[i])
            average.update()

    run(tf.constant(steps))
    d = 1.0 - 1.0 / 5_000.0
    factors = d ** np.arange(len(steps) - 1, -1, -1, dtype=np.float64)
    expected = factors @ steps.astype(np.float64) / factors.sum()
    np.testing.assert_allclose(average.values()[0], expected, rtol=0, atol=1e-6)
