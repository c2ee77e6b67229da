"""Side features: popularity strictly before t (worked by hand), age, normalisation, leakage."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.data.interactions import InteractionLog
from recsys.models.side_features import SIDE_FEATURE_NAMES, SideFeatures, raw_side_features

T0 = np.datetime64("2019-11-10T00:00:00", "s")


def _at(hours: float) -> np.datetime64:
    return T0 + np.timedelta64(int(hours * 3600), "s")


@pytest.fixture
def hand_log() -> InteractionLog:
    # Item 0: clicked at 10:00, shown at 11:00, clicked at 12:00. Item 2: shown at 11:00.
    # Item 1 never shown. Events given out of order on purpose.
    return InteractionLog.from_events(
        item_rows=np.array([0, 2, 0, 0]),
        times=np.array([_at(12), _at(11), _at(10), _at(11)]),
        clicks=np.array([1, 0, 1, 0]),
        num_items=3,
    )


def test_popularity_worked_by_hand(hand_log):
    items = np.array([0, 0, 0, 0, 1, 2, 0])
    times = np.array([_at(12), _at(12) + np.timedelta64(1, "s"), _at(10), _at(9), _at(12), _at(12), _at(40)])
    clicks, shows = hand_log.window_counts(items, times, window=np.timedelta64(24, "h"))
    # at 12:00 the 12:00 click is not yet counted (strictly before t); one second later it is
    np.testing.assert_array_equal(clicks, [1, 2, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(shows, [2, 3, 0, 0, 0, 1, 0])  # at 40:00 all events are > 24 h old
    # a 1.5 h window at 12:00 covers [10:30, 12:00): only the 11:00 show
    clicks, shows = hand_log.window_counts(np.array([0]), np.array([_at(12)]), window=np.timedelta64(90, "m"))
    np.testing.assert_array_equal(clicks, [0])
    np.testing.assert_array_equal(shows, [1])


def test_popularity_window_includes_its_start_and_excludes_t(hand_log):
    # [t - window, t): at 12:00 a 2 h window starts at 10:00 exactly, so the 10:00 click and
    # the 11:00 show count (2 shows, 1 click); the 12:00 click is at t and does not.
    clicks, shows = hand_log.window_counts(np.array([0, 2]), np.array([_at(12), _at(13)]), window=np.timedelta64(2, "h"))
    np.testing.assert_array_equal(clicks, [1, 0])
    np.testing.assert_array_equal(shows, [2, 1])  # item 2: its 11:00 show is the start of [11:00, 13:00)
    # One second shorter, the window starts after 10:00 and 11:00 respectively.
    clicks, shows = hand_log.window_counts(np.array([0, 2]), np.array([_at(12), _at(13)]),
                                           window=np.timedelta64(2 * 3600 - 1, "s"))
    np.testing.assert_array_equal(clicks, [0, 0])
    np.testing.assert_array_equal(shows, [1, 0])


def test_raw_features_and_age_worked_by_hand(hand_log):
    first_seen = np.array([_at(10), np.datetime64("NaT"), _at(11)], dtype="datetime64[s]")
    raw = raw_side_features(
        np.array([0, 1, 2, 0]), np.array([_at(12), _at(12), _at(11), _at(9)]), hand_log, first_seen, window_hours=24
    )
    expected = np.array([
        [np.log1p(1), np.log1p(2), np.log1p(2.0)],  # 2 h old
        [0.0, 0.0, 0.0],  # never seen: brand new
        [0.0, 0.0, 0.0],  # shown at 11:00, asked at 11:00: nothing before, age 0
        [0.0, 0.0, 0.0],  # asked before it was first seen: age clipped to 0
    ])
    np.testing.assert_allclose(raw, expected)


def test_age_read_at_its_own_times_worked_by_hand(hand_log):
    """age_times moves only the age: popularity at 12:00 (the log's end), age at 30:00."""
    first_seen = np.array([_at(10), np.datetime64("NaT"), _at(11)], dtype="datetime64[s]")
    items = np.array([0, 1, 2])
    raw = raw_side_features(items, np.full(3, _at(12)), hand_log, first_seen, window_hours=24,
                            age_times=np.full(3, _at(30)))
    expected = np.array([
        [np.log1p(1), np.log1p(2), np.log1p(20.0)],  # 2 shows and 1 click before 12:00; 20 h old at 30:00
        [0.0, 0.0, 0.0],  # never seen: brand new whenever asked
        [0.0, np.log1p(1), np.log1p(19.0)],  # shown at 11:00; 19 h old at 30:00
    ])
    np.testing.assert_allclose(raw, expected)
    with pytest.raises(ValueError, match="got 3 times but 2 age times"):
        raw_side_features(items, np.full(3, _at(12)), hand_log, first_seen, window_hours=24, age_times=np.full(2, _at(30)))


def test_first_shown_of_the_log(hand_log):
    first = hand_log.first_shown()
    assert first[0] == _at(10) and first[2] == _at(11) and np.isnat(first[1])


@settings(max_examples=40, deadline=None)
@given(
    events=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 200), st.integers(0, 1)), max_size=40),
    future=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 100), st.integers(0, 1)), min_size=1, max_size=20),
    query_hour=st.integers(0, 200),
    window=st.integers(1, 100),
)
def test_events_at_or_after_t_never_change_the_features(events, future, query_hour, window):
    """No leakage: adding clicks at or after the query time leaves its features unchanged."""
    def build(evts):
        if not evts:
            return InteractionLog.from_events(np.zeros(0, int), np.zeros(0, "datetime64[s]"), np.zeros(0, int), 4)
        items, hours, clicks = map(np.array, zip(*evts))
        return InteractionLog.from_events(items, T0 + hours.astype("timedelta64[h]"), clicks, 4)

    later = [(i, query_hour + h, c) for i, h, c in future]
    items = np.arange(4)
    times = np.full(4, _at(query_hour))
    before = build(events).window_counts(items, times, window=np.timedelta64(window, "h"))
    after = build(events + later).window_counts(items, times, window=np.timedelta64(window, "h"))
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    # and a brute-force count agrees
    for item in items:
        expected = [(h, c) for i, h, c in events if i == item and query_hour - window <= h < query_hour]
        assert before[1][item] == len(expected)
        assert before[0][item] == sum(c for _, c in expected)


def test_fit_normalises_the_training_samples(hand_log):
    first_seen = hand_log.first_shown()
    items = np.array([0, 0, 2, 1, 0])
    times = np.array([_at(10), _at(11), _at(12), _at(13), _at(14)])
    spec = SideFeatures(window_hours=24).fit(items, times, hand_log, first_seen)
    x = spec.compute(items, times, hand_log, first_seen)
    assert x.dtype == np.float32 and x.shape == (5, len(SIDE_FEATURE_NAMES))
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(x.std(axis=0), 1.0, atol=1e-5)
    assert SideFeatures.from_dict(spec.to_dict()) == spec


def test_fit_keeps_its_window_and_normalises_with_it(hand_log):
    # Item 0 (clicks at 10:00 and 12:00, shows at 10:00, 11:00, 12:00), seen at 13:00 and 20:00.
    # A 6 h window at 13:00 is [07:00, 13:00): 2 clicks, 3 shows; at 20:00 [14:00, 20:00): none.
    # (A 24 h window would count them at 20:00 as well.)
    items, times = np.array([0, 0]), np.array([_at(13), _at(20)])
    spec = SideFeatures(window_hours=6).fit(items, times, hand_log, hand_log.first_shown())
    assert spec.window_hours == 6.0
    np.testing.assert_allclose(spec.mean[:2], [np.log1p(2) / 2, np.log1p(3) / 2], rtol=1e-12)
    np.testing.assert_allclose(spec.std[:2], [np.log1p(2) / 2, np.log1p(3) / 2], rtol=1e-12)
    assert SideFeatures.from_dict(spec.to_dict()).window_hours == 6.0


def test_a_feature_constant_in_training_is_centred_not_blown_up(hand_log, caplog):
    # A first window where nothing had been shown: popularity and age are 0 on every sample.
    first_seen = np.full(3, np.datetime64("NaT"), dtype="datetime64[s]")
    items = np.array([0, 1, 2])
    early = np.array([_at(1), _at(2), _at(3)])
    quiet = InteractionLog.from_events(np.zeros(0, np.int64), np.zeros(0, "datetime64[s]"), np.zeros(0, np.int64), 3)
    with caplog.at_level("WARNING", logger="recsys.models.side_features"):
        spec = SideFeatures(window_hours=24).fit(items, early, quiet, first_seen)
    assert spec.std == (1.0, 1.0, 1.0) and spec.mean == (0.0, 0.0, 0.0)
    assert "constant on the 3 training samples" in caplog.text
    # Later, with clicks and shows, the values stay on the raw log scale, not ~1e6.
    later = spec.compute(np.array([0, 0]), np.array([_at(13), _at(14)]), hand_log, hand_log.first_shown())
    raw = raw_side_features(np.array([0, 0]), np.array([_at(13), _at(14)]), hand_log, hand_log.first_shown(), window_hours=24)
    np.testing.assert_allclose(later, raw, rtol=1e-6)
    assert np.abs(later).max() < 10


def test_errors_name_the_problem(hand_log):
    first_seen = hand_log.first_shown()
    with pytest.raises(ValueError, match="item row 5 at position 1 is outside the log"):
        raw_side_features(np.array([0, 5]), np.array([_at(1), _at(1)]), hand_log, first_seen, window_hours=24)
    with pytest.raises(ValueError, match="item row -1 at position 1 is outside the log"):
        raw_side_features(np.array([0, -1]), np.array([_at(1), _at(1)]), hand_log, first_seen, window_hours=24)
    # A row must lie in both the log (3 items) and first_seen, whichever is shorter.
    longer = np.concatenate([first_seen, first_seen[:2]])
    with pytest.raises(ValueError, match=r"item row 3 at position 0 is outside the log \(3 items\) or first_seen \(5 items\)"):
        raw_side_features(np.array([3]), np.array([_at(1)]), hand_log, longer, window_hours=24)
    with pytest.raises(ValueError, match=r"item row 2 at position 0 is outside the log \(3 items\) or first_seen \(2 items\)"):
        raw_side_features(np.array([2]), np.array([_at(1)]), hand_log, first_seen[:2], window_hours=24)
    with pytest.raises(ValueError, match="window_hours is 0, expected a positive number"):
        raw_side_features(np.array([0]), np.array([_at(1)]), hand_log, first_seen, window_hours=0)
    with pytest.raises(ValueError, match="got 2 item rows but 1 times"):
        raw_side_features(np.array([0, 1]), np.array([_at(1)]), hand_log, first_seen, window_hours=1)
    with pytest.raises(ValueError, match="SideFeatures.std is"):
        SideFeatures(24.0, (0.0, 0.0, 0.0), (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="mean/std have 2/3 entries, expected 3"):
        SideFeatures(24.0, (0.0, 0.0), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"side features \['a'\] saved"):
        SideFeatures.from_dict({"names": ["a"], "window_hours": 1, "mean": [0], "std": [1]})


def test_chunked_fit_and_compute_match_one_pass(hand_log, monkeypatch):
    # Pairs are computed PAIR_CHUNK at a time; statistics combine across chunks exactly.
    from recsys.models import side_features

    rng = np.random.default_rng(0)
    first_seen = hand_log.first_shown()
    items = rng.integers(0, 3, 101)
    times = T0 + rng.integers(0, 40 * 3600, 101).astype("timedelta64[s]")
    ages = times + np.timedelta64(3600, "s")
    raw = raw_side_features(items, times, hand_log, first_seen, window_hours=24)
    spec = SideFeatures(window_hours=24).fit(items, times, hand_log, first_seen)
    np.testing.assert_allclose(spec.mean, raw.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(spec.std, raw.std(axis=0), rtol=1e-12)
    whole = spec.compute(items, times, hand_log, first_seen, age_times=ages)
    monkeypatch.setattr(side_features, "PAIR_CHUNK", 7)
    chunked = SideFeatures(window_hours=24).fit(items, times, hand_log, first_seen)
    np.testing.assert_allclose(chunked.mean, spec.mean, rtol=1e-12)
    np.testing.assert_allclose(chunked.std, spec.std, rtol=1e-12)
    np.testing.assert_array_equal(chunked.compute(items, times, hand_log, first_seen, age_times=ages), whole)
    # A bad row is named at its position in the whole array, not in its chunk.
    items[30] = 9
    with pytest.raises(ValueError, match="item row 9 at position 30"):
        spec.compute(items, times, hand_log, first_seen)
    with pytest.raises(ValueError, match="got 101 times but 100 age times"):
        spec.compute(items[:101], times, hand_log, first_seen, age_times=ages[:100])
    with pytest.raises(ValueError, match="got 100 item rows but 101 times"):
        spec.fit(items[:100], times, hand_log, first_seen)
