"""The nightly job's glue around the ranking: the index refresh, a failed ingest, the lock.

The freshness filter reads the index's copy of each article's time, while the store's
``first_seen_at`` can move earlier with every behaviors file (an older file, or a History that
lists the article); times are worked out by hand from the files written here. An ingest that
fails leaves the store as it was, the run still ranks it, and the exit code says so.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from recsys.cli import main
from recsys.config import Workspace, load_config
from recsys.pipelines.index import load_index
from recsys.pipelines.ingest import run_ingest
from recsys.errors import RunLockedError
from recsys.pipelines.nightly import refresh_index, run_nightly_job
from recsys.ranking.lock import acquire_lock
from recsys.pipelines.train import run_train
from recsys.store import repository as repo
from recsys.store import schema
from recsys.store.database import open_store
from recsys.store.stats import store_stats
from recsys.versions import get_version
from tests.digests import file_digests
from tests.lost_connection import connection_lost_at
from tests.sample_store import ingested_sample
from tests.signals import stop_after_shards
from tests.store.mind_files import behavior_line, write_lines

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _in_this_process(monkeypatch):
    """The index refresh and the ranking run in the test's own process (``refresh_index``; the
    local engine with ``num_workers=0``), not in the spawned helper and worker processes, which
    load TensorFlow again on each night (about 8 s each): these tests are about the job's steps
    and their failures. The processes themselves: ``test_the_jobs_own_process_never_loads_tensorflow``
    here (a real `recsys nightly`), tests/test_run_apart.py, tests/ranking/test_engines.py and
    test_kill.py, and the end-to-end tests of tests/test_cli.py and tests/test_foreign_mind.py."""
    import recsys.pipelines.nightly as nightly_module
    import recsys.ranking.nightly as ranking_module
    from recsys.ranking.engines import run_local

    monkeypatch.setattr(nightly_module, "refresh_index_apart",
                        lambda engine, ws, config, mv, *, lock=None: refresh_index(engine, ws, config, mv, lock=lock))
    monkeypatch.setattr(ranking_module, "run_local",
                        lambda setup, shards, *, num_workers, on_result=None: run_local(
                            setup, shards, num_workers=0, on_result=on_result))


def first_seen(engine) -> dict[str, datetime | None]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(schema.news.c.news_id, schema.news.c.first_seen_at)).all())


@pytest.fixture(scope="module")
def _trained_snapshot(tmp_path_factory) -> Path:
    """A small sample world ingested and a one-epoch model marked current, trained once per
    module: ``live/`` and a copy of it in ``snapshot/``."""
    root = tmp_path_factory.mktemp("trained")
    _, ws, engine = ingested_sample(root / "live", num_users=60, num_news=200, num_impressions=200, seed=3)
    run_train(engine, ws, load_config(None, TRAINED))
    engine.dispose()  # the last connection checkpoints SQLite's WAL into the store file
    shutil.copytree(root / "live", root / "snapshot", symlinks=True)
    return root


TRAINED = {"model.epochs": 1, "model.embedding_dim": 16, "model.anchor_dim": 4}


@pytest.fixture
def trained(_trained_snapshot):
    """``(world, workspace, engine, config)``: the trained workspace as it was after training,
    restored under its own path (the store records the model version's absolute path, which
    these tests read: ``get_version`` without a workspace)."""
    live = _trained_snapshot / "live"
    shutil.rmtree(live)
    shutil.copytree(_trained_snapshot / "snapshot", live, symlinks=True)
    ws = Workspace(live / "ws")
    engine = open_store(ws.default_db_url)
    try:
        yield live / "world", ws, engine, load_config(None, TRAINED)
    finally:
        engine.dispose()


def test_refresh_follows_the_stores_first_seen_times(tmp_path, trained):
    world, ws, engine, config = trained
    mv = get_version(engine)

    built = refresh_index(engine, ws, config, mv)
    assert built["index_built"] == 200
    seen = first_seen(engine)
    never = sorted(n for n, t in seen.items() if t is None)
    shown = sorted(n for n, t in seen.items() if t is not None)
    assert len(never) >= 3, "the sample world should leave some articles never shown nor listed"
    _, store_end = repo.time_range(engine)  # the latest impression
    index = load_index(mv)
    # Never seen: the store's latest time at the build stands in, so the freshness filter keeps it.
    np.testing.assert_array_equal(index.published(never), np.full(len(never), np.datetime64(store_end, "s")))

    listed, unseen, moved = never[0], never[1:], shown[0]
    start = min(t for t in seen.values() if t is not None)
    older, later = start - timedelta(days=3), store_end + timedelta(days=2)
    (tmp_path / "older").mkdir()
    (tmp_path / "later").mkdir()
    # An older file lists `listed` in a History and shows `moved` before anything the store holds;
    # a later one moves the store's end on without touching the never-seen articles.
    run_ingest(engine, ws, news=None, images=None, behaviors=write_lines(
        tmp_path / "older" / "behaviors.tsv", [behavior_line(1, "U_old", older, [listed], [f"{moved}-0"])]))
    run_ingest(engine, ws, news=None, images=None, behaviors=write_lines(
        tmp_path / "later" / "behaviors.tsv", [behavior_line(1, "U_new", later, [], [f"{shown[1]}-1"])]))
    assert first_seen(engine)[listed] == older and first_seen(engine)[moved] == older

    refreshed = refresh_index(engine, ws, config, mv)
    assert refreshed == {"index_added": 0, "index_updated": 0, "index_republished": 2}
    index = load_index(mv)  # what was saved
    assert len(index) == 200
    np.testing.assert_array_equal(index.published([listed, moved]), np.full(2, np.datetime64(older, "s")))
    # Still never seen: they keep the build's time instead of the store's new end.
    np.testing.assert_array_equal(index.published(unseen), np.full(len(unseen), np.datetime64(store_end, "s")))
    fresh_after = np.datetime64(start - timedelta(days=1), "s")
    (hits,) = index.search(index.vectors([moved]), 200, published_after=fresh_after)
    assert len(hits) == 198 and not {listed, moved} & set(hits.news_ids.tolist())

    assert refresh_index(engine, ws, config, mv) == {"index_added": 0, "index_updated": 0, "index_republished": 0}

    # A job that lost its lock writes no index, not even a cold build (the index was lost).
    from recsys.ranking.lock import LockLostError

    shutil.rmtree(mv.index_dir)
    frozen = acquire_lock(engine, holder="host-a:1", heartbeat_every=timedelta(hours=1))
    acquire_lock(engine, holder="host-b:2", stale_after=timedelta(0))
    with pytest.raises(LockLostError, match="host-b:2 took it over"):
        refresh_index(engine, ws, config, mv, lock=frozen)
    assert not mv.index_dir.exists()


def test_a_new_versions_index_keeps_the_stamps_of_never_seen_articles(tmp_path, trained):
    # Every full build stamped them with the store's end anew: after each retraining the never-
    # shown back catalogue was fresh again (4% of list slots on a hunt's ten nights).
    from recsys.pipelines.index import run_index_build

    world, ws, engine, config = trained
    first = get_version(engine)
    refresh_index(engine, ws, config, first)
    _, built_at = repo.time_range(engine)
    never = sorted(n for n, t in first_seen(engine).items() if t is None)
    shown = sorted(n for n, t in first_seen(engine).items() if t is not None)
    second = get_version(engine, run_train(engine, ws, load_config(None, TRAINED))["version"])
    assert second.version != first.version and not second.index_dir.exists()
    # Nights go by before the new version's index is built.
    (tmp_path / "later").mkdir()
    later = built_at + timedelta(days=4)
    run_ingest(engine, ws, news=None, images=None, behaviors=write_lines(
        tmp_path / "later" / "behaviors.tsv", [behavior_line(1, "U_new", later, [], [f"{shown[0]}-1"])]))

    for build in (lambda: refresh_index(engine, ws, config, second), lambda: run_index_build(engine, ws, config)):
        build()
        np.testing.assert_array_equal(load_index(second).published(never), np.full(len(never), np.datetime64(built_at, "s")))
    # An article no index has held yet is new at the store's end, as before.
    news = tmp_path / "news.tsv"
    news.write_text("NBRANDNEW\tnews\tsub\tA new story\t\thttps://x\t[]\t[]\n")
    run_ingest(engine, ws, news=news, images=None, behaviors=None)
    shutil.rmtree(second.index_dir)
    refresh_index(engine, ws, config, second)
    assert load_index(second).published(["NBRANDNEW"])[0] == np.datetime64(later, "s")
    assert load_index(second).published(never[:1])[0] == np.datetime64(built_at, "s")


def test_another_versions_damaged_index_does_not_stop_the_index_step(tmp_path, trained, caplog):
    # Never-shown articles take their stamp from every version's saved index: one candidate's
    # truncated file stopped every night's index step (and `index build`) with exit 1.
    world, ws, engine, config = trained
    first = get_version(engine)
    refresh_index(engine, ws, config, first)
    other = tmp_path / "vother"
    shutil.copytree(first.index_dir, other / "index")
    published = next((other / "index").glob("published*.npy"))
    published.write_bytes(published.read_bytes()[:100])
    with engine.begin() as conn:
        conn.execute(sa.insert(schema.model_versions).values(
            version="vother", path=str(other), created_at=datetime(2026, 1, 1), is_current=False, manifest={}))
    shutil.rmtree(first.index_dir)
    assert refresh_index(engine, ws, config, first)["index_built"] == 200
    assert "the index of model version vother cannot be read" in caplog.text


def test_a_rollback_ranks_the_next_night_with_the_old_version_and_fills_its_index(tmp_path, trained, capsys):
    # A retried night returns the last run when its inputs are unchanged: the model version is
    # one of them, so the night after `model use` ranks again, with the version chosen, and
    # that version's index gains the articles that came while another version was current.
    world, ws, engine, _ = trained
    cli = ("--workspace", str(ws.root), "nightly", "--k", "3", "--workers", "1")
    first = get_version(engine).version
    assert main(cli) == 0, capsys.readouterr().err
    capsys.readouterr()
    second = run_train(engine, ws, load_config(None, TRAINED))["version"]
    news = tmp_path / "news.tsv"
    news.write_text("NBRANDNEW\tnews\tsub\tA new story\t\thttps://x\t[]\t[]\n", encoding="utf-8")
    assert main([*cli, "--news", str(news)]) == 0, capsys.readouterr().err
    night = json.loads(capsys.readouterr().out)
    assert night["run"]["model_version"] == second and night["index"]["index_built"] == 201
    assert "NBRANDNEW" not in load_index(get_version(engine, first))

    assert main(["--workspace", str(ws.root), "model", "use", first]) == 0
    assert json.loads(capsys.readouterr().out) == {"current": first, "previous": second, "changed": True, "index": "present"}
    assert main(cli) == 0, capsys.readouterr().err
    rolled_back = json.loads(capsys.readouterr().out)
    assert not rolled_back["run"]["already_complete"] and rolled_back["run"]["run_id"] > night["run"]["run_id"]
    assert rolled_back["run"]["model_version"] == first and rolled_back["index"]["index_added"] == 1
    assert "NBRANDNEW" in load_index(get_version(engine, first))


def _retitled(world: Path, tmp_path: Path) -> Path:
    """The world's news.tsv with every title changed: the same ids in the same order (so the
    index's ids and their order stay as they were), other content."""
    lines = (world / "news.tsv").read_text(encoding="utf-8").splitlines()
    fields = [line.split("\t") for line in lines]
    for row in fields:
        row[3] = f"Update: {row[3]}"
    (tmp_path / "retitled").mkdir()
    return write_lines(tmp_path / "retitled" / "news.tsv", ["\t".join(row) for row in fields])


def _rows(engine, run_id) -> list[tuple]:
    rec = schema.recommendations.c
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(rec.user_id, rec.rank, rec.news_id).where(
            rec.run_id == run_id).order_by(rec.user_id, rec.rank))]


SHARDED = {**TRAINED, "nightly.shard_size": 10, "nightly.workers": 1, "nightly.k": 5}


def test_a_night_killed_before_an_ingest_changed_the_articles_is_not_resumed(tmp_path, trained, monkeypatch):
    # The plan named the index's ids, not its content: after `ingest --news` changed titles (same
    # ids) the next night resumed the killed run, whose first shards kept lists ranked on the old
    # content (47% of users in the hunt), exit 0.
    import recsys.pipelines.nightly as nightly_module
    from recsys.ranking import runs

    world, ws, engine, _ = trained
    config = load_config(None, SHARDED)
    # A context, not monkeypatch.undo(): that would also undo _in_this_process's patches.
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(nightly_module, "progress", stop_after_shards(3))
        run_nightly_job(engine, ws, config)
    (killed,) = [run_id for run_id, kind, status in _runs(engine) if (kind, status) == (runs.NIGHTLY, "running")]
    assert len(runs.finished_shards(engine, killed)) == 3

    run_ingest(engine, ws, news=_retitled(world, tmp_path), images=world / "images", behaviors=None)
    night = run_nightly_job(engine, ws, config)
    assert night["index"]["index_updated"] == 200
    assert not night["run"]["resumed"] and night["run"]["abandoned_runs"] == [killed]
    assert night["run"]["counts"]["shards_resumed"] == 0
    assert runs.get_run(engine, killed).status == "failed" and runs.finished_shards(engine, killed) == {}
    clean = run_nightly_job(engine, ws, config, rerank=True)
    assert clean["index"]["index_updated"] == 0 and clean["run"]["run_id"] != night["run"]["run_id"]
    assert _rows(engine, night["run"]["run_id"]) == _rows(engine, clean["run"]["run_id"])


def test_a_night_done_before_its_articles_changed_ranks_again(tmp_path, trained):
    # `nightly --news changed.tsv --images DIR` re-embedded every article and updated the index,
    # then returned the previous run "already ranked these inputs" and kept serving its lists.
    world, ws, engine, _ = trained
    config = load_config(None, SHARDED)
    first = run_nightly_job(engine, ws, config)["run"]
    night = run_nightly_job(engine, ws, config, news=_retitled(world, tmp_path), images=world / "images")
    assert night["index"]["index_updated"] == 200
    assert not night["run"]["already_complete"] and night["run"]["run_id"] != first["run_id"]
    assert night["run"]["plan"]["index_content"] != first["plan"]["index_content"]
    assert night["run"]["plan"]["index"] == first["plan"]["index"]  # the same articles, in the same order
    clean = run_nightly_job(engine, ws, config, rerank=True)["run"]
    assert _rows(engine, night["run"]["run_id"]) == _rows(engine, clean["run_id"])
    assert _rows(engine, night["run"]["run_id"]) != _rows(engine, first["run_id"])
    # Nothing changed since (the index is current, the refresh skipped): a retry returns the night as it is.
    retry = run_nightly_job(engine, ws, config)
    assert retry["index"] == {"index_added": 0, "index_updated": 0, "index_republished": 0}
    assert retry["run"]["already_complete"] and retry["run"]["run_id"] == clean["run_id"]


def test_a_night_on_a_copy_of_the_workspace_and_its_store_leaves_the_original_as_it_was(tmp_path, trained, capsys):
    # The store records each version's folder by its absolute path: a night on a staging copy of
    # the workspace and its store wrote the copy's changed articles into the original's index.
    world, ws, engine, _ = trained
    run_nightly_job(engine, ws, load_config(None, SHARDED))  # the original's index, built
    version = get_version(engine).version
    engine.dispose()  # the last connection checkpoints SQLite's WAL into the store file copied
    copy = Workspace(tmp_path / "copy")
    shutil.copytree(ws.root, copy.root, symlinks=True)
    original = file_digests(ws.root)
    copied = open_store(copy.default_db_url)
    try:
        night = run_nightly_job(copied, copy, load_config(None, SHARDED), news=_retitled(world, tmp_path),
                                images=world / "images")
        assert night["run"]["status"] == "complete", night
        assert night["index"]["index_updated"] == 200, night["index"]
        assert get_version(copied, models_dir=copy.models_dir).path == copy.models_dir / version
    finally:
        copied.dispose()
    assert file_digests(ws.root) == original
    changed = {name for name, digest in file_digests(copy.models_dir).items()
               if original.get(str(Path("models") / name)) != digest}
    assert changed and all(name.startswith(f"{version}/index/") for name in changed)
    # `model list` on the copy names the copy's folder.
    capsys.readouterr()
    assert main(["--workspace", str(copy.root), "model", "list", "--json"]) == 0
    assert [row["path"] for row in json.loads(capsys.readouterr().out)] == [str(copy.models_dir / version)]


def test_a_failed_ingest_ranks_the_stored_data_and_exits_3(tmp_path, trained, capsys):
    world, ws, engine, _ = trained
    before = store_stats(engine)
    cli = ("--workspace", str(ws.root), "nightly", "--k", "3", "--workers", "1")
    capsys.readouterr()

    # Real MIND has no covers: a scheduler line that still passes --images points at nothing.
    (tmp_path / "night").mkdir()
    article = (world / "news.tsv").read_text(encoding="utf-8").split("\t", 1)[0]
    # At the store's end: a later time would move the run's clock past every fresh article.
    night = repo.time_range(engine)[1]
    behaviors = write_lines(tmp_path / "night" / "behaviors.tsv", [behavior_line(1, "U_new", night, [], [f"{article}-1"])])
    missing = tmp_path / "night" / "images"
    code = main([*cli, "--news", str(world / "news.tsv"), "--behaviors", str(behaviors), "--images", str(missing)])
    out, err = capsys.readouterr()
    assert code == 3
    summary = json.loads(out)
    assert str(missing) in summary["ingest"]["error"]
    assert summary["run"]["status"] == "complete" and summary["index"]["index_built"] == 200
    assert summary["run"]["counts"]["users"] == before["users"]  # U_new was not stored
    assert err.strip().splitlines()[-1].startswith("error: ingest failed, the run ranked the data already stored:")
    assert str(missing) in err
    assert store_stats(engine) == before
    # Retried as it is: the same inputs, so the run just made is returned, and not said to be ranked.
    code = main([*cli, "--news", str(world / "news.tsv"), "--behaviors", str(behaviors), "--images", str(missing)])
    out, err = capsys.readouterr()
    retry = json.loads(out)["run"]
    assert code == 3 and retry["already_complete"] and retry["run_id"] == summary["run"]["run_id"]
    assert err.strip().splitlines()[-1].startswith(
        f"error: ingest failed, the complete run {retry['run_id']} of the data already stored stays served: ")

    # Without --images the same night loads, under the source it is given.
    code = main([*cli, "--behaviors", str(behaviors), "--source", "nightly-2019-11-20"])
    assert code == 0, capsys.readouterr().err
    ingested = json.loads(capsys.readouterr().out)["ingest"]
    assert (ingested["source"], ingested["impressions"], ingested["num_bad_rows"]) == ("nightly-2019-11-20", 1, 0)
    with engine.connect() as conn:
        stored = conn.execute(sa.select(schema.impressions.c.source, schema.impressions.c.user_id)
                              .where(schema.impressions.c.source == "nightly-2019-11-20")).all()
    assert [tuple(r) for r in stored] == [("nightly-2019-11-20", "U_new")]


def test_a_night_whose_ingest_loses_the_store_stops_with_exit_1_before_ranking(tmp_path, trained, capsys):
    # It was "ingest failed" and exit 3 ("fix the input files"), after ranking on a store that had
    # just dropped its connection: the files were fine, and a retry ingests and ranks them.
    world, ws, engine, _ = trained
    before = store_stats(engine)
    article = (world / "news.tsv").read_text(encoding="utf-8").split("\t", 1)[0]
    (tmp_path / "night").mkdir()
    behaviors = write_lines(tmp_path / "night" / "behaviors.tsv",
                            [behavior_line(1, "U_new", repo.time_range(engine)[1], [], [f"{article}-1"])])
    capsys.readouterr()
    with connection_lost_at("SELECT users.user_id, users.history_at") as cut:  # the ingest's read of the histories
        code = main(["--workspace", str(ws.root), "nightly", "--k", "3", "--workers", "1", "--behaviors", str(behaviors)])
    out, err = capsys.readouterr()
    assert cut and (code, out) == (1, ""), err
    assert err.strip().splitlines()[-1].startswith("error: lost the connection to the store at ")
    assert store_stats(engine) == before
    assert [kind for _, kind, _ in _runs(engine)].count("nightly") == 0


def test_a_night_whose_files_have_no_good_line_or_too_many_bad_ones_exits_3_and_ranks_the_stored_data(tmp_path, trained,
                                                                                                     capsys):
    # Swapped files were quarantined line by line and the job exited 0: no alert fired.
    world, ws, engine, _ = trained
    before = store_stats(engine)
    cli = ["--workspace", str(ws.root), "nightly", "--k", "3", "--workers", "1"]
    code = main([*cli, "--news", str(world / "behaviors_train.tsv"), "--behaviors", str(world / "news.tsv"),
                 "--source", "swapped"])
    out, err = capsys.readouterr()
    assert code == 3
    summary = json.loads(out)
    assert summary["ingest"]["error"].startswith(f"--news {world / 'behaviors_train.tsv'}: every one of its ")
    assert summary["run"]["status"] == "complete"
    assert err.strip().splitlines()[-1].startswith("error: ingest failed, the run ranked the data already stored: --news")
    after = store_stats(engine)
    assert (after["news"], after["impressions"]) == (before["news"], before["impressions"])

    # Half its lines show an article whose news file came late (a hunt: 249 of 255): the good line
    # is stored and ranked, but the job exits 3 (it served the lists with exit 0).
    article = (world / "news.tsv").read_text(encoding="utf-8").split("\t", 1)[0]
    night = repo.time_range(engine)[1]
    (tmp_path / "night").mkdir()
    behaviors = write_lines(tmp_path / "night" / "behaviors.tsv", [
        behavior_line(1, "U_late", night, [], [f"{article}-1"]), behavior_line(2, "U_late", night, [], ["N99999-1"])])
    code = main([*cli, "--behaviors", str(behaviors), "--source", "late"])
    out, err = capsys.readouterr()
    assert code == 3, err
    summary = json.loads(out)
    assert summary["ingest"]["error"].startswith(
        f"--behaviors {behaviors}: 1 of its 2 lines was bad (50.0%, more than ingest.max_bad_share = 10%); its 1 good "
        f"line was ingested (first bad: {behaviors} line 2: ")
    assert summary["run"]["status"] == "complete" and summary["run"]["counts"]["users"] == before["users"] + 1
    assert err.strip().splitlines()[-1].startswith("error: ingest failed, the run ranked the data already stored: "
                                                   "--behaviors")
    assert store_stats(engine)["impressions"] == before["impressions"] + 1
    assert [status for _, kind, status in _runs(engine) if kind == "ingest"][-1] == "failed"


def test_a_night_whose_quarantine_file_cannot_be_written_exits_3_and_ranks_the_stored_data(tmp_path, trained, capsys,
                                                                                         monkeypatch):
    # On a full disk the quarantine writer's OSError stopped the whole night (exit 2, no run).
    import errno

    import recsys.store.ingest as store_ingest

    world, ws, engine, _ = trained
    before = store_stats(engine)
    quarantined = set(ws.quarantine_dir.glob("*")) | set(ws.quarantine_dir.glob(".*"))
    article = (world / "news.tsv").read_text(encoding="utf-8").split("\t", 1)[0]
    night = repo.time_range(engine)[1]
    (tmp_path / "night").mkdir()
    behaviors = write_lines(tmp_path / "night" / "behaviors.tsv", [
        behavior_line(1, "U_new", night, [], [f"{article}-1"]), behavior_line(2, "U_new", night, [], ["N_nowhere-1"])])

    def full_disk(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(store_ingest, "open", full_disk, raising=False)
    code = main(["--workspace", str(ws.root), "nightly", "--k", "3", "--workers", "1", "--behaviors", str(behaviors),
                 "--source", "full"])
    out, err = capsys.readouterr()
    assert code == 3, err
    summary = json.loads(out)
    error = summary["ingest"]["error"]
    message = (rf"quarantine file {re.escape(str(ws.quarantine_dir))}/\S+-behaviors\.tsv cannot be written "
               r"\(No space left on device\): the ingest stopped; .*")
    assert re.fullmatch(message, error), error
    assert summary["run"]["status"] == "complete"
    assert err.strip().splitlines()[-1] == f"error: ingest failed, the run ranked the data already stored: {error}"
    assert store_stats(engine) == before  # its one batch rolled back, the ingest recorded failed
    assert [status for _, kind, status in _runs(engine) if kind == "ingest"][-1] == "failed"
    assert set(ws.quarantine_dir.glob("*")) | set(ws.quarantine_dir.glob(".*")) == quarantined
    # `recsys ingest` says so with exit 1 (was exit 2, an internal error).
    code = main(["--workspace", str(ws.root), "ingest", "--behaviors", str(behaviors), "--source", "full"])
    assert code == 1
    assert re.fullmatch("error: " + message, capsys.readouterr().err.strip().splitlines()[-1])
    assert store_stats(engine) == before


def test_an_export_that_fails_after_the_run_still_prints_the_summary_and_exits_1(tmp_path, trained, capsys, monkeypatch):
    # The summary (counts, pruned runs) was lost with the error; the run itself is served.
    import recsys.ranking.export

    world, ws, engine, _ = trained

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:  # not monkeypatch.undo(): that would undo _in_this_process too
        patch.setattr(recsys.ranking.export, "export_run", full_disk)
        code = main(["--workspace", str(ws.root), "nightly", "--k", "3", "--workers", "1", "--export", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 1
    summary = json.loads(out)
    run_id = summary["run"]["run_id"]
    assert summary["run"]["status"] == "complete"
    message = (f"--export {tmp_path / 'out'}: run {run_id} completed, but its export failed ([Errno 28] No space left "
               f"on device); once the cause is fixed, `recsys export --run {run_id} --out DIR` writes it")
    assert summary["export"] == {"error": message}
    assert err.strip().splitlines()[-1] == f"error: {message}"
    # A real one: a folder where the next night's file goes. It stopped the job after its switch
    # with no summary (export raised a RecsysError, which the clause above did not catch).
    in_the_way = tmp_path / "out" / f"recommendations-run-{run_id + 1}.parquet"
    in_the_way.mkdir(parents=True)
    code = main(["--workspace", str(ws.root), "nightly", "--k", "3", "--workers", "1", "--rerank",
                 "--export", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert (code, summary["run"]["run_id"], summary["run"]["status"]) == (1, run_id + 1, "complete")
    assert summary["export"] == {"error": f"--export {tmp_path / 'out'}: run {run_id + 1} completed, but its export "
                                          f"failed (cannot write {in_the_way}: Is a directory); once the cause is "
                                          f"fixed, `recsys export --run {run_id + 1} --out DIR` writes it"}


# The prune's read of the complete runs (the night's other reads of runs name more columns).
_PRUNE = r"^SELECT runs\.run_id\s+FROM runs\s+WHERE .* ORDER BY runs\.run_id DESC\s*$"


def test_a_night_that_loses_the_store_after_its_switch_prints_its_summary(tmp_path, trained, capsys, caplog):
    # Its lists committed and served, the job exited 2 with no summary, and logged that "the
    # night stopped after its ingest", when the store dropped the connection in the prune, in the
    # export's read of the run or at the lock's release. The prune and the release are now
    # warnings; the export follows the export rule (the summary, then exit 1). One night for all
    # three.
    world, ws, engine, _ = trained
    article = (world / "news.tsv").read_text(encoding="utf-8").split("\t", 1)[0]
    (tmp_path / "night").mkdir()
    behaviors = write_lines(tmp_path / "night" / "behaviors.tsv",
                            [behavior_line(1, "U_new", repo.time_range(engine)[1], [], [f"{article}-1"])])
    out_dir = tmp_path / "out"
    capsys.readouterr()
    # The export's own read of the run comes after the summary's.
    with connection_lost_at(_PRUNE) as pruning, connection_lost_at("^DELETE FROM locks") as releasing, \
            connection_lost_at(r"^SELECT runs\.run_id, runs\.kind.*WHERE runs\.run_id = ", skip=1) as exporting:
        code = main(["--workspace", str(ws.root), "nightly", "--k", "3", "--workers", "1", "--behaviors", str(behaviors),
                     "--export", str(out_dir)])
    out, err = capsys.readouterr()
    assert pruning and releasing and exporting and code == 1, err
    summary = json.loads(out)
    run_id = summary["run"]["run_id"]
    assert summary["ingest"]["impressions"] == 1 and summary["run"]["status"] == "complete"
    (warning,) = summary["run"]["warnings"]
    assert warning.startswith(f"run {run_id} is complete and served, but pruning old runs failed "
                              "(StoreUnavailableError: lost the connection to the store at ")
    assert warning.endswith("; the next run prunes them")
    assert "could not release lock 'nightly' after the work was done (StoreUnavailableError" in caplog.text
    assert "the night stopped" not in caplog.text
    message = summary["export"]["error"]
    assert re.fullmatch(rf"--export {re.escape(str(out_dir))}: run {run_id} completed, but its export failed \(lost the "
                        r"connection to the store at .*\); once the cause is fixed, `recsys export --run \d+ --out DIR` "
                        "writes it", message)
    assert err.strip().splitlines()[-1] == f"error: {message}"
    assert main(["--workspace", str(ws.root), "export", "--run", str(run_id), "--out", str(out_dir)]) == 0


def test_a_night_stopped_after_its_run_was_complete_does_not_say_it_stopped_after_its_ingest(monkeypatch, caplog):
    # Ctrl-C in the export, say: the log said only that the ingest was stored.
    import recsys.pipelines.nightly as job

    def ranked_then_interrupted(engine, workspace, config, lock, summary, **kwargs):
        summary["run"] = {"run_id": 7, "status": "complete"}
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "_index_and_rank", ranked_then_interrupted)
    monkeypatch.setattr("recsys.pipelines.ingest.run_ingest", lambda *args, **kwargs: {"impressions": 1})
    with pytest.raises(KeyboardInterrupt):
        # The config: the ingest reads its ingest.max_bad_share.
        job._nightly_job(None, None, load_config(None), None, news=None, behaviors=Path("b.tsv"), images=None, source=None,
                         export=None, rerank=False)
    assert "the night stopped after its run 7 was complete and served; its ingest is stored too: " in caplog.text
    assert "the night stopped after its ingest" not in caplog.text


def test_a_first_night_without_a_model_says_what_its_ingest_stored(tmp_path, capsys, caplog):
    """The ingest is committed before the job finds no model version: it exited 1 with only
    the model's error, and nothing said the night's file was stored (a rerun would find it so)."""
    world, ws, engine = ingested_sample(tmp_path, num_users=20, num_news=100, num_impressions=30, seed=4)
    article = (world / "news.tsv").read_text(encoding="utf-8").split("\t", 1)[0]
    (tmp_path / "night").mkdir()
    night = write_lines(tmp_path / "night" / "behaviors.tsv",
                        [behavior_line(1, "U_new", repo.time_range(engine)[1], [], [f"{article}-1"])])
    before = store_stats(engine)["impressions"]
    capsys.readouterr()
    assert main(["--workspace", str(ws.root), "nightly", "--behaviors", str(night)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: no current model version")
    assert store_stats(engine)["impressions"] == before + 1
    (said,) = [r.getMessage() for r in caplog.records if "the night stopped after its ingest" in r.getMessage()]
    ingested = json.loads(said.split("which is stored and stays: ", 1)[1])
    assert (ingested["source"], ingested["impressions"], ingested["users"], ingested["num_bad_rows"]) == ("night/behaviors", 1, 1, 0)
    engine.dispose()


def test_a_job_that_finds_the_lock_held_ingests_nothing(tmp_path):
    """Overlapping nights: the second job stops before its ingest, not only before ranking."""
    world, ws, engine = ingested_sample(tmp_path, num_users=20, num_news=100, num_impressions=30, seed=4)
    before = store_stats(engine)
    config = load_config(None, {})
    with acquire_lock(engine, holder="other-host:4242"):  # a live run elsewhere
        with pytest.raises(RunLockedError, match="lock 'nightly' is held by other-host:4242"):
            run_nightly_job(engine, ws, config, behaviors=world / "behaviors_test.tsv")
    assert store_stats(engine) == before
    engine.dispose()


def test_an_emptied_or_damaged_index_is_built_whole_by_the_next_night(trained, caplog):
    """An index folder emptied by hand stopped every night ('manifest.json: missing'), and
    `model list` called it present; a truncated index.faiss stopped every night the same way."""
    from recsys.errors import NotFoundError
    from recsys.index.folder import IndexFormatError
    from recsys.pipelines.index import run_similar
    from recsys.versions import describe_versions

    world, ws, engine, config = trained
    mv = get_version(engine)
    refresh_index(engine, ws, config, mv)
    whole = load_index(mv)
    some = whole.news_ids[0]
    for name in ("manifest.json", "index.faiss", "news_ids.npy", "published.npy", "alive.npy"):
        (mv.index_dir / name).unlink()
    assert [r["index"] for r in describe_versions(engine) if r["version"] == mv.version] == [False]
    with pytest.raises(NotFoundError, match=rf"has no index yet: run `recsys index build --model {mv.version}`"):
        run_similar(engine, ws, news_id=some, k=3)
    assert refresh_index(engine, ws, config, mv)["index_built"] == len(whole)
    np.testing.assert_array_equal(load_index(mv).vectors(whole.news_ids), whole.vectors(whole.news_ids))
    # Not indexed: a typo, or an article ingested since the last refresh.
    with pytest.raises(NotFoundError, match="is not in the index of model version .*: the store holds no article with that id"):
        run_similar(engine, ws, news_id="N_TYPO", k=3)
    news = world.parent / "one_more_news.tsv"
    news.write_text("NLATE\tnews\tsub\tA late story\t\thttps://x\t[]\t[]\n")
    run_ingest(engine, ws, news=news, images=None, behaviors=None)
    with pytest.raises(NotFoundError, match=rf"the store holds it, ingested since the index was last refreshed; the next "
                                            rf"nightly adds it, or run `recsys index build --model {mv.version}`"):
        run_similar(engine, ws, news_id="NLATE", k=3)

    # Only the manifest gone: the folder holds nothing but index files, so it is replaced
    # (the save refused it as "not an index directory", and the night stopped every time).
    (mv.index_dir / "manifest.json").unlink()
    with pytest.raises(IndexFormatError, match="manifest.json: missing"):
        run_similar(engine, ws, news_id=some, k=3)
    assert refresh_index(engine, ws, config, mv)["index_built"] == len(whole) + 1  # with NLATE
    data = (mv.index_dir / "index.faiss").read_bytes()
    (mv.index_dir / "index.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexFormatError, match=rf"FAISS cannot read it .*build it again with `recsys index build --model {mv.version}`"):
        run_similar(engine, ws, news_id=some, k=3)
    with caplog.at_level("WARNING"):
        assert refresh_index(engine, ws, config, mv)["index_built"] == len(whole) + 1  # with NLATE
    assert f"the index of model version {mv.version} cannot be read" in caplog.text and "building it whole" in caplog.text
    # Embedded in batches of another size (201 articles, not 200), a row can differ in its last
    # bits (3e-8 seen): the refresh's own threshold for a changed embedding is 1e-5.
    np.testing.assert_allclose(load_index(mv).vectors(whole.news_ids), whole.vectors(whole.news_ids), rtol=0, atol=1e-6)


def test_articles_the_index_holds_but_the_store_does_not_are_removed_by_the_next_night(trained, capsys, caplog):
    """A store restored from a backup older than the index (or a workspace copied onto another
    store): the nightly served the index's extra articles, 2,223 of 6,930 list slots, titled nan."""
    from recsys.pipelines.index import CATALOGUE_STATE

    world, ws, engine, config = trained
    mv = get_version(engine)
    refresh_index(engine, ws, config, mv)
    index = load_index(mv)
    held = index.news_ids
    extra = np.array(["N_GONE1", "N_GONE2"], dtype=object)
    # Near a user's taste: the vectors of articles every list would pick.
    index.add(extra, index.vectors(held[:2]) * 1.01, published=np.full(2, np.datetime64("2019-11-14T00:00:00", "s")))
    index.save(mv.index_dir, manifest_extra={**index.manifest_extra, CATALOGUE_STATE: "the record of another store"})
    with caplog.at_level("WARNING", logger="recsys.nightly"):
        code = main(["--workspace", str(ws.root), "nightly", "--k", "5", "--workers", "1", "--rerank"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    assert summary["index"]["index_removed"] == 2
    assert f"the index of model version {mv.version} held 2 articles the store does not hold: removed" in caplog.text
    with engine.connect() as conn:
        listed = {row[0] for row in conn.execute(sa.text("SELECT news_id FROM current_recommendations"))}
        stored = {row[0] for row in conn.execute(sa.text("SELECT news_id FROM news"))}
    assert listed and listed <= stored
    np.testing.assert_array_equal(load_index(mv).news_ids, held)
    assert refresh_index(engine, ws, config, mv) == {"index_added": 0, "index_updated": 0, "index_republished": 0}


def test_an_auto_index_follows_its_kind_as_the_catalogue_passes_exact_max_items(trained, caplog):
    """An existing index was only ever extended: a flat one stayed flat past exact_max_items
    (`index build` made HNSW of the same catalogue), and a changed threshold was never read."""
    world, ws, engine, config = trained
    mv = get_version(engine)
    refresh_index(engine, ws, config, mv)
    before = load_index(mv)
    assert before.kind == "flat"
    ids = before.news_ids
    small = load_config(None, {**TRAINED, "index.exact_max_items": len(ids) - 1})
    summary = refresh_index(engine, ws, small, mv)
    assert summary["index_rebuilt"] == {"from": "flat", "to": "hnsw", "items": len(ids)}
    assert summary["index_exact_max_items"] == {"from": config.index.exact_max_items, "to": len(ids) - 1}
    after = load_index(mv)
    assert (after.kind, after.exact_max_items) == ("hnsw", len(ids) - 1)
    np.testing.assert_array_equal(after.vectors(ids), before.vectors(ids))
    np.testing.assert_array_equal(after.published(ids), before.published(ids))
    assert "index_rebuilt" not in refresh_index(engine, ws, small, mv)  # settled
    assert refresh_index(engine, ws, config, mv)["index_rebuilt"]["to"] == "flat"  # the default threshold again
    np.testing.assert_array_equal(load_index(mv).vectors(ids), before.vectors(ids))
    # An index built with an explicit kind (`index build --kind ivf`) keeps it under "auto": the
    # night turned it flat. A config naming another explicit kind is said, not applied.
    from recsys.pipelines.index import run_index_build

    run_index_build(engine, ws, load_config(None, {**TRAINED, "index.kind": "ivf"}))
    assert (load_index(mv).kind, load_index(mv).requested_kind) == ("ivf", "ivf")
    assert "index_rebuilt" not in refresh_index(engine, ws, config, mv)
    with caplog.at_level("WARNING"):
        assert "index_rebuilt" not in refresh_index(engine, ws, load_config(None, {**TRAINED, "index.kind": "hnsw"}), mv)
    assert f"is ivf, [index] kind is now 'hnsw': `recsys index build --model {mv.version}` builds it so" in caplog.text
    assert load_index(mv).kind == "ivf"

    # An index saved before requested_kind was recorded: IVF is never auto's, so it is kept; a
    # flat one under an "auto" config is taken as auto's and follows it.
    def legacy():
        manifest = json.loads((mv.index_dir / "manifest.json").read_text())
        del manifest["requested_kind"]
        (mv.index_dir / "manifest.json").write_text(json.dumps(manifest))

    legacy()
    summary = refresh_index(engine, ws, small, mv)
    assert (summary["index_requested_kind"], load_index(mv).kind, load_index(mv).requested_kind) == ("ivf", "ivf", "ivf")
    run_index_build(engine, ws, config)
    legacy()
    summary = refresh_index(engine, ws, small, mv)
    assert summary["index_requested_kind"] == "auto" and summary["index_rebuilt"]["to"] == "hnsw"
    assert load_index(mv).requested_kind == "auto"
    # A legacy HNSW index below its own threshold is not auto's (`index build --kind hnsw`): kept.
    run_index_build(engine, ws, load_config(None, {**TRAINED, "index.kind": "hnsw"}))
    legacy()
    summary = refresh_index(engine, ws, config, mv)
    assert summary["index_requested_kind"] == "hnsw" and "index_rebuilt" not in summary
    assert load_index(mv).kind == "hnsw"


def test_an_index_build_does_not_save_over_a_newer_index_a_night_saved(trained, monkeypatch):
    """The build reads the store without the lock: a night that ingested and refreshed the
    index meanwhile saw its index replaced by the build's older snapshot."""
    import recsys.pipelines.index as index_module
    from recsys.errors import RecsysError

    world, ws, engine, config = trained
    mv = get_version(engine)
    refresh_index(engine, ws, config, mv)
    real, nights = index_module.load_catalogue, []

    def saved() -> str:
        return json.loads((mv.index_dir / "manifest.json").read_text())["saved_at"] + str(mv.index_dir.stat().st_ino)

    def a_night_saves_meanwhile(*args, **kwargs):
        read = real(*args, **kwargs)
        load_index(mv).save(mv.index_dir)  # the night's refresh, after the build began
        nights.append(saved())
        return read

    monkeypatch.setattr(index_module, "load_catalogue", a_night_saves_meanwhile)
    with pytest.raises(RecsysError, match=rf"the index of model version {mv.version} was saved by another job"):
        index_module.run_index_build(engine, ws, config)
    assert saved() == nights[0]  # the night's index stays
    monkeypatch.setattr(index_module, "load_catalogue", real)
    index_module.run_index_build(engine, ws, config)  # nothing saved since it began: saved
    assert saved() != nights[0]


def test_an_index_build_while_a_night_holds_the_lock_writes_nothing(trained):
    """`recsys index build` took no lock: it swapped the index under a night's ranking (the run
    failed) or saved beside the night's own refresh (both saves could crash). It takes it for
    its save only: an encode of hours must not refuse a night."""
    from recsys.pipelines.index import run_index_build

    world, ws, engine, config = trained
    mv = get_version(engine)
    refresh_index(engine, ws, config, mv)

    def saved() -> tuple[bytes, int]:
        # The folder's inode too: a save within the same second writes the same manifest bytes.
        return (mv.index_dir / "manifest.json").read_bytes(), mv.index_dir.stat().st_ino

    before = saved()
    with acquire_lock(engine, holder="other-host:4242"):  # a night running elsewhere
        with pytest.raises(RunLockedError, match=rf"lock 'nightly' is held by other-host:4242.*; the index of model version "
                                                 rf"{mv.version} was built but not saved"):
            run_index_build(engine, ws, config)
    assert saved() == before
    run_index_build(engine, ws, config)  # the lock is free again: built, and the lock released
    assert saved() != before
    with acquire_lock(engine):
        pass


def test_a_job_with_an_export_it_cannot_write_or_lone_ingest_options_stops_before_anything(tmp_path):
    """Found before the lock, the ingest and the ranking: not after the night's work is done."""
    from recsys.errors import RecsysError

    world, ws, engine = ingested_sample(tmp_path, num_users=20, num_news=100, num_impressions=30, seed=4)
    before = store_stats(engine)
    config = load_config(None, {})
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(RecsysError, match=rf"--export {tmp_path / 'a-file' / 'sub'}: {tmp_path / 'a-file'} is a file, expected a folder"):
        run_nightly_job(engine, ws, config, behaviors=world / "behaviors_test.tsv", export=tmp_path / "a-file" / "sub")
    # A link to an unmounted share passed the check: the night ranked, then its export failed.
    (tmp_path / "share").symlink_to("/nonexistent/recsys-exports")
    for export in (tmp_path / "share", tmp_path / "share" / "night-1"):
        with pytest.raises(RecsysError, match=rf"^--export {export}: {tmp_path / 'share'} is a link to "
                                              r"/nonexistent/recsys-exports, which does not exist$"):
            run_nightly_job(engine, ws, config, behaviors=world / "behaviors_test.tsv", export=export)
    # /proc passes the access check for root, and refuses any new folder: found before the night too.
    with pytest.raises(RecsysError, match=r"^--export /proc/recsys-exports/night-1: (cannot create the folder "
                                          r"\(No such file or directory\)|folder /proc is not writable)$"):
        run_nightly_job(engine, ws, config, behaviors=world / "behaviors_test.tsv", export=Path("/proc/recsys-exports/night-1"))
    for kwargs in ({"images": world / "images"}, {"source": "night-1"}):
        with pytest.raises(RecsysError, match="nightly --images and --source go with --news and/or --behaviors"):
            run_nightly_job(engine, ws, config, **kwargs)
    assert store_stats(engine) == before
    engine.dispose()


def test_a_job_whose_workspace_it_cannot_write_stops_before_the_ingest(tmp_path, monkeypatch):
    """A read-only workspace failed as an internal error in the index save, after the ingest."""
    import os

    from recsys.errors import RecsysError
    from recsys.pipelines import inputs

    world, ws, engine = ingested_sample(tmp_path, num_users=20, num_news=100, num_impressions=30, seed=4)
    before, runs_before = store_stats(engine), _runs(engine)
    ws.models_dir.mkdir(exist_ok=True)
    real_access = os.access
    monkeypatch.setattr(inputs.os, "access", lambda path, mode: Path(path) != ws.models_dir and real_access(path, mode))
    with pytest.raises(RecsysError, match=rf"^--workspace {ws.root}: folder {ws.models_dir} is not writable$"):
        run_nightly_job(engine, ws, load_config(None, {}), behaviors=world / "behaviors_test.tsv")
    assert store_stats(engine) == before
    assert _runs(engine) == runs_before
    engine.dispose()


def test_a_job_whose_ray_cluster_is_unreachable_stops_before_the_ingest(tmp_path):
    """Found before the lock and the ingest, not after them (the ranking checks it too)."""
    import socket

    from recsys.errors import RecsysError

    world, ws, engine = ingested_sample(tmp_path, num_users=20, num_news=100, num_impressions=30, seed=4)
    before = store_stats(engine)
    runs_before = _runs(engine)
    with socket.socket() as sock:  # a port nothing listens on, on every interface
        sock.bind(("0.0.0.0", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    config = load_config(None, {"nightly.engine": "ray", "nightly.ray_address": address})
    with pytest.raises(RecsysError, match=f"cannot reach the Ray cluster at {address}"):
        run_nightly_job(engine, ws, config, behaviors=world / "behaviors_test.tsv")
    assert store_stats(engine) == before
    assert _runs(engine) == runs_before  # no ingest run, no nightly run
    engine.dispose()


def test_a_config_files_ray_address_with_the_local_engine_is_said_not_used(tmp_path, caplog):
    """`--engine local` over a file's cluster (the cluster down) runs here; the log says so."""
    import logging

    world, ws, engine = ingested_sample(tmp_path, num_users=20, num_news=100, num_impressions=30, seed=4)
    config = load_config(None, {"nightly.ray_address": "auto"})
    with acquire_lock(engine, holder="other-host:4242"), caplog.at_level(logging.WARNING):
        with pytest.raises(RunLockedError):  # stops there: the warning comes before the lock
            run_nightly_job(engine, ws, config)
    assert ("nightly.ray_address 'auto' is not used: the engine is 'local', so this machine ranks (nightly.engine = "
            '"ray" or --engine ray ranks on the cluster)') in caplog.text
    engine.dispose()


def _runs(engine) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(schema.runs.c.run_id, schema.runs.c.kind, schema.runs.c.status))]


def test_the_jobs_own_process_never_loads_tensorflow(trained):
    """The index refresh (encoders, item tower) runs in a helper process, so the job's process
    stays small beside its ranking workers; checked in a fresh interpreter."""
    import subprocess
    import sys

    world, ws, engine, config = trained
    engine.dispose()
    script = (
        "import sys\n"
        "from recsys.cli import main\n"
        f"code = main(['--workspace', {str(ws.root)!r}, 'nightly', '--k', '3', '--workers', '1'])\n"
        "print('EXIT', code, 'tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.stdout.strip().splitlines()[-1] == "EXIT 0 False False", proc.stderr[-3000:]
    summary = json.loads(proc.stdout[: proc.stdout.rindex("EXIT")])
    assert summary["index"]["index_built"] == 200 and summary["run"]["status"] == "complete"
    assert "encoding articles" in proc.stderr  # the helper's log lines reach the job's stderr


@pytest.mark.parametrize("setting, message", [
    ({"encoders.image_model": "/nonexistent/m.keras"}, "image model file /nonexistent/m.keras does not exist"),
    ({"encoders.image_model": "NEWS"}, r"image model file .*news\.tsv is not a native Keras file"),
    ({"encoders.image_model": "NOTZIP"}, r"image model file .*m\.keras cannot be loaded by Keras: it is not a \.keras archive"),
    ({"encoders.tokenizer": "/nonexistent/tokenizer.json"}, "tokenizer"),
])
def test_a_job_whose_encoders_cannot_load_stops_before_the_ingest(tmp_path, trained, setting, message):
    """A bad [encoders] path stopped the night after its ingest (in the index refresh), so the
    night's files were stored by a job that could not rank them (config hunt)."""
    world, ws, engine, _ = trained
    (tmp_path / "m.keras").write_text("not a zip")
    ((key, value),) = setting.items()
    value = {"NEWS": str(world / "news.tsv"), "NOTZIP": str(tmp_path / "m.keras")}.get(value, value)
    config = load_config(None, {**TRAINED, key: value})
    before, runs_before = store_stats(engine), _runs(engine)
    from recsys.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"^\[encoders\] cannot be used, nothing was ingested: .*{message}"):
        run_nightly_job(engine, ws, config, behaviors=world / "behaviors_test.tsv")
    assert store_stats(engine) == before and _runs(engine) == runs_before
    # A night given no files to ingest does not say it ingested nothing.
    with pytest.raises(ConfigError, match=rf"^\[encoders\] cannot be used: .*{message}"):
        run_nightly_job(engine, ws, config)
    assert store_stats(engine) == before and _runs(engine) == runs_before


def test_a_job_whose_encoders_differ_from_the_current_versions_stops_before_the_ingest(trained):
    """use_abstract other than the version's: refused before the lock and the ingest."""
    from recsys.errors import ModelMismatchError

    world, ws, engine, config = trained
    current = get_version(engine)
    flipped = load_config(None, {**TRAINED, "encoders.use_abstract": not config.encoders.use_abstract})
    before, runs_before = store_stats(engine), _runs(engine)
    with pytest.raises(ModelMismatchError, match=rf"model version {get_version(engine).version} was built with text_encoder"):
        run_nightly_job(engine, ws, flipped, behaviors=world / "behaviors_test.tsv")
    assert store_stats(engine) == before and _runs(engine) == runs_before
    after = get_version(engine)  # the version is untouched, and still the one served
    assert (after.version, after.manifest) == (current.version, current.manifest)


def test_a_night_whose_quarantine_folder_cannot_be_created_exits_3_and_ranks_the_stored_data(tmp_path, trained, capsys,
                                                                                            monkeypatch):
    # The folder is made before the ingest: on a full disk its OSError stopped the night (exit 1
    # since the CLI's last resort, exit 2 before) instead of failing the ingest alone.
    import errno
    import pathlib
    import shutil

    world, ws, engine, _ = trained
    before = store_stats(engine)
    shutil.rmtree(ws.quarantine_dir, ignore_errors=True)
    night = repo.time_range(engine)[1]
    (tmp_path / "night").mkdir()
    article = (world / "news.tsv").read_text(encoding="utf-8").split("\t", 1)[0]
    behaviors = write_lines(tmp_path / "night" / "behaviors.tsv", [behavior_line(1, "U_new", night, [], [f"{article}-1"])])
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == ws.quarantine_dir:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    code = main(["--workspace", str(ws.root), "nightly", "--k", "3", "--workers", "1", "--behaviors", str(behaviors),
                 "--source", "nofolder"])
    out, err = capsys.readouterr()
    assert code == 3, err
    summary = json.loads(out)
    assert summary["ingest"]["error"] == f"cannot create the quarantine folder {ws.quarantine_dir}: no space left on device"
    assert summary["run"]["status"] == "complete"
    assert store_stats(engine) == before


def test_a_night_whose_store_is_as_its_index_last_read_it_skips_the_refresh(trained, monkeypatch, caplog):
    # A retried night (or one whose files brought no article) started the refresh helper, which
    # loaded TensorFlow, the encoders and every article's features to find nothing to do.
    import recsys.pipelines.nightly as nightly_module

    world, ws, engine, _ = trained
    config = load_config(None, SHARDED)
    calls = []
    real = nightly_module.refresh_index_apart
    monkeypatch.setattr(nightly_module, "refresh_index_apart", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    first = run_nightly_job(engine, ws, config)
    assert len(calls) == 1 and first["index"]["index_added"] == 200
    with caplog.at_level("INFO", logger="recsys.nightly"):
        retry = run_nightly_job(engine, ws, config, rerank=True)
    assert len(calls) == 1, "the retry started the refresh helper"
    assert retry["index"] == {"index_added": 0, "index_updated": 0, "index_republished": 0}
    assert "holds the store's articles as they are now: not refreshed" in caplog.text
    assert retry["run"]["run_id"] != first["run"]["run_id"]
    assert _rows(engine, retry["run"]["run_id"]) == _rows(engine, first["run"]["run_id"])


def test_a_cover_the_refresh_could_not_read_is_read_again_by_the_next_night(tmp_path, trained):
    # A cover that ingest found usable but the refresh could not read (moved, an unmounted
    # share) is embedded without it and not cached. The store's digest does not change, so a
    # recorded digest let every later night skip the refresh and serve that vector until some
    # other article changed.
    from recsys.pipelines.index import run_index_build
    from recsys.pipelines.nightly import index_is_current

    world, ws, engine, config = trained
    mv = get_version(engine)
    run_index_build(engine, ws, config)
    lines = {line.split("\t")[0]: line.split("\t") for line in (world / "news.tsv").read_text(encoding="utf-8").splitlines()}
    cover = sorted((world / "images").iterdir())[0]
    row = [*lines[cover.stem]]
    row[0], row[3] = "Nnewcover", "A new article with its own cover"
    (tmp_path / "covers").mkdir()
    (tmp_path / "one").mkdir()
    placed = tmp_path / "covers" / f"Nnewcover{cover.suffix}"
    shutil.copyfile(cover, placed)
    run_ingest(engine, ws, news=write_lines(tmp_path / "one" / "news.tsv", ["\t".join(row)]), images=tmp_path / "covers",
               behaviors=None)
    assert repo.read_news(engine).set_index("news_id").at["Nnewcover", "image_status"] == "ok"
    assert not index_is_current(engine, mv, config)

    away = placed.rename(tmp_path / "away")
    assert refresh_index(engine, ws, config, mv)["index_added"] == 1
    without = load_index(mv).vectors(np.array(["Nnewcover"], dtype=object))
    assert not index_is_current(engine, mv, config)  # the next night tries again
    assert refresh_index(engine, ws, config, mv)["index_updated"] == 0  # still unreadable: the same vector
    assert not index_is_current(engine, mv, config)

    away.rename(placed)
    assert refresh_index(engine, ws, config, mv)["index_updated"] == 1
    assert index_is_current(engine, mv, config)
    assert not np.allclose(load_index(mv).vectors(np.array(["Nnewcover"], dtype=object)), without, atol=1e-4)
    # Once encoded with it, the article comes from the feature cache: a cover gone later changes nothing.
    placed.rename(away)
    run_index_build(engine, ws, config)
    assert index_is_current(engine, mv, config)
    # `recsys index build` records the same way as the refresh.
    row[0] = "Nnewcover2"
    second = tmp_path / "covers" / f"Nnewcover2{cover.suffix}"
    shutil.copyfile(cover, second)
    run_ingest(engine, ws, news=write_lines(tmp_path / "one" / "news.tsv", ["\t".join(row)]), images=tmp_path / "covers",
               behaviors=None)
    second.unlink()
    run_index_build(engine, ws, config)
    assert not index_is_current(engine, mv, config)


def test_what_the_refresh_reads_makes_the_index_not_current(tmp_path, trained, caplog):
    from recsys.pipelines.nightly import index_is_current
    from recsys.pipelines.index import run_index_build

    world, ws, engine, config = trained
    mv = get_version(engine)
    run_index_build(engine, ws, config)  # `recsys index build` records the catalogue it read
    assert index_is_current(engine, mv, config)
    # An index saved by an earlier release records none: the refresh finds nothing to change and
    # still saves it, with the record.
    from recsys.index import FaissIndex
    from recsys.pipelines.index import index_manifest

    FaissIndex.load(mv.index_dir).save(mv.index_dir, manifest_extra=index_manifest(mv))
    assert not index_is_current(engine, mv, config)
    assert refresh_index(engine, ws, config, mv) == {"index_added": 0, "index_updated": 0, "index_republished": 0}
    assert index_is_current(engine, mv, config)
    seen = first_seen(engine)
    shown = sorted(n for n, t in seen.items() if t is not None)

    # An older behaviors file moves an article's first-seen time earlier: restamped.
    older = min(t for t in seen.values() if t is not None) - timedelta(days=3)
    (tmp_path / "older").mkdir()
    run_ingest(engine, ws, news=None, images=None, behaviors=write_lines(
        tmp_path / "older" / "behaviors.tsv", [behavior_line(1, "U_old", older, [], [f"{shown[0]}-0"])]))
    assert not index_is_current(engine, mv, config)
    assert refresh_index(engine, ws, config, mv)["index_republished"] == 1
    assert index_is_current(engine, mv, config)

    # One article's title changed (the same id): embedded again.
    lines = (world / "news.tsv").read_text(encoding="utf-8").splitlines()
    row = lines[0].split("\t")
    row[3] = f"Update: {row[3]}"
    (tmp_path / "one").mkdir()
    run_ingest(engine, ws, news=write_lines(tmp_path / "one" / "news.tsv", ["\t".join(row)]), images=world / "images",
               behaviors=None)
    assert not index_is_current(engine, mv, config)
    assert refresh_index(engine, ws, config, mv)["index_updated"] == 1
    assert index_is_current(engine, mv, config)

    # Other [index] settings: the refresh applies them (here a new threshold, recorded).
    other = load_config(None, {**TRAINED, "index.exact_max_items": 150})
    assert not index_is_current(engine, mv, other) and index_is_current(engine, mv, config)
    assert refresh_index(engine, ws, other, mv)["index_rebuilt"] == {"from": "flat", "to": "hnsw", "items": 200}
    assert index_is_current(engine, mv, other) and not index_is_current(engine, mv, config)
    # An explicit kind the index is not: said on every night, the skipped ones too.
    explicit = load_config(None, {**TRAINED, "index.exact_max_items": 150, "index.kind": "flat"})
    refresh_index(engine, ws, explicit, mv)
    with caplog.at_level("WARNING", logger="recsys.nightly"):
        assert index_is_current(engine, mv, explicit)
    assert "is hnsw, [index] kind is now 'flat'" in caplog.text

    # A damaged index is not current, whatever its manifest records: the refresh builds it whole.
    data = (mv.index_dir / "index.faiss").read_bytes()
    (mv.index_dir / "index.faiss").write_bytes(data[: len(data) // 2])
    assert not index_is_current(engine, mv, explicit)
    assert refresh_index(engine, ws, explicit, mv)["index_built"] == 200
    assert index_is_current(engine, mv, explicit)
