"""The item tower: fuses frozen text and image features and the category into one embedding.

Every modality is projected to ``embedding_dim`` (a "token"); the tokens are combined by one
of three fusion modes, passed through an output projection and L2-normalised:

- ``concat``: ``tanh(sum_k W_k x_k + b)`` -- a dense layer over the concatenated inputs
  (a dense layer over a concatenation is exactly the sum of per-block projections).
- ``weighted_sum``: ``sum_k softmax(a)_k tanh(W_k x_k + b_k)`` with learned global weights.
- ``gated`` (default): per-dimension softmax gates computed from all tokens and the
  has-image mask, ``sum_k g_k(x) * tanh(W_k x_k + b_k)`` -- a gated multimodal unit
  (Arevalo et al., 2017) generalised to more than two tokens.

Content anchors (``anchor_dim > 0``): the last ``anchor_dim`` dimensions per modality are not
learned but a fixed projection of the frozen features onto their principal components (fitted
by ``adapt`` on the training items), each block L2-normalised and scaled by a learned weight.
The dot product of two embeddings then contains the similarity of the two articles in the
pretrained encoders' own spaces, which needs no training data: with few impressions the
learned part alone under-uses what the encoders already know. The learned part takes the
other ``embedding_dim - anchors`` dimensions.

A missing image is never read as a picture: its token is a learned placeholder, the gates
also see the has-image mask, and its image anchor block is zero (no visual similarity to
anything rather than a fake one). The category token comes from an embedding table whose
row 0 is the out-of-vocabulary category. There is no per-item-id parameter: an article nobody
has clicked gets an embedding from its content alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import keras
import numpy as np
from keras import ops

from recsys.models import FUSION_MODES, parse_modalities

ITEM_INPUTS = ("text", "image", "has_image", "category")
# Each anchor block starts with 4x the weight of the learned part (softplus(0) = log 2), so
# a fresh model ranks by content similarity and training refines from there; on the sample
# world, starting at 1x left the anchors unused (per-impression AUC +0.00 vs +0.02 at 4x).
ANCHOR_START_WEIGHT = 4.0
# A block whose similarity does not rank the training clicks (titles of random words, say)
# starts at this weight instead: at 4x it is 97% of the embedding's norm, and a few hundred
# steps cannot move the trainable scale far enough for the learned part (the category, the
# other modality) to be heard (docs/model.md, "Anchors that carry no signal").
WEAK_ANCHOR_START_WEIGHT = 0.25


def _rms_normalise(x):
    # Scale-free inputs: encoders differ in feature scale (MobileNet features are unnormalised).
    return x * ops.rsqrt(ops.mean(ops.square(x), axis=-1, keepdims=True) + 1e-6)


def l2_normalise(x, axis: int = -1):
    return x * ops.rsqrt(ops.sum(ops.square(x), axis=axis, keepdims=True) + 1e-12)


@keras.saving.register_keras_serializable(package="recsys")
class MultimodalFusion(keras.layers.Layer):
    """Fuses text, image and category features into an L2-normalised item embedding.

    Call with a dict: ``text`` (B, text_dim) float, ``image`` (B, image_dim) float,
    ``has_image`` (B,) float 0/1, ``category`` (B,) int ids (0 = unknown). Returns
    (B, embedding_dim), unit L2 norm. With ``modalities="text"`` (or ``"image"``) the other
    input is accepted and ignored, so ablations run through the same layer.

    Args:
        embedding_dim: output dimension ``D``.
        fusion: "concat", "weighted_sum" or "gated".
        modalities: "text", "image" or "text,image".
        num_categories: size of the category vocabulary, excluding the out-of-vocabulary id 0.
        dropout: dropout rate on the fused vector during training.
        anchor_dim: principal components per used modality in the fixed content anchor
            (0: none; the whole embedding is learned).
    """

    def __init__(
        self,
        embedding_dim: int = 128,
        *,
        fusion: str = "gated",
        modalities: str = "text,image",
        num_categories: int = 0,
        dropout: float = 0.1,
        anchor_dim: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(embedding_dim, (int, np.integer)) or embedding_dim <= 0:
            raise ValueError(f"embedding_dim is {embedding_dim!r}, expected a positive integer")
        if fusion not in FUSION_MODES:
            raise ValueError(f"fusion is {fusion!r}, expected one of {', '.join(FUSION_MODES)}")
        if not isinstance(num_categories, (int, np.integer)) or num_categories < 0:
            raise ValueError(f"num_categories is {num_categories!r}, expected an integer >= 0")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout is {dropout!r}, expected 0 <= dropout < 1")
        self.embedding_dim = int(embedding_dim)
        self.fusion = fusion
        self.modalities = ",".join(parse_modalities(modalities))
        num_modalities = len(self.modalities.split(","))
        if not isinstance(anchor_dim, (int, np.integer)) or anchor_dim < 0 or num_modalities * anchor_dim >= self.embedding_dim:
            raise ValueError(
                f"anchor_dim is {anchor_dim!r}, expected an integer >= 0 with {num_modalities} x anchor_dim "
                f"below embedding_dim {self.embedding_dim}"
            )
        self.anchor_dim = int(anchor_dim)
        self.num_categories = int(num_categories)
        self.dropout = float(dropout)
        self._dropout = keras.layers.Dropout(self.dropout)

    @property
    def num_tokens(self) -> int:
        return len(self.modalities.split(",")) + 1  # content modalities + category

    @property
    def learned_dim(self) -> int:
        """Dimensions of the embedding that the fusion learns (the rest are content anchors)."""
        return self.embedding_dim - self.anchor_dim * len(self.modalities.split(","))

    def build(self, input_shape: dict) -> None:
        d = self.embedding_dim
        used = self.modalities.split(",")
        if self.anchor_dim:
            # Filled by adapt(); saved with the model, never trained.
            for name in used:
                dim = input_shape[name][-1]
                setattr(self, f"{name}_basis", self.add_weight(
                    shape=(dim, self.anchor_dim), initializer="zeros", trainable=False, name=f"{name}_basis"))
            self.anchor_scale = self.add_weight(shape=(len(used),), initializer="zeros", name="anchor_scale")
        if "text" in used:
            text_dim = input_shape["text"][-1]
            self.text_kernel = self.add_weight(shape=(text_dim, d), initializer="glorot_uniform", name="text_kernel")
            self.text_bias = self.add_weight(shape=(d,), initializer="zeros", name="text_bias")
            self.text_center = self.add_weight(shape=(text_dim,), initializer="zeros", trainable=False, name="text_center")
        if "image" in used:
            image_dim = input_shape["image"][-1]
            self.image_kernel = self.add_weight(shape=(image_dim, d), initializer="glorot_uniform", name="image_kernel")
            self.image_bias = self.add_weight(shape=(d,), initializer="zeros", name="image_bias")
            self.image_center = self.add_weight(shape=(image_dim,), initializer="zeros", trainable=False, name="image_center")
            self.image_placeholder = self.add_weight(
                shape=(d,), initializer=keras.initializers.RandomNormal(stddev=0.1), name="image_placeholder"
            )
        self.category_embeddings = self.add_weight(
            shape=(self.num_categories + 1, d), initializer=keras.initializers.RandomNormal(stddev=0.1),
            name="category_embeddings",
        )
        k = self.num_tokens
        if self.fusion == "weighted_sum":
            self.token_logits = self.add_weight(shape=(k,), initializer="zeros", name="token_logits")
        elif self.fusion == "gated":
            self.gate_kernel = self.add_weight(shape=(k * d + 1, k * d), initializer="glorot_uniform", name="gate_kernel")
            self.gate_bias = self.add_weight(shape=(k * d,), initializer="zeros", name="gate_bias")
        self.output_kernel = self.add_weight(shape=(d, self.learned_dim), initializer="glorot_uniform", name="output_kernel")
        self.output_bias = self.add_weight(shape=(self.learned_dim,), initializer="zeros", name="output_bias")

    def call(self, inputs: dict, training: bool | None = None):
        used = self.modalities.split(",")
        has_image = ops.reshape(ops.cast(inputs["has_image"], self.compute_dtype), (-1, 1))
        tokens = []  # pre-activation projections, (B, D) each
        anchors = []  # fixed content blocks, (B, anchor_dim) each
        if "text" in used:
            text = _rms_normalise(ops.cast(inputs["text"], self.compute_dtype) - self.text_center)
            tokens.append(ops.matmul(text, self.text_kernel) + self.text_bias)
            if self.anchor_dim:
                anchors.append(l2_normalise(ops.matmul(text, self.text_basis)))
        if "image" in used:
            image = _rms_normalise(ops.cast(inputs["image"], self.compute_dtype) - self.image_center)
            projected = ops.matmul(image, self.image_kernel) + self.image_bias
            tokens.append(has_image * projected + (1.0 - has_image) * self.image_placeholder)
            if self.anchor_dim:
                anchors.append(has_image * l2_normalise(ops.matmul(image, self.image_basis)))
        category = ops.cast(ops.reshape(inputs["category"], (-1,)), "int32")
        category = ops.where((category < 0) | (category > self.num_categories), 0, category)
        tokens.append(ops.take(self.category_embeddings, category, axis=0))

        stacked = ops.stack(tokens, axis=1)  # (B, K, D)
        if self.fusion == "concat":
            fused = ops.tanh(ops.sum(stacked, axis=1))
        elif self.fusion == "weighted_sum":
            weights = ops.reshape(ops.softmax(self.token_logits), (1, -1, 1))
            fused = ops.sum(weights * ops.tanh(stacked), axis=1)
        else:
            activated = ops.tanh(stacked)
            gate_in = ops.concatenate([ops.reshape(activated, (-1, self.num_tokens * self.embedding_dim)), has_image], axis=-1)
            gates = ops.matmul(gate_in, self.gate_kernel) + self.gate_bias
            gates = ops.softmax(ops.reshape(gates, (-1, self.num_tokens, self.embedding_dim)), axis=1)
            fused = ops.sum(gates * activated, axis=1)
        fused = self._dropout(fused, training=training)
        learned = l2_normalise(ops.matmul(fused, self.output_kernel) + self.output_bias)
        if not anchors:
            return learned
        scales = ops.softplus(self.anchor_scale) * ANCHOR_START_WEIGHT / np.log(2.0)
        blocks = [learned] + [scales[k] * a for k, a in enumerate(anchors)]
        return l2_normalise(ops.concatenate(blocks, axis=-1))

    def adapt(self, text: np.ndarray, image: np.ndarray, has_image: np.ndarray) -> None:
        """Centre the inputs on the mean features of these (training) items; fit the anchors.

        Pretrained features share a large common component (MobileNet's are all non-negative),
        which would dominate every projection; centring leaves the part that tells items
        apart. Rows without an image do not count for the image mean or basis. With
        ``anchor_dim`` the anchor bases become the top principal directions of the centred,
        RMS-normalised features.

        Args:
            text: (n, text_dim) features. image: (n, image_dim). has_image: (n,) bool.
        """
        if not self.built:
            raise ValueError("adapt() needs a built layer: call it on a batch or build the model first")
        used = self.modalities.split(",")
        if "text" in used and len(text):
            self.text_center.assign(np.asarray(text, dtype=np.float64).mean(axis=0).astype(np.float32))
        with_image = np.asarray(has_image, dtype=bool)
        if "image" in used and with_image.any():
            self.image_center.assign(np.asarray(image)[with_image].astype(np.float64).mean(axis=0).astype(np.float32))
        if self.anchor_dim:
            if "text" in used and len(text):
                self.text_basis.assign(self._principal_directions(text, self.text_center))
            if "image" in used and with_image.any():
                self.image_basis.assign(self._principal_directions(np.asarray(image)[with_image], self.image_center))

    def set_anchor_start_weights(self, weights) -> None:
        """Start each anchor block (modality, text first) at ``weights[b]`` times the learned
        part's weight instead of ``ANCHOR_START_WEIGHT``; the scales stay trainable."""
        weights = np.asarray(weights, dtype=np.float64)
        if not self.anchor_dim or weights.shape != (len(self.modalities.split(",")),) or not (weights > 0).all():
            raise ValueError(f"anchor start weights {weights.tolist()}: expected one positive weight per anchor block")
        softplus = weights * np.log(2.0) / ANCHOR_START_WEIGHT  # call() scales softplus(s) by START / log 2
        # The default start is exactly the initial 0, not log(expm1(log 2)) ~ -2e-16.
        scale = np.where(weights == ANCHOR_START_WEIGHT, 0.0, np.log(np.expm1(softplus)))
        self.anchor_scale.assign(scale.astype(np.float32))

    def anchor_start_weights(self) -> np.ndarray:
        """(blocks,) each anchor block's weight relative to the learned part, now."""
        return np.log1p(np.exp(ops.convert_to_numpy(self.anchor_scale).astype(np.float64))) * ANCHOR_START_WEIGHT / np.log(2.0)

    def content_anchors(self, text: np.ndarray, image: np.ndarray, has_image: np.ndarray, *, batch_size: int = 8192) -> np.ndarray:
        """The fixed content anchor blocks of ``call``, unscaled: (n, anchor_dim x modalities).

        Per used modality (text first) the L2-normalised projection of the centred features on
        the principal directions; an article without a cover has a zero image block. No
        trained weight enters: these are the frozen encoders' own spaces, reduced.
        """
        used = self.modalities.split(",")
        blocks = []
        for name, x, center, basis in (("text", text, getattr(self, "text_center", None), getattr(self, "text_basis", None)),
                                       ("image", image, getattr(self, "image_center", None), getattr(self, "image_basis", None))):
            if name not in used or not self.anchor_dim:
                continue
            center, basis = ops.convert_to_numpy(center), ops.convert_to_numpy(basis)
            out = np.empty((len(x), self.anchor_dim), dtype=np.float32)
            for lo in range(0, len(x), batch_size):  # bounded temporaries
                # Centring matters; the RMS scaling of call() cancels in the L2 normalisation.
                projected = (np.asarray(x[lo : lo + batch_size], dtype=np.float32) - center) @ basis
                out[lo : lo + batch_size] = projected / np.sqrt(np.square(projected).sum(axis=1, keepdims=True) + 1e-12)
            if name == "image":
                out *= np.asarray(has_image, dtype=np.float32)[:, None]
            blocks.append(out)
        return np.concatenate(blocks, axis=1) if blocks else np.zeros((len(text), 0), dtype=np.float32)

    def _principal_directions(self, x: np.ndarray, center) -> np.ndarray:
        """(dim, anchor_dim) top eigenvectors of the covariance of the normalised inputs."""
        x = ops.convert_to_numpy(_rms_normalise(ops.convert_to_tensor(np.asarray(x, dtype=np.float32)) - center))
        cov = np.zeros((x.shape[1], x.shape[1]))
        for lo in range(0, len(x), 8192):  # float64 accumulation, bounded temporaries
            chunk = x[lo : lo + 8192].astype(np.float64)
            cov += chunk.T @ chunk
        _, vectors = np.linalg.eigh(cov)  # ascending eigenvalues
        top = vectors[:, ::-1][:, : self.anchor_dim]
        if top.shape[1] < self.anchor_dim:  # fewer input dims than anchors: pad with zeros
            top = np.pad(top, ((0, 0), (0, self.anchor_dim - top.shape[1])))
        # eigh's sign is arbitrary: fix it so that the same data always gives the same basis.
        signs = np.where(top[np.abs(top).argmax(axis=0), np.arange(top.shape[1])] < 0, -1.0, 1.0)
        return (top * signs).astype(np.float32)

    def compute_output_shape(self, input_shape: dict) -> tuple:
        return (input_shape["text"][0], self.embedding_dim)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            embedding_dim=self.embedding_dim, fusion=self.fusion, modalities=self.modalities,
            num_categories=self.num_categories, dropout=self.dropout, anchor_dim=self.anchor_dim,
        )
        return config


def build_item_tower(
    text_dim: int,
    image_dim: int,
    num_categories: int,
    *,
    embedding_dim: int = 128,
    fusion: str = "gated",
    modalities: str = "text,image",
    dropout: float = 0.1,
    anchor_dim: int = 0,
) -> keras.Model:
    """The item tower as a functional model, saved on its own as ``item_tower.keras``.

    Inputs (dict): ``text`` (B, text_dim) float32, ``image`` (B, image_dim) float32,
    ``has_image`` (B,) float32 0/1, ``category`` (B,) int32. Output: (B, embedding_dim).
    """
    for name, value in (("text_dim", text_dim), ("image_dim", image_dim)):
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} is {value!r}, expected a positive integer")
    inputs = {
        "text": keras.Input((int(text_dim),), dtype="float32", name="text"),
        "image": keras.Input((int(image_dim),), dtype="float32", name="image"),
        "has_image": keras.Input((), dtype="float32", name="has_image"),
        "category": keras.Input((), dtype="int32", name="category"),
    }
    fusion_layer = MultimodalFusion(
        embedding_dim, fusion=fusion, modalities=modalities, num_categories=num_categories, dropout=dropout,
        anchor_dim=anchor_dim, name="fusion",
    )
    return keras.Model(inputs, fusion_layer(inputs), name="item_tower")


@dataclass(frozen=True)
class CategoryVocabulary:
    """Category strings to ids; built on the training window only and saved with the model.

    Id 0 is out of vocabulary (unknown or unseen categories); known categories get 1..V in
    sorted order.
    """

    categories: tuple[str, ...]

    def __post_init__(self) -> None:
        if list(self.categories) != sorted(set(self.categories)):
            raise ValueError("CategoryVocabulary.categories must be sorted and unique")

    def __len__(self) -> int:
        return len(self.categories)

    @classmethod
    def fit(cls, categories: Iterable) -> "CategoryVocabulary":
        return cls(tuple(sorted({str(c) for c in categories})))

    def lookup(self, categories: np.ndarray) -> np.ndarray:
        """(n,) category values -> (n,) int32 ids, 0 for unknown ones."""
        values = np.asarray(categories).astype(str)
        if not self.categories:
            return np.zeros(len(values), dtype=np.int32)
        known = np.asarray(self.categories, dtype=str)
        pos = np.clip(np.searchsorted(known, values), 0, len(known) - 1)
        return np.where(known[pos] == values, pos + 1, 0).astype(np.int32)
