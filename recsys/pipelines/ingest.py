"""`recsys ingest`: validate MIND files into the store, bad rows to quarantine."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from sqlalchemy import Engine

from recsys.config import Workspace
from recsys.pipelines.inputs import check_file, check_folder
from recsys.pipelines.runlog import recorded_run
from recsys.progress import progress

log = logging.getLogger("recsys.ingest")


def run_ingest(
    engine: Engine,
    workspace: Workspace,
    *,
    news: Path | None,
    behaviors: Path | None,
    images: Path | None,
    source: str | None = None,
    strict: bool = False,
) -> dict:
    """Ingest and return the report as a plain dict (counts, bad rows, quarantine file)."""
    from recsys.store.ingest import ingest

    for label, path in (("--news", news), ("--behaviors", behaviors)):
        if path is not None:
            check_file(label, path)  # not a pipe either: bad rows are recorded by the file's path
    if images is not None:
        check_folder("--images", images)
    workspace.quarantine_dir.mkdir(parents=True, exist_ok=True)
    with recorded_run(engine, "ingest") as record, progress("ingesting") as advance:
        report = ingest(
            engine, news_path=news, behaviors_path=behaviors, images_dir=images, source=source,
            strict=strict, quarantine_dir=workspace.quarantine_dir, progress=advance,
        )
        summary = dataclasses.asdict(report) if dataclasses.is_dataclass(report) else dict(report)
        record["counts"] = {k: v for k, v in summary.items() if isinstance(v, int)}
    bad = summary.get("num_bad_rows", 0)
    if bad:
        log.warning("%d bad rows quarantined in %s", bad, summary.get("quarantine_file"))
    return summary
