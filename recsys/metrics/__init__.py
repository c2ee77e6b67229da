"""MIND ranking metrics, pooled classification metrics, calibration and bootstrap intervals.

Names follow scikit-learn: ``*_score`` is higher-is-better, ``*_loss`` lower-is-better; data
arguments come first and options are keyword-only.
"""

from recsys.metrics.accumulator import (
    ARTICLE_AGE_ORDER,
    NEW_TO_STORE,
    HIGHER_IS_BETTER,
    HISTORY_LENGTH_ORDER,
    METRICS,
    ImpressionMetrics,
    article_age_bucket,
    article_age_buckets,
    history_length_bucket,
)
from recsys.metrics.bootstrap import (
    ConfidenceInterval,
    bootstrap_ci,
    bootstrap_ratio_ci,
    pooled_auc_ci,
    pooled_auc_influence,
)
from recsys.metrics.calibration import ReliabilityCurve, expected_calibration_error, reliability_curve
from recsys.metrics.classification import auc_score, log_loss
from recsys.metrics.ranking import (
    MetricInputError,
    batch_impression_scores,
    batch_ranks_from_scores,
    dcg_score,
    impression_auc_score,
    mind_scores,
    mrr_score,
    ndcg_score,
    ranks_from_scores,
    scores_from_ranks,
)

__all__ = [
    "ARTICLE_AGE_ORDER",
    "NEW_TO_STORE",
    "HIGHER_IS_BETTER",
    "HISTORY_LENGTH_ORDER",
    "METRICS",
    "ConfidenceInterval",
    "ImpressionMetrics",
    "MetricInputError",
    "ReliabilityCurve",
    "article_age_bucket",
    "article_age_buckets",
    "auc_score",
    "batch_impression_scores",
    "batch_ranks_from_scores",
    "bootstrap_ci",
    "bootstrap_ratio_ci",
    "dcg_score",
    "expected_calibration_error",
    "history_length_bucket",
    "impression_auc_score",
    "log_loss",
    "mind_scores",
    "mrr_score",
    "ndcg_score",
    "pooled_auc_ci",
    "pooled_auc_influence",
    "ranks_from_scores",
    "reliability_curve",
    "scores_from_ranks",
]
