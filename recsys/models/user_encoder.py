"""The user encoder: attention over the embeddings of the user's clicked articles (NRMS style).

Multi-head self-attention lets clicks inform each other (a residual connection and layer
normalisation keep the item embeddings' information), then additive attention pools the
history into one vector, and a linear map takes it to the scoring space. A user with no
history (every mask entry 0) gets a learned cold-start vector instead, so the result is
always finite.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from recsys.models import NUM_HEADS


@keras.saving.register_keras_serializable(package="recsys")
class UserEncoder(keras.layers.Layer):
    """(B, H, D) history embeddings and a (B, H) mask -> (B, D) user vectors.

    Call as ``encoder(history, mask)``; ``mask`` is 1 for real clicks and 0 for padding.

    Args:
        num_heads: heads of the self-attention; must divide ``D``.
        attention_dim: hidden size of the additive-attention pooling.
        dropout: dropout rate in the self-attention and on the pooled vector.
    """

    def __init__(self, *, num_heads: int = NUM_HEADS, attention_dim: int = 64, dropout: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        for name, value in (("num_heads", num_heads), ("attention_dim", attention_dim)):
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} is {value!r}, expected a positive integer")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout is {dropout!r}, expected 0 <= dropout < 1")
        self.num_heads = int(num_heads)
        self.attention_dim = int(attention_dim)
        self.dropout = float(dropout)
        self._attention = None
        self._norm = keras.layers.LayerNormalization(epsilon=1e-5, name="norm")
        self._dropout = keras.layers.Dropout(self.dropout)

    def build(self, history_shape, mask_shape=None) -> None:
        dim = int(history_shape[-1])
        if dim % self.num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by num_heads {self.num_heads}")
        self._attention = keras.layers.MultiHeadAttention(
            self.num_heads, dim // self.num_heads, dropout=self.dropout, name="self_attention"
        )
        self._attention.build(history_shape, history_shape)
        self._norm.build(history_shape)
        self.pool_kernel = self.add_weight(shape=(dim, self.attention_dim), initializer="glorot_uniform", name="pool_kernel")
        self.pool_bias = self.add_weight(shape=(self.attention_dim,), initializer="zeros", name="pool_bias")
        self.pool_query = self.add_weight(shape=(self.attention_dim,), initializer="glorot_uniform", name="pool_query")
        # Identity start: the user vector begins as a pooled item embedding, so <user, item>
        # is a content similarity from the first step and training only refines it.
        self.output_kernel = self.add_weight(shape=(dim, dim), initializer="identity", name="output_kernel")
        self.output_bias = self.add_weight(shape=(dim,), initializer="zeros", name="output_bias")
        self.cold_start = self.add_weight(
            shape=(dim,), initializer=keras.initializers.RandomNormal(stddev=0.1), name="cold_start"
        )

    def call(self, history, mask, training: bool | None = None):
        valid = ops.cast(mask, "bool")  # (B, H)
        pair_mask = ops.logical_and(ops.expand_dims(valid, 1), ops.expand_dims(valid, 2))  # (B, H, H)
        attended = self._attention(history, history, attention_mask=pair_mask, training=training)
        x = self._norm(history + attended)
        scores = ops.tensordot(ops.tanh(ops.matmul(x, self.pool_kernel) + self.pool_bias), self.pool_query, axes=1)
        scores = ops.where(valid, scores, -1e9)  # (B, H)
        weights = ops.softmax(scores, axis=-1)
        pooled = ops.sum(ops.expand_dims(weights, -1) * x, axis=1)
        pooled = self._dropout(pooled, training=training)
        user = ops.matmul(pooled, self.output_kernel) + self.output_bias
        has_history = ops.any(valid, axis=-1, keepdims=True)
        return ops.where(has_history, user, ops.expand_dims(self.cold_start, 0))

    def compute_output_shape(self, history_shape, mask_shape=None) -> tuple:
        return (history_shape[0], history_shape[-1])

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(num_heads=self.num_heads, attention_dim=self.attention_dim, dropout=self.dropout)
        return config


def build_user_encoder(
    embedding_dim: int = 128, *, history_len: int | None = None, num_heads: int = NUM_HEADS, attention_dim: int = 64,
    dropout: float = 0.1,
) -> keras.Model:
    """The user encoder as a functional model, saved on its own as ``user_encoder.keras``.

    Inputs: ``history`` (B, H, embedding_dim) float32, ``history_mask`` (B, H) float32.
    Output: (B, embedding_dim). ``history_len=None`` accepts any H.
    """
    if not isinstance(embedding_dim, (int, np.integer)) or embedding_dim <= 0:
        raise ValueError(f"embedding_dim is {embedding_dim!r}, expected a positive integer")
    history = keras.Input((history_len, int(embedding_dim)), dtype="float32", name="history")
    mask = keras.Input((history_len,), dtype="float32", name="history_mask")
    encoder = UserEncoder(num_heads=num_heads, attention_dim=attention_dim, dropout=dropout, name="user_encoder")
    return keras.Model([history, mask], encoder(history, mask), name="user_encoder")
