"""Streaming evaluation of several models over impressions: ``ImpressionMetrics``.

Impressions are added one at a time (``add``) or in CSR batches (``add_batch``); ``result()``
returns every metric of every model with bootstrap intervals over impressions (or over
clusters of them, such as users: ``cluster_unit``), and breakdowns by group. What is kept per labelled candidate is compact: the label (1 byte), per model the
rank within its impression (2 bytes) and the score as float32 (4 bytes), and per item-level
group scheme a 2-byte code; per impression its length and per impression-level scheme a code.
With 4 models and 3 item schemes that is 31 bytes per candidate: MIND-small's validation set
(150k impressions, 5.6M candidates) needs about 170 MB, 2.5M impressions of 37 candidates
about 2.9 GB. ``result()`` needs about 60-100 bytes per candidate more while it runs (one
model's candidates sorted by score, sub-impression indices of the breakdowns, AUC
temporaries; per-impression work goes in chunks of 2M candidates): about 0.5 GB at 150k
impressions, several GB at MIND-large size. Unlabelled impressions (all labels -1) are
counted and dropped.

Ranking metrics are computed on the ranks a MIND prediction file would hold (the
``ranks_from_scores`` rule: ties in candidate order), so they equal what the MIND scorer gives
for the file ``write_predictions`` writes from the same scores. A model that ties many scores
(a popularity count, say) is then ranked partly by candidate order; ``tied_impressions`` in
the result shows how often that happened. Pooled AUC, log loss and calibration use the scores
themselves; log loss and calibration only for models whose every score lies in [0, 1].
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from recsys.metrics.bootstrap import auc_influence, percentile_interval, ratio_samples, resample_counts
from recsys.metrics.calibration import STRATEGIES, reliability_curve
from recsys.metrics.classification import log_losses
from recsys.metrics.ranking import (
    METRIC_NAMES,
    MetricInputError,
    _check_offsets,
    _show,
    batch_ranks_from_scores,
    segment_metrics,
)

METRICS = (*METRIC_NAMES, "pooled_auc", "log_loss")
HIGHER_IS_BETTER = {name: name != "log_loss" for name in METRICS}

MAX_CANDIDATES = np.iinfo(np.uint16).max  # ranks are stored as uint16
MAX_GROUPS = np.iinfo(np.int16).max
HISTORY_LENGTH_ORDER = ("cold", "short", "long")
# "new to the store": an article the store never showed or listed before the impression (the
# issue's fresh articles), whose age the store cannot tell; the others by their age then.
NEW_TO_STORE = "new to the store"
ARTICLE_AGE_ORDER = (NEW_TO_STORE, "< 6 h", "6-24 h", "1-3 d", "> 3 d", "unknown")

_KNOWN_ORDERS = (HISTORY_LENGTH_ORDER, ARTICLE_AGE_ORDER)
_FLUSH_CANDIDATES = 1_000_000  # buffered candidates before they are compacted
_CHUNK_CANDIDATES = 2_000_000  # candidates scored at once in result(), bounds temporaries
_CACHE_COUNTS_LIMIT = 300_000_000  # resample-count entries kept (uint8) for reuse by breakdowns
# Fewest resampled units (users, or impressions) behind a statistic for it to get an interval.
# With one unit every resample repeats it and the interval has zero width; with a handful, the
# percentile bootstrap sees few distinct resamples and its variance is (n-1)/n of the true one,
# and skewed, so a 95% interval covers well under 95% (a simulation of two random models: a
# "clear" difference in 10% of runs at 10 users, 7% at 40). Below this the interval is withheld.
MIN_INTERVAL_UNITS = 10


def history_length_bucket(history_length: int, *, short_max: int = 10) -> str:
    """``"cold"`` (no clicked history), ``"short"`` (1..short_max) or ``"long"``."""
    if history_length < 0:
        raise MetricInputError(f"history length is {history_length}, expected >= 0")
    if history_length == 0:
        return "cold"
    return "short" if history_length <= short_max else "long"


AGE_EDGES_H = (6.0, 24.0, 72.0)  # hours: the edges between ARTICLE_AGE_ORDER's first four buckets


def article_age_buckets(age_hours) -> np.ndarray:
    """Ages of articles when shown, in hours, as ``ARTICLE_AGE_ORDER`` labels (all but
    ``NEW_TO_STORE``, which the caller gives the articles it knows no first-seen time of).

    Args:
        age_hours: (n,) floats; NaN is "unknown".

    Returns:
        (n,) object array of labels.
    """
    age = np.asarray(age_hours, dtype=np.float64)
    code = np.where(np.isnan(age), len(AGE_EDGES_H) + 1, np.digitize(np.nan_to_num(age), AGE_EDGES_H))
    return np.array(ARTICLE_AGE_ORDER[1:], dtype=object)[code]


def article_age_bucket(age_hours: float | None) -> str:
    """One age, as ``article_age_buckets`` labels it (None is "unknown")."""
    return str(article_age_buckets([np.nan if age_hours is None else age_hours])[0])


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise MetricInputError(f"{name} is {_show(value)}, expected an integer >= {minimum}")


def _interval(value, low, high, num_units: int | None = None) -> dict:
    """``{"value", "ci_low", "ci_high"}``, plus ``num_units`` when too few units withheld the interval."""
    def plain(x):
        return None if x is None or not np.isfinite(x) else float(x)

    if value is not None and num_units is not None and num_units < MIN_INTERVAL_UNITS:
        return {"value": plain(value), "ci_low": None, "ci_high": None, "num_units": int(num_units)}
    return {"value": plain(value), "ci_low": plain(low), "ci_high": plain(high)}


class ImpressionMetrics:
    """Accumulates impressions and computes MIND metrics, pooled AUC, log loss and calibration.

    Args:
        model_names: models scored on every impression; the first is the reference of
            ``diff_to_first``.
        item_groups: names of per-candidate group schemes (e.g. "category", "has_image",
            "article_age"); values are given per candidate in ``add``.
        impression_groups: names of per-impression schemes (e.g. "history_length").
        group_order: optional display order of the values of a scheme; other values follow,
            most candidates first. Without one, values that all belong to
            HISTORY_LENGTH_ORDER or ARTICLE_AGE_ORDER keep that order.
        num_resamples: bootstrap resamples for the model metrics.
        cluster_unit: None resamples impressions; a name (e.g. "user") resamples the clusters
            that ``add``/``add_batch`` are then given per impression (``clusters``), each
            with all its impressions: impressions of one reader are correlated, and treating
            them as independent makes the intervals too narrow.
        breakdown_resamples: resamples for the breakdown metrics (the first of the same
            resamples; default ``min(200, num_resamples)``, as breakdowns hold many more
            statistics); 0 reports breakdown values without intervals.
        confidence: interval coverage.
        seed: resampling seed.
        num_bins: calibration bins.
        calibration_strategy: "quantile" (equal counts; default, as click rates of a few
            percent would fill one uniform bin) or "uniform" (equal widths on [0, 1]).

    Raises:
        MetricInputError: no model, repeated names, or invalid options.
    """

    def __init__(
        self,
        model_names: Sequence[str],
        *,
        item_groups: Sequence[str] = (),
        impression_groups: Sequence[str] = (),
        group_order: Mapping[str, Sequence[Hashable]] | None = None,
        num_resamples: int = 1000,
        breakdown_resamples: int | None = None,
        confidence: float = 0.95,
        seed: int = 0,
        num_bins: int = 10,
        calibration_strategy: str = "quantile",
        cluster_unit: str | None = None,
    ):
        self.model_names = tuple(model_names)
        self.item_groups = tuple(item_groups)
        self.impression_groups = tuple(impression_groups)
        if not self.model_names:
            raise MetricInputError("model_names is empty, expected at least one model")
        for kind, names in (("model", self.model_names), ("group scheme", self.item_groups + self.impression_groups)):
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise MetricInputError(f"{kind} names repeat {repeated}, expected distinct names")
        _check_int("num_resamples", num_resamples, 1)
        if breakdown_resamples is None:
            breakdown_resamples = min(200, num_resamples)
        _check_int("breakdown_resamples", breakdown_resamples, 0)
        _check_int("num_bins", num_bins, 1)
        if breakdown_resamples > num_resamples:
            raise MetricInputError(
                f"breakdown_resamples is {breakdown_resamples}, expected at most num_resamples ({num_resamples})"
            )
        if not 0.0 < confidence < 1.0:
            raise MetricInputError(f"confidence is {confidence!r}, expected a value strictly between 0 and 1")
        if calibration_strategy not in STRATEGIES:
            raise MetricInputError(f"calibration_strategy is {calibration_strategy!r}, expected one of {list(STRATEGIES)}")
        unknown = sorted(set(group_order or {}) - set(self.item_groups + self.impression_groups))
        if unknown:
            raise MetricInputError(f"group_order names unknown schemes {unknown}, expected some of "
                                   f"{list(self.item_groups + self.impression_groups)}")
        self.group_order = {k: tuple(v) for k, v in (group_order or {}).items()}
        self.num_resamples = num_resamples
        self.breakdown_resamples = breakdown_resamples
        self.confidence = confidence
        self.seed = seed
        self.num_bins = num_bins
        self.calibration_strategy = calibration_strategy
        if cluster_unit is not None and (not isinstance(cluster_unit, str) or not cluster_unit or cluster_unit == "impression"):
            raise MetricInputError(f"cluster_unit is {cluster_unit!r}, expected None or the name of a cluster such as 'user'")
        self.cluster_unit = cluster_unit

        self._num_added = 0
        self._num_unlabelled = 0
        self._codes: dict[str, dict] = {name: {} for name in self.item_groups + self.impression_groups}
        self._model_set = set(self.model_names)
        self._probabilistic = {name: True for name in self.model_names}
        self._tied = {name: 0 for name in self.model_names}
        # Compacted storage, one list entry per flush.
        self._labels: list[np.ndarray] = []
        self._lengths: list[np.ndarray] = []
        self._ranks: dict[str, list[np.ndarray]] = {name: [] for name in self.model_names}
        self._scores: dict[str, list[np.ndarray]] = {name: [] for name in self.model_names}
        self._item_codes: dict[str, list[np.ndarray]] = {name: [] for name in self.item_groups}
        self._impression_codes: dict[str, list[np.ndarray]] = {name: [] for name in self.impression_groups}
        self._cluster_ids: dict[Hashable, int] = {}
        self._cluster_codes: list[np.ndarray] = []
        self._reset_buffer()

    def _reset_buffer(self) -> None:
        self._buffered = 0
        self._buf_labels: list[np.ndarray] = []
        self._buf_lengths: list[int] = []
        self._buf_scores: dict[str, list[np.ndarray]] = {name: [] for name in self.model_names}
        self._buf_item_values: dict[str, list] = {name: [] for name in self.item_groups}
        self._buf_impression_values: dict[str, list] = {name: [] for name in self.impression_groups}
        self._buf_clusters: list = []

    @property
    def num_impressions(self) -> int:
        """Impressions added, labelled or not."""
        return self._num_added

    @property
    def num_unlabelled(self) -> int:
        """Impressions added whose labels were all -1 (skipped)."""
        return self._num_unlabelled

    def add(
        self,
        labels,
        scores: Mapping[str, Sequence[float]],
        *,
        item_groups: Mapping[str, Sequence[Hashable]] | None = None,
        impression_groups: Mapping[str, Hashable] | None = None,
        cluster: Hashable | None = None,
    ) -> None:
        """Add one impression.

        Args:
            labels: (n,) 1 clicked, 0 not clicked; all -1 for an unlabelled impression.
            scores: model name -> (n,) finite scores in candidate order, for every model.
            item_groups: scheme -> (n,) group value of each candidate, for every item scheme.
            impression_groups: scheme -> the impression's group value, for every such scheme.
            cluster: the impression's cluster (e.g. its user id); required with
                ``cluster_unit``, refused without.

        Raises:
            MetricInputError: no candidate or more than MAX_CANDIDATES, labels other than 0/1
                (or all -1), missing or unknown models or schemes, arrays of the wrong length,
                non-finite scores, or a cluster given or missing against ``cluster_unit``.
        """
        where = f"impression {self._num_added}"
        self._check_clusters(cluster, where, "cluster")
        labels = np.asarray(labels)
        if labels.ndim != 1 or not 0 < labels.size <= MAX_CANDIDATES:
            raise MetricInputError(
                f"{where}: labels have shape {labels.shape}, expected 1 to {MAX_CANDIDATES} candidates"
            )
        binary = (labels == 0) | (labels == 1)
        if not binary.all():
            if (labels == -1).all():
                self._num_added += 1
                self._num_unlabelled += 1
                return
            bad = labels[~binary][0]
            raise MetricInputError(
                f"{where} has label {_show(bad)}, expected 0 or 1 (or -1 for every candidate of an unlabelled impression)"
            )
        size = labels.size
        if scores.keys() != self._model_set:
            self._check_mapping("scores", scores, self.model_names)
        checked = {}
        for name in self.model_names:
            values = np.asarray(scores[name], dtype=np.float64)
            if values.shape != labels.shape:
                raise MetricInputError(
                    f"{where}: scores of model '{name}' have shape {values.shape}, expected {labels.shape} like the labels"
                )
            if not np.isfinite(values).all():
                raise MetricInputError(
                    f"{where}: model '{name}' scores {_show(values[~np.isfinite(values)][0])}, expected finite scores"
                )
            checked[name] = values
        item_values = self._check_mapping("item_groups", item_groups, self.item_groups)
        for name, values in item_values.items():
            if len(values) != size:
                raise MetricInputError(f"{where}: item_groups['{name}'] has {len(values)} values, expected {size}")
        impression_values = self._check_mapping("impression_groups", impression_groups, self.impression_groups)

        self._num_added += 1
        self._buf_labels.append(labels.astype(np.int8))
        self._buf_lengths.append(size)
        for name, values in checked.items():
            self._buf_scores[name].append(values)
        for name, values in item_values.items():
            self._buf_item_values[name].append(values)
        for name, value in impression_values.items():
            self._buf_impression_values[name].append([value])
        if self.cluster_unit is not None:
            self._buf_clusters.append([cluster])
        self._buffered += size
        if self._buffered >= _FLUSH_CANDIDATES:
            self._flush()

    def add_batch(
        self,
        labels,
        scores: Mapping[str, Sequence[float]],
        offsets,
        *,
        item_groups: Mapping[str, Sequence[Hashable]] | None = None,
        impression_groups: Mapping[str, Sequence[Hashable]] | None = None,
        clusters: Sequence[Hashable] | None = None,
    ) -> None:
        """Add ``m`` impressions given CSR-style (faster than ``add`` per impression).

        Args:
            labels: (c,) labels of all candidates, impression after impression (1, 0, or -1
                for every candidate of an unlabelled impression).
            scores: model name -> (c,) finite scores, for every model.
            offsets: (m + 1,) offsets; impression ``i`` owns ``labels[offsets[i]:offsets[i+1]]``.
            item_groups: scheme -> (c,) group value per candidate, for every item scheme.
            impression_groups: scheme -> (m,) group value per impression, for every such scheme.
            clusters: (m,) cluster of each impression; required with ``cluster_unit``.

        Raises:
            MetricInputError: as ``add``, and offsets that do not delimit the candidates.
        """
        first = self._num_added
        self._check_clusters(clusters, f"impressions from {first}", "clusters")
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise MetricInputError(f"impressions from {first}: labels have shape {labels.shape}, expected a 1-D array")
        try:
            offsets = _check_offsets(offsets, labels.size)
        except MetricInputError as err:
            raise MetricInputError(f"impressions from {first}: {err}") from None
        lengths = np.diff(offsets)
        too_long = np.flatnonzero(lengths > MAX_CANDIDATES)
        if too_long.size:
            i = too_long[0]
            raise MetricInputError(f"impression {first + i} has {lengths[i]} candidates, expected at most {MAX_CANDIDATES}")
        bad = ~((labels == 0) | (labels == 1) | (labels == -1))
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            i = int(np.searchsorted(offsets, j, side="right") - 1)
            raise MetricInputError(
                f"impression {first + i} has label {_show(labels[j])}, expected 0 or 1 (or -1 for every "
                "candidate of an unlabelled impression)"
            )
        num_impressions = len(lengths)
        impression_of = np.repeat(np.arange(num_impressions), lengths)
        num_missing = np.bincount(impression_of, weights=labels == -1, minlength=num_impressions)
        mixed = np.flatnonzero((num_missing > 0) & (num_missing < lengths))
        if mixed.size:
            raise MetricInputError(
                f"impression {first + mixed[0]} mixes labels -1 with 0/1, expected all -1 (unlabelled) or none"
            )
        checked = self._check_mapping("scores", scores, self.model_names)
        for name in self.model_names:
            values = np.asarray(checked[name], dtype=np.float64)
            if values.shape != labels.shape:
                raise MetricInputError(
                    f"impressions from {first}: scores of model '{name}' have shape {values.shape}, "
                    f"expected {labels.shape} like the labels"
                )
            if not np.isfinite(values).all():
                j = int(np.flatnonzero(~np.isfinite(values))[0])
                i = int(np.searchsorted(offsets, j, side="right") - 1)
                raise MetricInputError(f"impression {first + i}: model '{name}' scores {_show(values[j])}, expected finite scores")
            checked[name] = values
        item_values = self._check_mapping("item_groups", item_groups, self.item_groups)
        impression_values = self._check_mapping("impression_groups", impression_groups, self.impression_groups)
        for kind, values_of, size in (
            ("item_groups", item_values, labels.size),
            ("impression_groups", impression_values, num_impressions),
        ):
            for name, values in values_of.items():
                if len(values) != size:
                    raise MetricInputError(f"impressions from {first}: {kind}['{name}'] has {len(values)} values, expected {size}")
        if clusters is not None and len(clusters) != num_impressions:
            raise MetricInputError(f"impressions from {first}: clusters has {len(clusters)} values, expected {num_impressions}")

        labelled = num_missing == 0
        self._num_added += num_impressions
        self._num_unlabelled += int(num_impressions - labelled.sum())
        if not labelled.any():
            return
        keep = None if labelled.all() else np.repeat(labelled, lengths)
        self._buf_labels.append((labels if keep is None else labels[keep]).astype(np.int8))
        self._buf_lengths.extend(lengths[labelled].tolist())
        for name, values in checked.items():
            self._buf_scores[name].append(values if keep is None else values[keep])
        for name, values in item_values.items():
            self._buf_item_values[name].append(values if keep is None else np.asarray(values, dtype=object)[keep])
        for name, values in impression_values.items():
            self._buf_impression_values[name].append(
                values if labelled.all() else np.asarray(values, dtype=object)[labelled]
            )
        if clusters is not None:
            self._buf_clusters.append(clusters if labelled.all() else np.asarray(clusters, dtype=object)[labelled])
        self._buffered += int(lengths[labelled].sum())
        if self._buffered >= _FLUSH_CANDIDATES:
            self._flush()

    def _check_clusters(self, given, where: str, name: str) -> None:
        if self.cluster_unit is not None and given is None:
            raise MetricInputError(f"{where}: {name} missing, expected one per impression (cluster_unit '{self.cluster_unit}')")
        if self.cluster_unit is None and given is not None:
            raise MetricInputError(f"{where}: {name} given, but this accumulator resamples impressions (cluster_unit None)")

    def _check_mapping(self, what: str, given: Mapping | None, expected: tuple[str, ...]) -> Mapping:
        given = {} if given is None else given
        if given.keys() != set(expected):
            missing = [n for n in expected if n not in given]
            unknown = sorted(set(given) - set(expected))
            raise MetricInputError(
                f"impression {self._num_added}: {what} lacks {missing} and has unknown {unknown}, "
                f"expected exactly {list(expected)}"
            )
        return dict(given)

    def _encode(self, scheme: str, chunks: list) -> np.ndarray:
        kinds = {c.dtype.kind if isinstance(c, np.ndarray) else "O" for c in chunks}
        if len(kinds) == 1 and kinds <= {"U", "S", "b", "i", "u"}:
            values = np.concatenate(chunks)  # one plain dtype: no Python objects needed
        else:
            # Lists or mixed dtypes: factorise the values as Python objects.
            values = np.fromiter(itertools.chain.from_iterable(chunks), dtype=object, count=sum(len(c) for c in chunks))
        local, uniques = pd.factorize(values, use_na_sentinel=False)
        mapping = self._codes[scheme]
        remap = np.array([mapping.setdefault(u, len(mapping)) for u in uniques], dtype=np.int64)
        if len(mapping) > MAX_GROUPS:
            raise MetricInputError(f"group scheme '{scheme}' has more than {MAX_GROUPS} distinct values")
        return remap[local].astype(np.int16)

    def _flush(self) -> None:
        if not self._buf_labels:
            return
        lengths = np.asarray(self._buf_lengths, dtype=np.int64)
        offsets = np.r_[0, np.cumsum(lengths)]
        self._labels.append(np.concatenate(self._buf_labels))
        self._lengths.append(lengths.astype(np.int32))
        for name in self.model_names:
            scores = np.concatenate(self._buf_scores[name])
            ranks = batch_ranks_from_scores(scores, offsets)
            self._ranks[name].append(ranks.astype(np.uint16))
            self._scores[name].append(scores.astype(np.float32))
            if self._probabilistic[name] and (scores.min() < 0 or scores.max() > 1):
                self._probabilistic[name] = False
            self._tied[name] += _count_tied_impressions(scores, ranks, offsets)
        for name in self.item_groups:
            self._item_codes[name].append(self._encode(name, self._buf_item_values[name]))
        for name in self.impression_groups:
            self._impression_codes[name].append(self._encode(name, self._buf_impression_values[name]))
        if self._buf_clusters:
            values = np.fromiter(itertools.chain.from_iterable(self._buf_clusters), dtype=object)
            local, uniques = pd.factorize(values, use_na_sentinel=False)
            ids = self._cluster_ids
            remap = np.array([ids.setdefault(u, len(ids)) for u in uniques], dtype=np.int64)
            self._cluster_codes.append(remap[local])
        self._reset_buffer()

    def _compact(self) -> None:
        """Join the per-flush arrays into one each, in place (no second copy held by result())."""
        for store in (self._ranks, self._scores, self._item_codes, self._impression_codes):
            for name, parts in store.items():
                if len(parts) > 1:
                    store[name] = [np.concatenate(parts)]
        for attr in ("_labels", "_lengths", "_cluster_codes"):
            parts = getattr(self, attr)
            if len(parts) > 1:
                setattr(self, attr, [np.concatenate(parts)])

    def result(self) -> dict:
        """Every metric of every model, with intervals, and the breakdowns.

        May be called again after more impressions are added.

        Returns:
            A plain dict::

                {"num_impressions", "num_labelled_impressions", "num_unlabelled", "num_scored",
                 "num_single_class", "num_candidates", "num_clicked",
                 "bootstrap": {"unit", "num_resamples", "breakdown_resamples", "confidence",
                               "seed", "pooled_auc", "min_units"},
                 "models": {name: {
                     "metrics": {metric: {"value", "ci_low", "ci_high"}},
                     "diff_to_first": {metric: value},
                     "diff_to_first_ci": {metric: {"ci_low", "ci_high"}},
                     "probabilistic": bool | None (None: no labelled impression, no score seen),
                     "tied_impressions": int,
                     "calibration": {"strategy", "num_bins", "bins": [...], "ece"} | None,
                     "breakdowns": {scheme: {group: {"num_impressions", "num_scored",
                         "num_candidates", "num_clicked",
                         "metrics": {metric: {"value", "ci_low", "ci_high"}}}}}}}}

            Metrics are ``METRICS``; a value is None where undefined (no scored impression,
            one class only, or log loss of scores outside [0, 1]). An interval (or a difference's
            interval) that rests on fewer than ``MIN_INTERVAL_UNITS`` resampled units (users, or
            impressions) is None, and its dict adds ``"num_units"``: how many there were.
        """
        self._flush()
        data = _Data.build(self)
        out = {
            "num_impressions": self._num_added,
            "num_labelled_impressions": data.num_impressions,
            "num_unlabelled": self._num_unlabelled,
            "num_scored": int(data.scored.sum()) if data.num_impressions else 0,
            "num_single_class": int(data.num_impressions - data.scored.sum()) if data.num_impressions else 0,
            "num_candidates": int(len(data.labels)),
            "num_clicked": int(data.labels.sum()),
            "bootstrap": {
                "unit": self.cluster_unit or "impression",
                "num_resamples": self.num_resamples,
                "breakdown_resamples": self.breakdown_resamples,
                "confidence": self.confidence,
                "seed": self.seed,
                "pooled_auc": "linearized",
                "min_units": MIN_INTERVAL_UNITS,
            },
            "models": {},
        }
        if data.num_impressions == 0:
            for name in self.model_names:
                out["models"][name] = self._empty_model(name)
            return out

        main = _StatTable(data.num_impressions, np.float64)
        per_model = {}
        scored_segments = np.flatnonzero(data.scored)
        impressions = np.arange(data.num_impressions)
        counts_cache = _cached_counts(data.units.count, self.breakdown_resamples, self.seed)
        breakdowns = [
            _Breakdown(self, data, scheme, counts_cache) for scheme in self.item_groups + self.impression_groups
        ]
        # Model by model, so that one model's sorted order and losses are held at a time.
        for name in self.model_names:
            per_model[name] = _group_metrics(
                data.num_impressions, main, name,
                segments=scored_segments, segment_impression=impressions, per_segment=data.per_impression[name],
                candidates=data.sorted_candidates(name), denominators=("scored", "items"),
            )
            for breakdown in breakdowns:
                breakdown.add_model(name)
            data.forget(name)
        if len(main):
            samples = main.samples(num_resamples=self.num_resamples, seed=self.seed, units=data.units)
            low, high = percentile_interval(samples, confidence=self.confidence)
            num_units = main.num_units(data.units)

        first = self.model_names[0]
        for name in self.model_names:
            metrics, diff, diff_ci = {}, {}, {}
            for metric in METRICS:
                col, ref_col = main.column_of.get((name, metric)), main.column_of.get((first, metric))
                value, ref_value = per_model[name][metric], per_model[first][metric]
                # A value exists exactly when its column does, so ``samples`` exists too.
                metrics[metric] = _interval(
                    value, *((low[col], high[col], num_units[col]) if col is not None else (None, None))
                )
                if value is None or ref_value is None:
                    diff[metric], diff_ci[metric] = None, {"ci_low": None, "ci_high": None}
                    continue
                diff[metric] = float(value - ref_value)
                few = min(num_units[col], num_units[ref_col])
                if name == first:
                    diff_ci[metric] = {"ci_low": 0.0, "ci_high": 0.0}
                elif few < MIN_INTERVAL_UNITS:
                    diff_ci[metric] = {"ci_low": None, "ci_high": None, "num_units": int(few)}
                else:
                    d_low, d_high = percentile_interval(samples[:, col] - samples[:, ref_col], confidence=self.confidence)
                    diff_ci[metric] = {"ci_low": float(d_low), "ci_high": float(d_high)}
            out["models"][name] = {
                "metrics": metrics,
                "diff_to_first": diff,
                "diff_to_first_ci": diff_ci,
                "probabilistic": self._probabilistic[name],
                "tied_impressions": int(self._tied[name]),
                "calibration": self._calibration(data, name),
                "breakdowns": {},
            }
        for breakdown in breakdowns:
            for name in self.model_names:
                out["models"][name]["breakdowns"][breakdown.scheme] = breakdown.result(name)
        return out

    def _empty_model(self, name: str) -> dict:
        none = {m: _interval(None, None, None) for m in METRICS}
        return {
            "metrics": none,
            "diff_to_first": {m: None for m in METRICS},
            "diff_to_first_ci": {m: {"ci_low": None, "ci_high": None} for m in METRICS},
            # No labelled impression: no score was seen, so whether they are probabilities is unknown.
            "probabilistic": None,
            "tied_impressions": 0,
            "calibration": None,
            "breakdowns": {scheme: {} for scheme in self.item_groups + self.impression_groups},
        }

    def _calibration(self, data: "_Data", name: str) -> dict | None:
        if not self._probabilistic[name]:
            return None
        curve = reliability_curve(
            data.labels, data.scores[name], num_bins=self.num_bins, strategy=self.calibration_strategy
        )
        bins = curve.bins()
        return {
            "strategy": self.calibration_strategy,
            "num_bins": len(bins),
            "bins": bins,
            "ece": curve.expected_calibration_error(),
        }


def _count_tied_impressions(scores: np.ndarray, ranks: np.ndarray, offsets: np.ndarray) -> int:
    """Impressions in which two candidates share a score (neighbours in rank order are equal)."""
    segment = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    by_rank = np.empty(len(scores), dtype=np.int64)
    by_rank[offsets[segment] + ranks - 1] = np.arange(len(scores))
    ordered = scores[by_rank]
    same = (segment[1:] == segment[:-1]) & (ordered[1:] == ordered[:-1])
    return int(np.unique(segment[1:][same]).size)


def _cached_counts(num_units: int, num_resamples: int, seed: int) -> list[np.ndarray] | None:
    """The first resamples' counts as uint8 chunks when they fit the cache limit, else None."""
    if num_units == 0 or num_resamples == 0 or num_units * num_resamples > _CACHE_COUNTS_LIMIT:
        return None
    return [c.astype(np.uint8) for c in resample_counts(num_units, num_resamples=num_resamples, seed=seed)]


class _Units:
    """What the bootstrap resamples: impressions, or clusters of them (each with all of its
    impressions). Every statistic is a ratio of per-impression sums, so resampling clusters is
    resampling their summed rows."""

    def __init__(self, num_impressions: int, clusters: np.ndarray | None):
        if clusters is None:
            self.count, self._order, self._starts = num_impressions, None, None
            return
        self._order = np.argsort(clusters, kind="stable")
        ordered = clusters[self._order]
        self._starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(ordered) else np.zeros(0, np.int64)
        self.count = len(self._starts)

    def sums(self, columns: np.ndarray) -> np.ndarray:
        """(n, k) per-impression columns -> (units, k) per-unit sums."""
        if self._order is None or not len(columns):
            return columns
        return np.add.reduceat(columns[self._order], self._starts, axis=0)


class _Breakdown:
    """One group scheme: the groups' counts, and each model's metrics per group with intervals."""

    def __init__(self, acc: ImpressionMetrics, data: "_Data", scheme: str, counts_cache):
        self.scheme = scheme
        self.data = data
        self.counts_cache = counts_cache
        self.resamples, self.seed, self.confidence = acc.breakdown_resamples, acc.seed, acc.confidence
        self.keys = [str(k) for k in acc._codes[scheme]]
        num_groups = len(self.keys)
        n = data.num_impressions
        if scheme in acc.item_groups:
            self.item_codes = data.item_codes[scheme]
            self.sub = _SubImpressions(data, self.item_codes, num_groups)
            self.segment_impression, segment_code, segment_scored = self.sub.impression, self.sub.code, self.sub.scored
        else:
            self.sub = None
            segment_code = data.impression_codes[scheme]
            self.item_codes = segment_code[data.impression_index]  # int16: the stable sorts below are radix sorts
            self.segment_impression, segment_scored = np.arange(n), data.scored
        segment_order = np.argsort(segment_code)
        segment_bounds = np.searchsorted(segment_code[segment_order], np.arange(num_groups + 1))
        self.item_bounds = np.r_[0, np.cumsum(np.bincount(self.item_codes, minlength=num_groups))]
        self.counts, self.scored_of = {}, {}
        for g in range(num_groups):
            segments = segment_order[segment_bounds[g] : segment_bounds[g + 1]]
            self.scored_of[g] = segments[segment_scored[segments]]
            in_group = self.item_codes == g
            self.counts[g] = {
                "num_impressions": len(segments),  # a group has at most one segment per impression
                "num_scored": int(len(self.scored_of[g])),
                "num_candidates": int(in_group.sum()),
                "num_clicked": int(data.labels[in_group].sum()),
            }
        declared = [str(v) for v in acc.group_order.get(scheme, ())]
        if not declared:
            # Values of a known ordinal scale keep its order without being told.
            declared = next((list(o) for o in _KNOWN_ORDERS if set(self.keys) <= set(o)), [])
        first = [self.keys.index(k) for k in declared if k in self.keys]
        rest = [g for g in range(num_groups) if g not in first]
        self.order = first + sorted(rest, key=lambda g: (-self.counts[g]["num_candidates"], self.keys[g]))
        self.values: dict = {}
        self.bounds: dict = {}

    def add_model(self, name: str) -> None:
        """Compute one model's metrics per group, and their intervals (one small table per model)."""
        data, n = self.data, self.data.num_impressions
        table = _StatTable(n, np.float32)
        everything = data.sorted_candidates(name)
        # Each group's candidates, still in ascending score order: a stable (radix) sort by code.
        by_group = np.argsort(self.item_codes[everything.order], kind="stable")
        per_segment = self.sub.scores(name) if self.sub is not None else data.per_impression[name]
        for g in range(len(self.keys)):
            self.values[name, g] = _group_metrics(
                n, table, g,
                segments=self.scored_of[g], segment_impression=self.segment_impression, per_segment=per_segment,
                candidates=everything.take(by_group[self.item_bounds[g] : self.item_bounds[g + 1]]),
                denominators=(("scored", g), ("items", g)),
            )
        if self.resamples and len(table):
            samples = table.samples(num_resamples=self.resamples, seed=self.seed, counts=self.counts_cache, units=data.units)
            low, high = percentile_interval(samples, confidence=self.confidence)
            num_units = table.num_units(data.units)
            for (g, metric), col in table.column_of.items():
                self.bounds[name, g, metric] = (low[col], high[col], num_units[col])

    def result(self, name: str) -> dict:
        """group -> counts and metrics of one model, groups in display order."""
        return {
            self.keys[g]: {
                **self.counts[g],
                "metrics": {
                    m: _interval(self.values[name, g][m], *self.bounds.get((name, g, m), (None, None, None))) for m in METRICS
                },
            }
            for g in self.order
        }


class _StatTable:
    """Ratio statistics sharing one resampling: numerator columns and shared denominator columns."""

    def __init__(self, num_impressions: int, dtype):
        self.num_impressions = num_impressions
        self.dtype = dtype
        self.numerators: list[np.ndarray] = []
        self.denominator_of: list[int] = []
        self.offsets: list[float] = []
        self.column_of: dict = {}
        self._denominators: list[np.ndarray] = []
        self._den_ids: dict = {}
        self._supports: dict = {}  # key -> (n,) array, nonzero for the impressions a statistic rests on
        self.support_of: list = []

    def __len__(self) -> int:
        return len(self.numerators)

    def add(self, key, numerator: np.ndarray, denominator_key, denominator, offset: float = 0.0, *,
            support_key=None, support=None) -> None:
        """Add column ``key``; ``denominator`` is a callable, evaluated once per key.

        ``support`` (a callable, evaluated once per ``support_key``) is nonzero for the
        impressions the statistic rests on, or a tuple of such arrays that it needs each of
        (clicks and skips); by default those of a nonzero denominator.
        """
        if denominator_key not in self._den_ids:
            self._den_ids[denominator_key] = len(self._denominators)
            self._denominators.append(np.asarray(denominator(), dtype=self.dtype))
        if support_key is None:
            support_key = ("denominator", denominator_key)
            self._supports.setdefault(support_key, self._denominators[self._den_ids[denominator_key]])
        elif support_key not in self._supports:
            given = support()
            self._supports[support_key] = tuple(map(np.asarray, given)) if isinstance(given, tuple) else np.asarray(given)
        self.column_of[key] = len(self.numerators)
        self.numerators.append(np.asarray(numerator, dtype=self.dtype))
        self.denominator_of.append(self._den_ids[denominator_key])
        self.support_of.append(support_key)
        self.offsets.append(offset)

    def num_units(self, units: "_Units") -> np.ndarray:
        """(columns,) distinct resampled units (users, or impressions) each statistic rests on;
        for a support given as several arrays, the fewest units of any of them."""
        def count(support) -> int:
            return int((units.sums((support != 0).astype(np.int64)[:, None])[:, 0] > 0).sum())

        counts = {key: min(count(s) for s in (support if isinstance(support, tuple) else (support,)))
                  for key, support in self._supports.items()}
        return np.array([counts[key] for key in self.support_of], dtype=np.int64)

    def samples(self, *, num_resamples: int, seed: int, counts=None, units: "_Units | None" = None) -> np.ndarray:
        numerators = np.column_stack(self.numerators)
        denominators = np.column_stack(self._denominators)
        if units is not None:
            numerators, denominators = units.sums(numerators), units.sums(denominators)
        out = ratio_samples(
            numerators, denominators, np.array(self.denominator_of), num_resamples=num_resamples, seed=seed, counts=counts
        )
        return out + np.array(self.offsets)


def _group_metrics(
    num_impressions: int,
    table: _StatTable,
    key,
    *,
    segments: np.ndarray,
    segment_impression: np.ndarray,
    per_segment: dict,
    candidates: "_Candidates",
    denominators: tuple,
) -> dict:
    """One model's metrics over one group, and their bootstrap columns added to ``table``.

    Args:
        num_impressions: ``n``, the impressions resampled.
        table: where the columns go, keyed ``(key, metric)``.
        key: the group's key in ``table``.
        segments: indices of the group's scored segments (impressions, or the group's
            candidates within an impression).
        segment_impression: (s,) impression of every segment.
        per_segment: per-segment metric arrays of the model.
        candidates: the group's candidates in ascending order of the model's score.
        denominators: keys of the denominators shared by all models (scored segments, candidates).

    Returns:
        metric -> value (None where undefined).
    """
    n = num_impressions
    values = {}
    owner = segment_impression[segments]
    for metric in METRIC_NAMES:
        if len(segments) == 0:
            values[metric] = None
            continue
        per_values = per_segment[metric][segments]
        values[metric] = float(per_values.mean())
        table.add((key, metric), np.bincount(owner, weights=per_values, minlength=n),
                  denominators[0], lambda: np.bincount(owner, minlength=n))

    impressions = candidates.impressions
    try:
        auc, psi = auc_influence(candidates.labels, candidates.scores, impressions, n, presorted=True)
    except MetricInputError:
        values["pooled_auc"] = None
    else:
        values["pooled_auc"] = auc
        # It rests on the users who clicked and on those who skipped here (the fewer of the
        # two), not on every impression ("ones"): many viewers and five clickers is five.
        clicked = candidates.labels == 1
        table.add((key, "pooled_auc"), n * psi, "ones", lambda: np.ones(n), offset=auc,
                  support_key=("pooled_auc", denominators[1]),
                  support=lambda: (np.bincount(impressions[clicked], minlength=n) > 0,
                                   np.bincount(impressions[~clicked], minlength=n) > 0))

    if candidates.losses is None or len(impressions) == 0:
        values["log_loss"] = None
    else:
        item_losses = candidates.losses
        values["log_loss"] = float(item_losses.mean())
        table.add((key, "log_loss"), np.bincount(impressions, weights=item_losses, minlength=n),
                  denominators[1], lambda: np.bincount(impressions, minlength=n))
    return values


class _Data:
    """The accumulated arrays, concatenated, and the per-impression metrics of each model."""

    @classmethod
    def build(cls, acc: ImpressionMetrics) -> "_Data":
        self = cls()
        self.model_names = acc.model_names
        self.probabilistic = acc._probabilistic
        acc._compact()
        self.labels = acc._labels[0] if acc._labels else np.zeros(0, np.int8)
        lengths = acc._lengths[0].astype(np.int64) if acc._lengths else np.zeros(0, np.int64)
        self.num_impressions = len(lengths)
        self.lengths = lengths
        self.offsets = np.r_[0, np.cumsum(lengths)]
        index_type = np.int32 if self.num_impressions < 2**31 else np.int64
        self.impression_index = np.repeat(np.arange(self.num_impressions, dtype=index_type), lengths)
        self.ranks = {n: acc._ranks[n][0] for n in acc.model_names if acc._ranks[n]}
        self.scores = {n: acc._scores[n][0] for n in acc.model_names if acc._scores[n]}
        self.item_codes = {n: acc._item_codes[n][0] for n in acc.item_groups if acc._item_codes[n]}
        self.impression_codes = {n: acc._impression_codes[n][0] for n in acc.impression_groups if acc._impression_codes[n]}
        clusters = None
        if acc.cluster_unit is not None:
            clusters = acc._cluster_codes[0] if acc._cluster_codes else np.zeros(0, np.int64)
        self.units = _Units(self.num_impressions, clusters)
        self.per_impression = {}
        for name in self.ranks:
            parts = []
            for first, last in _impression_chunks(self.offsets):
                lo, hi = self.offsets[first], self.offsets[last]
                lengths = self.lengths[first:last]
                local = self.impression_index[lo:hi] - first
                # Ranks are distinct within an impression, so the rank is the position: no sort.
                position = self.ranks[name][lo:hi].astype(np.int64) - 1
                parts.append(segment_metrics(local, self.labels[lo:hi], position, lengths[local] - position, lengths))
            self.per_impression[name] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if self.per_impression:
            self.scored = self.per_impression[acc.model_names[0]]["scored"]
        else:
            self.scored = np.zeros(0, dtype=bool)
        self._sorted: dict[str, _Candidates] = {}
        return self

    def sorted_candidates(self, name: str) -> "_Candidates":
        """Every candidate in ascending order of the model's score (kept until ``forget``).

        Gathered once per model: later subsets of it are read in order, which is much faster
        than gathering each group's candidates from the arrays in candidate order.
        """
        if name not in self._sorted:
            # Any order of tied scores will do: AUC gives ties their mean rank.
            order = np.argsort(self.scores[name]).astype(self.impression_index.dtype)
            losses = None
            if self.probabilistic[name]:
                losses = log_losses(self.labels, self.scores[name].astype(np.float64))[order]
            self._sorted[name] = _Candidates(
                order, self.labels[order], self.scores[name][order], self.impression_index[order], losses
            )
        return self._sorted[name]

    def forget(self, name: str) -> None:
        """Drop a model's sorted candidates (one model's are kept at a time to bound memory)."""
        self._sorted.pop(name, None)


@dataclass(frozen=True)
class _Candidates:
    """Candidates in ascending order of one model's score: indices, labels, scores, impressions, losses."""

    order: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    impressions: np.ndarray
    losses: np.ndarray | None

    def take(self, rows: np.ndarray) -> "_Candidates":
        """The candidates at ``rows`` (ascending positions keep the score order)."""
        return _Candidates(
            self.order[rows], self.labels[rows], self.scores[rows], self.impressions[rows],
            None if self.losses is None else self.losses[rows],
        )


class _SubImpressions:
    """The candidates of each impression split by group code: one segment per (impression, group).

    Segments are numbered in (impression, code) order, so an impression's segments are
    consecutive and ``segment_start[i]`` is the first segment of impression ``i``.
    """

    def __init__(self, data: _Data, codes: np.ndarray, num_groups: int):
        width = max(num_groups, 1)
        key = data.impression_index.astype(np.int64) * width + codes
        order = np.argsort(key)  # the order inside a segment does not matter: positions come from ranks
        sorted_key = key[order]
        del key
        starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
        self.lengths = np.diff(np.r_[starts, len(sorted_key)])
        self.impression = (sorted_key[starts] // width).astype(data.impression_index.dtype)
        self.code = (sorted_key[starts] % width).astype(np.int16)
        del sorted_key
        self.segment_start = np.searchsorted(self.impression, np.arange(data.num_impressions + 1))
        self.segment_of = np.empty(len(order), dtype=data.impression_index.dtype)  # per candidate
        self.segment_of[order] = np.repeat(np.arange(len(starts), dtype=self.segment_of.dtype), self.lengths)
        del order
        self.data = data
        clicked = np.bincount(self.segment_of, weights=data.labels, minlength=len(starts))
        self.scored = (clicked > 0) & (clicked < self.lengths)

    def scores(self, name: str) -> dict:
        """Per-segment metrics of a model: a candidate's position is its rank among its segment's."""
        data = self.data
        parts = []
        for first, last in _impression_chunks(data.offsets):
            lo, hi = data.offsets[first], data.offsets[last]
            s_lo, s_hi = self.segment_start[first], self.segment_start[last]
            local = self.segment_of[lo:hi].astype(np.int64) - s_lo
            lengths = self.lengths[s_lo:s_hi]
            order = np.argsort(local * (MAX_CANDIDATES + 1) + data.ranks[name][lo:hi])
            position = np.empty(len(order), dtype=np.int64)
            position[order] = np.arange(len(order)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            parts.append(segment_metrics(local, data.labels[lo:hi], position, lengths[local] - position, lengths))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _impression_chunks(offsets: np.ndarray):
    """``(first, last)`` impression ranges of at most about _CHUNK_CANDIDATES candidates each."""
    num_impressions = len(offsets) - 1
    first = 0
    while first < num_impressions:
        last = int(np.searchsorted(offsets, offsets[first] + _CHUNK_CANDIDATES, side="right")) - 1
        last = min(max(last, first + 1), num_impressions)
        yield first, last
        first = last
