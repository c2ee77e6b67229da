"""Impressions and the interaction log in array form: what the CTR model trains and scores on.

The pipelines build these from the store (or straight from MIND files); the model code never
touches SQL. Ragged lists (histories, candidates) are stored CSR-style: ``offsets`` of length
``m + 1`` into a flat array, so impression ``i`` owns ``flat[offsets[i]:offsets[i+1]]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

# Log keys pack (item row, seconds since the log's first event) into one sortable int64.
_TIME_SPAN = np.int64(1) << 40  # about 34,800 years of seconds
_MAX_ITEMS = 1 << 22
_MAX_USERS = 1 << 23  # a click log packs (user, second) into an int64 as well


def _as_seconds(times: np.ndarray) -> np.ndarray:
    """(k,) int64 seconds since the epoch, a view when ``times`` is datetime64[s] already."""
    return np.asarray(times).astype("datetime64[s]", copy=False).view(np.int64)


@dataclass(frozen=True)
class Impressions:
    """``m`` impressions with item references as row indices into an ``ItemFeatures``.

    Attributes:
        impression_ids: (m,) int64 MIND impression ids.
        user_ids: (m,) object array of user ids.
        times: (m,) datetime64[s] impression times.
        history_offsets: (m + 1,) int64 offsets into ``history_items``.
        history_items: (h,) int32 item rows of the user's clicked history, most recent first.
        candidate_offsets: (m + 1,) int64 offsets into ``candidate_items`` / ``labels``.
        candidate_items: (c,) int32 item rows of the candidates, in impression order.
        labels: (c,) int8, 1 clicked, 0 not clicked, -1 unknown (unlabelled test files).
    """

    impression_ids: np.ndarray
    user_ids: np.ndarray
    times: np.ndarray
    history_offsets: np.ndarray
    history_items: np.ndarray
    candidate_offsets: np.ndarray
    candidate_items: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.impression_ids)

    def history(self, i: int) -> np.ndarray:
        return self.history_items[self.history_offsets[i] : self.history_offsets[i + 1]]

    def candidates(self, i: int) -> np.ndarray:
        return self.candidate_items[self.candidate_offsets[i] : self.candidate_offsets[i + 1]]

    def candidate_labels(self, i: int) -> np.ndarray:
        return self.labels[self.candidate_offsets[i] : self.candidate_offsets[i + 1]]


def gather_csr(offsets: np.ndarray, flat: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Select rows of a CSR ragged array, vectorised.

    Args:
        offsets: (m + 1,) int64 row offsets into ``flat``.
        flat: (total,) values.
        rows: (r,) int row numbers to take, in the order wanted (repeats allowed).

    Returns:
        ``(new_offsets (r + 1,) int64, new_flat)`` holding the chosen rows.
    """
    rows = np.asarray(rows, dtype=np.int64)
    starts = offsets[:-1][rows]
    lengths = offsets[1:][rows] - starts
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    positions = np.arange(new_offsets[-1], dtype=np.int64) + np.repeat(starts - new_offsets[:-1], lengths)
    return new_offsets, flat[positions]


def select_impressions(impressions: Impressions, rows: np.ndarray) -> Impressions:
    """The impressions at ``rows`` (int indices or a boolean mask), in that order."""
    rows = np.asarray(rows)
    if rows.dtype == bool:
        rows = np.flatnonzero(rows)
    history_offsets, history_items = gather_csr(impressions.history_offsets, impressions.history_items, rows)
    candidate_offsets, candidate_items = gather_csr(
        impressions.candidate_offsets, impressions.candidate_items, rows
    )
    _, labels = gather_csr(impressions.candidate_offsets, impressions.labels, rows)
    return Impressions(
        impressions.impression_ids[rows], impressions.user_ids[rows], impressions.times[rows],
        history_offsets, history_items, candidate_offsets, candidate_items, labels,
    )


def concat_impressions(parts: Sequence[Impressions]) -> Impressions:
    """The impressions of every part, part after part, in one ``Impressions`` (at least one part)."""
    if not parts:
        raise ValueError("concat_impressions needs at least one part")

    def offsets(name: str) -> np.ndarray:
        lengths = np.concatenate([np.diff(getattr(p, name)) for p in parts])
        out = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=out[1:])
        return out

    def joined(name: str) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in parts])

    return Impressions(
        joined("impression_ids"), joined("user_ids"), joined("times"), offsets("history_offsets"),
        joined("history_items"), offsets("candidate_offsets"), joined("candidate_items"), joined("labels"),
    )


def candidate_impression_rows(impressions: Impressions) -> np.ndarray:
    """(c,) int64: for every candidate, the row of the impression it belongs to."""
    return np.repeat(np.arange(len(impressions), dtype=np.int64), np.diff(impressions.candidate_offsets))


def first_shown(impressions: Sequence[Impressions], num_items: int) -> np.ndarray:
    """First time each article was shown as a candidate: MIND's stand-in for publication time.

    Labels are not read, so unlabelled (future) impressions may be included: an article shown at
    ``t`` was first shown at or before ``t``, so the age derived from this never leaks.

    Args:
        impressions: impression sets whose candidates count as shows.
        num_items: ``n``, the number of rows of the feature table the items index.

    Returns:
        (n,) datetime64[s], NaT for articles never shown.
    """
    never = np.iinfo(np.int64).max
    first = np.full(num_items, never, dtype=np.int64)
    for imps in impressions:
        times = np.repeat(imps.times.astype("datetime64[s]").astype(np.int64), np.diff(imps.candidate_offsets))
        np.minimum.at(first, imps.candidate_items.astype(np.int64), times)
    out = first.astype("datetime64[s]")
    out[first == never] = np.datetime64("NaT")
    return out


@dataclass(frozen=True)
class InteractionLog:
    """Time-stamped shows and clicks of articles, sorted by (item row, time).

    Built from labelled impressions only (a show of an unlabelled candidate says nothing about
    clicks). Popularity at time ``t`` is counted over events strictly before ``t``, so a sample
    never sees its own click (see ``window_counts``).

    Attributes:
        num_items: ``n``, the number of rows of the feature table the item rows index.
        item_rows: (e,) int32 item row of each event, ascending.
        times: (e,) datetime64[s] event times, ascending within an item.
        clicks: (e,) int8, 1 when the show was clicked.
    """

    num_items: int
    item_rows: np.ndarray
    times: np.ndarray
    clicks: np.ndarray
    _keys: np.ndarray = field(init=False, repr=False, compare=False)
    _cum_clicks: np.ndarray = field(init=False, repr=False, compare=False)
    _base: np.int64 = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.num_items < _MAX_ITEMS:
            raise ValueError(f"InteractionLog.num_items is {self.num_items}, expected 0 <= n < {_MAX_ITEMS}")
        if not len(self.item_rows) == len(self.times) == len(self.clicks):
            raise ValueError(
                f"InteractionLog arrays differ in length: item_rows {len(self.item_rows)}, "
                f"times {len(self.times)}, clicks {len(self.clicks)}"
            )
        seconds = _as_seconds(self.times)
        base = np.int64(seconds.min()) if len(seconds) else np.int64(0)
        # In place: the log holds every show of the training window (80M at MIND-large).
        keys = self.item_rows.astype(np.int64)
        keys *= _TIME_SPAN
        keys += seconds
        keys -= base
        if len(keys) > 1 and np.any(keys[1:] < keys[:-1]):
            raise ValueError("InteractionLog events are not sorted by (item row, time); build it with from_events")
        cum = np.zeros(len(keys) + 1, dtype=np.int64)
        np.cumsum(self.clicks, out=cum[1:])
        object.__setattr__(self, "_keys", keys)
        object.__setattr__(self, "_cum_clicks", cum)
        object.__setattr__(self, "_base", base)

    def __len__(self) -> int:
        return len(self.item_rows)

    @property
    def end(self) -> np.datetime64 | None:
        """One second after the last event, the first time at which every event counts; None
        for an empty log."""
        if not len(self.times):
            return None
        return self.times.astype("datetime64[s]").max() + np.timedelta64(1, "s")

    @classmethod
    def from_events(cls, item_rows: np.ndarray, times: np.ndarray, clicks: np.ndarray, num_items: int) -> "InteractionLog":
        """A log from unsorted events.

        Args:
            item_rows: (e,) int item rows, each in ``[0, num_items)``.
            times: (e,) datetime64 event times (no NaT).
            clicks: (e,) 0/1 click flags.
            num_items: ``n``.

        Raises:
            ValueError: an item row outside ``[0, num_items)`` or a NaT time.
        """
        item_rows = np.asarray(item_rows)
        times = np.asarray(times).astype("datetime64[s]", copy=False)
        clicks = np.asarray(clicks).astype(np.int8, copy=False)
        if len(item_rows) and (item_rows.min() < 0 or item_rows.max() >= num_items):
            bad = np.flatnonzero((item_rows < 0) | (item_rows >= num_items))[0]
            raise ValueError(f"interaction log event {bad} has item row {item_rows[bad]}, expected 0 <= row < {num_items}")
        if np.isnat(times).any():
            raise ValueError(f"interaction log event {np.flatnonzero(np.isnat(times))[0]} has time NaT, expected a time")
        # One int64 sort key, built in place (a lexsort of two columns holds several more copies).
        keys = item_rows.astype(np.int64)
        keys *= _TIME_SPAN
        keys += times.view(np.int64) - (times.view(np.int64).min() if len(times) else 0)
        order = np.argsort(keys, kind="stable")
        del keys
        return cls(num_items, item_rows[order].astype(np.int32, copy=False), times[order], clicks[order])

    @classmethod
    def from_impressions(cls, impressions: Sequence[Impressions], num_items: int) -> "InteractionLog":
        """A log of every labelled candidate of the given impressions (labels -1 are skipped)."""
        items, times, clicks = [], [], []
        for imps in impressions:
            labelled = imps.labels >= 0
            items.append(imps.candidate_items[labelled])
            times.append(np.repeat(imps.times.astype("datetime64[s]"), np.diff(imps.candidate_offsets))[labelled])
            clicks.append(imps.labels[labelled])
        if not items:
            return cls.from_events(np.zeros(0, np.int64), np.zeros(0, "datetime64[s]"), np.zeros(0, np.int8), num_items)
        return cls.from_events(np.concatenate(items), np.concatenate(times), np.concatenate(clicks), num_items)

    def window_counts(
        self, item_rows: np.ndarray, times: np.ndarray, *, window: np.timedelta64
    ) -> tuple[np.ndarray, np.ndarray]:
        """Clicks and shows of each item in ``[t - window, t)``: strictly before ``t``.

        Args:
            item_rows: (p,) int item rows.
            times: (p,) datetime64 query times.
            window: length of the look-back window.

        Returns:
            ``(clicks, shows)``, both (p,) int64.
        """
        item_rows = np.asarray(item_rows, dtype=np.int64)
        seconds = np.asarray(times).astype("datetime64[s]").astype(np.int64)
        width = np.int64(window / np.timedelta64(1, "s"))
        item_base = item_rows * _TIME_SPAN
        # Times outside the log's span clip to its edges, where the counts are right anyway.
        hi_key = item_base + np.clip(seconds - self._base, 0, _TIME_SPAN - 1)
        lo_key = item_base + np.clip(seconds - width - self._base, 0, _TIME_SPAN - 1)
        # Queries sorted first: searchsorted then walks the log's keys in order instead of
        # jumping around it (8x faster with 18M queries into 22M events). One order serves
        # both bounds: within an item both keys grow with the time.
        order = np.argsort(hi_key, kind="stable")
        hi, lo = np.empty(len(hi_key), np.int64), np.empty(len(lo_key), np.int64)
        hi[order] = np.searchsorted(self._keys, hi_key[order], side="left")
        lo[order] = np.searchsorted(self._keys, lo_key[order], side="left")
        return self._cum_clicks[hi] - self._cum_clicks[lo], (hi - lo).astype(np.int64)

    def first_shown(self) -> np.ndarray:
        """(n,) datetime64[s] first show of each item in the log, NaT if never shown."""
        out = np.full(self.num_items, np.datetime64("NaT"), dtype="datetime64[s]")
        rows, first = np.unique(self.item_rows, return_index=True)
        out[rows] = self.times[first]
        return out


@dataclass(frozen=True)
class ClickLog:
    """Clicks seen in labelled impressions, grouped by user, ascending in time within a user.

    A MIND History column stops where the behaviors log starts; by the time of a later
    impression, the user's clicks in earlier impressions of the log are history too. This is
    the lookup that adds them (see ``with_logged_clicks``).

    Attributes:
        user_ids: (u,) object array of user ids, sorted, unique.
        offsets: (u + 1,) int64; user ``j`` owns ``times[offsets[j]:offsets[j+1]]``.
        times: (k,) datetime64[s] click times, ascending within a user (then item rows).
        items: (k,) int32 item rows of the clicked articles.
    """

    user_ids: np.ndarray
    offsets: np.ndarray
    times: np.ndarray
    items: np.ndarray
    _user_keys: np.ndarray = field(init=False, repr=False, compare=False)
    _keys: np.ndarray = field(init=False, repr=False, compare=False)
    _base: np.int64 = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # (user position, seconds) packed into one sortable int64, as InteractionLog does for
        # items: every "clicks of u before t" query is then one searchsorted, built once.
        if len(self.user_ids) >= _MAX_USERS:
            # The packed keys below would overflow int64 and mix users' histories silently.
            raise ValueError(f"ClickLog has {len(self.user_ids)} users, expected fewer than {_MAX_USERS}")
        seconds = self.times.astype("datetime64[s]").astype(np.int64)
        base = np.int64(seconds.min()) if len(seconds) else np.int64(0)
        owner = np.repeat(np.arange(len(self.user_ids), dtype=np.int64), np.diff(self.offsets))
        object.__setattr__(self, "_user_keys", self.user_ids.astype(str))
        object.__setattr__(self, "_keys", owner * _TIME_SPAN + (seconds - base))
        object.__setattr__(self, "_base", base)

    def __len__(self) -> int:
        return len(self.items)

    def before(self, user_ids: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each query's clicks lie: user ``user_ids[i]``'s clicks strictly before ``times[i]``.

        Args:
            user_ids: (m,) user ids. times: (m,) datetime64 query times.

        Returns:
            ``(start, stop)``, both (m,) int64: the clicks are ``items[start[i]:stop[i]]``, oldest
            first (an empty slice for a user without logged clicks).
        """
        m = len(user_ids)
        if not len(self.user_ids):
            return np.zeros(m, np.int64), np.zeros(m, np.int64)
        where, known = self.user_positions(user_ids)
        start = self.offsets[where]
        seconds = np.asarray(times).astype("datetime64[s]").astype(np.int64)
        query = where * _TIME_SPAN + np.clip(seconds - self._base, 0, _TIME_SPAN - 1)
        stop = np.clip(np.searchsorted(self._keys, query, side="left"), start, self.offsets[where + 1])
        return np.where(known, start, 0), np.where(known, stop, 0)

    def user_positions(self, user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(position, known)``, both (m,): each user's position in ``self.user_ids`` (a valid
        index even for an unknown user) and whether the log has the user. Needs a non-empty log."""
        keys = np.asarray(user_ids).astype(str)
        where = np.minimum(np.searchsorted(self._user_keys, keys), len(self.user_ids) - 1)
        return where, self._user_keys[where] == keys

    def until(self, end: np.datetime64) -> "ClickLog":
        """The clicks strictly before ``end``: the log a store ending there holds."""
        keep = self.times < np.datetime64(end, "s")
        owner = np.repeat(self.user_ids, np.diff(self.offsets))
        return ClickLog.from_events(owner[keep], self.times[keep], self.items[keep])

    @classmethod
    def from_events(cls, user_ids, times, items) -> "ClickLog":
        """A log from unsorted clicks: (k,) user ids, (k,) datetime64 times, (k,) item rows.

        Raises:
            ValueError: arrays of different lengths, a NaT time or a negative item row.
        """
        user_ids = np.asarray(user_ids, dtype=object)
        times = np.asarray(times).astype("datetime64[s]")
        items = np.asarray(items, dtype=np.int64)
        if not len(user_ids) == len(times) == len(items):
            raise ValueError(f"ClickLog arrays differ in length: user_ids {len(user_ids)}, times {len(times)}, items {len(items)}")
        if np.isnat(times).any():
            raise ValueError(f"click {np.flatnonzero(np.isnat(times))[0]} has time NaT, expected a time")
        if len(items) and items.min() < 0:
            raise ValueError(f"click {np.flatnonzero(items < 0)[0]} has item row {items.min()}, expected >= 0")
        unique, user_index = np.unique(user_ids.astype(str), return_inverse=True)
        # Item rows break time ties, so the order never depends on the order events came in.
        order = np.lexsort((items, times.astype(np.int64), user_index))
        offsets = np.zeros(len(unique) + 1, dtype=np.int64)
        np.cumsum(np.bincount(user_index, minlength=len(unique)), out=offsets[1:])
        return cls(unique.astype(object), offsets, times[order], items[order].astype(np.int32))

    @classmethod
    def from_impressions(cls, impressions: Sequence[Impressions]) -> "ClickLog":
        """The clicks (label 1) of the given impressions."""
        users, times, items = [], [], []
        for imps in impressions:
            owner = candidate_impression_rows(imps)[imps.labels == 1]
            users.append(imps.user_ids[owner])
            times.append(imps.times[owner])
            items.append(imps.candidate_items[imps.labels == 1])
        if not users:
            return cls.from_events(np.zeros(0, object), np.zeros(0, "datetime64[s]"), np.zeros(0, np.int64))
        return cls.from_events(np.concatenate(users), np.concatenate(times), np.concatenate(items))


# Impressions whose histories are rebuilt at a time. The vectorised merges below hold about ten
# int64 per history entry; a MIND-large window (2M impressions, 50 entries each) at once would
# need several GB for a moment. Chunks of this size keep it under ~0.3 GB.
HISTORY_CHUNK = 1 << 16


def slice_impressions(impressions: Impressions, lo: int, hi: int) -> Impressions:
    """Impressions ``lo:hi`` as views, offsets rebased: a contiguous ``select_impressions``
    without copies, for working through a large window a chunk at a time."""
    h, c = impressions.history_offsets[lo : hi + 1], impressions.candidate_offsets[lo : hi + 1]
    return Impressions(
        impressions.impression_ids[lo:hi], impressions.user_ids[lo:hi], impressions.times[lo:hi],
        h - h[0], impressions.history_items[h[0] : h[-1]], c - c[0], impressions.candidate_items[c[0] : c[-1]],
        impressions.labels[c[0] : c[-1]],
    )


def _rebuild_histories(impressions: Impressions, rebuild) -> Impressions:
    """The impressions with their histories replaced by ``rebuild(part)`` (an ``Impressions``
    whose histories are new), applied to ``HISTORY_CHUNK`` impressions at a time."""
    m = len(impressions)
    lengths, items = [np.zeros(0, np.int64)], [np.zeros(0, np.int32)]
    for lo in range(0, m, HISTORY_CHUNK):
        part = rebuild(slice_impressions(impressions, lo, min(lo + HISTORY_CHUNK, m)))
        lengths.append(np.diff(part.history_offsets))
        items.append(part.history_items.astype(np.int32, copy=False))
    offsets = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(np.concatenate(lengths), out=offsets[1:])
    return Impressions(
        impressions.impression_ids, impressions.user_ids, impressions.times, offsets, np.concatenate(items),
        impressions.candidate_offsets, impressions.candidate_items, impressions.labels,
    )


def with_logged_clicks(impressions: Impressions, clicks: ClickLog, history_len: int) -> Impressions:
    """The impressions with each history led by the user's logged clicks before the impression.

    History of impression ``i`` (user ``u`` at time ``t``): up to ``history_len`` clicks of
    ``u`` in ``clicks`` strictly before ``t``, newest first, then the impression's own history
    (most recent first); an article keeps only its first (most recent) place and the result is
    capped at ``history_len``. "Strictly before" keeps an impression's own labels, and those of
    any impression at the same second, out of its history, so training on these histories
    does not leak.

    Args:
        impressions: ``m`` impressions whose histories are the MIND History column.
        clicks: the click log; its item rows must index the same feature table.
        history_len: ``H``, the cap.

    Returns:
        ``Impressions`` with new ``history_offsets`` / ``history_items``; the rest is shared.
    """
    if not isinstance(history_len, (int, np.integer)) or history_len <= 0:
        raise ValueError(f"history_len is {history_len!r}, expected a positive integer")
    return _rebuild_histories(impressions, lambda part: _led_by_logged_clicks(part, clicks, history_len))


def _led_by_logged_clicks(impressions: Impressions, clicks: ClickLog, history_len: int) -> Impressions:
    """``with_logged_clicks`` on one chunk."""
    m = len(impressions)
    start, before = clicks.before(impressions.user_ids, impressions.times)
    n_log = np.minimum(before - start, history_len)
    n_own = np.diff(impressions.history_offsets)
    lengths = n_log + n_own
    offsets = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    owner = np.repeat(np.arange(m, dtype=np.int64), lengths)
    slot = np.arange(offsets[-1], dtype=np.int64) - offsets[:-1][owner]
    from_log = slot < n_log[owner]
    # Log part newest first: walk back from the last click before t.
    log_pos = before[owner] - 1 - slot
    own_pos = impressions.history_offsets[:-1][owner] + slot - n_log[owner]
    merged = np.where(from_log, clicks.items[np.where(from_log, log_pos, 0)] if len(clicks.items) else 0,
                      impressions.history_items[np.where(from_log, 0, own_pos)] if len(impressions.history_items) else 0)
    # Keep each (impression, article) once, at its first place, then cap the length.
    pair = owner * np.int64(int(merged.max()) + 1 if len(merged) else 1) + merged.astype(np.int64)
    keep = np.zeros(len(pair), dtype=bool)
    keep[np.unique(pair, return_index=True)[1]] = True
    rank = np.cumsum(keep) - 1
    first_rank = np.zeros(m + 1, dtype=np.int64)
    first_rank[1:] = np.cumsum(np.bincount(owner[keep], minlength=m))
    keep &= (rank - first_rank[:-1][owner]) < history_len
    new_offsets = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner[keep], minlength=m), out=new_offsets[1:])
    return Impressions(
        impressions.impression_ids, impressions.user_ids, impressions.times, new_offsets,
        merged[keep].astype(np.int32), impressions.candidate_offsets, impressions.candidate_items, impressions.labels,
    )


def without_later_clicks(impressions: Impressions, clicks: ClickLog) -> Impressions:
    """The impressions without the History-column articles their user first clicked, in the
    log, at or after the impression.

    The store keeps one History per user, from the user's latest impression. A later file's
    History (MIND-large's test file, or a daily feed) lists the clicks of earlier days, among
    them the very click a training impression is labelled with; reading it for that
    impression would teach "a candidate in the history is clicked". An article the log shows
    clicked strictly before the impression stays (``with_logged_clicks`` adds those anyway);
    one the log never shows clicked stays too (a click from before the log).

    Args:
        impressions: ``m`` impressions whose histories are the stored History column.
        clicks: every logged click of the store (later files included), over the same item rows.

    Returns:
        ``Impressions`` with the later-clicked articles removed from the histories, order kept.
    """
    if not len(clicks) or not len(impressions.history_items):
        return impressions
    # Earliest logged click of each (user position, item): the log is sorted by user, then time.
    owner = np.repeat(np.arange(len(clicks.user_ids), dtype=np.int64), np.diff(clicks.offsets))
    width = np.int64(max(int(clicks.items.max()), int(impressions.history_items.max())) + 1)
    keys = owner * width + clicks.items.astype(np.int64)
    first = np.unique(keys, return_index=True)[1]  # first occurrence = earliest time within a user
    click_keys, click_times = keys[first], clicks.times[first].astype("datetime64[s]")
    del owner, keys, first

    def drop_later(part: Impressions) -> Impressions:
        m = len(part)
        where, known = clicks.user_positions(part.user_ids)
        lengths = np.diff(part.history_offsets)
        entry_owner = np.repeat(np.arange(m, dtype=np.int64), lengths)
        entry_keys = where[entry_owner] * width + part.history_items.astype(np.int64)
        at = np.minimum(np.searchsorted(click_keys, entry_keys), len(click_keys) - 1)
        clicked_in_log = known[entry_owner] & (click_keys[at] == entry_keys)
        keep = ~(clicked_in_log & (click_times[at] >= part.times.astype("datetime64[s]")[entry_owner]))
        offsets = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(np.bincount(entry_owner[keep], minlength=m), out=offsets[1:])
        return dataclasses.replace(part, history_offsets=offsets, history_items=part.history_items[keep])

    return _rebuild_histories(impressions, drop_later)
