"""How much of the oracle's gap each kind of user evidence can carry, on the sample worlds.

The quality goal is a share of the gap between random (AUC 0.5) and the oracle, which knows
every user's hidden topic and style affinities and every article's popularity latent. No
model sees those; this script asks what a reader *given the generator's hidden article labels*
could reach from the evidence a model does see, so that the model's figures can be read
against what is possible. Nothing here is used by the product (it reads ``world.json``'s
hidden labels, which real data does not have).

Rows, per-impression AUC on the test window (``behaviors_test.tsv``):

- ``oracle``: the true click logits.
- ``true affinities, no popularity``: the oracle without the popularity term (no content
  model can know the popularity latent of a fresh article).
- ``true liked sets, no popularity``: which topics and styles the user likes, not how much.
- ``MAP liked sets from ...``: the liked topic and style sets that maximise the posterior
  under the generator's own click model (its priors and weights, strength 0.8), found by
  alternating exact maximisation over all topic subsets (1-4 of 17) and style subsets (1-3 of
  10), from three kinds of evidence:
  - ``History column``: the clicks before the log (what MIND's History holds);
  - ``+ logged clicks``: plus the user's clicks in the training impressions;
  - ``+ logged skips``: plus the training impressions' shown-but-not-clicked articles.
- ``..., popularity of articles shown in training``: a row above plus the popularity term with
  the true latent of every article the training impressions show (the most a log of clicks
  and shows could tell about them) and nothing for the fresh ones.
- ``..., popularity of every article``: the same with the true latent of fresh articles too,
  which no data reveals: the bound if popularity were known.
- ``..., fresh from the scored file``: fresh articles' latent read from how often the scored
  file shows them (see ``_popularity_from_shows``; generous).
- ``..., fresh from earlier shows in the file``: the same from the shows before each impression
  only, as serving could know them (``_popularity_from_earlier_shows``).

Each row also has ``fresh_auc``: the per-impression AUC over the candidates never shown in
training only, and its share of the oracle's gap on the same candidates (as the "fresh" rows
of ``bench_quality.py``).

Usage:
  python benchmarks/bench_quality_ceiling.py --seeds 101 102 103 --users 3000 --news 2500 --impressions 9000

Prints a table and writes benchmarks/results/quality_ceiling.json.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

STRENGTH = 0.8  # mean of the generator's U(0.6, 1) liked-affinity strength


def _log_binomial(k: np.ndarray, n: int, p: float) -> np.ndarray:
    """log P(Binomial(n, p) = k), elementwise for integer-valued ``k`` in [0, n]."""
    return np.array([np.log(math.comb(n, int(j)) * p**j * (1 - p) ** (n - j)) for j in k])


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class MapReader:
    """The MAP liked-topic and liked-style sets of a user under the world's click model."""

    def __init__(self, world, sample):
        self.w = world
        self.topic_gain = sample.TOPIC_WEIGHT * STRENGTH
        self.style_gain = sample.STYLE_WEIGHT * STRENGTH
        self.pop_weight, self.bias = sample.POPULARITY_WEIGHT, sample.CLICK_BIAS
        num_topics, num_styles = world.topic_affinity.shape[1], world.style_affinity.shape[1]
        self.topic_sets = self._sets(num_topics, 4)
        self.style_sets = self._sets(num_styles, 3)
        shares = np.array([t.share for t in sample.TOPICS])
        shares = shares / shares.sum()
        # Priors of the generator: 1 + Binomial(3, 0.4) liked topics drawn by share, 1 +
        # Binomial(2, 0.35) liked styles drawn uniformly (the share term is approximate).
        self.topic_prior = _log_binomial(self.topic_sets.sum(1) - 1, 3, 0.4) + self.topic_sets @ np.log(shares * num_topics)
        self.style_prior = _log_binomial(self.style_sets.sum(1) - 1, 2, 0.35)
        # History clicks are draws from exposure (exp z) times click probability over the
        # articles published before training; their normaliser depends on the sets through
        # C[topic, style, liked topic?, liked style?].
        pool = np.flatnonzero(world.news_published < world.windows.train_start)
        weight = np.exp(world.news_popularity[pool].astype(np.float64))
        self.C = np.zeros((num_topics, num_styles, 2, 2))
        for a in (0, 1):
            for b in (0, 1):
                p = _sigmoid(self.topic_gain * a + self.style_gain * b + self.pop_weight * world.news_popularity[pool] + self.bias)
                np.add.at(self.C[:, :, a, b], (world.news_topic[pool], world.news_style[pool]), weight * p)

    @staticmethod
    def _sets(n: int, most: int) -> np.ndarray:
        combos = [c for r in range(1, most + 1) for c in itertools.combinations(range(n), r)]
        out = np.zeros((len(combos), n))
        for i, c in enumerate(combos):
            out[i, list(c)] = 1.0
        return out

    def fit(self, history, clicked=(), skipped=()):
        w = self.w
        groups = [(np.asarray(x, dtype=np.int64), kind) for x, kind in ((history, "h"), (clicked, "c"), (skipped, "s"))]
        groups = [(w.news_topic[x], w.news_style[x], w.news_popularity[x].astype(np.float64), kind) for x, kind in groups if len(x)]
        n_hist = len(history)
        styles = np.zeros(w.style_affinity.shape[1])
        topics = np.zeros(w.topic_affinity.shape[1])
        for _ in range(4):  # alternate: best topic set given styles, best style set given topics
            ll = self.topic_prior.copy()
            for t, s, z, kind in groups:
                logit = self.topic_gain * self.topic_sets[:, t] + self.style_gain * styles[s] + self.pop_weight * z + self.bias
                ll += (np.log(_sigmoid(logit)) if kind != "s" else np.log1p(-_sigmoid(logit))).sum(axis=1)
            if n_hist:
                cell = np.where(styles[None, :, None] > 0, self.C[:, :, :, 1], self.C[:, :, :, 0]).sum(axis=1)  # (T, 2)
                ll -= n_hist * np.log((self.topic_sets * cell[:, 1] + (1 - self.topic_sets) * cell[:, 0]).sum(axis=1))
            topics = self.topic_sets[int(np.argmax(ll))]
            ll = self.style_prior.copy()
            for t, s, z, kind in groups:
                logit = self.topic_gain * topics[t][None, :] + self.style_gain * self.style_sets[:, s] + self.pop_weight * z + self.bias
                ll += (np.log(_sigmoid(logit)) if kind != "s" else np.log1p(-_sigmoid(logit))).sum(axis=1)
            if n_hist:
                cell = np.where(topics[:, None, None] > 0, self.C[:, :, 1, :], self.C[:, :, 0, :]).sum(axis=0)  # (S, 2)
                ll -= n_hist * np.log((self.style_sets * cell[:, 1] + (1 - self.style_sets) * cell[:, 0]).sum(axis=1))
            styles = self.style_sets[int(np.argmax(ll))]
        return topics, styles


def _popularity_from_shows(world, test_file: Path, row_of: dict, fresh: np.ndarray) -> np.ndarray:
    """(n,) float64: the popularity latent of each ``fresh`` article as read from how often the
    scored file shows it, 0 elsewhere.

    Exposure is ``exp(z)`` among the articles available at the time, so log(shows) less
    log(hours available in the test window) tracks ``z``. The linear map is fitted on the hidden
    latents themselves and uses the whole file, past and future, so this is generous: no model
    reading the file as it is served can do better with this evidence.
    """
    from recsys.data.mind import iter_behaviors

    shows = np.zeros(world.num_news)
    for row in iter_behaviors(test_file):
        for n in row.news_ids:
            shows[row_of[n]] += 1
    w = world.windows
    start = np.maximum(world.news_published, w.test_start)
    end = np.minimum(world.news_published + w.freshness, w.test_end)
    hours = np.maximum((end - start) / np.timedelta64(1, "h"), 1.0)
    features = np.column_stack([np.ones(world.num_news), np.log1p(shows), np.log(hours)])
    fit = fresh & (shows > 0)
    coef, *_ = np.linalg.lstsq(features[fit], world.news_popularity[fit].astype(np.float64), rcond=None)
    return np.where(fresh, features @ coef, 0.0)


def _popularity_from_earlier_shows(world, test_file: Path, row_of: dict, fresh: np.ndarray) -> list[np.ndarray]:
    """Per impression of the scored file, (c,) float64: each fresh candidate's popularity latent
    as read from its shows in the file *before* the impression (what serving could know), 0
    for the other candidates. The linear map is fitted on the hidden latents (generous)."""
    from recsys.data.mind import iter_behaviors

    rows = [(row.time, np.array([row_of[n] for n in row.news_ids])) for row in iter_behaviors(test_file)]
    shows, before = np.zeros(world.num_news), [None] * len(rows)
    for i in sorted(range(len(rows)), key=lambda i: rows[i][0]):
        before[i] = shows[rows[i][1]].copy()
        shows[rows[i][1]] += 1
    start = np.maximum(world.news_published, world.windows.test_start)
    features = []
    for (time, cand), counts in zip(rows, before):
        hours = (np.datetime64(time, "s") - start[cand]) / np.timedelta64(1, "h")
        features.append(np.column_stack([np.ones(len(cand)), np.log1p(counts), np.log(np.maximum(hours, 0.1))]))
    cands = np.concatenate([c for _, c in rows])
    fit = fresh[cands]
    coef, *_ = np.linalg.lstsq(np.concatenate(features)[fit], world.news_popularity[cands[fit]].astype(np.float64), rcond=None)
    return [np.where(fresh[cand], f @ coef, 0.0) for (_, cand), f in zip(rows, features)]


def run_seed(seed: int, args, root: Path) -> dict:
    from recsys.data import sample
    from recsys.data.mind import iter_behaviors
    from bench_quality import masked_auc  # this folder is on sys.path when run as a script

    out_dir = root / f"world-{seed}"
    sample.generate_sample(out_dir, num_users=args.users, num_news=args.news, num_impressions=args.impressions, seed=seed)
    world = sample.read_world(out_dir)
    row_of = {n: i for i, n in enumerate(world.news_ids)}
    user_of = {u: i for i, u in enumerate(world.user_ids)}
    clicked, skipped = defaultdict(list), defaultdict(list)
    for row in iter_behaviors(out_dir / sample.TRAIN_FILE):
        for n, label in zip(row.news_ids, row.labels):
            (clicked if label else skipped)[row.user_id].append(row_of[n])
    train_rows = np.array(sorted({n for rows in (*clicked.values(), *skipped.values()) for n in rows}), dtype=np.int64)
    seen = np.zeros(world.num_news, bool)
    seen[train_rows] = True  # shown in training: a model can estimate its popularity from the log
    estimated = np.where(seen, world.news_popularity, _popularity_from_shows(world, out_dir / sample.TEST_FILE, row_of, ~seen))
    earlier = _popularity_from_earlier_shows(world, out_dir / sample.TEST_FILE, row_of, ~seen)
    reader = MapReader(world, sample)
    evidence = {
        "MAP liked sets from the History column": lambda h, u: reader.fit(h),
        "MAP liked sets, + logged clicks": lambda h, u: reader.fit(h, clicked[u]),
        "MAP liked sets, + logged clicks and skips": lambda h, u: reader.fit(h, clicked[u], skipped[u]),
    }
    z = world.news_popularity.astype(np.float64)

    # How each reading knows popularity: (candidates, impression's row in the file) -> latents.
    def shown_in_training(cand, i):
        return np.where(seen[cand], z[cand], 0.0)

    def every_article(cand, i):
        return z[cand]

    def from_the_file(cand, i):
        return estimated[cand]

    def from_earlier_shows(cand, i):
        return np.where(seen[cand], z[cand], earlier[i])

    with_popularity = {  # row -> (row it adds popularity to, its popularity reading)
        "true affinities, popularity of articles shown in training": ("true affinities, no popularity", shown_in_training),
        "MAP liked sets, + clicks and skips, popularity of articles shown in training": (
            "MAP liked sets, + logged clicks and skips", shown_in_training),
        "MAP liked sets, + clicks and skips, popularity of every article": (
            "MAP liked sets, + logged clicks and skips", every_article),
        "true affinities, popularity shown in training, fresh from the scored file": (
            "true affinities, no popularity", from_the_file),
        "MAP liked sets, + clicks and skips, popularity shown in training, fresh from the scored file": (
            "MAP liked sets, + logged clicks and skips", from_the_file),
        "true affinities, popularity shown in training, fresh from earlier shows in the file": (
            "true affinities, no popularity", from_earlier_shows),
        "MAP liked sets, + clicks and skips, popularity shown in training, fresh from earlier shows in the file": (
            "MAP liked sets, + logged clicks and skips", from_earlier_shows),
    }
    names = ["oracle", "true affinities, no popularity", "true liked sets, no popularity", *evidence, *with_popularity]
    scores = {n: [] for n in names}
    fresh = []
    fitted = {n: {} for n in evidence}
    labels, sizes = [], []
    t0 = time.perf_counter()
    for i, row in enumerate(iter_behaviors(out_dir / sample.TEST_FILE)):
        u = user_of[row.user_id]
        cand = np.array([row_of[n] for n in row.news_ids])
        history = np.array([row_of[n] for n in row.history], dtype=np.int64)
        ta = world.topic_affinity[u][world.news_topic[cand]]
        sa = world.style_affinity[u][world.news_style[cand]]
        scores["oracle"].append(sample.click_logits(world, np.full(len(cand), u), cand))
        scores["true affinities, no popularity"].append(sample.TOPIC_WEIGHT * ta + sample.STYLE_WEIGHT * sa)
        scores["true liked sets, no popularity"].append(sample.TOPIC_WEIGHT * (ta > 0) + sample.STYLE_WEIGHT * (sa > 0))
        for name, fit in evidence.items():
            if row.user_id not in fitted[name]:
                has_evidence = len(history) or (name != names[3] and row.user_id in clicked)
                fitted[name][row.user_id] = fit(history, row.user_id) if has_evidence else None
            sets = fitted[name][row.user_id]
            scores[name].append(np.zeros(len(cand)) if sets is None else
                                reader.topic_gain * sets[0][world.news_topic[cand]] + reader.style_gain * sets[1][world.news_style[cand]])
        for name, (base, popularity) in with_popularity.items():
            scores[name].append(scores[base][-1] + sample.POPULARITY_WEIGHT * popularity(cand, i))
        labels.append(np.asarray(row.labels))
        sizes.append(len(cand))
        fresh.append(~seen[cand])
    y, fresh = np.concatenate(labels), np.concatenate(fresh)
    owner = np.repeat(np.arange(len(sizes)), sizes)

    def auc(name: str, keep: np.ndarray) -> float:
        return masked_auc(y, np.concatenate(scores[name]), owner, len(sizes), keep)

    everything = np.ones(len(y), bool)
    oracle, oracle_fresh = auc("oracle", everything), auc("oracle", fresh)
    rows = {}
    for n in names:
        a, f = auc(n, everything), auc(n, fresh)
        rows[n] = {"impression_auc": a, "gap_closed": (a - 0.5) / (oracle - 0.5),
                   "fresh_auc": f, "fresh_gap_closed": (f - 0.5) / (oracle_fresh - 0.5)}
    return {"seed": seed, "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    # this folder is on sys.path when run as a script
    from bench_quality import add_world_arguments, mean_gap_closed, on_held_out_worlds, write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_arguments(parser)
    args = parser.parse_args()
    results = on_held_out_worlds(args, run_seed, "recsys-ceiling-")
    mean_gap = mean_gap_closed(results)
    mean_fresh = {n: float(np.mean([r["rows"][n]["fresh_gap_closed"] for r in results])) for n in mean_gap}
    print(f"{'':<100}" + "".join(f"{'seed ' + str(r['seed']):>12}" for r in results) + f"{'mean gap':>10}{'fresh gap':>10}")
    for name, gap in mean_gap.items():
        aucs = "".join(f"{r['rows'][name]['impression_auc']:>12.4f}" for r in results)
        print(f"{name:<100}{aucs}{100 * gap:>9.1f}%{100 * mean_fresh[name]:>9.1f}%")
    write_results("quality_ceiling", args, results, mean_gap_closed=mean_gap, mean_fresh_gap_closed=mean_fresh)


if __name__ == "__main__":
    main()
