"""Article tables print publisher text verbatim, whatever brackets it holds."""

from __future__ import annotations

import io

import numpy as np
from rich.console import Console

from recsys.display import rows_table

TITLES = ["[PHOTOS] The best of 2019", "Closing tag first [/x] then [bold]not bold", "Plain title"]


def render(table) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=300, color_system=None).print(table)
    return buffer.getvalue()


def test_titles_with_markup_like_brackets_print_verbatim():
    rows = [
        {"rank": np.int64(i + 1), "news_id": f"N{i}", "title": title, "category": "[news]", "score": np.float64(0.5 - i / 10)}
        for i, title in enumerate(TITLES)
    ]
    out = render(rows_table(rows, ["rank", "news_id", "title", "category", "score"], title="recommendations for [/u]"))
    for title in TITLES:
        assert title in out
    assert out.count("[news]") == 3
    assert "recommendations for [/u]" in out
    # numpy scalars: ranks as integers, scores to 4 decimals, in row order
    lines = [line for line in out.splitlines() if "N0" in line or "N1" in line or "N2" in line]
    assert ["0.5000" in lines[0], "0.4000" in lines[1], "0.3000" in lines[2]] == [True, True, True]
    assert [line.split("│")[1].strip() for line in lines] == ["1", "2", "3"]


def test_columns_follow_the_requested_order():
    rows = [{"a": "first", "b": "second"}]
    out = render(rows_table(rows, ["b", "a"], title="t"))
    header = next(line for line in out.splitlines() if "a" in line and "b" in line and "┃" in line)
    assert header.index(" b ") < header.index(" a ")


def test_a_console_that_is_not_a_terminal_is_wide_enough_for_whole_rows(monkeypatch):
    # Rich's 80 columns outside a terminal folded every id, date and title of a cron mail.
    from recsys.display import MIN_PIPED_WIDTH, console

    monkeypatch.delenv("COLUMNS", raising=False)
    assert console().width == MIN_PIPED_WIDTH
    monkeypatch.setenv("COLUMNS", "300")
    assert console().width == 300
