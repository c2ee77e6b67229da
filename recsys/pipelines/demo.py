"""`recsys demo`: sample world -> ingest -> train (+ ablations) -> index -> nightly -> report."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from recsys.errors import RecsysError

log = logging.getLogger("recsys.demo")

COMMITTED_SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


# What the demo reads from a world folder: (file, required). Checked before anything is done, so
# a folder without its test file is not found out after three trainings and a nightly run.
SAMPLE_FILES = (("news.tsv", True), ("behaviors_train.tsv", True), ("behaviors_test.tsv", True),
                ("news_train.tsv", False), ("images", False), ("truth.tsv", False))


def _news_ids(path: Path) -> set[str]:
    """The NewsIDs of a news file's good lines (empty when there is none), read by ingest's own reader."""
    from recsys.data.mind import NewsRow, iter_news

    if not path.is_file():
        return set()
    with iter_news(path) as rows:
        return {row.news_id for row in rows if isinstance(row, NewsRow)}


def find_sample(sample: Path | None, workspace_root: Path) -> Path:
    """The sample world to run on: given, committed, or generated into the workspace."""
    if sample is not None:
        for name, required in SAMPLE_FILES:
            if required and not (Path(sample) / name).is_file():
                raise RecsysError(f"--sample {sample}: no {name} there (the demo needs news.tsv, "
                                  "behaviors_train.tsv and behaviors_test.tsv; news_train.tsv, images/ and truth.tsv are optional)")
        return Path(sample)
    if (COMMITTED_SAMPLE / "news.tsv").is_file():
        return COMMITTED_SAMPLE
    from recsys.pipelines.sample import run_generate_sample

    out = workspace_root / "sample"
    if not (out / "news.tsv").is_file():
        log.info("no committed sample found; generating one into %s", out)
        run_generate_sample(out, users=1000, news=1000, impressions=1800, seed=7)
    return out


def refuse_another_applications_database(url: str) -> None:
    """Refuse a database that holds tables but no recsys store (another application's).

    ``check_store_is_the_demos`` reads the store after ``open_store`` made it: pointed at such a
    database, the demo would first have added recsys's tables to it.
    """
    from recsys.store.database import foreign_tables, shown_store

    tables = foreign_tables(url)
    if tables:
        shown = ", ".join(tables[:5]) + (f" and {len(tables) - 5} more" if len(tables) > 5 else "")
        raise RecsysError(
            f"the database at {shown_store(url)} holds tables of another application ({shown}) and no recsys "
            "store: the demo would add its tables there and fill them with the sample world. Give it a "
            "workspace of its own (--workspace DIR) and no --db or RECSYS_DB"
        )


def check_store_is_the_demos(engine, world: Path) -> None:
    """Refuse a store that holds anything but this world's data.

    The demo ingests the world into the store it is given, trains on everything there and makes
    its model current: pointed at a real store (an exported RECSYS_DB, a production workspace) it
    would mix the sample into real readers' histories and serve the sample's model. An empty
    store, or one an earlier demo of the same world filled, is fine.
    """
    import sqlalchemy as sa

    from recsys.store import schema
    from recsys.store.database import shown_store
    from recsys.store.ingest import default_source

    own_source = default_source(world / "behaviors_train.tsv")
    with engine.connect() as conn:
        sources = conn.execute(sa.select(schema.impressions.c.source).distinct().limit(5)).scalars().all()
        news_ids = conn.execute(sa.select(schema.news.c.news_id)).scalars()
        world_ids, train_ids = _news_ids(world / "news.tsv"), _news_ids(world / "news_train.tsv")
        stored = set(news_ids)
    foreign_news = next((i for i in sorted(stored) if i not in world_ids), None)
    foreign_source = next((source for source in sources if source != own_source), None)
    if foreign_source is None and foreign_news is None:
        later = len(stored - train_ids) if train_ids else 0
        if later:  # the demo ingests news_train.tsv since 2026-12-05; news.tsv was ingested before
            log.warning("the store holds %d articles of %s that %s does not (published after the training window, "
                        "from an earlier demo): its nightly recommends them too; delete the demo's workspace "
                        "(workspace/demo for make demo) for a store without them", later, world / "news.tsv", world / "news_train.tsv")
        return
    what = (f"impressions of another behaviors file (source {foreign_source!r})" if foreign_source is not None
            else f"articles that are not in {world / 'news.tsv'} (first {foreign_news})")
    raise RecsysError(
        f"the store at {shown_store(engine.url)} already holds {what}: the demo ingests the sample world "
        "into its store, trains on all of it and makes its model current, so it runs only on an empty store or "
        "one an earlier demo of this world filled. Give it a workspace of its own (--workspace DIR) and no "
        "--db or RECSYS_DB"
    )


def run_demo(ctx, *, sample: Path | None = None, epochs: int | None = None) -> dict:
    from rich.text import Text

    from recsys.display import console as wide_console, rows_table
    from recsys.escapes import escape_controls
    from recsys.pipelines.evaluate import run_evaluate
    from recsys.pipelines.index import run_index_build, run_similar
    from recsys.pipelines.ingest import run_ingest
    from recsys.pipelines.nightly import run_nightly_job
    from recsys.pipelines.train import run_train
    from recsys.ranking.runs import recommendations_for_user
    from recsys.store.stats import store_stats

    console = wide_console()
    # The config first: a typo or a bad --epochs is refused before the workspace is made.
    config = ctx.config({"model.epochs": epochs}, flags={"model.epochs": "--epochs"})
    ws = ctx.workspace.ensure()
    world = find_sample(sample, ws.root)
    refuse_another_applications_database(ctx.db_url)  # before ctx.engine creates recsys tables in it
    engine = ctx.engine(create=True)  # it ingests the sample first
    check_store_is_the_demos(engine, world)
    step = lambda text: console.rule(Text(text, style="bold"))  # noqa: E731  (the sample path is not markup)

    step(f"1/7 ingest {world}")
    images = world / "images" if (world / "images").is_dir() else None  # a MIND download has no covers
    # The articles published by the end of training, where the world has them apart: the nightly
    # then ranks what exists on its night, and the evaluation encodes the later ones from news.tsv.
    news = world / "news_train.tsv" if (world / "news_train.tsv").is_file() else world / "news.tsv"
    run_ingest(engine, ws, news=news, behaviors=world / "behaviors_train.tsv", images=images,
               max_bad_share=config.ingest.max_bad_share)
    console.print_json(json.dumps(store_stats(engine)))

    step("2/7 train the CTR model (text + image), then its text-only and image-only ablations")
    trained = {}
    for modalities in ("text", "image", "text,image"):  # the multimodal model last: it becomes current
        cfg = replace(config, model=replace(config.model, modalities=modalities))
        # The ablations are exactly what they say; the model may drop a silent modality.
        result = run_train(engine, ws, cfg, make_current=(modalities == "text,image"), exact_modalities=(modalities != "text,image"))
        trained[modalities] = result
        console.print(f"  {modalities:<10} version {result['version']}  validation AUC {result['metrics'].get('val_auc', float('nan')):.4f}")

    step("3/7 build the FAISS index")
    console.print_json(json.dumps(run_index_build(engine, ws, config)))

    step("4/7 nightly ranking of every active user")
    summary = run_nightly_job(engine, ws, config, export=ws.exports_dir)
    console.print_json(json.dumps(summary["run"], default=str))

    step("5/7 an example: one reader's recommendations")
    user = _example_user(engine)
    recs = recommendations_for_user(engine, user, config.nightly.k)
    console.print(rows_table(recs.to_dict("records"), ["rank", "news_id", "category", "title", "score"], title=f"recommendations for {user}"))

    step("6/7 articles similar to the top recommendation")
    for row in run_similar(engine, ws, news_id=recs.iloc[0]["news_id"], k=5, num_threads=config.runtime.threads or None):
        console.print(f"  {row['rank']}. {row['news_id']} [{row['category']}] {escape_controls(row['title'])}  ({row['score']:.3f})", markup=False)

    step("7/7 offline evaluation on the held-out test window")
    out = ws.reports_dir / "demo"
    report = run_evaluate(
        engine, ws, config, behaviors=world / "behaviors_test.tsv", out=out, versions=None, ablations=True,
        truth=world / "truth.tsv" if (world / "truth.tsv").exists() else None, news=world / "news.tsv", images=images,
    )
    console.print("report:", Text(str(report["html"]), style="bold"))
    console.print("metrics:", Text(str(report["metrics_json"])))
    return {"trained": trained, "nightly": summary, "report": report}


def _example_user(engine) -> str:
    """A user of the latest run with a click history (most informative to look at)."""
    from sqlalchemy import select

    from recsys.ranking.runs import latest_run
    from recsys.store import schema as s
    from recsys.store.repository import bytewise

    latest = latest_run(engine)
    if latest is None:
        raise RecsysError("the nightly run recommended nothing")
    run_id = latest.run_id
    with engine.connect() as conn:
        user = conn.execute(
            select(s.recommendations.c.user_id)
            .join(s.clicks, s.clicks.c.user_id == s.recommendations.c.user_id)
            .where(s.recommendations.c.run_id == run_id)
            .order_by(bytewise(engine, s.recommendations.c.user_id))  # the same user on either backend
            .limit(1)
        ).scalar()
    if user is None:
        raise RecsysError("the nightly run recommended nothing")
    return user
