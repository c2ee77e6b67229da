"""Benchmark the CTR model: training throughput, scoring throughput, and a quality study.

Everything runs on a synthetic world (``recsys.models.synthetic.make_synthetic_world``): items
with a latent topic (text features), a latent style (image features, 10% without image) and an
appeal, users who like a few topics and styles, clicks drawn from a known logistic model.

Training: one (or more) epochs of ``train_ctr``; a sample is one (impression, candidate) pair.
Reports samples/s, impressions/s and seconds per epoch (training steps only; the validation
pass is timed separately), and peak RSS sampled with psutil.

Scoring: the per-candidate part, ``RankingModel.score`` on (P, D) user vectors, (P, D)
candidate embeddings and (P, S) side features, for caller batches of several sizes
(candidates/s): with the default internal chunks, as one forward pass, and with the gathers
from per-user / per-item matrices that the nightly job does.

Study (``--study``): trains variants (fusion modes, losses, scorer, modalities) on the same
world and reports the test window's per-impression AUC, log loss, the share of the gap
between random (0.5) and the true-probability oracle that is closed, and the same on fresh
articles only (published after training); plus the popularity baseline.

Usage:
  python benchmarks/bench_ctr.py                        # small, proves it works (~2 min)
  python benchmarks/bench_ctr.py --full                 # MIND-small size: 65k items, 50k users,
                                                        # 150k impressions, ~37 candidates
  python benchmarks/bench_ctr.py --study --items 3000 --users 2000 --impressions 20000 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from recsys.threads import configure_threads

from peak_rss import PeakRSS  # benchmarks/peak_rss.py (scripts run with benchmarks/ on sys.path)

RESULTS = Path(__file__).resolve().parent / "results"
FULL_SIZE = dict(items=65_000, users=50_000, impressions=150_000, candidates=37)

STUDY_VARIANTS = {
    "gated (default)": dict(),
    "concat": dict(fusion="concat"),
    "weighted_sum": dict(fusion="weighted_sum"),
    "gated, listwise npratio=4 + Platt": dict(loss="listwise", negatives=4),
    "gated, dot + linear side (no MLP)": dict(scorer_hidden_units=()),
    "text only": dict(modalities="text"),
    "image only": dict(modalities="image"),
}


def _mib(n: int) -> float:
    return round(n / 2**20, 1)


def make_world(args, seed: int):
    from recsys.data.interactions import InteractionLog, first_shown
    from recsys.models.synthetic import make_synthetic_world

    world = make_synthetic_world(
        num_items=args.items, num_users=args.users, num_impressions=args.impressions,
        candidates_per_impression=args.candidates, seed=seed,
    )
    n = len(world.features)
    log = InteractionLog.from_impressions([world.train, world.valid], n)
    first_seen = first_shown([world.train, world.valid, world.test], n)
    return world, log, first_seen


def bench_training(world, log, first_seen, args) -> tuple[object, dict]:
    from recsys.data.interactions import ClickLog, with_logged_clicks
    from recsys.models.training import evaluate_impressions, train_ctr

    epochs_log = []
    merge = {}
    clicks = None
    if args.logged_clicks:  # what `recsys train` does by default: time the history merge on its own too
        started = time.perf_counter()
        clicks = ClickLog.from_impressions([world.train, world.valid])
        merge["click_log_build_seconds"] = round(time.perf_counter() - started, 3)
        started = time.perf_counter()
        led = with_logged_clicks(world.train, clicks, 50)
        merge["merge_train_histories_seconds"] = round(time.perf_counter() - started, 3)
        merge["clicks"] = len(clicks)
        merge["mean_history_length"] = {"history_column": round(float(np.diff(world.train.history_offsets).mean()), 1),
                                        "led_by_logged_clicks": round(float(np.diff(led.history_offsets).mean()), 1)}
    with PeakRSS() as rss:
        started = time.perf_counter()
        model, history = train_ctr(
            world.features, world.train, world.valid, log, epochs=args.epochs, batch_size=args.batch_size,
            learning_rate=args.learning_rate, patience=args.epochs, progress=epochs_log.append,
            clicks=clicks, content_prior=args.fit_prior,
        )
        total_seconds = time.perf_counter() - started
    seconds = history["epoch_seconds"]
    per_epoch = float(np.median(seconds))
    started = time.perf_counter()
    evaluate_impressions(model, world.features, world.valid, log, first_seen)
    valid_seconds = time.perf_counter() - started
    return model, {
        "train_impressions": history["train_impressions"],
        "train_samples": history["train_samples"],
        "batch_size_impressions": args.batch_size,
        "epoch_seconds": [round(s, 2) for s in seconds],
        "seconds_per_epoch": round(per_epoch, 2),
        "samples_per_second": round(history["train_samples"] / per_epoch, 1),
        "impressions_per_second": round(history["train_impressions"] / per_epoch, 1),
        "validation_pass_seconds": round(valid_seconds, 2),
        "validation_impressions": len(world.valid),
        "peak_rss_mib_during_training": _mib(rss.peak),
        "val_auc": [round(v, 4) for v in history["val_auc"]],
        "train_ctr_total_seconds": round(total_seconds, 1),
        "logged_clicks": merge or None,
        "content_prior": {"fitted": args.fit_prior, "weights": history.get("prior_weights"),
                          "moment_weights": history.get("moment_weights"), "served_val_auc": history.get("served_val_auc")},
    }


def bench_scoring(model, world, batch_sizes: list[int], total: int) -> dict:
    rng = np.random.default_rng(0)
    d = model.config.serving_dim  # D, or D + A when the content prior is served
    u = model.config.user_dim  # serving_dim, plus Q with the prior's second-moment term
    s = model.config.side_features.num_features
    out = {}
    for batch in batch_sizes:
        users = rng.standard_normal((batch, u)).astype(np.float32)
        cands = rng.standard_normal((batch, d)).astype(np.float32)
        side = rng.standard_normal((batch, s)).astype(np.float32)
        model.score(users, cands, side, batch_size=batch)  # warm-up
        rounds = max(total // batch, 3)
        started = time.perf_counter()
        for _ in range(rounds):
            model.score(users, cands, side, batch_size=batch)
        single = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(rounds):
            model.score(users, cands, side)  # default internal chunks
        elapsed = time.perf_counter() - started
        # with the gathers of the nightly job: per-user and per-item matrices -> pairs
        user_table = rng.standard_normal((max(batch // 200, 1), u)).astype(np.float32)
        item_table = rng.standard_normal((len(world.features), d)).astype(np.float32)
        owner = rng.integers(0, len(user_table), batch)
        items = rng.integers(0, len(item_table), batch)
        started = time.perf_counter()
        for _ in range(rounds):
            model.score(user_table[owner], item_table[items], side)
        gathered = time.perf_counter() - started
        out[str(batch)] = {
            "candidates_per_second": round(rounds * batch / elapsed),
            "candidates_per_second_one_forward_pass": round(rounds * batch / single),
            "candidates_per_second_with_gather": round(rounds * batch / gathered),
        }
    # the once-per-item and once-per-user parts, for scale
    started = time.perf_counter()
    emb = model.item_embeddings(world.features)
    item_seconds = time.perf_counter() - started
    started = time.perf_counter()
    model.user_vectors(world.test.history_offsets, world.test.history_items, emb)
    user_seconds = time.perf_counter() - started
    out["item_embeddings_per_second"] = round(len(world.features) / item_seconds)
    out["user_vectors_per_second"] = round(len(world.test) / user_seconds)
    return out


def study(args) -> list[dict]:
    from recsys.models.training import binary_log_loss, evaluate_impressions, mean_impression_auc, train_ctr

    rows = []
    for seed in args.seeds:
        world, log, first_seen = make_world(args, seed)
        test = world.test
        as_of = world.valid.times.max() + np.timedelta64(1, "s")  # the nightly job's clock
        fresh = np.isin(test.candidate_items, world.fresh_items)
        fresh_labels = np.where(fresh, test.labels, -1)
        offsets = test.candidate_offsets
        oracle, _ = mean_impression_auc(test.labels, world.test_probabilities, offsets)
        oracle_fresh, _ = mean_impression_auc(fresh_labels, world.test_probabilities, offsets)

        def row(name, scores, **extra):
            auc, scored = mean_impression_auc(test.labels, scores, offsets)
            auc_fresh, _ = mean_impression_auc(fresh_labels, scores, offsets)
            result = {
                "variant": name, "seed": seed, "test_auc": round(auc, 4),
                "gap_closed": round((auc - 0.5) / (oracle - 0.5), 3),
                "fresh_auc": round(auc_fresh, 4), "fresh_gap_closed": round((auc_fresh - 0.5) / (oracle_fresh - 0.5), 3),
                "impressions_scored": scored, **extra,
            }
            rows.append(result)
            print(json.dumps(result), flush=True)

        row("oracle (true probabilities)", world.test_probabilities,
            test_log_loss=round(binary_log_loss(test.labels, world.test_probabilities), 4))
        clicks, _ = log.window_counts(test.candidate_items, np.full(len(test.candidate_items), as_of),
                                      window=np.timedelta64(24, "h"))
        row("popularity (clicks in the last 24 h)", clicks.astype(np.float64))
        for name, variant in STUDY_VARIANTS.items():
            if args.variants and name not in args.variants:
                continue
            started = time.perf_counter()
            model, history = train_ctr(
                world.features, world.train, world.valid, log, epochs=args.epochs, batch_size=args.batch_size,
                learning_rate=args.learning_rate, patience=args.patience, seed=seed, **variant,
            )
            seconds = time.perf_counter() - started
            metrics = evaluate_impressions(model, world.features, test, log, first_seen, as_of=as_of)
            row(name, metrics["scores"], test_log_loss=round(metrics["log_loss"], 4),
                best_val_auc=round(history["best_val_auc"], 4), epochs_run=len(history["loss"]),
                best_epoch=history["best_epoch"], train_seconds=round(seconds, 1))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="MIND-small size world (65k items, 50k users, 150k impressions)")
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--impressions", type=int, default=4000)
    parser.add_argument("--candidates", type=int, default=37, help="mean candidates per impression")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64, help="impressions per training step")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--score-batch", type=int, action="append", help="scoring batch sizes (repeatable)")
    parser.add_argument("--score-total", type=int, default=1_000_000, help="candidates scored per batch size")
    parser.add_argument("--study", action="store_true", help="train the variants and compare quality instead")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="world/training seeds for --study")
    parser.add_argument("--variants", nargs="*", help="restrict --study to these variant names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logged-clicks", action="store_true",
                        help="train on histories led by logged clicks, as `recsys train` does by default")
    parser.add_argument("--fit-prior", action="store_true",
                        help="fit the content prior's weight after training, as `recsys train` does by default")
    parser.add_argument("--content-prior", type=float, nargs="+", default=[0.0], metavar="W [MU]",
                        help="score with the content prior at weight W and second-moment weight MU (default 0; "
                             "what `recsys train` serves when it fits them)")
    parser.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/ctr*.json)")
    args = parser.parse_args(argv)
    if args.full:
        args.items, args.users, args.impressions, args.candidates = (FULL_SIZE[k] for k in ("items", "users", "impressions", "candidates"))
    configure_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.machine(), "python": sys.version.split()[0], "threads": args.threads,
            "cpu_count": os.cpu_count(), "world": {k: getattr(args, k) for k in ("items", "users", "impressions", "candidates")}}

    if args.study:
        meta.update(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate, patience=args.patience)
        result = {**meta, "rows": study(args)}
        path = RESULTS / "ctr_quality.json"
    else:
        started = time.perf_counter()
        world, log, first_seen = make_world(args, args.seed)
        world_seconds = time.perf_counter() - started
        print(f"world: {len(world.features)} items, {len(world.train)} train impressions "
              f"({len(world.train.candidate_items)} pairs), built in {world_seconds:.1f}s", flush=True)
        model, training = bench_training(world, log, first_seen, args)
        print(json.dumps({"training": training}, indent=2), flush=True)
        if any(args.content_prior):
            model = model.with_content_prior(*args.content_prior)
        meta["content_prior"] = args.content_prior
        # fitted (--fit-prior) or given
        meta["scored_with_prior_weights"] = {"mean": list(model.config.prior_weights), "moment": list(model.config.moment_weights)}
        meta["served_dims"] = {"item": model.config.serving_dim, "user": model.config.user_dim}
        scoring = bench_scoring(model, world, args.score_batch or [4096, 16384, 65536], args.score_total)
        print(json.dumps({"scoring": scoring}, indent=2), flush=True)
        result = {**meta, "world_build_seconds": round(world_seconds, 1), "training": training, "scoring": scoring,
                  "peak_rss_mib": _mib(_peak_rss())}
        path = RESULTS / ("ctr_full.json" if args.full else "ctr.json")
    path = args.out or path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
    print(f"wrote {path}")
    return 0


def _peak_rss() -> int:
    """Peak RSS of the process so far (ru_maxrss, kB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    sys.exit(main())
