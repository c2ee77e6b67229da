"""Article tables print publisher text verbatim, whatever brackets it holds, and its terminal
control characters as harmless escapes (in the tables and in a command's JSON result)."""

from __future__ import annotations

import io
import json

import numpy as np
from rich.console import Console

from recsys.display import escape_controls, rows_table

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


# What /tmp/hostile's news_esc.tsv held: SGR colours, an OSC retitling the terminal, an erase,
# a CR overwrite, a right-to-left override; plus a C1 CSI, DEL and a bidi isolate.
HOSTILE = "ESC \x1b[31mRED\x1b[0m \x1b]0;pwned\x07 \x1b[2K cr\rOVER \u202eevil\u202c \x9b2J \x7f \u2066x\u2069 end"


def test_control_and_bidi_characters_of_a_title_print_as_escapes():
    rows = [{"news_id": "N1", "title": HOSTILE, "category": "news\x1b[5m"}]
    out = render(rows_table(rows, ["news_id", "title", "category"], title="similar to \x1b]0;x\x07"))
    control = [c for c in out if ord(c) < 0x20 and c != "\n" or 0x7F <= ord(c) < 0xA0 or c in "\u202e\u202c\u2066\u2069"]
    assert control == []
    assert r"\x1b[31mRED\x1b[0m \x1b]0;pwned\x07 \x1b[2K cr\x0dOVER \u202eevil\u202c \x9b2J \x7f \u2066x\u2069 end" in out
    assert r"news\x1b[5m" in out and r"similar to \x1b]0;x\x07" in out
    # Printable text is left alone: accents, emoji with their zero-width joiner, brackets.
    kept = "São Paulo 👩\u200d🔬 [PHOTOS]"
    assert escape_controls(kept) == kept


def test_the_json_result_escapes_the_c1_and_bidi_characters_json_leaves_raw(capsys):
    from recsys.cli import _print_json

    _print_json([{"title": HOSTILE + " São Paulo 👩\u200d🔬"}])
    out = capsys.readouterr().out
    assert json.loads(out) == [{"title": HOSTILE + " São Paulo 👩\u200d🔬"}]  # the same value
    assert not any(ord(c) < 0x20 and c != "\n" or 0x7F <= ord(c) < 0xA0 or c in "\u202e\u202c\u2066\u2069" for c in out)
    assert "São Paulo 👩\u200d🔬" in out  # UTF-8 stdout: other text stays readable
