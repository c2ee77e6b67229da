"""Impressions helpers, the interaction log and the synthetic world."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.data import interactions
from recsys.data.interactions import (
    ClickLog,
    Impressions,
    InteractionLog,
    candidate_impression_rows,
    concat_impressions,
    first_shown,
    gather_csr,
    select_impressions,
    with_logged_clicks,
    without_later_clicks,
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


def test_concat_impressions_undoes_a_split():
    imps = _impressions()
    parts = [select_impressions(imps, np.array([0])), select_impressions(imps, np.array([], dtype=np.int64)),
             select_impressions(imps, np.array([1, 2]))]
    joined = concat_impressions(parts)
    for name, value in imps.__dict__.items():
        np.testing.assert_array_equal(getattr(joined, name), value, err_msg=name)
    # a part after another: its rows follow, offsets shifted by the first part's lengths
    twice = concat_impressions([imps, imps])
    assert list(twice.impression_ids) == [1, 2, 3, 1, 2, 3]
    np.testing.assert_array_equal(twice.candidates(4), imps.candidates(1))
    np.testing.assert_array_equal(twice.history(3), imps.history(0))
    np.testing.assert_array_equal(twice.candidate_labels(5), imps.candidate_labels(2))
    with pytest.raises(ValueError, match="at least one part"):
        concat_impressions([])


def test_log_from_impressions_skips_unlabelled_and_sorts():
    log = InteractionLog.from_impressions([_impressions()], 5)
    assert len(log) == 5  # the -1 candidate is not an event
    np.testing.assert_array_equal(log.item_rows, [0, 1, 1, 1, 2])
    # item 1: shown at 00:00 (0), at 02:00 (1), at 05:00 (0) -> time-sorted within the item
    np.testing.assert_array_equal(log.clicks[1:4], [0, 1, 0])
    assert list(log.times[1:4]) == [T0, T0 + np.timedelta64(2, "h"), T0 + np.timedelta64(5, "h")]


def test_log_order_is_items_then_times_ties_in_arrival_order():
    rng = np.random.default_rng(3)
    n = 500
    items = rng.integers(0, 7, n)
    times = T0 + rng.integers(-3, 4, n).astype("timedelta64[h]").astype("timedelta64[s]")  # many ties
    clicks = rng.integers(0, 2, n)
    log = InteractionLog.from_events(items, times, clicks, 7)
    expected = sorted(range(n), key=lambda i: (items[i], times[i]))  # Python's sort is stable
    np.testing.assert_array_equal(log.item_rows, items[expected])
    np.testing.assert_array_equal(log.times, times[expected])
    np.testing.assert_array_equal(log.clicks, clicks[expected])
    assert log.item_rows.dtype == np.int32 and log.clicks.dtype == np.int8


def test_log_end_is_the_first_time_every_event_counts():
    log = InteractionLog.from_impressions([_impressions()], 5)
    assert log.end == T0 + np.timedelta64(5, "h") + np.timedelta64(1, "s")  # the last labelled show, +1 s
    items = np.arange(5)
    clicks, shows = log.window_counts(items, np.full(5, log.end), window=np.timedelta64(1, "D"))
    np.testing.assert_array_equal(shows, [1, 3, 1, 0, 0])  # every labelled show of _impressions
    np.testing.assert_array_equal(clicks, [1, 1, 1, 0, 0])
    _, before = log.window_counts(items, np.full(5, log.end - np.timedelta64(1, "s")), window=np.timedelta64(1, "D"))
    assert before.sum() == 3  # one second earlier the two shows at the last time do not count yet
    assert InteractionLog.from_events(np.zeros(0), np.zeros(0, "datetime64[s]"), np.zeros(0), 3).end is None


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


def _reference_logged_history(imps: Impressions, i: int, events: list[tuple], cap: int) -> list[int]:
    """The documented rule, written as a loop: clicks of the user strictly before the impression,
    newest first, then the History column; each article once; at most ``cap``."""
    mine = sorted((t, item) for user, t, item in events if user == imps.user_ids[i] and t < imps.times[i])
    merged = [item for _, item in reversed(mine)][:cap] + imps.history(i).tolist()
    out: list[int] = []
    for item in merged:
        if item not in out:
            out.append(item)
    return out[:cap]


@pytest.mark.parametrize("cap, chunk", [(1, None), (3, None), (50, None), (3, 7)])
def test_logged_clicks_lead_the_history_as_a_loop_would(world, cap, chunk, monkeypatch):
    if chunk:  # histories are rebuilt HISTORY_CHUNK impressions at a time
        monkeypatch.setattr(interactions, "HISTORY_CHUNK", chunk)
    clicks = ClickLog.from_impressions([world.train, world.valid])
    events = [(world.train.user_ids[r], world.train.times[r], int(item))
              for r, item, label in zip(candidate_impression_rows(world.train), world.train.candidate_items, world.train.labels)
              if label == 1]
    events += [(world.valid.user_ids[r], world.valid.times[r], int(item))
               for r, item, label in zip(candidate_impression_rows(world.valid), world.valid.candidate_items, world.valid.labels)
               if label == 1]
    assert len(clicks) == len(events)
    out = with_logged_clicks(world.valid, clicks, cap)
    changed = 0
    for i in range(len(world.valid)):
        expected = _reference_logged_history(world.valid, i, events, cap)
        assert out.history(i).tolist() == expected, i
        changed += expected[:1] != world.valid.history(i)[:1].tolist()
    assert changed > len(world.valid) // 2  # most validation users clicked in training impressions
    # Candidates and labels are untouched.
    np.testing.assert_array_equal(out.candidate_items, world.valid.candidate_items)
    np.testing.assert_array_equal(out.labels, world.valid.labels)


def test_logged_clicks_never_include_the_impression_itself():
    # User "a" clicks item 0 at T0 (impression 1); another impression of "a" at the same
    # second must not see it, a later one must, and user "c" has no logged click.
    imps = _impressions()
    clicks = ClickLog.from_events(np.array(["a", "a", "b"], dtype=object),
                                  np.array([T0, T0 - np.timedelta64(1, "h"), T0 + np.timedelta64(1, "h")]),
                                  np.array([0, 3, 2]))
    out = with_logged_clicks(imps, clicks, 10)
    assert out.history(0).tolist() == [3, 4, 1]  # the T0 click is not before T0; item 3 (an hour earlier) is
    assert out.history(1).tolist() == [2]  # b's click at T0+1h is before its impression at T0+5h
    assert out.history(2).tolist() == [0]  # c: no logged click, History unchanged
    later = Impressions(np.array([9]), np.array(["a"], dtype=object), np.array([T0 + np.timedelta64(1, "s")]),
                        np.array([0, 2]), np.array([0, 1], np.int32), np.array([0, 1]), np.array([2], np.int32),
                        np.array([0], np.int8))
    # A second later the T0 click leads; item 0 also in the History column appears once.
    assert with_logged_clicks(later, clicks, 10).history(0).tolist() == [0, 3, 1]
    empty = ClickLog.from_events(np.zeros(0, object), np.zeros(0, "datetime64[s]"), np.zeros(0, np.int64))
    np.testing.assert_array_equal(with_logged_clicks(imps, empty, 10).history_items, imps.history_items)


@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_histories_lose_the_articles_first_clicked_at_or_after_the_impression(chunk, monkeypatch):
    if chunk:
        monkeypatch.setattr(interactions, "HISTORY_CHUNK", chunk)
    # A later file's History, stored for the user, lists clicks of the training window: the
    # impression's own click (item 2 for "a" at T0 + 10h) must not be in its history.
    h = np.timedelta64(1, "h")
    imps = Impressions(
        impression_ids=np.array([1, 2, 3, 4]),
        user_ids=np.array(["a", "a", "b", "z"], dtype=object),
        times=np.array([T0 + 10 * h, T0 + 30 * h, T0 + 30 * h, T0]),
        history_offsets=np.array([0, 3, 5, 6, 7]),
        history_items=np.array([2, 1, 5, 2, 1, 2, 2], dtype=np.int32),
        candidate_offsets=np.array([0, 2, 3, 4, 5]),
        candidate_items=np.array([2, 3, 4, 0, 0], dtype=np.int32),
        labels=np.array([1, 0, 1, 1, 0], dtype=np.int8),
    )
    clicks = ClickLog.from_events(
        np.array(["a", "a", "a", "b"], dtype=object),
        np.array([T0 + 10 * h, T0 - 5 * h, T0 + 40 * h, T0 + 50 * h]),
        np.array([2, 5, 2, 2]),  # "a" clicks item 2 twice: the earliest click counts
    )
    out = without_later_clicks(imps, clicks)
    assert out.history(0).tolist() == [1, 5]  # 2 clicked at the impression's second; 5 before; 1 never logged
    assert out.history(1).tolist() == [2, 1]  # by T0 + 30h the click on 2 is history
    assert out.history(2).tolist() == []  # b clicks 2 only later
    assert out.history(3).tolist() == [2]  # z has no logged click
    np.testing.assert_array_equal(out.candidate_items, imps.candidate_items)
    # A loop over the entries, as a check of the vectorised lookup.
    first = {}
    for user, time, item in zip(["a", "a", "a", "b"], clicks.times, clicks.items):
        first[user, int(item)] = min(first.get((user, int(item)), time), time)
    for i in range(len(imps)):
        expected = [int(x) for x in imps.history(i) if not ((imps.user_ids[i], int(x)) in first and first[imps.user_ids[i], int(x)] >= imps.times[i])]
        assert out.history(i).tolist() == expected
    empty = ClickLog.from_events(np.zeros(0, object), np.zeros(0, "datetime64[s]"), np.zeros(0, np.int64))
    assert without_later_clicks(imps, empty) is imps


def test_a_click_log_too_large_to_pack_is_refused(monkeypatch):
    from recsys.data import interactions

    monkeypatch.setattr(interactions, "_MAX_USERS", 2)
    with pytest.raises(ValueError, match="ClickLog has 2 users, expected fewer than 2"):
        ClickLog.from_events(np.array(["a", "b"], dtype=object), np.array([T0, T0]), np.array([0, 1]))


def test_click_log_errors_name_the_problem():
    with pytest.raises(ValueError, match="differ in length"):
        ClickLog.from_events(np.array(["a"], dtype=object), np.array([T0, T0]), np.array([0]))
    with pytest.raises(ValueError, match="click 1 has time NaT"):
        ClickLog.from_events(np.array(["a", "b"], dtype=object), np.array([T0, "NaT"], dtype="datetime64[s]"), np.array([0, 1]))
    with pytest.raises(ValueError, match="click 0 has item row -1"):
        ClickLog.from_events(np.array(["a"], dtype=object), np.array([T0]), np.array([-1]))
    with pytest.raises(ValueError, match="history_len is 0"):
        with_logged_clicks(_impressions(), ClickLog.from_impressions([_impressions()]), 0)


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
