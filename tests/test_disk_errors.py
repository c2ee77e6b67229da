"""A full disk (ENOSPC, EDQUOT) or a read-only one (EROFS) met while a command writes: exit 1 with
one line naming the path, not exit 2 "internal error"; what was stored before stays whole.

The errors are injected where the command writes (FAISS, NumPy, Keras, pyarrow, the atomic file
writer), as each library raises them on a full disk.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa

from recsys.cli import main
from recsys.config import Workspace, load_config
from recsys.pipelines.train import run_train
from recsys.store import schema
from recsys.store.database import open_store
from recsys.versions import get_version
from tests.sample_store import ingested_sample

pytestmark = pytest.mark.slow

FULL = os.strerror(errno.ENOSPC)  # "No space left on device"
TRAINED = {"model.epochs": 1, "model.embedding_dim": 16, "model.anchor_dim": 4}


def enospc(filename: str | None = None) -> OSError:
    return OSError(errno.ENOSPC, FULL, filename) if filename is not None else OSError(errno.ENOSPC, FULL)


def faiss_enospc(*args, **kwargs):
    # What faiss.write_index raises on a full disk (the file is the temporary one).
    raise RuntimeError("Error in void faiss::write_index(const Index*, IOWriter*, int) at "
                       "/project/faiss/impl/index_write.cpp:499: Error: 'ret == (size * 4)' failed: write error in "
                       f"/ws/models/v1/.index.tmp-0123/index.faiss: 307155 != 570880 ({FULL})")


def raise_enospc(*args, **kwargs):
    raise enospc()


class FullDiskOs:
    """``os`` whose fsync finds the disk full, for the module under test only."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def fsync(fd):
        raise enospc()


@pytest.fixture(scope="module")
def _trained_snapshot(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    _, ws, engine = ingested_sample(root / "live", num_users=60, num_news=200, num_impressions=200, seed=3)
    run_train(engine, ws, load_config(None, TRAINED))
    engine.dispose()
    shutil.copytree(root / "live", root / "snapshot", symlinks=True)
    return root


@pytest.fixture
def trained(_trained_snapshot):
    """``(world, workspace)``: a trained workspace as it was after training."""
    live = _trained_snapshot / "live"
    shutil.rmtree(live)
    shutil.copytree(_trained_snapshot / "snapshot", live, symlinks=True)
    return live / "world", Workspace(live / "ws")


def cli(capsys, ws: Workspace, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--workspace", str(ws.root), *args])
    out, err = capsys.readouterr()
    return code, out, err.strip()


def last_line(err: str) -> str:
    return err.splitlines()[-1] if err else ""


def _current(ws: Workspace):
    engine = open_store(ws.default_db_url)
    try:
        return get_version(engine)
    finally:
        engine.dispose()


def _saved_index(index_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(index_dir.iterdir())}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


@pytest.mark.parametrize("where", ["faiss", "numpy"])
def test_index_build_on_a_full_disk_exits_1_naming_the_index(trained, capsys, monkeypatch, where):
    import faiss
    import numpy as np

    world, ws = trained
    assert cli(capsys, ws, "index", "build")[0] == 0
    mv = _current(ws)
    before = _saved_index(mv.index_dir)
    if where == "faiss":
        monkeypatch.setattr(faiss, "write_index", faiss_enospc)
    else:
        monkeypatch.setattr(np, "save", raise_enospc)
    code, out, err = cli(capsys, ws, "index", "build")
    assert (code, out, last_line(err)) == (1, "", f"error: cannot save the index {mv.index_dir}: no space left on device")
    assert "internal error" not in err
    assert _saved_index(mv.index_dir) == before  # the previous index, whole
    assert _leftovers(mv.index_dir.parent) == []


def test_a_nightly_whose_index_save_finds_the_disk_full_exits_1_and_keeps_the_index(trained, capsys, monkeypatch):
    import faiss

    import recsys.pipelines.nightly as nightly

    world, ws = trained
    assert cli(capsys, ws, "index", "build")[0] == 0
    mv = _current(ws)
    before = _saved_index(mv.index_dir)
    # The refresh runs in a spawned helper, which a monkeypatch does not reach: run it here.
    monkeypatch.setattr(nightly, "refresh_index_apart",
                        lambda engine, workspace, config, mv, *, lock=None: nightly.refresh_index(engine, workspace,
                                                                                                 config, mv, lock=lock))
    monkeypatch.setattr(faiss, "write_index", faiss_enospc)
    row = (world / "news.tsv").read_text(encoding="utf-8").splitlines()[0].split("\t")
    row[0] = "N9999999"
    news = ws.root / "night" / "news.tsv"
    news.parent.mkdir()
    news.write_text("\t".join(row) + "\n", encoding="utf-8")  # a new article: the index must be saved
    code, out, err = cli(capsys, ws, "nightly", "--k", "3", "--workers", "1", "--news", str(news))
    assert (code, out, last_line(err)) == (1, "", f"error: cannot save the index {mv.index_dir}: no space left on device")
    assert _saved_index(mv.index_dir) == before
    engine = open_store(ws.default_db_url)
    with engine.connect() as conn:  # no run left "running", the lock released
        running = conn.execute(sa.select(schema.runs.c.run_id).where(schema.runs.c.status == "running")).all()
        locks = conn.execute(sa.select(sa.func.count()).select_from(schema.locks)).scalar()
    engine.dispose()
    assert (running, locks) == ([], 0)


def test_train_whose_model_save_finds_the_disk_full_exits_1_and_keeps_the_current_version(trained, capsys,
                                                                                           monkeypatch):
    import keras

    world, ws = trained
    current = _current(ws)
    versions = sorted(p.name for p in ws.models_dir.iterdir())
    monkeypatch.setattr(keras.Model, "save", raise_enospc)  # Keras's OSError names no file
    code, out, err = cli(capsys, ws, "train", "--epochs", "1")
    assert code == 1 and out == "", err
    line = last_line(err)
    assert re.fullmatch(rf"error: cannot save the model version v[-0-9a-f]+ in {re.escape(str(ws.models_dir))}: "
                        "no space left on device", line), line
    assert _current(ws).version == current.version
    assert sorted(p.name for p in ws.models_dir.iterdir() if not p.name.startswith(".tmp-")) == versions


def test_predict_out_on_a_full_disk_exits_1_naming_the_file_and_keeps_the_old_one(trained, capsys, monkeypatch):
    import recsys.atomic

    world, ws = trained
    pred = ws.root / "prediction.txt"
    pred.write_text("yesterday's\n")
    monkeypatch.setattr(recsys.atomic, "os", FullDiskOs())
    code, out, err = cli(capsys, ws, "predict", "--behaviors", str(world / "behaviors_test_unlabelled.tsv"),
                         "--out", str(pred))
    assert (code, last_line(err)) == (1, f"error: cannot write {pred}: no space left on device")
    assert pred.read_text() == "yesterday's\n"
    assert _leftovers(ws.root) == []


def test_evaluate_out_on_a_full_disk_exits_1_naming_the_file(trained, capsys, monkeypatch):
    import recsys.atomic

    world, ws = trained
    report = ws.root / "report"
    monkeypatch.setattr(recsys.atomic, "os", FullDiskOs())
    code, out, err = cli(capsys, ws, "evaluate", "--behaviors", str(world / "behaviors_test.tsv"), "--out", str(report))
    version = _current(ws).version
    assert (code, last_line(err)) == (1, f"error: cannot write {report}/prediction-{version}.txt: no space left on device")
    assert not report.exists()  # the folder it made is removed


def _complete_run(ws: Workspace) -> int:
    import pandas as pd

    from recsys.columns import NEWS_ID, RANK, SCORE, USER_ID
    from recsys.ranking import runs

    engine = open_store(ws.default_db_url)
    try:
        with engine.connect() as conn:
            news = conn.execute(sa.select(schema.news.c.news_id).limit(2)).scalars().all()
        run_id = runs.create_run(engine, model_version="v1", plan={"k": 2})
        frame = pd.DataFrame([("U1", r + 1, n, 0.5 - 0.1 * r) for r, n in enumerate(news)],
                             columns=[USER_ID, RANK, NEWS_ID, SCORE])
        runs.write_shard(engine, run_id, 0, frame, num_users=1)
        runs.complete_run(engine, run_id, counts={}, timings={}, num_shards=1)
        return run_id
    finally:
        engine.dispose()


def test_export_on_a_full_disk_exits_1_naming_the_file(trained, capsys, monkeypatch):
    import pyarrow.parquet as pq

    world, ws = trained
    run_id = _complete_run(ws)
    out_dir = ws.root / "export"

    def full(self, *args, **kwargs):  # what pyarrow raises on a full disk
        raise OSError(errno.ENOSPC, "Error writing bytes to file")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    code, out, err = cli(capsys, ws, "export", "--run", str(run_id), "--out", str(out_dir))
    target = out_dir / f"recommendations-run-{run_id}.parquet"
    assert (code, out, last_line(err)) == (1, "", f"error: cannot write {target}: no space left on device")
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize(("error", "line"), [
    (OSError(errno.ENOSPC, FULL, "/data/x.bin"), "error: cannot write /data/x.bin: no space left on device"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS), "/data/x.bin"), "error: cannot write /data/x.bin: read-only file system"),
    (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), "error: a write failed: disk quota exceeded"),
])
def test_a_full_or_read_only_disk_no_write_site_names_exits_1(capsys, tmp_path, monkeypatch, error, line):
    """The last resort, for a write no code turned into a RecsysError: exit 1, its file if known."""
    import recsys.store.stats as stats_module

    def broken(engine):
        raise error

    monkeypatch.setattr(stats_module, "store_stats", broken)
    ws = Workspace(tmp_path)
    assert cli(capsys, ws, "db", "upgrade")[0] == 0
    code, _, err = cli(capsys, ws, "stats")
    assert (code, err) == (1, f"{line} (run with --verbose for the traceback)")


def test_another_os_error_is_still_an_internal_error(capsys, tmp_path, monkeypatch):
    import recsys.store.stats as stats_module

    def broken(engine):
        raise OSError(errno.EIO, os.strerror(errno.EIO), "/data/x.bin")

    monkeypatch.setattr(stats_module, "store_stats", broken)
    ws = Workspace(tmp_path)
    assert cli(capsys, ws, "db", "upgrade")[0] == 0
    code, _, err = cli(capsys, ws, "stats")
    assert code == 2 and err.startswith("internal error: OSError: [Errno 5]"), err


def test_ingest_into_a_full_sqlite_store_exits_1_naming_the_store(tmp_path, capsys, monkeypatch):
    """SQLite says "database or disk is full" (SQLITE_FULL); a page limit makes it so here."""
    from recsys.data.sample import generate_sample
    from recsys.store import database

    world = tmp_path / "world"
    generate_sample(world, num_users=30, num_news=100, num_impressions=80, seed=5)
    ws = Workspace(tmp_path / "ws")
    assert cli(capsys, ws, "db", "upgrade")[0] == 0
    path = ws.root / "recsys.db"
    assert path.is_file()
    real = database._sqlite_on_connect

    def on_connect(dbapi_connection, record):
        real(dbapi_connection, record)
        pages = dbapi_connection.execute("PRAGMA page_count").fetchone()[0]
        dbapi_connection.execute(f"PRAGMA max_page_count = {pages + 2}")  # no room for the articles

    monkeypatch.setattr(database, "_sqlite_on_connect", on_connect)
    code, out, err = cli(capsys, ws, "ingest", "--news", str(world / "news.tsv"))
    assert code == 1, err
    assert last_line(err) == (f"error: the store at sqlite:///{path} cannot be written: its disk is full "
                              "(database or disk is full)")
    monkeypatch.setattr(database, "_sqlite_on_connect", real)
    code, out, err = cli(capsys, ws, "stats", "--json")
    assert code == 0 and json.loads(out)["news"] == 0, err  # nothing half-written


def test_generate_sample_on_a_full_disk_exits_1_and_keeps_the_earlier_world(tmp_path, capsys, monkeypatch):
    import recsys.data.sample as sample

    out = tmp_path / "world"
    ws = Workspace(tmp_path / "ws")
    args = ("generate-sample", "--out", str(out), "--users", "20", "--news", "100", "--impressions", "30")
    assert cli(capsys, ws, *args)[0] == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def full(path, *args, **kwargs):  # the last file written, after the covers and behaviors
        raise OSError(errno.ENOSPC, FULL)

    monkeypatch.setattr(sample, "_write_world_json", full)
    code, out_text, err = cli(capsys, ws, *args[:-1], "31")
    assert (code, last_line(err)) == (1, f"error: cannot write the sample world {out}: no space left on device")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["world"]  # no partial world left
