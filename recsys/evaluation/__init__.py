"""Offline evaluation: MIND prediction files, the HTML/JSON report, and report comparison."""

from recsys.evaluation.compare import (
    ComparisonRow,
    compare_files,
    compare_metrics,
    format_comparison,
    load_metrics,
    print_comparison,
)
from recsys.evaluation.prediction_file import PredictionError, read_predictions, write_predictions
from recsys.evaluation.report import ReportError, beyond_accuracy, build_result, write_report

__all__ = [
    "ComparisonRow",
    "PredictionError",
    "ReportError",
    "beyond_accuracy",
    "build_result",
    "compare_files",
    "compare_metrics",
    "format_comparison",
    "load_metrics",
    "print_comparison",
    "read_predictions",
    "write_predictions",
    "write_report",
]
