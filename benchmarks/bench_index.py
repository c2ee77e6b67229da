"""Benchmark FaissIndex: build time, queries/s and recall of approximate search vs exact.

Synthetic item embeddings, L2-normalised:
  clustered: a mixture of Gaussians on the sphere, num_items / cluster_size centres drawn
             uniformly on the sphere, items = centre + spread * N(0, I/dim), renormalised
             (spread 1.0 gives cos(item, centre) ~ 0.71); queries drawn from the same mixture.
  uniform:   uniform on the sphere (the hard case: neighbours are barely closer than anyone).

For each size and data set: the exact index (flat) and the approximate kinds at the search
breadth their build calibrated (recall@100 >= --target-recall on a sample of their own items),
plus a sweep of that breadth (ef_search, nprobe), each with queries/s for a batch of queries
at every k, vectors compared per query, and recall@k against exact search, unfiltered and with
the nightly job's filters. Figures are printed and written as JSON.

Usage:
  python benchmarks/bench_index.py --num-items 65000 --num-items 1000000 --dim 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from recsys.index import FaissIndex
from recsys.threads import default_threads

RESULTS = Path(__file__).resolve().parent / "results" / "index.json"


def sphere_mixture(num_items: int, num_queries: int, dim: int, *, cluster_size: int, spread: float, seed: int):
    """Items (num_items, dim) and queries (num_queries, dim) from one mixture, float32."""
    rng = np.random.default_rng(seed)
    num_clusters = max(1, num_items // cluster_size)
    centres = _normalise(rng.standard_normal((num_clusters, dim), dtype=np.float32))

    def draw(n: int) -> np.ndarray:
        out = np.empty((n, dim), dtype=np.float32)
        for start in range(0, n, 100_000):  # chunks keep the float temporaries small
            m = min(100_000, n - start)
            noise = rng.standard_normal((m, dim), dtype=np.float32) * np.float32(spread / np.sqrt(dim))
            out[start : start + m] = centres[rng.integers(num_clusters, size=m)] + noise
        return _normalise(out)

    return draw(num_items), draw(num_queries)


def sphere_uniform(num_items: int, num_queries: int, dim: int, *, seed: int):
    rng = np.random.default_rng(seed)
    return (
        _normalise(rng.standard_normal((num_items, dim), dtype=np.float32)),
        _normalise(rng.standard_normal((num_queries, dim), dtype=np.float32)),
    )


def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def recall_at(truth: list[np.ndarray], found: list[np.ndarray], k: int) -> float:
    """Mean over queries of |found top-k ∩ exact top-k| / k."""
    return float(np.mean([len(np.intersect1d(t[:k], f[:k])) / k for t, f in zip(truth, found)]))


def timed_search(index: FaissIndex, queries: np.ndarray, k: int, repeats: int, **filters):
    """Best-of-repeats queries/s for one batch, and the result ids."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        hits = index.search(queries, k, **filters)
        best = min(best, time.perf_counter() - start)
    return len(queries) / best, [h.news_ids for h in hits]


def distance_computations() -> int:
    """Vectors compared so far by HNSW and IVF searches (FAISS's global counters)."""
    return int(faiss.cvar.hnsw_stats.ndis + faiss.cvar.indexIVF_stats.ndis)


def bench_index(index: FaissIndex, queries, ks, truth, repeats, filters, filtered_truth) -> dict:
    row = {}
    for k in ks:
        faiss.cvar.hnsw_stats.reset()
        faiss.cvar.indexIVF_stats.reset()
        qps, found = timed_search(index, queries, k, repeats)
        row[f"k{k}_qps"] = round(qps, 1)
        if index.kind != "flat":
            # Work per query independent of machine load: the CPU here is shared.
            # IVF's counter covers the lists scanned; its coarse quantizer compares nlist more.
            coarse = index.params.get("nlist", 0)
            row[f"k{k}_distances_per_query"] = round(distance_computations() / (repeats * len(queries))) + coarse
        row[f"k{k}_recall"] = round(recall_at(truth, found, k), 4)
        if k == max(ks) and 100 <= k:
            row[f"k{k}_recall@100"] = round(recall_at(truth, [f[:100] for f in found], 100), 4)
    k = max(ks)
    qps, found = timed_search(index, queries, k, repeats, **filters)
    row[f"filtered_k{k}_qps"] = round(qps, 1)
    row[f"filtered_k{k}_recall"] = round(recall_at(filtered_truth, found, k), 4)
    return row


def run_size(num_items, data, args, ks, out_rows):
    num_queries = args.num_queries
    if data == "clustered":
        x, q = sphere_mixture(num_items, num_queries, args.dim, cluster_size=args.cluster_size, spread=args.spread, seed=args.seed)
    else:
        x, q = sphere_uniform(num_items, num_queries, args.dim, seed=args.seed)
    ids = np.char.add("N", np.arange(num_items).astype(str))
    rng = np.random.default_rng(args.seed + 1)
    # Publication times spread over 100 days; the filter keeps the last 30 days and drops
    # 50 random "already clicked" items per query, as the nightly job does.
    published = np.datetime64("2024-01-01T00:00:00") + rng.integers(0, 100 * 86400, num_items).astype("timedelta64[s]")
    cutoff = np.datetime64("2024-03-11T00:00:00")
    exclude = [set(ids[rng.integers(num_items, size=50)].tolist()) for _ in range(num_queries)]
    filters = {"exclude": exclude, "published_after": cutoff}

    def build(kind):
        # exact_max_items=0: a filtered search scans the allowed rows exactly only when the
        # cost model says that beats the widened approximate search.
        start = time.perf_counter()
        index = FaissIndex.build(ids, x, published=published, kind=kind, exact_max_items=0, num_threads=args.num_threads,
                                 target_recall=args.target_recall)
        return index, time.perf_counter() - start

    flat, flat_seconds = build("flat")
    kmax = max(ks)
    truth = [h.news_ids for h in flat.search(q, kmax)]
    filtered_truth = [h.news_ids for h in flat.search(q, kmax, **filters)]
    base = {"num_items": num_items, "dim": args.dim, "data": data, "num_queries": num_queries}
    rows = [{**base, "kind": "flat", "params": {}, "build_s": round(flat_seconds, 2),
             **bench_index(flat, q, ks, truth, args.repeats, filters, filtered_truth)}]
    _report(rows[-1])
    del flat

    sweeps = {"hnsw": ("ef_search", args.ef_search), "ivf": ("nprobe", None)}
    for kind in args.kinds:
        index, seconds = build(kind)
        name, values = sweeps[kind]
        chosen = index.params[name]
        if values is None:  # nprobe as fractions of nlist
            values = sorted({max(1, index.params["nlist"] // f) for f in (32, 16, 8, 4)})
        io = _save_load_seconds(index, q[:10]) if not args.skip_save else {}
        calibration = {"calibration": index.calibration} if index.calibration else {}
        for value in sorted(set(values) | {chosen}):
            index.set_search_params(**{name: value})
            rows.append({**base, "kind": kind, "params": index.params, "chosen_by_build": value == chosen,
                         "build_s": round(seconds, 2), **io, **calibration,
                         **bench_index(index, q, ks, truth, args.repeats, filters, filtered_truth)})
            _report(rows[-1])
        del index
    out_rows.extend(rows)


def _save_load_seconds(index: FaissIndex, probe: np.ndarray) -> dict:
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        start = time.perf_counter()
        index.save(Path(tmp) / "index")
        saved = time.perf_counter() - start
        size = (Path(tmp) / "index" / "index.faiss").stat().st_size
        start = time.perf_counter()
        loaded = FaissIndex.load(Path(tmp) / "index", num_threads=index.num_threads)
        load_s = time.perf_counter() - start
        same = all(list(a) == list(b) for a, b in zip(index.search(probe, 10), loaded.search(probe, 10)))
    return {"save_s": round(saved, 2), "load_s": round(load_s, 2), "index_mb": round(size / 2**20, 1), "round_trip_identical": same}


def _report(row: dict) -> None:
    keys = [k for k in row if k not in ("num_items", "dim", "data", "num_queries", "kind", "params", "calibration")]
    if "calibration" in row and row.get("chosen_by_build"):
        c = row["calibration"]
        print(f"  build calibrated {c['param']}={c['value']}: recall@{c['k']}={c['recall']} on {c['num_queries']} of its own items"
              f" (target {c['target_recall']})")
    print(f"{row['data']:>9} n={row['num_items']:>8} {row['kind']:>4} {json.dumps(row['params'])}: "
          + " ".join(f"{k}={row[k]}" for k in keys), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-items", type=int, action="append", help="repeatable; default 65000")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--num-queries", type=int, default=1000, help="queries per batch")
    parser.add_argument("--k", type=int, action="append", help="repeatable; default 100 and 200")
    parser.add_argument("--data", choices=("clustered", "uniform", "both"), default="both")
    parser.add_argument("--cluster-size", type=int, default=64, help="mean items per mixture component")
    parser.add_argument("--spread", type=float, default=1.0, help="noise scale around each centre")
    parser.add_argument("--kinds", default="hnsw,ivf", help="approximate kinds to measure")
    parser.add_argument("--ef-search", type=int, action="append", help="hnsw sweep; default 128 256 512 1024 2048")
    parser.add_argument("--target-recall", type=float, default=0.95,
                        help="recall@100 the build calibrates the search breadth to (FaissIndex.build's default)")
    parser.add_argument("--num-threads", type=int, default=None, help="FAISS threads; default every core")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats per search (best kept)")
    parser.add_argument("--skip-save", action="store_true", help="do not time save/load")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.ef_search = args.ef_search or [128, 256, 512, 1024, 2048]
    args.num_threads = args.num_threads or default_threads()
    sizes = args.num_items or [65_000]
    ks = sorted(args.k or [100, 200])
    datasets = ["clustered", "uniform"] if args.data == "both" else [args.data]

    print(f"FaissIndex benchmark: faiss {faiss.__version__}, {args.num_threads} threads, "
          f"{args.num_queries} queries per batch, k={ks}; clustered = mixture of Gaussians on the sphere "
          f"(cluster size {args.cluster_size}, spread {args.spread}), uniform = uniform on the sphere; "
          f"recall = |approx top-k ∩ exact top-k| / k; distances_per_query = vectors compared per query (flat: all; ivf: lists scanned + nlist centroids); filtered = 50 excluded ids per query + last 30 of 100 days",
          flush=True)
    rows: list[dict] = []
    for num_items in sizes:
        for data in datasets:
            run_size(num_items, data, args, ks, rows)
    result = {
        "benchmark": "index",
        "faiss_version": faiss.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "num_threads": args.num_threads,
        "data": {"clustered": f"mixture of Gaussians on the sphere, cluster size {args.cluster_size}, spread {args.spread}",
                 "uniform": "uniform on the sphere"},
        "filtered": "exclude 50 random ids per query, published_after keeps the last 30 of 100 days",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
