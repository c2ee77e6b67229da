"""What reading a scored file's exposure costs `predict` and `evaluate` (issue 4, file exposure).

Before scoring, both commands pass over the behaviors file once more to collect every show of
its impressions after the store's end (``recsys.pipelines.scoring.read_file_shows``), then
count each candidate's earlier shows (``FileShows.earlier``). This writes a MIND-shaped file
(default 150k impressions of about 37 candidates from 20k articles over one day, MIND-small's
train size; MIND-small dev has 73k) and times, against the plain parse of the same file
(``iter_behaviors``, what the scoring pass reads anyway):

- the collecting pass, and the Python heap's peak above its start in a second, traced run
  (``tracemalloc``, which counts numpy's buffers),
- ``earlier`` for every candidate, as the scoring chunks ask it, every earlier show and within
  a 24-hour window (how a calibration fitted on a validation day reads a file).

    .venv/bin/python benchmarks/bench_file_shows.py
    .venv/bin/python benchmarks/bench_file_shows.py --impressions 20000   # quick check

Prints the figures and writes benchmarks/results/file_shows.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import tracemalloc
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def write_file(path: Path, impressions: int, articles: int, seed: int = 0) -> int:
    """A behaviors file of ``impressions`` lines over one day; returns its candidates."""
    rng = np.random.default_rng(seed)
    start = datetime(2019, 11, 15)
    popularity = rng.zipf(1.6, articles).astype(np.float64)
    p = popularity / popularity.sum()
    total = 0
    with open(path, "w", encoding="utf-8") as f:
        for i in range(impressions):
            k = int(np.clip(rng.poisson(37), 2, 300))
            cands = rng.choice(articles, size=k, replace=False, p=p)
            clicked = rng.integers(k)
            history = " ".join(f"N{a}" for a in rng.integers(0, articles, rng.integers(0, 40)))
            t = start + timedelta(seconds=int(86400 * i / impressions))
            items = " ".join(f"N{a}-{int(j == clicked)}" for j, a in enumerate(cands))
            f.write(f"{i + 1}\tU{rng.integers(50_000)}\t{t.strftime('%m/%d/%Y %I:%M:%S %p')}\t{history}\t{items}\n")
            total += k
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impressions", type=int, default=150_000)
    parser.add_argument("--articles", type=int, default=20_000)
    args = parser.parse_args()

    from recsys.data.interactions import candidate_impression_rows
    from recsys.data.mind import iter_behaviors
    from recsys.pipelines.scoring import iter_behavior_chunks, read_file_shows

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "behaviors.tsv"
        candidates = write_file(path, args.impressions, args.articles)
        row_of = {f"N{a}": a for a in range(args.articles)}
        # the store ends before the file: every show counts
        catalogue = SimpleNamespace(end=np.datetime64("2019-11-14T23:59:59", "s"), row_of=row_of, span=None, bad_news={})

        t0 = time.perf_counter()
        with iter_behaviors(path) as rows:
            lines = sum(1 for _ in rows)
        parse_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        shows = read_file_shows(path, catalogue)
        collect_s = time.perf_counter() - t0
        # the heap's peak from a second, traced run (tracing slows Python code many times over)
        tracemalloc.start()
        read_file_shows(path, catalogue)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()

        t0 = time.perf_counter()
        queries = [(imps.candidate_items, imps.times[candidate_impression_rows(imps)])
                   for imps, _ in iter_behavior_chunks(path, catalogue, history_len=50)]
        chunk_parse_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        counted = sum(len(shows.earlier(items, times)[0]) for items, times in queries)
        lookup_s = time.perf_counter() - t0
        # within a window, as a calibration fitted on a day reads a file (one more bound, same searches)
        t0 = time.perf_counter()
        windowed = sum(len(shows.earlier(items, times, window_hours=24.0)[0]) for items, times in queries)
        window_lookup_s = time.perf_counter() - t0

    out = {
        "benchmark": "file_shows", "host": platform.node(), "args": vars(args), "lines": lines, "candidates": candidates,
        "shows_kept": len(shows), "bytes_kept": int(shows.keys.nbytes),
        "parse_seconds": round(parse_s, 2), "collect_seconds": round(collect_s, 2),
        "collect_peak_mb": round(peak / 2**20, 1), "peak_bytes_per_candidate": round(peak / candidates, 1),
        "scoring_pass_parse_seconds": round(chunk_parse_s, 2), "earlier_seconds_estimate": round(lookup_s, 2),
        "earlier_24h_window_seconds": round(window_lookup_s, 2),
        "collect_candidates_per_s": round(candidates / collect_s),
    }
    assert counted == windowed == candidates == len(shows)
    for key, value in out.items():
        print(f"{key:>28}: {value}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "file_shows.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'file_shows.json'}")


if __name__ == "__main__":
    main()
