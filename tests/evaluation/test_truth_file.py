"""A sample world's truth.tsv as ``recsys evaluate`` reads it: the oracle's rows, and a clear
error naming the file, line, field and value for a damaged one (it used to be exit 2)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from recsys.errors import RecsysError, SchemaError
from recsys.pipelines.evaluate import load_truth

GOOD = ["test\t7\tN2\t1\t0.25\t0", "test\t7\tN1\t0\t0.75\t1", "train\t3\tN9\t0\t1\t1", "test\t8\tN3\t0\t0\t0"]


def write(tmp_path, lines: list[str]):
    path = tmp_path / "truth.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_one_splits_rows_in_candidate_order(tmp_path):
    truth = load_truth(write(tmp_path, GOOD), "test")
    assert sorted(truth) == [7, 8]
    assert truth[7][0] == ["N1", "N2"] and np.array_equal(truth[7][1], [0.75, 0.25])
    assert truth[8][0] == ["N3"] and np.array_equal(truth[8][1], [0.0])
    assert load_truth(write(tmp_path, GOOD), "dev") == {}


@pytest.mark.parametrize(("line", "field", "value"), [
    ("test\t9\tN4\t0\tabc\t0", "p", "abc"),
    ("test\t9\tN4\t0\t1.7\t0", "p", "1.7"),
    ("test\t9\tN4\t0\t-0.1\t0", "p", "-0.1"),
    ("test\t9\tN4\t0\tnan\t0", "p", "nan"),
    ("test\t9\tN4\t0", "columns", "4 columns"),
    ("test\t9\tN4\t0\t\t", "p", ""),  # six columns, the last two empty: the first of them named
    ("test\t9\tN4\t0\t0.5\t", "label", ""),
    ("", "columns", "an empty line"),  # not skipped: later lines would be misnumbered
    ("test\tx9\tN4\t0\t0.5\t0", "impression_id", "x9"),
    ("test\t9\t\t0\t0.5\t0", "news_id", ""),
    ("test\t9\tN4\t-1\t0.5\t0", "position", "-1"),
    ("test\t9\tN4\t0\t0.5\t2", "label", "2"),
])
def test_a_damaged_line_names_the_file_line_field_and_value(tmp_path, line, field, value):
    path = write(tmp_path, GOOD[:2] + [line] + GOOD[2:])
    with pytest.raises(SchemaError) as info:
        load_truth(path, "test")
    assert (info.value.path, info.value.line, info.value.field, info.value.value) == (str(path), 3, field, value)
    assert str(info.value).startswith(f"{path} line 3: field '{field}'")


def test_a_line_with_more_columns_or_bytes_that_are_not_utf8_is_refused_by_name(tmp_path):
    path = write(tmp_path, GOOD + ["test\t9\tN4\t0\t0.5\t0\textra"])
    with pytest.raises(RecsysError, match=re.escape(str(path)) + r": .*Expected 6 fields in line 5, saw 7; expected six tab-separated columns"):
        load_truth(path, "test")
    path.write_bytes(b"test\t9\tN\xff4\t0\t0.5\t0\n")
    with pytest.raises(RecsysError, match=re.escape(str(path)) + ": not UTF-8 text"):
        load_truth(path, "test")


def test_a_file_whose_every_line_is_wider_is_refused_as_too_many_columns(tmp_path):
    # A news.tsv given as --truth: pandas took the two extra leading columns as the index and
    # reported "field 'impression_id' has '<a title>'".
    path = write(tmp_path, ["N1\tnews\tsub\tA title\tAn abstract\thttps://x\t[]\t[]"] * 2)
    with pytest.raises(SchemaError) as info:
        load_truth(path, "test")
    assert (info.value.line, info.value.field, info.value.value) == (1, "columns", "8 columns")


def test_a_truth_file_found_beside_is_passed_over_only_when_its_first_line_is_of_another_kind(tmp_path, caplog):
    from recsys.pipelines.evaluate import _oracle

    behaviors = tmp_path / "behaviors_test.tsv"
    truth = tmp_path / "truth.tsv"
    good = "test\t1\tN1\t0\t0.25\t1\n"
    truth.write_text(good + "test\t1\tN2\t1\t0.5\n")  # ours, damaged on line 2: still an error
    with pytest.raises(SchemaError, match=r"truth\.tsv line 2: field 'columns' has '5 columns'"):
        _oracle(behaviors, None)
    for damage in ("test\t1\tN2\t1\t0.5\t0\textra\tcolumns\n", b"test\t1\tN\xff\t1\t0.5\t0\n"):  # after line 1
        if isinstance(damage, bytes):
            truth.write_bytes(good.encode() + damage)
        else:
            truth.write_text(good + damage)
        with pytest.raises(RecsysError, match="truth.tsv"):
            _oracle(behaviors, None)
    truth.write_text("1 [1,0]\n2 [0,1]\n")  # the MIND competition's truth file: not ours, passed over
    assert _oracle(behaviors, None) is None
    assert "was found beside behaviors_test.tsv but is not a sample world's truth file" in caplog.text
    with pytest.raises(SchemaError, match=r"truth\.tsv line 1: field 'columns'"):
        _oracle(behaviors, truth)  # asked for by --truth: refused
    truth.write_text(good)
    ids, p = _oracle(behaviors, None)[1]
    assert ids == ["N1"] and p.tolist() == [0.25]
