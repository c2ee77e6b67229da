"""`recsys train`: impressions of a time window -> CTR model version (marked current)."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict
from datetime import datetime, timedelta, timezone

import numpy as np
from sqlalchemy import Engine

from recsys.clock import utc_now
from recsys.config import Config, Workspace
from recsys.encoders.item_features import ItemFeatures
from recsys.errors import DiskError, RecsysError, disk_error
from recsys.data.interactions import ClickLog, Impressions, InteractionLog, without_later_clicks
from recsys.models.affinity import SkippedArticles
from recsys.models.side_features import SideFeatures
from recsys.pipelines.features import first_seen_array, item_key_codes, load_catalogue
from recsys.pipelines.inputs import check_output_folder
from recsys.pipelines.runlog import ingest_marks, ingests_since, last_run, recorded_run, running_runs
from recsys.store import repository as repo
from recsys.threads import configure_threads
from recsys.versions import new_version_name, publish_version, staging_dir

log = logging.getLogger("recsys.train")

# Below this floor the validation AUC (which picks the epoch and is published with the version)
# is warned about: it is the mean over few impressions. MIND's days hold tens of thousands. Not a
# share of the window: how steady a mean is depends on how many impressions it averages, and a
# log that keeps impressions without a click (MIND drops them) would be warned about every time.
MIN_SCOREABLE_IMPRESSIONS = 30


def parse_time(value: str | None, flag: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise RecsysError(f"{flag} {value!r} is not a date or datetime, expected ISO format like 2019-11-14 or 2019-11-14T09:00") from exc
    if parsed.tzinfo is None:
        return parsed
    # The store keeps naive UTC times; an offset ("...Z", "+01:00") is honoured, not compared naive-to-aware.
    try:
        return parsed.astimezone(timezone.utc).replace(tzinfo=None)
    except OverflowError as exc:  # 0001-01-01T00:00+01:00 is in year 0 in UTC
        raise RecsysError(
            f"{flag} {value!r} is outside the calendar in UTC, expected a time from {datetime.min} to {datetime.max} UTC"
        ) from exc


def train_window(engine: Engine, since: datetime | None, until: datetime | None, valid_days: float, source: str | None = None):
    """(since, validation start, until) of a training run; the default ends after the last
    labelled impression (of ``source``), so an unlabelled test file in the store cannot
    become the validation window.

    Raises:
        RecsysError: no labelled impression, an empty window or one not longer than
            ``valid_days``; the message says which bound is a default and which days the store holds.
    """
    lo, hi = repo.time_range(engine, source=source, labelled_only=True)
    of = _of_source(source)
    if lo is None:
        others = repo.labelled_sources(engine) if source is not None else []
        if others:  # a mistyped --source, or one of an unlabelled test file
            shown = ", ".join(map(repr, others[:10])) + (f" and {len(others) - 10} more" if len(others) > 10 else "")
            raise RecsysError(f"the store holds no labelled impressions{of}: --source takes one of {shown} "
                              f"(the {len(others)} sources with labelled impressions)")
        raise RecsysError(f"the store holds no labelled impressions{of}: run `recsys ingest --behaviors behaviors.tsv` first")
    # A default bound is not what the user typed: said as such, or "--until 2019-11-13 23:47:13"
    # reads like a typo of a flag never given.
    start = (f"--since {since}" if since is not None
             else f"the default start {lo} (the first labelled impression{of}; no --since given)")
    end = (f"--until {until}" if until is not None
           else f"the default end {hi + timedelta(seconds=1)} (1 s after the last labelled impression{of}; no --until given)")
    since = lo if since is None else since
    until = hi + timedelta(seconds=1) if until is None else until
    stored = _stored_days(lo, hi, source)
    if until <= since:
        raise RecsysError(f"training window is empty: {start} is not before {end}; {stored}: move the window onto them")
    # Compared as a length: ``until - valid_days`` may fall before the calendar's first day.
    if until - since <= timedelta(days=valid_days):
        raise RecsysError(
            f"training window {start} .. {end} is not longer than the validation window "
            f"(model.valid_days = {valid_days}); widen the window ({stored}) or lower model.valid_days"
        )
    return since, until - timedelta(days=valid_days), until


def _of_source(source: str | None) -> str:
    return f" of source {source!r}" if source is not None else ""


def _stored_days(lo: datetime, hi: datetime, source: str | None) -> str:
    return f"the store's labelled impressions{_of_source(source)} run from {lo} to {hi}"


def check_window_labels(engine: Engine, since: datetime, valid_start: datetime, until: datetime, *,
                        source: str | None) -> None:
    """``read_windows``' label checks, asked of the store with EXISTS queries: ``run_train`` calls
    it before it encodes the catalogue (minutes at MIND size), so that a window it would refuse
    after the reads is refused at once, with the same message.

    Raises:
        RecsysError / NoTrainingClicksError / NoTrainingNonClicksError / NoValidationAUCError:
            as ``read_windows``.
    """
    from recsys.models.training import unscoreable_reason

    parts = {"training": (since, valid_start, ("labelled", "clicked", "skipped")),
             "validation": (valid_start, until, ("labelled", "scoreable"))}
    found = {name: repo.window_labels(engine, since=lo, until=hi, source=source, asks=asks)
             for name, (lo, hi, asks) in parts.items()}
    for name, answers in found.items():
        if not answers["labelled"]:
            raise _empty_window(engine, name, since, valid_start, until, source)
    # The counts in the messages are read only on the way out: a sum over the whole window.
    if not found["training"]["clicked"]:
        raise _no_training_click(since, valid_start, repo.window_label_counts(engine, since=since, until=valid_start,
                                                                              source=source)[1])
    if not found["training"]["skipped"]:
        raise _no_training_non_click(since, valid_start, repo.window_label_counts(engine, since=since, until=valid_start,
                                                                                  source=source)[0])
    if not found["validation"]["scoreable"]:
        counts = repo.window_label_counts(engine, since=valid_start, until=until, source=source)
        raise _no_validation_auc(valid_start, until, unscoreable_reason(*counts))


def read_windows(
    engine: Engine, news_ids: np.ndarray, since: datetime, valid_start: datetime, until: datetime, *,
    source: str | None, history_len: int,
) -> tuple[Impressions, Impressions, ClickLog]:
    """The labelled training and validation impressions, with the histories they may read,
    and every logged click of the store.

    The store keeps each user's latest History column; a file ingested after these impressions
    (MIND-large's test file, a daily feed) lists clicks of the window in it, the impressions'
    own clicks among them. Those are removed (``interactions.without_later_clicks``). The click log
    also serves ``model.logged_clicks``: clicks after the window are never "before" one of its
    impressions, so the whole log leads the histories exactly as the window's part would.

    The labels are checked again on the rows read (``check_window_labels`` asked before): an
    ingest committing in between, or a caller that did not ask, must not train on a bad window.

    Raises:
        RecsysError: a window holds no labelled impression.
        NoTrainingClicksError: the training window holds no click.
        NoTrainingNonClicksError: the training window holds no non-click.
        NoValidationAUCError: the validation window has no impression with both a click and a
            non-click (its AUC, which early stopping follows, is undefined).
    """
    from recsys.models.training import unscoreable_labels

    read = dict(source=source, history_len=history_len, labelled_only=True)
    train = repo.read_impressions(engine, news_ids, since=since, until=valid_start, **read)
    valid = repo.read_impressions(engine, news_ids, since=valid_start, until=until, **read)
    for name, imps in (("training", train), ("validation", valid)):
        if len(imps) == 0:
            raise _empty_window(engine, name, since, valid_start, until, source)
    if not (train.labels == 1).any():
        raise _no_training_click(since, valid_start, int((train.labels == 0).sum()))
    if not (train.labels == 0).any():
        raise _no_training_non_click(since, valid_start, int((train.labels == 1).sum()))
    problem = unscoreable_labels(valid)
    if problem is not None:
        raise _no_validation_auc(valid_start, until, problem)
    every_click = repo.read_click_log(engine, news_ids)
    return without_later_clicks(train, every_click), without_later_clicks(valid, every_click), every_click


def _empty_window(engine: Engine, name: str, since: datetime, valid_start: datetime, until: datetime,
                  source: str | None) -> RecsysError:
    lo, hi = repo.time_range(engine, source=source, labelled_only=True)
    stored = _stored_days(lo, hi, source) if lo is not None else "the store holds none"
    return RecsysError(
        f"the {name} window holds no labelled impressions ({since} .. {valid_start} .. {until}); "
        f"move the window (--since, --until, model.valid_days) onto days of ingested behaviors ({stored})"
    )


def _no_training_non_click(since: datetime, valid_start: datetime, clicks: int) -> RecsysError:
    from recsys.models.training import NoTrainingNonClicksError

    return NoTrainingNonClicksError(
        f"the training window {since} .. {valid_start} holds no non-click (all {clicks} labelled candidates are 1): "
        "a model trained on it could not tell a clicked candidate from a skipped one; check the ingested behaviors' "
        "labels (a log of clicks alone?) or move the window (--since, --until, model.valid_days)"
    )


def _no_training_click(since: datetime, valid_start: datetime, non_clicks: int) -> RecsysError:
    from recsys.models.training import NoTrainingClicksError

    return NoTrainingClicksError(
        f"the training window {since} .. {valid_start} holds no click (all {non_clicks} labelled candidates are 0): "
        "a model trained on it would rank by its content prior alone; move the window (--since, --until, "
        "model.valid_days) onto days with clicks, or check the ingested behaviors' labels"
    )


def _no_validation_auc(valid_start: datetime, until: datetime, problem: str) -> RecsysError:
    from recsys.models.training import NoValidationAUCError

    return NoValidationAUCError(
        f"the validation window {valid_start} .. {until} {problem}, so its per-impression AUC, which early "
        "stopping follows, is undefined; widen it (--until, model.valid_days) or ingest more behaviors"
    )


def warn_thin_validation(valid: Impressions, valid_start: datetime, until: datetime) -> int:
    """The validation window's scoreable impressions; a warning when the AUC rests on fewer than
    ``MIN_SCOREABLE_IMPRESSIONS`` of them."""
    from recsys.models.training import scoreable_impressions

    scoreable = scoreable_impressions(valid)
    if scoreable < MIN_SCOREABLE_IMPRESSIONS:
        log.warning("the validation AUC rests on %d impression%s (of %d in the validation window %s .. %s, only those "
                    "with both a click and a non-click count): it picks the epoch and is published with the version, "
                    "so treat it as rough; widen the validation window (model.valid_days, --until) for a steadier one",
                    scoreable, "" if scoreable == 1 else "s", len(valid), valid_start, until)
    return scoreable


def read_training_log(
    engine: Engine, news_ids: np.ndarray, since: datetime, until: datetime, *, window_hours: float,
    feature_clock_hours: float,
) -> InteractionLog:
    """The popularity log that the side features of a training window ``[since, until)`` can count.

    Each impression counts one popularity window before its feature time, which the feature
    clock (``model.feature_clock_hours``) moves back by less than one period; nothing earlier
    counts, so a store that holds months is not read whole.
    """
    lookback = timedelta(hours=window_hours + feature_clock_hours)
    start = since - lookback if since - datetime.min > lookback else datetime.min  # nothing is older
    return repo.read_interaction_log(engine, news_ids, since=start, until=until)


def run_train(
    engine: Engine, workspace: Workspace, config: Config, *, since: str | None = None, until: str | None = None,
    source: str | None = None, make_current: bool = True, exact_modalities: bool = False,
) -> dict:
    """Train on the window, validate on its last ``model.valid_days``, publish a version.

    Unless ``exact_modalities`` (an ablation, or ``--modalities`` given), a model without the
    modalities whose content says nothing about these clicks is trained as well and the better
    on validation is kept (``without_silent_modalities``; the manifest records
    ``modalities_requested``, ``history.modalities_tried`` and ``history.requested_anchor_similarity_auc``).
    """
    from recsys.models.training import train_ctr

    configure_threads(config.runtime.threads or None)
    mc = config.model
    timings = {}
    # The window first: a bad flag, an empty store or a window without the labels training
    # needs fails before the catalogue is encoded.
    since_dt, valid_start, until_dt = train_window(
        engine, parse_time(since, "--since"), parse_time(until, "--until"), mc.valid_days, source
    )
    # Train takes no lock, and an ingest commits batch by batch: training now would read part
    # of its file. Said before the catalogue's encoding (minutes), and again after the reads.
    ingesting = running_runs(engine, "ingest")
    for run_id, holder, started in ingesting:
        log.warning("ingest run %d (%s, started %s UTC) is still running: this training reads only the batches it "
                    "has committed so far; train again after it ends to learn from the whole file", run_id, holder, started)
    check_window_labels(engine, since_dt, valid_start, until_dt, source=source)
    # The folders it writes: a file in the way or a read-only mount found now, not at the save
    # after the whole catalogue is encoded and trained on.
    for folder in (workspace.features_dir, workspace.models_dir):
        check_output_folder("--workspace", folder)
    t0 = time.perf_counter()
    news, features = load_catalogue(engine, workspace, config)
    timings["encode_s"] = round(time.perf_counter() - t0, 2)
    if "image" in mc.modalities.split(",") and not features.has_image.any():
        log.warning("no article in the store has a usable cover (the MIND download ships none): the image input reads "
                    "only its placeholder; `--modalities text` trains the same model without it")
    t0 = time.perf_counter()
    # Minutes at MIND-large size with nothing else said (11 at 1.2M impressions on a busy machine).
    log.info("reading the impressions of %s .. %s from the store", since_dt, until_dt)
    marks = ingest_marks(engine)
    train, valid, every_click = read_windows(
        engine, features.news_ids, since_dt, valid_start, until_dt, source=source, history_len=mc.history_len
    )
    window_hours = SideFeatures().window_hours
    events = read_training_log(engine, features.news_ids, since_dt, until_dt, window_hours=window_hours,
                               feature_clock_hours=mc.feature_clock_hours)
    partial_ingests = _warn_of_partial_ingests(engine, marks, warned=[run_id for run_id, _, _ in ingesting])
    clicks = every_click if mc.logged_clicks else None
    first_seen = first_seen_array(news)
    skips, item_codes = None, None
    if mc.category_affinity:
        # The skips a later day is served with: the store's before the validation window, of its users.
        item_codes = item_key_codes(news)
        users = np.unique(valid.user_ids)
        skips = SkippedArticles(users, *repo.read_skipped(engine, users, features.news_ids, until=valid_start))
    timings["read_s"] = round(time.perf_counter() - t0, 2)
    scoreable = warn_thin_validation(valid, valid_start, until_dt)
    log.info("training on %d impressions, validating on %d (%s .. %s .. %s)", len(train), len(valid), since_dt, valid_start, until_dt)

    version = new_version_name()
    with recorded_run(engine, "train", model_version=version) as record:
        t0 = time.perf_counter()

        def train_with(modalities: str):
            return train_ctr(
                features, train, valid, events, modalities=modalities, fusion=mc.fusion, embedding_dim=mc.embedding_dim,
                anchor_dim=mc.anchor_dim,
                history_len=mc.history_len, epochs=mc.epochs, batch_size=mc.batch_size, learning_rate=mc.learning_rate,
                seed=mc.seed, first_seen=first_seen, clicks=clicks, content_prior=mc.content_prior,
                feature_clock_hours=mc.feature_clock_hours, refit=mc.refit, window_hours=window_hours,
                skips=skips, item_codes=item_codes, affinity_clusters=mc.affinity_clusters,
                weight_average=mc.weight_average, progress=_log_epoch,
            )

        modalities = mc.modalities
        model, history = train_with(modalities)
        without = None if exact_modalities else without_silent_modalities(
            modalities, history.get("silent_modalities", []), bool(features.has_image.any()))
        tried, requested_aucs = {modalities: _served_val_auc(history)}, history.get("anchor_similarity_auc", {})
        if without is not None:
            log.warning("the %s features' similarity to the readers' histories does not rank the training clicks "
                        "(per-impression AUC %s): training a model on %s as well, the better on validation is kept",
                        "/".join(m for m in modalities.split(",") if m not in without.split(",")) or modalities,
                        history["anchor_similarity_auc"], without)
            other_model, other_history = train_with(without)
            tried[without] = _served_val_auc(other_history)
            if tried[without] > tried[modalities]:
                model, history, modalities = other_model, other_history, without
            log.warning("kept the %s model (validation AUC %s)", modalities, tried)
        history.update(modalities_tried=tried, requested_anchor_similarity_auc=requested_aucs)
        timings["train_s"] = round(time.perf_counter() - t0, 2)
        staged = staging_dir(workspace.models_dir, version)
        try:
            model.save(staged / "model")
        except DiskError as exc:  # it names the staging folder; the user knows the models folder
            raise disk_error(f"save the model version {version} in", workspace.models_dir, exc.__cause__) or exc from exc
        manifest = {
            "version": version,
            "created_at": utc_now().isoformat(),
            "text_encoder": features.text_encoder.to_dict(),
            "image_encoder": features.image_encoder.to_dict(),
            "embedding_dim": mc.embedding_dim,
            "anchor_dim": mc.anchor_dim,
            "modalities": modalities,
            "modalities_requested": mc.modalities,
            "fusion": mc.fusion,
            "seed": mc.seed,
            "logged_clicks": mc.logged_clicks,
            "feature_clock_hours": mc.feature_clock_hours,
            "refit": mc.refit,
            "model_config": {**asdict(mc), "modalities": modalities},  # every setting, so that ablations can be trained alike
            "content_prior_weights": list(model.config.prior_weights),
            "content_prior_moment_weights": list(model.config.moment_weights),
            "serving_dim": model.config.serving_dim,
            "user_dim": model.config.user_dim,
            "training_window": {"since": since_dt.isoformat(), "valid_start": valid_start.isoformat(), "until": until_dt.isoformat(), "source": source},
            "data": _counts(train, valid, features, valid_scoreable=scoreable),
            "metrics": _final_metrics(history),
            "history": history,
            "timings": timings,
            "host": platform.node(),
            **partial_ingests,
        }
        mv = publish_version(engine, workspace.models_dir, version, staged, manifest, make_current=make_current)
        record["counts"] = manifest["data"]
        record["timings"] = timings
    return {"version": mv.version, "path": str(mv.path), "current": make_current, "metrics": manifest["metrics"], "data": manifest["data"], "timings": timings,
            **partial_ingests}


def _warn_of_partial_ingests(engine: Engine, marks: tuple[list[int], int], *, warned: list[int]) -> dict:
    """What the reads just done may hold of an ingest's file only in part, said on the log and
    returned for the manifest.

    The reads are several statements, not one snapshot, and an ingest commits batch by batch:
    one that ran at any moment of them (running when ``marks`` were taken, ``ingest_marks``,
    or started after) gave this training part of its file. One that failed before the end of
    its files (killed, a full disk) left part of them in the store for every later reader; one
    refused after reading them whole (``ingest.max_bad_share``) left their good lines.

    Returns:
        ``ingest_runs_running_at_read``: the ingest runs that ran during the reads;
        ``last_ingest_unfinished``: the latest ingest run when it did not complete and no
        longer runs, else None.
    """
    during = ingests_since(engine, marks)
    for run_id, holder, started in during:
        if run_id not in warned:  # (the early warning named those running before the encoding)
            log.warning("ingest run %d (%s, started %s UTC) wrote to the store while this training read it: the "
                        "training read only part of its file; train again after it ends to learn from the whole file",
                        run_id, holder, started)
    last = last_run(engine, "ingest")
    unfinished = None
    if last is not None and last[1] not in ("complete", "running"):
        run_id, status, message, counts = last
        unfinished = run_id
        why = next(iter((message or "").splitlines()), "no message recorded")
        if counts:  # recorded once its files were read whole: refused for its bad lines
            log.warning("the latest ingest, run %d, %s after reading its files whole (%s): the store holds their good "
                        "lines, not the quarantined ones", run_id, status, why)
        else:
            log.warning("the latest ingest, run %d, did not complete (%s: %s): the store holds the batches it "
                        "committed before it stopped, part of its file; ingest that file again (it is safe to) and "
                        "train after it", run_id, status, why)
    return {"ingest_runs_running_at_read": [run_id for run_id, _, _ in during], "last_ingest_unfinished": unfinished}


def _counts(train: Impressions, valid: Impressions, features: ItemFeatures, *, valid_scoreable: int) -> dict:
    return {
        "train_impressions": len(train),
        "train_samples": int(len(train.candidate_items)),
        "valid_impressions": len(valid),
        "valid_scoreable_impressions": valid_scoreable,  # what val_auc averages over
        "valid_samples": int(len(valid.candidate_items)),
        "items": len(features),
        "items_with_image": int(features.has_image.sum()),
    }


def without_silent_modalities(modalities: str, silent: list[str], any_cover: bool) -> str | None:
    """The modalities to train as well when some of ``modalities`` say nothing about these clicks
    (``silent``: the training's ``history["silent_modalities"]``, whose anchor blocks started
    weak), or None. Titles of random words (a generated world) or covers of noise make the
    learned fusion drown the category and popularity; the model without them is tried, and
    validation decides. A store without covers has a zero image block, not a silent one. With
    nothing left (silent text and no cover at all) it is "image": without covers that model
    reads the category, popularity and age alone."""
    used = modalities.split(",")
    silent = [m for m in used if m in silent and (m != "image" or any_cover)]
    if not silent:
        return None
    kept = [m for m in used if m not in silent and (m != "image" or any_cover)]
    if not kept:
        kept = ["image"] if not any_cover else []
    without = ",".join(kept)
    return without if without and without != modalities else None


def _served_val_auc(history: dict) -> float:
    auc = history.get("served_val_auc", history.get("best_val_auc"))
    return float(auc) if auc is not None and np.isfinite(auc) else -np.inf


def _final_metrics(history: dict) -> dict:
    """Validation metrics of the served model: the kept epoch, with the content prior if fitted.

    ``val_auc`` and ``val_log_loss`` are the served model's (networks, prior and calibration,
    without the file's exposure); ``val_auc_networks`` and ``val_log_loss_networks`` the kept
    epoch's networks alone; ``category_affinity`` and ``file_exposure`` the weights fitted on top
    (``training._fit_affinity``, ``training._fit_file_exposure``), if any.
    """
    best = history.get("best_epoch")
    out = {"best_epoch": best, "val_auc": history.get("served_val_auc", history.get("best_val_auc")),
           "val_auc_networks": history.get("best_val_auc"), "content_prior_weights": history.get("prior_weights", []),
           "content_prior_moment_weights": history.get("moment_weights", [])}
    if best and history.get("val_log_loss"):  # epochs count from 1
        out["val_log_loss_networks"] = history["val_log_loss"][best - 1]
        out["val_log_loss"] = history.get("served_val_log_loss", out["val_log_loss_networks"])
    for fitted in ("category_affinity", "file_exposure"):
        if history.get(fitted):
            out[fitted] = history[fitted]
    if history.get("refit"):  # the served networks are the refit's; the figures above are the first training's
        from recsys.models.training import REFIT_SUMMARY  # loaded with train_ctr already: no start-up cost

        out["refit"] = {k: history["refit"][k] for k in REFIT_SUMMARY}
    return out


def _log_epoch(info: dict) -> None:
    shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
    log.info("epoch: %s", shown)
