"""Quality on MIND-format worlds that ``recsys.data.sample`` did not write (issue 4: "do not tune
to the generator").

Every quality figure of the project so far comes from worlds of the project's own generator,
whose users like a few hidden topics (seen only in the text) and cover styles (seen only in the
picture). The product is judged on MIND data it has never seen, so this benchmark draws worlds
from a second click model, written here independently of the generator and shaped like the
MIND-small download instead:

- no cover images at all (MIND has none), 12 MIND categories with 1-3 subcategories each; the
  subcategory shows in news.tsv and in the headline's words, as in MIND;
- users with *dense* tastes (a Gaussian taste for every category plus one for every
  subcategory), not a few liked topics; their own sensitivity to popularity;
- the click probability falls with the article's age at the time it is shown (real news
  goes stale), besides the taste and the article's popularity;
- impressions of 2 to ~60 candidates from the articles of the last two days, exposure by
  popularity, at least one click each; histories simulated the same way before the log.

``truth.tsv`` holds each test candidate's true click probability (conditioned on at least one
click, as the labels are), so the oracle is known. For each seed: write the world, ``ingest``
its news and training behaviors, ``train`` with the default configuration, and ``evaluate`` on
the test window with the baselines; plus two references that need no training: the content
similarity of ``bench_quality.py`` and a logistic regression on the public category and
subcategory shares of the history (the fields a MIND reader has without any encoder).

Usage:
  python benchmarks/bench_quality_foreign.py --seeds 201 202 203 --users 3000 --news 2500 --impressions 9000

A variant trains with config overrides and writes its own results file, e.g. title + abstract:
  ... --set encoders.use_abstract=true --set encoders.text_max_length=128 --tag abstract

Prints a table and writes benchmarks/results/quality_foreign.json (quality_foreign_<tag>.json).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

# MIND-small's categories; each subcategory has a few headline words of its own.
TAXONOMY = {
    "news": {"newsus": "senate governor election lawmakers court ruling congress vote",
             "newscrime": "police arrested suspect shooting charged murder investigation robbery",
             "newsscienceandtechnology": "scientists study research space nasa discovery robot physics"},
    "sports": {"football_nfl": "quarterback touchdown nfl patriots cowboys coach playoff sacks",
               "basketball_nba": "nba lakers lebron dunk rebounds celtics warriors point guard",
               "baseball_mlb": "mlb pitcher yankees homer inning world series dodgers bullpen"},
    "finance": {"markets": "stocks dow nasdaq investors earnings shares rally wall street",
                "personalfinance": "retirement savings mortgage credit card budget taxes debt 401k"},
    "foodanddrink": {"recipes": "recipe bake chicken soup dinner oven cookies casserole",
                     "restaurants": "restaurant chef menu diner pizza burger chain opening"},
    "lifestyle": {"lifestyleroyals": "royal prince meghan queen palace duchess harry kate",
                  "shop-holidays": "gift deals black friday sale shopping holiday discount",
                  "lifestylebuzz": "viral photo wedding couple family surprise internet dog"},
    "health": {"medical": "doctors cancer hospital patients disease treatment vaccine surgery",
               "fitness": "workout exercise weight loss running muscles diet gym"},
    "travel": {"travelnews": "airline flight airport passengers travelers tsa delayed cruise",
               "traveltrip": "beach island vacation hotel resort destinations trip scenic"},
    "weather": {"weathertopstories": "storm snow forecast winter cold rain tornado hurricane"},
    "autos": {"autosenthusiasts": "car mustang horsepower ford corvette engine truck sedan",
              "autosnews": "recall dealers vehicles tesla electric gm toyota drivers"},
    "tv": {"tvnews": "series episode season finale netflix showrunner sitcom cast",
           "tv-celebrity": "actress star reality host celebrity interview talk show"},
    "music": {"musicnews": "singer album concert tour grammy rapper band song"},
    "movies": {"movienews": "movie box office film director trailer sequel marvel oscar"},
}
FILLER = "the a new after why how this what is for with on about says says will top best may".split()


def _words(rng: np.random.Generator, own: list[str], k: int) -> str:
    """k words, two thirds from the subcategory's own words, the rest common filler."""
    return " ".join(rng.choice(own) if rng.random() < 0.67 else rng.choice(FILLER) for _ in range(k))


def write_world(out: Path, *, seed: int, users: int, news: int, impressions: int) -> dict:
    """Write news.tsv, behaviors_train.tsv, behaviors_test.tsv and truth.tsv into ``out``."""
    from recsys.data.mind import format_time

    rng = np.random.default_rng(seed)
    subs = [(c, s, w.split()) for c, d in TAXONOMY.items() for s, w in d.items()]
    cats = list(TAXONOMY)
    cat_of_sub = np.array([cats.index(c) for c, _, _ in subs])
    start = datetime(2019, 11, 1)
    history_days, train_days, test_days, fresh_h = 10, 5, 2, 48
    span_h = (history_days + train_days + test_days) * 24

    # Articles: subcategory (MIND-like skew), popularity latent, publication hour.
    sub_share = rng.dirichlet(np.full(len(subs), 2.0))
    sub = rng.choice(len(subs), news, p=sub_share)
    pop = rng.standard_normal(news)
    published = np.sort(rng.uniform(-fresh_h, span_h, news))  # some are older than the log
    ids = [f"N{10_000 + 7 * i}" for i in range(news)]
    with open(out / "news.tsv", "w", encoding="utf-8") as f:
        for i in range(news):
            c, s, own = subs[sub[i]]
            title = _words(rng, own, int(rng.integers(6, 13))).capitalize()
            abstract = "" if rng.random() < 0.1 else _words(rng, own, int(rng.integers(12, 30))).capitalize() + "."
            f.write("\t".join((ids[i], c, s, title, abstract, f"https://assets.msn.com/labs/mind/{ids[i]}.html", "[]", "[]")) + "\n")

    # Users: a dense taste per category and per subcategory, popularity sensitivity, activity.
    taste = rng.normal(0, 1.0, (users, len(cats)))[:, cat_of_sub] + rng.normal(0, 0.7, (users, len(subs)))
    pop_sense = rng.normal(0.5, 0.3, users)
    activity = rng.lognormal(0, 0.9, users)

    def click_p(u: np.ndarray, items: np.ndarray, hour: np.ndarray) -> np.ndarray:
        age_days = (hour - published[items]) / 24.0
        return 1 / (1 + np.exp(-(1.3 * taste[u, sub[items]] + pop_sense[u] * pop[items] - 0.6 * age_days - 3.2)))

    def show(hour: float, size: int) -> np.ndarray:
        pool = np.flatnonzero((published <= hour) & (published > hour - fresh_h))
        w = np.exp(0.8 * pop[pool])
        return rng.choice(pool, min(size, len(pool)), replace=False, p=w / w.sum())

    # Histories: clicks in impressions before the log, newest last, each article once.
    history = []
    for u in range(users):
        want = 0 if rng.random() < 0.05 else int(rng.poisson(12 * activity[u]**0.5)) + 1
        got: dict[int, None] = {}
        for _ in range(400):
            if len(got) >= want:
                break
            hour = rng.uniform(0, history_days * 24)
            shown = show(hour, 20)
            if len(shown):
                for item in shown[rng.random(len(shown)) < click_p(np.full(len(shown), u), shown, np.full(len(shown), hour))]:
                    got.setdefault(int(item), None)
        history.append(" ".join(ids[i] for i in list(got)[:want]))

    # Impressions: users by activity, uniform times; labels conditioned on at least one click.
    who = rng.choice(users, impressions, p=activity / activity.sum())
    test_share = test_days / (train_days + test_days)
    hours = np.sort(np.concatenate([
        rng.uniform(history_days * 24, (history_days + train_days) * 24, impressions - int(impressions * test_share)),
        rng.uniform((history_days + train_days) * 24, span_h, int(impressions * test_share))]))
    counts = {"train": 0, "test": 0}
    with open(out / "behaviors_train.tsv", "w", encoding="utf-8") as ftr, \
            open(out / "behaviors_test.tsv", "w", encoding="utf-8") as fte, \
            open(out / "truth.tsv", "w", encoding="utf-8") as ftruth:
        for k, (u, hour) in enumerate(zip(who, hours), start=1):
            shown = show(hour, 2 + int(rng.negative_binomial(2, 0.1)))
            if len(shown) < 2:
                continue
            p = click_p(np.full(len(shown), u), shown, np.full(len(shown), hour))
            for _ in range(1000):
                y = (rng.random(len(shown)) < p).astype(int)
                if y.any():
                    break
            else:
                y[rng.choice(len(shown), p=p / p.sum())] = 1
            split = "test" if hour >= (history_days + train_days) * 24 else "train"
            when = format_time(start + timedelta(hours=float(hour)))
            line = f"{k}\tU{1000 + u}\t{when}\t{history[u]}\t" + " ".join(f"{ids[i]}-{c}" for i, c in zip(shown, y))
            (fte if split == "test" else ftr).write(line + "\n")
            counts[split] += 1
            if split == "test":
                q = p / (1 - np.prod(1 - p))
                ftruth.write("".join(f"test\t{k}\t{ids[i]}\t{j}\t{min(v, 1 - 1e-6):.6f}\t{c}\n"
                                     for j, (i, v, c) in enumerate(zip(shown, q, y))))
    return counts


def category_reference(world: Path, catalogue) -> dict:
    """``label_share_reference`` on public fields only: the history's shares of the candidate's
    category and of its subcategory (no encoder, no hidden label)."""
    import pandas as pd

    from bench_quality import label_share_reference

    frame = pd.read_csv(world / "news.tsv", sep="\t", header=None, usecols=[0, 1, 2], names=["id", "cat", "sub"])
    meta = frame.set_index("id").reindex(catalogue.features.news_ids)
    return label_share_reference(world, catalogue, [pd.factorize(meta["cat"])[0], pd.factorize(meta["sub"])[0]],
                                 logged_clicks=True)


def run_seed(seed: int, args, root: Path) -> dict:
    from bench_quality import config_overrides, content_similarity_reference, ingested_world, subset_rows
    from recsys.config import load_config
    from recsys.pipelines.evaluate import run_evaluate
    from recsys.pipelines.scoring import load_scoring_catalogue
    from recsys.pipelines.train import run_train

    t0 = time.perf_counter()
    world, ws, engine, counts = ingested_world(seed, args, root, foreign=True)
    config = load_config(None, config_overrides(args))
    version = run_train(engine, ws, config)["version"]
    rows = {}
    for file_exposure, suffix in ((True, ""), (False, ", --no-file-exposure")):
        out = ws.reports_dir / ("foreign" if file_exposure else "foreign-no-exposure")
        report = run_evaluate(engine, ws, config, behaviors=world / "behaviors_test.tsv", out=out,
                              truth=world / "truth.tsv", num_resamples=200, file_exposure=file_exposure)
        metrics = json.loads(Path(report["metrics_json"]).read_text())
        # "text+image (v2026...)" -> "text+image": one row name across seeds
        rows.update({name.split(" (v")[0] + (suffix if m["kind"] == "model" else ""): {
            "kind": m["kind"], "impression_auc": m["metrics"]["impression_auc"]["value"],
            "gap_closed": m["gap_closed"], "log_loss": m["metrics"]["log_loss"]["value"]}
            for name, m in metrics["models"].items() if file_exposure or m["kind"] == "model"})
    oracle = next(r["impression_auc"] for r in rows.values() if r["kind"] == "oracle")
    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    for name, ref in (("reference: content similarity, no training", content_similarity_reference(world, catalogue, logged_clicks=True)),
                      ("reference: category/subcategory shares (LR)", category_reference(world, catalogue))):
        rows[name] = {"kind": "reference", "impression_auc": ref["impression_auc"],
                      "gap_closed": (ref["impression_auc"] - 0.5) / (oracle - 0.5), "log_loss": None}
    fresh = subset_rows(world, ws.reports_dir / "foreign", {"text,image": version}, fresh_only=True)
    fresh_off = subset_rows(world, ws.reports_dir / "foreign-no-exposure", {"text,image": version}, fresh_only=True)
    fresh["text,image, --no-file-exposure"] = fresh_off["text,image"]
    engine.dispose()
    return {"seed": seed, "counts": counts, "rows": rows, "fresh": fresh, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    from bench_quality import add_world_arguments, mean_gap_closed, on_held_out_worlds, print_rows, write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_arguments(parser)
    parser.set_defaults(seeds=[201, 202, 203])
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()

    def show(res: dict) -> None:
        print(f"\nforeign world {res['seed']} ({res['seconds']} s, impressions {res['counts']})")
        print_rows(res["rows"])
        f = res["fresh"]
        for key in ("text,image", "text,image, --no-file-exposure"):
            if f.get(key) is not None:
                print(f"  fresh candidates only: model ({key}) {f[key]:.4f}, oracle {f['oracle']:.4f}, "
                      f"gap {100 * (f[key] - 0.5) / (f['oracle'] - 0.5):.1f}%")

    results = on_held_out_worlds(args, run_seed, "recsys-foreign-", show=show)
    mean_gap = mean_gap_closed(results)
    fresh = [(r["fresh"]["text,image"] - 0.5) / (r["fresh"]["oracle"] - 0.5) for r in results if r["fresh"].get("text,image")]
    fresh_off = [(r["fresh"]["text,image, --no-file-exposure"] - 0.5) / (r["fresh"]["oracle"] - 0.5) for r in results
                 if r["fresh"].get("text,image, --no-file-exposure")]
    print("\nmean gap closed over foreign worlds:")
    for name, value in mean_gap.items():
        print(f"  {name:<48} {100 * value:5.1f}%")
    if fresh:
        print(f"  {'model, fresh candidates only':<48} {100 * float(np.mean(fresh)):5.1f}%")
    if fresh_off:
        print(f"  {'model, --no-file-exposure, fresh candidates only':<48} {100 * float(np.mean(fresh_off)):5.1f}%")
    write_results("quality_foreign", args, results, mean_gap_closed=mean_gap, fresh_gap_closed=fresh,
                  fresh_gap_closed_without_file_exposure=fresh_off)


if __name__ == "__main__":
    main()
