"""Wall time and peak memory of one command and every process it starts, end to end.

The other benchmarks time the product's functions in a prepared process; this one runs a
`recsys` command as an operator does (its start-up, TensorFlow, encoders, workers and all)
and samples, every ``--interval`` seconds, the summed RSS and PSS of its process tree
(``peak_rss.PeakRSS``; PSS counts a page shared by n processes 1/n in each).

    .venv/bin/python benchmarks/bench_command.py --out benchmarks/results/command_nightly.json -- \\
        .venv/bin/recsys --workspace /tmp/e2e/ws --db sqlite:////tmp/e2e/bench.db nightly --workers 2

Prints the figures and writes them (with the command and its exit status) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from peak_rss import PeakRSS  # benchmarks/ is on sys.path when run as a script


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between RSS samples (PSS every 5th)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    t0 = time.perf_counter()
    with PeakRSS(interval_s=args.interval, pss_every=5) as rss:
        proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    sys.stderr.write(proc.stderr[-3000:])
    result = {
        "command": command, "returncode": proc.returncode, "wall_s": round(seconds, 1),
        "peak_rss_mb_tree": round(rss.peak / 2**20, 1), "peak_pss_mb_tree": round(rss.peak_pss / 2**20, 1),
        "stdout_tail": proc.stdout[-4000:], "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "load_average_1m_after": os.getloadavg()[0],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "stdout_tail"}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
