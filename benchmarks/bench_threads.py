"""CPU each command really uses under a thread budget (`[runtime] threads`).

TensorFlow, onnxruntime, FAISS (OpenMP), numpy's BLAS and the tokenizer each size a thread
pool to every core unless told otherwise; `configure_threads` tells them. This benchmark runs
the commands an operator runs on a generated sample world, each under `[runtime] threads = T`,
and samples the summed CPU time of the command's process tree (its children, and any process
of its session: Ray's daemons) every ``--interval`` seconds. A command within its budget
stays at or below ``100 * T`` percent apart from start-up blips; the figures per command are
the peak and mean of the summed CPU, the seconds spent above ``100 * T + 20`` percent, the
peak thread and process counts, and the wall time.

    .venv/bin/python benchmarks/bench_threads.py --threads 1 2

Prints a table and writes ``benchmarks/results/threads.json``. On a machine with as many
cores as the largest budget only; other work on the machine shows in the wall times, not in
the CPU of the command's tree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

RESULTS = Path(__file__).resolve().parent / "results"


def _tree(root: psutil.Process) -> list[psutil.Process]:
    procs = {root.pid: root}
    try:
        procs.update((p.pid, p) for p in root.children(recursive=True))
    except psutil.Error:
        pass
    for p in psutil.process_iter():  # Ray's daemons leave the tree but keep the session
        try:
            if p.pid not in procs and os.getsid(p.pid) == root.pid:
                procs[p.pid] = p
        except (OSError, psutil.Error):
            pass
    return list(procs.values())


class TreeCPU:
    """Samples the summed CPU seconds of a process tree in a background thread."""

    def __init__(self, pid: int, interval: float):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, float, int, int]] = []  # (time, cpu%, threads, processes)
        self._seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            used, threads, procs = 0.0, 0, 0
            for p in _tree(self.root):
                try:
                    times = p.cpu_times()
                    cpu = times.user + times.system
                    threads += p.num_threads()
                    procs += 1
                except psutil.Error:  # exited between the listing and the read
                    continue
                used += cpu - self._seen.get(p.pid, cpu if p.pid != self.root.pid else 0.0)
                self._seen[p.pid] = cpu
            self.samples.append((now, 100 * used / (now - last), threads, procs))
            last = now

    def __enter__(self) -> TreeCPU:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure(command: list[str], *, budget: int, interval: float, env: dict) -> dict:
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    with TreeCPU(proc.pid, interval) as cpu:
        out, err = proc.communicate()
    wall = time.monotonic() - started
    if proc.returncode != 0:
        sys.stderr.write(err[-3000:])
        raise SystemExit(f"{' '.join(command)} exited {proc.returncode}")
    percents = [s[1] for s in cpu.samples[1:]] or [0.0]  # the first interval includes the start
    limit = 100 * budget + 20
    return {
        "wall_s": round(wall, 1),
        "peak_cpu_percent": round(max(percents), 1),
        "mean_cpu_percent": round(sum(percents) / len(percents), 1),
        "seconds_over_budget": round(interval * sum(p > limit for p in percents), 1),
        "peak_threads": max((s[2] for s in cpu.samples), default=0),
        "peak_processes": max((s[3] for s in cpu.samples), default=0),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="budgets ([runtime] threads) to run")
    parser.add_argument("--users", type=int, default=1500)
    parser.add_argument("--news", type=int, default=1500)
    parser.add_argument("--impressions", type=int, default=5000)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--engines", nargs="+", default=["local", "ray"])
    parser.add_argument("--tag", default="", help="suffix of the results file")
    args = parser.parse_args()

    recsys = [sys.executable, "-m", "recsys"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as tmp:
        tmp = Path(tmp)
        world = tmp / "world"
        subprocess.run(recsys + ["generate-sample", "--out", str(world), "--users", str(args.users), "--news",
                                 str(args.news), "--impressions", str(args.impressions), "--seed", "7"],
                       check=True, capture_output=True)
        # One feature cache for every budget: the first train encodes the covers, so its row
        # is "cold"; the later ones read the cache.
        env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
        env["RECSYS_CACHE_DIR"] = str(tmp / "cache")
        for budget in args.threads:
            ws = tmp / f"ws{budget}"
            ws.mkdir()
            config = ws / "recsys.toml"
            config.write_text(f"[runtime]\nthreads = {budget}\n")
            base = recsys + ["--workspace", str(ws), "--config", str(config)]
            commands = [
                ("ingest", ["ingest", "--news", str(world / "news.tsv"), "--behaviors", str(world / "behaviors_train.tsv"),
                            "--images", str(world / "images")]),
                ("train", ["train", "--epochs", "1"]),
                ("index build", ["index", "build"]),
                *[(f"nightly {engine}, 2 workers", ["nightly", "--engine", engine, "--workers", "2", "--rerank",
                                                               "--shard-size", "200"])
                  for engine in args.engines],
                ("predict", ["predict", "--behaviors", str(world / "behaviors_test.tsv"), "--out", str(tmp / f"p{budget}.txt")]),
                ("evaluate --baselines", ["evaluate", "--behaviors", str(world / "behaviors_test.tsv"),
                                          "--out", str(tmp / f"r{budget}"), "--baselines"]),
            ]
            for name, command in commands:
                row = {"threads": budget, "command": name, **measure(base + command, budget=budget,
                                                                    interval=args.interval, env=env)}
                rows.append(row)
                print(f"threads={budget}  {name:26s} wall {row['wall_s']:6.1f} s  peak {row['peak_cpu_percent']:6.1f}%  "
                      f"mean {row['mean_cpu_percent']:6.1f}%  over budget {row['seconds_over_budget']:5.1f} s  "
                      f"threads {row['peak_threads']:4d}  processes {row['peak_processes']:3d}", flush=True)
    result = {
        "world": {"users": args.users, "news": args.news, "impressions": args.impressions, "seed": 7},
        "interval_s": args.interval, "over_budget_means": "summed CPU above 100 * threads + 20 percent",
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "rows": rows,
    }
    out = RESULTS / f"threads{'_' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
