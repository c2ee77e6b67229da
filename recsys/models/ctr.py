"""The training-time CTR model: item tower + user encoder + scorer over one batch of impressions.

A batch carries the features of its UNIQUE items once (the fusion on ~1.4k-d inputs dominates
the cost), and index matrices that say which unique item sits in every history slot and
candidate slot. So an article shown in many impressions of the batch, or clicked by many of
its users, goes through the item tower once.

Batch inputs (dict):
    text (U, text_dim), image (U, image_dim), has_image (U,), category (U,) int32: unique items;
    history_index (B, H) int32 and history_mask (B, H) float32: clicked items per impression;
    candidate_index (B, C) int32: candidates per impression (padding slots point anywhere);
    side (B, C, S) float32: side features per candidate.
Output: (B, C) uncalibrated logits.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from recsys.models.fusion import ITEM_INPUTS
from recsys.models.scorer import Scorer


@keras.saving.register_keras_serializable(package="recsys")
class CTRModel(keras.Model):
    """Composes the three blocks that the bundle saves separately.

    Args:
        item_tower: ``build_item_tower(...)`` model, (U, ...) features -> (U, D).
        user_encoder: ``build_user_encoder(...)`` model, (B, H, D) + (B, H) -> (B, D).
        scorer: ``build_scorer(...)`` model whose ``Scorer`` layer gives the logits.
    """

    def __init__(self, item_tower: keras.Model, user_encoder: keras.Model, scorer: keras.Model, **kwargs):
        super().__init__(**kwargs)
        layers = [layer for layer in scorer.layers if isinstance(layer, Scorer)]
        if len(layers) != 1:
            raise ValueError(f"scorer model has {len(layers)} Scorer layers, expected 1")
        self.item_tower = item_tower
        self.user_encoder = user_encoder
        self.scorer = scorer
        self.scorer_layer = layers[0]

    def call(self, inputs: dict, training: bool | None = None):
        items = self.item_tower({k: inputs[k] for k in ITEM_INPUTS}, training=training)  # (U, D)
        history = ops.take(items, inputs["history_index"], axis=0)  # (B, H, D)
        users = self.user_encoder([history, inputs["history_mask"]], training=training)  # (B, D)
        candidates = ops.take(items, inputs["candidate_index"], axis=0)  # (B, C, D)
        shape = ops.shape(candidates)
        flat_users = ops.reshape(ops.broadcast_to(ops.expand_dims(users, 1), shape), (-1, shape[-1]))
        side = inputs["side"]
        logits = self.scorer_layer.logits(
            flat_users, ops.reshape(candidates, (-1, shape[-1])), ops.reshape(side, (-1, ops.shape(side)[-1]))
        )
        return ops.reshape(logits, shape[:2])

    def get_config(self) -> dict:
        return {
            **super().get_config(),  # name, trainable, dtype policy
            "item_tower": keras.saving.serialize_keras_object(self.item_tower),
            "user_encoder": keras.saving.serialize_keras_object(self.user_encoder),
            "scorer": keras.saving.serialize_keras_object(self.scorer),
        }

    def build_from_config(self, config: dict) -> None:
        # The three blocks are functional models, built as they are deserialised; this model
        # owns no weights of its own, so loading a .keras file has nothing left to build.
        self.built = True

    @classmethod
    def from_config(cls, config: dict) -> "CTRModel":
        config = dict(config)
        blocks = {k: keras.saving.deserialize_keras_object(config.pop(k)) for k in ("item_tower", "user_encoder", "scorer")}
        return cls(**blocks, **config)


def pointwise_loss(logits, labels, weights):
    """Weighted mean binary cross-entropy.

    Args:
        logits: (B, C) logits.
        labels: (B, C) 0/1.
        weights: (B, C) sample weights, 0 on padding.

    Returns:
        Scalar loss.
    """
    labels = ops.cast(labels, logits.dtype)
    per_pair = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
    return ops.sum(per_pair * weights) / ops.maximum(ops.sum(weights), 1.0)


def listwise_loss(logits, groups):
    """MIND-style npratio loss: softmax cross-entropy of one positive against K negatives.

    Args:
        logits: (B, C) logits.
        groups: (G, 1 + K) int32 flat indices into ``logits``; column 0 is the clicked item,
            the others are shown-but-not-clicked items of the same impression.

    Returns:
        Scalar loss (mean over groups).
    """
    group_logits = ops.take(ops.reshape(logits, (-1,)), groups)  # (G, 1 + K)
    return ops.mean(ops.logsumexp(group_logits, axis=-1) - group_logits[:, 0])
