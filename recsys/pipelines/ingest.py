"""`recsys ingest`: validate MIND files into the store, bad rows to quarantine."""

from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext
from pathlib import Path

from sqlalchemy import Engine

from recsys.config import IngestConfig, Workspace
from recsys.errors import RecsysError, disk_errors
from recsys.pipelines.inputs import (
    check_file,
    check_folder,
    check_images_go_with_news,
    check_source_goes_with_behaviors,
)
from recsys.pipelines.runlog import recorded_run
from recsys.progress import progress
from recsys.ranking.lock import NIGHTLY_LOCK, StoreLock, acquire_lock

log = logging.getLogger("recsys.ingest")


class NoGoodRowError(RecsysError):
    """Every line of a given file was quarantined: most likely the wrong file (news.tsv and
    behaviors.tsv swapped, another format), which a lenient ingest would otherwise pass."""


class TooManyBadRowsError(RecsysError):
    """More than ``ingest.max_bad_share`` of a given file's lines were quarantined (a behaviors
    file delivered before its news file, say): its good lines are stored, but the ingest fails
    so that a scheduler hears of it."""


def _share(value: float, above: float) -> str:
    # One decimal, more where that would print the share equal to the limit it is above.
    for digits in range(1, 7):
        text = f"{value * 100:.{digits}f}"
        if float(text) > above * 100:
            break
    return f"{text}%"


def _refuse_bad_files(summary: dict, *, news: Path | None, behaviors: Path | None, max_bad_share: float) -> None:
    # A file whose every line is bad loaded nothing; one with more bad lines than the config
    # allows loaded its good ones. The bad lines are quarantined as usual either way, and what
    # was loaded stays (each batch is its own transaction).
    from recsys.store.ingest import quarantine_key

    empty, too_bad, hints = [], [], []
    for option, path in (("--news", news), ("--behaviors", behaviors)):
        key = quarantine_key(path) if path is not None else None
        bad = summary["bad_rows_by_file"].get(key, 0)
        # Lines read, not ids stored: a news file that repeats an article (train and dev news joined)
        # stores it once, and a behaviors line whose impression the store holds already stores
        # nothing; both are good lines all the same.
        lines = summary["lines_by_file"].get(key, 0)
        share = bad / lines if bad else 0.0
        if bad and bad == lines:
            empty.append(f"{option} {path}: every one of its {bad} lines was bad, nothing of it was stored "
                         f"(first: {summary['first_bad_row'][key]})")
        elif share > max_bad_share:
            good = lines - bad
            too_bad.append(f"{option} {path}: {bad} of its {lines} lines {'was' if bad == 1 else 'were'} bad "
                           f"({_share(share, max_bad_share)}, more than ingest.max_bad_share = {max_bad_share * 100:g}%); "
                           f"its {good} good {'line was' if good == 1 else 'lines were'} ingested "
                           f"(first bad: {summary['first_bad_row'][key]})")
            # Candidates missing from the store are bad lines too: the night's news file came late.
            hints.append("fix the file (or its news file)" if option == "--behaviors" else "fix the file")
    if not empty and not too_bad:
        return
    tail = []
    if empty:
        tail.append("is it the right file (news.tsv and behaviors.tsv swapped?)")
    if too_bad:
        fix = f"{hints[0]} and ingest it again" if len(hints) == 1 else "fix the files and ingest them again"
        tail.append(f"{fix}, or raise ingest.max_bad_share")
    message = "; ".join([*empty, *too_bad]) + f"; the lines are in {summary['quarantine_file']}: " + "; ".join(tail)
    raise (NoGoodRowError if empty else TooManyBadRowsError)(message)


def _warn_of_what_was_stored(summary: dict) -> None:
    """The ingest's side effects an operator must hear of (replaced impressions, dropped History
    ids, ...), one WARNING each."""
    unknown = summary.get("unknown_history_ids", 0)
    if unknown:
        log.warning("%d History entries named articles neither the store nor the news file has: left out of the stored "
                    "histories (their impressions are kept); ingest the news file that has them, then the behaviors "
                    "again, to restore them", unknown)
    changed = summary.get("impressions_changed", 0)
    if changed:
        log.warning("%d impressions stored under source '%s' had another user or time and were replaced by this "
                    "file's (first: %s): if it is another file than the one ingested before (MIND restarts impression "
                    "ids at 1 in every file), its impressions took their place; ingest each file under its own --source",
                    changed, summary.get("source"), summary.get("first_changed_impression"))
    dropped = summary.get("labels_dropped", 0)
    if dropped:
        log.warning("%d impressions with clicks stored under source '%s' were replaced by unlabelled lines of this file "
                    "(a test file under a labelled file's source?): their labels and clicks are gone; ingest the "
                    "labelled file again to restore them, and each file under its own --source", dropped,
                    summary.get("source"))
    withdrawn = summary.get("clicks_withdrawn", 0)
    if withdrawn:
        log.warning("%d clicks that only the replaced impressions gave are no longer stored with a click time, so the "
                    "histories that lead with a user's clicks no longer read them (an article the user's History lists "
                    "stays in it; the articles the replaced lines' History columns listed keep those lines' times as "
                    "their earliest listing: a store rebuilt from the corrected files removes those)", withdrawn)
    recounted = summary.get("first_seen_recounted", 0)
    if recounted:
        log.info("%d articles had their first-seen time set by a replaced impression: recounted from the stored "
                 "shows and History listings", recounted)
    not_replaced = summary.get("histories_not_replaced", 0)
    if not_replaced:
        log.warning("%d lines carried a History other than the one the store keeps for the same user at the very same "
                    "time (the first ingested is kept): a corrected file re-delivered with the same times does not "
                    "replace Histories; ingest the correction with later times, or into a new store", not_replaced)
    elsewhere = summary.get("impressions_stored_elsewhere", 0)
    if elsewhere:
        log.warning("%d impressions of this file were not stored under source '%s': the store holds each of them (same "
                    "user, time, candidates and labels) under another source; the same file ingested under a second "
                    "name would count every click twice", elsewhere, summary.get("source"))
    repeated = summary.get("impressions_repeated", 0)
    if repeated:
        log.warning("%d impressions of this file were not stored: an earlier line of the file brought each of them "
                    "(same user, time, candidates and labels) under another impression id of source '%s'; a line "
                    "written twice would count its clicks twice", repeated, summary.get("source"))
    bad = summary.get("num_bad_rows", 0)
    if bad:
        log.warning("%d bad rows quarantined in %s", bad, summary.get("quarantine_file"))


def check_ingest_inputs(*, news: Path | None, behaviors: Path | None, images: Path | None,
                        source: str | None) -> None:
    """The checks of ``run_ingest`` that need no store: the command line runs them before it
    creates one, so that a mistyped path leaves no empty store behind.

    Raises:
        RecsysError: a file or folder that is missing or of the wrong kind, a path or
            ``source`` the store cannot record; the message names the option.
    """
    from recsys.store.ingest import check_path_name, check_source

    for label, path in (("--news", news), ("--behaviors", behaviors)):
        if path is not None:
            check_file(label, path)  # not a pipe either: bad rows are recorded by the file's path
            check_path_name(label, path)
    if news is not None and behaviors is not None and Path(news).resolve() == Path(behaviors).resolve():
        # Its bad rows would be counted and quarantined under one key for both readings.
        raise RecsysError(f"--news and --behaviors are the same file {Path(news).resolve()}: "
                          "expected news.tsv and behaviors.tsv")
    check_images_go_with_news("ingest", news, images)
    check_source_goes_with_behaviors("ingest", behaviors, source)
    if images is not None:
        check_folder("--images", images)
    if source is not None:
        check_source(source, "--source")


def run_ingest(
    engine: Engine,
    workspace: Workspace,
    *,
    news: Path | None,
    behaviors: Path | None,
    images: Path | None,
    source: str | None = None,
    strict: bool = False,
    lock: StoreLock | None = None,
    max_bad_share: float = IngestConfig.max_bad_share,
    replace: bool = False,
) -> dict:
    """Ingest and return the report as a plain dict (counts, bad rows, quarantine file).

    The ingest holds the store's ``nightly`` lock: ``lock`` when the caller (the nightly
    job) already holds it, else it is taken here.

    Args:
        max_bad_share: ``ingest.max_bad_share``, the share of a file's lines that may be bad.
        replace: the behaviors file may drop most of the impressions stored under its source
            (``recsys.store.ingest.ingest``): a correction that re-times them all.

    Raises:
        RecsysError: bad inputs (``check_ingest_inputs``); nothing is written.
        RunLockedError: another ingest or nightly job holds the lock; nothing is written.
        NoGoodRowError: a given file had no good line; the other file's lines stay stored.
        TooManyBadRowsError: a given file had more than ``max_bad_share`` bad lines; its good
            lines (and the other file's) stay stored. Both leave the run row ``failed``.
        ReplacingImpressionsError: the behaviors file looks like another file under the same
            source name (``recsys.store.ingest.ingest``); none of its lines is stored, the news
            file's stay stored.
    """
    from recsys.store.ingest import ingest

    check_ingest_inputs(news=news, behaviors=behaviors, images=images, source=source)
    with disk_errors("create the quarantine folder", workspace.quarantine_dir):  # a failed ingest: nightly ranks on
        workspace.quarantine_dir.mkdir(parents=True, exist_ok=True)
    # The nightly job's lock: two ingests at once would race on the same users' histories,
    # and a nightly job ranking while an ingest writes would read half of it.
    held = nullcontext(lock) if lock is not None else acquire_lock(engine, NIGHTLY_LOCK)
    with held as store_lock, recorded_run(engine, "ingest", exclusive=True) as record, progress("ingesting") as advance:
        if lock is None:  # taken here: name the run, so that a job it refuses can say which
            store_lock.attach_run(record["run_id"])
        report = ingest(
            engine, news_path=news, behaviors_path=behaviors, images_dir=images, source=source,
            strict=strict, quarantine_dir=workspace.quarantine_dir, progress=advance, replace=replace,
        )
        summary = dataclasses.asdict(report) if dataclasses.is_dataclass(report) else dict(report)
        record["counts"] = {k: v for k, v in summary.items() if isinstance(v, int)}
        _warn_of_what_was_stored(summary)  # also when a file fails next: its good lines are stored
        _refuse_bad_files(summary, news=news, behaviors=behaviors, max_bad_share=max_bad_share)
    return summary
