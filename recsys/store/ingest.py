"""Loading MIND files into the store: validate, quarantine bad rows, upsert in batches.

News first, then behaviors. Files are streamed; each batch of lines is written in one
transaction, and every write is an upsert whose result does not depend on what an earlier,
interrupted run already wrote (minimum of first-seen times, the history of the latest
impression, delete-then-insert of an impression's items). So the same files twice give the
same store, and a crash followed by a rerun gives the store one clean run gives. A corrected
line (the same source and id, another user or time) takes back the first-seen times its show
set and the History it gave: both are recounted in the batch that moves it, or before the
first batch, so a rerun finds nothing left to do.

``strict=True`` runs the whole ingest in one transaction that is rolled back at the first
bad row, so nothing at all is written (no quarantine file either).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import time as clock
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from recsys.atomic import remove_stale
from recsys.clock import utc_now
from recsys.columns import IMAGE_MISSING, IMAGE_OK, IMAGE_STATUSES
from recsys.data.images import ImageCheck, check_image_file, image_names, inspect_image, list_images
from recsys.data.mind import (
    EXPECTED_LABEL, IMPRESSIONS, BadRow, BehaviorRow, FirstLines, NewsRow, RowStream, batches, expected_news_id,
    impression_keys, is_bad_label, iter_behaviors, iter_news, malformed_note, remember_malformed, repeated_impression_ids,
    scan_behaviors, user_time_key,
)
from recsys.errors import ConfigError, RecsysError
from recsys.escapes import TERMINAL_ESCAPES, escape_of
from recsys.interrupts import raise_if_terminated
from recsys.store import schema
from recsys.store.bulk import BulkWriter, bulk_writer
from recsys.store.database import SQLITE_BEGIN, STORE_FAILURES, first_line

_QUARANTINE_HEADER = ("file", "line", "field", "reason", "raw")
# Unusable cover files named one by one on the log; the rest are counted.
NAMED_BAD_COVERS = 20
NAMED_UNKNOWN_HISTORY = 20  # lines named on the log for a History id nobody has
# Lines named on the log for an impression another source holds, and (separately) for one this
# source holds under another impression id.
NAMED_STORED_ELSEWHERE = 5
log = logging.getLogger("recsys.ingest")
# A quarantine temp file unchanged this long was left by a killed ingest (see _QuarantineFile).
STALE_QUARANTINE_SECONDS = 3600
_NEWS_UPDATED = (
    "category", "subcategory", "title", "abstract", "url", "title_entities", "abstract_entities",
    "image_path", "image_status", "image_sha256", "content_hash",
)


# A behaviors file whose impressions would replace, under ids its source name already holds,
# more than this share of those stored impressions (at least MIN_LOST_IMPRESSIONS of them)
# with ones of another user or time that the file does not bring back under any id, is refused
# as another file under the same name: MIND restarts impression ids at 1 in every file, so a
# dev file in a folder named like train's, or a daily file at a fixed path, would replace
# yesterday's impressions in place. A redelivery of the same log (lines dropped, inserted or
# renumbered) or a correction of some lines loses few; ``ingest(replace=True)`` lets a file
# that re-times them all (a time-zone correction) through.
MAX_LOST_SHARE = 0.5
MIN_LOST_IMPRESSIONS = 20


class ReplacingImpressionsError(RecsysError):
    """A behaviors file would replace most impressions its source name holds with others: most
    likely another file under the same source name. None of its lines is stored."""


@dataclass
class IngestReport:
    """What one ``ingest`` call did.

    Attributes:
        news: news rows accepted (inserted or updated).
        news_changed: of those, articles the store held with another title, abstract, category,
            subcategory or cover (the last ingest of an article wins, whatever the file's age).
        users: users new to the store.
        impressions: impressions accepted (inserted or replaced).
        impressions_changed: of those, impressions whose (source, impression id) the store held
            with another user or time: replaced by a corrected file, or by another file stored
            under the same source name (MIND restarts impression ids at 1 in every file).
        first_changed_impression: the first of those, "line L (impression id I)" of the
            behaviors file; None when there is none.
        impressions_stored_elsewhere: impressions not stored because the store holds the same
            impression (user, time, candidates and labels) under another source: the same file
            ingested again under another name, or files whose windows overlap. Stored twice,
            their clicks would count twice in every popularity and training figure.
        impressions_repeated: impressions not stored because an earlier line of the file brought
            the same impression under another impression id (a log line written twice): stored
            twice, its clicks would count twice. That id keeps what it holds.
        impression_items: candidate rows written.
        histories_not_replaced: lines whose History was not stored although no stored or earlier
            History of the user is more recent: another History of the same user at the very same
            second was ingested first (by an earlier call or an earlier line) and is kept.
        unknown_history_ids: History entries naming an article neither the store nor the news
            file has (a news line quarantined, say), left out of the stored History; their
            impressions are kept, as ``predict`` and ``evaluate`` keep theirs.
        clicks: click-row writes: History entries of replaced histories + (user, article) pairs
            clicked, per batch. Not the rows added to ``clicks``: a pair both in the History and
            clicked counts twice, and a rerun counts its clicked pairs again (docs/data-contract.md).
        clicks_withdrawn: (user, article) pairs that only the impressions this file replaced in
            place had clicked: the file's lines do not click them and no other stored impression
            does, so they are no longer stored with a click time. Counted once per file,
            whatever the batches.
        first_seen_recounted: articles whose first-seen time the impressions this file moved (a
            corrected user or time under the same id) had set, and which the recount from the
            stored shows and History listings, in the batch that moved them, changed.
        labels_dropped: impressions with clicks that an unlabelled line of this file (a test
            file under the source of a labelled one) replaced: their labels and clicks are gone.
        num_bad_rows: lines not loaded (also in the quarantine file and table).
        lines_by_file: {file (resolved path): its lines read, good and bad}.
        bad_rows_by_file: {file (resolved path): its lines not loaded}.
        first_bad_row: {file (resolved path): the reason of its first line not loaded}.
        quarantine_file: the quarantine TSV of this call, None when there was no bad row.
        source: the name the behaviors file's impressions are stored under.
        image_status: articles per image status (news ingest only).
        elapsed: seconds per stage ("news", "behaviors", "total").
    """

    news: int = 0
    news_changed: int = 0
    users: int = 0
    impressions: int = 0
    impressions_changed: int = 0
    first_changed_impression: str | None = None
    impressions_stored_elsewhere: int = 0
    impressions_repeated: int = 0
    impression_items: int = 0
    unknown_history_ids: int = 0
    histories_not_replaced: int = 0
    clicks: int = 0
    clicks_withdrawn: int = 0
    first_seen_recounted: int = 0
    labels_dropped: int = 0
    num_bad_rows: int = 0
    lines_by_file: dict[str, int] = field(default_factory=dict)
    bad_rows_by_file: dict[str, int] = field(default_factory=dict)
    first_bad_row: dict[str, str] = field(default_factory=dict)
    quarantine_file: str | None = None
    source: str | None = None
    image_status: dict[str, int] = field(default_factory=dict)
    elapsed: dict[str, float] = field(default_factory=dict)


def quarantine_key(path: str | Path) -> str:
    """How the ingest names a file: in the quarantine table and ``IngestReport.bad_rows_by_file``."""
    return str(Path(path).resolve())


def default_source(behaviors_path: str | Path) -> str:
    """``<parent folder name>/<file stem>``, e.g. ``MINDsmall_train/behaviors``."""
    path = Path(behaviors_path).resolve()
    return f"{path.parent.name}/{path.stem}"


def check_source(source: str, label: str = "source", *, given: bool = True) -> None:
    """Refuse a source name the store cannot hold, before anything is written.

    Args:
        given: typed by the user (``--source``), not ``default_source``'s folder and stem,
            which may keep a space at an end that nobody typed.

    Raises:
        ConfigError: not UTF-8, blank, too long, or (``given``) with white space at an end;
            the message starts with ``label``.
    """
    limit = schema.impressions.c.source.type.length
    try:
        source.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 reach Python as surrogates: no driver sends them
        raise ConfigError(f"{label} {source.encode('utf-8', 'surrogateescape')!r}: not valid UTF-8") from None
    if not source.strip():  # an unset variable or a stray space: a name nobody would find again
        raise ConfigError(f"{label} {source!r} is blank, expected a name of 1 to {limit} characters")
    if given and source != source.strip():  # `train --source x` would not find ' x'
        raise ConfigError(f"{label} {source!r} starts or ends with white space, expected a name without it")
    if len(source) > limit:
        raise ConfigError(f"{label} {source!r} must have 1 to {limit} characters")


def check_path_name(label: str, path: str | Path) -> None:
    """Refuse a file whose path is not UTF-8: the store records each file by its path
    (``quarantine_key``, ``default_source``), which no driver can send.

    Raises:
        ConfigError: naming the file (its bytes).
    """
    try:
        quarantine_key(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(Path(path).resolve())  # the folder above may be what is not UTF-8
        raise ConfigError(f"{label} {shown!r}: its path is not valid UTF-8 (the store records files by path): "
                          "rename it") from None


def ingest(
    engine: Engine,
    *,
    news_path: str | Path | None = None,
    behaviors_path: str | Path | None = None,
    images_dir: str | Path | None = None,
    source: str | None = None,
    strict: bool = False,
    quarantine_dir: Path,
    batch_size: int = 5000,
    progress: Callable[[int], None] | None = None,
    replace: bool = False,
) -> IngestReport:
    """Validate MIND files and load them into the store.

    Args:
        engine: the store (migrated, see ``open_store``).
        news_path: a news.tsv, loaded first. Rows update articles with the same NewsID.
        behaviors_path: a behaviors.tsv (labelled or not). Every news id it mentions must be
            in the store or in ``news_path``, else the line is a bad row.
        images_dir: folder of cover images ``<NewsID>.<jpg|jpeg|png|webp>``. An article it
            has no usable file for (or every article, without it) keeps the cover an earlier
            ingest stored if that file still checks ok; one it has no file for at all keeps a
            stored unusable cover's status and digest; else it gets image status "missing".
        source: name under which the impressions are stored (MIND impression ids restart in
            every file); default ``<parent folder>/<file stem>``. The caller keeps other
            writers of impressions out meanwhile (``recsys.pipelines.ingest.run_ingest`` holds
            the store's lock): each batch is checked against the impressions stored before it.
        strict: stop at the first bad row with SchemaError and write nothing.
        quarantine_dir: where the quarantine TSV is written
            (``<timestamp>-<file stem>.tsv``, one per call, only when there are bad rows).
        batch_size: lines per transaction (fewer when they hold more than ``MAX_BATCH_IDS``
            News ids, ``recsys.data.mind.batches``).
        progress: called with the number of lines done after each batch is written
            (and committed, unless ``strict``).
        replace: let the behaviors file replace the impressions its source holds even where it
            would drop most of them (``MAX_LOST_SHARE``): a correction that re-times them all.

    Returns:
        The counts, bad-row summary and timings.

    Raises:
        SchemaError: ``strict`` and a bad row (the message names file, line, field, value).
        ReplacingImpressionsError: without ``replace``, the behaviors file would drop most of
            the impressions its source holds under its ids (``MAX_LOST_SHARE``); none of its lines
            is stored (the news file's are, as when it has too many bad lines).
        ConfigError: no input file, a bad ``batch_size`` or ``source``, a missing
            images folder, or a quarantine file that cannot be written (its batch is rolled
            back, see ``_QuarantineFile``).
        MindFileError: an input file cannot be opened.
        StoreError: the store is neither SQLite nor PostgreSQL.
    """
    if news_path is None and behaviors_path is None:
        raise ConfigError("ingest needs a news file, a behaviors file or both")
    if batch_size < 1:
        raise ConfigError(f"batch_size is {batch_size}, expected at least 1")
    for label, path in (("news file", news_path), ("behaviors file", behaviors_path)):
        if path is not None:
            check_path_name(label, path)
    if behaviors_path is not None:
        given = source is not None
        source = default_source(behaviors_path) if source is None else source
        check_source(source, given=given)
    listing = None
    if images_dir is not None:
        images_dir = Path(images_dir)
        if not images_dir.is_dir():
            raise ConfigError(f"images folder {images_dir} does not exist or is not a folder")
        listing = list_images(images_dir)

    started = clock.perf_counter()
    now = utc_now()
    report = IngestReport(source=source if behaviors_path is not None else None)
    named_after = Path(behaviors_path if behaviors_path is not None else news_path)
    quarantine = _QuarantineFile(Path(quarantine_dir), f"{now:%Y%m%dT%H%M%S_%f}-{named_after.stem}.tsv")
    news_stream = behaviors_stream = None
    try:
        # Both files open before anything is written: a missing second file fails early.
        news_stream = iter_news(news_path) if news_path is not None else None
        # A first pass over the Time column finds the file's bulk, which bounds a wrong date.
        behaviors_stream = (iter_behaviors(behaviors_path, scan=scan_behaviors(behaviors_path))
                            if behaviors_path is not None else None)
        with engine.connect() as conn:
            # Take the write lock at BEGIN: a concurrent writer then waits (busy timeout)
            # instead of failing when this transaction upgrades a read lock.
            conn.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})
            if conn.dialect.name == "sqlite":
                with conn.begin():
                    conn.exec_driver_sql("PRAGMA cache_size = -131072")  # 128 MB of pages
            job = _Job(conn, bulk_writer(conn), strict, batch_size, progress, quarantine, report, now)
            with conn.begin() if strict else nullcontext():
                with job.transaction():
                    # Every known article with its first-seen time: held in memory for the
                    # whole ingest (it decides unknown ids and which first-seen times an
                    # impression actually moves), with the first History listings read alongside.
                    news = schema.news.c
                    known = {}
                    for n, seen, listed in conn.execute(sa.select(news.news_id, news.first_seen_at, news.first_listed_at)):
                        known[n] = seen
                        if listed is not None:
                            job.first_listed[n] = listed
                if news_stream is not None:
                    stage_start = clock.perf_counter()
                    job.ingest_news(news_stream, images_dir, listing, known, last_stage=behaviors_stream is None)
                    report.elapsed["news"] = clock.perf_counter() - stage_start
                if behaviors_stream is not None:
                    stage_start = clock.perf_counter()
                    job.before_behaviors(behaviors_path, source, refuse=not replace)
                    job.ingest_behaviors(behaviors_stream, source, known, last_stage=True)
                    report.elapsed["behaviors"] = clock.perf_counter() - stage_start
        # Already done in the last batch's transaction; here only when the last file had no line.
        path = quarantine.finish()
        quarantine.keep()
    except BaseException:
        quarantine.discard()
        raise
    finally:
        for stream in (news_stream, behaviors_stream):
            if stream is not None:
                stream.close()
    _refresh_statistics(engine, report)
    # Said once it is stored (a strict ingest rolls everything back on a bad row). INFO, not a
    # warning: a publisher's daily feed corrects titles every night, and nothing here can tell
    # that from the replay of an older file.
    if report.news_changed:
        log.info("%d articles already stored got other content (title, abstract, categories or cover) from %s, "
                 "first %s: the last ingest of an article wins, so replaying an older news file undoes later "
                 "corrections; they are encoded again by the next nightly run", report.news_changed, news_path,
                 job.first_changed_news)
    report.quarantine_file = str(path) if path is not None else None
    report.elapsed["total"] = clock.perf_counter() - started
    return report


def _moved_for_good(conn: Connection, path: str | Path, source: str, *,
                    refuse: bool) -> dict[tuple[str, datetime], list[int]]:
    """``{(user, time): impression ids}`` of the impressions that ``source`` holds under ``path``'s
    ids and that the file replaces with another user or time without bringing back under any id.

    Raises ReplacingImpressionsError (with ``refuse``) when those are most of the impressions the
    source holds under the file's ids (``MAX_LOST_SHARE``): another file under the same source
    name. Reads the file's ids, users and times only when the store holds impressions of
    ``source`` (a re-ingest: a first ingest replaces nothing), then streams that source's
    impressions once.
    """
    im = schema.impressions.c
    if conn.execute(sa.select(im.id).where(im.source == source).limit(1)).first() is None:
        return {}
    file_ids, file_keys = impression_keys(path)
    # Sorted arrays, looked up by searchsorted (pandas here cost the ingest 70 MB of RSS).
    ids_in_file, first_line = np.unique(file_ids, return_index=True)  # a repeated id: its first line
    key_of_id = file_keys[first_line]
    brought = np.unique(file_keys)
    held = 0
    lost: dict[tuple[str, datetime], list[int]] = {}
    example = None
    query = sa.select(im.impression_id, im.user_id, im.time).where(im.source == source).order_by(im.impression_id)
    # Streamed for this statement only: the job's later statements on ``conn`` read whole.
    result = conn.execute(query, execution_options={"stream_results": True, "yield_per": 50_000})
    for chunk in result.partitions():
        ids = np.fromiter((r[0] for r in chunk), np.int64, len(chunk))
        mine, at = _found(ids_in_file, ids)
        if not mine.any():
            continue
        stored = np.fromiter((user_time_key(r[1], r[2]) for r in chunk), np.int64, len(chunk))[mine]
        incoming = key_of_id[at[mine]]
        gone = np.flatnonzero((incoming != stored) & ~_found(brought, stored)[0])
        held += int(mine.sum())
        if not len(gone):
            continue
        rows = [row for row, m in zip(chunk, mine) if m]
        for i in gone:
            lost.setdefault((rows[i][1], rows[i][2]), []).append(rows[i][0])
        if example is None:
            r = rows[int(gone[0])]
            example = f"impression id {r[0]}, stored for user {r[1]} at {r[2]}"
    num_lost = sum(map(len, lost.values()))
    if refuse and num_lost >= MIN_LOST_IMPRESSIONS and num_lost > MAX_LOST_SHARE * held:
        raise ReplacingImpressionsError(
            f"{path}: {num_lost} of the {held} impressions that source {source!r} holds under this file's impression ids "
            f"would be replaced by impressions of another user or time and dropped (first: {example}): this looks like "
            "another behaviors file under the same source name (MIND restarts impression ids at 1 in every file). "
            "None of its lines were stored (a news file given with it was, unless --strict). Give each file its own "
            "--source (a nightly file at a fixed path: --source with the date); if this file corrects the one stored "
            "under that name, ingest it with --replace")
    return lost


def _found(sorted_values: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which of ``values`` the sorted ``sorted_values`` holds, and at which positions (those of
    the values not held are meaningless)."""
    if not len(sorted_values):
        return np.zeros(len(values), bool), np.zeros(len(values), np.int64)
    at = np.minimum(np.searchsorted(sorted_values, values), len(sorted_values) - 1)
    return sorted_values[at] == values, at


def _refresh_statistics(engine: Engine, report: IngestReport) -> None:
    """Give PostgreSQL's planner the statistics of what the ingest wrote. Autovacuum's analyze
    comes a while after a bulk load, if it is on at all, and a nightly ranks right after its
    ingest: without them each shard's history read scanned every click (benchmarks/bench_pg_store.py).
    Only the tables' owner (or the database's, a superuser; on PostgreSQL 17 a MAINTAIN grant)
    may analyze them: another role gets the server's warning in the log, and no statistics."""
    if engine.dialect.name != "postgresql" or not (report.news or report.impressions):
        return
    skipped: list[str] = []

    def on_notice(diagnostic) -> None:
        message = diagnostic.message_primary or ""
        # PostgreSQL 15: 'skipping "t" --- only table or database owner can analyze it'; 16 and
        # later: 'permission denied to analyze "t", skipping it'.
        if diagnostic.severity_nonlocalized == "WARNING" and "analyze" in message and "skipping" in message:
            skipped.append(message)

    try:
        with engine.begin() as conn:
            # Not behind a VACUUM or an index build for long (5 s a table at most): the night waits on this.
            conn.exec_driver_sql("SET LOCAL lock_timeout = '5s'")
            driver = conn.connection.dbapi_connection
            driver.add_notice_handler(on_notice)
            try:
                conn.exec_driver_sql("ANALYZE news, users, impressions, impression_items, clicks")
            finally:
                driver.remove_notice_handler(on_notice)
    except STORE_FAILURES as exc:  # what the ingest stored is committed and stays
        log.warning("could not update the store's planner statistics after the ingest (%s); the next ingest or "
                    "autovacuum does", first_line(exc))
        return
    if skipped:
        log.warning("the store's role cannot update its planner statistics (%s): until autovacuum or the tables' "
                    "owner runs ANALYZE, the nightly reads histories slowly (docs/operations.md, \"PostgreSQL roles\")",
                    skipped[0])


class UnusableCovers:
    """Names on the log each article whose cover file is there but unusable (empty, corrupt, too
    large, a bad name), the first ``NAMED_BAD_COVERS`` of them, and counts them all by status: a
    report only counts statuses, and the operator needs the file. The ingest and the articles
    that scoring reads from ``--news`` (``news_from_file``) word them alike.

    Args:
        logger: where the warnings go.
        rest: what the warning after the last named file says of the others.
    """

    def __init__(self, logger: logging.Logger, *, rest: str):
        self.logger = logger
        self.rest = rest
        self.by_status: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.by_status.values())

    def note(self, images_dir: Path | None, listing, news_id: str, check: ImageCheck, outcome: str) -> None:
        """Count and (the first ``NAMED_BAD_COVERS``) name ``news_id``'s cover if unusable.

        Args:
            images_dir: the images folder as given (the files are named under it).
            listing: ``list_images(images_dir)``, or None.
            news_id: the article.
            check: ``inspect_image``'s result for it; ok and missing are not named.
            outcome: what became of the article, e.g. "the article has no cover".
        """
        if check.status in (IMAGE_OK, IMAGE_MISSING):
            return
        self.by_status[check.status] += 1
        if self.count <= NAMED_BAD_COVERS:
            names = image_names(listing, news_id) if listing else []
            where = ", ".join(str(Path(images_dir) / n) for n in names) or f"in {images_dir}"
            why = f": {check.reason}" if check.reason else ""
            self.logger.warning("cover of %s is %s (%s%s): %s", news_id, check.status, where, why, outcome)
        elif self.count == NAMED_BAD_COVERS + 1:
            self.logger.warning("more unusable cover files: %s", self.rest)


@dataclass
class _Job:
    """State of one ingest call: the connection, the writer and the running report."""

    conn: Connection
    writer: BulkWriter
    strict: bool
    batch_size: int
    progress: Callable[[int], None] | None
    quarantine: _QuarantineFile
    report: IngestReport
    now: datetime
    bad_covers: UnusableCovers = field(default_factory=lambda: UnusableCovers(
        log, rest="counted in the report's image_status, not named"))
    unknown_history_lines: int = 0  # lines with an unknown History id so far (NAMED_UNKNOWN_HISTORY logged)
    first_changed_news: str | None = None  # the first stored article given other content
    # The news file's malformed lines by the id each starts with (``remember_malformed``): an
    # impression naming an id that only such a line has is that line's fault, and says so.
    bad_news: dict[str, BadRow] = field(default_factory=dict)
    # (user, article) pairs whose only clicks this file's lines replaced, less those a later
    # batch clicks again: counted once per file, whatever the batches (``clicks_withdrawn``).
    withdrawn: set[tuple[str, str]] = field(default_factory=set)
    # Each article's first History listing (the ones stored, read with ``known``; none for most).
    first_listed: dict[str, datetime | None] = field(default_factory=dict)

    def transaction(self) -> AbstractContextManager:
        # strict mode already holds one transaction around everything.
        return nullcontext() if self.strict else self.conn.begin()

    def before_behaviors(self, path: str | Path, source: str, *, refuse: bool) -> None:
        """Before the behaviors stage (the news file's lines are stored by then, unless
        ``strict``, and so stays the quarantine file of its bad lines): refuse another file
        under the same source (``_moved_for_good``, with ``refuse``), and let go of the Histories
        that lines this file moves away for good gave.

        A user's History is replaced only by a later line (``users.history_at``). One that a
        moved line gave (a clock error's future date) would keep the user's real lines out, so
        its time is cleared for the whole file before its first batch: the file's lines of the
        user then compete as on a store that never held it, whatever the batches. The History
        itself stays until the user's next line (the store keeps no other line's History).
        """
        try:
            with self.transaction():
                gone = _moved_for_good(self.conn, path, source, refuse=refuse)
                if gone:
                    im = schema.impressions.c
                    # Not when another stored impression that stays is of that user at that second.
                    elsewhere = {(u, t) for u, t, src, imp_id in self.writer.select_pairs_in(
                        sa.select(im.user_id, im.time, im.source, im.impression_id), (im.user_id, im.time), list(gone))
                        if src != source or imp_id not in gone[(u, t)]}
                    self.writer.update(
                        schema.users, "user_id", ("user_id", "history_at"), sorted(set(gone) - elsewhere),
                        values=lambda src: {"history_at": sa.null()}, where=lambda src, t: t.history_at == src["history_at"])
        except ReplacingImpressionsError:
            if not self.strict:
                self.quarantine.finish()
                self.quarantine.keep()
            raise

    def _read(self, file_key: str, num_lines: int) -> None:
        self.report.lines_by_file[file_key] = self.report.lines_by_file.get(file_key, 0) + num_lines

    def _bad(self, bad: BadRow, file_key: str, pending: list[tuple]) -> None:
        if self.strict:
            raise bad.to_error()
        self.report.num_bad_rows += 1
        self.report.bad_rows_by_file[file_key] = self.report.bad_rows_by_file.get(file_key, 0) + 1
        self.report.first_bad_row.setdefault(file_key, bad.reason)
        self.quarantine.add(file_key, bad)
        pending.append((file_key, bad.line, bad.field[:64], bad.reason, self.now))

    def _begin_file(self, file_key: str) -> None:
        # The quarantine table mirrors the latest ingest of each file.
        with self.transaction():
            self.conn.execute(sa.delete(schema.quarantine).where(schema.quarantine.c.file == file_key))

    def _write_quarantine(self, rows: list[tuple]) -> None:
        if rows:
            self.writer.upsert(
                schema.quarantine, ("file", "line", "field", "reason", "created_at"), rows,
                key=("file", "line"), update=lambda ex, t: {"field": ex.field, "reason": ex.reason},
            )

    def _seal(self, last: bool) -> None:
        """Inside a batch's transaction, after its writes: the batch's bad lines reach the
        quarantine file (written and synced), which the batch holding the ingest's last line also
        renames into place, so that a file that cannot be written rolls its batch back."""
        self.quarantine.flush()
        if last:
            self.quarantine.finish()

    def _committed(self, last: bool) -> None:
        """Right after a batch's commit: the quarantine file the last batch renamed stays
        whatever happens next (a SIGTERM in the bookkeeping after it)."""
        if last and not self.strict:
            self.quarantine.keep()

    def _done(self, num_lines: int) -> None:
        self.quarantine.keep_alive()
        if self.progress is not None:
            self.progress(num_lines)

    # --- news ---------------------------------------------------------------------------

    def ingest_news(self, stream: RowStream, images_dir: Path | None, listing, known: dict[str, datetime | None], *,
                    last_stage: bool) -> None:
        file_key = quarantine_key(stream.path)
        self._begin_file(file_key)
        counts = self.report.image_status
        for status in IMAGE_STATUSES:
            counts.setdefault(status, 0)
        images_root = Path(images_dir).resolve() if images_dir is not None else None
        # A news id repeated in the file: its last line wins. Known before the first batch is
        # written (a first pass over the file, 0.4 s at 65k articles), so that an earlier line
        # is never stored in between and a second ingest of the file changes nothing.
        last_line = {r.news_id: r.line for r in iter_news(stream.path) if isinstance(r, NewsRow)}
        for lines, last in _batches(stream, self.batch_size):
            last = last and last_stage
            self._read(file_key, len(lines))
            pending_bad: list[tuple] = []
            latest: dict[str, NewsRow] = {}
            for row in lines:
                if isinstance(row, BadRow):
                    remember_malformed(self.bad_news, row)
                    self._bad(row, file_key, pending_bad)
                elif last_line.get(row.news_id, row.line) == row.line:
                    latest[row.news_id] = row
            checks = {
                news_id: ImageCheck(None, IMAGE_MISSING, None) if images_dir is None
                else inspect_image(images_dir, news_id, listing=listing)
                for news_id in latest
            }
            # No new file, or an unusable one: a good cover stored before is kept, not lost.
            kept = self._stored_covers({n: check for n, check in checks.items() if check.status != IMAGE_OK})
            self._name_bad_covers(images_dir, listing, checks, kept)
            records, hashes = [], {}
            for row in latest.values():
                check = checks[row.news_id]
                if row.news_id in kept:
                    path, check = kept[row.news_id]
                else:
                    # Absolute, so that later steps (encode, predict) find the file without
                    # being told the images folder again; containment was checked above.
                    path = None if check.path is None else str(images_root / check.path)
                counts[check.status] += 1
                hashes[row.news_id] = content_hash(row.title, row.abstract, row.category, row.subcategory, check.sha256)
                records.append((
                    row.news_id, row.category, row.subcategory, row.title, row.abstract, row.url,
                    row.title_entities, row.abstract_entities, path, check.status, check.sha256, hashes[row.news_id],
                    self.now,
                ))
            with self.transaction():
                self._count_changed_news(hashes, known)
                if records:
                    self.writer.upsert(
                        schema.news, ("news_id", *_NEWS_UPDATED, "updated_at"), records, key=("news_id",),
                        update=_news_update, where=_news_changed,
                    )
                self._write_quarantine(pending_bad)
                self._seal(last)
            self._committed(last)
            for news_id in latest:
                known.setdefault(news_id, None)
            self.report.news += len(records)
            self._done(len(lines))

    def _count_changed_news(self, hashes: dict[str, str], known: dict[str, datetime | None]) -> None:
        """Count (and name the first of) the stored articles this batch gives other content.

        The latest ingest of an article wins: a news file has no time of its own to tell an
        older file from a newer one, so the operator is told how many articles changed.
        """
        stored = [n for n in hashes if n in known]
        if not stored:
            return
        news = schema.news
        before = dict(self.writer.select_in(sa.select(news.c.news_id, news.c.content_hash), news.c.news_id, stored))
        changed = [n for n in stored if before.get(n, hashes[n]) != hashes[n]]
        if changed and self.report.news_changed == 0:
            self.first_changed_news = changed[0]
        self.report.news_changed += len(changed)

    def _name_bad_covers(self, images_dir: Path | None, listing, checks: dict[str, ImageCheck], kept: dict) -> None:
        """Name each unusable cover file of the batch, saying whether a stored cover was kept."""
        for news_id, check in checks.items():
            outcome = "kept the cover stored before" if news_id in kept else "the article has no cover"
            self.bad_covers.note(images_dir, listing, news_id, check, outcome)

    def _stored_covers(self, checks: dict[str, ImageCheck]) -> dict[str, tuple[str | None, ImageCheck]]:
        """``news_id -> (stored absolute path or None, its check)`` for the articles of
        ``checks`` (this file's checks that are not ok) whose stored cover is kept.

        A news file that brings no cover for an article (ingested without ``--images``, as
        MIND's dev file repeating train's articles is, or with a folder of the new covers
        only) keeps the stored one instead of stripping it: a good cover whose file still
        checks ok (also when this file's cover is unusable), and a stored unusable cover's
        status and digest (when this file has none), so that the store keeps saying which covers
        are broken and the article's content hash does not change. A stored good file that has
        gone or changed into something unusable is not kept: the article then has no cover.
        """
        if not checks:
            return {}
        news = schema.news
        query = sa.select(news.c.news_id, news.c.image_path, news.c.image_status, news.c.image_sha256).where(
            news.c.image_status != IMAGE_MISSING)
        with self.transaction():
            stored = self.writer.select_in(query, news.c.news_id, list(checks))
        kept = {}
        for news_id, path, status, sha256 in stored:
            if status == IMAGE_OK:
                check = check_image_file(path)
                if check.status == IMAGE_OK:
                    kept[news_id] = (path, check)
            elif checks[news_id].status == IMAGE_MISSING:
                kept[news_id] = (None, ImageCheck(None, status, sha256))
        return kept

    # --- behaviors ----------------------------------------------------------------------

    def ingest_behaviors(self, stream: RowStream, source: str, known: dict[str, datetime | None], *,
                         last_stage: bool) -> None:
        file_key = quarantine_key(stream.path)
        self._begin_file(file_key)
        seen = FirstLines()
        brought = FirstLines()  # the ids this file stored, and the lines that brought them
        for lines, last in _batches(stream, self.batch_size):
            last = last and last_stage
            self._read(file_key, len(lines))
            pending_bad: list[tuple] = []
            good: list[BehaviorRow] = []
            parsed = [r for r in lines if isinstance(r, BehaviorRow)]
            repeats = repeated_impression_ids(parsed, seen, stream.name)
            missing = set().union(*(r.news_ids for r in parsed), *(r.history for r in parsed)).difference(known)
            for row in lines:
                if isinstance(row, BehaviorRow):
                    row = (repeats.get(row.line) or (missing and _unknown_news(row, missing, known, stream.name, self.bad_news))
                           or row)
                if isinstance(row, BehaviorRow) and missing and not missing.isdisjoint(row.history):
                    row = self._without_unknown_history(row, missing, stream.name)
                if isinstance(row, BadRow):
                    self._bad(row, file_key, pending_bad)
                else:
                    good.append(row)
            with self.transaction():
                good = self._without_stored_twice(good, source, brought, stream.name)
                if good:
                    self._write_behaviors(good, source, known)
                    brought.add(np.fromiter((r.impression_id for r in good), np.int64, len(good)),
                                np.fromiter((r.line for r in good), np.int64, len(good)))
                self._write_quarantine(pending_bad)
                self._seal(last)
            self._committed(last)
            self._done(len(lines))

    def _without_stored_twice(self, rows: list[BehaviorRow], source: str, brought: FirstLines,
                              name: str) -> list[BehaviorRow]:
        """The rows less those whose impression the store would then hold twice.

        The same impression is the same user at the same time with the same candidates in the
        same order and the same labels (the History is not compared). A row is not stored when
        an earlier line of this file stored it under another impression id of this source
        (``impressions_repeated``: a log line written twice), or when another source
        holds it (``impressions_stored_elsewhere``) unless this source holds the row's own id,
        which keeps being replaced in place. A row whose own (source, id) holds it is a plain
        re-ingest and is stored. An id of this source that no earlier line stored is left to the
        rest of the file, which may give it something else (a re-delivery whose window moved):
        so a file stored twice gives one store and nothing is lost, and a renumbered copy of a
        stored file replaces its ids in place (``impressions_changed``) and may hold one of them
        twice. Each row is judged against the store as the file's earlier rows leave it, those
        of its own batch included, so that batch boundaries do not change the outcome: the
        store's impressions of the batch's exact (user, time) pairs are read (index on both;
        next to none on a night of new data) and their candidates compared.
        ``brought`` holds the ids the file's earlier batches stored, and their lines.
        """
        imp, items, w = schema.impressions, schema.impression_items, self.writer
        ids_at: dict[tuple[str, datetime], set[int]] = {}
        for r in rows:
            ids_at.setdefault((r.user_id, r.time), set()).add(r.impression_id)
        # Exact (user, time) pairs (index on both): a span re-reads a user's impressions in every
        # batch of a file not sorted by time (MIND's), whose span is the file's whole window, and
        # exact times alone re-read all the file stored so far on a log with coarse times.
        stored = w.select_pairs_in(
            sa.select(imp.c.id, imp.c.source, imp.c.impression_id, imp.c.user_id, imp.c.time),
            (imp.c.user_id, imp.c.time), sorted(ids_at),
        )
        ids = np.array(sorted({i for _, s, i, _, _ in stored if s == source}), np.int64)
        # Of this source's ids, the line of this file that stored each (0: none); this batch's
        # are added as they are kept.
        first_line = dict(zip(ids.tolist(), brought.lookup(ids).tolist()))
        # Only those some row other than their own could repeat: a re-ingest reads no candidates.
        wanted = {pk: ((user, time), (s, i)) for pk, s, i, user, time in stored
                  if s != source or (first_line[i] and ids_at[(user, time)] != {i})}
        shown: dict[int, tuple[list[str], list[int | None]]] = {}
        for pk, news_id, label in w.select_in(
                sa.select(items.c.impression_pk, items.c.news_id, items.c.label)
                .order_by(items.c.impression_pk, items.c.position), items.c.impression_pk, list(wanted)):
            news_ids, labels = shown.setdefault(pk, ([], []))
            news_ids.append(news_id)
            labels.append(label)
        # (user, time) -> {(source, impression id): (candidates, labels)}, kept up to date below.
        held: dict[tuple[str, datetime], dict[tuple[str, int], tuple[tuple, tuple]]] = {}
        where: dict[tuple[str, int], tuple[str, datetime]] = {}
        for pk, (pair, key) in wanted.items():
            news_ids, labels = shown.get(pk, ([], []))
            held.setdefault(pair, {})[key] = (tuple(news_ids), tuple(labels))
            where[key] = pair
        suspects = [r.impression_id for r in rows if any(s != source for s, _ in held.get((r.user_id, r.time), ()))]
        ours = {i for (i,) in w.select_in(sa.select(imp.c.impression_id).where(imp.c.source == source),
                                          imp.c.impression_id, suspects)}
        kept = []
        for r in rows:
            pair, own = (r.user_id, r.time), (source, r.impression_id)
            content = (r.news_ids, r.labels if r.labels is not None else (None,) * len(r.news_ids))
            same = [key for key, c in held.get(pair, {}).items() if key != own and c == content]
            repeat = next((i for s, i in same if s == source and 0 < first_line.get(i, 0) < r.line), None)
            elsewhere = [key for key in same if key[0] != source]
            if repeat is not None:
                self._name_repeated(r, source, repeat, name)
            elif elsewhere and r.impression_id not in ours:
                self._name_stored_elsewhere(r, source, *elsewhere[0], name)
            else:
                kept.append(r)
                # Its id holds this impression from now on, whatever the store had there before.
                old = where.pop(own, None)
                if old is not None:
                    del held[old][own]
                held.setdefault(pair, {})[own] = content
                where[own] = pair
                first_line[r.impression_id] = r.line
        return kept

    def _name_repeated(self, row: BehaviorRow, source: str, holder: int, name: str) -> None:
        self.report.impressions_repeated += 1
        if self.report.impressions_repeated <= NAMED_STORED_ELSEWHERE:
            log.warning("%s line %d: source '%s' holds this impression (user %s at %s, same candidates and "
                        "labels) as impression %d: not stored again as impression %d", name, row.line, source, row.user_id,
                        row.time.isoformat(sep=" "), holder, row.impression_id)

    def _name_stored_elsewhere(self, row: BehaviorRow, source: str, other_source: str, holder: int, name: str) -> None:
        self.report.impressions_stored_elsewhere += 1
        if self.report.impressions_stored_elsewhere <= NAMED_STORED_ELSEWHERE:
            log.warning("%s line %d: the store holds this impression (user %s at %s, same candidates and "
                        "labels) under source '%s' as impression %d: not stored again under '%s'",
                        name, row.line, row.user_id, row.time.isoformat(sep=" "), other_source, holder, source)

    def _without_unknown_history(self, row: BehaviorRow, missing: set[str], name: str) -> BehaviorRow:
        """The row of file ``name`` with its History's unknown articles left out, counted and the
        first few named."""
        unknown = [n for n in row.history if n in missing]
        self.unknown_history_lines += 1
        if self.unknown_history_lines <= NAMED_UNKNOWN_HISTORY:
            malformed = next((n for n in unknown if n in self.bad_news), None)
            where = "" if malformed is None else f" ({malformed_note('the news file', self.bad_news[malformed], malformed)})"
            log.warning("%s line %d: History names %s, which neither the store nor the news file has%s: left out "
                        "of the stored History, the impression is kept", name, row.line, ", ".join(unknown[:5]), where)
        self.report.unknown_history_ids += len(unknown)
        return dataclasses.replace(row, history=tuple(n for n in row.history if n not in missing))

    def _write_behaviors(self, rows: list[BehaviorRow], source: str, known: dict[str, datetime | None]) -> None:
        w, report = self.writer, self.report
        users, impressions, items, clicks, news = (
            schema.users, schema.impressions, schema.impression_items, schema.clicks, schema.news,
        )

        # The impressions of this source under the batch's ids, as stored before it: one whose
        # user or time the batch changes is a corrected (or another file's) line, and takes back
        # what it gave (below).
        ids = [r.impression_id for r in rows]
        by_source = sa.select(impressions.c.id, impressions.c.impression_id).where(impressions.c.source == source)
        before = w.select_in(by_source.add_columns(impressions.c.user_id, impressions.c.time), impressions.c.impression_id, ids)
        incoming = {r.impression_id: (r.user_id, r.time) for r in rows}
        changed = {imp_id for _, imp_id, user, time in before if incoming[imp_id] != (user, time)}
        moved = {(user, time) for _, imp_id, user, time in before if imp_id in changed}  # what they were

        # Users: first/last seen, and whose History this batch brings the latest of. Among the
        # Histories of one second, one that holds another (its ids in its order, and more)
        # wins, else the first listed: batch boundaries do not change the outcome.
        per_user: dict[str, list] = {}
        tied: dict[str, list] = {}  # per user, the other Histories of lines at its latest time
        for r in rows:
            agg = per_user.get(r.user_id)
            if agg is None:
                per_user[r.user_id] = [r.time, r.time, r.time, r.history]
            else:
                agg[0] = min(agg[0], r.time)
                agg[1] = max(agg[1], r.time)
                if r.time > agg[2]:
                    agg[2], agg[3] = r.time, r.history
                    tied.pop(r.user_id, None)
                elif r.time == agg[2]:
                    other = r.history
                    if _holds(r.history, agg[3]):
                        agg[3], other = r.history, agg[3]
                    tied.setdefault(r.user_id, []).append(other)
        stored = {
            u: (at, digest)
            for u, at, digest in w.select_in(
                sa.select(users.c.user_id, users.c.history_at, users.c.history_hash), users.c.user_id, per_user
            )
        }
        report.users += len(per_user) - len(stored)
        # The stored History of the users whose lines at its very second differ from it: a
        # fuller one replaces it (the same line again once the news file brings the ids an
        # earlier ingest left out: the documented way to restore them), a rival does not.
        at_stored = [u for u, (_, _, at, history) in per_user.items() if u in stored and at == stored[u][0]
                     and any(_history_hash(h) != stored[u][1] for h in (history, *tied.get(u, [])))]
        stored_history = self._stored_histories(at_stored)
        user_rows, new_history, stored_hash = [], {}, {}
        for u, (first, last, at, history) in per_user.items():
            old_at, old_hash = stored.get(u, (None, None))
            if old_at is None or at > old_at or (u in stored_history and _holds(history, stored_history[u])):
                new_history[u], stored_hash[u] = history, old_hash
                user_rows.append((u, first, last, at, _history_hash(history)))
                kept, rivals = history, tied.get(u, [])
            else:
                user_rows.append((u, first, last, old_at, old_hash))
                # At the stored time every line of the batch at it is a rival; earlier lines are not.
                kept, rivals = stored_history.get(u, history), ([history, *tied.get(u, [])] if at == old_at else [])
            # A corrected History re-delivered at the same time is not stored: said, not silent.
            # One that the kept History holds (a part of it) loses nothing.
            report.histories_not_replaced += sum(not _within(h, kept) for h in rivals)
        w.upsert(
            users, ("user_id", "first_seen_at", "last_seen_at", "history_at", "history_hash"), user_rows, key=("user_id",),
            update=lambda ex, t: {
                "first_seen_at": _least(t.first_seen_at, ex.first_seen_at),
                "last_seen_at": _greatest(t.last_seen_at, ex.last_seen_at),
                "history_at": ex.history_at,
                "history_hash": ex.history_hash,
            },
        )

        # Impressions, then their items (replaced whole, so a changed impression leaves no
        # stale positions behind). One stored under this source with another user or time is
        # counted: a re-ingest of the same file changes none.
        # The clicks the impressions about to be replaced gave, less those their new lines give
        # again at the same time: what they leave behind is recounted from the store below.
        held_clicks = self._clicks_of(before)
        old_clicks = {(user, time, news_id) for _, user, time, news_id in held_clicks}
        clicked_ids = {imp_id for imp_id, _, _, _ in held_clicks}
        for r in rows:
            if r.labels is not None:
                old_clicks.difference_update((r.user_id, r.time, n) for n, label in zip(r.news_ids, r.labels) if label == 1)
            elif r.impression_id in clicked_ids:
                report.labels_dropped += 1  # an unlabelled line took the place of a clicked impression
        moved_from = {user for user, _ in moved}  # users an impression moved away from (another user or time)
        if changed:
            if report.first_changed_impression is None:  # named: a renumbered copy shows itself there
                first = next(r for r in rows if r.impression_id in changed)
                report.first_changed_impression = f"line {first.line} (impression id {first.impression_id})"
            report.impressions_changed += len(changed)
        w.upsert(
            impressions, ("source", "impression_id", "user_id", "time"),
            [(source, r.impression_id, r.user_id, r.time) for r in rows], key=("source", "impression_id"),
            update=lambda ex, t: {"user_id": ex.user_id, "time": ex.time},
            where=lambda ex, t: sa.or_(t.user_id != ex.user_id, t.time != ex.time),
        )
        # The upsert keeps a stored row's key; only the new ones are read back.
        pk_of = {imp_id: pk for pk, imp_id, _, _ in before}
        pk_of.update((imp_id, pk) for pk, imp_id in
                     w.select_in(by_source, impressions.c.impression_id, [i for i in ids if i not in pk_of]))
        recount: set[str] = set()
        if changed:
            # The articles a moved line showed first: their first-seen time is recounted from the
            # stored shows below, so that a misdated line, once corrected, no longer ages them for good.
            at = {pk: time for pk, imp_id, _, time in before if imp_id in changed}
            recount.update(
                n for pk, n in w.select_in(sa.select(items.c.impression_pk, items.c.news_id), items.c.impression_pk, list(at))
                if known.get(n) == at[pk])
        w.delete_in(items, items.c.impression_pk, list(pk_of.values()))
        item_rows = []
        for r in rows:
            pk = pk_of[r.impression_id]
            labels = r.labels if r.labels is not None else itertools.repeat(None)
            item_rows.extend(zip(itertools.repeat(pk), itertools.count(), r.news_ids, labels))
        w.insert(items, ("impression_pk", "position", "news_id", "label"), item_rows)
        report.impressions += len(rows)
        report.impression_items += len(item_rows)

        # MIND has no publication time: the first impression that shows an article, or lists
        # it in a History (clicked before that impression, so it existed then), stands in for
        # it. Without the History, the back catalogue that MIND's logs only list as old clicks
        # would read as never seen: brand new to the age feature and the freshness filter.
        # Only times that move earlier than what the store holds are written.
        # The History listings are also kept apart (first_listed_at): the shows can be recounted
        # from the store when a line is corrected, the listings cannot.
        first_seen: dict[str, datetime] = {}
        listed: dict[str, datetime] = {}
        for r in sorted(rows, key=lambda r: r.time, reverse=True):
            listed.update(dict.fromkeys(r.history, r.time))  # earlier times overwrite later
            first_seen.update(dict.fromkeys(r.history, r.time))
            first_seen.update(dict.fromkeys(r.news_ids, r.time))
        first_seen = {n: t for n, t in first_seen.items() if known[n] is None or t < known[n]}
        listed = {n: t for n, t in listed.items() if self.first_listed.get(n) is None or t < self.first_listed[n]}
        for column, times in (("first_seen_at", first_seen), ("first_listed_at", listed)):
            w.update(
                news, "news_id", ("news_id", column), list(times.items()),
                values=lambda src, c=column: {c: src[c]},
                where=lambda src, t, c=column: sa.or_(t[c].is_(None), t[c] > src[c]),
            )
        known.update(first_seen)
        self.first_listed.update(listed)
        report.clicks += self._replace_histories(new_history, stored_hash, {u for u in per_user if u not in stored})

        # Clicked candidates: one row per (user, article), keeping the earliest click.
        clicked: dict[tuple[str, str], datetime] = {}
        for r in rows:
            if r.labels is None:
                continue
            for n, label in zip(r.news_ids, r.labels):
                if label == 1:
                    key = (r.user_id, n)
                    seen = clicked.get(key)
                    if seen is None or r.time < seen:
                        clicked[key] = r.time
        if clicked:
            w.upsert(
                clicks, ("user_id", "news_id", "history_pos", "clicked_at"),
                [(u, n, None, t) for (u, n), t in clicked.items()], key=("user_id", "news_id"),
                update=lambda ex, t: {"clicked_at": _least(t.clicked_at, ex.clicked_at)},
                where=lambda ex, t: sa.or_(t.clicked_at.is_(None), ex.clicked_at < t.clicked_at),
            )
        report.clicks += len(clicked)
        self.withdrawn.difference_update(clicked)
        # A corrected line takes back what the line it replaces gave: the clicks and the
        # users' first- and last-seen times are recounted from what the store now holds.
        self._recount_clicks({(user, news_id) for user, _, news_id in old_clicks})
        self._recount_user_times(moved_from)
        self._recount_first_seen(recount, known)
        report.clicks_withdrawn = len(self.withdrawn)

    def _clicks_of(self, stored: list[tuple]) -> list[tuple[int, str, datetime, str]]:
        """(impression id, user, time, article) of each click of the ``stored`` impressions, rows
        (pk, impression id, user, time)."""
        items = schema.impression_items
        at = {pk: (imp_id, user, time) for pk, imp_id, user, time in stored}
        return [(*at[pk], news_id) for pk, news_id in self.writer.select_in(
            sa.select(items.c.impression_pk, items.c.news_id).where(items.c.label == 1), items.c.impression_pk, list(at))]

    def _recount_clicks(self, pairs: set[tuple[str, str]]) -> None:
        """Set the click time of these (user, article) pairs to their earliest click among the
        stored impressions; a pair no impression clicks any more loses its click time, and its
        row when the user's History does not list the article."""
        if not pairs:
            return
        imp, items, clicks, w = schema.impressions, schema.impression_items, schema.clicks, self.writer
        users = sorted({user for user, _ in pairs})
        earliest = {(user, news_id): t for user, news_id, t in w.select_in(
            sa.select(imp.c.user_id, items.c.news_id, sa.func.min(imp.c.time))
            .join(items, items.c.impression_pk == imp.c.id).where(items.c.label == 1)
            .group_by(imp.c.user_id, items.c.news_id), imp.c.user_id, users)}
        w.upsert(clicks, ("user_id", "news_id", "history_pos", "clicked_at"),
                 [(user, news_id, None, earliest.get((user, news_id))) for user, news_id in sorted(pairs)],
                 key=("user_id", "news_id"), update=lambda ex, t: {"clicked_at": ex.clicked_at})
        # Neither clicked nor in the History: a row only the replaced impression gave.
        w.delete_in(clicks, clicks.c.user_id, users, clicks.c.clicked_at.is_(None), clicks.c.history_pos.is_(None))
        self.withdrawn.update(pair for pair in pairs if pair not in earliest)
        self.withdrawn.difference_update(earliest)

    def _recount_first_seen(self, affected: set[str], known: dict[str, datetime | None]) -> None:
        """Recount the first-seen time of ``affected``, the articles that lines this batch moved
        (a correction: another user or time under the same id) had shown first: the earlier of
        their earliest stored show and their first History listing (``first_listed_at``).

        In the batch's transaction, so that an interrupted ingest leaves none of them behind (its
        rerun finds the lines already moved). impression_items has no index on news_id, so this
        reads the shows once (filtered by article, or all of them grouped when the articles are
        more than one IN list). A line the file brings back in a later batch lowers the time
        again there. A listing in a moved line's History is not taken back (the store does not
        keep each line's History): an article that line listed keeps the line's time as its
        earliest listing.
        """
        if not affected:
            return
        news, imp, items, w = schema.news, schema.impressions, schema.impression_items, self.writer
        query = (sa.select(items.c.news_id, sa.func.min(imp.c.time)).join(imp, imp.c.id == items.c.impression_pk)
                 .group_by(items.c.news_id))
        if len(affected) <= w.in_chunk:
            shown = dict(w.select_in(query, items.c.news_id, sorted(affected)))
        else:
            shown = {n: t for n, t in self.conn.execute(query).tuples() if n in affected}
        recounted = {}
        for n in sorted(affected):
            times = [t for t in (shown.get(n), self.first_listed.get(n)) if t is not None]
            recounted[n] = min(times) if times else None
        w.update(news, "news_id", ("news_id", "first_seen_at"), sorted(recounted.items()),
                 values=lambda src: {"first_seen_at": src["first_seen_at"]})
        self.report.first_seen_recounted += sum(recounted[n] != known.get(n) for n in affected)
        known.update(recounted)

    def _recount_user_times(self, users: set[str]) -> None:
        """Set these users' first- and last-seen times to those of their stored impressions
        (NULL when none is left: the user row stays, as it may hold a History)."""
        if not users:
            return
        imp, w = schema.impressions, self.writer
        span = {user: (first, last) for user, first, last in w.select_in(
            sa.select(imp.c.user_id, sa.func.min(imp.c.time), sa.func.max(imp.c.time)).group_by(imp.c.user_id),
            imp.c.user_id, sorted(users))}
        w.update(schema.users, "user_id", ("user_id", "first_seen_at", "last_seen_at"),
                 [(user, *span.get(user, (None, None))) for user in sorted(users)],
                 values=lambda src: {"first_seen_at": src["first_seen_at"], "last_seen_at": src["last_seen_at"]})

    def _stored_histories(self, users: list[str]) -> dict[str, tuple[str, ...]]:
        """The stored History of each of ``users``: its click rows in ``history_pos`` order."""
        if not users:
            return {}
        c = schema.clicks.c
        held: dict[str, list[tuple[int, str]]] = {u: [] for u in users}
        for user, news_id, pos in self.writer.select_in(
                sa.select(c.user_id, c.news_id, c.history_pos).where(c.history_pos.is_not(None)), c.user_id, users):
            held[user].append((pos, news_id))
        return {u: tuple(n for _, n in sorted(rows)) for u, rows in held.items()}

    def _replace_histories(self, new_history: dict[str, tuple[str, ...]], stored_hash: dict[str, str | None],
                           new_users: set[str]) -> int:
        """Make the History-derived click rows of these users exactly their new History.

        ``stored_hash`` has the ``_history_hash`` of each user's History in the store: an
        equal hash means nothing to do. ``new_users`` were not in the store before this
        batch, so they have no click rows yet.
        """
        w, clicks = self.writer, schema.clicks
        columns = ("user_id", "news_id", "history_pos", "clicked_at")
        fresh: list[tuple] = []
        replaced: list[tuple] = []
        changed: list[str] = []
        for user, history in new_history.items():
            if user not in new_users and stored_hash[user] == _history_hash(history):
                continue
            positions: dict[str, int] = {}
            for pos, news_id in enumerate(history):
                positions.setdefault(news_id, pos)  # a repeated id keeps its first position
            if user in new_users:
                fresh.extend((user, n, pos, None) for n, pos in positions.items())
            else:
                changed.append(user)
                replaced.extend((user, n, pos, None) for n, pos in positions.items())
        # A user's first History conflicts with nothing; a later one replaces the old rows:
        # History-only rows go, clicked rows stay with history_pos cleared, then the upsert.
        w.insert(clicks, columns, fresh)
        if changed:
            w.delete_in(clicks, clicks.c.user_id, changed, clicks.c.clicked_at.is_(None))
            w.update_in(clicks, clicks.c.user_id, changed, clicks.c.history_pos.is_not(None), history_pos=None)
            w.upsert(clicks, columns, replaced, key=("user_id", "news_id"), update=lambda ex, t: {"history_pos": ex.history_pos})
        return len(fresh) + len(replaced)


def _within(part: tuple[str, ...], history: tuple[str, ...]) -> bool:
    """Whether the ids of ``part`` appear in ``history`` in the same order (each id at its first
    position, as the store keeps a History)."""
    rest = iter(dict.fromkeys(history))
    return all(n in rest for n in dict.fromkeys(part))  # `in` advances the iterator: in order


def _holds(history: tuple[str, ...], part: tuple[str, ...]) -> bool:
    """Whether ``history`` holds ``part`` and more: ``part`` is ``_within`` it, and shorter."""
    return len(dict.fromkeys(history)) > len(dict.fromkeys(part)) and _within(part, history)


def _history_hash(history: tuple[str, ...]) -> str:
    """Fingerprint of a History column, so that an unchanged one is not rewritten."""
    return hashlib.sha256(" ".join(history).encode()).hexdigest()[:32]


def content_hash(title: str, abstract: str, category: str, subcategory: str, image_sha256: str | None) -> str:
    """sha256 over what the encoders read: an article whose hash is unchanged needs no re-encoding.

    Fields are joined with the unit separator (\\x1f), so ("ab", "c") and ("a", "bc") differ.
    A field holding \\x1f itself would make the join ambiguous (("a\\x1fb", "c") and
    ("a", "b\\x1fc") join alike), so then the fields are hashed as ``"json\\x1f" + JSON``
    instead. JSON escapes \\x1f: that text holds one raw \\x1f, where a join of five fields
    free of it holds exactly four, so the two kinds never meet, and the hash of every article
    without \\x1f stays what earlier releases stored (the feature cache's key).
    """
    fields = (title, abstract, category, subcategory, image_sha256 or "")
    if any("\x1f" in field for field in fields):
        text = "json\x1f" + json.dumps(fields, ensure_ascii=False)
    else:
        text = "\x1f".join(fields)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _news_update(ex, t) -> dict:
    return {c: ex[c] for c in (*_NEWS_UPDATED, "updated_at")}


def _news_changed(ex, t):
    # updated_at moves only when something did, so re-ingesting the same file changes nothing.
    return sa.or_(*(t[c].is_distinct_from(ex[c]) for c in _NEWS_UPDATED))


def _least(current, new):
    return sa.case((current.is_(None), new), (new < current, new), else_=current)


def _greatest(current, new):
    return sa.case((current.is_(None), new), (new > current, new), else_=current)


def _unknown_news(row: BehaviorRow, missing: set[str], known: dict[str, datetime | None], name: str,
                  bad_news: dict[str, BadRow]) -> BadRow | None:
    """The row as a bad row if one of its candidates is a ``missing`` news id (an unknown History
    entry is left out instead: ``_without_unknown_history``); one that the news file has only on a
    malformed line (``bad_news``) names that line.

    An unknown candidate that is a ``known`` id with a bad label (``N17008-x``, see
    ``is_bad_label``) is reported as that, and first: the reader puts bad labels before ids.
    """
    if row.labels is None:
        for candidate in row.news_ids:
            if candidate in missing and is_bad_label(candidate, known):
                return BadRow(name, row.line, IMPRESSIONS, candidate, EXPECTED_LABEL, row.raw)
    for news_id in row.news_ids:
        if news_id in missing:
            return BadRow(name, row.line, IMPRESSIONS, news_id, expected_news_id("the news file", bad_news.get(news_id)), row.raw)
    return None


def _batches(rows: Iterable, size: int) -> Iterator[tuple[list, bool]]:
    """``(batch, is the file's last)``: the last one is known before it is written (a row read
    ahead), so that the quarantine file is renamed into place before the last commit."""
    # Cut by News ids too: a History (stored whole) may hold 10,000 ids, and 5,000 such lines
    # held GBs of strings. Batch boundaries change no stored row (see ``_without_stored_twice``).
    ahead = _ReadAhead(rows)
    given = 0
    for batch in batches(ahead, size):
        raise_if_terminated()  # a SIGTERM whose exception some library swallowed
        given += len(batch)
        # A row taken and not given is the one that starts the next batch (cut by its ids).
        yield batch, given == ahead.taken and ahead.at_end()


_NOTHING = object()


class _ReadAhead:
    """An iterator that can tell whether another row follows, by reading it ahead."""

    def __init__(self, rows: Iterable):
        self._rows = iter(rows)
        self._next = _NOTHING
        self._ended = False
        self.taken = 0  # rows handed out

    def __iter__(self) -> _ReadAhead:
        return self

    def __next__(self):
        if self._next is not _NOTHING:
            row, self._next = self._next, _NOTHING
        elif self._ended:
            raise StopIteration
        else:
            try:
                row = next(self._rows)
            except StopIteration:
                self._ended = True
                raise
        self.taken += 1
        return row

    def at_end(self) -> bool:
        if self._next is _NOTHING and not self._ended:
            try:
                self._next = next(self._rows)
            except StopIteration:
                self._ended = True
        return self._next is _NOTHING and self._ended


# --- quarantine file ---------------------------------------------------------------------------


class _QuarantineFile:
    """The bad rows of one ingest call as TSV, written to a temp name and renamed at the end.

    Each batch's bad lines are written and synced inside the batch's transaction (``flush``),
    and the batch holding the ingest's last line renames the file into place before it commits
    (``finish``): a file that cannot be written (a full disk, a read-only mount) fails the
    ingest with ConfigError and rolls that batch back, and ``discard`` removes what was written
    (the renamed file too, until ``keep`` says its batch committed). So after an ingest that
    finishes, a stored bad line is in the file as in the ``quarantine`` table; after one that
    fails, the committed batches' rows are in the table without a file, as after a crash, and a
    rerun gives the clean result. (An ingest whose last file has no line renames the file after
    its last commit.)

    An ingest that was killed leaves its temp file; the next ingest removes those unchanged
    for ``STALE_QUARANTINE_SECONDS``. A live ingest touches its own after every batch
    (``keep_alive``), so one that found its bad rows early is not taken for dead.
    """

    def __init__(self, directory: Path, name: str):
        self.path = directory / name
        self._tmp = directory / f".{name}.tmp"
        self._file = None
        self._created = self._renamed = self._kept = self._unsynced = False
        remove_stale(directory.glob(".*.tsv.tmp"), STALE_QUARANTINE_SECONDS, why="left by an ingest that was killed")

    def _error(self, exc: OSError) -> ConfigError:
        return ConfigError(f"quarantine file {self.path} cannot be written ({exc.strerror or exc}): the ingest stopped; "
                           "rerun it once the quarantine folder has room and is writable")

    def keep_alive(self) -> None:
        if self._file is not None:
            try:
                os.utime(self._tmp)
            except OSError as exc:
                raise self._error(exc) from exc

    def add(self, file_key: str, bad: BadRow) -> None:
        cells = (file_key, str(bad.line), bad.field, bad.reason, bad.raw)
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self._tmp, "w", encoding="utf-8", newline="")  # noqa: SIM115 - closed in finish/discard
                self._created = True
                self._file.write("\t".join(_QUARANTINE_HEADER) + "\n")
            self._file.write("\t".join(_tsv_cell(c) for c in cells) + "\n")
        except OSError as exc:
            raise self._error(exc) from exc
        self._unsynced = True

    def flush(self) -> None:
        """Write and sync the lines added since the last call (called before a batch commits)."""
        if self._file is None or not self._unsynced:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise self._error(exc) from exc
        self._unsynced = False

    def finish(self) -> Path | None:
        """Sync, close and rename into place: the path, None when there was no bad row."""
        if self._renamed:
            return self.path
        if self._file is None:
            return None
        self.flush()
        try:
            self._file.close()
            self._file = None
            os.replace(self._tmp, self.path)
        except OSError as exc:
            raise self._error(exc) from exc
        self._renamed = True
        return self.path

    def keep(self) -> None:
        """The batch that renamed the file has committed: ``discard`` leaves it."""
        self._kept = True

    def discard(self) -> None:
        """Remove what this call wrote, unless kept; never raises OSError (it runs while an
        error propagates)."""
        if self._file is not None:
            with suppress(OSError):  # closed even when its flush fails (a full disk)
                self._file.close()
            self._file = None
        if self._kept or not self._created:
            return
        path = self.path if self._renamed else self._tmp
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove %s, the quarantine file of a failed ingest (%s)", path, exc)


# The quarantine file is read with less, cat and grep: its cells escape what a terminal would
# act on (``recsys.escapes``), and U+2028 and U+2029, which end a line for Python's splitlines;
# the backslash is escaped too, so the file reads back exactly.
_TSV_ESCAPES = {
    **TERMINAL_ESCAPES, **{code: escape_of(code) for code in (0x2028, 0x2029)},
    ord("\\"): "\\\\", ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r",
}


def _tsv_cell(text: str) -> str:
    return text.translate(_TSV_ESCAPES)
