"""Streaming readers of the MIND files, exactly as Microsoft ships them.

``news.tsv``: NewsID, Category, SubCategory, Title, Abstract, URL, TitleEntities,
AbstractEntities. ``behaviors.tsv``: ImpressionID, UserID, Time, History, Impressions. No
header, tab-separated, UTF-8, ``\\n`` or ``\\r\\n`` line ends. Impressions are ``N123-1 N456-0``
(labelled) or ``N123 N456`` (test files); History may be empty; Time looks like
``11/11/2019 9:05:58 AM``.

The readers yield one parsed row or one ``BadRow`` per line and never raise for bad input,
so the caller decides between quarantining and stopping. Lines are read as bytes with a
bounded reader: a line longer than ``MAX_LINE_BYTES`` (or a multi-GB file without newlines)
costs at most that much memory and becomes a bad row.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from recsys.clock import utc_now
from recsys.columns import (
    ABSTRACT,
    ABSTRACT_ENTITIES,
    CATEGORY,
    HISTORY,
    IMPRESSION_ID,
    IMPRESSIONS,
    NEWS_ID,
    NEWS_TSV_COLUMNS,
    SUBCATEGORY,
    TIME,
    TITLE,
    TITLE_ENTITIES,
    USER_ID,
)
from recsys.errors import RecsysError, SchemaError

NUM_NEWS_COLUMNS = 8
NUM_BEHAVIORS_COLUMNS = 5

MAX_LINE_BYTES = 1024 * 1024
MAX_TITLE_CHARS = 1_000
MAX_ABSTRACT_CHARS = 10_000
MAX_CATEGORY_CHARS = 128
MAX_HISTORY_IDS = 10_000
MAX_CANDIDATES = 1_000
# News ids (History + candidates) one batch of behaviors rows may hold, whatever its line
# count (``batches``): a parsed id costs ~75 bytes, and lines of 10,000 History ids made a
# 20,000-line chunk ~15 GB. MIND averages ~70 ids a line, so its 20,000-line scoring chunks and
# 5,000-line ingest batches stay cut by their line count.
MAX_BATCH_IDS = 3_000_000
# Raw lines kept in bad-row records are cut to this many characters.
RAW_CHARS = 200

ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"
TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"
TIME_EXAMPLE = "11/11/2019 9:05:58 AM"
# A behaviors time outside these bounds is a typo (1019, 2099), not a click: stored, it would
# move first-seen and last-seen times (a later correction of the line takes most of that back).
# MIND's times are naive local times, so the upper bound allows a day beyond the present in UTC.
EARLIEST_TIME = datetime(1990, 1, 1)
FUTURE_SLACK = timedelta(days=1)
# A file's bulk: the span of its middle lines, once it has enough lines to have one. A line
# further from the bulk than the bulk's own span (and than these) is a wrong date. Early lines
# get more room: a client that was offline sends its impressions days late.
BULK_TRIM = 0.01
BULK_MIN_LINES = 100
BULK_MIN_MARGIN = timedelta(days=1)
BULK_MIN_EARLY_MARGIN = timedelta(days=30)

_ID_RE = re.compile(ID_PATTERN)
_IDS_RE = re.compile(rf"{ID_PATTERN}(?: {ID_PATTERN})*")
_LABELLED_RE = re.compile(rf"{ID_PATTERN}-[01](?: {ID_PATTERN}-[01])*")
_LABELLED_TOKEN_RE = re.compile(rf"{ID_PATTERN}-[01]")
_LABEL_SUFFIX_RE = re.compile(r"-[01](?= |$)")
_LABEL_RE = re.compile(r"-([01])(?= |$)")
# Fits a signed 64-bit column. No leading zeros: the prediction file repeats the id as a
# number, and the MIND scorer compares ids as text ("007" would come back as "7").
_INT_RE = re.compile(r"0|[1-9][0-9]{0,17}")
# ASCII digits only: ``\d`` also matches Arabic-Indic and full-width ones, which int() reads.
_TIME_RE = re.compile(r"([0-9]{1,2})/([0-9]{1,2})/([0-9]{4}) ([0-9]{1,2}):([0-9]{2}):([0-9]{2}) ([AaPp][Mm])")
_UTF8_BOM = b"\xef\xbb\xbf"

_EXPECTED_ID = f"an id matching ^{ID_PATTERN}$"
EXPECTED_LABEL = "label 0 or 1"


class MindFileError(RecsysError):
    """A MIND file cannot be opened or read at all (missing, a folder, no permission)."""


@dataclass(frozen=True, slots=True)
class NewsRow:
    """One valid line of news.tsv (``line`` is 1-based)."""

    line: int
    news_id: str
    category: str
    subcategory: str
    title: str
    abstract: str
    url: str
    title_entities: str
    abstract_entities: str


@dataclass(frozen=True, slots=True)
class BehaviorRow:
    """One valid line of behaviors.tsv.

    Attributes:
        line: 1-based line number.
        impression_id: the ImpressionID (unique within its file only).
        user_id: the UserID.
        time: naive datetime of the impression.
        history: clicked news ids from the History column, in file order (oldest first).
        news_ids: the candidates, in display order.
        labels: 1 clicked / 0 not, aligned with ``news_ids``; None for unlabelled files.
        raw: the line, cut to ``RAW_CHARS`` characters (for quarantine records).
    """

    line: int
    impression_id: int
    user_id: str
    time: datetime
    history: tuple[str, ...]
    news_ids: tuple[str, ...]
    labels: tuple[int, ...] | None
    raw: str


@dataclass(frozen=True, slots=True)
class BadRow:
    """A line that is not loaded, and why.

    Attributes:
        file: the file as the caller named it.
        line: 1-based line number.
        field: the offending column (or ``columns``/``line`` for whole-line problems).
        value: the offending value (shortened in messages).
        expected: what the field should have held.
        raw: the line, cut to ``RAW_CHARS`` characters (invalid bytes replaced).
    """

    file: str
    line: int
    field: str
    value: object
    expected: str
    raw: str

    def to_error(self) -> SchemaError:
        """The same problem as the exception ``strict`` ingest raises."""
        return SchemaError(self.file, self.line, self.field, self.value, self.expected)

    @property
    def reason(self) -> str:
        """``behaviors.tsv line 812: field 'impressions' has 'N55-x', expected label 0 or 1``."""
        return str(self.to_error())


def parse_time(text: str) -> datetime:
    """Parse a MIND time (``%m/%d/%Y %I:%M:%S %p``, e.g. ``11/11/2019 9:05:58 AM``).

    Hand-written because ``strptime`` costs ~10 us a call and honours the locale's AM/PM.

    Raises:
        ValueError: not a MIND time, or not a real date.
    """
    m = _TIME_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not a time like {TIME_EXAMPLE!r}")
    month, day, year, hour, minute, second = (int(g) for g in m.groups()[:6])
    if not 1 <= hour <= 12:
        raise TimeValueError(f"{text!r} is not a time", f"hour {hour} is not 1..12")
    hour = hour % 12 + (12 if m.group(7) in ("PM", "pm", "Pm", "pM") else 0)
    try:
        return datetime(year, month, day, hour, minute, second)
    except ValueError as exc:
        raise TimeValueError(f"{text!r} is not a real date and time", str(exc)) from None


class TimeValueError(ValueError):
    """A time spelled as MIND spells them that is no real date or time (2/29/2019, hour 13).

    Attributes:
        reason: what is wrong with it, e.g. ``"day is out of range for month"``.
    """

    def __init__(self, message: str, reason: str) -> None:
        self.reason = reason
        super().__init__(f"{message} ({reason})")


def latest_time() -> datetime:
    """The latest behaviors time accepted: a day from now (naive UTC)."""
    return utc_now() + FUTURE_SLACK


def format_time(value: datetime) -> str:
    """The MIND spelling of a time (no zero padding of month, day and hour, as in MIND)."""
    hour = value.hour % 12 or 12
    suffix = "PM" if value.hour >= 12 else "AM"
    return f"{value.month}/{value.day}/{value.year} {hour}:{value.minute:02d}:{value.second:02d} {suffix}"


class RowStream:
    """Iterator over the rows (and bad rows) of one MIND file, read lazily.

    Attributes:
        path: the file.
        name: the file as the caller spelled it (used in messages).
        size: file size in bytes when opened.
        bytes_read: bytes consumed so far (for progress).
    """

    def __init__(self, path: str | Path, parse: Callable[[str, int, str], NewsRow | BehaviorRow | BadRow]):
        self.path = Path(path)
        self.name = str(path)
        try:
            self._file = open(self.path, "rb", buffering=1024 * 1024)  # noqa: SIM115 - closed by close()/exhaustion
            self.size = os.fstat(self._file.fileno()).st_size
        except OSError as exc:
            raise MindFileError(f"{self.name}: cannot be read ({exc.strerror or exc})") from exc
        self.bytes_read = 0
        self._rows = self._generate(parse)

    def __iter__(self) -> RowStream:
        return self

    def __next__(self) -> NewsRow | BehaviorRow | BadRow:
        return next(self._rows)

    def close(self) -> None:
        self._rows.close()
        self._file.close()

    def __enter__(self) -> RowStream:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _generate(self, parse) -> Iterator[NewsRow | BehaviorRow | BadRow]:
        f, name = self._file, self.name
        limit = MAX_LINE_BYTES + 2  # room for "\r\n" after a line of exactly the maximum
        line_no = 0
        try:
            while True:
                raw = f.readline(limit)
                if not raw:
                    return
                line_no += 1
                if line_no == 1 and raw.startswith(_UTF8_BOM):
                    # The BOM does not count towards the line's limit: read as far as without it.
                    if len(raw) == limit and not raw.endswith(b"\n"):
                        raw += f.readline(len(_UTF8_BOM))
                    self.bytes_read += len(_UTF8_BOM)
                    raw = raw[len(_UTF8_BOM):]
                self.bytes_read += len(raw)
                if len(raw) == limit and not raw.endswith(b"\n"):
                    self.bytes_read += _skip_to_newline(f)
                    yield BadRow(name, line_no, "line", f"a line of more than {MAX_LINE_BYTES} bytes",
                                 f"at most {MAX_LINE_BYTES} bytes per line" + _carriage_returns(raw.rstrip(b"\r")),
                                 _shorten(raw.decode("utf-8", "replace")))
                    continue
                # Every CR before the newline, not one: "\r\r\n" is a CRLF file converted to CRLF
                # again (unix2dos twice, a text-mode write on Windows), which its publisher means
                # as CRLF. The last column (entities JSON, impressions) never ends in a CR, and one
                # left there was stored in the JSON ('[]\r') or made an empty column a bad row.
                content = (raw[:-1] if raw.endswith(b"\n") else raw).rstrip(b"\r")
                if len(content) > MAX_LINE_BYTES:
                    yield BadRow(name, line_no, "line", f"a line of {len(content)} bytes",
                                 f"at most {MAX_LINE_BYTES} bytes per line", _shorten(content.decode("utf-8", "replace")))
                    continue
                if not content.strip(b" "):
                    continue  # blank lines (often one at the end of a file) carry nothing; tabs are columns
                try:
                    text = content.decode("utf-8")
                except UnicodeDecodeError as exc:
                    near = content[max(0, exc.start - 20) : exc.end + 20]
                    yield BadRow(name, line_no, "line", near, f"UTF-8 text (invalid byte at offset {exc.start})",
                                 _shorten(content.decode("utf-8", "replace")))
                    continue
                yield parse(name, line_no, text)
        finally:
            f.close()


def _carriage_returns(content: bytes | str) -> str:
    """What to add to a "columns" or "line" error when the line holds carriage returns inside it
    (its CRLF or CR ending already taken off): a file whose lines end in CR alone (classic Mac OS,
    some exports) reads as one line, and "has 2201 columns" alone does not say why."""
    count = content.count(b"\r" if isinstance(content, bytes) else "\r")
    return (f" (the line holds {count} carriage returns (CR): are the file's lines ended by CR alone? "
            "convert them to LF or CRLF)") if count else ""


def _skip_to_newline(f) -> int:
    """Consume the rest of an over-long line in bounded chunks; returns the bytes skipped."""
    skipped = 0
    while True:
        chunk = f.readline(1024 * 1024)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped


def _shorten(text: str) -> str:
    return text if len(text) <= RAW_CHARS else text[: RAW_CHARS - 3] + "..."


def iter_news(path: str | Path) -> RowStream:
    """Stream the rows of a MIND news.tsv.

    Checks: 8 columns; NewsID matches ``^[A-Za-z0-9_-]{1,64}$``; category non-empty and
    category/subcategory at most 128 characters; title at most 1000 characters; abstract at
    most 10000; the entity columns empty or JSON.

    Returns:
        A ``RowStream`` yielding ``NewsRow`` or ``BadRow``, one per non-blank line.

    Raises:
        MindFileError: the file cannot be opened.
    """
    return RowStream(path, _parse_news)


def is_bad_label(candidate: str, known: Container[str]) -> bool:
    """Whether an unknown candidate of an unlabelled impression is a known id with a bad label.

    News ids may contain ``-``, so a candidate with a bad label (``N17008-x``) reads as an
    unlabelled id when no candidate of its impression has a good one; only the catalogue can
    tell. If ``N17008`` is ``known``, the label is what is wrong, not the id.
    """
    news_id, dash, _ = candidate.rpartition("-")
    return bool(dash) and news_id in known


# Malformed news lines kept to name in the errors of the impressions that need them: a wrong file
# given as --news (every line bad) would otherwise keep all of its lines.
REMEMBERED_BAD_NEWS = 10_000


def malformed_news_id(bad: BadRow) -> str:
    """The news id a malformed news.tsv line starts with (its first cell, as the reader splits
    it): a candidate that only such a line names is that line's fault, not an unknown id."""
    return bad.raw.split("\t", 1)[0].strip()


def remember_malformed(bad_news: dict[str, BadRow], row: BadRow) -> None:
    """Keep ``row`` in ``bad_news`` under its ``malformed_news_id`` (the first line of an id, the
    first ``REMEMBERED_BAD_NEWS`` ids), for ``malformed_note``."""
    if len(bad_news) < REMEMBERED_BAD_NEWS:
        bad_news.setdefault(malformed_news_id(row), row)


def malformed_note(news_file: str, malformed: BadRow, news_id: str = "it") -> str:
    """``"the news file has N98 only on a malformed line: <its fault>"``: its fault is the one to
    fix. ``news_file`` is how the message names the file ("--news", "the news file")."""
    return f"{news_file} has {news_id} only on a malformed line: {malformed.reason}"


def expected_news_id(news_file: str, malformed: BadRow | None = None) -> str:
    """What an unknown candidate should have been, as a bad row's ``expected``.

    Args:
        news_file: how the message names the news file ("--news", "the news file").
        malformed: the news file's malformed line that starts with the id, if any
            (``malformed_note``).
    """
    expected = f"a news id present in the store or in {news_file}"
    if malformed is not None:
        expected += f" ({malformed_note(news_file, malformed)})"
    return expected


class FirstLines:
    """The first line of every impression id met so far in one file, in sorted NumPy runs
    (16 bytes an id: MIND-large's 2.2M ids take 36 MB, where a dict took 217 MB).

    Runs merge like a binary counter (a new run swallows the runs no longer than it), so
    there are at most log2(ids / batch) of them and each id is re-sorted log2 times.
    """

    def __init__(self):
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted ids, their lines)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """For each id, the line it was first met on, or 0 when it is new."""
        found = np.zeros(len(ids), dtype=np.int64)
        for run_ids, run_lines in self._runs:
            pos = np.minimum(np.searchsorted(run_ids, ids), len(run_ids) - 1)
            hit = run_ids[pos] == ids
            found[hit] = run_lines[pos[hit]]  # the runs hold each id once, so hits never overlap
        return found

    def add(self, ids: np.ndarray, lines: np.ndarray) -> None:
        """Record new ``ids`` (none of them met before) first met on ``lines``."""
        if not len(ids):
            return
        while self._runs and len(self._runs[-1][0]) <= len(ids):
            run_ids, run_lines = self._runs.pop()
            ids, lines = np.concatenate([run_ids, ids]), np.concatenate([run_lines, lines])
        order = np.argsort(ids, kind="stable")
        self._runs.append((ids[order], lines[order]))


def repeated_impression_ids(rows: list[BehaviorRow], seen: FirstLines, name: str) -> dict[int, BadRow]:
    """``line -> bad row`` for the rows whose impression id an earlier line of the file has
    (the first line keeps it, whatever the batches); records the batch's new ids in ``seen``."""
    ids = np.fromiter((r.impression_id for r in rows), dtype=np.int64, count=len(rows))
    earlier = seen.lookup(ids).tolist()
    first_in_batch: dict[int, int] = {}
    bad: dict[int, BadRow] = {}
    new = np.ones(len(rows), dtype=bool)
    for i, (row, line) in enumerate(zip(rows, earlier)):
        first = line or first_in_batch.setdefault(row.impression_id, row.line)
        if first != row.line:
            new[i] = False
            bad[row.line] = BadRow(name, row.line, "impression_id", str(row.impression_id),
                                   f"an id unique within the file (line {first} has it)", row.raw)
    seen.add(ids[new], np.fromiter((r.line for r in rows), dtype=np.int64, count=len(rows))[new])
    return bad


def batches(rows: Iterable, max_lines: int, max_ids: int | None = None) -> Iterator[list]:
    """Consecutive rows in lists, in order: a list ends at ``max_lines`` rows, or before the
    row that would take the News ids of its ``BehaviorRow``s (History + candidates) past
    ``max_ids``; a row over ``max_ids`` alone is a list of its own. Other rows (``NewsRow``,
    ``BadRow``) count no ids: their size is bounded by the line. ``max_ids`` None:
    ``MAX_BATCH_IDS``, read at the call.

    Yields:
        lists of 1 to ``max_lines`` rows; joined, they are ``rows``. A list held with the row
        read after it is bounded by ``max_ids`` plus one line's ids, whatever the lines hold.
    """
    max_ids = MAX_BATCH_IDS if max_ids is None else max_ids
    it = iter(rows)
    pending = None  # the row that ended the last list by its ids: it starts the next
    while True:
        batch, ids = ([pending], _num_ids(pending)) if pending is not None else ([], 0)
        pending = None
        while len(batch) < max_lines:
            row = next(it, _END)
            if row is _END:
                break
            n = _num_ids(row)
            if batch and ids + n > max_ids:
                pending = row
                break
            batch.append(row)
            ids += n
        if not batch:
            return
        yield batch


_END = object()


def _num_ids(row) -> int:
    return len(row.history) + len(row.news_ids) if isinstance(row, BehaviorRow) else 0


def iter_behaviors(path: str | Path, *, scan: BehaviorsScan | None = None) -> RowStream:
    """Stream the rows of a MIND behaviors.tsv (labelled or not).

    Checks: 5 columns; ImpressionID a non-negative integer; UserID and every news id match
    ``^[A-Za-z0-9_-]{1,64}$``; Time like ``11/11/2019 9:05:58 AM``; at most 10000 History
    ids; 1 to 1000 candidates; labels 0 or 1; every candidate of an impression labelled or
    none; an article shown twice in one impression has the same label both times. A
    candidate is read as labelled when it ends in ``-0``/``-1``, so in an unlabelled file a
    bare id may not end that way. Given the file's ``scan``, a Time later than its
    ``plausible`` span is a bad row too (what is stored needs it; scoring a file does not).

    Returns:
        A ``RowStream`` yielding ``BehaviorRow`` or ``BadRow``, one per non-blank line.

    Raises:
        MindFileError: the file cannot be opened.
    """
    # The latest accepted time, once per file: reading the clock per row cost 9% of the parse.
    # The file's bounds too, once: ``plausible`` is computed on each read.
    plausible = scan.plausible if scan is not None else None
    return RowStream(path, functools.partial(_parse_behaviors, latest=latest_time(), plausible=plausible,
                                             bulk=scan.bulk if scan is not None else None))


@dataclass(frozen=True)
class BehaviorsScan:
    """What one quick pass over a behaviors file tells before it is parsed.

    Attributes:
        first, last: earliest and latest Time of its lines (None when no line has one).
        sha256: hex digest of the file's bytes.
        bulk: the earliest and latest Time of its middle 98% of lines (1% left out at each
            end), None below ``BULK_MIN_LINES`` lines with a Time.
        lines: lines with a Time that parses (the total of a progress display).
    """

    first: datetime | None
    last: datetime | None
    sha256: str
    bulk: tuple[datetime, datetime] | None = None
    lines: int = 0

    @property
    def plausible(self) -> tuple[datetime, datetime] | None:
        """The earliest and latest Time a line of this file may have; None when the file is
        too short to tell.

        A replayed log (MIND's 2019, a backfill) is older than the clock, so the clock cannot
        tell a wrong year from a real one; the file's other lines can. A line later than the
        end of the file's middle 98% by more than that span (and more than a day) is refused:
        stored, it would become the store's latest impression, the nightly run's "now". So is
        one earlier than its start by more than the span (and more than 30 days): it would move
        its articles' first-seen times there for good, out of every fresh set.
        """
        if self.bulk is None:
            return None
        start, end = self.bulk
        return start - max(BULK_MIN_EARLY_MARGIN, end - start), end + max(BULK_MIN_MARGIN, end - start)


def scan_behaviors(path: str | Path, *, block_bytes: int = 1 << 20) -> BehaviorsScan:
    """Time span and checksum of a behaviors file, reading only each line's Time column.

    About ten times faster than ``iter_behaviors`` (candidate lists are not parsed), so a
    command can learn which store data it needs before it parses the file. Every line that
    ``iter_behaviors`` accepts counts; lines whose Time does not parse are passed over, and a
    line too long for ``iter_behaviors`` may or may not count: the parse that follows refuses
    both. Memory is ``block_bytes`` plus one line of ``MAX_LINE_BYTES`` plus 8 bytes a line (the
    times, for the file's bulk).

    Raises:
        MindFileError: the file cannot be opened or read.
    """
    digest = hashlib.sha256()
    blocks: list[np.ndarray] = []  # seconds since the epoch: 8 bytes a line
    for lines in _line_blocks(path, block_bytes, digest.update):
        times = [t for t in map(_line_time, lines) if t is not None]
        if times:
            blocks.append(np.array(times, dtype="datetime64[s]").astype(np.int64))
    times = np.sort(np.concatenate(blocks)) if blocks else np.zeros(0, np.int64)
    if not len(times):
        return BehaviorsScan(None, None, digest.hexdigest())

    def at(i: int) -> datetime:
        return datetime(1970, 1, 1) + timedelta(seconds=int(times[i]))

    bulk = None
    if len(times) >= BULK_MIN_LINES:
        n = len(times) - 1
        bulk = at(int(np.ceil(BULK_TRIM * n))), at(int(np.floor((1 - BULK_TRIM) * n)))
    return BehaviorsScan(at(0), at(len(times) - 1), digest.hexdigest(), bulk, len(times))


def impression_keys(path: str | Path, *, block_bytes: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Each line's impression id and a 64-bit key of its (user, Time), reading only those
    columns, as ``scan_behaviors`` reads the Time (lines whose id or Time does not parse are
    passed over; the parse that follows refuses them). The key is ``user_time_key``'s, valid
    within this process. 16 bytes a line.

    Raises:
        MindFileError: the file cannot be opened or read.
    """
    id_blocks: list[np.ndarray] = []  # per block of the file, not per line: 16 bytes a line
    key_blocks: list[np.ndarray] = []
    for lines in _line_blocks(path, block_bytes):
        ids: list[int] = []
        keys: list[int] = []
        for line in lines:
            cols = line.split(b"\t", 4)
            if len(cols) < 5:
                continue
            try:
                id_text = cols[0].removeprefix(_UTF8_BOM).decode("utf-8")
                user, time = cols[1].decode("utf-8"), parse_time(cols[2].decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                continue
            if not _INT_RE.fullmatch(id_text):  # as the parse reads ids: at most 18 digits
                continue
            ids.append(int(id_text))
            keys.append(user_time_key(user, time))
        id_blocks.append(np.array(ids, dtype=np.int64))
        key_blocks.append(np.array(keys, dtype=np.int64))
    return np.concatenate(id_blocks), np.concatenate(key_blocks)


def _line_blocks(path: str | Path, block_bytes: int,
                 read: Callable[[bytes], object] | None = None) -> Iterator[list[bytes]]:
    """The lines of a file (split at ``\\n``, ends not stripped), a block of ``block_bytes`` at a
    time, for the quick passes that read a column or two. A line longer than ``MAX_LINE_BYTES``
    (with room for a BOM and ``\\r\\n``) is passed over whole, so memory stays one block and one
    line. ``read`` is given every block as it is read (a checksum).

    Raises:
        MindFileError: the file cannot be opened or read.
    """
    tail, skipping = b"", False  # skipping: the rest of a line longer than MAX_LINE_BYTES
    try:
        with open(path, "rb") as f:
            while True:
                block = f.read(block_bytes)
                if read is not None:
                    read(block)
                lines = (tail + block).split(b"\n")
                tail = lines.pop() if block else b""  # at the end, the last line needs no newline
                if skipping and lines:
                    lines, skipping = lines[1:], False
                yield lines
                if len(tail) > MAX_LINE_BYTES + 8:  # room for a BOM and "\r\n" around an accepted line
                    tail, skipping = b"", True
                if not block:
                    break
    except OSError as exc:
        raise MindFileError(f"{path}: cannot be read ({exc.strerror or exc})") from exc


def user_time_key(user: str, time: datetime) -> int:
    """A 64-bit key of an impression's (user, time) (Python's hash: equal within one process)."""
    return hash((user, time))


def _line_time(line: bytes) -> datetime | None:
    """The Time column of a behaviors line; None when it has none that parses."""
    cols = line.split(b"\t", 3)
    if len(cols) < 4:
        return None
    try:
        return parse_time(cols[2].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None


def _parse_news(name: str, line: int, text: str) -> NewsRow | BadRow:
    cols = text.split("\t")
    if len(cols) != NUM_NEWS_COLUMNS:
        return BadRow(name, line, "columns", len(cols), f"{NUM_NEWS_COLUMNS} tab-separated columns" + _carriage_returns(text),
                      _shorten(text))
    news_id, category, subcategory, title, abstract, url, title_entities, abstract_entities = cols

    def bad(field: str, value: object, expected: str) -> BadRow:
        return BadRow(name, line, field, value, expected, _shorten(text))

    if not _ID_RE.fullmatch(news_id):
        return bad(NEWS_ID, news_id, _EXPECTED_ID)
    if "\x00" in text:
        # PostgreSQL's text type cannot hold NUL; refused here, on every backend, so that a
        # store behaves the same on SQLite and PostgreSQL.
        field, value = next((f, v) for f, v in zip(NEWS_TSV_COLUMNS, cols) if "\x00" in v)
        return bad(field, value, "text without NUL (0x00) characters")
    if not category or len(category) > MAX_CATEGORY_CHARS:
        return bad(CATEGORY, category, f"a non-empty category of at most {MAX_CATEGORY_CHARS} characters"
                                       + (f" (it has {len(category)})" if category else ""))
    if len(subcategory) > MAX_CATEGORY_CHARS:
        return bad(SUBCATEGORY, subcategory, f"at most {MAX_CATEGORY_CHARS} characters (it has {len(subcategory)})")
    if len(title) > MAX_TITLE_CHARS:
        return bad(TITLE, title, f"at most {MAX_TITLE_CHARS} characters (it has {len(title)})")
    if len(abstract) > MAX_ABSTRACT_CHARS:
        return bad(ABSTRACT, abstract, f"at most {MAX_ABSTRACT_CHARS} characters (it has {len(abstract)})")
    for field, value in ((TITLE_ENTITIES, title_entities), (ABSTRACT_ENTITIES, abstract_entities)):
        if value:
            try:
                json.loads(value)
            except (ValueError, RecursionError):  # the second: arrays nested ~1000 deep
                return bad(field, value, "empty or JSON (a list of entities)")
    return NewsRow(line, news_id, category, subcategory, title, abstract, url, title_entities, abstract_entities)


def _parse_behaviors(name: str, line: int, text: str, *, latest: datetime,
                     plausible: tuple[datetime, datetime] | None = None,
                     bulk: tuple[datetime, datetime] | None = None) -> BehaviorRow | BadRow:
    cols = text.split("\t")
    if len(cols) != NUM_BEHAVIORS_COLUMNS:
        return BadRow(name, line, "columns", len(cols), f"{NUM_BEHAVIORS_COLUMNS} tab-separated columns" + _carriage_returns(text),
                      _shorten(text))
    impression_id, user_id, time_text, history_text, impressions_text = cols

    def bad(field: str, value: object, expected: str) -> BadRow:
        return BadRow(name, line, field, value, expected, _shorten(text))

    if not _INT_RE.fullmatch(impression_id):
        return bad(IMPRESSION_ID, impression_id, "a non-negative integer of at most 18 digits, without leading zeros")
    if not _ID_RE.fullmatch(user_id):
        return bad(USER_ID, user_id, _EXPECTED_ID)
    try:
        time = parse_time(time_text)
    except TimeValueError as exc:  # the right shape, but no real date or hour: say which part
        return bad(TIME, time_text, f"a real date and time ({exc.reason})")
    except ValueError:
        return bad(TIME, time_text, f"a time like '{TIME_EXAMPLE}' ({TIME_FORMAT})")
    if time < EARLIEST_TIME or time > latest:
        return bad(TIME, time_text, f"a time between {format_time(EARLIEST_TIME)} and a day from now ({format_time(latest)})")
    if plausible is not None and not plausible[0] <= time <= plausible[1]:
        (start, end), (earliest, last) = bulk, plausible
        most = f"98% of the file's lines are from {format_time(start)} to {format_time(end)}"
        if time > last:
            return bad(TIME, time_text, f"a time no later than {format_time(last)}: {most}, and a date far past the "
                                        "rest of a file would become the store's latest impression, the nightly run's now")
        return bad(TIME, time_text, f"a time no earlier than {format_time(earliest)}: {most}, and a date far before "
                                    "the rest of a file would move its articles' first-seen times there for good")

    if not history_text:
        history: tuple[str, ...] = ()
    elif _IDS_RE.fullmatch(history_text):
        history = tuple(history_text.split(" "))
    else:
        history = tuple(history_text.split())
        wrong = next((h for h in history if not _ID_RE.fullmatch(h)), None)
        if wrong is not None:
            return bad(HISTORY, wrong, f"news ids matching ^{ID_PATTERN}$ separated by spaces")
    if len(history) > MAX_HISTORY_IDS:
        return bad(HISTORY, f"{len(history)} ids", f"at most {MAX_HISTORY_IDS} ids")

    labels: tuple[int, ...] | None
    if _LABELLED_RE.fullmatch(impressions_text):
        news_ids = tuple(_LABEL_SUFFIX_RE.sub("", impressions_text).split(" "))
        labels = tuple(map(int, _LABEL_RE.findall(impressions_text)))
    elif _IDS_RE.fullmatch(impressions_text) and not _LABEL_SUFFIX_RE.search(impressions_text):
        news_ids = tuple(impressions_text.split(" "))
        labels = None
    else:
        try:
            news_ids, labels = _parse_impressions_slowly(impressions_text)
        except _Invalid as exc:
            return bad(IMPRESSIONS, exc.value, exc.expected)
    if len(news_ids) > MAX_CANDIDATES:
        return bad(IMPRESSIONS, f"{len(news_ids)} candidates", f"at most {MAX_CANDIDATES} candidates")
    if labels is not None and len(set(news_ids)) < len(news_ids):
        label_of: dict[str, int] = {}
        for news_id, label in zip(news_ids, labels):
            if label_of.setdefault(news_id, label) != label:
                return bad(IMPRESSIONS, news_id, "one label per article: it is shown twice in the impression, clicked "
                                                 "and not clicked")
    return BehaviorRow(line, int(impression_id), user_id, time, history, news_ids, labels, _shorten(text))


class _Invalid(Exception):
    def __init__(self, value: str, expected: str):
        super().__init__(value, expected)
        self.value, self.expected = value, expected


def _parse_impressions_slowly(text: str) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    """Impressions that failed the fast patterns: odd spacing, or a bad token to name.

    Raises:
        _Invalid: with the offending token and what was expected.
    """
    tokens = text.split()
    if not tokens:
        raise _Invalid(text, "at least one candidate news id")
    if any(_LABELLED_TOKEN_RE.fullmatch(t) for t in tokens):
        for t in tokens:
            if "-" not in t:
                raise _Invalid(t, "a label on every candidate (the impression mixes labelled and unlabelled items)")
            news_id, _, label = t.rpartition("-")
            if label not in ("0", "1"):
                raise _Invalid(t, EXPECTED_LABEL)
            if not _ID_RE.fullmatch(news_id):
                raise _Invalid(t, f"a news id matching ^{ID_PATTERN}$ before the label")
        return tuple(t[:-2] for t in tokens), tuple(1 if t[-1] == "1" else 0 for t in tokens)
    for t in tokens:
        if not _ID_RE.fullmatch(t):
            raise _Invalid(t, f"news ids matching ^{ID_PATTERN}$ (with -0/-1 labels or none)")
    return tuple(tokens), None
