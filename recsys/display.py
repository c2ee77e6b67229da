"""Tables of articles for a terminal (`recsys recommend`, `recsys similar`, the demo).

Cells are plain ``rich.text.Text``, never markup: titles come from the publisher and may hold
brackets ("[PHOTOS]", "[/x]") that rich would otherwise swallow or reject with an error.
Their control and bidi characters are shown as escapes (``recsys.escapes.escape_controls``).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from recsys.escapes import escape_controls


def _cell(value: object) -> Text:
    if isinstance(value, float):
        return Text(f"{value:.4f}")
    return Text(escape_controls(str(value)))


def rows_table(rows: Iterable[Mapping[str, object]], columns: Sequence[str], *, title: str) -> Table:
    """A table with one row per mapping, the given columns in order, floats to 4 decimals."""
    table = Table(*columns, title=Text(escape_controls(title)))
    for row in rows:
        table.add_row(*(_cell(row[column]) for column in columns))
    return table


# Rich lays out 80 columns when the output is not a terminal (a cron mail, a pipe, a log):
# tables of ids, dates and titles would fold every cell. At least this many there.
MIN_PIPED_WIDTH = 160


def console() -> Console:
    """A Rich console: the terminal's width, or at least ``MIN_PIPED_WIDTH`` columns when the
    output is not a terminal (``COLUMNS`` still widens it)."""
    out = Console()
    return out if out.is_terminal else Console(width=max(out.width, MIN_PIPED_WIDTH))
