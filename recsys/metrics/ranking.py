"""Per-impression ranking metrics, defined as the MIND competition scorer defines them.

The MIND scorer (``evaluate.py`` of github.com/msnews/MIND) scores each impression on its own and
averages over impressions:

* per-impression AUC: ``sklearn.metrics.roc_auc_score`` on the impression's labels and scores,
  so tied scores count one half (midranks);
* MRR: candidates ordered by ``np.argsort(y_score)[::-1]``; the sum over clicked candidates of
  ``1 / position`` divided by the number clicked;
* nDCG@k: DCG with gain ``2**y - 1`` and discount ``log2(position + 1)`` over the first ``k``
  positions of that order, divided by the DCG of the ideal order.

Ties. MIND orders with ``np.argsort(y_score)[::-1]``. ``np.argsort``'s default kind is not a
stable sort, so MIND leaves the order of tied scores to the NumPy build: where the sort happens
to be stable (NumPy's insertion sort for short arrays on builds without SIMD sorting), the
reversal puts the *later* candidate of a tie first. NumPy 2.x with AVX2/AVX-512 sorting gives
other orders. Here the rule is fixed to that stable case: among tied scores the candidate that
comes later in the impression is ranked first (``np.argsort(y_score, kind="stable")[::-1]``).
AUC is unaffected (midranks). Prediction files carry distinct ranks, so files written by
``write_predictions`` have no ties and every rule agrees on them.

Single-class impressions (all clicked or none clicked) have no AUC; ``mind_scores`` and
``batch_impression_scores`` leave them out of every average and count them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from recsys.errors import RecsysError

METRIC_NAMES = ("impression_auc", "mrr", "ndcg@5", "ndcg@10")


class MetricInputError(RecsysError, ValueError):
    """Labels or scores that a metric cannot be computed from (wrong shape, values, one class)."""


def _show(value) -> str:
    """repr of a value for messages, NumPy scalars shown as plain Python values."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _as_labels(y_true, name: str = "y_true") -> np.ndarray:
    labels = np.asarray(y_true)
    if labels.ndim != 1:
        raise MetricInputError(f"{name} has shape {labels.shape}, expected a 1-D array")
    binary = (labels == 0) | (labels == 1)
    if not binary.all():
        raise MetricInputError(f"{name} holds {_show(labels[~binary][0])}, expected labels 0 or 1")
    return labels.astype(np.int8)


def _as_scores(y_score, num: int | None, name: str = "y_score") -> np.ndarray:
    """(num,) float64 finite scores (``num`` None: any length)."""
    scores = np.asarray(y_score, dtype=np.float64)
    if scores.ndim != 1:
        raise MetricInputError(f"{name} has shape {scores.shape}, expected a 1-D array")
    if num is not None and len(scores) != num:
        raise MetricInputError(f"{name} has shape {scores.shape}, expected ({num},)")
    if not np.isfinite(scores).all():
        bad = scores[~np.isfinite(scores)][0]
        raise MetricInputError(f"{name} holds {_show(bad)}, expected finite scores")
    return scores


def _labels_and_scores(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    labels = _as_labels(y_true)
    if labels.size == 0:
        raise MetricInputError("y_true is empty, expected at least one candidate")
    return labels, _as_scores(y_score, len(labels))


def _mind_order(scores: np.ndarray) -> np.ndarray:
    """Candidate indices best first; among ties the later candidate first (see module doc)."""
    return np.argsort(scores, kind="stable")[::-1]


def impression_auc_score(y_true, y_score) -> float:
    """ROC AUC of one impression (MIND's per-impression AUC).

    Args:
        y_true: (n,) labels, 1 clicked and 0 not clicked.
        y_score: (n,) scores, higher means more likely clicked.

    Returns:
        The probability that a clicked candidate outscores a non-clicked one, ties counting 1/2.

    Raises:
        MetricInputError: shapes differ, labels are not 0/1, scores are not finite, or the
            impression holds only one class.
    """
    labels, scores = _labels_and_scores(y_true, y_score)
    num_pos = int(labels.sum())
    num_neg = len(labels) - num_pos
    if num_pos == 0 or num_neg == 0:
        raise MetricInputError(
            f"impression AUC is undefined: {num_pos} clicked and {num_neg} non-clicked candidates, "
            "expected both classes"
        )
    ranks = _midranks(scores)
    return float((ranks[labels == 1].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ascending ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def mrr_score(y_true, y_score) -> float:
    """MIND's mean reciprocal rank of one impression.

    Args:
        y_true: (n,) labels, 1 clicked and 0 not clicked.
        y_score: (n,) scores.

    Returns:
        ``sum(1 / position of each clicked candidate) / number clicked``, positions 1-based in
        MIND's order (ties: later candidate first).

    Raises:
        MetricInputError: bad shapes or values, or no clicked candidate.
    """
    labels, scores = _labels_and_scores(y_true, y_score)
    if labels.sum() == 0:
        raise MetricInputError("MRR is undefined: no clicked candidate, expected at least one label 1")
    ordered = labels[_mind_order(scores)]
    return float(np.sum(ordered / np.arange(1, len(ordered) + 1)) / ordered.sum())


def dcg_score(y_true, y_score, *, k: int = 10) -> float:
    """Discounted cumulative gain over the first ``k`` positions of MIND's order.

    Args:
        y_true: (n,) labels, 1 clicked and 0 not clicked.
        y_score: (n,) scores.
        k: positions counted; an impression shorter than ``k`` counts all its candidates.

    Returns:
        ``sum over positions p <= k of (2**y_p - 1) / log2(p + 1)``.

    Raises:
        MetricInputError: bad shapes or values, or ``k < 1``.
    """
    labels, scores = _labels_and_scores(y_true, y_score)
    _check_k(k)
    top = labels[_mind_order(scores)][:k]
    return float(np.sum((2.0**top - 1) / np.log2(np.arange(len(top)) + 2)))


def ndcg_score(y_true, y_score, *, k: int = 10) -> float:
    """Normalised DCG@k of one impression: DCG of the scores' order over DCG of the ideal order.

    Args:
        y_true: (n,) labels, 1 clicked and 0 not clicked.
        y_score: (n,) scores.
        k: cut-off.

    Returns:
        A value in [0, 1].

    Raises:
        MetricInputError: bad shapes or values, ``k < 1``, or no clicked candidate.
    """
    labels, _ = _labels_and_scores(y_true, y_score)
    if labels.sum() == 0:
        raise MetricInputError("nDCG is undefined: no clicked candidate, expected at least one label 1")
    return dcg_score(y_true, y_score, k=k) / dcg_score(y_true, labels, k=k)


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise MetricInputError(f"k is {_show(k)}, expected an integer >= 1")


def ranks_from_scores(scores) -> np.ndarray:
    """MIND prediction-file ranks of one impression's candidates.

    Args:
        scores: (n,) scores in candidate order.

    Returns:
        (n,) int64 ranks, 1-based, rank 1 for the highest score; tied scores are ranked in
        candidate order (the earlier candidate gets the better rank), so ranks are distinct.

    Raises:
        MetricInputError: scores not 1-D or not finite.
    """
    values = _as_scores(scores, None, "scores")
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[np.argsort(-values, kind="stable")] = np.arange(1, len(values) + 1)
    return ranks


def scores_from_ranks(ranks) -> np.ndarray:
    """Scores the MIND scorer derives from prediction-file ranks: ``1 / rank``.

    Args:
        ranks: (n,) integer ranks >= 1 (repeats allowed, as the MIND scorer allows them;
            tied scores are then ordered by this module's rule, not NumPy's default sort).

    Returns:
        (n,) float64 scores in (0, 1].

    Raises:
        MetricInputError: a rank that is not an integer >= 1.
    """
    values = np.asarray(ranks)
    if values.ndim != 1:
        raise MetricInputError(f"ranks have shape {values.shape}, expected a 1-D array")
    if values.size == 0:
        return np.zeros(0, dtype=np.float64)
    if values.dtype.kind not in "iuf":
        raise MetricInputError(f"ranks hold {_show(values[0])}, expected integers >= 1")
    as_float = values.astype(np.float64)
    bad = ~np.isfinite(as_float) | (as_float < 1) | (as_float != np.floor(as_float))
    if bad.any():
        raise MetricInputError(f"ranks hold {_show(values[bad][0])}, expected integers >= 1")
    return 1.0 / as_float


def _check_offsets(offsets, num_items: int) -> np.ndarray:
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or len(offsets) < 1:
        raise MetricInputError(f"offsets have shape {offsets.shape}, expected (m + 1,) CSR offsets")
    if offsets[0] != 0 or offsets[-1] != num_items:
        raise MetricInputError(
            f"offsets run from {offsets[0]} to {offsets[-1]}, expected 0 to {num_items} (the number of candidates)"
        )
    lengths = np.diff(offsets)
    if np.any(lengths < 1):
        bad = int(np.flatnonzero(lengths < 1)[0])
        raise MetricInputError(f"impression {bad} has {lengths[bad]} candidates, expected at least 1")
    return offsets


def _segment_order(values: np.ndarray, segment: np.ndarray, *, later_first: bool) -> np.ndarray:
    """Candidates ordered by segment, then score descending, ties by candidate order.

    Among tied scores the earlier candidate comes first, or the later one with ``later_first``
    (MIND's order). Same result as ``np.lexsort`` on (candidate index, -score, segment) but
    about three times faster: one stable sort of the scores gives every candidate a distinct
    global place, and one integer sort by ``segment * c + place`` groups them by segment.
    """
    c = len(values)
    if later_first:
        descending = (c - 1) - np.argsort(-values[::-1], kind="stable")
    else:
        descending = np.argsort(-values, kind="stable")
    place = np.empty(c, dtype=np.int64)
    place[descending] = np.arange(c)
    return np.argsort(segment.astype(np.int64) * c + place)


def batch_ranks_from_scores(scores, offsets) -> np.ndarray:
    """``ranks_from_scores`` for many impressions at once.

    Args:
        scores: (c,) scores of all candidates, impression after impression.
        offsets: (m + 1,) CSR offsets; impression ``i`` owns ``scores[offsets[i]:offsets[i+1]]``.

    Returns:
        (c,) int64 ranks within each impression (1-based, ties in candidate order).

    Raises:
        MetricInputError: bad offsets or non-finite scores.
    """
    values = _as_scores(scores, None, "scores")
    offsets = _check_offsets(offsets, len(values))
    segment = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    order = _segment_order(values, segment, later_first=False)
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[order] = np.arange(len(values)) - offsets[segment[order]] + 1
    return ranks


def batch_impression_scores(labels, scores, offsets) -> dict[str, np.ndarray]:
    """Per-impression AUC, MRR, nDCG@5 and nDCG@10 of many impressions, vectorised.

    Gives the same values as ``impression_auc_score``, ``mrr_score`` and ``ndcg_score`` applied
    impression by impression, with the same tie rules.

    Args:
        labels: (c,) 0/1 labels of all candidates, impression after impression.
        scores: (c,) scores.
        offsets: (m + 1,) CSR offsets of the impressions.

    Returns:
        A dict of (m,) arrays: ``impression_auc``, ``mrr``, ``ndcg@5``, ``ndcg@10`` (float64,
        NaN for single-class impressions), ``scored`` (bool, both classes present),
        ``num_clicked`` and ``num_candidates`` (int64).

    Raises:
        MetricInputError: bad offsets, labels or scores.
    """
    labels = _as_labels(labels, "labels")
    values = _as_scores(scores, len(labels), "scores")
    offsets = _check_offsets(offsets, len(labels))
    lengths = np.diff(offsets)
    segment = np.repeat(np.arange(len(lengths)), lengths)

    # MIND order: best first, later candidate first among ties.
    order = _segment_order(values, segment, later_first=True)
    seg_sorted = segment[order]
    position = np.arange(len(values)) - offsets[seg_sorted]  # 0-based within the impression

    # Tie groups of equal score within an impression share their midrank (for AUC). A group
    # spanning positions [a, b) has ascending ranks L - a .. L - b + 1, mean L - (a + b - 1) / 2.
    sorted_values = values[order]
    new_group = np.r_[True, (seg_sorted[1:] != seg_sorted[:-1]) | (sorted_values[1:] != sorted_values[:-1])]
    group_start = np.flatnonzero(new_group)
    group_size = np.diff(np.r_[group_start, len(values)])
    mid_position = position[group_start] + (group_size - 1) / 2.0
    ascending_rank = lengths[seg_sorted] - np.repeat(mid_position, group_size)
    return segment_metrics(seg_sorted, labels[order], position, ascending_rank, lengths)


def segment_metrics(
    segment: np.ndarray, labels: np.ndarray, position: np.ndarray, ascending_rank: np.ndarray, lengths: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-segment metrics from each candidate's place in its segment (no sorting needed).

    Args:
        segment: (c,) segment (impression) of each candidate, any order.
        labels: (c,) int 0/1 labels.
        position: (c,) 0-based position in MIND's order within the segment (best first).
        ascending_rank: (c,) 1-based ascending rank within the segment, tied scores sharing
            their mean rank (for AUC).
        lengths: (m,) candidates per segment.

    Returns:
        As ``batch_impression_scores``.
    """
    num_segments = len(lengths)
    clicked = labels == 1
    num_pos = np.bincount(segment, weights=clicked, minlength=num_segments).astype(np.int64)
    num_neg = lengths - num_pos
    scored = (num_pos > 0) & (num_neg > 0)
    pos_seg = segment[clicked]
    pos_position = position[clicked]
    rr = np.bincount(pos_seg, weights=1.0 / (pos_position + 1), minlength=num_segments)
    rank_sum = np.bincount(pos_seg, weights=ascending_rank[clicked], minlength=num_segments)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {
            "impression_auc": (rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg),
            "mrr": rr / num_pos,
        }
    for k in (5, 10):
        in_top = pos_position < k
        dcg = np.bincount(pos_seg[in_top], weights=1.0 / np.log2(pos_position[in_top] + 2), minlength=num_segments)
        ideal = _ideal_dcg_table(k)[np.minimum(num_pos, k)]
        with np.errstate(divide="ignore", invalid="ignore"):
            out[f"ndcg@{k}"] = dcg / ideal
    for name in METRIC_NAMES:
        out[name] = np.where(scored, out[name], np.nan)
    out["scored"] = scored
    out["num_clicked"] = num_pos
    out["num_candidates"] = np.asarray(lengths, dtype=np.int64)
    return out


def _ideal_dcg_table(max_clicked: int) -> np.ndarray:
    """(max_clicked + 1,) DCG of ``j`` clicked candidates placed first, for j = 0..max_clicked."""
    return np.r_[0.0, np.cumsum(1.0 / np.log2(np.arange(max_clicked) + 2))]


def mind_scores(labels_list: Iterable[Sequence[int]], scores_list: Iterable[Sequence[float]]) -> dict:
    """Average per-impression metrics over impressions, as the MIND scorer does.

    Args:
        labels_list: per impression, the 0/1 labels in candidate order. An empty list or all
            labels -1 marks an unlabelled (masked) impression, which is counted and skipped.
        scores_list: per impression, the scores in the same order (for a prediction file, pass
            ``scores_from_ranks(ranks)`` to reproduce the scorer; exactly
            when the ranks of an impression are distinct, as a prediction file's are: for repeated
            ranks the scorer's order depends on NumPy's default sort, this module's is fixed). Nothing here sees
            impression ids: the caller must pair each prediction line with the labels of the
            same impression (``read_predictions`` yields the ids), as the MIND scorer refuses
            a file whose ids are out of step.

    Returns:
        ``{"impression_auc", "mrr", "ndcg@5", "ndcg@10"}`` means over scored impressions (None if
        none was scored), plus ``num_impressions``, ``num_scored``, ``num_single_class`` and
        ``num_unlabelled``.

    Raises:
        MetricInputError: the two lists differ in length, or an impression's labels and scores
            differ in length or hold bad values.
    """
    label_parts, score_parts, lengths = [], [], []
    num_impressions = num_unlabelled = 0
    labels_iter, scores_iter = iter(labels_list), iter(scores_list)
    sentinel = object()
    while True:
        labels, scores = next(labels_iter, sentinel), next(scores_iter, sentinel)
        if labels is sentinel and scores is sentinel:
            break
        if labels is sentinel or scores is sentinel:
            raise MetricInputError(
                f"labels_list and scores_list differ in length after {num_impressions} impressions, "
                "expected one score list per label list"
            )
        num_impressions += 1
        labels = np.asarray(labels)
        if labels.size == 0 or (labels == -1).all():
            num_unlabelled += 1
            continue
        try:
            checked = _as_labels(labels, "labels")
            label_parts.append(checked)
            score_parts.append(_as_scores(scores, len(checked), "scores"))
        except MetricInputError as err:
            raise MetricInputError(f"impression {num_impressions - 1}: {err}") from None
        lengths.append(len(checked))

    result = {name: None for name in METRIC_NAMES}
    num_scored = 0
    if lengths:
        offsets = np.r_[0, np.cumsum(lengths)]
        per = batch_impression_scores(np.concatenate(label_parts), np.concatenate(score_parts), offsets)
        num_scored = int(per["scored"].sum())
        if num_scored:
            result = {name: float(np.mean(per[name][per["scored"]])) for name in METRIC_NAMES}
    result.update(
        num_impressions=num_impressions,
        num_scored=num_scored,
        num_single_class=len(lengths) - num_scored,
        num_unlabelled=num_unlabelled,
    )
    return result
