"""`recsys predict`: a MIND behaviors file -> the MIND competition prediction file."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from sqlalchemy import Engine

from recsys.config import Config, Workspace
from recsys.data.mind import scan_behaviors
from recsys.errors import RecsysError
from recsys.pipelines.inputs import check_file, check_folder, check_images_go_with_news, check_writable
from recsys.progress import progress
from recsys.pipelines.scoring import (
    IGNORED_HISTORY, VersionScorer, DEFAULT_FEATURES_AT, check_features_at, describe_reading, feature_times, iter_scored,
    load_scoring_catalogue, read_file_shows, scoring_span,
)
from recsys.store.database import sqlite_file
from recsys.threads import configure_threads
from recsys.versions import get_version

log = logging.getLogger("recsys.predict")


def split_scores(offsets: np.ndarray, scores: np.ndarray):
    return (scores[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1))


def check_out(out: Path, inputs: dict[str, Path | str | None] | None = None) -> None:
    """Raises RecsysError when the prediction file cannot go to ``out``: found before any
    scoring, not when the last impression is done (the file is renamed into place at the end).

    ``inputs`` (option or role -> path) are files ``out`` must not be: the prediction would
    replace them (a typo such as ``--out MINDsmall_dev/behaviors.tsv`` destroyed the file).
    """
    if out.is_dir():
        raise RecsysError(f"--out {out}: is a folder; give the prediction file's path")
    for name, path in (inputs or {}).items():
        if path is not None and out.exists() and Path(path).exists() and out.samefile(path):
            raise RecsysError(f"--out {out}: is the {name} file {path}; the prediction would replace it")
    if not out.parent.is_dir():
        what = "is not a folder" if out.parent.exists() else "does not exist"
        raise RecsysError(f"--out {out}: folder {out.parent} {what}")
    check_writable("--out", out, out.parent)


def run_predict(
    engine: Engine, workspace: Workspace, config: Config, *, behaviors: Path, out: Path, version: str | None = None,
    news: Path | None = None, images: Path | None = None, features_at: str = DEFAULT_FEATURES_AT,
    file_exposure: bool = True,
) -> dict:
    """Write ``ImpressionID [r1,r2,...]`` for every impression of ``behaviors``, in file order.

    ``features_at``: one of ``FEATURES_AT`` (recsys.pipelines.scoring). ``file_exposure``:
    score impressions after the store's end with the file's earlier shows of each candidate
    (``read_file_shows``) through the version's file-exposure calibration.
    """
    from recsys.evaluation.prediction_file import write_predictions

    check_file("--behaviors", behaviors)
    check_images_go_with_news("predict", news, images)
    for option, path, check in (("--news", news, check_file), ("--images", images, check_folder)):
        if path is not None:
            check(option, path)
    check_out(Path(out), {"--behaviors": behaviors, "--news": news, "store": sqlite_file(engine.url)})
    check_features_at(features_at)
    configure_threads(config.runtime.threads or None)
    t0 = time.perf_counter()
    mv = get_version(engine, version, models_dir=workspace.models_dir)
    scan = scan_behaviors(behaviors)
    span = scoring_span(scan, [mv])
    catalogue = load_scoring_catalogue(engine, workspace, config, news=news, images=images, span=span, versions=[mv])
    times = feature_times(catalogue, features_at)
    shows = read_file_shows(Path(behaviors), catalogue) if file_exposure else None
    scorer = VersionScorer(mv, catalogue, times=times, shows=shows)
    reading = describe_reading(times, {mv.version: scorer}, file_exposure)
    counts = {"impressions": 0, "candidates": 0, IGNORED_HISTORY: 0}

    def rows(advance):
        for chunk in iter_scored(Path(behaviors), catalogue, {mv.version: scorer}, tally=counts):
            imps = chunk.impressions
            counts["impressions"] += len(imps)
            counts["candidates"] += len(imps.candidate_items)
            yield from zip(imps.impression_ids.tolist(), split_scores(imps.candidate_offsets, chunk.scores[mv.version]))
            advance(len(imps))

    # MIND-large's test file is minutes of scoring: a line every 10 s says how far it got.
    with progress("scoring impressions", total=scan.lines or None) as advance:
        write_predictions(Path(out), rows(advance))
    warning = {}
    if counts["impressions"] == 0:  # valid (an empty prediction file), but most likely a broken upstream step
        warning = {"warning": f"{behaviors} has no impression: the prediction file {out} is empty"}
        log.warning(warning["warning"])
    return {"version": mv.version, "out": str(out), **counts, "side_features_at": reading,
            "seconds": round(time.perf_counter() - t0, 2), **warning}
