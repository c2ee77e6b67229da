"""The ranking part of the nightly job: active users in shards -> rank -> write -> switch -> prune.

Steps 3 to 5 of the nightly job (ingest and encoding new articles are the pipeline's glue).
One call, under the store lock:

1. select the active users (an impression within ``active_days`` of the store's latest
   impression, or of ``as_of``) and cut them into shards of ``shard_size`` users;
2. resume the latest running run if it was started with exactly the same inputs (the index's
   content among them), else start a new run (an older unfinished run is marked failed and its
   rows deleted);
3. rank the missing shards with the chosen engine; each shard is written atomically;
4. switch: the run becomes "complete" in one transaction, readers see it from then on;
5. prune old runs and return the run summary (counts, timings per stage, model version).

Once the run is complete it is served: a store failing in step 5 is logged and listed in the
summary's ``warnings``, and left to the next run; it does not fail the night.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from sqlalchemy import Engine

import recsys
from recsys.config import ENGINES, MAX_DAYS, MAX_RANK
from recsys.errors import ConfigError, RecsysError, StoreError, StoreUnavailableError
from recsys.models.side_features import SideFeatures
from recsys.ranking import runs
from recsys.ranking.engines import (
    ShardResult,
    WorkerDiedError,
    WorkerSetup,
    ids_fingerprint,
    run_local,
    run_ray,
    threads_per_worker,
)
from recsys.ranking.lock import DEFAULT_STALE_AFTER, NIGHTLY_LOCK, LockLostError, StoreLock, acquire_lock, utc_now
from recsys.ranking.queries import (
    active_user_ids,
    count_without_clicks,
    first_seen_times,
    index_key_codes,
    store_marker,
)
from recsys.store.database import STORE_FAILURES, failure_message
from recsys.store.repository import read_interaction_log, time_range
from recsys.threads import default_threads
from recsys.versions import read_bundle_config

log = logging.getLogger(__name__)

# Progress factory: ``progress(description, total)`` -> context manager yielding ``advance(n)``
# (``recsys.progress.progress`` fits).
ProgressFactory = Callable[..., object]


class NothingToRecommendError(RecsysError):
    """A run found no eligible article for any of its users; it is failed, not completed."""


def run_nightly(
    engine: Engine,
    *,
    model_dir: str | Path,
    index_dir: str | Path,
    model_version: str | None = None,
    engine_name: str = "local",
    shard_size: int = 2000,
    k: int = 10,
    num_candidates: int = 200,
    active_days: float = 7.0,
    freshness_days: float = 3.0,
    keep_runs: int = 3,
    num_workers: int | None = None,
    num_threads: int | None = None,
    ray_address: str | None = None,
    as_of: datetime | None = None,
    lock_stale_after: timedelta = DEFAULT_STALE_AFTER,
    lock: StoreLock | None = None,
    progress: ProgressFactory | None = None,
    rerank: bool = False,
) -> dict:
    """Rank every active user and switch readers to the new run.

    Args:
        engine: the store (migrated).
        model_dir: the model bundle (``RankingModel.save``).
        index_dir: the FAISS index of the same model version's item embeddings.
        model_version: recorded with the run; defaults to the model directory's name.
        engine_name: "local" (worker processes) or "ray" (Ray Data actor pool).
        shard_size: users per shard (the unit of work, of atomic writes and of resume).
        k: recommendations per user.
        num_candidates: candidates retrieved from the index per user (N).
        active_days: users with an impression in the last ``active_days`` before ``as_of``
            are ranked, including users who never clicked (they get cold-start lists).
        freshness_days: articles first seen more than this long before ``as_of`` are not
            recommended.
        keep_runs: complete runs whose recommendations are kept; older ones are pruned.
        num_workers: worker processes or Ray actors; default: one per thread of
            ``num_threads``, and at most that many except on a Ray cluster. 0 (local engine
            only) ranks in this process.
        num_threads: threads the ranking may use in all (``[runtime] threads``), shared out
            among the workers; default: every core available to the process.
        ray_address: Ray cluster address; None starts a local Ray instance.
        as_of: the run's "now"; defaults to the store's latest impression time, and may not
            be earlier (ConfigError: the store cannot be read as of a past time).
        lock_stale_after: a lock held from another host counts as stale after this long
            without activity.
        lock: the nightly lock, when the caller already holds it (the nightly job takes it
            before its ingest); otherwise the run takes it.
        progress: optional progress factory (e.g. ``recsys.progress.progress``).
        rerank: rank even when the latest complete run was started with the same inputs (the
            same plan: model, index and its content, data, settings, recsys release); by default
            that run is returned as it is, with ``already_complete`` true, so that a retried job
            does not rank the night again.

    Returns:
        The run summary (see ``docs/operations.md``): run id, status, model version, plan,
        counts, timings per stage in seconds, resumed shards, pruned runs, and ``warnings``:
        what failed after the run was complete (pruning, recording the final timings, reading
        the summary back; the summary is then the one this process holds), left to the next run.

    Raises:
        ConfigError: an argument out of range or an unknown engine.
        RecsysError: the store holds no impressions or no active user in the window.
        RunLockedError: another nightly run holds the lock.
        NothingToRecommendError: no user got a single recommendation (no eligible article);
            the run is failed and readers keep the last complete run.
        WorkerDiedError: a worker process died; the run is left resumable.
        StoreUnavailableError: the connection to the store was lost (in this process or a
            worker's); the run is left resumable.
        LockLostError: another job took the lock over as stale; this one stopped.
        NotFoundError: the model bundle or the index is missing.
        StoreError: ``engine`` is an in-memory SQLite database (no worker could open it).
        ModelMismatchError: the model's config is unreadable, or its embedding size differs
            from the index's.
    """
    _check_arguments(engine_name, shard_size, k, num_candidates, active_days, freshness_days, keep_runs, num_workers)
    if num_threads is not None and num_threads < 1:
        raise ConfigError(f"runtime.threads is {num_threads}, expected at least 1 (or 0 for every core)")
    budget = num_threads or default_threads()
    workers = budget if num_workers is None else num_workers
    if workers > budget and not (engine_name == "ray" and ray_address):
        # Each worker needs a thread at least: more of them than the budget would run on
        # cores the budget leaves to others. A Ray cluster's cores are not this machine's.
        where = ("runtime.threads" if num_threads else
                 "the cores available: runtime.threads is unset, so LOKY_MAX_CPU_COUNT, the CPU affinity or quota")
        log.warning("nightly.workers = %d is more than the %d threads of %s: ranking with %d workers of one thread each",
                    workers, budget, where, budget)
        workers = budget
    if engine_name == "ray" and workers < 1:
        raise ConfigError(f"nightly.workers is {workers}, the ray engine needs at least 1 actor")
    model_version = model_version or Path(model_dir).name
    started = time.perf_counter()
    timings: dict[str, float] = {}
    if lock is not None and not (lock.held and lock.name == NIGHTLY_LOCK):
        raise ValueError(f"the lock handed to run_nightly must be the held {NIGHTLY_LOCK!r} lock, got {lock.name!r}")
    if lock is not None:
        lock.check()  # LockLostError when another job took it over meanwhile
    worker_url(engine)  # StoreError for a store no worker can open, before a run is created
    held = nullcontext(lock) if lock is not None else acquire_lock(engine, NIGHTLY_LOCK, stale_after=lock_stale_after)
    with held as lock:
        clock = time.perf_counter()
        clock_from_store = as_of is None
        as_of, users = _active_users(engine, as_of=as_of, active_days=active_days)
        shards = [(i, users[start : start + shard_size]) for i, start in enumerate(range(0, len(users), shard_size))]
        timings["select_users"] = time.perf_counter() - clock

        clock = time.perf_counter()
        prepared = _prepare(engine, model_dir, index_dir, as_of=as_of, freshness_days=freshness_days)
        plan = {
            "as_of": as_of.isoformat(sep=" "), "active_days": active_days, "freshness_days": freshness_days,
            "k": k, "num_candidates": num_candidates, "shard_size": shard_size, "num_shards": len(shards),
            "num_users": len(users), "users": ids_fingerprint(users), "model_version": model_version,
            "index": prepared["fingerprint"], "index_items": len(prepared["news_ids"]),
            # What the workers read of the articles: their vectors (re-embedded when an ingest
            # changes a title, an abstract, a category or a cover) and times. The ids alone let a
            # night resume, or return as done, a run ranked on the articles' old content.
            "index_content": prepared["content"], **store_marker(engine),
            # A new release may rank differently: its retry ranks again instead of returning (or
            # finishing) a run of the old code. The sources' fingerprint, as the version number
            # stays the same between commits.
            "recsys_version": recsys.release(),
        }
        lock.check()  # taken over while preparing? then touch no run
        done = None if rerank else runs.find_completed_run(engine, plan)
        if done is not None:
            # A retry of a night already done (Airflow retries exit 1 and 3 as well): the same
            # inputs rank the same lists, so ranking again would only push a night out of keep_runs.
            log.info("run %s already ranked these inputs (same plan): nothing to rank again", done.run_id)
            after = _AfterSwitch(done.run_id)
            # A run left running (a killed --rerank of the same night) is dead under our lock;
            # left alone it would stay 'running' with its partial rows.
            abandoned = after.attempt(
                "abandoning unfinished runs", "the next run abandons them", [],
                lambda: runs.abandon_running_runs(engine, keep_run_id=None,
                                                  message=f"superseded by run {done.run_id}, which ranked the same inputs"))
            # The attempt that completed it may have lost the store before its prune.
            pruned = after.attempt("pruning old runs", "the next run prunes them", [],
                                   lambda: runs.prune_runs(engine, keep_runs))
            summary = after.summary(engine, done)
            summary.update({"engine": engine_name, "resumed": False, "already_complete": True, "abandoned_runs": abandoned,
                            "pruned_runs": pruned, "users_per_second": None, "warnings": after.warnings})
            return summary
        resumed = runs.find_resumable_run(engine, plan)
        run_id = resumed.run_id if resumed else runs.create_run(engine, model_version=model_version, plan=plan)
        lock.attach_run(run_id)
        abandoned = runs.abandon_running_runs(engine, keep_run_id=run_id, message=f"superseded by run {run_id}")
        done = runs.finished_shards(engine, run_id)
        todo = [shard for shard in shards if shard[0] not in done]
        timings["prepare"] = time.perf_counter() - clock

        try:
            ranked = _rank(
                engine, engine_name, run_id, prepared, todo, model_dir=model_dir, index_dir=index_dir, k=k,
                num_candidates=num_candidates, num_workers=workers, num_threads=budget, ray_address=ray_address,
                progress=progress,
            )
            timings["rank"] = ranked["wall"]
            timings.update({f"workers.{stage}": seconds for stage, seconds in ranked["stages"].items()})
            clock = time.perf_counter()
            counts = _counts(engine, run_id, users, num_shards=len(shards), resumed_shards=len(done),
                             candidates=ranked["candidates"])
            if counts["recommendations"] == 0:  # (a run without users stopped earlier)
                # Completing it would switch every surface to empty lists: almost always a night
                # whose files were not ingested. Fail instead (exit 1 alerts cron or Airflow) and
                # leave readers on the last complete run.
                kept = runs.latest_run(engine)
                raise NothingToRecommendError(
                    f"run {run_id} recommends nothing to any of its {counts['users']} users: no article was eligible "
                    f"(the index holds {plan['index_items']}; only those first seen within nightly.freshness_days = "
                    f"{freshness_days:g} days before {plan['as_of']}"
                    + (", the store's latest impression time," if clock_from_store else "")
                    + " and not clicked by the reader count); the run is marked failed and readers keep "
                    + (f"run {kept.run_id}'s lists" if kept is not None else "no lists (there is no complete run)")
                    + ": check the ingest and that window"
                    + (" (one stored impression dated after the rest moves that time)" if clock_from_store else "")
                )
            lock.check()
            runs.complete_run(engine, run_id, counts=counts, timings=timings, num_shards=len(shards))
            timings["complete"] = time.perf_counter() - clock
        except (WorkerDiedError, LockLostError, StoreUnavailableError):
            # As after kill -9 the run stays running (the next attempt resumes it, ranking only
            # the shards not yet written): a worker that died, or a store that dropped its
            # connection for a moment, says nothing against the run. A job that lost the lock
            # leaves the runs to the job that holds it.
            raise
        except Exception as exc:
            try:
                runs.fail_run(engine, run_id, failure_message(exc, engine))
            except Exception as unrecorded:  # noqa: BLE001 - the store itself fails (a full disk): keep the cause
                log.error("could not mark run %s failed (%s: %s); the next run resumes or abandons it",
                          run_id, type(unrecorded).__name__, unrecorded)
            raise
        # The run is complete and served from here on: the store failing now is the next run's
        # to tidy up, not this night's failure.
        after = _AfterSwitch(run_id)
        clock = time.perf_counter()
        pruned = after.attempt("pruning old runs", "the next run prunes them", [], lambda: runs.prune_runs(engine, keep_runs))
        timings["prune"] = time.perf_counter() - clock
        timings["total"] = time.perf_counter() - started
        after.attempt("recording its final timings", "the store keeps those recorded at the switch", None,
                      lambda: runs.record_timings(engine, run_id, timings))
    # What the store holds of the run, as this process knows it.
    held = runs.RunInfo(run_id=run_id, kind=runs.NIGHTLY, status=runs.COMPLETE, started_at=None, finished_at=None,
                        model_version=model_version, counts={**counts, "plan": runs.fingerprinted(plan)},
                        timings=timings, message=None)
    summary = after.summary(engine, held)
    summary.update({
        "engine": engine_name, "resumed": resumed is not None, "already_complete": False, "abandoned_runs": abandoned,
        "pruned_runs": pruned, "users_per_second": len(users) / timings["total"], "warnings": after.warnings,
    })
    return summary


class _AfterSwitch:
    """The steps after a run became complete. The run is served by then: a store that fails
    one of them (a lost connection, a full disk) is logged as a warning, collected in
    ``warnings`` for the summary, and left to the next run, instead of failing the night."""

    def __init__(self, run_id: int):
        self.run_id = run_id
        self.warnings: list[str] = []

    def attempt(self, step: str, instead: str, fallback, call):
        """``call()``, or ``fallback`` when the store fails it; ``instead`` says what happens then."""
        try:
            return call()
        except STORE_FAILURES as exc:
            warning = (f"run {self.run_id} is complete and served, but {step} failed ({type(exc).__name__}: {exc}); "
                       f"{instead}")
            log.warning("%s", warning)
            self.warnings.append(warning)
            return fallback

    def summary(self, engine: Engine, held: runs.RunInfo) -> dict:
        """``runs.run_summary``, or when the store cannot be read, the same fields from ``held``,
        the run as this process knows it (the scheduler still gets the run id and counts): every
        shard written (the switch checked that)."""
        summary = self.attempt("reading its summary back", "the summary is built from what this process holds", None,
                               lambda: runs.run_summary(engine, self.run_id))
        if summary is not None:
            return summary
        return runs.summary_of(held, shards_written=held.counts.get("shards"),
                               recommendations_stored=held.counts.get("recommendations"))


def _active_users(engine: Engine, *, as_of: datetime | None, active_days: float) -> tuple[datetime, np.ndarray]:
    """The run's time and its active users, sorted."""
    latest = time_range(engine)[1]
    if latest is None:
        raise RecsysError("the store holds no impressions: ingest behaviors before running the nightly job")
    if as_of is not None and as_of < latest:
        # Not a point-in-time backfill: the store keeps each reader's latest History and every
        # click and article since, which a run "as of" an earlier time would read.
        raise ConfigError(
            f"as_of {as_of} is before the store's latest impression ({latest}): the store keeps each reader's "
            "latest History only, so a run in the past would read later clicks and articles; rank as of the "
            "store's end (the default) or later"
        )
    as_of = as_of or latest
    users = active_user_ids(engine, since=as_of - timedelta(days=active_days), until=as_of)
    if len(users) == 0:
        raise RecsysError(f"no active user: nobody was shown an impression in the {active_days} days before {as_of}")
    return as_of, users


def _counts(
    engine: Engine, run_id: int, users: np.ndarray, *, num_shards: int, resumed_shards: int, candidates: int
) -> dict:
    """The run's counts, read from the store so that resumed shards are counted too."""
    written = runs.finished_shards(engine, run_id)
    served = runs.users_with_recommendations(engine, run_id)
    return {
        "users": len(users),
        "cold_start_users": count_without_clicks(engine, users),
        "users_with_recommendations": served,
        "users_without_recommendations": len(users) - served,
        "recommendations": int(sum(num for _, num in written.values())),
        "shards": num_shards,
        "shards_resumed": resumed_shards,
        # Shards resumed from an earlier attempt were scored there: not counted here.
        "candidates_scored": candidates,
    }


def _check_arguments(engine_name, shard_size, k, num_candidates, active_days, freshness_days, keep_runs, num_workers):
    if engine_name not in ENGINES:
        raise ConfigError(f"nightly.engine is {engine_name!r}, expected one of {', '.join(ENGINES)}")
    integers = (("shard_size", shard_size), ("k", k), ("num_candidates", num_candidates), ("keep_runs", keep_runs))
    for name, value in integers:
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"nightly.{name} is {value!r}, expected an integer >= 1")
    if k > num_candidates:
        raise ConfigError(f"nightly.k is {k}, expected at most num_candidates ({num_candidates})")
    if k > MAX_RANK:
        raise ConfigError(f"nightly.k is {k}, expected at most {MAX_RANK} (the largest rank the store holds)")
    for name, value in (("active_days", active_days), ("freshness_days", freshness_days)):
        if not 0 < value <= MAX_DAYS:
            raise ConfigError(f"nightly.{name} is {value!r}, expected a number of days above 0 and at most {MAX_DAYS}")
    if num_workers is not None and num_workers < 0:
        raise ConfigError(f"nightly.workers is {num_workers}, expected 0 or more")


def _prepare(engine: Engine, model_dir, index_dir, *, as_of: datetime, freshness_days: float) -> dict:
    """Once per run, in the driver: the index rows and content fingerprints, side features and
    cold-start candidates.

    The driver never loads TensorFlow: side features are plain NumPy from the bundle's
    config, so the driver stays small and starts fast while the workers load the model.
    """
    from recsys.index.faiss_index import FaissIndex
    from recsys.ranking.candidates import item_side_features, popular_items

    config = read_bundle_config(Path(model_dir))
    side_features = SideFeatures.from_dict(config["side_features"])
    # The index must hold this model's item embeddings: at least their size must match.
    index = FaissIndex.load(index_dir, expected={"dim": int(config.get("serving_dim", config["embedding_dim"]))}, num_threads=1)
    news_ids = np.asarray(index.news_ids, dtype=object)
    now = np.datetime64(as_of, "s")
    window = timedelta(hours=side_features.window_hours)
    # Popularity counts labelled shows up to the store's last one, included (predict and
    # evaluate's "store's end"). When the newest impressions are unlabelled (a MIND test file
    # ingested last), a window ending at the run's time would hold none of them and every
    # article would read as never shown; ages are still read at the run's time.
    _, last_show = time_range(engine, labelled_only=True)
    popular_at = as_of if last_show is None else last_show + timedelta(seconds=1)
    if last_show is not None and last_show < time_range(engine)[1]:
        log.warning("the store's impressions after %s carry no labels: popularity is read from the %g h before it, "
                    "ages at the run's time %s", last_show, side_features.window_hours, as_of)
    events = read_interaction_log(engine, news_ids, since=popular_at - window, until=popular_at)
    first_seen = first_seen_times(engine, news_ids)
    fresh_after = np.datetime64(as_of - timedelta(days=freshness_days), "s")
    return {
        # The index holds every stored article (the refresh before the ranking adds and removes
        # them), so the skips the workers count are all of the store's.
        "item_codes": index_key_codes(engine, news_ids) if config.get("category_affinity") is not None else None,
        "news_ids": news_ids,
        "fingerprint": ids_fingerprint(news_ids),
        "content": index.content_fingerprint(),
        "side": item_side_features(side_features, now, events, first_seen, popularity_at=np.datetime64(popular_at, "s")),
        # Freshness from the index, as the warm users' published_after filter reads it: an
        # article never shown has no first-seen time but an indexing time, and ages out.
        "popular": popular_items(
            events, index.published(news_ids), now=np.datetime64(popular_at, "s"),
            window=np.timedelta64(int(window.total_seconds()), "s"),
            # Every fresh article, not num_candidates: each cold-start reader skips the ones they clicked.
            fresh_after=fresh_after,
        ),
        "published_after": fresh_after,
    }


def _rank(engine, engine_name, run_id, prepared, todo, *, model_dir, index_dir, k, num_candidates, num_workers,
          num_threads, ray_address, progress) -> dict:
    """Run the missing shards; returns wall time, candidates scored and worker stage sums."""
    setup = WorkerSetup(
        db_url=worker_url(engine),
        run_id=run_id,
        model_dir=str(model_dir),
        index_dir=str(index_dir),
        k=k,
        num_candidates=num_candidates,
        published_after=prepared["published_after"],
        side=prepared["side"],
        popular=prepared["popular"],
        catalogue_fingerprint=prepared["fingerprint"],
        num_threads=num_threads if num_workers == 0 else threads_per_worker(num_workers, num_threads),
        created_at=utc_now(),
        item_codes=prepared["item_codes"],
    )
    stages: dict[str, float] = {}
    candidates = 0
    clock = time.perf_counter()
    num_users = sum(len(users) for _, users in todo)
    bar = progress("ranking users", num_users) if progress is not None and todo else nullcontext(None)
    with bar as advance:

        def on_result(result: ShardResult) -> None:
            nonlocal candidates
            candidates += result.num_candidates
            for stage, seconds in result.timings.items():
                stages[stage] = stages.get(stage, 0.0) + seconds
            if advance is not None:
                advance(result.num_users)

        if engine_name == "ray":
            run_ray(setup, todo, num_workers=num_workers, ray_address=ray_address, on_result=on_result)
        else:
            run_local(setup, todo, num_workers=num_workers, on_result=on_result)
    return {"wall": time.perf_counter() - clock, "candidates": candidates, "stages": stages}


def worker_url(engine: Engine) -> str:
    """The store URL for workers, which may run in another directory (Ray): SQLite paths made absolute.

    Raises:
        StoreError: ``engine`` is an in-memory SQLite database, which no other process can open.
    """
    from recsys.store.database import is_in_memory_sqlite

    rendered = engine.url.render_as_string(hide_password=False)
    if is_in_memory_sqlite(rendered):
        raise StoreError(
            f"the store {rendered!r} is an in-memory SQLite database: the nightly job's worker and helper processes "
            "open the store by its URL and would each get an empty database of their own; give a file "
            "(sqlite:///path/to/store.db) or a PostgreSQL URL"
        )
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database:  # (an in-memory one was refused above)
        if not url.database.startswith("file:") and not Path(url.database).is_absolute():
            url = url.set(database=str(Path(url.database).resolve()))
    return url.render_as_string(hide_password=False)
