"""Tables of articles for a terminal (`recsys recommend`, `recsys similar`, the demo).

Cells are plain ``rich.text.Text``, never markup: titles come from the publisher and may hold
brackets ("[PHOTOS]", "[/x]") that rich would otherwise swallow or reject with an error.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from rich.table import Table
from rich.text import Text


def _cell(value: object) -> Text:
    if isinstance(value, float):
        return Text(f"{value:.4f}")
    return Text(str(value))


def rows_table(rows: Iterable[Mapping[str, object]], columns: Sequence[str], *, title: str) -> Table:
    """A table with one row per mapping, the given columns in order, floats to 4 decimals."""
    table = Table(*columns, title=Text(title))
    for row in rows:
        table.add_row(*(_cell(row[column]) for column in columns))
    return table
