"""Nightly ranking job: users/s, per-stage time and peak memory per engine, and an incremental night.

Builds a synthetic world straight into a SQLite store (articles, users with 10-50 history
clicks each, one labelled impression per user inside the active window), an untrained
``RankingModel`` at the production sizes (384-d text, 1024-d image, D=128, history 50) and a
FAISS index of its item embeddings. Item features are synthesised (random unit vectors), not
produced by the encoders: the encoders are measured by bench_encoders.py, and the ranking cost
does not depend on the feature values.

Then, for each engine and each active-user count, runs ``run_nightly`` in a fresh subprocess
(so that each peak RSS is its own; RSS is summed over the subprocess and all its children:
workers, and Ray's processes for the ray engine). Users of the smaller counts are the most
recent ones, selected by shortening ``active_days``; the store is the same.

Finally the incremental night: 1% new articles arrive (embedded with the item tower and added
to the index, without touching the others) and the nightly runs again; compared with a cold
night (every article embedded, index built, nightly run).

    .venv/bin/python benchmarks/bench_nightly.py --news 3000 --users 500 1000 2000   # quick proof
    .venv/bin/python benchmarks/bench_nightly.py --news 65000 --users 25000 50000 100000 \\
        --engines local ray --workers 2                                              # full size

Prints the figures and writes them to benchmarks/results/nightly.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from peak_rss import PeakRSS  # benchmarks/peak_rss.py (scripts run with benchmarks/ on sys.path)

AS_OF = datetime(2019, 11, 15, 12, 0, 0)
CATEGORIES = ("news", "sports", "finance", "lifestyle", "health", "foodanddrink", "weather", "autos", "travel",
              "video", "tv", "music", "movies", "entertainment", "kids", "middleeast", "northamerica")
TEXT_DIM, IMAGE_DIM = 384, 1024


# ----------------------------------------------------------------------------------------
# the synthetic world


def _zipf_choice(rng: np.random.Generator, n: int, size: int, a: float = 1.1) -> np.ndarray:
    """Article rows drawn with a long-tailed popularity (rank r has weight r^-a)."""
    weights = 1.0 / np.arange(1, n + 1) ** a
    return rng.choice(n, size=size, p=weights / weights.sum())


def _ts(values) -> list[str]:
    return [str(v).replace("T", " ") for v in np.asarray(values).astype("datetime64[s]")]


def write_store(db_path: Path, *, num_news: int, user_groups: list[int], clicks_min: int, clicks_max: int, seed: int) -> dict:
    """Write the synthetic world into a migrated SQLite store with plain sqlite3 executemany.

    User group g (sizes ``user_groups``) has its impression between g and g + 0.9 days before
    AS_OF, so ``active_days = g + 1`` selects the first g + 1 groups.
    """
    from recsys.store.database import open_store

    rng = np.random.default_rng(seed)
    engine = open_store(f"sqlite:///{db_path}")
    engine.dispose()
    as_of = np.datetime64(AS_OF, "s")
    # First seen spread over the 7 days before AS_OF: a 3-day freshness window keeps ~43%.
    first_seen = as_of - rng.integers(0, 7 * 86400, num_news).astype("timedelta64[s]")
    news_ids = [f"N{i}" for i in range(num_news)]
    categories = rng.choice(CATEGORIES, num_news)
    num_users = sum(user_groups)
    user_ids = [f"U{i:07d}" for i in range(num_users)]
    group = np.repeat(np.arange(len(user_groups)), user_groups)
    offsets = (group * 86400 + rng.integers(0, int(0.9 * 86400), num_users)).astype("timedelta64[s]")
    offsets[0] = 0  # the store's latest impression is AS_OF itself
    imp_times = as_of - offsets
    fresh = np.flatnonzero(first_seen >= as_of - np.timedelta64(3 * 86400, "s"))
    started = time.perf_counter()
    conn = sqlite3.connect(db_path)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        conn.executemany(
            "INSERT INTO news (news_id, category, subcategory, title, abstract, url, title_entities, abstract_entities,"
            " image_path, image_status, content_hash, first_seen_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            ((n, str(c), "sub", f"title {n}", "", "", "[]", "[]", None, "missing", "0" * 64, t, t)
             for n, c, t in zip(news_ids, categories, _ts(first_seen))),
        )
        conn.executemany("INSERT INTO users (user_id, first_seen_at, last_seen_at) VALUES (?,?,?)",
                         ((u, t, t) for u, t in zip(user_ids, _ts(imp_times))))
        conn.executemany("INSERT INTO impressions (id, source, impression_id, user_id, time) VALUES (?,?,?,?,?)",
                         ((i + 1, "bench/behaviors", i + 1, u, t) for i, (u, t) in enumerate(zip(user_ids, _ts(imp_times)))))
        shown = fresh[_zipf_choice(rng, len(fresh), num_users * 5)].reshape(num_users, 5)
        conn.executemany(
            "INSERT OR IGNORE INTO impression_items (impression_pk, position, news_id, label) VALUES (?,?,?,?)",
            ((i + 1, p, news_ids[shown[i, p]], int(p == 0)) for i in range(num_users) for p in range(5)),
        )
        lengths = rng.integers(clicks_min, clicks_max + 1, num_users)
        clicked = _zipf_choice(rng, num_news, int(lengths.sum()))
        owner = np.repeat(np.arange(num_users), lengths)
        position = np.arange(len(owner)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        conn.executemany(
            "INSERT OR IGNORE INTO clicks (user_id, news_id, history_pos, clicked_at) VALUES (?,?,?,NULL)",
            ((user_ids[u], news_ids[n], int(p)) for u, n, p in zip(owner, clicked, position)),
        )
        conn.commit()
        num_clicks = conn.execute("SELECT count(*) FROM clicks").fetchone()[0]
    finally:
        conn.close()
    return {"news": num_news, "users": num_users, "clicks": int(num_clicks), "impression_items": num_users * 5,
            "write_seconds": time.perf_counter() - started, "first_seen": first_seen, "categories": categories}


def synthetic_features(news_ids, categories, seed: int):
    """Random unit text/image features (the encoders are benchmarked elsewhere)."""
    from recsys.encoders.item_features import EncoderInfo, ItemFeatures

    rng = np.random.default_rng(seed)
    n = len(news_ids)
    text = rng.normal(size=(n, TEXT_DIM)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    image = np.abs(rng.normal(size=(n, IMAGE_DIM))).astype(np.float32)
    has_image = rng.random(n) < 0.9
    image[~has_image] = 0
    return ItemFeatures(np.asarray(news_ids, dtype=object), text, image, has_image, np.asarray(categories, dtype=object),
                        EncoderInfo("synthetic-text", "1", TEXT_DIM), EncoderInfo("synthetic-image", "1", IMAGE_DIM))


def build_model_and_index(work: Path, world: dict, *, seed: int, content_prior: tuple = (0.0,),
                          category_affinity: bool = False, affinity_clusters: int = 16) -> dict:
    """An untrained model at production sizes, item embeddings of every article, the index.

    ``content_prior`` (weight, optional second-moment weight), any > 0, serves it as ``train``
    does when it fits the prior: anchors fitted on the features, D + 32 item columns (plus 512
    scorer-only user columns with the second moment), the prior's terms in every score.
    ``category_affinity``: serve a category affinity (fixed weights, all nonzero) as ``train``
    fits by default: every shard reads its readers' skips and every candidate is rescored; with
    the content prior, keyed by ``affinity_clusters`` content clusters per modality as well
    (fitted here on every article's anchors; 0: none), so that each worker codes the index's
    articles by their nearest centre.
    """
    from recsys.index.faiss_index import FaissIndex
    from recsys.models.bundle import RankingModel
    from recsys.models.side_features import SideFeatures
    from recsys.threads import configure_threads

    configure_threads()
    features = synthetic_features([f"N{i}" for i in range(world["news"])], world["categories"], seed)
    model = RankingModel.create(features.text_encoder, features.image_encoder, CATEGORIES, embedding_dim=128,
                                history_len=50, side_features=SideFeatures(24.0), seed=seed)
    if any(content_prior):
        model.item_tower.get_layer("fusion").adapt(features.text, features.image, features.has_image)
        model = model.with_content_prior(*content_prior)
    if category_affinity:
        import dataclasses

        from recsys.models.affinity import KEYS, AffinityCalibration, ContentClusters, design_features

        clusters = None
        if any(content_prior) and affinity_clusters:
            clusters = ContentClusters.fit(model.content_anchors(features), ("text", "image"),
                                           np.arange(len(features)), affinity_clusters, seed)
        keys = KEYS + (clusters.keys if clusters is not None else ())
        weights = tuple(np.linspace(-1.0, 1.0, len(design_features(keys))) + 0.05)
        model = RankingModel(model.item_tower, model.user_encoder, model.scorer,
                             dataclasses.replace(model.config,
                                                 category_affinity=AffinityCalibration(weights, -1.0, clusters)))
    model.save(work / "model")
    clock = time.perf_counter()
    embeddings = model.item_embeddings(features)
    embed_seconds = time.perf_counter() - clock
    clock = time.perf_counter()
    index = FaissIndex.build(features.news_ids.astype(str), embeddings, published=world["first_seen"])
    build_seconds = time.perf_counter() - clock
    clock = time.perf_counter()
    index.save(work / "index")
    save_seconds = time.perf_counter() - clock
    return {"embed_all_seconds": embed_seconds, "index_build_seconds": build_seconds, "index_save_seconds": save_seconds,
            "index_kind": index.kind, "model": model}


def add_new_articles(work: Path, db_path: Path, model, *, fraction: float, num_news: int, seed: int) -> dict:
    """An incremental night: ``fraction`` new articles shown an hour after AS_OF, embedded and indexed."""
    from recsys.index.faiss_index import FaissIndex

    rng = np.random.default_rng(seed + 1)
    count = max(1, int(round(fraction * num_news)))
    new_ids = [f"NEW{i}" for i in range(count)]
    categories = rng.choice(CATEGORIES, count)
    seen = AS_OF + timedelta(minutes=30)
    latest = AS_OF + timedelta(hours=1)
    conn = sqlite3.connect(db_path)
    try:
        conn.executemany(
            "INSERT INTO news (news_id, category, subcategory, title, abstract, url, title_entities, abstract_entities,"
            " image_path, image_status, content_hash, first_seen_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            ((n, str(c), "sub", f"title {n}", "", "", "[]", "[]", None, "missing", "0" * 64, str(seen), str(seen))
             for n, c in zip(new_ids, categories)),
        )
        pk = conn.execute("SELECT max(id) FROM impressions").fetchone()[0] + 1
        conn.execute("INSERT INTO impressions (id, source, impression_id, user_id, time) VALUES (?,?,?,?,?)",
                     (pk, "bench/night2", pk, "U0000000", str(latest)))
        conn.executemany("INSERT INTO impression_items (impression_pk, position, news_id, label) VALUES (?,?,?,?)",
                         ((pk, p, n, int(p == 0)) for p, n in enumerate(new_ids[:5])))
        conn.commit()
    finally:
        conn.close()
    features = synthetic_features(new_ids, categories, seed + 2)
    clock = time.perf_counter()
    embeddings = model.item_embeddings(features)
    embed_seconds = time.perf_counter() - clock
    clock = time.perf_counter()
    index = FaissIndex.load(work / "index")
    index.add(np.asarray(new_ids), embeddings, np.full(count, np.datetime64(seen, "s")))
    index.save(work / "index")
    index_seconds = time.perf_counter() - clock
    return {"new_articles": count, "embed_new_seconds": embed_seconds, "index_add_save_seconds": index_seconds,
            "as_of": latest}


# ----------------------------------------------------------------------------------------
# one measured run, in its own process


def child_run(spec: dict) -> dict:
    """Run one nightly and return its summary with timings and peak memory."""
    from recsys.ranking.nightly import run_nightly
    from recsys.store.database import create_engine_for

    engine = create_engine_for(spec["url"])
    cpu = time.process_time()
    with PeakRSS() as rss:
        summary = run_nightly(
            engine, model_dir=spec["model_dir"], index_dir=spec["index_dir"], engine_name=spec["engine"],
            shard_size=spec["shard_size"], k=spec["k"], num_candidates=spec["candidates"], active_days=spec["active_days"],
            freshness_days=3.0, keep_runs=2, num_workers=spec["workers"], as_of=datetime.fromisoformat(spec["as_of"]),
            rerank=True,  # measure a ranking even when an earlier run had the same plan (another engine)
        )
    users = summary["counts"]["users"]
    timings = summary["timings"]
    # Work after start-up, spread over the workers: what a longer run converges to.
    compute = sum(v for key, v in timings.items() if key.startswith("workers.") and key != "workers.load")
    return {
        "engine": spec["engine"], "users": users, "active_days": spec["active_days"],
        "seconds": timings["total"], "users_per_second": users / timings["total"],
        "steady_users_per_second": users / (compute / max(1, spec["workers"])) if compute > 0 else None,
        "timings": summary["timings"], "counts": summary["counts"],
        "peak_rss_mb_total": rss.peak / 2**20, "peak_rss_mb_driver": rss.peak_driver / 2**20,
        "peak_pss_mb_total": rss.peak_pss / 2**20,
        "driver_cpu_seconds": time.process_time() - cpu,
    }


def run_in_subprocess(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nightly run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--news", type=int, default=65_000, help="articles in the world")
    parser.add_argument("--users", type=int, nargs="+", default=[25_000, 50_000, 100_000],
                        help="active-user counts to measure (ascending)")
    parser.add_argument("--clicks-min", type=int, default=10)
    parser.add_argument("--clicks-max", type=int, default=50)
    parser.add_argument("--engines", nargs="+", choices=["local", "ray"], default=["local", "ray"])
    parser.add_argument("--workers", type=int, default=2, help="worker processes / Ray actors")
    parser.add_argument("--shard-size", type=int, default=2000)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--new-fraction", type=float, default=0.01, help="new articles of the incremental night")
    parser.add_argument("--skip-incremental", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--content-prior", type=float, nargs="+", default=[0.0], metavar="W [MU]",
                        help="serve the model with content-prior weight W and second-moment weight MU "
                             "(trained models get 0-32 each; 0: off)")
    parser.add_argument("--category-affinity", action="store_true",
                        help="serve the model with a category affinity (each shard reads its readers' skips)")
    parser.add_argument("--affinity-clusters", type=int, default=16,
                        help="content clusters per modality of that affinity, with the content prior (0: none)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the world here (default: a temp dir, removed)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "nightly.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.users != sorted(args.users) or min(args.users) < 1:
        parser.error("--users must be positive and ascending")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child_run(json.loads(args.child)), default=float))
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-nightly-"))
    work.mkdir(parents=True, exist_ok=True)
    db_path = work / "store.db"
    db_path.unlink(missing_ok=True)
    groups = list(np.diff([0, *args.users]))
    load_before = os.getloadavg()
    try:
        print(f"writing the world: {args.news} articles, {args.users[-1]} users ...", flush=True)
        world = write_store(db_path, num_news=args.news, user_groups=groups, clicks_min=args.clicks_min,
                            clicks_max=args.clicks_max, seed=args.seed)
        print(f"  {world['clicks']} clicks in {world['write_seconds']:.1f} s; building model and index ...", flush=True)
        built = build_model_and_index(work, world, seed=args.seed, content_prior=args.content_prior,
                                      category_affinity=args.category_affinity,
                                      affinity_clusters=args.affinity_clusters)
        model = built.pop("model")
        runs = []
        base = {"url": f"sqlite:///{db_path}", "model_dir": str(work / "model"), "index_dir": str(work / "index"),
                "shard_size": args.shard_size, "k": args.k, "candidates": args.candidates, "workers": args.workers,
                "as_of": AS_OF.isoformat()}
        for engine in args.engines:
            for g, users in enumerate(args.users):
                print(f"nightly: engine {engine}, {users} active users ...", flush=True)
                result = run_in_subprocess({**base, "engine": engine, "active_days": g + 1})
                runs.append(result)
                print(f"  {result['users_per_second']:.0f} users/s end to end ({result['steady_users_per_second']:.0f} "
                      f"after worker start-up), {result['seconds']:.1f} s, "
                      f"peak RSS {result['peak_rss_mb_total']:.0f} MB (driver {result['peak_rss_mb_driver']:.0f} MB), "
                      f"peak PSS {result.get('peak_pss_mb_total', 0):.0f} MB",
                      flush=True)
        incremental = None
        if not args.skip_incremental:
            print(f"incremental night: {args.new_fraction:.0%} new articles ...", flush=True)
            added = add_new_articles(work, db_path, model, fraction=args.new_fraction, num_news=args.news, seed=args.seed)
            night = run_in_subprocess({**base, "engine": args.engines[0], "active_days": len(args.users),
                                       "as_of": added.pop("as_of").isoformat()})
            cold_rank = next(r for r in runs if r["engine"] == args.engines[0] and r["active_days"] == len(args.users))
            cold_prep = built["embed_all_seconds"] + built["index_build_seconds"] + built["index_save_seconds"]
            cold_total = cold_prep + cold_rank["seconds"]
            incremental_total = added["embed_new_seconds"] + added["index_add_save_seconds"] + night["seconds"]
            incremental = {**added, "nightly": night, "cold_night_seconds": cold_total,
                           "incremental_night_seconds": incremental_total,
                           "embedding_and_index_seconds": {"cold": cold_total - cold_rank["seconds"],
                                                           "incremental": incremental_total - night["seconds"]}}
            print(f"  cold night {cold_total:.1f} s (embed+index {cold_total - cold_rank['seconds']:.1f} s), "
                  f"incremental night {incremental_total:.1f} s (embed+index {incremental_total - night['seconds']:.1f} s)")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    report = {
        "benchmark": "nightly",
        "note": "synthetic item features (random unit vectors) and an untrained model at production sizes; "
                "SQLite store; RSS summed over the run's process tree (Ray: includes its own daemons)",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_before": load_before,
                    "load_after": os.getloadavg()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
        "world": {k: v for k, v in world.items() if k not in ("first_seen", "categories")},
        "model_and_index": built,
        "runs": runs,
        "incremental": incremental,
    }
    print(_table(runs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=float))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


def _table(runs: list[dict]) -> str:
    stages = ("select_users", "prepare", "rank", "complete", "prune")
    worker = ("load", "read_histories", "user_vectors", "search", "score", "top_k", "write")
    head = f"{'engine':6} {'users':>7} {'users/s':>8} {'steady/s':>8} {'total s':>8} {'peak MB':>8}  "
    lines = [head + " ".join(f"{s:>12}" for s in stages)
             + "  | worker-seconds: " + " ".join(f"{s:>14}" for s in worker)]
    for r in runs:
        t = r["timings"]
        lines.append(
            f"{r['engine']:6} {r['users']:>7} {r['users_per_second']:>8.0f} {r['steady_users_per_second'] or 0:>8.0f} "
            f"{r['seconds']:>8.1f} {r['peak_rss_mb_total']:>8.0f}  "
            + " ".join(f"{t.get(s, 0):>12.2f}" for s in stages) + "  | "
            + " ".join(f"{t.get('workers.' + s, 0):>14.2f}" for s in worker)
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
