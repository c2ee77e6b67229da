"""What keeping TensorFlow's start-up chatter out of stderr costs each process that imports it.

``recsys.tensorflow_startup`` sends file descriptor 2 through a filter process while the
process first imports TensorFlow (and, without a CUDA driver, lists its devices). This starts
fresh interpreters that import TensorFlow and run one op, each way, in turn:

- ``quiet``: ``import recsys`` first (the filter is installed), as every recsys process does;
- ``plain``: ``import tensorflow`` first, then ``recsys`` (the filter never runs: the cost before).

and reports the wall time of each and the lines each wrote to stderr, with the CLI's
``TF_CPP_MIN_LOG_LEVEL=2``.

    .venv/bin/python benchmarks/bench_tf_startup.py --repeats 5

Prints the figures and writes benchmarks/results/tf_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CODE = {
    "quiet": "import recsys, tensorflow as tf; tf.constant(1.0) + 1",
    "plain": "import tensorflow as tf; import recsys; tf.constant(1.0) + 1",
}


def one(code: str) -> tuple[float, list[str]]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=True)
    return time.perf_counter() - started, done.stderr.splitlines()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "tf_startup.json")
    args = parser.parse_args()
    one(CODE["plain"])  # warm the page cache: the first start reads TensorFlow's libraries from disk
    seconds: dict[str, list[float]] = {name: [] for name in CODE}
    lines: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for name, code in CODE.items():  # in turn, so that drift in the machine's load hits both
            wall, err = one(code)
            seconds[name].append(round(wall, 3))
            lines[name] = err
    out = {
        "machine": platform.machine(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "load_average_1m_after": os.getloadavg()[0], "repeats": args.repeats,
        "runs": {name: {"seconds": seconds[name], "median_s": round(statistics.median(seconds[name]), 3),
                        "stderr_lines": len(lines[name]), "stderr": lines[name]} for name in CODE},
    }
    out["median_cost_s"] = round(out["runs"]["quiet"]["median_s"] - out["runs"]["plain"]["median_s"], 3)
    for name, run in out["runs"].items():
        print(f"{name}: median {run['median_s']} s over {args.repeats} ({run['seconds']}), {run['stderr_lines']} stderr lines")
    print(f"cost of the filter: {out['median_cost_s']} s per process")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
