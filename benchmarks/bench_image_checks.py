"""How long the cover check's JPEG scan count takes on a hostile file (issue: hostile covers).

``recsys.data.images.jpeg_scans`` walks a JPEG's markers to refuse progressive files of too many
scans before decoding them; ingest's cover check and the image encoder both call it. A file
Pillow opens as a 16x16 JPEG can follow its scan with a run of 0xFF bytes that no marker byte
ends. The marker search ``\\xff+[^\\xff\\x00]`` (before `6f8f37a`) was tried again from every byte
of such a run: quadratic. This times the count on runs of growing length with the current
search, and with the old one up to a length it finishes in seconds.

    .venv/bin/python benchmarks/bench_image_checks.py

Prints the figures and writes benchmarks/results/image_checks.json.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import re
import time
from pathlib import Path

from PIL import Image

from recsys.data import images

RESULTS = Path(__file__).resolve().parent / "results"
OLD_MARKER = re.compile(rb"\xff+[^\xff\x00]")
OLD_UP_TO = 40_000  # bytes of 0xFF: about 30 s with the old search


def hostile_jpeg(run: int) -> bytes:
    """A 16x16 baseline JPEG cut after its scan header, then ``run`` bytes of 0xFF, 0x00 and EOI."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buffer, "JPEG")
    data = buffer.getvalue()
    sos = data.index(b"\xff\xda")
    header = data[: sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")]
    return header + b"\xff" * run + b"\x00" + b"\xff\xd9"


def timed(data: bytes, marker: re.Pattern) -> tuple[int, float]:
    current = images._NEXT_MARKER
    images._NEXT_MARKER = marker
    try:
        start = time.perf_counter()
        scans = images.jpeg_scans(data)
        return scans, time.perf_counter() - start
    finally:
        images._NEXT_MARKER = current


def main() -> None:
    # A parser even without options, so that `--help` prints this and does not run the benchmark.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "image_checks.json", help="where to write the figures")
    args = parser.parse_args()
    rows = []
    for run in (10_000, 20_000, 40_000, 1_000_000, 20 * 2**20):
        data = hostile_jpeg(run)
        scans, seconds = timed(data, images._NEXT_MARKER)
        row = {"run_bytes": run, "scans": scans, "seconds": round(seconds, 4)}
        if run <= OLD_UP_TO:
            old_scans, old_seconds = timed(data, OLD_MARKER)
            assert old_scans == scans, (old_scans, scans)  # the same count, only slower
            row["seconds_old_search"] = round(old_seconds, 3)
        rows.append(row)
        print(row, flush=True)
    out = {"machine": platform.machine(), "python": platform.python_version(), "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
