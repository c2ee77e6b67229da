"""The MIND readers: real-file quirks, every bad-row kind and its message, bounded lines."""

from __future__ import annotations

import tracemalloc
from datetime import datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.data import mind
from recsys.data.mind import BadRow, BehaviorRow, MindFileError, NewsRow, format_time, iter_behaviors, iter_news, parse_time
from recsys.errors import SchemaError

NEWS_OK = "N1\tnews\tnewsus\tStorm hits the coast\tHeavy rain.\thttps://x/1\t[]\t[]"
ENTITIES = '[{"Label": "Coast", "Type": "G", "WikidataId": "Q1", "Confidence": 0.9, "OccurrenceOffsets": [16], "SurfaceForms": ["coast"]}]'


def write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def read_news(tmp_path, text: str | bytes):
    data = text if isinstance(text, bytes) else text.encode("utf-8")
    return list(iter_news(write(tmp_path, "news.tsv", data)))


def read_behaviors(tmp_path, text: str | bytes):
    data = text if isinstance(text, bytes) else text.encode("utf-8")
    return list(iter_behaviors(write(tmp_path, "behaviors.tsv", data)))


def only_bad(rows) -> BadRow:
    assert len(rows) == 1 and isinstance(rows[0], BadRow), rows
    return rows[0]


# --- news --------------------------------------------------------------------------------------


def test_news_row_with_entities_and_any_script(tmp_path):
    title = "東京で大雨 — Тяжёлый дождь — العاصفة 🌧"
    rows = read_news(tmp_path, f"N1\tnews\tnewsus\t{title}\tAbstract.\thttps://x/1\t{ENTITIES}\t[]\n")
    assert rows == [NewsRow(1, "N1", "news", "newsus", title, "Abstract.", "https://x/1", ENTITIES, "[]")]


def test_news_crlf_bom_blank_lines_and_no_final_newline(tmp_path):
    data = b"\xef\xbb\xbf" + (NEWS_OK + "\r\n\r\n").encode() + NEWS_OK.replace("N1", "N2").encode()
    rows = read_news(tmp_path, data)
    assert [(r.line, r.news_id, r.abstract_entities) for r in rows] == [(1, "N1", "[]"), (3, "N2", "[]")]


def test_a_crlf_file_converted_to_crlf_again_reads_as_crlf(tmp_path):
    # "\r\r\n" lost one CR only: the JSON column was stored as '[]\r', and an empty last column
    # was a bad row, "field 'abstract_entities' has '\r'".
    data = (NEWS_OK + "\r\r\n" + "N2\tnews\tnewsus\tT\t\thttps://x\t[]\t\r\r\n").encode()
    rows = read_news(tmp_path, data)
    assert [(r.news_id, r.title_entities, r.abstract_entities) for r in rows] == [("N1", "[]", "[]"), ("N2", "[]", "")]
    (row,) = read_behaviors(tmp_path, B_OK + "\r\r\r\n")
    assert (row.news_ids, row.labels, row.raw) == (("N3", "N4"), (1, 0), B_OK)


def test_empty_abstract_and_empty_entity_columns_are_fine(tmp_path):
    (row,) = read_news(tmp_path, "N1\tnews\tnewsus\tT\t\thttps://x\t\t\n")
    assert (row.abstract, row.title_entities, row.abstract_entities) == ("", "", "")


@pytest.mark.parametrize(
    ("line", "field", "message"),
    [
        ("N1\tnews\tnewsus\tT", "columns", r"news\.tsv line 1: field 'columns' has 4, expected 8 tab-separated columns"),
        (NEWS_OK + "\textra", "columns", "has 9, expected 8 tab-separated columns"),
        (NEWS_OK.replace("N1", "N/1"), "news_id", r"field 'news_id' has 'N/1', expected an id matching \^\[A-Za-z0-9_-\]\{1,64\}\$"),
        (NEWS_OK.replace("N1", "N" * 65), "news_id", "field 'news_id' has 'NNNN"),
        (NEWS_OK.replace("\tnews\t", "\t\t"), "category", "field 'category' has '', expected a non-empty category of at most 128 characters"),
        (NEWS_OK.replace("\tnews\t", "\t" + "c" * 129 + "\t"), "category", r"expected a non-empty category of at most 128 characters \(it has 129\)"),
        (NEWS_OK.replace("\tnewsus\t", "\t" + "s" * 129 + "\t"), "subcategory", r"expected at most 128 characters \(it has 129\)"),
        (NEWS_OK.replace("Storm hits the coast", "t" * 1001), "title", r"field 'title' has 'ttt.*\.\.\., expected at most 1000 characters \(it has 1001\)"),
        (NEWS_OK.replace("Heavy rain.", "a" * 10001), "abstract", r"expected at most 10000 characters \(it has 10001\)"),
        (NEWS_OK.replace("\t[]\t[]", "\t[{broken\t[]"), "title_entities", r"field 'title_entities' has '\[\{broken', expected empty or JSON"),
        (NEWS_OK.replace("\t[]\t[]", "\t[]\tnot json"), "abstract_entities", "field 'abstract_entities' has 'not json'"),
        (NEWS_OK.replace("Storm", "Sto\x00rm"), "title", r"field 'title' has 'Sto\\x00rm hits the coast', expected text without NUL \(0x00\) characters"),
        (NEWS_OK.replace("[]\t[]", "[]\t[\x00]"), "abstract_entities", "expected text without NUL"),
        # json.loads raises RecursionError, not ValueError, on arrays nested this deep
        (NEWS_OK.replace("\t[]\t[]", "\t" + "[" * 5000 + "\t[]"), "title_entities", r"field 'title_entities' has '\[\[\[.*expected empty or JSON"),
        ("\t" * 7, "news_id", r"field 'news_id' has '', expected an id matching"),  # tabs only: columns, not a blank line
    ],
)
def test_bad_news_rows(tmp_path, line, field, message):
    bad = only_bad(read_news(tmp_path, line + "\n"))
    assert (bad.line, bad.field) == (1, field)
    assert bad.raw == mind._shorten(line)
    with pytest.raises(SchemaError, match=message):
        raise bad.to_error()


def test_title_of_exactly_1000_characters_is_accepted(tmp_path):
    (row,) = read_news(tmp_path, NEWS_OK.replace("Storm hits the coast", "t" * 1000))
    assert isinstance(row, NewsRow) and len(row.title) == 1000


def test_invalid_utf8_is_a_bad_row_and_reading_goes_on(tmp_path):
    data = NEWS_OK.replace("Storm", "St\xffrm").encode("latin-1") + b"\n" + NEWS_OK.replace("N1", "N2").encode() + b"\n"
    bad, good = read_news(tmp_path, data)
    assert isinstance(bad, BadRow) and bad.field == "line" and bad.line == 1
    assert "St\ufffdrm" in bad.raw
    with pytest.raises(SchemaError, match=r"news\.tsv line 1: field 'line' has b'.*St\\xffrm.*', expected UTF-8 text \(invalid byte at offset 17\)"):
        raise bad.to_error()
    assert isinstance(good, NewsRow) and good.line == 2


def test_missing_file_is_a_mind_file_error(tmp_path):
    with pytest.raises(MindFileError, match=r"nope\.tsv: cannot be read \(No such file or directory\)"):
        iter_news(tmp_path / "nope.tsv")


# --- behaviors ---------------------------------------------------------------------------------

B_OK = "1\tU1\t11/11/2019 9:05:58 AM\tN1 N2\tN3-1 N4-0"


def test_labelled_behavior_row(tmp_path):
    (row,) = read_behaviors(tmp_path, B_OK + "\n")
    assert row == BehaviorRow(1, 1, "U1", datetime(2019, 11, 11, 9, 5, 58), ("N1", "N2"), ("N3", "N4"), (1, 0), B_OK)


def test_unlabelled_test_file_rows_and_empty_history(tmp_path):
    rows = read_behaviors(tmp_path, "7\tU9\t11/15/2019 12:00:01 PM\t\tN3 N4 N5\r\n8\tU9\t11/15/2019 12:00:01 AM\tN1\tN3\r\n")
    assert [(r.history, r.news_ids, r.labels, r.time) for r in rows] == [
        ((), ("N3", "N4", "N5"), None, datetime(2019, 11, 15, 12, 0, 1)),
        (("N1",), ("N3",), None, datetime(2019, 11, 15, 0, 0, 1)),
    ]


def test_ids_with_dashes_and_underscores(tmp_path):
    (row,) = read_behaviors(tmp_path, "1\tuser_7-a\t11/11/2019 9:05:58 AM\tnews-a_1\tnews-b-1 x_y-0\n")
    assert (row.user_id, row.history, row.news_ids, row.labels) == ("user_7-a", ("news-a_1",), ("news-b", "x_y"), (1, 0))


def test_extra_spaces_between_ids_are_tolerated(tmp_path):
    (row,) = read_behaviors(tmp_path, "1\tU1\t11/11/2019 9:05:58 AM\tN1  N2 \t N3-1  N4-0\n")
    assert (row.history, row.news_ids, row.labels) == (("N1", "N2"), ("N3", "N4"), (1, 0))


@pytest.mark.parametrize(
    ("line", "field", "message"),
    [
        ("1\tU1\t11/11/2019 9:05:58 AM\tN1", "columns", r"behaviors\.tsv line 1: field 'columns' has 4, expected 5 tab-separated columns"),
        ("x1\tU1\t11/11/2019 9:05:58 AM\t\tN1-1", "impression_id", "field 'impression_id' has 'x1', expected a non-negative integer"),
        ("-4\tU1\t11/11/2019 9:05:58 AM\t\tN1-1", "impression_id", "field 'impression_id' has '-4'"),
        ("1" * 19 + "\tU1\t11/11/2019 9:05:58 AM\t\tN1-1", "impression_id", "expected a non-negative integer of at most 18 digits"),
        ("007\tU1\t11/11/2019 9:05:58 AM\t\tN1-1", "impression_id", "field 'impression_id' has '007', expected .* without leading zeros"),
        ("1\tU 1\t11/11/2019 9:05:58 AM\t\tN1-1", "user_id", r"field 'user_id' has 'U 1', expected an id matching"),
        ("1\tU1\t2019-11-11 09:05:58\t\tN1-1", "time", r"field 'time' has '2019-11-11 09:05:58', expected a time like '11/11/2019 9:05:58 AM' \(%m/%d/%Y %I:%M:%S %p\)"),
        # The right shape but no real date or hour: the message says which part is wrong
        ("1\tU1\t13/11/2019 9:05:58 AM\t\tN1-1", "time",
         r"field 'time' has '13/11/2019 9:05:58 AM', expected a real date and time \(month must be in 1\.\.12\)"),
        ("1\tU1\t11/11/2019 13:05:58 PM\t\tN1-1", "time",
         r"field 'time' has '11/11/2019 13:05:58 PM', expected a real date and time \(hour 13 is not 1\.\.12\)"),
        ("1\tU1\t11/11/2019 0:30:00 AM\t\tN1-1", "time", r"expected a real date and time \(hour 0 is not 1\.\.12\)"),
        ("1\tU1\t2/30/2019 1:05:58 PM\t\tN1-1", "time",
         r"field 'time' has '2/30/2019 1:05:58 PM', expected a real date and time \(day is out of range for month\)"),
        ("1\tU1\t2/29/2019 1:05:58 PM\t\tN1-1", "time", r"expected a real date and time \(day is out of range for month\)"),
        # Real dates that no click log holds: a typo would move stored first and last seen times
        ("1\tU1\t11/9/1019 2:02:56 AM\t\tN1-1", "time",
         r"field 'time' has '11/9/1019 2:02:56 AM', expected a time between 1/1/1990 12:00:00 AM and a day from now"),
        ("1\tU1\t11/9/2099 2:02:56 AM\t\tN1-1", "time", "field 'time' has '11/9/2099 2:02:56 AM', expected a time between"),
        # Digits other than ASCII ones (Arabic-Indic, full-width), which int() would read
        ("1\tU1\t\u0661\u0661/11/2019 9:05:58 AM\t\tN1-1", "time", "field 'time' has '\u0661\u0661/11/2019 9:05:58 AM'"),
        ("1\tU1\t11/11/2019 \uff19:05:58 AM\t\tN1-1", "time", "field 'time' has '11/11/2019 \uff19:05:58 AM'"),
        ("\t\t\t\t", "impression_id", "field 'impression_id' has '', expected a non-negative integer"),
        ("1\tU1\t11/11/2019 9:05:58 AM\tN1 N/2\tN1-1", "history", "field 'history' has 'N/2', expected news ids matching"),
        ("1\tU1\t11/11/2019 9:05:58 AM\t\tN1-1 N55-x", "impressions", r"behaviors\.tsv line 1: field 'impressions' has 'N55-x', expected label 0 or 1"),
        ("1\tU1\t11/11/2019 9:05:58 AM\t\tN1-1 N55-2", "impressions", "has 'N55-2', expected label 0 or 1"),
        ("1\tU1\t11/11/2019 9:05:58 AM\t\tN1-1 N2", "impressions", r"has 'N2', expected a label on every candidate \(the impression mixes labelled and unlabelled items\)"),
        ("1\tU1\t11/11/2019 9:05:58 AM\t\tN2 N1-0", "impressions", "has 'N2', expected a label on every candidate"),
        ("1\tU1\t11/11/2019 9:05:58 AM\t\tN1-1 N/2-0", "impressions", "has 'N/2-0', expected a news id matching"),
        ("1\tU1\t11/11/2019 9:05:58 AM\t\tN1 N/2", "impressions", "has 'N/2', expected news ids matching"),
        ("1\tU1\t11/11/2019 9:05:58 AM\tN1\t", "impressions", "field 'impressions' has '', expected at least one candidate news id"),
        ("1\tU1\t11/11/2019 9:05:58 AM\tN1\t   ", "impressions", "expected at least one candidate news id"),
    ],
)
def test_bad_behavior_rows(tmp_path, line, field, message):
    bad = only_bad(read_behaviors(tmp_path, line + "\n"))
    assert (bad.line, bad.field) == (1, field)
    with pytest.raises(SchemaError, match=message):
        raise bad.to_error()
    assert bad.reason == str(bad.to_error())


def test_times_up_to_a_day_from_now_are_accepted_and_later_ones_are_not(tmp_path):
    from datetime import timedelta, timezone

    now = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)
    soon, later = format_time(now + timedelta(hours=20)), format_time(now + timedelta(hours=30))
    rows = read_behaviors(tmp_path, f"1\tU1\t{soon}\t\tN1-1\n2\tU1\t{later}\t\tN1-1\n3\tU1\t1/1/1990 12:00:00 AM\t\tN1-1\n")
    assert [type(r) for r in rows] == [BehaviorRow, BadRow, BehaviorRow]
    assert (rows[1].field, rows[1].value) == ("time", later)


def test_absurd_history_and_candidate_counts(tmp_path):
    history = " ".join(f"N{i}" for i in range(10_001))
    candidates = " ".join(f"N{i}-0" for i in range(1_001))
    ok_history = " ".join(f"N{i}" for i in range(10_000))
    rows = read_behaviors(tmp_path, "\n".join([
        f"1\tU1\t11/11/2019 9:05:58 AM\t{history}\tN1-1",
        f"2\tU1\t11/11/2019 9:05:58 AM\t\t{candidates}",
        f"3\tU1\t11/11/2019 9:05:58 AM\t{ok_history}\tN1-1",
    ]) + "\n")
    with pytest.raises(SchemaError, match=r"line 1: field 'history' has '10001 ids', expected at most 10000 ids"):
        raise rows[0].to_error()
    with pytest.raises(SchemaError, match=r"line 2: field 'impressions' has '1001 candidates', expected at most 1000 candidates"):
        raise rows[1].to_error()
    assert isinstance(rows[2], BehaviorRow) and len(rows[2].history) == 10_000


# --- bounded lines -----------------------------------------------------------------------------


def test_over_long_line_is_a_bad_row_and_the_next_line_still_reads(tmp_path):
    long_line = b"1\tU1\t11/11/2019 9:05:58 AM\t" + b"N1 " * (mind.MAX_LINE_BYTES // 3 + 10) + b"\tN1-1"
    data = long_line + b"\n" + B_OK.replace("1\tU1", "2\tU1", 1).encode() + b"\n"
    bad, good = read_behaviors(tmp_path, data)
    assert (bad.line, bad.field) == (1, "line")
    with pytest.raises(SchemaError, match=r"line 1: field 'line' has 'a line of more than 1048576 bytes', expected at most 1048576 bytes per line"):
        raise bad.to_error()
    assert len(bad.raw) == mind.RAW_CHARS
    assert isinstance(good, BehaviorRow) and (good.line, good.impression_id) == (2, 2)


def test_a_file_with_cr_only_line_endings_is_named_as_such(tmp_path, monkeypatch):
    # Lines ended by CR alone read as one line: "has 16 columns" did not say why.
    bad = only_bad(read_news(tmp_path, "\r".join([NEWS_OK, NEWS_OK.replace("N1", "N2"), NEWS_OK.replace("N1", "N3")]) + "\r"))
    with pytest.raises(SchemaError, match=r"news\.tsv line 1: field 'columns' has 22, expected 8 tab-separated columns "
                                          r"\(the line holds 2 carriage returns \(CR\): are the file's lines ended by CR alone\?"):
        raise bad.to_error()
    bad = only_bad(read_behaviors(tmp_path, "\r".join([B_OK, B_OK.replace("1\tU1", "2\tU1", 1)]) + "\r\n"))
    with pytest.raises(SchemaError, match=r"has 9, expected 5 tab-separated columns \(the line holds 1 carriage returns"):
        raise bad.to_error()
    # A file too long for one line says so as well; a line without a CR inside says nothing of it.
    monkeypatch.setattr(mind, "MAX_LINE_BYTES", 3 * len(B_OK))
    bad = only_bad(read_behaviors(tmp_path, "\r".join([B_OK] * 5)))
    with pytest.raises(SchemaError, match=r"expected at most \d+ bytes per line \(the line holds \d+ carriage returns"):
        raise bad.to_error()
    assert "carriage" not in str(only_bad(read_behaviors(tmp_path, B_OK + "\tx\r\r\n")).to_error())


def test_a_bom_does_not_lift_the_first_lines_limit_or_shift_line_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(mind, "MAX_LINE_BYTES", len(B_OK))
    bom = b"\xef\xbb\xbf"
    (row,) = read_behaviors(tmp_path, bom + (B_OK + "\r\n").encode())  # exactly the limit after the BOM
    assert isinstance(row, BehaviorRow)
    for extra in (b"x", b"xx", b"xxx", b"xxxx" * 1000):
        rows = read_behaviors(tmp_path, bom + B_OK.encode() + extra + b"\n" + B_OK.replace("1\tU1", "2\tU1", 1).encode() + b"\n")
        assert [(type(r), r.line) for r in rows] == [(BadRow, 1), (BehaviorRow, 2)], extra
        assert rows[0].field == "line"
    path = write(tmp_path, "behaviors.tsv", bom + B_OK.encode() + b"xx\n" + B_OK.encode() + b"\n")
    stream = iter_behaviors(path)
    list(stream)
    assert stream.bytes_read == path.stat().st_size


def test_line_of_exactly_the_limit_with_crlf_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(mind, "MAX_LINE_BYTES", len(B_OK))
    (row,) = read_behaviors(tmp_path, B_OK + "\r\n")
    assert isinstance(row, BehaviorRow)
    bad = only_bad(read_behaviors(tmp_path, B_OK + "x\r\n"))
    assert bad.field == "line"


def test_a_huge_file_without_newlines_costs_bounded_memory(tmp_path):
    path = tmp_path / "behaviors.tsv"
    with open(path, "wb") as f:
        chunk = b"N12345 " * (1 << 17)  # ~0.9 MB
        for _ in range(40):  # ~37 MB on one line
            f.write(chunk)
    tracemalloc.start()
    try:
        stream = iter_behaviors(path)
        rows = list(stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(rows) == 1 and rows[0].field == "line"
    assert stream.bytes_read == path.stat().st_size
    assert peak < 8 * mind.MAX_LINE_BYTES  # the file is ~37 MB


def test_bytes_read_tracks_progress(tmp_path):
    path = write(tmp_path, "behaviors.tsv", (B_OK + "\n").encode() * 3)
    stream = iter_behaviors(path)
    assert (stream.size, stream.bytes_read) == (path.stat().st_size, 0)
    next(stream)
    assert stream.bytes_read == len(B_OK) + 1
    stream.close()


# --- times -------------------------------------------------------------------------------------


@given(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2100, 12, 31)).map(lambda d: d.replace(microsecond=0)))
@settings(max_examples=300, deadline=None)
def test_parse_time_agrees_with_strptime_and_inverts_format_time(value):
    text = format_time(value)
    assert parse_time(text) == value == datetime.strptime(text, mind.TIME_FORMAT)


@pytest.mark.parametrize(("text", "expected"), [
    ("11/11/2019 12:00:00 AM", datetime(2019, 11, 11, 0, 0, 0)),
    ("11/11/2019 12:30:00 PM", datetime(2019, 11, 11, 12, 30, 0)),
    ("1/2/2019 1:02:03 pm", datetime(2019, 1, 2, 13, 2, 3)),
    ("01/02/2019 01:02:03 AM", datetime(2019, 1, 2, 1, 2, 3)),
])
def test_parse_time_by_hand(text, expected):
    assert parse_time(text) == expected


@pytest.mark.parametrize("text", ["11/11/2019 0:00:00 AM", "11/11/2019 9:05 AM", "11/11/2019 9:05:58", "11/31/2019 9:05:58 AM"])
def test_parse_time_rejects(text):
    with pytest.raises(ValueError, match=f"'{text}' is not"):
        parse_time(text)


# --- scan before the parse ---------------------------------------------------------------------


def _behavior_text(impression_id: int, when: datetime) -> str:
    return f"{impression_id}\tU{impression_id % 3}\t{format_time(when)}\tN1 N2\tN3-1 N4-0"


_TIMES = st.datetimes(min_value=datetime(2019, 1, 1), max_value=datetime(2020, 12, 31)).map(lambda d: d.replace(microsecond=0))
# A line: a valid row at a time, or one the parse refuses (bad time, too few columns, bad UTF-8 in the time, bad id).
_LINES = st.one_of(
    _TIMES.map(lambda t: ("ok", t)),
    st.sampled_from([b"7\tU1\t13/45/2019 9:00:00 AM\t\tN1-1", b"7\tU1\t11/11/2019", b"7\tU1\t\xff\xfe\t\tN1-1", b"", b"  "]),
    _TIMES.map(lambda t: ("bad id", t)),
)


@given(lines=st.lists(_LINES, max_size=30), crlf=st.booleans(), bom=st.booleans(), final_newline=st.booleans(),
       block_bytes=st.integers(1, 200))
@settings(max_examples=150, deadline=None)
def test_scan_covers_every_row_the_parse_accepts_and_hashes_the_bytes(tmp_path_factory, lines, crlf, bom, final_newline,
                                                                      block_bytes):
    import hashlib

    encoded = []
    for i, line in enumerate(lines):
        if isinstance(line, bytes):
            encoded.append(line)
        elif line[0] == "ok":
            encoded.append(_behavior_text(i, line[1]).encode())
        else:
            encoded.append(_behavior_text(i, line[1]).replace(f"U{i % 3}", "U?", 1).encode())
    end = b"\r\n" if crlf else b"\n"
    data = (mind._UTF8_BOM if bom else b"") + end.join(encoded) + (end if final_newline and encoded else b"")
    path = tmp_path_factory.mktemp("scan") / "behaviors.tsv"
    path.write_bytes(data)
    scan = mind.scan_behaviors(path, block_bytes=block_bytes)
    assert scan.sha256 == hashlib.sha256(data).hexdigest()
    # Every line with a time that parses counts, whether or not the rest of the row is good.
    timed = [line[1] for line in lines if not isinstance(line, bytes)]
    assert (scan.first, scan.last) == ((min(timed), max(timed)) if timed else (None, None))
    accepted = [row.time for row in iter_behaviors(path) if isinstance(row, BehaviorRow)]
    assert len(accepted) == sum(1 for line in lines if not isinstance(line, bytes) and line[0] == "ok")
    if accepted:
        assert scan.first <= min(accepted) and max(accepted) <= scan.last


def test_scan_counts_a_line_of_the_limit_and_bounds_memory_on_longer_ones(tmp_path, monkeypatch):
    ok = _behavior_text(1, datetime(2019, 11, 11, 9, 0, 0))
    monkeypatch.setattr(mind, "MAX_LINE_BYTES", len(ok))
    later = datetime(2019, 11, 12, 9, 0, 0)
    path = write(tmp_path, "behaviors.tsv", ok.encode() + b"\r\n" + _behavior_text(2, later).encode() + b"\r\n")
    assert all(isinstance(row, BehaviorRow) for row in iter_behaviors(path))
    for block_bytes in (1, 5, 64, 1 << 20):
        scan = mind.scan_behaviors(path, block_bytes=block_bytes)
        assert (scan.first, scan.last) == (datetime(2019, 11, 11, 9, 0, 0), later)
    monkeypatch.undo()

    huge = tmp_path / "huge.tsv"
    with open(huge, "wb") as f:
        chunk = b"N12345 " * (1 << 17)  # ~0.9 MB
        for _ in range(40):  # ~37 MB on one line, then a good line
            f.write(chunk)
        f.write(b"\n" + _behavior_text(3, later).encode() + b"\n")
    tracemalloc.start()
    try:
        scan = mind.scan_behaviors(huge)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (scan.first, scan.last) == (later, later)
    assert peak < 8 * mind.MAX_LINE_BYTES


def test_scan_of_a_missing_file_is_a_mind_file_error(tmp_path):
    with pytest.raises(MindFileError, match=r"nowhere\.tsv: cannot be read"):
        mind.scan_behaviors(tmp_path / "nowhere.tsv")


@given(times=st.lists(_TIMES, min_size=1, max_size=400), block_bytes=st.sampled_from([64, 1 << 20]))
@settings(max_examples=60, deadline=None)
def test_scan_bulk_is_the_files_middle_98_percent(tmp_path_factory, times, block_bytes):
    import numpy as np

    path = tmp_path_factory.mktemp("bulk") / "behaviors.tsv"
    path.write_text("".join(_behavior_text(i, t) + "\n" for i, t in enumerate(times)), encoding="utf-8")
    scan = mind.scan_behaviors(path, block_bytes=block_bytes)
    assert (scan.first, scan.last) == (min(times), max(times))
    if len(times) < 100:
        assert scan.bulk is None and scan.plausible is None
        return
    # numpy's "higher"/"lower" quantiles are order statistics: no time is interpolated.
    seconds = np.array(times, dtype="datetime64[s]")
    start, end = np.quantile(seconds.astype(np.int64), 0.01, method="higher"), np.quantile(seconds.astype(np.int64), 0.99, method="lower")
    expected = tuple(datetime(1970, 1, 1) + timedelta(seconds=int(s)) for s in (start, end))
    assert scan.bulk == expected
    span = expected[1] - expected[0]
    assert scan.plausible == (expected[0] - max(timedelta(days=30), span), expected[1] + max(timedelta(days=1), span))


def _file_of_a_week_and_one_line(tmp_path, last_time):
    """200 lines over a week of 2019, then one at ``last_time``."""
    week = [datetime(2019, 11, 9) + timedelta(hours=i * 0.8) for i in range(200)]
    text = "".join(_behavior_text(i, t) + "\n" for i, t in enumerate(week)) + _behavior_text(200, last_time) + "\n"
    return write(tmp_path, "behaviors.tsv", text.encode())


def test_a_line_far_past_the_rest_of_its_file_is_a_bad_row_given_the_scan(tmp_path):
    path = _file_of_a_week_and_one_line(tmp_path, datetime(2026, 12, 5, 9, 0, 0))
    scan = mind.scan_behaviors(path)
    # The bulk: the 3rd and the 199th of the 201 times; a week long, so a week of margin.
    assert scan.bulk == (datetime(2019, 11, 9, 1, 36), datetime(2019, 11, 15, 14, 24))
    assert scan.plausible == (datetime(2019, 10, 10, 1, 36), datetime(2019, 11, 22, 3, 12))
    rows = list(iter_behaviors(path, scan=scan))
    assert all(isinstance(r, BehaviorRow) for r in rows[:200])
    bad = rows[200]
    assert (bad.line, bad.field, bad.value) == (201, "time", "12/5/2026 9:00:00 AM")
    assert ("expected a time no later than 11/22/2019 3:12:00 AM: 98% of the file's lines are from 11/9/2019 1:36:00 AM "
            "to 11/15/2019 2:24:00 PM") in bad.reason
    # Without the scan (predict, evaluate: nothing is stored) the line is read.
    assert isinstance(list(iter_behaviors(path))[200], BehaviorRow)


@pytest.mark.parametrize("when", [datetime(2019, 11, 22, 3, 12), datetime(2019, 10, 10, 1, 36)])
def test_a_line_within_the_margins_is_kept(tmp_path, when):
    path = _file_of_a_week_and_one_line(tmp_path, when)
    assert isinstance(list(iter_behaviors(path, scan=mind.scan_behaviors(path)))[200], BehaviorRow)


def test_a_line_far_before_the_rest_of_its_file_is_a_bad_row_given_the_scan(tmp_path):
    # Stored, it moved its articles' first-seen times back for good: out of every fresh set.
    path = _file_of_a_week_and_one_line(tmp_path, datetime(2018, 11, 12, 9, 0, 0))
    bad = list(iter_behaviors(path, scan=mind.scan_behaviors(path)))[200]
    assert (bad.line, bad.field, bad.value) == (201, "time", "11/12/2018 9:00:00 AM")
    # Sorted first, it moves the bulk one line down: the 2nd and the 198th of the week.
    assert ("expected a time no earlier than 10/10/2019 12:48:00 AM: 98% of the file's lines are from 11/9/2019 12:48:00 AM "
            "to 11/15/2019 1:36:00 PM, and a date far before the rest of a file would move its articles' first-seen "
            "times there for good") in bad.reason


def test_an_article_shown_twice_in_one_impression_needs_one_label(tmp_path):
    rows = read_behaviors(tmp_path, "1\tU1\t11/11/2019 9:05:58 AM\t\tN1-1 N2-0 N1-1\n"  # same label: kept as shown
                                    "2\tU1\t11/11/2019 9:05:58 AM\t\tN1-0 N2-0 N2-1\n"
                                    "3\tU1\t11/11/2019 9:05:58 AM\t\tN1 N2 N1\n")  # unlabelled: nothing to disagree
    assert isinstance(rows[0], BehaviorRow) and rows[0].news_ids == ("N1", "N2", "N1") and rows[0].labels == (1, 0, 1)
    assert (rows[1].line, rows[1].field, rows[1].value) == (2, "impressions", "N2")
    assert "expected one label per article: it is shown twice in the impression, clicked and not clicked" in rows[1].reason
    assert isinstance(rows[2], BehaviorRow)


# --- batches -----------------------------------------------------------------------------------


def _row(line: int, num_history: int, num_candidates: int = 1) -> BehaviorRow:
    return BehaviorRow(line, line, "U1", datetime(2019, 11, 11), tuple(f"H{i}" for i in range(num_history)),
                       tuple(f"C{i}" for i in range(num_candidates)), None, "")


def test_batches_end_at_the_line_count_or_before_the_row_past_the_id_budget():
    # 20,000 parsed lines of 2,000 History ids held 3 GB: a chunk is cut by its ids too.
    from recsys.data.mind import batches

    rows = [_row(1, 2), _row(2, 3), _row(3, 30), _row(4, 0), BadRow("f", 5, "time", "x", "a time", "raw"),
            _row(6, 1), _row(7, 1), _row(8, 1), _row(9, 9)]
    # ids a row: 3, 4, 31 (over the budget of 10), 1, 0, 2, 2, 2, 10 (exactly the budget)
    cut = [[r.line for r in b] for b in batches(rows, max_lines=3, max_ids=10)]
    assert cut == [[1, 2], [3], [4, 5, 6], [7, 8], [9]]
    assert [r for b in batches(rows, 3, 10) for r in b] == rows  # order and contents kept
    assert [[r.line for r in b] for b in batches(rows, max_lines=100, max_ids=10 ** 9)] == [list(range(1, 10))]
    assert [[r.line for r in b] for b in batches(rows, max_lines=1, max_ids=10)] == [[i] for i in range(1, 10)]
    assert [[r.line for r in b] for b in batches([_row(1, 50)], max_lines=5, max_ids=10)] == [[1]]
    assert list(batches([], 5, 10)) == []


def test_batches_read_at_most_one_row_past_the_batch_and_default_to_max_batch_ids(monkeypatch):
    from recsys.data.mind import batches

    pulled = []

    def rows():
        for i in range(1, 7):
            pulled.append(i)
            yield _row(i, 4)  # 5 ids each

    it = batches(rows(), max_lines=10, max_ids=12)
    assert [r.line for r in next(it)] == [1, 2] and pulled == [1, 2, 3]
    monkeypatch.setattr(mind, "MAX_BATCH_IDS", 10)
    assert [[r.line for r in b] for b in batches(rows(), max_lines=10)] == [[1, 2], [3, 4], [5, 6]]


def test_the_ingests_batches_flag_the_last_one_before_it_is_written(monkeypatch):
    # The batch holding a file's last line renames the quarantine file before it commits.
    from recsys.store.ingest import _batches

    rows = [_row(1, 2), _row(2, 3), _row(3, 30), _row(4, 0), BadRow("f", 5, "time", "x", "a time", "raw"),
            _row(6, 1), _row(7, 1), _row(8, 1), _row(9, 9)]
    monkeypatch.setattr(mind, "MAX_BATCH_IDS", 10)
    for n in range(len(rows) + 1):
        for size in (1, 2, 3, 100):
            got = [([r.line for r in b], last) for b, last in _batches(rows[:n], size)]
            expected = [[r.line for r in b] for b in mind.batches(rows[:n], size, 10)]
            assert [b for b, _ in got] == expected  # the same cut, ids included (row 3 alone; row 9 last)
            assert [last for _, last in got] == [i == len(expected) - 1 for i in range(len(expected))]


def test_an_impression_of_exactly_max_candidates_is_read(tmp_path):
    # 1001 are refused (test_absurd_history_and_candidate_counts); the bound itself is read.
    assert mind.MAX_CANDIDATES == 1000
    candidates = " ".join(f"N{i}-0" for i in range(1_000))
    rows = read_behaviors(tmp_path, f"1\tU1\t11/11/2019 9:05:58 AM\t\t{candidates}\n")
    assert isinstance(rows[0], BehaviorRow) and len(rows[0].news_ids) == 1000


def test_scan_bulk_rounds_the_1_and_99_percent_positions_inward_to_whole_lines(tmp_path):
    # 150 distinct times a minute apart: the 1% point is at position 0.01 * 149 = 1.49, not a
    # whole line; the bulk starts at the next line up (position 2, 9:02) and ends at the line
    # below 0.99 * 149 = 147.51 (position 147, 9:00 + 147 min = 11:27), no time interpolated.
    start = datetime(2019, 11, 11, 9, 0, 0)
    times = [start + timedelta(minutes=i) for i in range(150)]
    path = write(tmp_path, "behaviors.tsv", "".join(_behavior_text(i, t) + "\n" for i, t in enumerate(reversed(times))).encode())
    assert mind.scan_behaviors(path).bulk == (datetime(2019, 11, 11, 9, 2), datetime(2019, 11, 11, 11, 27))
