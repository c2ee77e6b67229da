"""FileShows: a scored file's shows of each article strictly before an impression, and since when."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.data.exposure import FileShows

T0 = np.datetime64("2019-11-15T00:00:00", "s")


def at(hours: float) -> np.datetime64:
    return T0 + np.timedelta64(int(hours * 3600), "s")


def test_counts_only_earlier_shows_and_hours_since_the_first():
    # article 3 shown at 0 h, 1 h, 1 h and 5 h; article 7 at 2 h
    shows = FileShows.from_events(np.array([3, 7, 3, 3, 3]), np.array([at(1), at(2), at(0), at(5), at(1)]))
    items = np.array([3, 3, 3, 3, 3, 7, 7, 9])
    times = np.array([at(0), at(0.5), at(1), at(1.5), at(6), at(2), at(3), at(4)])
    counts, hours = shows.earlier(items, times)
    # at its own time a show is not earlier: 0 h sees none, 1 h sees only the 0 h show
    np.testing.assert_array_equal(counts, [0, 1, 1, 3, 4, 0, 1, 0])
    np.testing.assert_allclose(hours, [0, 0.5, 1, 1.5, 6, 0, 1, 0])


def test_a_window_counts_only_the_shows_within_it_and_hours_since_the_first_of_those():
    # article 3 shown at 0 h, 1 h, 1 h and 5 h; article 7 at 2 h; a 2-hour window
    shows = FileShows.from_events(np.array([3, 7, 3, 3, 3]), np.array([at(1), at(2), at(0), at(5), at(1)]))
    items = np.array([3, 3, 3, 3, 3, 7, 7])
    times = np.array([at(0.5), at(2), at(2.5), at(3), at(6), at(3), at(4)])
    counts, hours = shows.earlier(items, times, window_hours=2)
    # at 2 h the window [0 h, 2 h) holds all three early shows; at 2.5 h only the two at 1 h;
    # at 3 h its start (1 h) is inside it; at 6 h only the 5 h show; at 4 h article 7's 2 h show is on the edge
    np.testing.assert_array_equal(counts, [1, 3, 2, 2, 1, 1, 1])
    np.testing.assert_allclose(hours, [0.5, 2, 1.5, 2, 1, 1, 2])
    # a window longer than the file counts every earlier show
    every = shows.earlier(items, times)
    for got, expected in zip(shows.earlier(items, times, window_hours=100), every):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("window", [0, -1, float("nan")])
def test_a_window_of_no_hours_is_refused(window):
    shows = FileShows.from_events(np.array([1]), np.array([at(0)]))
    with pytest.raises(ValueError, match="window_hours is .*expected a number of hours above 0"):
        shows.earlier(np.array([1]), np.array([at(1)]), window_hours=window)


def test_a_time_before_the_first_show_and_an_empty_file_see_nothing():
    shows = FileShows.from_events(np.array([1]), np.array([at(2)]))
    counts, hours = shows.earlier(np.array([1, 1]), np.array([at(-30), at(2)]))
    np.testing.assert_array_equal(counts, [0, 0])
    empty = FileShows.from_events(np.array([], np.int64), np.array([], "datetime64[s]"))
    assert len(empty) == 0 and len(FileShows.from_packed([])) == 0
    counts, hours = empty.earlier(np.array([0, 5]), np.array([at(1), at(2)]))
    np.testing.assert_array_equal(counts, [0, 0])
    np.testing.assert_array_equal(hours, [0.0, 0.0])


def test_shows_packed_in_parts_are_the_shows_of_one_pack_and_the_far_future_sees_all():
    items, times = np.array([3, 1, 3, 2]), np.array([at(4), at(1), at(2), at(3)])
    whole = FileShows.from_events(items, times)
    parts = FileShows.from_packed([FileShows.pack(items[:2], times[:2]), FileShows.pack(items[2:], times[2:])])
    np.testing.assert_array_equal(parts.keys, whole.keys)
    # odd and even item rows alike: a time past what 32 bits hold counts every show of the article
    counts, _ = whole.earlier(np.array([3, 1, 2]), np.array(["2200-01-01"] * 3, dtype="datetime64[s]"))
    np.testing.assert_array_equal(counts, [2, 1, 1])


@pytest.mark.parametrize("items, times, message", [
    ([1, 2], [at(0)], "one length"),
    ([-1], [at(0)], "negative"),
    ([1], [np.datetime64("NaT", "s")], "NaT"),
    ([1, 1], [at(0), np.datetime64("2106-02-08T00:00:00", "s")], "2106-02-08T00:00:00 is outside 1970-01-01"),
    ([1], [np.datetime64("1969-12-31T23:59:59", "s")], "outside"),
])
def test_bad_events_are_refused(items, times, message):
    with pytest.raises(ValueError, match=message):
        FileShows.from_events(np.array(items), np.array(times, dtype="datetime64[s]"))


events = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 50)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(shown=events, queries=st.lists(st.tuples(st.integers(0, 6), st.integers(-5, 60)), min_size=1, max_size=20),
       later=events, window=st.one_of(st.none(), st.integers(1, 70)))
def test_matches_a_brute_force_count_and_later_shows_change_nothing(shown, queries, later, window):
    """Against a direct count over the events (in ``[t - window, t)`` with a window); adding
    shows at or after each query's time leaves it unchanged."""
    def build(pairs):
        return FileShows.from_events(np.array([i for i, _ in pairs], np.int64),
                                     np.array([at(h) for _, h in pairs], dtype="datetime64[s]"))

    items = np.array([i for i, _ in queries], np.int64)
    times = np.array([at(h) for _, h in queries], dtype="datetime64[s]")
    counts, hours = build(shown).earlier(items, times, window_hours=window)
    for k, (item, hour) in enumerate(queries):
        before = [h for i, h in shown if i == item and h < hour and (window is None or h >= hour - window)]
        assert counts[k] == len(before)
        assert hours[k] == pytest.approx(hour - min(before) if before else 0.0)
    for k, (item, hour) in enumerate(queries):
        extra = [(i, max(h, hour)) for i, h in later]  # every added show at or after this query
        c, h = build(shown + extra).earlier(items[k : k + 1], times[k : k + 1], window_hours=window)
        assert (c[0], h[0]) == (counts[k], pytest.approx(hours[k]))
