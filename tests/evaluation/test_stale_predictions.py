"""Which prediction files ``evaluate`` removes from a folder that held an earlier report."""

import json
from pathlib import Path

import pytest

from recsys.pipelines.evaluate import earlier_prediction_files


def _folder(tmp_path: Path, versions, files) -> Path:
    out = tmp_path / "r10"
    out.mkdir()
    if versions is not None:
        (out / "metrics.json").write_text(json.dumps({"schema_version": 1, "header": {"model_versions": versions}, "models": {}}))
    for name in files:
        (out / name).write_text("1 [1,2]\n")
    return out


def test_only_the_earlier_reports_own_prediction_files_are_named(tmp_path):
    # The hunter's folder: the earlier report of v1 and v2, and a file of the user's own.
    out = _folder(tmp_path, ["v1", "v2"], ["prediction-v1.txt", "prediction-v2.txt", "prediction-mine.txt",
                                           "prediction-v3.txt"])
    # This run writes v1 again: only v2's file is the earlier report's and not this one's.
    assert earlier_prediction_files(out, keep=[out / "prediction-v1.txt"]) == [out / "prediction-v2.txt"]


@pytest.mark.parametrize("metrics", [None, "not json {", json.dumps([1, 2]), json.dumps({"header": {"model_versions": "v2"}})])
def test_without_a_readable_earlier_report_nothing_is_named(tmp_path, metrics):
    out = _folder(tmp_path, None, ["prediction-v2.txt", "prediction-mine.txt"])
    if metrics is not None:
        (out / "metrics.json").write_text(metrics)
    assert earlier_prediction_files(out, keep=[]) == []


def test_a_version_that_is_not_one_file_name_names_nothing(tmp_path):
    # A hand-edited metrics.json must not reach a file outside the folder.
    out = _folder(tmp_path, ["../x", "v2"], ["prediction-v2.txt"])
    (tmp_path / "prediction-..").mkdir()
    (tmp_path / "prediction-..").joinpath("x.txt").write_text("keep")
    assert earlier_prediction_files(out, keep=[]) == [out / "prediction-v2.txt"]


def test_an_interrupted_runs_prediction_files_are_named_by_the_stores_versions(tmp_path):
    # A run stopped after writing its prediction files (during the bootstrap) left v3's beside
    # the older metrics.json, which lists v1 only: no later run removed it. The store knows v3.
    out = _folder(tmp_path, ["v1"], ["prediction-v1.txt", "prediction-v3.txt", "prediction-mine.txt"])
    assert earlier_prediction_files(out, keep=[out / "prediction-v1.txt"], known_versions=["v1", "v3"]) == [
        out / "prediction-v3.txt"]
    (out / "metrics.json").unlink()  # even with no earlier report left
    assert earlier_prediction_files(out, keep=[], known_versions=["v3"]) == [out / "prediction-v3.txt"]
