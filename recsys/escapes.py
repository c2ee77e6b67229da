"""Publisher text made safe to show: its control and bidi characters as visible escapes.

Titles and a bad line's raw text come from the publisher and reach terminals (tables, JSON
results, the quarantine file read with less or grep). An ESC or a C1 CSI (U+009B) starts a
sequence that recolours, clears or retitles the terminal, and a bidi override reorders what
follows it on the line, so a title could pass for another. Each such character is shown as its
Python escape rather than U+FFFD: the operator sees what the feed holds and can grep for it.
Joiners (U+200D in emoji sequences) and other format characters stay as they are.
"""

from __future__ import annotations

# C0 controls, DEL and C1 controls.
CONTROL_CODES = (*range(0x20), *range(0x7F, 0xA0))
# Arabic letter mark, LRM/RLM, the embeddings and overrides, the isolates.
BIDI_CONTROLS = (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))


def escape_of(code: int) -> str:
    """Python's escape of a character: ``\\x1b`` below 0x100, ``\\u202e`` above."""
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


# For str.translate: every control and bidi character -> its escape.
TERMINAL_ESCAPES = {code: escape_of(code) for code in (*CONTROL_CODES, *BIDI_CONTROLS)}


def escape_controls(text: str) -> str:
    """``text`` with every C0/C1 control character and DEL as ``\\xNN`` and every bidi control
    (U+061C, U+200E-U+200F, U+202A-U+202E, U+2066-U+2069) as ``\\uNNNN``: safe for a terminal."""
    return text.translate(TERMINAL_ESCAPES)
