"""The beyond-accuracy section names the nightly run it describes, and says when that run's
model is not one of the evaluated ones."""

import copy
from datetime import datetime
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from recsys.columns import CATEGORY
from recsys.evaluation.report import write_report
from recsys.pipelines import evaluate as evaluate_module
from recsys.pipelines.evaluate import describe_run
from recsys.ranking.runs import RunInfo


def _run(model_version, plan_as_of=None):
    counts = {"plan": {"as_of": plan_as_of}} if plan_as_of else {}
    return RunInfo(run_id=7, kind="nightly", status="complete", started_at=datetime(2019, 11, 15, 3, 0),
                   finished_at=datetime(2019, 11, 15, 3, 20), model_version=model_version, counts=counts,
                   timings={}, message=None)


def test_the_run_is_named_with_its_version_and_as_of_time():
    assert describe_run(_run("v1", "2019-11-14T23:59:59"), ["v1", "v2"]) == {
        "run_id": 7, "model_version": "v1", "as_of": "2019-11-14T23:59:59", "model_version_evaluated": True}
    # Without an as-of time in its plan, the run's start stands for it (as novelty reads it).
    assert describe_run(_run("v0"), ["v1"]) == {
        "run_id": 7, "model_version": "v0", "as_of": "2019-11-15T03:00:00", "model_version_evaluated": False}


@pytest.mark.parametrize(("version", "evaluated"), [("v1", True), ("v0", False)])
def test_the_caption_names_the_run_and_warns_of_another_model(tmp_path, synthetic_result, version, evaluated):
    result = copy.deepcopy(synthetic_result)
    result["beyond_accuracy"] |= {"run_id": 7, "model_version": version, "as_of": "2019-11-14T23:59:59",
                                  "model_version_evaluated": evaluated}
    _, html_path = write_report(result, tmp_path)
    html = html_path.read_text()
    assert "Recommendation lists of the latest nightly run: run 7, model version " + version + ", as of 2019-11-14T23:59:59." in html
    note = "Its model version is not among the evaluated ones (v1, v2): these lists are not those of the models above."
    assert (note in html) == (not evaluated)


def test_new_articles_are_those_first_seen_in_the_day_before_the_runs_as_of_time(monkeypatch):
    # As of 2019-11-15 12:00, "new" reaches back to 2019-11-14 12:00 (included): N1, seen 12 h
    # before the as-of time, and N3, seen exactly a day before, are new; N2, two days before, is not.
    from recsys.ranking import runs

    def recommendations(engine, run_id):
        yield pd.DataFrame({"user_id": ["U1", "U1", "U1"], "rank": [1, 2, 3], "news_id": ["N1", "N2", "N3"]})

    monkeypatch.setattr(runs, "latest_run", lambda engine: _run("v1", "2019-11-15T12:00:00"))
    monkeypatch.setattr(evaluate_module.repo, "iter_run_recommendations", recommendations)
    catalogue = SimpleNamespace(
        features=SimpleNamespace(news_ids=np.array(["N1", "N2", "N3"])), stored=None,
        first_seen=np.array(["2019-11-15T00:00", "2019-11-13T12:00", "2019-11-14T12:00"], dtype="datetime64[ns]"),
        news=pd.DataFrame({CATEGORY: ["news", "news", "sports"]}),
    )
    out = evaluate_module._beyond_accuracy(None, catalogue, np.zeros(3), evaluated=["v1"])
    assert out["new_since"] == "2019-11-14T12:00:00+00:00"
    assert out["novelty"] == pytest.approx(2 / 3)
