"""MIND competition prediction files: ``ImpressionID [r1,r2,...]``, one line per impression.

Ranks are 1-based, listed in candidate order (rank 1 = the candidate the model likes best),
with no spaces inside the brackets; the MIND scorer turns rank ``r`` into the score ``1/r``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator

import numpy as np

from recsys.atomic import atomic_open
from recsys.errors import RecsysError, SchemaError
from recsys.metrics.ranking import MetricInputError, ranks_from_scores

RANKS_FIELD = "ranks"
# At most 18 digits: every such rank fits int64 (a longer one overflowed without naming the line).
_RANK = re.compile(r"[1-9][0-9]{0,17}", re.ASCII)


class PredictionError(RecsysError, ValueError):
    """Scores that cannot be written as a prediction line."""


def format_prediction_line(impression_id, scores) -> str:
    """One prediction line (without the newline) for an impression's candidate scores.

    Args:
        impression_id: the MIND impression id (int or str without whitespace).
        scores: (n,) scores in candidate order; ties are ranked in candidate order.

    Returns:
        ``"<id> [r1,r2,...]"``.

    Raises:
        PredictionError: an empty score list, non-finite scores, or an id holding whitespace.
    """
    text = str(impression_id)
    if not text or any(ch.isspace() for ch in text):
        raise PredictionError(f"impression id {text!r} is empty or holds whitespace, expected a single token")
    try:
        ranks = ranks_from_scores(scores)
    except MetricInputError as err:
        raise PredictionError(f"impression {text}: {err}") from None
    if ranks.size == 0:
        raise PredictionError(f"impression {text} has no candidate scores, expected at least one")
    return f"{text} [{','.join(map(str, ranks.tolist()))}]"


def write_predictions(path: str | os.PathLike, rows: Iterable[tuple[object, object]]) -> int:
    """Write a MIND prediction file atomically (temporary file in the same folder, then rename).

    Args:
        path: destination file; its folder must exist.
        rows: ``(impression_id, scores)`` per impression, in the order wanted in the file
            (the scorer pairs lines with the truth file by position).

    Returns:
        The number of lines written.

    Raises:
        PredictionError: a row that ``format_prediction_line`` rejects (nothing is left behind).
    """
    count = 0
    with atomic_open(path, "w", newline="\n") as out:
        for impression_id, scores in rows:
            out.write(format_prediction_line(impression_id, scores))
            out.write("\n")
            count += 1
    return count


def parse_prediction_line(line: str, *, path: str | os.PathLike = "<predictions>", line_number: int | None = None):
    """Parse one prediction line.

    Args:
        line: the text, with or without its newline.
        path: file name used in error messages.
        line_number: 1-based line number used in error messages.

    Returns:
        ``(impression_id: str, ranks: (n,) int64 array)``.

    Raises:
        SchemaError: not two fields, or a ranks field that is not ``[r1,...]`` with integers >= 1
            of at most 18 digits.
    """
    text = line.rstrip("\r\n")
    fields = text.split()
    if len(fields) != 2:
        raise SchemaError(path, line_number, "line", text, "'<ImpressionID> [r1,r2,...]' (two fields)")
    impression_id, field = fields
    if not (field.startswith("[") and field.endswith("]")) or len(field) < 3:
        raise SchemaError(path, line_number, RANKS_FIELD, field, "a bracketed list of ranks like [2,1,3]")
    parts = field[1:-1].split(",")
    # ASCII digits without leading zeros: what the MIND scorer's json.loads accepts (str.isdigit
    # would also pass "²" or Arabic-Indic digits, and "01").
    if not all(_RANK.fullmatch(p) for p in parts):
        raise SchemaError(path, line_number, RANKS_FIELD, field, "comma-separated integers >= 1 (of at most 18 digits)")
    return impression_id, np.array([int(p) for p in parts], dtype=np.int64)


def read_predictions(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Stream a MIND prediction file.

    Args:
        path: the file.

    Yields:
        ``(impression_id, ranks)`` per line: the id as text and (n,) int64 ranks.

    Raises:
        SchemaError: a malformed line (naming the file, line, field and value).
    """
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            yield parse_prediction_line(line, path=path, line_number=number)
