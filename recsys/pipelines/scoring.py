"""Score a MIND behaviors file, streaming: the shared core of `predict` and `evaluate`.

The file is read in chunks of impressions, so memory is bounded by the chunk, not the file.
Each chunk becomes an ``Impressions`` over the catalogue's item rows (history from the row's
own History column, as the MIND competition defines it) and every model scores it once; a
model trained with ``logged_clicks`` first gets each history led by the user's clicks in the
store before the impression, as it was trained (docs/model.md).

Side features of an impression later than the store's last event (MIND dev after MIND train)
are read by default with popularity from the newest window the store holds (at its end) and
the article's true age at the impression: a popularity window that runs past the store's data
would read every article as unpopular. ``features_at="impression"`` reads both at each
impression's time, ``"store-end"`` both at the store's end, as the nightly job reads tomorrow's
candidates with tonight's statistics (docs/model.md, "When a later window's features are read").
Impressions inside the store's time range read both at their own time in every mode.

With the file's exposure on (``read_file_shows``, the default of both commands), an impression
after the store's end is scored by the model's file-exposure calibration
(``recsys.models.exposure``): its logit combined with how often the file showed each candidate
before it, and since when. Only shows are read, never labels.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import Engine

from recsys.columns import (
    ABSTRACT, CATEGORY, CONTENT_HASH, FIRST_SEEN_AT, IMAGE_MISSING, IMAGE_PATH, IMAGE_STATUS, NEWS_FRAME_COLUMNS, NEWS_ID,
    SUBCATEGORY, TITLE,
)
from recsys.config import Config, Workspace
from recsys.data.mind import (
    EXPECTED_LABEL, IMPRESSIONS, BadRow, BehaviorsScan, expected_news_id, is_bad_label, remember_malformed,
)
from recsys.encoders.item_features import ItemFeatures
from recsys.errors import RecsysError, SchemaError
from recsys.interrupts import raise_if_terminated
from recsys.data.exposure import FileShows
from recsys.data.interactions import (
    ClickLog, Impressions, InteractionLog, candidate_impression_rows, select_impressions, with_logged_clicks,
)
from recsys.models.affinity import SkipCounts, SkippedArticles, affinity_inputs
from recsys.models.exposure import fresh_as_of
from recsys.models.linear_blend import sigmoid
from recsys.models.side_features import SideFeatures
from recsys.pipelines.features import encode_news, first_seen_array, item_key_codes, load_version_model
from recsys.store import repository as repo
from recsys.versions import ModelVersion, check_encoders, read_bundle_config

log = logging.getLogger("recsys.scoring")

# Where a behaviors file's side features are read; the first is the default.
#   popularity-at-end: popularity at min(t, store's end), age at t;
#   impression: both at t;  store-end: both at min(t, store's end).
FEATURES_AT = ("popularity-at-end", "impression", "store-end")
DEFAULT_FEATURES_AT = FEATURES_AT[0]
# Key of the tally of iter_behavior_chunks, and of predict's and evaluate's summaries.
IGNORED_HISTORY = "ignored_history_entries"


@dataclass
class Catalogue:
    """Every article a behaviors file may name, with features and serving statistics."""

    news: pd.DataFrame
    features: ItemFeatures
    row_of: dict
    log: InteractionLog
    first_seen: np.ndarray
    clicks: ClickLog  # impression clicks in the store, for models trained with logged_clicks
    end: np.datetime64 | None  # one second after the store's last labelled show; None if it has none
    span: ScoringSpan | None = None  # the file the log was read for (None: the whole store's log)
    # --news lines left out as malformed, by the id they start with (ids no good line has)
    bad_news: dict[str, BadRow] = field(default_factory=dict)
    # The first ``stored`` articles are the store's, the rest --news's (None: all the store's)
    stored: int | None = None
    # Each article's category and subcategory codes (n, 2), and the store's skips of a chunk's
    # users, for models with the category affinity (None: none can be read)
    item_codes: np.ndarray | None = None
    skips: "SkipReader | None" = None


class SkipReader:
    """The store's skips (``repository.read_skipped``) of a chunk's users before ``until`` (the
    scored file's first impression: none of the file's own, nor any later); one query a chunk,
    which every version that scores the chunk shares (each counts them per key of its own item
    codes: its content clusters are its own). Only the impressions stored when it was made are
    read (``through_pk``), as the rest of the catalogue was read then: an ingest committing
    during a long ``predict`` changes no later chunk's counts."""

    def __init__(self, engine: Engine, until: datetime | None, news_ids: np.ndarray):
        self.engine, self.until, self.news_ids = engine, until, news_ids
        self.through_pk = repo.last_impression_pk(engine)
        self._last: SkippedArticles | None = None

    def __call__(self, user_ids: np.ndarray) -> SkippedArticles:
        users = np.unique(np.asarray(user_ids, dtype=object))
        if self._last is not None and np.array_equal(self._last.user_ids, users):
            return self._last
        self._last = SkippedArticles(users, *repo.read_skipped(self.engine, users, self.news_ids, until=self.until,
                                                               through_pk=self.through_pk))
        return self._last


def news_from_file(
    path: Path, images: Path | None, known: dict[str, tuple[str, str, str, str]],
) -> tuple[pd.DataFrame, dict[str, BadRow]]:
    """Articles of a news.tsv that the store does not know, in the store's column layout, and
    the file's malformed lines by the news id they start with.

    ``known``: the store's articles, id -> (category, subcategory, title, abstract). They are
    scored as stored, as the nightly job ranks them; a line that says otherwise is counted and
    named in a warning (ingest the file to update them).

    Each new article whose cover file in ``images`` is unusable is named on the log, as the
    ingest names it (``UnusableCovers``), with a count by status when there are many.

    A malformed line is left out rather than stopping the command: a behaviors file names only
    some of the articles, and one damaged line among thousands need not be one of them. A
    candidate that only such a line names is the scoring's error, with that line's fault
    (``iter_behavior_chunks``).
    """
    from recsys.data.images import inspect_image, list_images
    from recsys.data.mind import iter_news
    from recsys.store.ingest import NAMED_BAD_COVERS, UnusableCovers, content_hash

    root = Path(images).resolve() if images else None
    listing = list_images(root) if root else None
    records = {}
    checks = {}  # news id -> its cover's check (last line wins)
    bad: dict[str, BadRow] = {}  # in file order: the first value is the first malformed line
    first_changed = None
    good = num_bad = num_changed = 0
    for row in iter_news(path):
        if isinstance(row, BadRow):
            num_bad += 1
            remember_malformed(bad, row)
            continue
        good += 1
        if row.news_id in known:
            if known[row.news_id] != (row.category, row.subcategory, row.title, row.abstract):
                first_changed = first_changed or row
                num_changed += 1
            continue
        # An id repeated in the file: its last line wins, as in the ingest.
        check = inspect_image(root, row.news_id, listing=listing) if root else None
        if check is not None:
            checks[row.news_id] = check
        image_path = str(root / check.path) if check and check.path else None
        records[row.news_id] = {
            NEWS_ID: row.news_id, CATEGORY: row.category, SUBCATEGORY: row.subcategory, TITLE: row.title,
            ABSTRACT: row.abstract, IMAGE_PATH: image_path, IMAGE_STATUS: check.status if check else IMAGE_MISSING,
            CONTENT_HASH: content_hash(row.title, row.abstract, row.category, row.subcategory, check.sha256 if check else None),
            FIRST_SEEN_AT: pd.NaT,
        }
    # As the ingest names them: the operator needs the file, and nothing else says that an
    # article was scored without the cover the folder has for it.
    covers = UnusableCovers(log, rest="counted below, not named")
    for news_id, check in checks.items():
        covers.note(images, listing, news_id, check, "scored without a cover")
    if covers.count > NAMED_BAD_COVERS:
        log.warning("%s: %d new articles have an unusable cover file in %s (%s) and are scored without a cover",
                    path, covers.count, images, ", ".join(f"{n} {status}" for status, n in sorted(covers.by_status.items())))
    if bad:
        first_bad = next(iter(bad.values()))
        if not good:  # the wrong file (behaviors.tsv given as --news), as the ingest refuses it
            raise RecsysError(f"--news {path}: every one of its {num_bad} lines was bad (first: {first_bad.reason}); "
                              "is it the right file?")
        log.warning("%s: %d malformed lines left out (first: %s); a candidate only they name stops the scoring",
                    path, num_bad, first_bad.reason)
    if first_changed is not None:
        log.warning("%s: %d lines differ from the stored article of their id (first: line %d, %s) and are scored as "
                    "stored; ingest the file to update them", path, num_changed, first_changed.line, first_changed.news_id)
    bad = {news_id: row for news_id, row in bad.items() if news_id not in records and news_id not in known}
    return pd.DataFrame.from_records(list(records.values()), columns=list(NEWS_FRAME_COLUMNS)), bad


@dataclass(frozen=True)
class ScoringSpan:
    """The times a behaviors file's side features can read: its impressions' first and last
    time and the longest popularity window of the models that score it."""

    first: datetime | None  # None: no line of the file has a time (nothing to score)
    last: datetime | None
    window_hours: float

    def log_window(self, end: datetime | None) -> tuple[datetime, datetime]:
        """``[since, until)`` of the popularity log that scoring can count, for a store ending at ``end``.

        Popularity at ``t`` counts ``[t - window, t)`` and is read at ``t`` or at ``min(t, end)``
        (FEATURES_AT), so nothing before ``min(first, end) - window`` or from ``last`` on counts.
        A file without times gets an empty window.
        """
        if self.first is None or self.last is None:
            return datetime(1970, 1, 1), datetime(1970, 1, 1)
        start = self.first if end is None else min(self.first, end)
        return start - timedelta(hours=self.window_hours), self.last

    def check(self, times: np.ndarray, path: Path, lines: np.ndarray) -> None:
        """Raises RecsysError for an impression outside the scanned span: the file changed
        between the scan and the parse, and its side features would miss part of the log."""
        lo = np.datetime64(self.first, "s") if self.first is not None else None
        outside = np.ones(len(times), dtype=bool) if lo is None else (times < lo) | (times > np.datetime64(self.last, "s"))
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise RecsysError(f"{path} line {int(lines[i])}: time {times[i]} is outside {self.first} .. {self.last}, "
                              "the times the file held when it was scanned: it changed while it was read; run again")


def scoring_span(scan: BehaviorsScan, versions: list[ModelVersion]) -> ScoringSpan:
    """The span of a scanned behaviors file (``scan_behaviors``) for these versions: the
    longest popularity window of their bundles."""
    hours = max(SideFeatures.from_dict(read_bundle_config(mv.model_dir)["side_features"]).window_hours for mv in versions)
    return ScoringSpan(scan.first, scan.last, hours)


def read_popularity_log(engine: Engine, news_ids: np.ndarray, span: ScoringSpan | None) -> tuple[InteractionLog, datetime | None]:
    """The popularity log over ``news_ids`` that a file of ``span`` can count (the whole store's
    when None), and the store's end: one second after its last labelled show, None if it has none."""
    _, last_show = repo.time_range(engine, labelled_only=True)
    end = None if last_show is None else last_show + timedelta(seconds=1)
    since, until = span.log_window(end) if span is not None else (None, None)
    return repo.read_interaction_log(engine, news_ids, since=since, until=until), end


def load_scoring_catalogue(
    engine: Engine, workspace: Workspace, config: Config, *, news: Path | None, images: Path | None,
    span: ScoringSpan | None = None, versions: Sequence[ModelVersion] = (),
) -> Catalogue:
    """Every article the store and ``news`` hold, encoded, with the store's logs; ``versions``
    built with other encoders are refused before anything is encoded (``encode_news``).

    ``span``: the popularity log is read only where the file's side features can look
    (``ScoringSpan.log_window``): a day or two of a store that may hold weeks (about 3 GB of
    log at MIND-large size). None reads the whole store's log.
    """
    stored = repo.read_news(engine)
    if news:
        known = dict(zip(stored[NEWS_ID], zip(stored[CATEGORY], stored[SUBCATEGORY], stored[TITLE], stored[ABSTRACT])))
        extra, bad_news = news_from_file(news, images, known)
    else:
        extra, bad_news = stored.iloc[:0], {}
    frames = [df for df in (stored, extra) if len(df)]
    if not frames:
        raise RecsysError("no articles to score: the store is empty and no --news file was given")
    catalogue = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    features = encode_news(catalogue, workspace, config, versions=versions)
    row_of = dict(zip(features.news_ids.tolist(), range(len(features))))
    events, end = read_popularity_log(engine, features.news_ids, span)
    clicks = repo.read_click_log(engine, features.news_ids)
    item_codes = item_key_codes(catalogue)
    skips = SkipReader(engine, span.first if span is not None else None, features.news_ids)
    return Catalogue(catalogue, features, row_of, events, first_seen_array(catalogue), clicks,
                     None if end is None else np.datetime64(end, "s"), span, bad_news, len(stored), item_codes, skips)


@dataclass
class ScoredChunk:
    impressions: Impressions
    scores: dict  # model name -> (c,) probabilities aligned with impressions.candidate_items
    lines: np.ndarray  # (m,) line numbers in the behaviors file
    read: Impressions  # the same impressions with the histories the first model reads (VersionScorer.read)


def iter_behavior_chunks(
    path: Path, catalogue: Catalogue, *, chunk_size: int = 20_000, history_len: int = 50, tally: dict | None = None,
) -> Iterator[tuple[Impressions, np.ndarray]]:
    """Chunks of a behaviors file as ``Impressions`` (labels -1 where the file has none), each
    of at most ``chunk_size`` lines and ``MAX_BATCH_IDS`` News ids (``recsys.data.mind.batches``).

    History entries that name no article of the catalogue are left out of the histories;
    ``tally[IGNORED_HISTORY]`` counts them (predict and evaluate report it).

    Raises:
        SchemaError: a malformed row, or a candidate article missing from the catalogue.
    """
    from recsys.data.mind import FirstLines, batches, iter_behaviors

    missing_history = 0
    seen = FirstLines()  # a repeated ImpressionID would put two lines of one id in the prediction file
    with iter_behaviors(path) as rows:  # closed also when a bad line stops the read
        # Cut by ids too: a chunk of lines with thousands of History ids each held GBs of strings.
        for buf in batches(rows, chunk_size):
            _refuse_bad_rows(buf, seen, catalogue, path, history_len)
            imps, dropped = _chunk(buf, catalogue, path, history_len)
            missing_history += dropped
            if tally is not None:
                tally[IGNORED_HISTORY] = tally.get(IGNORED_HISTORY, 0) + dropped
            yield _checked(imps, np.array([r.line for r in buf]), catalogue.span, path)
    if missing_history:
        log.warning("%s: %d history entries name articles not in the catalogue and were ignored", path, missing_history)


def _refuse_bad_rows(rows: list, seen, catalogue: Catalogue, path: Path, history_len: int) -> None:
    """Raise SchemaError for the first bad line of a chunk, whatever its fault: a malformed
    line, an ImpressionID an earlier line has (the MIND prediction format has one line per id;
    ingest quarantines such a line), or a candidate missing from the catalogue. Reporting one
    kind before the others named a later line first, so each fix revealed an earlier one."""
    from recsys.data.mind import BadRow, repeated_impression_ids

    malformed = next((row for row in rows if isinstance(row, BadRow)), None)
    good = [row for row in rows if not isinstance(row, BadRow)]
    repeated = repeated_impression_ids(good, seen, str(path))
    problems = ([malformed] if malformed is not None else []) + ([repeated[min(repeated)]] if repeated else [])
    if not problems:
        return
    first = min(problems, key=lambda bad: bad.line)
    _chunk([row for row in good if row.line < first.line], catalogue, path, history_len)  # raises on an unknown candidate
    raise SchemaError(first.file, first.line, first.field, first.value, first.expected)


def _checked(imps: Impressions, lines: np.ndarray, span: ScoringSpan | None, path: Path) -> tuple[Impressions, np.ndarray]:
    if span is not None:
        span.check(imps.times, path, lines)
    return imps, lines


def _chunk(rows: list, catalogue: Catalogue, path: Path, history_len: int) -> tuple[Impressions, int]:
    row_of = catalogue.row_of
    h_lists, c_lists, l_lists = [], [], []
    dropped = 0
    for row in rows:
        # MIND lists history oldest first; the model reads most recent first.
        hist = [row_of.get(n) for n in reversed(row.history)]
        known = [h for h in hist if h is not None]
        dropped += len(hist) - len(known)
        h_lists.append(known[:history_len])
        cands = []
        for n in row.news_ids:
            r = row_of.get(n)
            if r is None:
                if row.labels is None and is_bad_label(n, row_of):
                    raise SchemaError(path, row.line, IMPRESSIONS, n, EXPECTED_LABEL)
                raise SchemaError(path, row.line, IMPRESSIONS, n, expected_news_id("--news", catalogue.bad_news.get(n)))
            cands.append(r)
        c_lists.append(cands)
        l_lists.append(row.labels if row.labels is not None else [-1] * len(cands))
    h_off = np.concatenate([[0], np.cumsum([len(h) for h in h_lists])]).astype(np.int64)
    c_off = np.concatenate([[0], np.cumsum([len(c) for c in c_lists])]).astype(np.int64)
    flat = lambda lists, dtype: np.fromiter((x for xs in lists for x in xs), dtype=dtype, count=-1)  # noqa: E731
    imps = Impressions(
        impression_ids=np.array([r.impression_id for r in rows], dtype=np.int64),
        user_ids=np.array([r.user_id for r in rows], dtype=object),
        times=np.array([np.datetime64(r.time, "s") for r in rows], dtype="datetime64[s]"),
        history_offsets=h_off,
        history_items=flat(h_lists, np.int32),
        candidate_offsets=c_off,
        candidate_items=flat(c_lists, np.int32),
        labels=flat(l_lists, np.int8),
    )
    return imps, dropped


def check_features_at(features_at: str) -> None:
    """Raises RecsysError for a value not in FEATURES_AT (before any data is read)."""
    if features_at not in FEATURES_AT:
        raise RecsysError(f"--features-at is {features_at!r}, expected one of {list(FEATURES_AT)}")


@dataclass(frozen=True)
class FeatureTimes:
    """Caps on the times at which a behaviors file's side features are read: an impression at
    ``t`` reads popularity at ``min(t, popularity_until)`` and age at ``min(t, age_until)``;
    None reads at ``t``."""

    popularity_until: np.datetime64 | None = None
    age_until: np.datetime64 | None = None

    def describe(self) -> str:
        """For reports and summaries: where side features were read."""
        def at(until: np.datetime64 | None) -> str:
            return "impression time" if until is None else f"impression time, at most the store's end {pd.Timestamp(until).isoformat()}"

        if self.popularity_until == self.age_until:  # both None, or both the store's end
            return at(self.popularity_until)
        return f"popularity at {at(self.popularity_until)}; age at {at(self.age_until)}"


def feature_times(catalogue: Catalogue, features_at: str) -> FeatureTimes:
    """Where side features are read for ``features_at`` (one of FEATURES_AT); the store's end is
    one second after its last logged show.

    Raises:
        RecsysError: an unknown ``features_at``, or ``"store-end"`` with no show in the store.
    """
    check_features_at(features_at)
    end = catalogue.end
    if features_at == "impression":
        return FeatureTimes()
    if features_at == "popularity-at-end":
        # with nothing logged every popularity window is empty wherever it is read
        return FeatureTimes(popularity_until=end)
    if end is None:
        raise RecsysError("--features-at store-end: the store holds no labelled impression, so it has no end; "
                          "ingest behaviors first or use --features-at impression")
    return FeatureTimes(popularity_until=end, age_until=end)


def read_file_shows(path: Path, catalogue: Catalogue, *, chunk_size: int = 20_000) -> FileShows:
    """Every show of ``path``'s impressions at or after the store's end (all of them for a store
    without one): a pass over the file before it is scored, 8 bytes a candidate kept, plus the
    chunk being read (about 170 MB for 20k lines of 37 candidates; ``bench_file_shows.py``).
    Labels are not read. Malformed lines and unknown candidates are skipped here: the scoring
    pass stops at them with their line's error."""
    from recsys.data.mind import batches, iter_behaviors

    end = catalogue.end
    parts = []
    with iter_behaviors(path) as rows:
        for buf in batches(rows, chunk_size):
            raise_if_terminated()
            items, times = [], []
            for row in buf:
                if isinstance(row, BadRow):
                    continue
                t = np.datetime64(row.time, "s")
                if end is not None and t < end:
                    continue
                found = [r for r in map(catalogue.row_of.get, row.news_ids) if r is not None]
                items.extend(found)
                times.extend([t] * len(found))
            parts.append(FileShows.pack(np.array(items, dtype=np.int64), np.array(times, dtype="datetime64[s]")))
    return FileShows.from_packed(parts)


class VersionScorer:
    """A model version ready to score chunks: its bundle and the catalogue's embeddings.

    ``times``: where side features are read (``feature_times(catalogue, features_at)``); the
    default reads each impression's at its own time.
    ``shows``: the scored file's shows (``read_file_shows``): impressions after the store's end
    are scored with the version's file-exposure calibration, if it has one. None: without.
    """

    def __init__(self, mv: ModelVersion, catalogue: Catalogue, *, times: FeatureTimes = FeatureTimes(),
                 shows: FileShows | None = None):
        check_encoders(mv, catalogue.features.text_encoder.to_dict(), catalogue.features.image_encoder.to_dict())
        self.version = mv
        self.model = load_version_model(mv, catalogue.features)
        self.embeddings = self.model.item_embeddings(catalogue.features)
        self.catalogue = catalogue
        self.times = times
        self.exposure = self.model.config.file_exposure if shows is not None else None
        self.affinity = self.model.config.category_affinity
        if self.affinity is not None and catalogue.skips is None:
            raise ValueError(f"model version {mv.version} reads the category affinity; the catalogue has no skip reader")
        # Each article's keys: the publisher's, then this version's content clusters.
        self.item_codes = (None if self.affinity is None
                           else self.model.affinity_item_codes(catalogue.item_codes, self.embeddings))
        self.shows = shows
        # Fresh: never shown or listed in the store before its end; its popularity reads nothing,
        # and with the exposure it is of age 0, as in the fit (an unlabelled file ingested after
        # the store dates it by its first show there: that age is the hours column's).
        self.fresh, self.exposure_first_seen = fresh_as_of(catalogue.first_seen, catalogue.end)

    @property
    def uses_file_exposure(self) -> bool:
        """Whether impressions after the store's end are scored with the file's exposure."""
        return self.exposure is not None

    @property
    def history_len(self) -> int:
        return self.model.config.history_len

    @property
    def reading(self) -> tuple[bool, int]:
        """What ``read`` depends on: models with the same reading read the same histories."""
        return self.model.config.logged_clicks, self.history_len

    def read(self, impressions: Impressions) -> Impressions:
        """The impressions with the histories this model reads: served as trained, the user's
        clicks in the store before each impression lead its History column when it was trained so."""
        if self.model.config.logged_clicks:
            return with_logged_clicks(impressions, self.catalogue.clicks, self.history_len)
        return impressions

    def score(self, impressions: Impressions) -> np.ndarray:
        return self.score_read(self.read(impressions))

    def score_read(self, read: Impressions) -> np.ndarray:
        """(c,) probabilities of impressions already ``read`` by this model."""
        after = np.ones(len(read), dtype=bool) if self.catalogue.end is None else read.times >= self.catalogue.end
        # one read for both parts (and for every version scoring the chunk)
        skips = None if self.affinity is None else self.catalogue.skips(read.user_ids).counts(self.item_codes)
        if self.exposure is None or not after.any():
            return self._score_plain(read, skips)
        if after.all():
            return self._score_exposed(read, skips)
        # A chunk across the store's end: the impressions before it exactly as without the
        # file's exposure, each part scored once.
        out = np.empty(len(read.candidate_items), dtype=np.float32)
        exposed = after[candidate_impression_rows(read)]
        out[exposed] = self._score_exposed(select_impressions(read, after), skips)
        out[~exposed] = self._score_plain(select_impressions(read, ~after), skips)
        return out

    def _score_plain(self, read: Impressions, skips: SkipCounts | None) -> np.ndarray:
        if self.affinity is None:
            return self.model.score_impressions(read, self.embeddings, self.catalogue.log, self.catalogue.first_seen,
                                                popularity_until=self.times.popularity_until, age_until=self.times.age_until)
        logits = self.model.score_impressions(read, self.embeddings, self.catalogue.log, self.catalogue.first_seen,
                                              popularity_until=self.times.popularity_until,
                                              age_until=self.times.age_until, logits=True)
        return _sigmoid(self._with_affinity(read, logits, skips))

    def _score_exposed(self, read: Impressions, skips: SkipCounts | None) -> np.ndarray:
        """Probabilities with the file's exposure (impressions at or after the store's end)."""
        logits = self.model.score_impressions(read, self.embeddings, self.catalogue.log, self.exposure_first_seen,
                                              popularity_until=self.times.popularity_until,
                                              age_until=self.times.age_until, logits=True)
        if self.affinity is not None:  # fitted first, as the exposure was fitted on top of it
            logits = self._with_affinity(read, logits, skips)
        items = read.candidate_items
        counts, hours = self.shows.earlier(items, read.times[candidate_impression_rows(read)],
                                           window_hours=self.exposure.window_hours)
        return _sigmoid(self.exposure.logits(logits, counts, hours, self.fresh[items]))

    def _with_affinity(self, read: Impressions, logits: np.ndarray, skips: SkipCounts) -> np.ndarray:
        """(c,) float64 ``logits`` combined with the readers' category affinity (``skips``: theirs)."""
        return self.affinity.logits(logits, *affinity_inputs(read, skips, self.item_codes, self.history_len))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return sigmoid(z).astype(np.float32)


def describe_reading(times: FeatureTimes, scorers: dict[str, VersionScorer], file_exposure: bool) -> str:
    """Where side features were read and whether the file's exposure was (reports and summaries);
    logs a warning for versions asked to read it that have no calibration."""
    text = times.describe()
    if not file_exposure:
        return f"{text}; file exposure off"
    without = [name for name, s in scorers.items() if not s.uses_file_exposure]
    if without:
        log.warning("model version%s %s %s no file-exposure calibration (trained before recsys fitted one): scored "
                    "without the file's exposure; retrain, or compare versions with --no-file-exposure",
                    "s" if len(without) > 1 else "", ", ".join(without), "have" if len(without) > 1 else "has")
    if len(without) == len(scorers):
        return f"{text}; file exposure: no version has a calibration"
    text += "; file exposure (earlier shows in the file) after the store's end"
    return text + (f", not for {', '.join(without)} (no calibration)" if without else "")


def iter_scored(
    path: Path, catalogue: Catalogue, scorers: dict[str, VersionScorer], *, chunk_size: int = 20_000, tally: dict | None = None,
) -> Iterator[ScoredChunk]:
    """Every model's scores for each chunk of ``path`` (``tally``: see ``iter_behavior_chunks``)."""
    history_len = max((s.history_len for s in scorers.values()), default=50)
    for imps, lines in iter_behavior_chunks(path, catalogue, chunk_size=chunk_size, history_len=history_len, tally=tally):
        raise_if_terminated()  # a SIGTERM whose exception some library swallowed
        reads: dict[tuple[bool, int], Impressions] = {}  # one reading per kind, shared by the models that read alike
        scores = {}
        for name, s in scorers.items():
            if s.reading not in reads:
                reads[s.reading] = s.read(imps)
            scores[name] = s.score_read(reads[s.reading])
            _check_finite(scores[name], name, imps, lines, path)
        yield ScoredChunk(imps, scores, lines, next(iter(reads.values()), imps))


def _check_finite(scores: np.ndarray, name: str, imps: Impressions, lines: np.ndarray, path: Path) -> None:
    """Raises RecsysError naming the line, impression and candidate of the first score that is
    not a finite number (a broken model file or non-finite article features), before any
    metric or prediction line takes it."""
    bad = ~np.isfinite(scores)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        i = int(np.searchsorted(imps.candidate_offsets, j, side="right") - 1)
        raise RecsysError(
            f"{path} line {int(lines[i])}: model {name} scores candidate {j - int(imps.candidate_offsets[i]) + 1} "
            f"of impression {int(imps.impression_ids[i])} as {float(scores[j])}, expected a finite probability; "
            "the model version or the article's features are broken (retrain, or re-encode the article)"
        )
