"""SIGTERM to a running `recsys nightly`: how fast it stops, and whether its retry resumes it.

A scheduler's timeout (Airflow's execution_timeout, `kill`, systemd) sends SIGTERM. The job
should stop at once, release the store lock (a retry elsewhere would otherwise wait for the
lock to go stale) and leave a run that the retry resumes to the lists a clean run gives.

Builds the sample world's workspace with `recsys demo` (or reuses ``--workspace``), ranks one
clean night as the reference, then for each engine and each moment sends SIGTERM to the
`recsys nightly --rerank` process alone (not its process group: its workers must be stopped
by the job itself):

- ``starting``: as soon as the run row exists and no shard is written yet (the workers are
  still loading TensorFlow, the model and the index);
- ``ranking``: as soon as the first shard is written.

and measures the seconds from the signal to the process's exit, its exit code and last
line, whether any process of the job outlives it, whether the lock is free, and then runs the
retry (`recsys nightly --rerank`, the same plan) to compare its lists with the reference.

    .venv/bin/python benchmarks/bench_interrupt.py                      # local engine
    .venv/bin/python benchmarks/bench_interrupt.py --engines local ray --repeats 5

Prints the figures and writes them to benchmarks/results/interrupt.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECSYS = [sys.executable, "-m", "recsys"]
POLL_S = 0.02


def _recsys(workspace: Path, *args: str) -> list[str]:
    return [*RECSYS, "--workspace", str(workspace), *args]


def _query(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def _lists(db: Path, run_id: int) -> dict[str, tuple[str, ...]]:
    """user -> the run's recommended article ids in rank order."""
    rows = _query(db, "SELECT user_id, news_id FROM recommendations WHERE run_id = ? ORDER BY user_id, rank", (run_id,))
    lists: dict[str, list[str]] = {}
    for user, news in rows:
        lists.setdefault(user, []).append(news)
    return {user: tuple(items) for user, items in lists.items()}


def _nightly(workspace: Path, args: list[str]) -> dict:
    proc = subprocess.run(_recsys(workspace, "nightly", "--rerank", *args), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"recsys nightly failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)["run"]


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (workers, Ray's processes), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def interrupt_once(workspace: Path, args: list[str], *, moment: str, timeout: float) -> dict:
    """Start a nightly, SIGTERM it at ``moment``, time its exit, then run the retry."""
    db = workspace / "recsys.db"
    last_run = _query(db, "SELECT coalesce(max(run_id), 0) FROM runs")[0][0]
    started = time.perf_counter()
    proc = subprocess.Popen(_recsys(workspace, "nightly", "--rerank", *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    run_id, shards_at_signal, seen = None, 0, set()
    while proc.poll() is None and time.perf_counter() - started < timeout:
        seen |= _descendants(proc.pid)
        rows = _query(db, "SELECT run_id FROM runs WHERE kind = 'nightly' AND status = 'running' AND run_id > ?",
                      (last_run,))
        if rows:
            run_id = rows[0][0]
            shards_at_signal = _query(db, "SELECT count(*) FROM run_shards WHERE run_id = ?", (run_id,))[0][0]
            if (moment == "starting" and shards_at_signal == 0) or (moment == "ranking" and shards_at_signal >= 1):
                break
        time.sleep(POLL_S)
    if proc.poll() is not None:
        raise RuntimeError(f"the nightly ended ({proc.returncode}) before the {moment!r} moment: use smaller shards")
    if run_id is None:
        proc.kill()
        raise RuntimeError(f"no running nightly run appeared within {timeout:g} s")
    seen |= _descendants(proc.pid)
    signalled = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=timeout)
    exit_seconds = time.perf_counter() - signalled
    time.sleep(0.5)  # what outlives the job by more than half a second is left behind
    survivors = _alive(seen)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    lock_rows = _query(db, "SELECT holder FROM locks WHERE name = 'nightly'")
    run_status = _query(db, "SELECT status FROM runs WHERE run_id = ?", (run_id,))[0][0]
    shards_after = _query(db, "SELECT count(*) FROM run_shards WHERE run_id = ?", (run_id,))[0][0]

    clock = time.perf_counter()
    retry = _nightly(workspace, args)
    return {
        "moment": moment, "run_id": run_id, "exit_code": proc.returncode,
        "last_line": (stderr.strip().splitlines() or [""])[-1],
        "exit_seconds_after_sigterm": exit_seconds, "shards_at_signal": shards_at_signal,
        "shards_kept": shards_after, "run_status_after": run_status, "lock_free_after": not lock_rows,
        "processes_seen": len(seen), "processes_left_behind": len(survivors),
        "retry_seconds": time.perf_counter() - clock, "retry_run_id": retry["run_id"], "retry_resumed": retry["resumed"],
        "retry_status": retry["status"], "retry_recommendations": retry["counts"]["recommendations"],
        "retry_lists": _lists(db, retry["run_id"]),
    }


def _summary(results: list[dict]) -> list[dict]:
    """Per engine and moment: trials, exit codes seen, slowest exit, anything left or lost."""
    groups: dict[tuple, list[dict]] = {}
    for row in results:
        groups.setdefault((row["engine"], row["moment"]), []).append(row)
    return [{
        "engine": engine, "moment": moment, "trials": len(rows),
        "exit_codes": sorted({r["exit_code"] for r in rows}),
        "max_exit_seconds": max(r["exit_seconds_after_sigterm"] for r in rows),
        "processes_left_behind": sum(r["processes_left_behind"] for r in rows),
        "lock_free_every_time": all(r["lock_free_after"] for r in rows),
        "retries_resumed": sum(r["retry_resumed"] for r in rows),
        "retries_with_the_reference_lists": sum(r["users_with_the_reference_list"] == r["users"]
                                                and not r["users_not_in_reference"] for r in rows),
    } for (engine, moment), rows in groups.items()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=None,
                        help="a workspace `recsys demo` built (default: build one in a temporary folder)")
    parser.add_argument("--engines", nargs="+", choices=["local", "ray"], default=["local"])
    parser.add_argument("--shard-size", type=int, default=10, help="users per shard (small: many shards to cut)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1,
                        help="trials per engine and moment (a SIGTERM's landing place varies from run to run)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for any one step")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "interrupt.json")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_interrupt_") as tmp:
        workspace = args.workspace
        if workspace is None:
            workspace = Path(tmp) / "workspace"
            print(f"building the sample world's workspace with `recsys demo` in {workspace} ...", flush=True)
            subprocess.run(_recsys(workspace, "demo"), check=True, capture_output=True)
        results = []
        for engine in args.engines:
            night = ["--engine", engine, "--shard-size", str(args.shard_size), "--workers", str(args.workers)]
            clock = time.perf_counter()
            reference = _nightly(workspace, night)
            reference_seconds = time.perf_counter() - clock
            expected = _lists(workspace / "recsys.db", reference["run_id"])
            for moment, trial in [(m, t) for m in ("starting", "ranking") for t in range(args.repeats)]:
                row = interrupt_once(workspace, night, moment=moment, timeout=args.timeout)
                row["trial"] = trial
                lists = row.pop("retry_lists")
                same = sum(lists.get(user) == items for user, items in expected.items())
                row.update({
                    "engine": engine, "reference_seconds": reference_seconds,
                    "reference_recommendations": reference["counts"]["recommendations"],
                    "users": len(expected), "users_with_the_reference_list": same,
                    "users_not_in_reference": len(set(lists) - set(expected)),
                })
                results.append(row)
                print(f"{engine:5s} {moment:8s}: exit {row['exit_code']} {row['exit_seconds_after_sigterm']:.2f} s after "
                      f"SIGTERM ({row['last_line']!r}), lock free {row['lock_free_after']}, "
                      f"{row['processes_left_behind']}/{row['processes_seen']} processes left behind; retry "
                      f"{'resumed' if row['retry_resumed'] else 'started afresh'} run {row['retry_run_id']} "
                      f"({row['shards_kept']} shards kept) in {row['retry_seconds']:.1f} s: "
                      f"{same}/{len(expected)} users with the clean run's list", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "bench_interrupt", "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "shard_size": args.shard_size, "workers": args.workers, "repeats": args.repeats, "results": results,
        "summary": _summary(results),
    }
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    for group in document["summary"]:
        print(json.dumps(group))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
