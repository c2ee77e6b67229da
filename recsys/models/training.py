"""Training the CTR model on impressions, with early stopping on a later validation window.

Samples: every labelled candidate of an impression is a sample (clicked = positive, shown but
not clicked = negative). Two losses are available:

- ``pointwise`` (default): binary cross-entropy over all candidates of the impression. It
  gives calibrated probabilities directly. Candidates are cheap once the unique items of the
  batch went through the item tower, so no negative subsampling is needed.
- ``listwise``: MIND-style npratio, one clicked item against ``negatives`` shown-but-not-
  clicked items of the same impression (drawn with replacement), softmax cross-entropy. It
  fixes only score differences within an impression, so a Platt calibration
  ``sigmoid(a * logit + b)`` is fitted on the validation window afterwards.

Batches are built in numpy with a seeded generator (deterministic order); a batch carries
the features of its unique items once. The step is a ``tf.function`` with a GradientTape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from recsys.encoders.item_features import ItemFeatures
from recsys.errors import RecsysError
from recsys.interrupts import raise_if_terminated
from recsys.models import NUM_HEADS, parse_modalities
from recsys.models.bundle import RankingModel
from recsys.models.ctr import CTRModel, listwise_loss, pointwise_loss
from recsys.models.fusion import ANCHOR_START_WEIGHT, WEAK_ANCHOR_START_WEIGHT, CategoryVocabulary
from recsys.data.interactions import (
    ClickLog, Impressions, InteractionLog, candidate_impression_rows, concat_impressions, first_shown, gather_csr,
    with_logged_clicks,
)
from recsys.data.exposure import FileShows
from recsys.models.affinity import (
    KEYS,
    AffinityCalibration,
    ContentClusters,
    SkipCounts,
    SkippedArticles,
    affinity_inputs,
    fit_affinity_calibration,
    keyed_codes,
)
from recsys.models.exposure import ExposureCalibration, fit_exposure_calibration, fresh_as_of
from recsys.models.side_features import SideFeatures
from recsys.models.weight_average import WeightAverage
from recsys.progress import progress as progress_lines

LOSSES = ("pointwise", "listwise")
# Impressions per chunk of ``mean_impression_auc``.
AUC_IMPRESSIONS = 1 << 16
# What a model's info (and a version's manifest metrics) records of a refit: the second training's size.
REFIT_SUMMARY = ("epochs", "train_impressions", "train_samples")


class TrainingDivergedError(RecsysError):
    """The loss or the validation scores stopped being finite: nothing is published."""


class NoValidationAUCError(RecsysError):
    """No validation impression has both a click and a non-click: early stopping has no AUC to follow."""


class NoTrainingClicksError(RecsysError):
    """The training impressions hold no click: the networks would learn that nothing is clicked,
    and a version served on the content prior alone would be published as if trained."""


class NoTrainingNonClicksError(RecsysError):
    """The training impressions hold no non-click (a log of clicks alone): the networks would
    learn that everything is clicked, and nothing tells a candidate from another."""


def scoreable_impressions(impressions: Impressions) -> int:
    """Impressions with both a click and a non-click: those the per-impression AUC averages
    over (``mean_impression_auc`` skips the others)."""
    # One boolean per candidate at most (a MIND-large day holds tens of millions of them).
    starts = impressions.candidate_offsets[:-1][np.diff(impressions.candidate_offsets) > 0]
    if len(starts) == 0:
        return 0
    clicked = np.logical_or.reduceat(impressions.labels == 1, starts)
    skipped = np.logical_or.reduceat(impressions.labels == 0, starts)
    return int((clicked & skipped).sum())


def unscoreable_labels(impressions: Impressions) -> str | None:
    """Why no impression has a per-impression AUC ("holds no click", ...), or None when one has."""
    if scoreable_impressions(impressions):
        return None
    return unscoreable_reason(int((impressions.labels == 1).sum()), int((impressions.labels == 0).sum()))


def unscoreable_reason(clicks: int, non_clicks: int) -> str:
    """``unscoreable_labels``'s words for impressions without a per-impression AUC, from their
    label counts (``recsys train`` says it from SQL counts before it reads them)."""
    if clicks == non_clicks == 0:
        return "holds no labelled candidate"
    if clicks == 0:
        return f"holds no click (all {non_clicks} labelled candidates are 0)"
    if non_clicks == 0:
        return f"holds only clicks (all {clicks} labelled candidates are 1)"
    return f"has no impression with both a click and a non-click ({clicks} clicks, {non_clicks} non-clicks in all)"


def mean_impression_auc(y_true: np.ndarray, y_score: np.ndarray, offsets: np.ndarray) -> tuple[float, int]:
    """Mean per-impression ROC AUC (MIND's "AUC"), vectorised over all impressions.

    Ties get average ranks, as in ``sklearn.metrics.roc_auc_score``. Impressions without both
    a click and a non-click are skipped; candidates labelled -1 are ignored.

    Args:
        y_true: (c,) labels 1/0 (-1 unknown).
        y_score: (c,) scores.
        offsets: (m + 1,) CSR offsets of the impressions into ``y_true``/``y_score``.

    Returns:
        ``(mean AUC, number of impressions scored)``; NaN when none can be scored or a score
        is not finite.
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score)
    if not np.isfinite(y_score).all():
        return float("nan"), 0  # no ranking of NaN scores means anything
    offsets = np.asarray(offsets, dtype=np.int64)
    m = len(offsets) - 1
    total, scored = 0.0, 0
    # A chunk of impressions at a time: the sort below holds ~80 bytes per candidate.
    for lo in range(0, m, AUC_IMPRESSIONS):
        part = offsets[lo : min(lo + AUC_IMPRESSIONS, m) + 1]
        auc = _impression_aucs(y_true[part[0] : part[-1]], y_score[part[0] : part[-1]].astype(np.float64), part - part[0])
        total += float(auc.sum())
        scored += len(auc)
    return (total / scored if scored else float("nan")), scored


def _impression_aucs(y_true: np.ndarray, y_score: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The AUC of every impression with both a click and a non-click (``mean_impression_auc``)."""
    owner = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    keep = y_true >= 0
    owner, y, s = owner[keep], y_true[keep].astype(np.int64), y_score[keep]
    order = np.lexsort((s, owner))
    owner, y, s = owner[order], y[order], s[order]
    m = len(offsets) - 1
    counts = np.bincount(owner, minlength=m)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(len(s)) - starts[owner] + 1.0  # 1-based rank within the impression
    new_group = np.ones(len(s), dtype=bool)
    new_group[1:] = (owner[1:] != owner[:-1]) | (s[1:] != s[:-1])
    group = np.cumsum(new_group) - 1
    mean_rank = np.bincount(group, weights=position) / np.bincount(group)
    rank = mean_rank[group]
    num_pos = np.bincount(owner, weights=y, minlength=m)
    num_neg = counts - num_pos
    rank_sum = np.bincount(owner, weights=rank * y, minlength=m)
    scored = (num_pos > 0) & (num_neg > 0)
    return (rank_sum[scored] - num_pos[scored] * (num_pos[scored] + 1) / 2) / (num_pos[scored] * num_neg[scored])


def binary_log_loss(y_true: np.ndarray, y_prob: np.ndarray, *, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of labelled candidates (labels -1 ignored), clipped at ``eps``."""
    keep = np.asarray(y_true) >= 0
    y = np.asarray(y_true)[keep].astype(np.float64)
    p = np.clip(np.asarray(y_prob, dtype=np.float64)[keep], eps, 1 - eps)
    if len(y) == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


class _BatchMaker:
    """Builds padded index batches over the unique items of a set of impressions."""

    def __init__(
        self,
        impressions: Impressions,
        side: np.ndarray,
        category_ids: np.ndarray,
        has_image: np.ndarray,
        *,
        history_len: int,
        negatives: int,
        category_dropout: float,
    ):
        self.imps = impressions
        self.side = side
        self.category_ids = category_ids
        self.has_image = has_image
        self.history_len = history_len
        self.negatives = negatives
        self.category_dropout = category_dropout

    def make(self, rows: np.ndarray, rng: np.random.Generator, *, listwise: bool) -> dict:
        imps = self.imps
        b = len(rows)
        h_start = imps.history_offsets[rows]
        h_len = np.minimum(imps.history_offsets[rows + 1] - h_start, self.history_len)
        h_slots = np.arange(max(int(h_len.max()), 1))[None, :]
        h_mask = h_slots < h_len[:, None]
        c_start = imps.candidate_offsets[rows]
        c_len = imps.candidate_offsets[rows + 1] - c_start
        c_slots = np.arange(max(int(c_len.max()), 1))[None, :]
        c_mask = c_slots < c_len[:, None]
        c_pos = np.where(c_mask, c_start[:, None] + c_slots, 0)
        h_items = imps.history_items[np.where(h_mask, h_start[:, None] + h_slots, 0)[h_mask]] if h_mask.any() else np.zeros(0, np.int64)
        c_items = imps.candidate_items[c_pos[c_mask]]
        unique, inverse = np.unique(np.concatenate([h_items, c_items]).astype(np.int64), return_inverse=True)
        h_index = np.zeros(h_mask.shape, dtype=np.int32)
        h_index[h_mask] = inverse[: len(h_items)]
        c_index = np.zeros(c_mask.shape, dtype=np.int32)
        c_index[c_mask] = inverse[len(h_items):]
        labels = np.where(c_mask, imps.labels[c_pos], -1)
        weights = (labels >= 0).astype(np.float32)
        side = self.side[c_pos] * c_mask[..., None]
        category = self.category_ids[unique]
        if self.category_dropout > 0:
            # Trains the out-of-vocabulary row, which unseen categories map to at serving time.
            category = np.where(rng.random(len(unique)) < self.category_dropout, 0, category)
        groups = np.zeros((0, 1 + self.negatives), dtype=np.int32)
        if listwise:
            width = c_mask.shape[1]
            pos_b, pos_j = np.nonzero(labels == 1)
            neg_b, neg_j = np.nonzero(labels == 0)
            neg_count = np.bincount(neg_b, minlength=b)
            neg_start = np.concatenate([[0], np.cumsum(neg_count)[:-1]])
            ok = neg_count[pos_b] > 0
            pos_b, pos_j = pos_b[ok], pos_j[ok]
            draws = np.floor(rng.random((len(pos_b), self.negatives)) * neg_count[pos_b][:, None]).astype(np.int64)
            chosen = (neg_b * width + neg_j)[neg_start[pos_b][:, None] + draws]
            groups = np.concatenate([(pos_b * width + pos_j)[:, None], chosen], axis=1).astype(np.int32)
        return {
            "rows": unique,
            "has_image": self.has_image[unique],
            "category": category.astype(np.int32),
            "history_index": h_index,
            "history_mask": h_mask.astype(np.float32),
            "candidate_index": c_index,
            "side": side.astype(np.float32),
            "labels": np.maximum(labels, 0).astype(np.float32),
            "weights": weights,
            "groups": groups,
        }


def _per_impression(flags: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(m,) int64 number of true ``flags`` (c,) of each impression (CSR ``offsets``)."""
    cum = np.zeros(len(flags) + 1, dtype=np.int64)
    np.cumsum(flags, out=cum[1:])
    return cum[offsets[1:]] - cum[offsets[:-1]]


def _check_rows(name: str, impressions: Impressions, num_items: int) -> None:
    for part, rows in (("history_items", impressions.history_items), ("candidate_items", impressions.candidate_items)):
        if len(rows) and (rows.min() < 0 or rows.max() >= num_items):
            bad = rows[(rows < 0) | (rows >= num_items)][0]
            raise ValueError(f"{name}.{part} has item row {bad}, expected 0 <= row < {num_items} (the feature table)")


def clock_floor(times: np.ndarray, hours: float) -> np.ndarray:
    """(m,) datetime64[s]: each time moved back to the last tick of an epoch-aligned clock
    ticking every ``hours`` (24: UTC midnight of the same day)."""
    period = int(round(hours * 3600))
    if period <= 0:
        raise ValueError(f"clock period is {hours!r} hours, expected at least one second")
    seconds = np.asarray(times).astype("datetime64[s]").astype(np.int64)
    return ((seconds // period) * period).astype("datetime64[s]")


def evaluate_impressions(
    model: RankingModel,
    features: ItemFeatures,
    impressions: Impressions,
    log: InteractionLog,
    first_seen: np.ndarray,
    *,
    as_of: np.datetime64 | None = None,
) -> dict:
    """Score impressions and return ``{"auc", "log_loss", "num_scored", "scores"}``.

    Only the items the impressions refer to go through the item tower.
    """
    embeddings = _embeddings_for(model, features, impressions)
    scores = model.score_impressions(impressions, embeddings, log, first_seen, as_of=as_of)
    auc, num_scored = mean_impression_auc(impressions.labels, scores, impressions.candidate_offsets)
    return {"auc": auc, "log_loss": binary_log_loss(impressions.labels, scores), "num_scored": num_scored, "scores": scores}


def _fit_platt(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of a 1-d logistic regression of labels on logits."""
    from sklearn.linear_model import LogisticRegression

    keep = labels >= 0
    y = labels[keep]
    if len(np.unique(y)) < 2:
        return 1.0, 0.0
    fit = LogisticRegression(C=1e6, max_iter=1000).fit(logits[keep].reshape(-1, 1).astype(np.float64), y)
    return float(fit.coef_[0, 0]), float(fit.intercept_[0])


def train_ctr(
    features: ItemFeatures,
    train: Impressions,
    valid: Impressions,
    log: InteractionLog,
    *,
    modalities: str = "text,image",
    fusion: str = "gated",
    embedding_dim: int = 128,
    history_len: int = 50,
    epochs: int = 5,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    negatives: int = 4,
    loss: str = "pointwise",
    patience: int = 2,
    window_hours: float = 24.0,
    first_seen: np.ndarray | None = None,
    num_heads: int = NUM_HEADS,
    scorer_hidden_units=(32,),
    dropout: float = 0.1,
    anchor_dim: int | None = None,
    category_dropout: float = 0.05,
    calibrate: bool | None = None,
    clicks: ClickLog | None = None,
    content_prior: bool = False,
    feature_clock_hours: float = 0.0,
    refit: bool = False,
    file_exposure: bool = True,
    skips: SkippedArticles | None = None,
    item_codes: np.ndarray | None = None,
    affinity_clusters: int = 0,
    weight_average: float = 0.0,
    progress: Callable[[dict], None] | None = None,
) -> tuple[RankingModel, dict]:
    """Train the CTR model; early-stop on the validation per-impression AUC.

    Args:
        features: features of every item the impressions refer to (rows = item rows).
        train: training impressions (labelled).
        valid: validation impressions from a later window (labelled).
        log: labelled shows/clicks for the popularity features; only events strictly before a
            sample's time are counted, so it may include the training and validation windows.
        modalities: "text", "image" or "text,image".
        fusion: "concat", "weighted_sum" or "gated".
        embedding_dim: item embedding / user vector dimension ``D``.
        history_len: clicked items read per user, most recent first.
        epochs: maximum number of passes over ``train``.
        batch_size: impressions per step.
        learning_rate: Adam learning rate.
        seed: seeds weights, dropout and data order; same seed, same result.
        negatives: K of the listwise loss (1 positive + K negatives per group).
        loss: "pointwise" or "listwise" (see the module docstring).
        patience: epochs without a better validation AUC before stopping.
        window_hours: popularity window of the side features.
        first_seen: (n,) datetime64 first appearance of each item; default: first show in
            ``train`` or ``valid``.
        num_heads: self-attention heads of the user encoder.
        scorer_hidden_units: hidden widths of the scorer's MLP.
        dropout: dropout in the item tower and user encoder.
        anchor_dim: principal components per modality in the item embedding's fixed content
            anchor (see ``recsys.models.fusion``); 0 learns the whole embedding; None:
            ``default_anchor_dim(embedding_dim)``.
        category_dropout: share of items whose category is replaced by "unknown" in training,
            so that unseen categories get a trained embedding.
        calibrate: fit a Platt calibration on ``valid``; default: for "listwise", and whenever
            a content prior is fitted (its weighted similarity shifts the logits).
        clicks: if given, every train and valid history is led by the user's clicks in this log
            strictly before the impression (``with_logged_clicks``), and the model records that
            it must be served the same way. It may hold the train and valid windows themselves.
        content_prior: after training, fit the per-modality weights of the training-free
            content prior (``RankingModel.with_content_prior``) on the validation window, from
            the grids ``PRIOR_WEIGHTS`` (mean similarity) and ``MOMENT_WEIGHTS`` (mean squared
            similarity), by validation AUC (``_fit_prior_weights``); off if nothing beats the
            networks alone.
        feature_clock_hours: if > 0, the side features of every train and valid impression are
            computed at the last tick of a clock with this period (epoch-aligned; 24: UTC
            midnight) at or before it, not at its own time: the nightly job serves a day of
            impressions with the statistics of the night before, so an article published since
            has no shows and age 0 in training as it has when served (``clock_floor``).
        refit: after early stopping and the fits on ``valid`` (content prior, calibration),
            train the networks again from the same seed on ``train`` and ``valid`` together for
            the kept number of epochs, and serve those with the weights and calibration fitted on
            ``valid``: the served networks then learn from the newest window too. The
            validation figures returned are the first training's (nothing is left to validate
            the refit on).
        file_exposure: after those fits, fit the file-exposure calibration
            (``recsys.models.exposure``) on ``valid`` read as a later file is served: the store
            ending where ``valid`` begins, each candidate's earlier shows in ``valid`` as the
            scored file's exposure (``_fit_file_exposure``). ``recsys predict`` and ``recsys
            evaluate`` apply it to impressions after the store's end.
        skips: the store's skipped articles before ``valid`` begins, of (at least) ``valid``'s
            users; with ``item_codes`` (n, 2) (each item's category and subcategory codes, the
            same ``KeyVocabulary``), fit the reader's category affinity
            (``recsys.models.affinity``) on ``valid`` read as a later file is served, before the
            file exposure, which is then fitted on top of it. None: without.
        affinity_clusters: with ``skips`` and a served content prior, also key the affinity by
            content cluster: this many spherical k-means centres per modality, fitted on the
            content anchors of the training window's articles (``ContentClusters``). 0: the
            publisher's keys only.
        weight_average: if > 0, validate, keep and serve each epoch's ``WeightAverage`` of the
            networks' weights along the training steps, over a horizon of this many epochs of
            steps, instead of the last step's weights (Polyak averaging; with ``refit``, the
            second training's average at its end). The steps themselves are those of the
            training without it. 0: off.
        progress: called after every epoch with a dict (epoch, loss, val_auc, ...).

    Returns:
        ``(model, history)``: the model with the best validation AUC's weights, and a dict of
        per-epoch lists ``loss``, ``val_auc``, ``val_log_loss``, ``epoch_seconds`` plus
        ``best_epoch``, ``best_val_auc``, ``train_impressions``, ``train_samples``,
        ``calibration``; with ``refit``, also ``refit`` (``epochs``, ``train_impressions``,
        ``train_samples``, ``loss``, ``epoch_seconds`` of the second training).

    Raises:
        ValueError: bad arguments or item rows outside ``features``.
        NoValidationAUCError: no validation impression has both a click and a non-click.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss is {loss!r}, expected one of {', '.join(LOSSES)}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("negatives", negatives),
                        ("history_len", history_len), ("patience", patience)):
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} is {value!r}, expected a positive integer")
    if not 0 < learning_rate < math.inf:  # also rejects NaN
        raise ValueError(f"learning_rate is {learning_rate!r}, expected a finite number > 0")
    if not 0.0 <= category_dropout < 1.0:
        raise ValueError(f"category_dropout is {category_dropout!r}, expected 0 <= value < 1")
    if not 0.0 <= weight_average < math.inf:  # also rejects NaN
        raise ValueError(f"weight_average is {weight_average!r}, expected 0 (off) or a finite horizon in epochs")
    n = len(features)
    _check_rows("train", train, n)
    _check_rows("valid", valid, n)
    exposure_valid = valid  # what a later file's exposure is fitted on (at the true times)
    if clicks is not None:
        if len(clicks) and int(clicks.items.max()) >= n:
            raise ValueError(f"the click log names item row {int(clicks.items.max())}, the feature table has {n} rows")
        train = with_logged_clicks(train, clicks, history_len)
        # A later file is served with the store's clicks only: the exposure fit leads the
        # validation histories with the clicks before the window, not the window's own.
        exposure_valid = with_logged_clicks(valid, clicks.until(valid.times.min()), history_len) if len(valid) else valid
        valid = with_logged_clicks(valid, clicks, history_len)
    if log.num_items != n:
        raise ValueError(f"the interaction log covers {log.num_items} items, the feature table has {n}")
    problem = unscoreable_labels(valid)
    if problem is not None:
        raise NoValidationAUCError(f"the validation impressions {problem}: the per-impression AUC is undefined")
    listwise = loss == "listwise"
    if first_seen is None:
        first_seen = first_shown([train, valid], n)
    if feature_clock_hours < 0:
        raise ValueError(f"feature_clock_hours is {feature_clock_hours!r}, expected >= 0")
    if feature_clock_hours > 0:  # histories are already read at the true times; only side features move
        train = dataclasses.replace(train, times=clock_floor(train.times, feature_clock_hours))
        valid = dataclasses.replace(valid, times=clock_floor(valid.times, feature_clock_hours))
    networks = dict(
        features=features, log=log, first_seen=first_seen, modalities=modalities, fusion=fusion,
        embedding_dim=embedding_dim, history_len=history_len, batch_size=batch_size, learning_rate=learning_rate,
        seed=seed, negatives=negatives, loss=loss, window_hours=window_hours, num_heads=num_heads,
        scorer_hidden_units=scorer_hidden_units, dropout=dropout, anchor_dim=anchor_dim,
        category_dropout=category_dropout, logged_clicks=clicks is not None, weight_average=weight_average,
    )
    model, ctr, history = _train_networks(train, valid, epochs=epochs, patience=patience, progress=progress, **networks)
    best_epoch, best_auc = history["best_epoch"], history["best_val_auc"]

    prior_weights, moment_weights, served_auc, valid_logits = (), (), float(best_auc), None
    if content_prior and model.anchor_columns:  # same networks, so ctr's scorer is model's
        prior_weights, moment_weights, served_auc, valid_logits = _fit_prior_weights(model, features, valid, log, first_seen)
        model = model.with_content_prior(prior_weights, moment_weights)
        prior_weights, moment_weights = model.config.prior_weights, model.config.moment_weights  # () when off

    slope, intercept = 1.0, 0.0
    if calibrate is None:
        calibrate = listwise or model.config.prior_dim > 0
    if calibrate:
        if valid_logits is None:  # the prior's fit already scored the validation window
            valid_logits = evaluate_logits(model, features, valid, log, first_seen)
        slope, intercept = _fit_platt(valid_logits, valid.labels)
        ctr.scorer_layer.set_calibration(slope, intercept)
    # The served model's log loss: the kept epoch's figure is the networks' before the prior
    # and the calibration, which can be several times the served one.
    served_log_loss = history["val_log_loss"][best_epoch - 1] if best_epoch and history["val_log_loss"] else None
    if valid_logits is not None:
        probs = 1.0 / (1.0 + np.exp(-(slope * valid_logits.astype(np.float64) + intercept)))
        served_log_loss = binary_log_loss(valid.labels, probs)
    history.update(prior_weights=list(prior_weights), moment_weights=list(moment_weights), served_val_auc=served_auc,
                   served_val_log_loss=served_log_loss, calibration={"slope": slope, "intercept": intercept})

    later = _later_file_logits(model, features, exposure_valid, log, first_seen) if (file_exposure or skips is not None) else None
    affinity, cluster_codes, cluster_rows = None, None, None
    if skips is not None:
        if item_codes is None or len(item_codes) != n:
            raise ValueError(f"the category affinity needs item codes for the {n} items")
        clusters, anchors = None, None
        if affinity_clusters and model.config.prior_dim:  # the codes are read from the served vectors' anchors
            cluster_rows = np.unique(np.concatenate([train.history_items, train.candidate_items]).astype(np.int64))
            anchors = model.content_anchors(features)
            blocks = tuple(parse_modalities(model.config.modalities))  # anchor blocks, text first
            clusters = ContentClusters.fit(anchors, blocks, cluster_rows, affinity_clusters, seed)
        codes = keyed_codes(item_codes, clusters, anchors)
        cluster_codes = None if clusters is None else codes[:, len(KEYS):]
        affinity, history["category_affinity"], logits = _fit_affinity(later, exposure_valid, skips.counts(codes), codes,
                                                                        history_len, seed, clusters)
        later = dataclasses.replace(later, logits=logits)  # what the file exposure is fitted on top of
    exposure = None
    if file_exposure:
        exposure, history["file_exposure"] = _fit_file_exposure(later, exposure_valid, seed)

    refit_info = None
    if refit:
        # Everything fitted on ``valid`` (the epoch count, the prior's weights, the calibration) is
        # kept; the networks are trained again, from the same seed, on both windows, so that the
        # served networks also learn from the newest one.
        whole = concat_impressions([train, valid])
        model, ctr, refit_history = _train_networks(whole, None, epochs=best_epoch, patience=patience,
                                                    progress=progress, **networks)
        if prior_weights:
            model = model.with_content_prior(prior_weights, moment_weights)
        ctr.scorer_layer.set_calibration(slope, intercept)
        if affinity is not None and affinity.clusters is not None:
            # The new networks' anchors come from a basis fitted on both windows: the same
            # clusters (the same articles together) are given centres in that space.
            affinity = dataclasses.replace(affinity, clusters=affinity.clusters.expressed_in(
                model.content_anchors(features), cluster_codes, cluster_rows))
        refit_info = {"epochs": best_epoch, **{key: refit_history[key] for key in REFIT_SUMMARY[1:]}}
        history["refit"] = {**refit_info, "loss": refit_history["loss"], "epoch_seconds": refit_history["epoch_seconds"]}

    info = {
        "loss": loss, "negatives": negatives if listwise else None, "epochs_run": len(history["loss"]),
        "best_epoch": best_epoch, "best_val_auc": float(best_auc), "batch_size": batch_size,
        "learning_rate": learning_rate, "train_impressions": history["train_impressions"],
        "train_samples": history["train_samples"], "calibration": history["calibration"],
        "prior_weights": list(prior_weights), "moment_weights": list(moment_weights), "served_val_auc": served_auc,
        "refit": refit_info, "anchor_similarity_auc": history["anchor_similarity_auc"],
        "silent_modalities": history["silent_modalities"],
        "anchor_start_weights": history["anchor_start_weights"],
        "file_exposure": history.get("file_exposure"),
        "category_affinity": history.get("category_affinity"),
    }
    config = dataclasses.replace(model.config, info=info, file_exposure=exposure, category_affinity=affinity)
    return RankingModel(model.item_tower, model.user_encoder, model.scorer, config), history


# A content-anchor block starts strong only when its mean similarity to the history ranks the
# training clicks clearly better than chance (per-impression AUC).
ANCHOR_SIGNAL_AUC = 0.52
ANCHOR_AUC_IMPRESSIONS = 10_000


def anchor_similarity_aucs(fusion, features: ItemFeatures, train: Impressions) -> dict[str, float]:
    """{modality: per-impression AUC of the candidates' mean anchor similarity to the history}
    on up to ``ANCHOR_AUC_IMPRESSIONS`` training impressions with a history, evenly spread
    ({} without anchors). This is the content prior's ``s1`` on the training window, before any
    weight is trained: how well the frozen encoders' own similarity ranks these clicks. A
    candidate that is in its impression's own history is left out."""
    if not fusion.anchor_dim:
        return {}
    with_history = np.flatnonzero((np.diff(train.history_offsets) > 0) & (np.diff(train.candidate_offsets) > 0))
    if len(with_history) == 0:
        return {}
    rows = with_history[np.linspace(0, len(with_history) - 1, min(len(with_history), ANCHOR_AUC_IMPRESSIONS)).astype(np.int64)]
    rows = np.unique(rows)
    h_off, h_items = gather_csr(train.history_offsets, train.history_items, rows)
    c_off, c_items = gather_csr(train.candidate_offsets, train.candidate_items, rows)
    _, labels = gather_csr(train.candidate_offsets, train.labels, rows)
    owner = np.repeat(np.arange(len(rows)), np.diff(c_off))
    # A candidate in its own history is similar to itself whatever the encoders say: it would
    # lend random features an AUC above chance where re-shown clicked articles are clicked again.
    n = np.int64(len(features))
    own = np.isin(owner * n + c_items, np.repeat(np.arange(len(rows)), np.diff(h_off)) * n + h_items)
    labels = np.where(own, -1, labels)  # -1: left out of the AUC
    anchors = fusion.content_anchors(features.text, features.image, features.has_image)
    out = {}
    for b, name in enumerate(fusion.modalities.split(",")):
        block = anchors[:, b * fusion.anchor_dim : (b + 1) * fusion.anchor_dim]
        means = np.add.reduceat(block[h_items], h_off[:-1], axis=0) / np.diff(h_off)[:, None]  # (r, anchor_dim)
        s1 = np.einsum("ij,ij->i", means[owner], block[c_items])
        auc, _ = mean_impression_auc(labels, s1, c_off)
        out[name] = float(auc) if np.isfinite(auc) else 0.5
    return out


def _train_networks(
    train: Impressions, valid: Impressions | None, *, features: ItemFeatures, log: InteractionLog,
    first_seen: np.ndarray, epochs: int, patience: int, loss: str, seed: int, history_len: int,
    batch_size: int, learning_rate: float, negatives: int, window_hours: float, category_dropout: float,
    logged_clicks: bool, progress: Callable[[dict], None] | None, weight_average: float = 0.0, **architecture,
) -> tuple[RankingModel, CTRModel, dict]:
    """A new model (seeded, its vocabulary, side-feature scaling and centring fitted on
    ``train``) trained on ``train``.

    With ``valid``: at most ``epochs`` epochs, stopping after ``patience`` epochs without a better
    validation AUC, the best epoch's weights restored. Without: exactly ``epochs`` epochs (the
    refit, which has no window left to validate on).

    Returns:
        ``(model, the CTRModel over its layers, history)``: per-epoch lists ``loss``,
        ``val_auc``, ``val_log_loss``, ``epoch_seconds`` (the ``val_`` lists empty without
        ``valid``) plus ``best_epoch``, ``best_val_auc`` (None without ``valid``),
        ``train_impressions`` and ``train_samples``.

    With ``weight_average`` > 0 every epoch is validated, kept and served with the
    ``WeightAverage`` of its steps' weights over a horizon of that many epochs.
    """
    listwise = loss == "listwise"
    keras.utils.set_random_seed(seed)
    # Masks and repeats, not a sort or int64 owner array: these run over every training pair.
    used = np.zeros(len(features), dtype=bool)
    used[train.history_items] = True
    used[train.candidate_items] = True
    seen = np.flatnonzero(used)
    vocabulary = CategoryVocabulary.fit(features.categories[seen])
    train_times = np.repeat(train.times, np.diff(train.candidate_offsets))
    side_spec = SideFeatures(window_hours).fit(train.candidate_items, train_times, log, first_seen)
    model = RankingModel.create(
        features.text_encoder, features.image_encoder, vocabulary.categories, history_len=history_len,
        side_features=side_spec, seed=seed, logged_clicks=logged_clicks, **architecture,
    )
    fusion_layer = model.item_tower.get_layer("fusion")
    fusion_layer.adapt(features.text[seen], features.image[seen], features.has_image[seen])
    anchor_aucs = anchor_similarity_aucs(fusion_layer, features, train)
    silent = [name for name, auc in anchor_aucs.items() if auc < ANCHOR_SIGNAL_AUC]
    if silent:  # else the layer's own start, untouched
        fusion_layer.set_anchor_start_weights(
            [WEAK_ANCHOR_START_WEIGHT if name in silent else ANCHOR_START_WEIGHT for name in anchor_aucs])
    ctr = CTRModel(model.item_tower, model.user_encoder, model.scorer)
    optimizer = keras.optimizers.Adam(learning_rate)
    # Slots created before the first step: created inside it, TensorFlow traces the step twice.
    optimizer.build(ctr.trainable_variables)
    side = side_spec.compute(train.candidate_items, train_times, log, first_seen)
    del train_times  # 8 bytes a training pair (0.3 GB at 37M pairs), not needed by the epochs
    maker = _BatchMaker(
        train, side, vocabulary.lookup(features.categories), features.has_image.astype(np.float32),
        history_len=history_len, negatives=negatives, category_dropout=category_dropout,
    )
    text_table = tf.convert_to_tensor(np.asarray(features.text, dtype=np.float32))
    image_table = tf.convert_to_tensor(np.asarray(features.image, dtype=np.float32))

    num_side = side_spec.num_features

    @tf.function(input_signature=[
        tf.TensorSpec((None, features.text.shape[1]), tf.float32),
        tf.TensorSpec((None, features.image.shape[1]), tf.float32),
        tf.TensorSpec((None,), tf.int64), tf.TensorSpec((None,), tf.float32), tf.TensorSpec((None,), tf.int32),
        tf.TensorSpec((None, None), tf.int32), tf.TensorSpec((None, None), tf.float32),
        tf.TensorSpec((None, None), tf.int32), tf.TensorSpec((None, None, num_side), tf.float32),
        tf.TensorSpec((None, None), tf.float32), tf.TensorSpec((None, None), tf.float32),
        tf.TensorSpec((None, 1 + negatives), tf.int32),
    ])
    def train_step(text_tab, image_tab, rows, has_image, category, h_index, h_mask, c_index, side_x, labels, weights, groups):
        inputs = {
            "text": tf.gather(text_tab, rows), "image": tf.gather(image_tab, rows), "has_image": has_image,
            "category": category, "history_index": h_index, "history_mask": h_mask, "candidate_index": c_index,
            "side": side_x,
        }
        with tf.GradientTape() as tape:
            logits = ctr(inputs, training=True)
            value = listwise_loss(logits, groups) if listwise else pointwise_loss(logits, labels, weights)
        variables = ctr.trainable_variables
        optimizer.apply(tape.gradient(value, variables), variables)
        if average is not None:
            average.update()
        return value

    labelled = _per_impression(train.labels >= 0, train.candidate_offsets)
    clicks = _per_impression(train.labels == 1, train.candidate_offsets)
    usable = (clicks > 0) & (clicks < labelled) if listwise else labelled > 0
    eligible = np.flatnonzero(usable)
    if len(eligible) == 0:
        raise ValueError(f"train has no impression usable by the {loss} loss")

    blocks = (model.item_tower, model.user_encoder, model.scorer)
    average = None
    if weight_average > 0:
        steps_per_epoch = -(-len(eligible) // batch_size)
        average = WeightAverage(ctr.trainable_variables, horizon_steps=weight_average * steps_per_epoch)
    history = {"loss": [], "val_auc": [], "val_log_loss": [], "epoch_seconds": [],
               "train_impressions": int(len(eligible)), "train_samples": int(labelled[eligible].sum()),
               "anchor_similarity_auc": anchor_aucs, "silent_modalities": silent,
               "anchor_start_weights": [float(w) for w in (fusion_layer.anchor_start_weights() if anchor_aucs else [])]}
    best_auc, best_epoch, best_weights, waited = -np.inf, 0, None, 0
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(eligible)
        total, steps = 0.0, 0
        # An epoch of MIND-large is about an hour: a line every 10 s (a bar on a terminal) within it.
        with progress_lines(f"training epoch {epoch}/{epochs}", total=len(order), summary=False) as advance:
            for lo in range(0, len(order), batch_size):
                raise_if_terminated()  # a SIGTERM whose exception some library swallowed
                advance(min(batch_size, len(order) - lo))
                batch = maker.make(order[lo : lo + batch_size], rng, listwise=listwise)
                if listwise and len(batch["groups"]) == 0:
                    continue
                value = train_step(
                    text_table, image_table, batch["rows"], batch["has_image"], batch["category"],
                    batch["history_index"], batch["history_mask"], batch["candidate_index"], batch["side"],
                    batch["labels"], batch["weights"], batch["groups"],
                )
                total += float(value)
                steps += 1
        train_seconds = time.perf_counter() - started
        if not math.isfinite(total):
            # Publishing NaN weights would serve NaN scores; early stopping cannot tell (an
            # AUC of NaN scores depends on the candidate order).
            raise TrainingDivergedError(
                f"training diverged: the loss is {total / max(steps, 1)} at epoch {epoch}; lower model.learning_rate "
                f"(now {learning_rate}) or look for non-finite article features"
            )
        history["loss"].append(total / max(steps, 1))
        history["epoch_seconds"].append(train_seconds)
        report = {"epoch": epoch, "epochs": epochs, "loss": history["loss"][-1]}
        if valid is None:
            if progress is not None:
                progress({**report, "refit": True, "seconds": train_seconds})
            continue
        with average.swapped_in() if average is not None else contextlib.nullcontext():
            metrics = evaluate_impressions(model, features, valid, log, first_seen)
            improved = metrics["auc"] > best_auc
            if improved:  # the weights validated are the ones kept
                best_weights = [block.get_weights() for block in blocks]
        if math.isnan(metrics["auc"]):
            raise TrainingDivergedError(f"training diverged: the validation scores are not finite at epoch {epoch}")
        history["val_auc"].append(metrics["auc"])
        history["val_log_loss"].append(metrics["log_loss"])
        if progress is not None:
            progress({**report, "val_auc": metrics["auc"], "val_log_loss": metrics["log_loss"], "seconds": train_seconds})
        if improved:
            best_auc, best_epoch, waited = metrics["auc"], epoch, 0
        else:
            waited += 1
            if waited >= patience:
                break
    if valid is None:
        if average is not None:
            average.assign()
        history.update(best_epoch=epochs, best_val_auc=None)
    else:
        for block, weights in zip(blocks, best_weights):
            block.set_weights(weights)
        history.update(best_epoch=best_epoch, best_val_auc=float(best_auc))
    return model, ctr, history


# Candidate weights of the content prior's two terms; logits of the networks span a few units,
# the mean similarity (a sum of two cosines) lies in [-2, 2] and the mean squared one in [0, 2],
# so these cover "negligible" to "dominant".
PRIOR_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
MOMENT_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def _fit_prior_weights(
    model: RankingModel, features: ItemFeatures, valid: Impressions, log: InteractionLog, first_seen: np.ndarray
) -> tuple[tuple, tuple, float, np.ndarray]:
    """Per-modality weights of the content prior's two terms with the best validation
    per-impression AUC, that AUC, and the validation logits served with them (uncalibrated,
    for the Platt fit that follows).

    Logits are linear in every weight, so the networks are run once with the prior off and
    each term and anchor block is read once (``RankingModel.content_prior_terms``); every
    candidate is then a sum. The search: the best pair of ``PRIOR_WEIGHTS`` x
    ``MOMENT_WEIGHTS`` shared by all blocks (ties to the smaller weights, the moment weight
    first: the prior stays off unless something beats the networks alone), then two sweeps of
    coordinate ascent over the per-block weights, each taking a grid value only if it raises
    the AUC. One modality, one block: the shared search is the whole fit.

    Returns:
        ``(mean weights per block, moment weights per block, AUC, (c,) logits)``.
    """
    blocks = model.anchor_blocks
    base = evaluate_logits(model, features, valid, log, first_seen).astype(np.float64)
    unit = model.with_content_prior(1.0, 1.0)  # serves the anchors each term reads
    terms = list(unit.content_prior_terms(valid, _embeddings_for(unit, features, valid)).T)
    grids = [PRIOR_WEIGHTS] * blocks + [MOMENT_WEIGHTS] * blocks

    def logits_of(weights) -> np.ndarray:
        return base + sum(w * t for w, t in zip(weights, terms) if w)

    def auc_of(weights) -> float:
        return float(mean_impression_auc(valid.labels, logits_of(weights), valid.candidate_offsets)[0])

    best, best_auc = [0.0] * (2 * blocks), -np.inf
    for moment in MOMENT_WEIGHTS:
        for weight in PRIOR_WEIGHTS:
            candidate = [weight] * blocks + [moment] * blocks
            auc = auc_of(candidate)
            if auc > best_auc + 1e-9:
                best, best_auc = candidate, auc
    for _ in range(2 if blocks > 1 else 0):
        for k, grid in enumerate(grids):
            for value in grid:
                candidate = best[:k] + [value] + best[k + 1 :]
                auc = auc_of(candidate)
                if auc > best_auc + 1e-9:
                    best, best_auc = candidate, auc
    return tuple(best[:blocks]), tuple(best[blocks:]), best_auc, logits_of(best).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LaterFileLogits:
    """``valid`` read as ``recsys evaluate`` reads a file after the store, which ends where
    ``valid`` begins: popularity read at that start (``popularity_until``), an article first
    seen in ``valid`` fresh (never seen: age 0, as scoring reads every fresh article).

    Attributes:
        logits: (c,) uncalibrated served logits read so (with the affinity, once fitted).
        fresh: (c,) bool, each candidate's article is fresh.
        owner: (c,) each candidate's impression.
        times: (c,) each candidate's impression time.
    """

    logits: np.ndarray
    fresh: np.ndarray
    owner: np.ndarray
    times: np.ndarray


def _later_file_logits(model: RankingModel, features: ItemFeatures, valid: Impressions, log: InteractionLog,
                       first_seen: np.ndarray) -> LaterFileLogits:
    """``valid``'s histories are led by the clicks before it only (train_ctr)."""
    start = valid.times.min()
    fresh_items, first_seen_then = fresh_as_of(first_seen, start)
    owner = candidate_impression_rows(valid)
    logits = model.score_impressions(valid, _embeddings_for(model, features, valid), log, first_seen_then,
                                     popularity_until=start, logits=True).astype(np.float64)
    return LaterFileLogits(logits, fresh_items[valid.candidate_items], owner, valid.times[owner])


def _fit_affinity(later: LaterFileLogits, valid: Impressions, skips: SkipCounts, item_codes: np.ndarray,
                  history_len: int, seed: int,
                  clusters: ContentClusters | None = None) -> tuple[AffinityCalibration, dict, np.ndarray]:
    """The category affinity fitted on ``valid`` read as a later file (``later``), with the skips
    before it (counted per key of ``item_codes`` (n, K): the publisher's, then ``clusters``').
    Returns it, the facts a manifest records (its weights, the share of validation impressions
    whose user has skips, the articles per content cluster, and the validation per-impression
    AUC without and with it: the latter in-sample), and the logits with it."""
    inputs = affinity_inputs(valid, skips, item_codes, history_len)
    calibration = fit_affinity_calibration(later.logits, *inputs, valid.labels, later.owner, seed=seed, clusters=clusters)
    logits = calibration.logits(later.logits, *inputs)
    auc = lambda scores: round(float(mean_impression_auc(valid.labels, scores, valid.candidate_offsets)[0]), 6)  # noqa: E731
    with_skips = skips.lookup(valid.user_ids, np.full((len(valid), item_codes.shape[1]), -1))[1] > 0  # the users' totals
    facts = {k: v for k, v in calibration.to_dict().items() if k != "clusters"}  # the centres are the bundle's
    if clusters is not None:
        cluster_codes = item_codes[:, len(KEYS):]  # after the publisher's keys
        facts["cluster_sizes"] = {key: np.bincount(cluster_codes[:, b][cluster_codes[:, b] >= 0],
                                                   minlength=len(clusters.centres[b])).tolist()
                                  for b, key in enumerate(clusters.keys)}
    return calibration, {
        **facts, "valid_impressions_with_skips": round(float(with_skips.mean()) if len(valid) else 0.0, 6),
        "valid_auc_after_store": auc(later.logits), "valid_auc_with_affinity": auc(logits),
    }, logits


def _fit_file_exposure(later: LaterFileLogits, valid: Impressions, seed: int) -> tuple[ExposureCalibration, dict]:
    """The file-exposure calibration fitted on ``valid`` read as a later file (``later``): each
    candidate's earlier shows in ``valid`` are the file's exposure. Returns it and the facts a
    manifest records (its weights, and the validation per-impression AUC of the logits read so,
    without and with it: the latter in-sample)."""
    items = valid.candidate_items
    # The window's span bounds what the fit sees of a file's past; a longer file is read within it.
    span = (later.times.max() - later.times.min()) / np.timedelta64(1, "s")
    window = max(float(span), 1.0) / 3600.0
    counts, hours = FileShows.from_events(items, later.times).earlier(items, later.times, window_hours=window)
    calibration = fit_exposure_calibration(later.logits, counts, hours, later.fresh, valid.labels, later.owner, seed=seed,
                                           window_hours=window)
    auc = lambda scores: round(float(mean_impression_auc(valid.labels, scores, valid.candidate_offsets)[0]), 6)  # noqa: E731
    return calibration, {
        **calibration.to_dict(), "valid_fresh_share": round(float(later.fresh.mean()), 6),
        "valid_auc_after_store": auc(later.logits),
        "valid_auc_with_exposure": auc(calibration.logits(later.logits, counts, hours, later.fresh)),
    }


def evaluate_logits(
    model: RankingModel, features: ItemFeatures, impressions: Impressions, log: InteractionLog, first_seen: np.ndarray
) -> np.ndarray:
    """(c,) uncalibrated logits of every candidate of ``impressions``."""
    return model.score_impressions(impressions, _embeddings_for(model, features, impressions), log, first_seen, logits=True)


def _embeddings_for(model: RankingModel, features: ItemFeatures, impressions: Impressions) -> np.ndarray:
    """(n, serving_dim) served embeddings, computed only for the rows the impressions refer to (others zero)."""
    needed = np.unique(np.concatenate([impressions.history_items, impressions.candidate_items]).astype(np.int64))
    embeddings = np.zeros((len(features), model.config.serving_dim), dtype=np.float32)
    if len(needed):
        embeddings[needed] = model.item_embeddings(features.take(needed))
    return embeddings
