"""Impressions helpers, the interaction log and the synthetic world."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.models.samples import (
    Impressions,
    InteractionLog,
    candidate_impression_rows,
    first_shown,
    gather_csr,
    select_impressions,
)

T0 = np.datetime64("2019-11-10T00:00:00", "s")


def _impressions() -> Impressions:
    return Impressions(
        impression_ids=np.array([1, 2, 3]),
        user_ids=np.array(["a", "b", "c"], dtype=object),
        times=np.array([T0, T0 + np.timedelta64(5, "h"), T0 + np.timedelta64(2, "h")]),
        history_offsets=np.array([0, 2, 2, 3]),
        history_items=np.array([4, 1, 0], dtype=np.int32),
        candidate_offsets=np.array([0, 2, 5, 6]),
        candidate_items=np.array([0, 1, 1, 2, 3, 1], dtype=np.int32),
        labels=np.array([1, 0, 0, 1, -1, 1], dtype=np.int8),
    )


def test_gather_csr_matches_a_loop():
    offsets = np.array([0, 3, 3, 5, 9])
    flat = np.arange(9) * 10
    rows = np.array([3, 1, 0, 3])
    new_offsets, new_flat = gather_csr(offsets, flat, rows)
    expected = [flat[offsets[r]:offsets[r + 1]] for r in rows]
    np.testing.assert_array_equal(new_offsets, np.concatenate([[0], np.cumsum([len(e) for e in expected])]))
    np.testing.assert_array_equal(new_flat, np.concatenate(expected))


def test_select_impressions_keeps_rows_aligned():
    imps = _impressions()
    sub = select_impressions(imps, np.array([2, 0]))
    assert list(sub.impression_ids) == [3, 1]
    np.testing.assert_array_equal(sub.history(0), [0])
    np.testing.assert_array_equal(sub.candidates(1), [0, 1])
    np.testing.assert_array_equal(sub.candidate_labels(1), [1, 0])
    masked = select_impressions(imps, np.array([False, True, False]))
    np.testing.assert_array_equal(masked.candidates(0), [1, 2, 3])
    np.testing.assert_array_equal(candidate_impression_rows(imps), [0, 0, 1, 1, 1, 2])


def test_log_from_impressions_skips_unlabelled_and_sorts():
    log = InteractionLog.from_impressions([_impressions()], 5)
    assert len(log) == 5  # the -1 candidate is not an event
    np.testing.assert_array_equal(log.item_rows, [0, 1, 1, 1, 2])
    # item 1: shown at 00:00 (0), at 02:00 (1), at 05:00 (0) -> time-sorted within the item
    np.testing.assert_array_equal(log.clicks[1:4], [0, 1, 0])
    assert list(log.times[1:4]) == [T0, T0 + np.timedelta64(2, "h"), T0 + np.timedelta64(5, "h")]


def test_first_shown_reads_shows_not_labels():
    first = first_shown([_impressions()], 5)
    assert first[1] == T0 and first[3] == T0 + np.timedelta64(5, "h")  # item 3 is unlabelled but shown
    assert np.isnat(first[4])  # only in a history, never shown


def test_log_errors_name_the_problem():
    with pytest.raises(ValueError, match="event 1 has item row 7, expected 0 <= row < 3"):
        InteractionLog.from_events(np.array([0, 7]), np.array([T0, T0]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="event 0 has time NaT"):
        InteractionLog.from_events(np.array([0]), np.array(["NaT"], dtype="datetime64[s]"), np.array([0]), 3)
    with pytest.raises(ValueError, match="not sorted by"):
        InteractionLog(3, np.array([1, 0], np.int32), np.array([T0, T0]), np.array([0, 0], np.int8))
    with pytest.raises(ValueError, match="differ in length"):
        InteractionLog(3, np.array([1], np.int32), np.array([T0, T0]), np.array([0, 0], np.int8))


def test_synthetic_world_invariants(world):
    fresh = set(world.fresh_items.tolist())
    for window in (world.train, world.valid):
        assert not fresh & set(window.candidate_items.tolist())
        assert not fresh & set(window.history_items.tolist())
    share = np.isin(world.test.candidate_items, world.fresh_items).mean()
    assert 0.4 < share <= 0.5
    assert world.train.times.max() < world.valid.times.min() <= world.valid.times.max() < world.test.times.min()
    assert 0.03 < world.train.labels.mean() < 0.3
    assert (~world.features.has_image).mean() == pytest.approx(0.1, abs=0.05)
    assert len(world.test_probabilities) == len(world.test.candidate_items)
    for imps in (world.train, world.test):  # no candidate twice in an impression
        owner = candidate_impression_rows(imps)
        assert len(np.unique(owner * len(world.features) + imps.candidate_items)) == len(owner)
