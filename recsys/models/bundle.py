"""The saved ranking model: item tower, user encoder and scorer, plus what they need to run.

A bundle directory holds::

    item_tower.keras     features of an article -> (D,) embedding (new articles need only this)
                         (served vectors append the content prior's A anchor columns, if fitted)
    user_encoder.keras   (H, D) clicked-item embeddings + (H,) mask -> (D,) user vector
                         (served user vectors append the content prior's columns, if fitted)
    scorer.keras         user (D,), candidate (D,), side (S,) -> click probability
    config.json          category vocabulary, history_len, side-feature statistics,
                         modalities, fusion mode, embedding_dim, encoder identities, seed,
                         the category affinity's and the file-exposure calibration's
                         weights (``category_affinity``, ``file_exposure``)

Each ``.keras`` file loads with plain ``keras.saving.load_model``. ``RankingModel`` wraps
them with numpy-in/numpy-out batched methods; the nightly job computes item embeddings once
per item and user vectors once per user, then scores every (user, candidate) pair.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from recsys.atomic import umasked
from recsys.encoders.item_features import EncoderInfo, ItemFeatures
from recsys.errors import DamagedFileError, ModelMismatchError, NotFoundError, disk_errors
from recsys.models import NUM_HEADS
from recsys.models.affinity import AffinityCalibration
from recsys.models.exposure import ExposureCalibration
from recsys.models.fusion import CategoryVocabulary, build_item_tower, parse_modalities
from recsys.data.interactions import Impressions, InteractionLog, gather_csr, slice_impressions
from recsys.models.scorer import Scorer, build_scorer
from recsys.models.side_features import SideFeatures, check_side_inputs
from recsys.models.user_encoder import build_user_encoder


class _OwnTracingWarningFilter(logging.Filter):
    """Drops TensorFlow's "triggered tf.function retracing" warning about RankingModel's own functions.

    Every RankingModel traces its four functions once (fixed input signatures). TensorFlow
    counts traces per source line, across instances, so loading several models in one process
    (an evaluation comparing versions, the demo) reads to it like retracing in a loop and it
    warns that tracing is expensive. Warnings about any other function pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("triggered tf.function retracing" in message and "RankingModel.__init__" in message)


def _quiet_own_tracing_warning() -> None:
    """Install ``_OwnTracingWarningFilter`` on TensorFlow's logger once (from the first
    RankingModel made, not at import: importing changes nothing)."""
    tf_logger = logging.getLogger("tensorflow")
    if not any(isinstance(f, _OwnTracingWarningFilter) for f in tf_logger.filters):
        tf_logger.addFilter(_OwnTracingWarningFilter())

CONFIG_FILE = "config.json"
MODEL_FILES = ("item_tower.keras", "user_encoder.keras", "scorer.keras")
FORMAT_VERSION = 1
# Impressions scored at a time by ``score_impressions``.
SCORE_IMPRESSIONS = 1 << 14
# Distinct histories per batch of content_prior_terms: 1024 x 50 x 32 float64 anchors, 13 MB.
PRIOR_TERM_USERS = 1024


@dataclass(frozen=True)
class RankingConfig:
    """Everything besides weights that a bundle needs, saved as config.json.

    Attributes:
        categories: the category vocabulary (training window only); id 0 is unknown.
        history_len: clicked items the user encoder reads, most recent first.
        embedding_dim: ``D``.
        modalities: "text", "image" or "text,image".
        fusion: "concat", "weighted_sum" or "gated".
        side_features: side-feature window and normalisation statistics.
        text_encoder / image_encoder: the frozen encoders the features must come from.
        seed: training seed.
        logged_clicks: the model was trained on histories led by the user's logged clicks
            before each impression (``interactions.with_logged_clicks``), so it must be served so.
        prior_weights: ``lambda_b``, one per anchor block (modality, text first): the weights of
            the content prior's mean-similarity term (``RankingModel.with_content_prior``); ()
            or all 0, with ``moment_weights`` the same, serves the networks alone.
        prior_dim: ``A``, the content-anchor columns appended to embeddings and user vectors
            when the prior is on (0 when off).
        moment_weights: ``mu_b``, one per anchor block: the weights of the prior's
            second-moment term (mean squared similarity to the history); () or all 0: off.
        moment_dim: ``Q``, the columns of that term in user vectors: anchor_dim squared per
            modality when it is on, else 0. Item embeddings do not carry them.
        file_exposure: the file-exposure calibration fitted on validation
            (``recsys.models.exposure``); None for a bundle trained without one (or before it existed).
        category_affinity: the reader's category affinity fitted on validation
            (``recsys.models.affinity``), applied before the file exposure; None: without.
        info: free-form training facts (loss, metrics, data counts) for manifests.
    """

    categories: tuple[str, ...]
    history_len: int
    embedding_dim: int
    modalities: str
    fusion: str
    side_features: SideFeatures
    text_encoder: EncoderInfo
    image_encoder: EncoderInfo
    seed: int = 0
    logged_clicks: bool = False
    prior_weights: tuple[float, ...] = ()
    prior_dim: int = 0
    moment_weights: tuple[float, ...] = ()
    moment_dim: int = 0
    file_exposure: ExposureCalibration | None = None
    category_affinity: AffinityCalibration | None = None
    info: dict = field(default_factory=dict)

    @property
    def serving_dim(self) -> int:
        """Width of served item embeddings (what the index holds): ``D`` plus the prior's ``A`` columns."""
        return self.embedding_dim + self.prior_dim

    @property
    def user_dim(self) -> int:
        """Width of served user vectors: ``serving_dim`` plus the prior's ``Q`` second-moment
        columns. Their first ``serving_dim`` columns are the retrieval query."""
        return self.serving_dim + self.moment_dim

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "categories": list(self.categories),
            "history_len": self.history_len,
            "embedding_dim": self.embedding_dim,
            "modalities": self.modalities,
            "fusion": self.fusion,
            "side_features": self.side_features.to_dict(),
            "text_encoder": self.text_encoder.to_dict(),
            "image_encoder": self.image_encoder.to_dict(),
            "seed": self.seed,
            "logged_clicks": self.logged_clicks,
            "prior_weights": list(self.prior_weights),
            "prior_dim": self.prior_dim,
            "moment_weights": list(self.moment_weights),
            "moment_dim": self.moment_dim,
            "serving_dim": self.serving_dim,  # for readers that do not load TensorFlow (the nightly driver)
            "user_dim": self.user_dim,
            "file_exposure": None if self.file_exposure is None else self.file_exposure.to_dict(),
            "category_affinity": None if self.category_affinity is None else self.category_affinity.to_dict(),
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "RankingConfig":
        return cls(
            categories=tuple(d["categories"]),
            history_len=int(d["history_len"]),
            embedding_dim=int(d["embedding_dim"]),
            modalities=str(d["modalities"]),
            fusion=str(d["fusion"]),
            side_features=SideFeatures.from_dict(d["side_features"]),
            text_encoder=EncoderInfo.from_dict(d["text_encoder"]),
            image_encoder=EncoderInfo.from_dict(d["image_encoder"]),
            seed=int(d.get("seed", 0)),
            logged_clicks=bool(d.get("logged_clicks", False)),
            prior_weights=_prior_weights(d),
            prior_dim=int(d.get("prior_dim", 0)),
            moment_weights=tuple(float(w) for w in d.get("moment_weights", ())),
            moment_dim=int(d.get("moment_dim", 0)),
            file_exposure=None if d.get("file_exposure") is None else ExposureCalibration.from_dict(d["file_exposure"]),
            category_affinity=(None if d.get("category_affinity") is None
                               else AffinityCalibration.from_dict(d["category_affinity"])),
            info=dict(d.get("info", {})),
        )


def _damaged(path: Path, err: Exception) -> DamagedFileError:
    # Keras reports a truncated .keras file as "File not found", which sends operators looking
    # for a missing file; name the file and say it is there but unreadable.
    return DamagedFileError(f"{path}: the file is there but cannot be read ({type(err).__name__}: {err}); the model "
                            "version is damaged: train again, or restore the version's folder from a backup")


def _check_widths(directory: Path, config: RankingConfig, item_tower: keras.Model, user_encoder: keras.Model,
                  scorer: keras.Model) -> None:
    """Refuse a config.json whose widths are not the networks': an edited embedding_dim, or
    files of two bundles, failed only at the first batch ("could not broadcast (400,128) into
    (400,64)", an internal error)."""
    d, s = config.embedding_dim, config.side_features.num_features
    widths = [
        ("embedding_dim", d, MODEL_FILES[0], "embeds articles in", item_tower.outputs[0].shape[-1]),
        ("embedding_dim", d, MODEL_FILES[1], "reads history embeddings of", user_encoder.inputs[0].shape[-1]),
        ("embedding_dim", d, MODEL_FILES[2], "reads user vectors of", scorer.inputs[0].shape[-1]),
        ("embedding_dim", d, MODEL_FILES[2], "reads article embeddings of", scorer.inputs[1].shape[-1]),
        ("side_features", s, MODEL_FILES[2], "reads side features of", scorer.inputs[2].shape[-1]),
    ]
    for key, expected, name, what, got in widths:
        if got != expected:
            raise DamagedFileError(
                f"{directory / CONFIG_FILE}: {key} gives {expected} dimensions, but {name} {what} {got}; the bundle's "
                "files do not belong together: the model version is damaged: train again, or restore the version's "
                "folder from a backup"
            )


def _check_clusters(config: RankingConfig, modalities: str, anchor_dim: int) -> None:
    """Refuse content clusters that do not read the served vectors' anchor blocks: they would
    fail only when scored (in every nightly worker), or read the wrong columns."""
    affinity = config.category_affinity
    clusters = None if affinity is None else affinity.clusters
    if clusters is None:
        return
    blocks = modalities.split(",")
    for name, offset, table in zip(clusters.blocks, clusters.offsets, clusters.centres):
        if (config.prior_dim == 0 or name not in blocks or offset != blocks.index(name) * anchor_dim
                or len(table[0]) != anchor_dim):
            raise ModelMismatchError(
                f"category affinity: content clusters of block {name!r} at anchor column {offset}, {len(table[0])} wide, "
                f"but the served vectors carry {config.prior_dim} anchor columns, blocks {blocks} of {anchor_dim}")


def _prior_weights(d: dict) -> tuple[float, ...]:
    """Per-block prior weights of a config.json; bundles saved before per-modality weights
    hold one ``prior_weight`` for every block (one block per modality)."""
    if "prior_weights" in d:
        return tuple(float(w) for w in d["prior_weights"])
    weight = float(d.get("prior_weight", 0.0))
    return (weight,) * len(str(d["modalities"]).split(",")) if weight else ()


def default_anchor_dim(embedding_dim: int) -> int:
    """16 content-anchor dimensions per modality at D = 128 (the config default), D / 8 below."""
    return min(16, int(embedding_dim) // 8)


def _check_encoder(field_name: str, saved: EncoderInfo, given: EncoderInfo | None) -> None:
    if given is None:
        return
    for attr in ("name", "version", "dim"):
        if getattr(saved, attr) != getattr(given, attr):
            raise ModelMismatchError(
                f"{field_name}.{attr}: the model was saved with {getattr(saved, attr)!r}, "
                f"but {getattr(given, attr)!r} was given"
            )


class RankingModel:
    """The trained ranking model with batched numpy methods.

    Args:
        item_tower / user_encoder / scorer: the functional models built by
            ``build_item_tower`` / ``build_user_encoder`` / ``build_scorer``.
        config: the bundle config.
    """

    def __init__(self, item_tower: keras.Model, user_encoder: keras.Model, scorer: keras.Model, config: RankingConfig):
        _quiet_own_tracing_warning()
        self.item_tower = item_tower
        self.user_encoder = user_encoder
        self.scorer = scorer
        self.config = config
        self.vocabulary = CategoryVocabulary(config.categories)
        text_dim, image_dim = config.text_encoder.dim, config.image_encoder.dim
        d, s = config.embedding_dim, config.side_features.num_features
        # One trace per model: fixed feature dims, any batch size.
        self._item_fn = tf.function(
            lambda t, i, h, c: item_tower({"text": t, "image": i, "has_image": h, "category": c}, training=False),
            input_signature=[
                tf.TensorSpec((None, text_dim), tf.float32), tf.TensorSpec((None, image_dim), tf.float32),
                tf.TensorSpec((None,), tf.float32), tf.TensorSpec((None,), tf.int32),
            ],
        )
        self._user_fn = tf.function(
            lambda e, m: user_encoder([e, m], training=False),
            input_signature=[tf.TensorSpec((None, None, d), tf.float32), tf.TensorSpec((None, None), tf.float32)],
        )
        scorer_layers = [layer for layer in scorer.layers if isinstance(layer, Scorer)]
        if len(scorer_layers) != 1:
            raise ValueError(f"the scorer model has {len(scorer_layers)} Scorer layers, expected 1")
        self._scorer_layer = scorer_layers[0]
        fusion = item_tower.get_layer("fusion")
        self._anchor_dim = fusion.anchor_dim
        self._anchor_blocks = len(fusion.modalities.split(",")) if fusion.anchor_dim else 0
        self._anchor_columns = self._anchor_dim * self._anchor_blocks
        self._moment_columns = self._anchor_blocks * self._anchor_dim**2  # Q when the second moment is on
        means, moments = config.prior_weights, config.moment_weights
        on = any(w > 0 for w in means + moments)
        expected = (self._anchor_columns if on else 0, self._moment_columns if any(moments) else 0)
        lengths = (self._anchor_blocks if on else 0, self._anchor_blocks if any(moments) else 0)
        if (any(w < 0 or not np.isfinite(w) for w in means + moments) or (len(means), len(moments)) != lengths
                or (config.prior_dim, config.moment_dim) != expected):
            raise ModelMismatchError(
                f"content prior: prior_weights {list(means)} and moment_weights {list(moments)} with prior_dim "
                f"{config.prior_dim} and moment_dim {config.moment_dim}, but the item tower has {self._anchor_blocks} "
                f"anchor blocks of {self._anchor_dim} (expected one weight >= 0 per block, prior_dim {expected[0]}, "
                f"moment_dim {expected[1]})"
            )
        _check_clusters(config, fusion.modalities, self._anchor_dim)
        pairs = [tf.TensorSpec((None, config.user_dim), tf.float32), tf.TensorSpec((None, config.serving_dim), tf.float32),
                 tf.TensorSpec((None, s), tf.float32)]
        layer = self._scorer_layer
        if config.prior_dim:
            w, blocks, k = config.serving_dim, self._anchor_blocks, self._anchor_dim
            moments = config.moment_dim > 0

            # The networks read the first D columns; the content prior joins the logit before the
            # calibration, in one graph: the inner product of the anchor columns (mean similarity)
            # and, with moments, c_b' M_b c_b per anchor block b, M_b the user's weighted mean
            # outer product of the history's anchors (mean squared similarity).
            def served_logits(u, c, x):
                out = layer.logits(u[:, :d], c[:, :d], x) + tf.reduce_sum(u[:, d:w] * c[:, d:], axis=1)
                if moments:
                    anchors = tf.reshape(c[:, d:], (-1, blocks, k))
                    second = tf.reshape(u[:, w:], (-1, blocks, k, k))
                    out += tf.einsum("pgij,pgi,pgj->p", second, anchors, anchors)
                return out

            self._logit_fn = tf.function(served_logits, input_signature=pairs)
            self._score_fn = tf.function(
                lambda u, c, x: tf.sigmoid(layer.calibration_slope * served_logits(u, c, x) + layer.calibration_intercept),
                input_signature=pairs,
            )
        else:
            self._logit_fn = tf.function(lambda u, c, x: layer.logits(u, c, x), input_signature=pairs)
            self._score_fn = tf.function(lambda u, c, x: scorer([u, c, x], training=False), input_signature=pairs)

    @classmethod
    def create(
        cls,
        text_encoder: EncoderInfo,
        image_encoder: EncoderInfo,
        categories,
        *,
        modalities: str = "text,image",
        fusion: str = "gated",
        embedding_dim: int = 128,
        history_len: int = 50,
        side_features: SideFeatures | None = None,
        num_heads: int = NUM_HEADS,
        scorer_hidden_units=(32,),
        dropout: float = 0.1,
        anchor_dim: int | None = None,
        seed: int = 0,
        logged_clicks: bool = False,
    ) -> "RankingModel":
        """A fresh (untrained) model; ``categories`` is any iterable of category strings."""
        if not isinstance(history_len, (int, np.integer)) or history_len <= 0:
            raise ValueError(f"history_len is {history_len!r}, expected a positive integer")
        side_features = side_features or SideFeatures()
        anchor_dim = default_anchor_dim(embedding_dim) if anchor_dim is None else anchor_dim
        vocabulary = CategoryVocabulary.fit(categories)
        config = RankingConfig(
            categories=vocabulary.categories, history_len=int(history_len), embedding_dim=int(embedding_dim),
            modalities=",".join(parse_modalities(modalities)), fusion=fusion, side_features=side_features,
            text_encoder=text_encoder, image_encoder=image_encoder, seed=int(seed), logged_clicks=bool(logged_clicks),
        )
        keras.utils.set_random_seed(seed)
        item_tower = build_item_tower(
            text_encoder.dim, image_encoder.dim, len(vocabulary), embedding_dim=embedding_dim, fusion=fusion,
            modalities=modalities, dropout=dropout, anchor_dim=anchor_dim,
        )
        user_encoder = build_user_encoder(embedding_dim, num_heads=num_heads, dropout=dropout)
        scorer = build_scorer(embedding_dim, side_features.num_features, hidden_units=scorer_hidden_units)
        return cls(item_tower, user_encoder, scorer, config)

    # -- persistence ---------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the bundle into a sibling temp dir and rename it to ``directory``: a reader
        never sees a half-written bundle, and a failure while writing leaves an existing one
        untouched.

        An existing bundle is replaced by two renames (it moves to a sibling ``.<name>.old-*``
        folder, then the new one moves in); a process killed between them leaves no bundle at
        ``directory`` and the old one in that folder. ``recsys train`` always writes a new
        version folder, so this only concerns callers that overwrite.

        Raises:
            DiskError: the disk is full or read-only (the message names ``directory``).
        """
        target = Path(directory)
        with disk_errors("save the model", target):  # Keras's OSError names no file
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            os.chmod(tmp, umasked(0o777))  # mkdtemp's 0700 would outlive the rename
            try:
                self.item_tower.save(tmp / MODEL_FILES[0])
                self.user_encoder.save(tmp / MODEL_FILES[1])
                self.scorer.save(tmp / MODEL_FILES[2])
                with open(tmp / CONFIG_FILE, "w", encoding="utf-8") as f:
                    json.dump(self.config.to_dict(), f, indent=2, sort_keys=True)
                if target.exists():
                    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                    os.replace(target, old / "bundle")
                    os.replace(tmp, target)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return target

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        *,
        text_encoder: EncoderInfo | None = None,
        image_encoder: EncoderInfo | None = None,
    ) -> "RankingModel":
        """Load a bundle, refusing one built on other encoders than the ones given.

        Raises:
            NotFoundError: the directory or one of its files is missing.
            DamagedFileError: a file is there but cannot be read (truncated, corrupt).
            ModelMismatchError: ``text_encoder``/``image_encoder`` differ from the saved ones
                (the message names the field, the saved value and the given value).
        """
        directory = Path(directory)
        missing = [name for name in (CONFIG_FILE, *MODEL_FILES) if not (directory / name).is_file()]
        if missing:
            raise NotFoundError(f"model bundle {directory} has no {', '.join(missing)}")
        try:
            with open(directory / CONFIG_FILE, encoding="utf-8") as f:
                config = RankingConfig.from_dict(json.load(f))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
            raise _damaged(directory / CONFIG_FILE, err) from err
        _check_encoder("text_encoder", config.text_encoder, text_encoder)
        _check_encoder("image_encoder", config.image_encoder, image_encoder)
        models = []
        for name in MODEL_FILES:
            try:
                models.append(keras.saving.load_model(directory / name))
            except Exception as err:  # noqa: BLE001 - Keras raises ValueError("File not found"), zipfile and h5 errors
                raise _damaged(directory / name, err) from err
        _check_widths(directory, config, *models)
        return cls(*models, config)

    # -- inference -----------------------------------------------------------------------

    def item_embeddings(self, features: ItemFeatures, *, batch_size: int = 4096) -> np.ndarray:
        """Embeddings of articles from their frozen-encoder features.

        Args:
            features: ``n`` articles; their encoders must be the bundle's.
            batch_size: rows per forward pass.

        Returns:
            (n, serving_dim) float32: the (n, D) embedding, unit L2 norm, followed with the
            content prior on by the article's A content anchors (``content_anchors``).

        Raises:
            ModelMismatchError: the features come from other encoders or have other dims.
        """
        _check_encoder("text_encoder", self.config.text_encoder, features.text_encoder)
        _check_encoder("image_encoder", self.config.image_encoder, features.image_encoder)
        for field_name, saved, got in (
            ("text dim", self.config.text_encoder.dim, features.text.shape[1]),
            ("image dim", self.config.image_encoder.dim, features.image.shape[1]),
        ):
            if saved != got:
                raise ModelMismatchError(f"{field_name}: the model was saved with {saved}, but features have {got}")
        categories = self.vocabulary.lookup(features.categories)
        has_image = features.has_image.astype(np.float32)
        out = np.empty((len(features), self.config.embedding_dim), dtype=np.float32)
        for lo in range(0, len(features), batch_size):
            hi = min(lo + batch_size, len(features))
            out[lo:hi] = self._item_fn(
                np.asarray(features.text[lo:hi], dtype=np.float32), np.asarray(features.image[lo:hi], dtype=np.float32),
                has_image[lo:hi], categories[lo:hi],
            ).numpy()
        if self.config.prior_dim:
            return np.concatenate([out, self.content_anchors(features)], axis=1)
        return out

    def content_anchors(self, features: ItemFeatures) -> np.ndarray:
        """(n, A) the item tower's fixed content anchors of each article (no trained weight).

        ``A`` = anchor_dim x modalities: per modality the unit projection of the centred frozen
        features on their training-time principal directions (zero image block without a cover).
        """
        return self.item_tower.get_layer("fusion").content_anchors(features.text, features.image, features.has_image)

    def affinity_item_codes(self, publisher_codes: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        """(n, K) key codes of n articles for the category affinity: the publisher's (n, 2)
        (``KeyVocabulary.codes``), then those of the affinity's content clusters, read from the
        anchor columns of the articles' served vectors (n, serving_dim) (``item_embeddings``, or
        the index's vectors).

        Raises:
            ValueError: the model has no category affinity, or ``embeddings`` are not served vectors.
        """
        affinity = self.config.category_affinity
        if affinity is None:
            raise ValueError("the model has no category affinity: it reads no key codes")
        if affinity.clusters is None:
            return affinity.item_codes(publisher_codes, None)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.config.serving_dim or self.config.prior_dim == 0:
            raise ValueError(f"the category affinity's content clusters read the anchor columns of served vectors "
                             f"({self.config.serving_dim} wide with {self.config.prior_dim} anchor columns); "
                             f"got vectors of shape {embeddings.shape}")
        return affinity.item_codes(publisher_codes, embeddings[:, self.config.embedding_dim :])

    @property
    def anchor_columns(self) -> int:
        """``A``: content-anchor columns of the item tower (anchor_dim x modalities; 0 without)."""
        return self._anchor_columns

    @property
    def anchor_blocks(self) -> int:
        """Anchor blocks, one per modality of the item tower (0 without content anchors)."""
        return self._anchor_blocks

    def with_content_prior(self, weights=0.0, moment_weights=0.0) -> "RankingModel":
        """The same networks, serving ``logit + sum_b (weights[b] * s1_b + moment_weights[b] * s2_b)``.

        The prior is the training-free "how close is the candidate to what the user clicked, in
        the frozen encoders' own spaces" score. With ``a_h`` the anchors of the history's
        articles and ``c`` the candidate's, per anchor block (modality, text first) ``b``:

            s1_b = mean_h <a_hb, c_b>       (mean similarity)
            s2_b = mean_h <a_hb, c_b>^2     (mean squared similarity)

        ``s2`` rewards a candidate very close to some of the history over one mildly close to
        all of it (a user with several distinct interests). ``train_ctr`` fits the weights on
        the validation window. The prior rides along in the served vectors: item embeddings gain
        the ``A`` anchor columns; user vectors ``weights[b]`` times the history's mean anchors of
        block ``b`` and, for ``s2``, ``moment_weights[b]`` times their mean outer product (``Q``
        columns that only the scorer reads: retrieval uses the first ``serving_dim`` columns).
        All 0 turns it off.

        Args:
            weights / moment_weights: one number for every block, or one per block.

        Raises:
            ValueError: a negative or non-finite weight, a sequence of the wrong length, or a
                positive weight on a model without content anchors (``anchor_dim`` 0).
        """
        per_block = []
        for name, value in (("weight", weights), ("moment weight", moment_weights)):
            values = [float(v) for v in np.atleast_1d(np.asarray(value, dtype=np.float64))]
            if np.ndim(value) == 0:
                values = values * max(self._anchor_blocks, 1)
            elif len(values) != self._anchor_blocks:
                raise ValueError(f"content prior {name}s {values} have {len(values)} entries, expected one per "
                                 f"anchor block ({self._anchor_blocks})")
            for v in values:
                if v < 0 or not np.isfinite(v):
                    raise ValueError(f"content prior {name} is {v!r}, expected a finite number >= 0")
            per_block.append(tuple(values))
        means, moments = per_block
        on, with_moments = any(means + moments), any(moments)
        if on and not self._anchor_columns:
            raise ValueError("content prior needs content anchors, but the model has anchor_dim 0")
        # Off: no columns and no weights. Moments alone: the mean anchor columns serve zeros.
        config = dataclasses.replace(
            self.config, prior_weights=means if on else (), prior_dim=self._anchor_columns if on else 0,
            moment_weights=moments if with_moments else (),
            moment_dim=self._moment_columns if with_moments else 0,
        )
        return RankingModel(self.item_tower, self.user_encoder, self.scorer, config)

    def history_matrix(self, history_offsets: np.ndarray, history_items: np.ndarray,
                       users: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """CSR histories -> (b, H) item rows and (b, H) float32 mask, capped to ``history_len``.

        ``users``: (b,) which of the m histories, in this order (default all m). Histories are
        stored most recent first, so the cap keeps the first ``history_len``. H is the longest
        capped history among them; padding slots hold row 0 with mask 0.
        """
        users = np.arange(len(history_offsets) - 1) if users is None else users
        starts = history_offsets[users]
        lengths = np.minimum(history_offsets[users + 1] - starts, self.config.history_len)
        width = max(int(lengths.max()) if len(lengths) else 0, 1)
        slots = np.arange(width)[None, :]
        mask = slots < lengths[:, None]
        positions = np.where(mask, starts[:, None] + slots, 0)
        rows = np.where(mask, history_items[positions] if len(history_items) else 0, 0)
        return rows.astype(np.int64), mask.astype(np.float32)

    def user_vectors(
        self, history_offsets: np.ndarray, history_items: np.ndarray, item_embeddings: np.ndarray, *, batch_size: int = 1024
    ) -> np.ndarray:
        """User vectors from clicked histories; empty histories get the cold-start vector.

        Args:
            history_offsets: (m + 1,) int64 CSR offsets.
            history_items: (h,) int rows into ``item_embeddings``, most recent first per user.
            item_embeddings: (n, serving_dim) from ``item_embeddings``.
            batch_size: users per forward pass.

        Returns:
            (m, user_dim) float32: (m, D), (m, D + A) with the content prior on, (m, D + A + Q)
            with its second-moment term.

        Raises:
            ValueError: a history item outside ``item_embeddings``.
            ModelMismatchError: ``item_embeddings`` do not have ``serving_dim`` columns.
        """
        history_offsets = np.asarray(history_offsets, dtype=np.int64)
        history_items = np.asarray(history_items, dtype=np.int64)
        self._check_embeddings(item_embeddings)
        if len(history_items) and (history_items.min() < 0 or history_items.max() >= len(item_embeddings)):
            bad = history_items[(history_items < 0) | (history_items >= len(item_embeddings))][0]
            raise ValueError(f"history item row {bad} is outside the {len(item_embeddings)} item embeddings")
        m = len(history_offsets) - 1
        d, w = self.config.embedding_dim, self.config.serving_dim
        out = np.empty((m, self.config.user_dim), dtype=np.float32)
        # Batches of users with similar history lengths: each batch is padded to its longest
        # history and self-attention costs H^2, so sorting by length is 1.7x faster on the
        # lengths of a MIND-size world (benchmarks/bench_user_vectors.py); a user's vector does
        # not depend on its batch's padding, to float rounding.
        lengths = np.minimum(np.diff(history_offsets), self.config.history_len)
        order = np.argsort(lengths, kind="stable")
        # Per-column weight of the mean anchors, per-block weight of their outer products.
        scale = np.repeat(np.asarray(self.config.prior_weights, dtype=np.float32), self._anchor_dim)
        moment_scale = np.asarray(self.config.moment_weights, dtype=np.float32)[None, :, None, None]
        for lo in range(0, m, batch_size):
            users = order[lo : lo + batch_size]
            rows, mask = self.history_matrix(history_offsets, history_items, users)
            history = item_embeddings[rows].astype(np.float32, copy=False)  # (b, H, D [+ A])
            out[users, :d] = self._user_fn(np.ascontiguousarray(history[..., :d]), mask).numpy()
            if self.config.prior_dim:  # block weights x mean anchors of the history; 0 for a cold user
                count = np.maximum(mask.sum(axis=1, keepdims=True), 1.0)
                out[users, d:w] = scale * np.einsum("bh,bha->ba", mask, history[..., d:]) / count
            if self.config.moment_dim:  # block moment weights x mean outer product of the block's anchors
                blocks = history[..., d:].reshape(len(users), history.shape[1], self._anchor_blocks, self._anchor_dim)
                second = np.einsum("bh,bhgi,bhgj->bgij", mask, blocks, blocks) / count[:, :, None, None]
                second *= moment_scale
                out[users, w:] = second.reshape(len(users), -1)
        return out

    def side_features(
        self, item_rows: np.ndarray, times: np.ndarray, log: InteractionLog, first_seen: np.ndarray,
        *, age_times: np.ndarray | None = None,
    ) -> np.ndarray:
        """(p, S) float32 normalised side features (popularity before ``times``, age at
        ``age_times``, by default ``times``)."""
        return self.config.side_features.compute(item_rows, times, log, first_seen, age_times=age_times)

    def score(
        self, user_vectors: np.ndarray, candidate_embeddings: np.ndarray, side: np.ndarray, *, batch_size: int = 8192
    ) -> np.ndarray:
        """Click probabilities of (user, candidate) pairs.

        Args:
            user_vectors: (p, user_dim) user vector of each pair (``user_vectors``).
            candidate_embeddings: (p, serving_dim) item embedding of each pair (``item_embeddings``).
            side: (p, S) side features of each pair.
            batch_size: pairs per forward pass; about 8k keeps the (batch, D) temporaries in
                the CPU caches, larger passes are slower per pair.

        Returns:
            (p,) float32 probabilities.
        """
        return self._pairs(self._score_fn, user_vectors, candidate_embeddings, side, batch_size)

    def logits(
        self, user_vectors: np.ndarray, candidate_embeddings: np.ndarray, side: np.ndarray, *, batch_size: int = 8192
    ) -> np.ndarray:
        """Uncalibrated logits of (user, candidate) pairs; same arguments as ``score``."""
        return self._pairs(self._logit_fn, user_vectors, candidate_embeddings, side, batch_size)

    def calibrated_logits(self, logits: np.ndarray) -> np.ndarray:
        """(c,) float64: uncalibrated ``logits`` (c,) through the scorer's Platt calibration
        (``sigmoid`` of them is what ``score`` returns)."""
        layer = self._scorer_layer
        slope, intercept = float(layer.calibration_slope.numpy()), float(layer.calibration_intercept.numpy())
        return slope * np.asarray(logits, dtype=np.float64) + intercept

    def _pairs(self, fn, user_vectors, candidate_embeddings, side, batch_size: int) -> np.ndarray:
        p = len(user_vectors)
        u, w, s = self.config.user_dim, self.config.serving_dim, self.config.side_features.num_features
        if candidate_embeddings.shape != (p, w) or user_vectors.shape != (p, u) or side.shape != (p, s):
            raise ValueError(
                f"score expects user_vectors ({p}, {u}), candidate_embeddings ({p}, {w}) and side ({p}, {s}); "
                f"got {user_vectors.shape}, {candidate_embeddings.shape} and {side.shape}"
            )
        out = np.empty(p, dtype=np.float32)
        for lo in range(0, p, batch_size):
            hi = min(lo + batch_size, p)
            out[lo:hi] = fn(
                np.asarray(user_vectors[lo:hi], dtype=np.float32), np.asarray(candidate_embeddings[lo:hi], dtype=np.float32),
                np.asarray(side[lo:hi], dtype=np.float32),
            ).numpy()
        return out

    def score_impressions(
        self,
        impressions: Impressions,
        item_embeddings: np.ndarray,
        log: InteractionLog,
        first_seen: np.ndarray,
        *,
        as_of: np.datetime64 | None = None,
        popularity_until: np.datetime64 | None = None,
        age_until: np.datetime64 | None = None,
        logits: bool = False,
    ) -> np.ndarray:
        """Click probabilities of every candidate of every impression.

        Args:
            impressions: ``m`` impressions (labels are not read).
            item_embeddings: (n, serving_dim) embeddings (``item_embeddings``) of the rows the
                impressions refer to.
            log: interactions for the popularity features (events before each time count).
            first_seen: (n,) datetime64 first appearance of each item.
            as_of: compute side features at this time instead of each impression's time
                (a nightly batch scores tomorrow's impressions with tonight's statistics).
            popularity_until: read popularity at ``min(impression time, popularity_until)``:
                with the end of ``log``, impressions after it get the newest window the log
                holds, not a window that runs past the data (which reads every article as
                unpopular a day later). Ignored with ``as_of``.
            age_until: read age at ``min(impression time, age_until)``. Ignored with ``as_of``.
            logits: return uncalibrated logits instead of probabilities.

        Returns:
            (c,) float32 aligned with ``impressions.candidate_items``.
        """
        items = impressions.candidate_items
        if len(items) and (items.min() < 0 or items.max() >= len(item_embeddings)):
            bad = items[(items < 0) | (items >= len(item_embeddings))][0]
            raise ValueError(f"candidate item row {bad} is outside the {len(item_embeddings)} item embeddings")
        # Before the chunks, so that a bad row is named at its position in the whole array.
        check_side_inputs(items, log, first_seen)
        out = np.empty(len(items), dtype=np.float32)
        # A chunk of impressions at a time: user vectors take user_dim floats per impression and
        # the side features ~110 bytes per candidate, too much for a whole training window at once.
        for lo in range(0, len(impressions), SCORE_IMPRESSIONS):
            part = slice_impressions(impressions, lo, min(lo + SCORE_IMPRESSIONS, len(impressions)))
            start = impressions.candidate_offsets[lo]
            out[start : start + len(part.candidate_items)] = self._score_part(
                part, item_embeddings, log, first_seen, as_of=as_of, popularity_until=popularity_until,
                age_until=age_until, logits=logits,
            )
        return out

    def _score_part(self, impressions: Impressions, item_embeddings: np.ndarray, log: InteractionLog,
                    first_seen: np.ndarray, *, as_of, popularity_until, age_until, logits: bool) -> np.ndarray:
        """``score_impressions`` on one chunk."""
        offsets, histories, which = self._distinct_histories(impressions)
        users = self.user_vectors(offsets, histories, item_embeddings)[which]
        counts = np.diff(impressions.candidate_offsets)
        owner = np.repeat(np.arange(len(impressions)), counts)
        items = impressions.candidate_items.astype(np.int64)
        times = impressions.times[owner] if as_of is None else np.full(len(items), np.datetime64(as_of, "s"))
        popularity_times, age_times = times, times
        if as_of is None and popularity_until is not None:
            popularity_times = np.minimum(times, np.datetime64(popularity_until, "s"))
        if as_of is None and age_until is not None:
            age_times = np.minimum(times, np.datetime64(age_until, "s"))
        side = self.side_features(items, popularity_times, log, first_seen, age_times=age_times)
        fn = self.logits if logits else self.score
        out = np.empty(len(items), dtype=np.float32)
        step = 65536  # gather per chunk: bounded memory for millions of candidates
        for lo in range(0, len(items), step):
            hi = min(lo + step, len(items))
            out[lo:hi] = fn(users[owner[lo:hi]], item_embeddings[items[lo:hi]], side[lo:hi])
        return out

    def content_prior_terms(self, impressions: Impressions, item_embeddings: np.ndarray) -> np.ndarray:
        """Each candidate's content-prior terms against its impression's capped history, unweighted.

        ``s1_b = mean_h <a_hb, a_cb>`` and ``s2_b = mean_h <a_hb, a_cb>^2`` per anchor block ``b``
        (text first), read from the anchor columns of the served embeddings, as the served user
        vector reads them (``with_content_prior``): with weights ``lambda`` and ``mu`` the served
        logit is the networks' plus ``sum_b lambda_b s1_b + mu_b s2_b``. 0 for a cold user.
        ``train_ctr`` fits the weights from these without scoring the networks once per term.

        Args:
            impressions: ``m`` impressions with ``c`` candidates.
            item_embeddings: (n, serving_dim) embeddings of a model serving the prior (``D + A``
                columns: the anchors after the networks' ``D``).

        Returns:
            (c, 2B) float64: the ``B`` mean-similarity columns, then the ``B`` mean-squared ones.

        Raises:
            ValueError: the model serves no anchor columns.
        """
        if not self.config.prior_dim:
            raise ValueError("content prior terms need a model serving the prior's anchor columns (prior_dim 0)")
        self._check_embeddings(item_embeddings)
        d, blocks, k = self.config.embedding_dim, self._anchor_blocks, self._anchor_dim
        out = np.empty((len(impressions.candidate_items), 2 * blocks), dtype=np.float64)
        for lo in range(0, len(impressions), SCORE_IMPRESSIONS):
            part = slice_impressions(impressions, lo, min(lo + SCORE_IMPRESSIONS, len(impressions)))
            offsets, histories, which = self._distinct_histories(part)
            histories = np.asarray(histories, dtype=np.int64)
            u = len(offsets) - 1
            mean, second = np.empty((u, blocks, k)), np.empty((u, blocks, k, k))
            for u0 in range(0, u, PRIOR_TERM_USERS):  # bounded (users, H, A) temporaries
                users = np.arange(u0, min(u0 + PRIOR_TERM_USERS, u))
                rows, mask = self.history_matrix(offsets, histories, users)
                anchors = item_embeddings[rows][..., d:].astype(np.float64).reshape(*rows.shape, blocks, k)
                count = np.maximum(mask.sum(axis=1), 1.0)[:, None, None]  # 0 terms for a cold user
                mean[users] = np.einsum("uh,uhbi->ubi", mask, anchors) / count
                second[users] = np.einsum("uh,uhbi,uhbj->ubij", mask, anchors, anchors) / count[..., None]
            owner = which[np.repeat(np.arange(len(part)), np.diff(part.candidate_offsets))]
            start = impressions.candidate_offsets[lo]
            step = 8192  # candidates per gather of their users' (B, k, k) moments
            for c0 in range(0, len(owner), step):
                users = owner[c0 : c0 + step]
                cand = item_embeddings[part.candidate_items[c0 : c0 + step]][:, d:].astype(np.float64)
                cand = cand.reshape(len(users), blocks, k)
                rows_out = slice(start + c0, start + c0 + len(users))
                out[rows_out, :blocks] = np.einsum("pbi,pbi->pb", mean[users], cand)
                out[rows_out, blocks:] = np.einsum("pbij,pbi,pbj->pb", second[users], cand, cand)
        return out

    def _distinct_histories(self, impressions: Impressions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The distinct capped histories of ``impressions``: (offsets (u + 1,), items) CSR and
        (m,) which of them each impression has.

        A user's impressions of one file mostly share one history, so each user vector is
        computed once, not once per impression (a user shown 19 lists got 19 equal vectors).
        """
        if len(impressions) == 0:
            return impressions.history_offsets, impressions.history_items, np.zeros(0, dtype=np.int64)
        rows, mask = self.history_matrix(impressions.history_offsets, impressions.history_items)
        keys = np.where(mask > 0, rows, -1)  # (m, H): padding is not an item
        _, first, which = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        offsets, items = gather_csr(impressions.history_offsets, impressions.history_items, first)
        return offsets, items, which.reshape(-1)

    def _check_embeddings(self, item_embeddings: np.ndarray) -> None:
        if item_embeddings.ndim != 2 or item_embeddings.shape[1] != self.config.serving_dim:
            raise ModelMismatchError(
                f"embedding_dim: the model serves {self.config.serving_dim} columns (embedding_dim "
                f"{self.config.embedding_dim} + content prior {self.config.prior_dim}), "
                f"but item embeddings have shape {item_embeddings.shape}"
            )
