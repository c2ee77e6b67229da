"""Progress display: on stderr, never in stdout, which holds the commands' JSON."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json
from recsys.progress import progress
with progress("counting sheep", total=3) as advance:
    for _ in range(3):
        advance(1)
print(json.dumps({"sheep": 3}))
"""


def test_on_a_terminal_the_bar_goes_to_stderr_and_stdout_holds_only_the_json(tmp_path: Path):
    # stderr a terminal (a pseudo-terminal), stdout redirected to a file: `recsys ingest > report.json`.
    # The bar was drawn on stdout, so report.json began with it, and nothing showed on the terminal.
    out = tmp_path / "out.json"
    primary, secondary = pty.openpty()
    try:
        with open(out, "w") as stdout:
            subprocess.run([sys.executable, "-c", SCRIPT], stdout=stdout, stderr=secondary, check=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"})
        os.close(secondary)
        secondary = None
        shown = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the pseudo-terminal's other end is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if secondary is not None:
            os.close(secondary)
        os.close(primary)
    assert json.loads(out.read_text()) == {"sheep": 3}
    assert b"counting sheep" in shown and b"3/3" in shown
