"""MIND prediction files: exact format, round trip, atomic writes, and errors naming file and line."""

import numpy as np
import pytest

from recsys.errors import SchemaError
from recsys.evaluation.prediction_file import PredictionError, read_predictions, write_predictions
from recsys.metrics.ranking import ranks_from_scores


def test_writes_the_mind_format(tmp_path):
    path = tmp_path / "prediction.txt"
    count = write_predictions(path, [(12, [0.2, 0.9, 0.1]), ("13", [0.5, 0.5])])
    assert count == 2
    assert path.read_text() == "12 [2,1,3]\n13 [1,2]\n"


def test_round_trip_gives_the_ranks_back(tmp_path):
    rng = np.random.default_rng(0)
    rows = [(i, np.round(rng.random(rng.integers(1, 80)), 2)) for i in range(200)]
    path = tmp_path / "prediction.txt"
    write_predictions(path, iter(rows))
    back = list(read_predictions(path))
    assert [i for i, _ in back] == [str(i) for i, _ in rows]
    for (_, scores), (_, ranks) in zip(rows, back):
        assert np.array_equal(ranks, ranks_from_scores(scores))
        assert sorted(ranks.tolist()) == list(range(1, len(scores) + 1))


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "prediction.txt"
    path.write_text("1 [1]\n")

    def rows():
        yield 1, [0.3, 0.1]
        yield 2, [0.1, float("nan")]

    with pytest.raises(PredictionError, match="impression 2: scores holds nan, expected finite scores"):
        write_predictions(path, rows())
    assert path.read_text() == "1 [1]\n"
    assert [p.name for p in tmp_path.iterdir()] == ["prediction.txt"]


@pytest.mark.parametrize(
    "row, message",
    [
        (("a b", [0.1]), "impression id 'a b' is empty or holds whitespace"),
        # Any whitespace, not only a space: a tab splits the line's fields, a newline the line.
        (("a\tb", [0.1]), r"impression id 'a\\tb' is empty or holds whitespace"),
        (("7\n8", [0.1]), r"impression id '7\\n8' is empty or holds whitespace"),
        (("", [0.1]), "impression id '' is empty"),
        ((3, []), "impression 3 has no candidate scores"),
    ],
)
def test_bad_rows_are_rejected(tmp_path, row, message):
    with pytest.raises(PredictionError, match=message):
        write_predictions(tmp_path / "p.txt", [row])


@pytest.mark.parametrize(
    "line, field, message",
    [
        ("7\n", "line", "expected '<ImpressionID> \\[r1,r2,...\\]' \\(two fields\\)"),
        ("7 [1, 2]\n", "line", "two fields"),
        ("7 1,2\n", "ranks", "a bracketed list of ranks"),
        ("7 []\n", "ranks", "a bracketed list of ranks"),
        ("7 [1,x]\n", "ranks", "comma-separated integers >= 1"),
        ("7 [1,-2]\n", "ranks", "comma-separated integers >= 1"),
        ("7 [0,1]\n", "ranks", "comma-separated integers >= 1"),
        # What the MIND scorer's json.loads refuses, and what int() cannot read.
        ("7 [01,2]\n", "ranks", "comma-separated integers >= 1"),
        ("7 [1,2\u00b2]\n", "ranks", "comma-separated integers >= 1"),
        ("7 [\u0661,2]\n", "ranks", "comma-separated integers >= 1"),
        ("7 [1,99999999999999999999]\n", "ranks", "comma-separated integers >= 1 \\(of at most 18 digits\\)"),
        ("7 [1,1000000000000000000]\n", "ranks", "comma-separated integers >= 1 \\(of at most 18 digits\\)"),  # 19 digits
        ("\n", "line", "two fields"),
    ],
)
def test_malformed_lines_name_file_line_and_field(tmp_path, line, field, message):
    path = tmp_path / "prediction.txt"
    path.write_text("1 [2,1]\n" + line)
    reader = read_predictions(path)
    assert next(reader)[0] == "1"
    with pytest.raises(SchemaError, match=f"prediction.txt line 2: field '{field}' has .*{message}") as info:
        next(reader)
    assert info.value.line == 2 and info.value.field == field


def test_a_rank_of_18_digits_is_read(tmp_path):
    # The documented bound: at most 18 digits, every such rank fitting int64.
    path = tmp_path / "prediction.txt"
    path.write_text("7 [999999999999999999,1]\n")
    [(impression_id, ranks)] = read_predictions(path)
    assert impression_id == "7" and ranks.tolist() == [999999999999999999, 1]
