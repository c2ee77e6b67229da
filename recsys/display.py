"""Tables of articles for a terminal (`recsys recommend`, `recsys similar`, the demo).

Cells are plain ``rich.text.Text``, never markup: titles come from the publisher and may hold
brackets ("[PHOTOS]", "[/x]") that rich would otherwise swallow or reject with an error.
Their control and bidi characters are shown as escapes (`escape_controls`).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text


# Publisher text reaches the terminal as it is: an ESC or C1 CSI starts a sequence that recolours,
# clears or retitles the terminal (OSC), and a bidi override reorders what follows it on the line,
# so a title could pass for another. Rich drops only BEL, BS, VT, FF and CR. Each such character is
# shown as its Python escape rather than U+FFFD: the operator sees what the feed holds and can
# grep the news file for it. Joiners (U+200D, emoji sequences) and other format characters stay.
_BIDI_CONTROLS = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_SHOWN_ESCAPED = {
    **{code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7F, 0xA0)]},
    **{code: f"\\u{code:04x}" for code in _BIDI_CONTROLS},
}


def escape_controls(text: str) -> str:
    """``text`` with every C0/C1 control character and DEL as ``\\xNN`` and every bidi control
    (U+061C, U+200E-U+200F, U+202A-U+202E, U+2066-U+2069) as ``\\uNNNN``: safe for a terminal."""
    return text.translate(_SHOWN_ESCAPED)


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
