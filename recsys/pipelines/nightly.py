"""`recsys nightly`: the product's main job, one command for cron or Airflow.

The whole job holds the store's ``nightly`` lock, so a second job ingests nothing.

1. ingest new files if given (bad rows quarantined; an ingest failure is recorded and the
   existing data is still scored),
2. encode articles the feature cache lacks, embed them with the current model version and
   add new or changed articles to its index (in a helper process, so that TensorFlow and the
   features leave memory before the ranking workers start),
3-5. rank every active user shard by shard, switch readers atomically, record the run
   (``recsys.ranking.nightly.run_nightly``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import numpy as np
from sqlalchemy import Engine

from recsys.config import Config, Workspace
from recsys.errors import ConfigError, NotFoundError, RecsysError, StoreUnavailableError
from recsys.pipelines.index import CATALOGUE_STATE, catalogue_state, index_manifest, published_times, recorded_state
from recsys.pipelines.inputs import (
    check_images_go_with_news,
    check_output_folder,
    check_source_goes_with_behaviors,
    check_writable,
)
from recsys.pipelines.features import first_seen_array, load_catalogue, load_version_model
from recsys.progress import progress
from recsys.ranking.lock import NIGHTLY_LOCK, LockView, StoreLock, acquire_lock
from recsys.threads import configure_threads
from recsys.store import repository as repo
from recsys.store.database import STORE_FAILURES
from recsys.versions import check_encoders, get_version

log = logging.getLogger("recsys.nightly")

# An approximate index (HNSW, IVF) keeps a replaced article's old row as a tombstone, skipped
# at search time; past this share of the live rows they slow every search and grow the file
# night after night (a night that re-embeds the catalogue adds a whole copy), so the refresh
# rebuilds the index without them.
COMPACT_TOMBSTONE_SHARE = 0.2
# The search breadth is tuned to a target recall on the catalogue as it was; re-tuned after a
# compaction or once the catalogue has grown by this factor since.
RECALIBRATE_GROWTH = 1.25


def index_is_current(engine: Engine, mv, config: Config) -> bool:
    """Whether the version's index was refreshed from the store's catalogue as it is now
    (``catalogue_state`` of ``read_news_state``) under today's settings, and reads whole: then a
    refresh would change nothing, and the night skips its helper (loading TensorFlow and every
    article's features only to find so). An index that cannot be read is not current: the
    refresh builds it again."""
    from recsys.index import FaissIndex

    if not FaissIndex.exists(mv.index_dir):
        return False
    state = catalogue_state(repo.read_news_state(engine), config)
    try:
        index = FaissIndex.load(mv.index_dir, expected={**index_manifest(mv), CATALOGUE_STATE: state},
                                num_threads=config.runtime.threads or None)
    except (RecsysError, OSError):
        # Another record, a damaged or busy folder: the refresh deals with it as it always has.
        return False
    _warn_of_another_kind(index, config, mv)
    return True


def refresh_index(engine: Engine, workspace: Workspace, config: Config, mv, *, lock: StoreLock | LockView | None = None) -> dict:
    """Add articles that are new (or whose content changed) to the version's index.

    Features come through the cache, so only new articles reach the encoders; the item
    tower is cheap and re-embeds the catalogue, and only rows whose embedding differs from
    the indexed one are written. Publication times follow the store: a behaviors file can
    move an article's first-seen time earlier (an older file, or a History that lists it),
    and the freshness filter reads the index's copy. An article the store has not seen yet
    keeps the time it was first indexed at, so it still leaves the fresh set after its days.
    With ``lock``, the index is written only while the store still names this job its holder
    (encoding a large batch of new articles takes a while).
    """
    from recsys.index import FaissIndex, IndexFormatError

    news, features = load_catalogue(engine, workspace, config, versions=[mv])
    embeddings = load_version_model(mv, features).item_embeddings(features)
    published = published_times(engine, news, models_dir=workspace.models_dir)
    threads = config.runtime.threads or None
    index = None
    state = recorded_state(news, features, config)
    manifest = {**index_manifest(mv), CATALOGUE_STATE: state}
    if FaissIndex.exists(mv.index_dir):
        try:
            index = FaissIndex.load(mv.index_dir, expected=index_manifest(mv), num_threads=threads)
        except IndexFormatError as exc:
            # Everything an index holds comes from the store and the features: built again, the
            # night goes on (it used to stop every night until someone ran `index build`).
            log.warning("the index of model version %s cannot be read (%s): building it whole", mv.version, exc)
    if index is None:
        index = FaissIndex.build(
            features.news_ids, embeddings, published=published, kind=config.index.kind,
            exact_max_items=config.index.exact_max_items, num_threads=threads,
        )
        if lock is not None:
            lock.check()
        index.save(mv.index_dir, manifest_extra=manifest)
        return {"index_built": len(index), "index_added": len(index)}
    # Articles the store does not hold (a store restored from a backup older than the index, a
    # workspace copied onto another store) were recommended, with no title: taken out.
    held = set(features.news_ids.tolist())
    removed = index.remove([nid for nid in index.news_ids.tolist() if nid not in held])
    if removed:
        log.warning("the index of model version %s held %d articles the store does not hold: removed (a store older "
                    "than the index, or a workspace used with another store)", mv.version, removed)
    present = np.array([nid in index for nid in features.news_ids], dtype=bool)
    changed = ~present
    moved = np.zeros(len(present), dtype=bool)
    if present.any():
        at = np.flatnonzero(present)
        old = index.vectors(features.news_ids[at])
        changed[at] = np.abs(old - embeddings[at]).max(axis=1) > 1e-5
        indexed = index.published(features.news_ids[at])
        published[at] = np.where(np.isnat(first_seen_array(news)[at]), indexed, published[at])
        moved[at] = ~changed[at] & (published[at] != indexed) & ~np.isnat(published[at])  # NaT != NaT in numpy
    rows = np.flatnonzero(changed)
    if moved.any():
        index.set_published(features.news_ids[moved], published[moved])
    if len(rows):
        index.add(features.news_ids[rows], embeddings[rows], published=published[rows])
    index, maintained = _follow_index_config(index, config, mv)
    maintained.update(maintain_index(index))
    # Saved when only the record of the catalogue is new, too, so the next nights can skip.
    if len(rows) or removed or moved.any() or maintained or index.manifest_extra.get(CATALOGUE_STATE) != state:
        if lock is not None:
            lock.check()
        index.save(mv.index_dir, manifest_extra=manifest)
    return {"index_added": int((~present).sum()), "index_updated": int(len(rows) - (~present).sum()),
            "index_republished": int(moved.sum()), **({"index_removed": removed} if removed else {}), **maintained}


def refresh_index_apart(engine: Engine, workspace: Workspace, config: Config, mv, *, lock: StoreLock | None = None) -> dict:
    """``refresh_index`` in a spawned process of its own.

    The refresh loads TensorFlow, the encoders and the catalogue's features (1.1 GB of RSS at
    MIND-small size) and a process never hands TensorFlow's memory back: done in the job's
    own process, all of it stayed resident beside the ranking workers. The helper asks the
    store whether the job still holds ``lock`` before it writes (``LockView``); the job keeps
    the heartbeat.

    Raises:
        WorkerDiedError: the helper process died (killed by a signal); nothing was swapped in
            that a later night cannot redo.
        RecsysError: what ``refresh_index`` raised.
    """
    from recsys.ranking.nightly import worker_url

    args = (worker_url(engine), workspace, config, mv, None if lock is None else lock.state,
            logging.getLogger().level, os.getpid())
    return run_apart(_refresh_in_helper, *args, died=(
        "the index refresh process died before it answered; the index is the previous night's or this one's, "
        "whole, and the next run refreshes it again"))


def _how_it_ended(exitcode: int | None) -> str:
    """A dead process's end in words: it said "killed by a signal" whatever the exit code."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}{', often the out-of-memory killer' if -exitcode == signal.SIGKILL else ''}"
    return f"exit code {exitcode}: its error, if it wrote one, is above on stderr"


def run_apart(target, *args, died: str):
    """``target(*args)`` in a spawned helper process: its result, or the exception it raised
    (one that cannot cross the process boundary as it is comes as RecsysError for a
    RecsysError, RuntimeError otherwise, with its class name and message).

    Raises:
        WorkerDiedError: the helper died before it answered (a signal, or an exit before it
            could report an error: a module that fails to import), with the message ``died``
            and how it ended.
    """
    import multiprocessing

    from recsys.ranking.engines import WorkerDiedError

    context = multiprocessing.get_context("spawn")
    answer, reply = context.Pipe(duplex=False)
    helper = context.Process(target=_call_in_helper, args=(reply, target, *args), name="recsys-helper")
    helper.start()
    reply.close()  # the helper holds the only sending end: its death reads as end of file
    try:
        try:
            ok, value, trace = answer.recv()
        except EOFError:
            helper.join()
            raise WorkerDiedError(f"{died} ({_how_it_ended(helper.exitcode)})") from None
        helper.join()
        if ok:
            return value
        raise value from (HelperTraceback(trace) if trace else None)
    except BaseException:
        # Ctrl-C in the job: stop the helper now instead of waiting for it to finish (an index
        # save it cuts short is restored later).
        if helper.is_alive():
            helper.terminate()
            helper.join()
        raise
    finally:
        answer.close()


class HelperTraceback(Exception):
    """The helper's traceback, as the cause of the exception ``run_apart`` re-raises."""

    def __str__(self) -> str:
        return f"\n\n{self.args[0]}"


def _call_in_helper(reply, target, *args) -> None:
    import pickle
    import traceback

    try:
        outcome = (True, target(*args), None)
    except Exception as exc:  # noqa: BLE001 - handed to the job, which raises it
        trace = "".join(traceback.format_exception(exc))
        try:  # the job re-raises it as it is if it crosses the process boundary intact
            pickle.loads(pickle.dumps(exc))
            outcome = (False, exc, trace)
        except Exception:  # noqa: BLE001 - an error class whose arguments are not its message
            # Same kind of failure for the CLI: bad input (exit 1) or an internal error (exit 2).
            kind = RecsysError if isinstance(exc, RecsysError) else RuntimeError
            outcome = (False, kind(f"{type(exc).__name__}: {exc}"), trace)
    try:
        reply.send(outcome)
    except Exception as exc:  # noqa: BLE001 - a result that cannot be pickled
        reply.send((False, RuntimeError(f"the helper's result cannot be sent back: {type(exc).__name__}: {exc}"), None))
    finally:
        reply.close()


def _refresh_in_helper(url: str, workspace: Workspace, config: Config, mv, lock_state, log_level: int, parent_pid: int) -> dict:
    from recsys.progress import configure_logging
    from recsys.ranking.engines import watch_parent
    from recsys.store.database import open_store

    configure_logging(log_level)
    watch_parent(parent_pid)
    configure_threads(config.runtime.threads or None)
    engine = open_store(url)
    try:
        return refresh_index(engine, workspace, config, mv, lock=None if lock_state is None else LockView(engine, lock_state))
    finally:
        engine.dispose()


def _follow_index_config(index, config: Config, mv) -> tuple[object, dict]:
    """The index as ``[index]`` now asks: ``exact_max_items`` taken from the config (it also
    steers the filtered search), and an index built as "auto" built again from its own vectors,
    while the config says "auto" too, when auto now resolves to another kind (a flat index whose
    catalogue grew past ``exact_max_items`` becomes HNSW, as ``index build`` would make it). An
    index built with an explicit kind (``index build --kind``, or the config's) keeps it; a
    config naming an explicit kind other than the index's is warned about. Returns the index
    and what was done."""
    from recsys.index.faiss_index import AUTO, FaissIndex, resolve_kind

    settings = config.index
    done = {}
    if index.requested_kind is None:
        # Saved before the kind asked for was recorded. Auto's, when the config says "auto" and
        # auto gives its kind at its own threshold (never IVF; HNSW only past exact_max_items);
        # explicit otherwise. Recorded with this save.
        by_auto = settings.kind == AUTO and resolve_kind(AUTO, len(index), index.exact_max_items) == index.kind
        index.requested_kind = AUTO if by_auto else index.kind
        done["index_requested_kind"] = index.requested_kind
        log.warning("the index of model version %s records no kind asked for (saved by an earlier release): taken "
                    "as %r", mv.version, index.requested_kind)
    if index.exact_max_items != settings.exact_max_items:
        done["index_exact_max_items"] = {"from": index.exact_max_items, "to": settings.exact_max_items}
        index.exact_max_items = settings.exact_max_items
    _warn_of_another_kind(index, config, mv)
    if not settings.kind == index.requested_kind == AUTO:
        return index, done
    if resolve_kind(AUTO, len(index), settings.exact_max_items) == index.kind:
        return index, done
    ids = index.news_ids
    t0 = time.perf_counter()
    rebuilt = FaissIndex.build(ids, index.vectors(ids), published=index.published(ids), kind=AUTO,
                               exact_max_items=settings.exact_max_items, num_threads=index.num_threads)
    log.info("index of %d articles rebuilt as %s (was %s; built as \"auto\", exact_max_items = %d) in %.1f s",
             len(rebuilt), rebuilt.kind, index.kind, settings.exact_max_items, time.perf_counter() - t0)
    return rebuilt, {**done, "index_rebuilt": {"from": index.kind, "to": rebuilt.kind, "items": len(rebuilt)}}


def _warn_of_another_kind(index, config: Config, mv) -> None:
    """Said every night while ``[index] kind`` names another explicit kind than the index's."""
    from recsys.index.faiss_index import AUTO

    if config.index.kind not in (AUTO, index.kind):
        log.warning("the index of model version %s is %s, [index] kind is now %r: `recsys index build --model %s` "
                    "builds it so", mv.version, index.kind, config.index.kind, mv.version)


def maintain_index(index) -> dict:
    """Compact an approximate index with too many tombstones and re-tune its search breadth
    (``COMPACT_TOMBSTONE_SHARE``, ``RECALIBRATE_GROWTH``); returns what it did (empty: nothing)."""
    done = {}
    if index.num_tombstones > COMPACT_TOMBSTONE_SHARE * len(index):
        done["index_compacted"] = index.num_tombstones
        t0 = time.perf_counter()
        index.compact()
        log.info("index compacted: %d tombstones dropped in %.1f s", done["index_compacted"], time.perf_counter() - t0)
    calibration = index.calibration
    grown = calibration is not None and len(index) > RECALIBRATE_GROWTH * calibration.get("num_items", 0)
    # Never calibrated: built with calibration turned off (target_recall None), left so.
    if index.kind != "flat" and len(index) and calibration is not None and (done or grown):
        # The recorded target, and a breadth set by hand (tuned False) only measured, not changed.
        record = index.calibrate(target_recall=calibration["target_recall"], tune=calibration["tuned"])
        done["index_calibrated"] = {record["param"]: record["value"], "recall": record["recall"]}
    return done


def run_nightly_job(
    engine: Engine, workspace: Workspace, config: Config, *, news: Path | None = None, behaviors: Path | None = None,
    images: Path | None = None, source: str | None = None, export: Path | None = None, rerank: bool = False,
) -> dict:
    """Ingest the given files, refresh the index, rank every active user (docs/operations.md).

    ``rerank``: see ``run_nightly``; a night already ranked on the same inputs is otherwise
    returned as it is (and exported again with ``export``).

    Raises:
        RunLockedError: another nightly job holds the lock; nothing is ingested or indexed.
    """
    check_nightly_inputs(news=news, behaviors=behaviors, images=images, source=source)
    if export is not None:  # found now, not after the night's ranking
        check_output_folder("--export", export)
        try:  # a writable-looking parent can still refuse the folder (a root job, a special or full file system)
            Path(export).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RecsysError(f"--export {export}: cannot create the folder ({exc.strerror or exc})") from exc
    _check_workspace_writable(engine, workspace)
    _check_encoders(engine, workspace, config, ingesting=news is not None or behaviors is not None)
    from recsys.ranking.nightly import worker_url

    worker_url(engine)  # StoreError for an in-memory store, which the helper and workers cannot open
    if config.nightly.engine != "ray" and config.nightly.ray_address:
        # A config file's cluster with `--engine local` (say, while the cluster is down) is fine;
        # said, so that a job meant for the cluster is not taken to have run there.
        log.warning("nightly.ray_address %r is not used: the engine is %r, so this machine ranks (nightly.engine = "
                    "\"ray\" or --engine ray ranks on the cluster)", config.nightly.ray_address, config.nightly.engine)
    if config.nightly.engine == "ray" and config.nightly.ray_address:
        from recsys.ranking.engines import check_ray_reachable

        # Now, not after the ingest and the index refresh; the ranking checks again before ray.init.
        check_ray_reachable(config.nightly.ray_address)
    # This process ingests and drives the ranking; TensorFlow runs in its helper and workers.
    configure_threads(config.runtime.threads or None, tensorflow=False)
    # The lock covers the ingest and the index too: a run started while the previous night's
    # still ranks must not change the store or swap the index under it.
    with acquire_lock(engine, NIGHTLY_LOCK) as lock:
        return _nightly_job(
            engine, workspace, config, lock, news=news, behaviors=behaviors, images=images, source=source, export=export,
            rerank=rerank,
        )


def check_nightly_inputs(*, news: Path | None, behaviors: Path | None, images: Path | None,
                         source: str | None) -> None:
    """Raises RecsysError for ``images`` or ``source`` without the file they go with. The command
    line runs it before it opens the store; ``run_nightly_job`` again, for callers in Python."""
    if news is None and behaviors is None and (images is not None or source is not None):
        raise RecsysError("nightly --images and --source go with --news and/or --behaviors (the files to ingest)")
    check_images_go_with_news("nightly", news, images)
    check_source_goes_with_behaviors("nightly", behaviors, source)


def _check_workspace_writable(engine: Engine, workspace: Workspace) -> None:
    """Raises RecsysError when a folder the night writes into (the feature cache, the current
    version's index, the quarantine) cannot be written (permissions, a read-only mount): found
    now, not after the night's files are ingested."""
    folders = [workspace.root, workspace.features_dir, workspace.models_dir, workspace.quarantine_dir]
    try:
        folders.append(get_version(engine, models_dir=workspace.models_dir).path)
    except NotFoundError:
        pass  # no model yet: the job says so after the ingest
    for folder in folders:
        if folder.is_dir():
            check_writable("--workspace", workspace.root, folder)


def _check_encoders(engine: Engine, workspace: Workspace, config: Config, *, ingesting: bool) -> None:
    """Raises ConfigError (a missing or unusable model file) or ModelMismatchError (encoders other
    than the current version's) when ``[encoders]`` cannot give the night's features: found now,
    not by the index refresh after the night's files are ingested.

    Without TensorFlow: a custom image model's file is checked, its identity by the refresh.
    """
    from recsys.pipelines.features import configured_encoder_infos

    try:
        text, image = configured_encoder_infos(config, load_image_model=False)
    except ConfigError as exc:
        raise ConfigError(f"[encoders] cannot be used{', nothing was ingested' if ingesting else ''}: {exc}") from exc
    try:
        mv = get_version(engine, models_dir=workspace.models_dir)
    except NotFoundError:
        return  # no model yet: the job says so after the ingest
    check_encoders(mv, text, image)


def _nightly_job(
    engine: Engine, workspace: Workspace, config: Config, lock: StoreLock, *, news, behaviors, images, source, export,
    rerank: bool,
) -> dict:
    from recsys.pipelines.ingest import run_ingest

    summary: dict = {"timings": {}}
    if news is not None or behaviors is not None:
        t0 = time.perf_counter()
        try:
            summary["ingest"] = run_ingest(
                engine, workspace, news=news, behaviors=behaviors, images=images, source=source, lock=lock,
                max_bad_share=config.ingest.max_bad_share,
            )
        except StoreUnavailableError:
            # Not the files' fault (exit 3 says "fix the input files"), and a store that just dropped
            # the connection is no place to rank: the retry ingests them again and ranks (exit 1).
            raise
        except RecsysError as exc:
            # The rules of ingest hold (nothing half-written); the existing data is still scored.
            log.error("ingest failed, scoring the data already stored: %s", exc)
            summary["ingest"] = {"error": str(exc)}
        summary["timings"]["ingest_s"] = round(time.perf_counter() - t0, 2)
    try:
        return _index_and_rank(engine, workspace, config, lock, summary, export=export, rerank=rerank)
    except BaseException:
        # The ingest is committed and stays: the summary that would have told so is never
        # printed (no model version yet, a failed refresh or ranking, Ctrl-C), so the log does.
        ingested = summary.get("ingest")
        if ingested is not None and "error" not in ingested:
            if "run" in summary:  # stopped after the ranking (in the export): the run is served too
                log.error("the night stopped after its run %s was complete and served; its ingest is stored too: %s",
                          summary["run"]["run_id"], json.dumps(ingested, default=str))
            else:
                log.error("the night stopped after its ingest, which is stored and stays: %s",
                          json.dumps(ingested, default=str))
        raise


def _index_and_rank(engine: Engine, workspace: Workspace, config: Config, lock: StoreLock, summary: dict, *, export,
                    rerank: bool) -> dict:
    from recsys.ranking.nightly import run_nightly

    nc = config.nightly
    mv = get_version(engine, models_dir=workspace.models_dir)
    t0 = time.perf_counter()
    if index_is_current(engine, mv, config):
        # A retried night, or one whose files brought no article: nothing to encode or embed.
        log.info("the index of model version %s holds the store's articles as they are now: not refreshed", mv.version)
        summary["index"] = {"index_added": 0, "index_updated": 0, "index_republished": 0}
    else:
        summary["index"] = refresh_index_apart(engine, workspace, config, mv, lock=lock)
    summary["timings"]["encode_and_index_s"] = round(time.perf_counter() - t0, 2)
    summary["run"] = run_nightly(
        engine, model_dir=mv.model_dir, index_dir=mv.index_dir, model_version=mv.version, engine_name=nc.engine,
        shard_size=nc.shard_size, k=nc.k, num_candidates=nc.num_candidates, active_days=nc.active_days,
        freshness_days=nc.freshness_days, keep_runs=nc.keep_runs, num_workers=nc.workers,
        num_threads=config.runtime.threads or None,
        ray_address=nc.ray_address or None, lock=lock, progress=progress, rerank=rerank,
    )
    if export is not None:
        from recsys.ranking.export import export_run

        run_id = summary["run"]["run_id"]
        try:
            summary["export"] = str(export_run(engine, Path(export), run_id=run_id))
        except (OSError, RecsysError, *STORE_FAILURES) as exc:
            # A full disk, a folder in the file's place (export_run's RecsysError), or a store
            # that cannot be read (a lost connection, a locked SQLite file): the run itself is
            # complete and served. Recorded, not raised: the summary
            # (counts, pruned runs) is still printed; the command then exits 1.
            log.error("export failed: %s", exc)
            summary["export"] = {"error": f"--export {export}: run {run_id} completed, but its export failed ({exc}); "
                                          f"once the cause is fixed, `recsys export --run {run_id} --out DIR` writes it"}
    return summary
