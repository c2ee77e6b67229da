"""The scorer: (user vector, candidate embedding, side features) -> click probability.

It runs for every (user, candidate) pair of the nightly job, so it is deliberately light:

    logit = w * <u, c> + MLP([u * c, side]) + b
    p     = sigmoid(slope * logit + intercept)

``slope``/``intercept`` are a post-hoc (Platt) calibration, fixed during training and set
afterwards when the training loss does not give calibrated probabilities by itself.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops


@keras.saving.register_keras_serializable(package="recsys")
class Scorer(keras.layers.Layer):
    """Per-pair click probability.

    Call as ``scorer(user, candidate, side)`` with ``user`` (P, D), ``candidate`` (P, D) and
    ``side`` (P, S); returns (P,) probabilities. ``logits(...)`` returns the uncalibrated
    (P,) logits used by the training losses.

    Args:
        hidden_units: widths of the MLP's hidden layers; ``()`` makes it linear.
    """

    def __init__(self, *, hidden_units: tuple[int, ...] | list[int] = (32,), **kwargs):
        super().__init__(**kwargs)
        units = tuple(hidden_units)
        if any(not isinstance(u, (int, np.integer)) or u <= 0 for u in units):
            raise ValueError(f"hidden_units is {hidden_units!r}, expected positive integers")
        self.hidden_units = tuple(int(u) for u in units)

    def build(self, user_shape, candidate_shape=None, side_shape=None) -> None:
        dim = int(user_shape[-1])
        if candidate_shape is not None and int(candidate_shape[-1]) != dim:
            raise ValueError(f"user dim {dim} differs from candidate dim {candidate_shape[-1]}")
        side_dim = int(side_shape[-1]) if side_shape is not None else 0
        self.dot_scale = self.add_weight(shape=(), initializer=keras.initializers.Constant(1.0), name="dot_scale")
        self.bias = self.add_weight(shape=(), initializer="zeros", name="bias")
        self.mlp_kernels, self.mlp_biases = [], []
        width = dim + side_dim
        for i, units in enumerate(self.hidden_units + (1,)):
            self.mlp_kernels.append(self.add_weight(shape=(width, units), initializer="glorot_uniform", name=f"mlp_kernel_{i}"))
            self.mlp_biases.append(self.add_weight(shape=(units,), initializer="zeros", name=f"mlp_bias_{i}"))
            width = units
        self.calibration_slope = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(1.0), trainable=False, name="calibration_slope"
        )
        self.calibration_intercept = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="calibration_intercept"
        )

    def logits(self, user, candidate, side):
        """(P,) uncalibrated logits."""
        interaction = user * candidate
        dim = ops.shape(interaction)[-1]
        # First layer split by input block instead of concatenating: one less (P, D) copy.
        first = self.mlp_kernels[0]
        h = ops.matmul(interaction, first[:dim]) + ops.matmul(ops.cast(side, interaction.dtype), first[dim:])
        h = h + self.mlp_biases[0]
        for i, (kernel, bias) in enumerate(zip(self.mlp_kernels[1:], self.mlp_biases[1:])):
            h = ops.matmul(ops.relu(h), kernel) + bias
        return self.dot_scale * ops.sum(interaction, axis=-1) + ops.squeeze(h, -1) + self.bias

    def call(self, user, candidate, side):
        logit = self.logits(user, candidate, side)
        return ops.sigmoid(self.calibration_slope * logit + self.calibration_intercept)

    def set_calibration(self, slope: float, intercept: float) -> None:
        """Set the Platt calibration ``p = sigmoid(slope * logit + intercept)``."""
        self.calibration_slope.assign(float(slope))
        self.calibration_intercept.assign(float(intercept))

    def compute_output_shape(self, user_shape, candidate_shape=None, side_shape=None) -> tuple:
        return (user_shape[0],)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(hidden_units=list(self.hidden_units))
        return config


def build_scorer(embedding_dim: int = 128, num_side_features: int = 3, *, hidden_units=(32,)) -> keras.Model:
    """The scorer as a functional model, saved on its own as ``scorer.keras``.

    Inputs: ``user`` (P, embedding_dim), ``candidate`` (P, embedding_dim), ``side``
    (P, num_side_features), all float32. Output: (P,) click probabilities.
    """
    for name, value in (("embedding_dim", embedding_dim), ("num_side_features", num_side_features)):
        if not isinstance(value, (int, np.integer)) or value < (1 if name == "embedding_dim" else 0):
            raise ValueError(f"{name} is {value!r}, expected a positive integer")
    user = keras.Input((int(embedding_dim),), dtype="float32", name="user")
    candidate = keras.Input((int(embedding_dim),), dtype="float32", name="candidate")
    side = keras.Input((int(num_side_features),), dtype="float32", name="side")
    scorer = Scorer(hidden_units=hidden_units, name="scorer")
    return keras.Model([user, candidate, side], scorer(user, candidate, side), name="scorer")
