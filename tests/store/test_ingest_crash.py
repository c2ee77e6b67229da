"""kill -9 in the middle of an ingest, then a rerun: the store equals one clean run's."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from recsys.store.ingest import ingest

from .conftest import T0
from .mind_files import behavior_line, dump_store, news_line, wipe_store, write_lines

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BATCH = 20
NUM_NEWS, NUM_IMPRESSIONS = 60, 640
NEWS_BATCHES = NUM_NEWS // BATCH + 1  # the news file has one bad line too

# The child ingests with a progress line per committed batch. In "in-transaction" mode it
# kills itself right after the batch's writes and before its commit (batch number KILL_AT,
# counting news batches first).
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import recsys.store.ingest as ingest_module
    from recsys.store.database import open_store

    url, news, behaviors, quarantine, mode, kill_at, batch = sys.argv[1:8]
    if mode == "in-transaction":
        calls = 0
        original = ingest_module._Job._write_quarantine

        def write_then_die(self, rows):
            global calls
            original(self, rows)
            calls += 1
            if calls == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)

        ingest_module._Job._write_quarantine = write_then_die
    engine = open_store(url)
    ingest_module.ingest(engine, news_path=news, behaviors_path=behaviors, quarantine_dir=Path(quarantine),
                         batch_size=int(batch), progress=lambda n: print("batch", n, flush=True))
    print("done", flush=True)
    """
)


@pytest.fixture
def world(tmp_path) -> dict[str, Path]:
    """60 articles, 640 impressions (impression id = line number), a few bad lines."""
    rng = np.random.default_rng(7)
    news = [news_line(f"N{i}", category=f"c{i % 5}") for i in range(NUM_NEWS)]
    news.insert(33, "N999\tbroken")
    lines = []
    for line_no in range(1, NUM_IMPRESSIONS + 1):
        user = f"U{rng.integers(0, 150)}"
        time = T0 + timedelta(minutes=int(rng.integers(0, 5 * 24 * 60)))
        history = [f"N{i}" for i in rng.choice(NUM_NEWS, rng.integers(0, 8), replace=False)]
        picks = rng.choice(NUM_NEWS, rng.integers(2, 10), replace=False)
        labels = (rng.random(len(picks)) < 0.3).astype(int)
        lines.append(behavior_line(line_no, user, time, history, [f"N{p}-{lab}" for p, lab in zip(picks, labels)]))
    for bad_at in (57, 400, 601):
        lines[bad_at - 1] = behavior_line(bad_at, "U1", T0, [], ["N1-1", "N2-x"])
    folder = tmp_path / "world"
    folder.mkdir()
    return {
        "news": write_lines(folder / "news.tsv", news),
        "behaviors": write_lines(folder / "behaviors.tsv", lines),
    }


def _clean_run(engine, world, tmp_path):
    report = ingest(engine, news_path=world["news"], behaviors_path=world["behaviors"], quarantine_dir=tmp_path / "q-clean",
                    batch_size=BATCH)
    return dump_store(engine), Path(report.quarantine_file).read_text()


def _start_child(db_url, world, tmp_path, mode, kill_at) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, db_url, str(world["news"]), str(world["behaviors"]), str(tmp_path / "q-crash"),
         mode, str(kill_at), str(BATCH)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _rerun_and_compare(engine, world, tmp_path, clean, clean_quarantine):
    report = ingest(engine, news_path=world["news"], behaviors_path=world["behaviors"], quarantine_dir=tmp_path / "q-rerun",
                    batch_size=BATCH)
    assert dump_store(engine) == clean
    assert Path(report.quarantine_file).read_text() == clean_quarantine


@pytest.mark.parametrize("kill_at", [2, NEWS_BATCHES + 1, NEWS_BATCHES + 17], ids=["news", "first-behaviors", "behaviors"])
def test_kill_inside_a_batch_transaction_then_rerun(engine, db_url, world, tmp_path, kill_at):
    clean, clean_quarantine = _clean_run(engine, world, tmp_path)
    clean_ids = {row[1] for row in clean["impressions"]}
    wipe_store(engine)

    child = _start_child(db_url, world, tmp_path, "in-transaction", kill_at)
    out, err = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, err
    assert out.count("batch") == kill_at - 1
    # Exactly the batches before the killed one are in the store, nothing of the killed one.
    crashed = dump_store(engine)
    behaviors_batches_done = max(0, kill_at - 1 - NEWS_BATCHES)
    assert {row[1] for row in crashed["impressions"]} == {i for i in clean_ids if i <= behaviors_batches_done * BATCH}
    if kill_at <= NEWS_BATCHES:
        assert len(crashed["news"]) == (kill_at - 1) * BATCH

    _rerun_and_compare(engine, world, tmp_path, clean, clean_quarantine)


def test_kill_from_outside_at_a_random_point_then_rerun(engine, db_url, world, tmp_path):
    clean, clean_quarantine = _clean_run(engine, world, tmp_path)
    wipe_store(engine)

    child = _start_child(db_url, world, tmp_path, "external", 0)
    seen = 0
    for line in child.stdout:
        seen += line.startswith("batch")
        if seen == NEWS_BATCHES + 5:
            child.send_signal(signal.SIGKILL)
            break
    child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL
    crashed = dump_store(engine)
    assert 0 < len(crashed["impressions"]) < len(clean["impressions"])

    _rerun_and_compare(engine, world, tmp_path, clean, clean_quarantine)


def test_two_crashes_in_a_row_then_rerun(engine, db_url, world, tmp_path):
    clean, clean_quarantine = _clean_run(engine, world, tmp_path)
    wipe_store(engine)
    for kill_at in (NEWS_BATCHES + 25, NEWS_BATCHES + 9):  # the second crash dies earlier than the first
        child = _start_child(db_url, world, tmp_path, "in-transaction", kill_at)
        child.communicate(timeout=300)
        assert child.returncode == -signal.SIGKILL
    _rerun_and_compare(engine, world, tmp_path, clean, clean_quarantine)
