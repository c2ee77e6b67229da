"""An exponential moving average of a network's weights over its training steps (Polyak averaging).

Trained on a few thousand impressions, the weights after the last step carry that step's noise
(the batch order and dropout of a seed): two seeds differ by more than most changes measured
(docs/model.md, "Training-seed noise"). An average of the weights along the last steps
removes part of that at no serving cost: one network is served, only its weights differ.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf


class WeightAverage:
    """Bias-corrected exponential moving average of ``variables`` over training steps.

    After steps 1..t with weights ``w_1..w_t`` the average is

        a_t = sum_s d^(t-s) w_s / sum_s d^(t-s),        d = 1 - 1 / horizon_steps

    every step counting, the newer ones more, over about ``horizon_steps`` steps. The division by
    the sum of the factors (Adam's bias correction) makes it a weighted mean from the first step
    on, not an average pulled toward zero or toward the initial weights. It is kept as the mean
    itself, moved toward each step's weights by ``(1 - d) / n_t`` with ``n_t = sum_s d^(t-s)``
    tracked in float64: float32 running sums of a long training (tens of thousands of steps)
    would carry rounding errors up to a few per cent of what the average changes.

    Args:
        variables: the trainable variables to average (any shapes, float).
        horizon_steps: the average's horizon in steps (> 0; at most 1: the last step's weights).
    """

    def __init__(self, variables: Sequence[tf.Variable], *, horizon_steps: float):
        if not horizon_steps > 0:  # also rejects NaN
            raise ValueError(f"horizon_steps is {horizon_steps!r}, expected a number above 0")
        self.variables = list(variables)
        self.decay = 1.0 - 1.0 / max(float(horizon_steps), 1.0)
        self._means = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.variables]
        self._norm = tf.Variable(0.0, dtype=tf.float64, trainable=False)  # n_t

    def update(self) -> None:
        """Count the variables' current values as one more step (callable inside ``tf.function``)."""
        self._norm.assign(self.decay * self._norm + (1.0 - self.decay))
        rate = (1.0 - self.decay) / self._norm  # 1 at the first step: the mean is that step's weights
        for mean, v in zip(self._means, self.variables):
            mean.assign_add(tf.cast(rate, mean.dtype) * (v - mean))

    def values(self) -> list[np.ndarray]:
        """The averaged weights, one array per variable (their shapes)."""
        if float(self._norm.numpy()) == 0.0:
            raise ValueError("no step was averaged yet")
        return [mean.numpy() for mean in self._means]

    def assign(self) -> None:
        """Replace the variables' values by their average."""
        for v, value in zip(self.variables, self.values()):
            v.assign(value)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averaged weights in the variables for the ``with`` block, the current ones after."""
        current = [v.numpy() for v in self.variables]
        self.assign()
        try:
            yield
        finally:
            for v, value in zip(self.variables, current):
                v.assign(value)
