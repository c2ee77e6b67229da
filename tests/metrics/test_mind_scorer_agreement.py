"""The numbers reported for a prediction file equal what the MIND competition scorer gives for it."""

import numpy as np
import pytest

import mind_reference
from recsys.evaluation.prediction_file import read_predictions, write_predictions
from recsys.metrics.accumulator import ImpressionMetrics
from recsys.metrics.ranking import mind_scores, scores_from_ranks


@pytest.fixture
def files(tmp_path):
    """A truth file (labels, some masked) and a prediction file written from model scores."""
    rng = np.random.default_rng(11)
    truth, rows, scores_of = [], [], []
    for i in range(400):
        n = int(rng.integers(2, 60))
        labels = (rng.random(n) < 0.1).astype(int)
        labels[rng.integers(0, n)] = 1
        labels[(np.flatnonzero(labels == 1)[0] + 1) % n] = 0
        masked = i % 25 == 3
        scores = np.round(rng.random(n) + 0.3 * labels, 2)  # rounding makes ties
        truth.append(f"{i + 1} []" if masked else f"{i + 1} [{','.join(map(str, labels))}]")
        rows.append((i + 1, scores))
        scores_of.append((None if masked else labels, scores))
    truth_path = tmp_path / "truth.txt"
    truth_path.write_text("\n".join(truth) + "\n")
    prediction_path = tmp_path / "prediction.txt"
    assert write_predictions(prediction_path, rows) == 400
    return truth_path, prediction_path, scores_of


def test_mind_scores_on_read_predictions_equal_the_scorer(files):
    truth_path, prediction_path, scores_of = files
    expected = mind_reference.scoring(truth_path.read_text().splitlines(True), prediction_path.read_text().splitlines(True))
    labels = [[] if y is None else y for y, _ in scores_of]
    result = mind_scores(labels, [scores_from_ranks(ranks) for _, ranks in read_predictions(prediction_path)])
    got = (result["impression_auc"], result["mrr"], result["ndcg@5"], result["ndcg@10"])
    assert got == pytest.approx(expected, abs=1e-12)
    assert result["num_unlabelled"] == 16


def test_accumulator_on_model_scores_equals_the_scorer_on_the_written_file(files):
    truth_path, prediction_path, scores_of = files
    expected = mind_reference.scoring(truth_path.read_text().splitlines(True), prediction_path.read_text().splitlines(True))
    acc = ImpressionMetrics(["model"], num_resamples=10)
    for labels, scores in scores_of:
        acc.add(np.full(len(scores), -1) if labels is None else labels, {"model": scores})
    metrics = acc.result()["models"]["model"]["metrics"]
    got = tuple(metrics[m]["value"] for m in ("impression_auc", "mrr", "ndcg@5", "ndcg@10"))
    assert got == pytest.approx(expected, abs=1e-12)
