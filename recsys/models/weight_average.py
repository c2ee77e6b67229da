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
    on, not an average pulled toward zero or toward the initial weights.

    Args:
        variables: the trainable variables to average (any shapes, float).
        horizon_steps: the average's horizon in steps (> 0; at most 1: the last step's weights).
    """

    def __init__(self, variables: Sequence[tf.Variable], *, horizon_steps: float):
        if not horizon_steps > 0:  # also rejects NaN
            raise ValueError(f"horizon_steps is {horizon_steps!r}, expected a number above 0")
        self.variables = list(variables)
        self.decay = 1.0 - 1.0 / max(float(horizon_steps), 1.0)
        self._sums = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.variables]
        self._norm = tf.Variable(0.0, dtype=tf.float32, trainable=False)

    def update(self) -> None:
        """Count the variables' current values as one more step (callable inside ``tf.function``)."""
        for total, v in zip(self._sums, self.variables):
            total.assign(self.decay * total + (1.0 - self.decay) * v)
        self._norm.assign(self.decay * self._norm + (1.0 - self.decay))

    def values(self) -> list[np.ndarray]:
        """The averaged weights, one array per variable (their shapes)."""
        norm = float(self._norm.numpy())
        if norm == 0.0:
            raise ValueError("no step was averaged yet")
        return [total.numpy() / norm for total in self._sums]

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
