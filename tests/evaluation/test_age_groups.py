"""The report's article-age groups: one rule with the metrics' buckets, never-seen is new to the store."""

from __future__ import annotations

import numpy as np

from recsys.pipelines.evaluate import _age_groups


def test_age_at_each_show_with_never_seen_and_later_first_seen_read_as_new_to_the_store():
    # They were labelled "< 6 h" with the articles the store first saw hours before: on an
    # audit's file 5,500 of the 7,138 "< 6 h" candidates had been shown in the file for longer.
    t = np.datetime64("2019-11-15T12:00:00", "s")
    times = np.array([t, t + np.timedelta64(48, "h")])
    offsets = np.array([0, 3, 5])
    first_seen = np.array([t - np.timedelta64(5, "h"), t - np.timedelta64(30, "h"), np.datetime64("NaT", "s"),
                           t + np.timedelta64(1, "h")])
    items = np.array([0, 1, 2, 0, 3])
    # Second impression: item 0 is 53 h old, item 3 was first seen 47 h before it.
    assert _age_groups(times, offsets, items, first_seen) == ["< 6 h", "1-3 d", "new to the store", "1-3 d", "1-3 d"]
    # Shown before its first_seen (a later file ingested first): new to the store, not negative.
    assert _age_groups(times[:1], np.array([0, 1]), items[4:5], first_seen) == ["new to the store"]
