"""The file-exposure calibration: its design matrix, its fit and its saved form."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.models import exposure
from recsys.models.exposure import FEATURES, ExposureCalibration, exposure_design, fit_exposure_calibration


def test_design_reads_the_files_evidence_apart_for_fresh_and_seen_articles():
    x = exposure_design(np.array([0.5, -1.0]), np.array([3, 7]), np.array([2.0, 9.0]), np.array([True, False]))
    expected = [[0.5, np.log(4), np.log(3), 1.0, 0.0],
                [-1.0, 0.0, 0.0, 0.0, np.log(8)]]
    np.testing.assert_allclose(x, expected)
    assert x.shape[1] == len(FEATURES)


def test_calibrated_logits_are_the_weighted_design_plus_intercept_and_survive_a_round_trip():
    cal = ExposureCalibration((0.4, 0.5, -0.7, 0.1, 0.2), -2.0)
    logits, counts, hours, fresh = np.array([1.0]), np.array([1]), np.array([3.0]), np.array([True])
    by_hand = -2.0 + 0.4 * 1.0 + 0.5 * np.log(2) - 0.7 * np.log(4) + 0.1
    np.testing.assert_allclose(cal.logits(logits, counts, hours, fresh), [by_hand])
    assert ExposureCalibration.from_dict(cal.to_dict()) == cal
    windowed = ExposureCalibration(cal.weights, cal.intercept, 23.5)
    assert windowed.to_dict()["window_hours"] == 23.5 and ExposureCalibration.from_dict(windowed.to_dict()) == windowed
    # saved before the window existed: every earlier show is read, as then
    assert "window_hours" not in cal.to_dict() and ExposureCalibration.from_dict(cal.to_dict()).window_hours is None


@pytest.mark.parametrize("saved, message", [
    ({"weights": [1, 2, 3, 4, 5], "intercept": 0.0, "window_hours": 0}, "window_hours is 0.0, expected a finite number"),
    ({"weights": [1, 2, 3, 4, 5], "intercept": 0.0, "window_hours": float("inf")}, "window_hours is inf"),
    ({"weights": [1, 2, 3, 4, 5], "intercept": 0.0, "window_hours": "a day"}, "window_hours is 'a day', expected a number"),
    ({"weights": [1, 2, 3], "intercept": 0.0}, "expected 5 finite weights"),
    ({"weights": [1, 2, 3, float("nan"), 5], "intercept": 0.0}, "expected 5 finite weights"),
    ({"weights": [1, 2, 3, 4, 5], "intercept": float("inf")}, "finite intercept"),
    ({"features": ["logit", "shows"], "weights": [1, 2], "intercept": 0.0}, "expected \\['logit'"),
])
def test_a_bad_saved_calibration_is_refused(saved, message):
    with pytest.raises(ValueError, match=message):
        ExposureCalibration.from_dict(saved)


def _sample(rng, n, weights, intercept):
    logits = rng.normal(0, 1, n)
    counts = rng.integers(0, 30, n)
    hours = rng.uniform(0, 20, n) * (counts > 0)
    fresh = rng.random(n) < 0.5
    z = exposure_design(logits, counts, hours, fresh) @ np.array(weights) + intercept
    labels = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.int8)
    return logits, counts, hours, fresh, labels


def test_the_fit_recovers_the_weights_that_drew_the_clicks():
    true = (0.8, 0.6, -0.9, 0.3, 0.2)
    logits, counts, hours, fresh, labels = _sample(np.random.default_rng(0), 60_000, true, -2.0)
    owner = np.arange(len(labels)) // 20
    cal = fit_exposure_calibration(logits, counts, hours, fresh, labels, owner, window_hours=20.0)
    assert cal.window_hours == 20.0
    # the fresh flag and the intercept trade off against each other: checked loosely, and through
    # the probabilities they give together
    np.testing.assert_allclose(np.array(cal.weights)[[0, 1, 2, 4]], np.array(true)[[0, 1, 2, 4]], atol=0.12)
    assert cal.weights[3] == pytest.approx(true[3], abs=0.3) and cal.intercept == pytest.approx(-2.0, abs=0.3)
    z = exposure_design(logits, counts, hours, fresh) @ np.array(true) - 2.0
    fitted = 1 / (1 + np.exp(-cal.logits(logits, counts, hours, fresh)))
    assert np.abs(fitted - 1 / (1 + np.exp(-z))).mean() < 0.01


def test_a_large_window_is_fitted_on_whole_impressions_of_a_seeded_sample(monkeypatch):
    logits, counts, hours, fresh, labels = _sample(np.random.default_rng(1), 4_000, (1.0, 0.5, -0.5, 0.0, 0.3), -1.0)
    owner = np.arange(len(labels)) // 10
    seen = []
    real = exposure.exposure_design

    def spy(l, c, h, f):
        seen.append(l.copy())
        return real(l, c, h, f)

    monkeypatch.setattr(exposure, "MAX_FIT_ROWS", 1_000)
    monkeypatch.setattr(exposure, "exposure_design", spy)
    first = fit_exposure_calibration(logits, counts, hours, fresh, labels, owner, seed=3)
    again = fit_exposure_calibration(logits, counts, hours, fresh, labels, owner, seed=3)
    assert first == again
    rows = np.flatnonzero(np.isin(logits, seen[0]))
    assert 500 < len(rows) < 1_600  # about a quarter of the 4,000 candidates
    kept = np.unique(owner[rows])
    assert np.isin(owner, kept).sum() == len(rows)  # every candidate of a kept impression


def test_a_single_class_window_is_refused():
    with pytest.raises(ValueError, match="clicks and non-clicks"):
        fit_exposure_calibration(np.zeros(4), np.zeros(4), np.zeros(4), np.zeros(4, bool), np.zeros(4), np.arange(4))


def test_fresh_as_of_a_store_end_is_what_the_store_never_held():
    # A store ending at ``end`` holds [its first time, end): an article first seen one second
    # before holds a place in it, one first seen at ``end`` (the window that follows) does not.
    end = np.datetime64("2019-11-15T00:00:00", "s")
    first_seen = np.array([end - np.timedelta64(1, "s"), end, np.datetime64("NaT")], dtype="datetime64[s]")
    fresh, times = exposure.fresh_as_of(first_seen, end)
    assert fresh.tolist() == [False, True, True]
    assert times[0] == first_seen[0] and np.isnat(times[1:]).all()  # fresh ones read as never seen (age 0)
    # A store without an end: only never-seen articles are fresh.
    fresh, times = exposure.fresh_as_of(first_seen, None)
    assert fresh.tolist() == [False, False, True] and times[1] == end
