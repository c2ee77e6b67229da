"""The nightly ranking job end to end on a small world (in-process engine unless marked)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import insert, select

import recsys
from recsys.columns import NEWS_ID, RANK, SCORE, USER_ID
from recsys.errors import (
    ConfigError, DamagedFileError, ModelMismatchError, NotFoundError, RecsysError, RunLockedError, StoreUnavailableError,
)
from recsys.ranking import runs
from recsys.ranking.lock import acquire_lock, read_lock
from recsys.ranking.nightly import run_nightly
from recsys.ranking.queries import active_user_ids
from recsys.store import schema as s
from tests.lost_connection import connection_lost_at
from tests.ranking.conftest import AFFINITY_INTERCEPT
from tests.ranking.stored import run_rows
from tests.signals import stop_after_shards

K = 10


def _nightly(engine, world, **overrides):
    args = dict(model_dir=world.model_dir, index_dir=world.index_dir, shard_size=7, k=K, num_candidates=40,
                active_days=7, freshness_days=3, keep_runs=3, num_workers=0)
    args.update(overrides)
    return run_nightly(engine, **args)


def test_nightly_ranks_every_active_user(world_store, world):
    summary = _nightly(world_store, world)
    assert summary["status"] == "complete" and summary["model_version"] == "model-v1"
    counts = summary["counts"]
    assert counts["users"] == len(world.active_users) and counts["cold_start_users"] == len(world.cold_users)
    assert counts["shards"] == -(-len(world.active_users) // 7) and counts["shards_resumed"] == 0
    assert counts["users_with_recommendations"] == len(world.active_users)
    assert counts["users_without_recommendations"] == 0
    rows = run_rows(world_store, summary["run_id"])
    assert counts["recommendations"] == len(rows) == summary["recommendations_stored"]
    assert set(rows[USER_ID]) == set(world.active_users)
    assert not rows.duplicated([USER_ID, RANK]).any() and not rows.duplicated([USER_ID, NEWS_ID]).any()
    assert rows.groupby(USER_ID)[RANK].agg(lambda r: list(r) == list(range(1, len(r) + 1))).all()
    assert (rows.groupby(USER_ID).size() <= K).all()
    # Only fresh articles the user has not clicked; never padding.
    fresh = {n for n, t in zip(world.news_ids, world.first_seen) if t is not None and t >= world.as_of - timedelta(days=3)}
    assert set(rows[NEWS_ID]) <= fresh
    for user, group in rows.groupby(USER_ID):
        assert not set(group[NEWS_ID]) & set(world.clicks.get(user, []))
    assert rows.groupby(USER_ID)[SCORE].agg(lambda x: bool(np.all(np.diff(x.to_numpy()) <= 1e-7))).all()
    stages = ("select_users", "prepare", "rank", "complete", "prune", "total", "workers.load", "workers.score", "workers.write")
    for stage in stages:
        assert summary["timings"][stage] >= 0
    assert summary["plan"]["as_of"] == "2019-11-15 12:00:00"


def test_active_users_are_those_shown_an_impression_in_the_closed_window(store, add_users):
    """[since, until]: an impression exactly active_days before as_of counts, as one at as_of does."""
    until = datetime(2019, 11, 15, 12, 0, 0)
    since = until - timedelta(days=7)
    second = timedelta(seconds=1)
    times = {"at-since": since, "before-since": since - second, "at-until": until, "after-until": until + second,
             "inside": since + timedelta(days=3)}
    add_users(store, list(times))
    with store.begin() as conn:
        conn.execute(insert(s.impressions), [
            {"source": "test/behaviors", "impression_id": i, "user_id": user, "time": when}
            for i, (user, when) in enumerate(times.items(), start=1)
        ])
    assert active_user_ids(store, since=since, until=until).tolist() == ["at-since", "at-until", "inside"]


def test_reader_cold_start_and_unknown_users(world_store, world):
    _nightly(world_store, world)
    cold = runs.recommendations_for_user(world_store, world.cold_users[0], K)
    assert len(cold) == K and cold["title"].str.startswith("title of").all()
    # Inactive users are known, but the run did not rank them.
    assert runs.recommendations_for_user(world_store, world.inactive_users[0]).empty
    with pytest.raises(NotFoundError, match="user 'U999' is unknown"):
        runs.recommendations_for_user(world_store, "U999")


@pytest.mark.slow
def test_interrupted_run_resumes_and_matches_a_clean_run(world_store, world):
    clean = _nightly(world_store, world)
    clean_rows = run_rows(world_store, clean["run_id"])
    with pytest.raises(KeyboardInterrupt):  # the same inputs again: rerank, or the clean run is returned
        _nightly(world_store, world, progress=stop_after_shards(3), rerank=True)
    assert read_lock(world_store) is None  # released on the way out
    # Readers still see the clean run.
    assert runs.latest_run(world_store).run_id == clean["run_id"]
    resumed = _nightly(world_store, world, rerank=True)
    assert resumed["resumed"] and resumed["counts"]["shards_resumed"] == 3
    assert resumed["run_id"] != clean["run_id"]
    pd.testing.assert_frame_equal(run_rows(world_store, resumed["run_id"]), clean_rows, check_exact=False, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["ranking", "switch"])
def test_a_run_that_loses_the_store_stays_resumable_and_resumes_to_a_clean_runs_lists(world_store, world, where):
    # It was marked failed, so the retry ranked every shard again (all of them, when the
    # connection dropped as the run was being completed). As after Ctrl-C or SIGTERM now.
    clean = _nightly(world_store, world)
    clean_rows = run_rows(world_store, clean["run_id"])
    statement, skip = ("INSERT INTO run_shards", 3) if where == "ranking" else ("UPDATE runs SET status", 0)
    with connection_lost_at(statement, skip=skip) as cut, pytest.raises(StoreUnavailableError, match="lost the connection"):
        _nightly(world_store, world, rerank=True)
    assert cut and read_lock(world_store) is None  # released on the way out
    lost = runs.get_run(world_store, clean["run_id"] + 1)
    assert lost.status == "running" and runs.latest_run(world_store).run_id == clean["run_id"]
    written = len(runs.finished_shards(world_store, lost.run_id))
    assert written == (3 if where == "ranking" else clean["counts"]["shards"])
    resumed = _nightly(world_store, world, rerank=True)
    assert resumed["run_id"] == lost.run_id and resumed["resumed"] and resumed["counts"]["shards_resumed"] == written
    pd.testing.assert_frame_equal(run_rows(world_store, resumed["run_id"]), clean_rows, check_exact=False, rtol=1e-6)


def test_a_run_that_loses_the_store_after_its_switch_is_served_and_leaves_the_rest_to_the_next_run(world_store, world,
                                                                                                   caplog):
    # Complete and served, the night still exited 2 without its summary when the store
    # dropped the connection in its prune, timings or summary; and a retry never pruned.
    first = _nightly(world_store, world, keep_runs=1)
    with (connection_lost_at("^DELETE FROM recommendations"), connection_lost_at("^UPDATE runs SET timings"),
          connection_lost_at(r"^SELECT runs\.run_id, runs\.kind.*WHERE runs\.run_id = ")):
        night = _nightly(world_store, world, keep_runs=1, rerank=True)
    assert night["status"] == "complete" and runs.latest_run(world_store).run_id == night["run_id"] != first["run_id"]
    assert read_lock(world_store) is None
    steps = ("pruning old runs", "recording its final timings", "reading its summary back")
    assert [w.split(" failed (")[0] for w in night["warnings"]] == [
        f"run {night['run_id']} is complete and served, but {step}" for step in steps]
    assert all("StoreUnavailableError: lost the connection to the store at" in w for w in night["warnings"])
    assert all(w in caplog.text for w in night["warnings"])
    # The summary from what the job holds: the counts and plan it completed the run with.
    stored = runs.run_summary(world_store, night["run_id"])
    assert (night["counts"], night["plan"]) == (stored["counts"], stored["plan"])
    assert (night["shards_written"], night["recommendations_stored"]) == (stored["shards_written"], stored["recommendations_stored"])
    assert night["started_at"] is None and night["pruned_runs"] == []
    assert "prune" in night["timings"] and "prune" not in stored["timings"]  # the store keeps the switch's
    assert runs.get_run(world_store, first["run_id"]).status == "complete"  # not pruned yet
    # The retry finds the night done, and prunes.
    again = _nightly(world_store, world, keep_runs=1, progress=lambda *a: pytest.fail("ranked the night again"))
    assert again["already_complete"] and again["run_id"] == night["run_id"]
    assert again["pruned_runs"] == [first["run_id"]] and again["warnings"] == []
    assert runs.get_run(world_store, first["run_id"]).status == "pruned" and run_rows(world_store, first["run_id"]).empty


@pytest.mark.slow
def test_changed_inputs_start_a_fresh_run(world_store, world):
    with pytest.raises(KeyboardInterrupt):
        _nightly(world_store, world, progress=stop_after_shards(1))
    stale = runs.finished_shards(world_store, 1)
    assert len(stale) == 1
    summary = _nightly(world_store, world, k=5)
    assert not summary["resumed"] and summary["abandoned_runs"] == [1]
    assert runs.get_run(world_store, 1).status == "failed"
    assert runs.finished_shards(world_store, 1) == {}


def _index_copy(world, tmp_path):
    """A copy of the world's index (shared by the session's tests), for a test that changes it."""
    import shutil

    return shutil.copytree(world.index_dir, tmp_path / "index")


def _re_embed(index_dir):
    """Give every article a new vector under the same id (each takes the next one's), as the
    nightly's index step does after an ingest changed every title: the same ids in the same
    order (a flat index re-adds the replaced rows at its end, here all of them), the same times."""
    from recsys.index.faiss_index import FaissIndex

    index = FaissIndex.load(index_dir, num_threads=1)
    ids = index.news_ids
    index.add(ids, np.roll(index.vectors(ids), 1, axis=0), published=index.published(ids))
    assert index.news_ids.tolist() == ids.tolist()
    index.save(index_dir)


@pytest.mark.slow
def test_a_run_killed_before_the_articles_were_re_embedded_is_not_resumed(world_store, world, tmp_path):
    # The plan named the index's ids, not its vectors: after an ingest changed titles (same ids)
    # the retry resumed the killed run, and the users of its first shards kept lists ranked on
    # the old content.
    index_dir = _index_copy(world, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        _nightly(world_store, world, index_dir=index_dir, progress=stop_after_shards(3))
    assert len(runs.finished_shards(world_store, 1)) == 3
    _re_embed(index_dir)
    summary = _nightly(world_store, world, index_dir=index_dir)
    assert not summary["resumed"] and summary["counts"]["shards_resumed"] == 0 and summary["abandoned_runs"] == [1]
    assert runs.get_run(world_store, 1).status == "failed" and runs.finished_shards(world_store, 1) == {}
    assert summary["plan"]["index_content"] != runs.get_run(world_store, 1).plan["index_content"]
    assert summary["plan"]["index"] == runs.get_run(world_store, 1).plan["index"]  # the same ids
    clean = _nightly(world_store, world, index_dir=index_dir, rerank=True)
    pd.testing.assert_frame_equal(run_rows(world_store, summary["run_id"]), run_rows(world_store, clean["run_id"]),
                                  check_exact=False, rtol=1e-6)


@pytest.mark.slow
def test_a_night_whose_articles_were_re_embedded_since_its_run_ranks_again(world_store, world, tmp_path):
    # The retry after an ingest of changed articles returned the run ranked on the old content
    # ("already ranked these inputs"), and readers kept its lists.
    index_dir = _index_copy(world, tmp_path)
    first = _nightly(world_store, world, index_dir=index_dir)
    before = run_rows(world_store, first["run_id"])
    _re_embed(index_dir)
    again = _nightly(world_store, world, index_dir=index_dir)
    assert not again["already_complete"] and again["run_id"] != first["run_id"]
    assert runs.latest_run(world_store).run_id == again["run_id"]
    rows = run_rows(world_store, again["run_id"])
    assert not rows.equals(before)  # the new content ranks other lists
    clean = _nightly(world_store, world, index_dir=index_dir, rerank=True)
    pd.testing.assert_frame_equal(rows, run_rows(world_store, clean["run_id"]), check_exact=False, rtol=1e-6)
    # Nothing changed since: a retry returns the night (and a killed one resumes, tested above).
    assert _nightly(world_store, world, index_dir=index_dir, progress=lambda *a: pytest.fail("ranked again"))["already_complete"]


def test_running_lock_refuses_a_second_run(world_store, world):
    first = _nightly(world_store, world)
    with acquire_lock(world_store, holder="other-host:4242"):
        with pytest.raises(RunLockedError, match=r"lock 'nightly' is held by other-host:4242 since .* UTC"):
            _nightly(world_store, world)
    assert runs.latest_run(world_store).run_id == first["run_id"]
    assert len(run_rows(world_store, first["run_id"])) == first["counts"]["recommendations"]


@pytest.mark.slow
def test_pruning_keeps_the_newest_runs(world_store, world):
    ids = [_nightly(world_store, world, keep_runs=2, rerank=True)["run_id"] for _ in range(3)]
    assert [runs.get_run(world_store, i).status for i in ids] == ["pruned", "complete", "complete"]
    assert run_rows(world_store, ids[0]).empty and not run_rows(world_store, ids[1]).empty


def test_a_retry_of_a_night_already_done_returns_its_run_without_ranking_again(world_store, world):
    # Airflow retries exit 1 (a failed export) and 3 too: each retry ranked the whole night
    # again as a new run and pushed an earlier night out of keep_runs.
    first = _nightly(world_store, world, keep_runs=1)
    again = _nightly(world_store, world, keep_runs=1, progress=lambda *a: pytest.fail("ranked the night again"))
    assert again["already_complete"] and not first["already_complete"]
    assert (again["run_id"], again["status"], again["counts"]) == (first["run_id"], "complete", first["counts"])
    assert again["pruned_runs"] == [] and runs.latest_run(world_store).run_id == first["run_id"]
    # Other inputs (here k) make a new run.
    other = _nightly(world_store, world, keep_runs=1, k=K - 1)
    assert other["run_id"] != first["run_id"] and not other["already_complete"]


def test_a_retry_that_finds_the_night_done_abandons_a_killed_rerank_of_it(world_store, world):
    # The killed --rerank stayed 'running' with its partial rows: the retry returned the done
    # run and left it, so monitoring saw a run that never finished.
    first = _nightly(world_store, world)
    with pytest.raises(KeyboardInterrupt):
        _nightly(world_store, world, rerank=True, progress=stop_after_shards(1))
    killed = first["run_id"] + 1
    assert runs.get_run(world_store, killed).status == "running" and runs.finished_shards(world_store, killed)
    again = _nightly(world_store, world, progress=lambda *a: pytest.fail("ranked the night again"))
    assert again["already_complete"] and again["run_id"] == first["run_id"] and again["abandoned_runs"] == [killed]
    info = runs.get_run(world_store, killed)
    assert (info.status, info.message) == ("failed", f"superseded by run {first['run_id']}, which ranked the same inputs")
    assert runs.finished_shards(world_store, killed) == {} and run_rows(world_store, killed).empty
    assert len(run_rows(world_store, first["run_id"])) == first["counts"]["recommendations"]


def test_a_new_recsys_release_ranks_the_night_again(world_store, world, monkeypatch):
    # The plan named the model, index and data but not the code: an upgrade's retry returned
    # the lists the old release ranked.
    first = _nightly(world_store, world)
    assert runs.get_run(world_store, first["run_id"]).plan["recsys_version"] == recsys.release()
    monkeypatch.setattr(recsys, "__version__", "99.0.0")
    upgraded = _nightly(world_store, world)
    assert upgraded["run_id"] != first["run_id"] and not upgraded["already_complete"]
    assert runs.get_run(world_store, upgraded["run_id"]).plan["recsys_version"].startswith("99.0.0+")


def test_new_code_under_the_same_version_number_ranks_the_night_again(world_store, world, monkeypatch):
    # The version is 0.1.0 in every commit: a release's plan was the old one's, so the upgraded
    # job returned the old code's run (and finished a killed one with the new code).
    first = _nightly(world_store, world)
    monkeypatch.setattr(recsys, "_this_source", lambda: "0" * 16)  # other sources, same version
    upgraded = _nightly(world_store, world)
    assert upgraded["run_id"] != first["run_id"] and not upgraded["already_complete"]
    assert runs.get_run(world_store, upgraded["run_id"]).plan["recsys_version"] == f"{recsys.__version__}+{'0' * 16}"


def test_bad_inputs(store, world_store, world):
    with pytest.raises(ConfigError, match="nightly.engine is 'spark', expected one of local, ray"):
        _nightly(world_store, world, engine_name="spark")
    with pytest.raises(ConfigError, match="nightly.shard_size is 0, expected an integer >= 1"):
        _nightly(world_store, world, shard_size=0)
    with pytest.raises(ConfigError, match=r"nightly.k is 50, expected at most num_candidates \(40\)"):
        _nightly(world_store, world, k=50)
    with pytest.raises(ConfigError, match="nightly.active_days is 0, expected a number of days above 0 and at most 36500"):
        _nightly(world_store, world, active_days=0)
    with pytest.raises(ConfigError, match="nightly.freshness_days is inf, expected a number of days above 0"):
        _nightly(world_store, world, freshness_days=float("inf"))
    with pytest.raises(ConfigError, match=r"nightly.k is 40000, expected at most 32767 \(the largest rank the store holds\)"):
        _nightly(world_store, world, k=40_000, num_candidates=50_000)
    with pytest.raises(ConfigError, match="nightly.workers is -1, expected 0 or more"):
        _nightly(world_store, world, num_workers=-1)
    with pytest.raises(ConfigError, match="nightly.workers is 0, the ray engine needs at least 1 actor"):
        _nightly(world_store, world, engine_name="ray", num_workers=0)
    with pytest.raises(ConfigError, match=r"as_of 2019-11-14 12:00:00 is before the store's latest impression \(2019-11-15 12:00:00\)"):
        _nightly(world_store, world, as_of=world.as_of - timedelta(days=1))
    message = "no active user: nobody was shown an impression in the 7 days before 2020-01-01 00:00:00"
    with pytest.raises(RecsysError, match=message):
        _nightly(world_store, world, as_of=world.as_of + timedelta(days=46, hours=12))
    assert read_lock(world_store) is None


def test_empty_store_is_refused(store, world):
    with pytest.raises(RecsysError, match="the store holds no impressions"):
        _nightly(store, world)


def test_index_of_another_model_is_refused(world_store, world, tmp_path):
    from recsys.index.faiss_index import FaissIndex

    other = FaissIndex.build(np.array(["N000"]), np.ones((1, 4), np.float32) / 2, kind="flat", num_threads=1)
    other.save(tmp_path / "index-other")
    with pytest.raises(ModelMismatchError, match="key 'dim' is 4 in the saved index, expected 20"):  # D 16 + 4 prior columns
        _nightly(world_store, world, index_dir=tmp_path / "index-other")


def test_model_bundle_must_be_readable(world_store, world, tmp_path):
    with pytest.raises(NotFoundError, match=f"model bundle {tmp_path} has no config.json"):
        _nightly(world_store, world, model_dir=tmp_path)
    (tmp_path / "config.json").write_text('{"history_len": 8}')
    with pytest.raises(ModelMismatchError, match=r"keys \['embedding_dim', 'side_features'\] are missing"):
        _nightly(world_store, world, model_dir=tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DamagedFileError, match="config.json: the file is there but cannot be read as the model config"):
        _nightly(world_store, world, model_dir=tmp_path)


def testworker_url_is_absolute_for_sqlite(tmp_path, monkeypatch):
    from sqlalchemy import create_engine

    from recsys.ranking.nightly import worker_url

    monkeypatch.chdir(tmp_path)
    assert worker_url(create_engine("sqlite:///rel/store.db")) == f"sqlite:///{tmp_path}/rel/store.db"
    assert worker_url(create_engine("sqlite:////abs/store.db")) == "sqlite:////abs/store.db"
    assert worker_url(create_engine("postgresql+psycopg://u:secret@h/db")) == "postgresql+psycopg://u:secret@h/db"


def test_histories_are_read_as_the_model_was_trained(world_store, world, tmp_path, monkeypatch):
    # A model trained on the History column alone must not be served histories led by the
    # logged impression clicks (predict and evaluate already read it so).
    import json
    import shutil

    from recsys.store import repository

    asked = []
    real = repository.read_user_histories

    def spy(engine, user_ids, news_ids, **kwargs):
        asked.append(kwargs.get("include_impression_clicks", True))
        return real(engine, user_ids, news_ids, **kwargs)

    monkeypatch.setattr(repository, "read_user_histories", spy)
    assert json.loads((world.model_dir / "config.json").read_text())["logged_clicks"] is False
    _nightly(world_store, world)
    # The model reads the History column; every click is read too, to keep them out of the lists.
    assert asked and asked.count(False) == asked.count(True)

    logged = tmp_path / "model-logged"
    shutil.copytree(world.model_dir, logged)
    config = json.loads((logged / "config.json").read_text())
    (logged / "config.json").write_text(json.dumps({**config, "logged_clicks": True}))
    asked.clear()
    _nightly(world_store, world, model_dir=logged)
    assert asked and set(asked) == {True}


def test_the_category_affinity_rescores_every_candidate_with_the_readers_clicks_and_skips(world_store, world,
                                                                                          affinity_model_dir):
    """A model with the category affinity: each stored score is the affinity over the plain
    model's logit, with the reader's clicks (the History the model reads: its newest
    history_len) and skips (label 0 in the store's impressions) of the candidate's category,
    subcategory and (with content clusters) nearest centres, counted here from the world."""
    import json

    from recsys.index.faiss_index import FaissIndex

    every = dict(k=40, num_candidates=40)  # every candidate stored, so that both runs hold the same pairs
    plain = run_rows(world_store, _nightly(world_store, world, **every)["run_id"])
    rescored = run_rows(world_store, _nightly(world_store, world, model_dir=affinity_model_dir, **every)["run_id"])
    affinity = json.loads((affinity_model_dir / "config.json").read_text())["category_affinity"]
    weights = affinity["weights"]

    with world_store.connect() as conn:
        shown = conn.execute(select(s.impressions.c.user_id, s.impression_items.c.news_id)
                             .join(s.impressions, s.impressions.c.id == s.impression_items.c.impression_pk)
                             .where(s.impression_items.c.label == 0)).all()
    skipped: dict = {}
    for user, news_id in shown:
        skipped.setdefault(user, set()).add(news_id)
    keys = {n: (c, (c, sub)) for n, c, sub in zip(world.news_ids, world.categories, world.subcategories)}
    if "clusters" in affinity:  # each block's nearest centre, by a loop; None where the block is zero
        vectors = FaissIndex.load(world.index_dir).vectors(world.news_ids)
        anchors = vectors[:, json.loads((affinity_model_dir / "config.json").read_text())["embedding_dim"]:].astype(float)
        clusters = affinity["clusters"]
        for row, n in enumerate(world.news_ids):
            codes = []
            for offset, table in zip(clusters["offsets"], clusters["centres"]):
                x = anchors[row, offset : offset + len(table[0])]
                codes.append(None if x @ x < 0.5 else int(np.argmax([x @ np.array(c) for c in table])))
            keys[n] = (*keys[n], *codes)
        assert {key[2] for key in keys.values()} == {0, 1, 2} and {key[3] for key in keys.values()} == {None, 0, 1, 2}
    pairs = plain.merge(rescored, on=[USER_ID, NEWS_ID], suffixes=("_plain", "_affinity"))
    assert len(pairs) == len(plain) == len(rescored) > 100
    expected = []
    for user, news_id, p in zip(pairs[USER_ID], pairs[NEWS_ID], pairs[f"{SCORE}_plain"]):
        history = [keys[n] for n in world.clicks.get(user, [])[-8:]]  # the History column's newest 8
        skips = [keys[n] for n in skipped.get(user, ())]
        n, m = len(history), len(skips)
        row = [np.log(p / (1 - p))]
        for k, mine in enumerate(keys[news_id]):  # the category, the subcategory within it, the clusters
            clicks = sum(mine is not None and key[k] == mine for key in history)
            skip = sum(mine is not None and key[k] == mine for key in skips)
            lift = np.log((clicks + 0.5) / (skip + 0.5)) - np.log((n + 0.5) / (m + 0.5))
            row += [np.log1p(clicks), np.log1p(skip), clicks / max(n, 1), skip / max(m, 1), lift]
        z = AFFINITY_INTERCEPT + np.dot(weights, row + [np.log1p(n), np.log1p(m)])
        expected.append(1 / (1 + np.exp(-z)))
    np.testing.assert_allclose(pairs[f"{SCORE}_affinity"], expected, rtol=2e-4, atol=1e-6)
    assert np.abs(pairs[f"{SCORE}_affinity"] - pairs[f"{SCORE}_plain"]).max() > 0.05


def test_impression_clicks_a_model_does_not_read_are_not_recommended(world_store, world):
    """A model trained on the History column only (``logged_clicks = false``) is not shown the
    clicks of impressions, but the lists must still leave out everything the reader clicked."""
    from sqlalchemy import insert

    first = run_rows(world_store, _nightly(world_store, world)["run_id"])
    top = first[first[RANK] == 1].set_index(USER_ID)[NEWS_ID]
    with world_store.begin() as conn:  # each reader has since clicked their first recommendation
        conn.execute(insert(s.clicks), [{"user_id": u, "news_id": n, "history_pos": None,
                                         "clicked_at": world.as_of - timedelta(hours=1)} for u, n in top.items()])
    second = run_rows(world_store, _nightly(world_store, world)["run_id"])
    again = second.merge(top.rename("clicked").reset_index(), on=USER_ID)
    assert len(top) > 10 and not (again[NEWS_ID] == again["clicked"]).any()


@pytest.mark.parametrize("num_threads", [1, None])
def test_the_thread_budget_reaches_an_in_process_worker(world_store, world, monkeypatch, num_threads):
    # [runtime] threads caps the whole job (a shared host): the worker must not reset it.
    from recsys.ranking import engines
    from recsys.threads import default_threads

    seen = []
    monkeypatch.setattr(engines, "configure_threads", lambda n=None: seen.append(n) or n)
    _nightly(world_store, world, num_threads=num_threads, num_workers=0)
    assert seen == [num_threads or default_threads()]


def test_each_shard_applies_the_thread_budget_on_the_thread_that_ranks_it(world_store, world, monkeypatch):
    # OpenMP's count is per thread: set on the worker's set-up thread only, a Ray actor's
    # method thread ran FAISS (and OpenMP BLAS) on every core.
    from recsys.ranking import engines

    seen = []
    real = engines.limit_this_thread
    monkeypatch.setattr(engines, "limit_this_thread", lambda n: seen.append(n) or real(n))
    run = _nightly(world_store, world, num_threads=1, num_workers=0, shard_size=7)
    assert len(seen) == run["counts"]["shards"] > 1 and set(seen) == {1}


def test_worker_processes_share_the_thread_budget(world_store, world, monkeypatch, caplog):
    from recsys.ranking import nightly

    class Stop(Exception):
        pass

    def capture(setup, shards, **kwargs):
        raise Stop((setup.num_threads, kwargs["num_workers"]))

    monkeypatch.setattr(nightly, "run_local", capture)
    with pytest.raises(Stop) as stopped:
        _nightly(world_store, world, num_threads=3, num_workers=2)
    assert stopped.value.args == ((1, 2),)  # 3 threads for 2 workers: one each, never 2 x 2
    caplog.clear()
    with pytest.raises(Stop) as stopped:
        _nightly(world_store, world, num_threads=2, num_workers=3)
    # More workers than threads ran 3 on a budget of 2: now 2 of one thread each.
    assert stopped.value.args == ((1, 2),)
    assert "nightly.workers = 3 is more than the 2 threads of runtime.threads: ranking with 2 workers" in caplog.text
    # Unset, the budget is the machine's: the warning blamed runtime.threads all the same.
    caplog.clear()
    monkeypatch.setattr(nightly, "default_threads", lambda: 1)
    with pytest.raises(Stop) as stopped:
        _nightly(world_store, world, num_threads=None, num_workers=2)
    assert stopped.value.args == ((1, 1),)
    assert ("nightly.workers = 2 is more than the 1 threads of the cores available: runtime.threads is unset, so "
            "LOKY_MAX_CPU_COUNT, the CPU affinity or quota") in caplog.text
    with pytest.raises(ConfigError, match="runtime.threads is -1"):
        _nightly(world_store, world, num_threads=-1)


def test_cold_start_candidates_follow_the_index_freshness(world_store, world, tmp_path):
    # Articles never shown have no first-seen time; the index gives them their indexing time,
    # after which they age out for users with a history. Cold users must not keep them for ever.
    from datetime import datetime

    from recsys.index.faiss_index import FaissIndex
    from recsys.ranking.nightly import _prepare

    as_of = datetime(2019, 11, 15, 12, 0, 0)
    never = [n for n, t in zip(world.news_ids, world.first_seen) if t is None]
    index = FaissIndex.load(world.index_dir)
    for name, published in (("aged", as_of - timedelta(days=10)), ("recent", as_of - timedelta(hours=1))):
        index.set_published(never, np.full(len(never), np.datetime64(published, "s")))
        index.save(tmp_path / name)
        prepared = _prepare(world_store, world.model_dir, tmp_path / name, as_of=as_of, freshness_days=3)
        popular = set(prepared["news_ids"][prepared["popular"]])
        if name == "aged":
            assert not popular & set(never)
        else:
            assert set(never) <= popular
        # The same rule as the users with a history: the index's published_after filter.
        fresh = set(prepared["news_ids"][index.published(prepared["news_ids"]) >= prepared["published_after"]])
        assert popular <= fresh


def test_a_job_whose_lock_was_taken_over_touches_no_run(world_store, world):
    # A job frozen past the stale limit lost its lock to a retry elsewhere; when it wakes up it
    # must neither abandon the new holder's run nor create or complete one of its own.
    from datetime import timedelta as td

    from recsys.ranking.lock import LockLostError

    frozen = acquire_lock(world_store, holder="host-a:1", heartbeat_every=td(hours=1))
    retry = acquire_lock(world_store, holder="host-b:2", stale_after=td(0))
    theirs = runs.create_run(world_store, model_version="model-v1", plan={"k": 1})
    retry.attach_run(theirs)
    with pytest.raises(LockLostError, match="host-b:2 took it over"):
        _nightly(world_store, world, lock=frozen)
    # The same when its heartbeat noticed first: still LockLostError (exit 1), not a ValueError.
    assert frozen.lost and frozen.held
    with pytest.raises(LockLostError, match="host-b:2 took it over"):
        _nightly(world_store, world, lock=frozen)
    assert runs.get_run(world_store, theirs).status == "running"
    with world_store.connect() as conn:
        assert conn.execute(select(s.runs.c.run_id)).scalars().all() == [theirs]
    assert read_lock(world_store).holder == "host-b:2"
    retry.release()


def test_cold_start_readers_who_clicked_popular_articles_still_get_k(world_store, world):
    """Readers without a History whose impression clicks (unread by this History-only model)
    are the most popular articles: at k == num_candidates they still get k fresh articles."""
    from sqlalchemy import insert

    from recsys.ranking.nightly import _prepare

    prepared = _prepare(world_store, world.model_dir, world.index_dir, as_of=world.as_of, freshness_days=3)
    top = prepared["news_ids"][prepared["popular"][:3]]
    with world_store.begin() as conn:
        conn.execute(insert(s.clicks), [{"user_id": u, "news_id": n, "history_pos": None,
                                         "clicked_at": world.as_of - timedelta(hours=1)}
                                        for u in world.cold_users for n in top])
    rows = run_rows(world_store, _nightly(world_store, world, k=10, num_candidates=10)["run_id"])
    cold = rows[rows[USER_ID].isin(world.cold_users)]
    fresh = {n for n, t in zip(world.news_ids, world.first_seen) if t is not None and t >= world.as_of - timedelta(days=3)}
    assert len(fresh - set(top)) >= 10  # enough eligible articles for a full list
    assert (cold.groupby(USER_ID).size().reindex(world.cold_users) == 10).all()
    assert not cold[NEWS_ID].isin(top).any() and set(cold[NEWS_ID]) <= fresh


def _empty_index(world, tmp_path):
    from recsys.index.faiss_index import FaissIndex

    dim = FaissIndex.load(world.index_dir).dim
    FaissIndex.build(np.array([], dtype=str), np.zeros((0, dim), np.float32), kind="flat", num_threads=1).save(tmp_path / "empty")
    return tmp_path / "empty"


def test_a_run_that_recommends_nothing_fails_and_readers_keep_the_last_lists(world_store, world, tmp_path):
    # An index without articles (or a night whose files were not ingested) left every active
    # user with nothing. Completing that run switched every surface to empty lists and only
    # logged a warning; now it fails (exit 1 for cron) and yesterday's run stays the one read.
    from recsys.ranking.nightly import NothingToRecommendError

    with pytest.raises(NothingToRecommendError, match=r"readers keep no lists \(there is no complete run\)"):
        _nightly(world_store, world, index_dir=_empty_index(world, tmp_path))
    yesterday = _nightly(world_store, world)
    kept = run_rows(world_store, yesterday["run_id"])
    assert not kept.empty
    message = (rf"^run (\d+) recommends nothing to any of its {len(world.active_users)} users: no article was eligible "
               rf"\(the index holds 0; .*, the store's latest impression time, .*\); the run is marked failed and readers "
               rf"keep run {yesterday['run_id']}'s lists: check the ingest and that window \(one stored impression dated "
               rf"after the rest moves that time\)$")
    with pytest.raises(NothingToRecommendError, match=message) as raised:
        _nightly(world_store, world, index_dir=_empty_index(world, tmp_path))
    failed = runs.get_run(world_store, int(re.match(message, str(raised.value)).group(1)))
    assert failed.status == "failed" and "recommends nothing" in failed.message
    # A clock the caller gave is not the store's: the message does not blame a stored line.
    with pytest.raises(NothingToRecommendError) as given:
        _nightly(world_store, world, index_dir=_empty_index(world, tmp_path),
                 as_of=datetime.fromisoformat(failed.plan["as_of"]))
    assert "latest impression" not in str(given.value) and "moves that time" not in str(given.value)
    assert runs.latest_run(world_store).run_id == yesterday["run_id"]
    pd.testing.assert_frame_equal(run_rows(world_store, yesterday["run_id"]), kept)
    user = kept[USER_ID].iloc[0]
    assert runs.recommendations_for_user(world_store, user, k=K)[NEWS_ID].tolist() == kept[kept[USER_ID] == user][NEWS_ID].tolist()


def test_a_run_that_cannot_be_marked_failed_still_reports_its_own_error(world_store, world, tmp_path, monkeypatch, caplog):
    # A full disk failed the ranking, then marking the run failed: only the second error was
    # printed, and the cause was a chained exception shown with --verbose alone.
    import logging

    from sqlalchemy.exc import OperationalError

    from recsys.ranking.nightly import NothingToRecommendError

    def full(*args, **kwargs):
        raise OperationalError("UPDATE runs", {}, Exception("database or disk is full"))

    monkeypatch.setattr(runs, "fail_run", full)
    with caplog.at_level(logging.ERROR, logger="recsys.ranking.nightly"):
        with pytest.raises(NothingToRecommendError):
            _nightly(world_store, world, index_dir=_empty_index(world, tmp_path))
    assert re.search(r"could not mark run \d+ failed \(OperationalError: .*database or disk is full", caplog.text)


def test_popularity_is_read_from_the_last_labelled_window_when_later_impressions_have_no_labels(world_store, world, caplog):
    # A MIND test file (no labels) ingested last moved the run's time a day past every labelled
    # show: the 24 h window before it was empty and every article read as never shown.
    from recsys.models.side_features import SIDE_FEATURE_NAMES
    from recsys.ranking.nightly import _prepare

    popularity = [SIDE_FEATURE_NAMES.index(name) for name in ("log_clicks", "log_shows")]
    age = SIDE_FEATURE_NAMES.index("log_age_hours")
    at_end = _prepare(world_store, world.model_dir, world.index_dir, as_of=world.as_of, freshness_days=3)
    assert "carry no labels" not in caplog.text
    later = _prepare(world_store, world.model_dir, world.index_dir, as_of=world.as_of + timedelta(days=1), freshness_days=3)
    assert len(np.unique(at_end["side"][:, popularity[0]])) > 1  # the world's last day has clicks to read
    np.testing.assert_array_equal(later["side"][:, popularity], at_end["side"][:, popularity])
    assert (later["side"][:, age] > at_end["side"][:, age]).any()  # ages still at the run's time
    # Cold-start lists: the same popularity order, less what aged out of the freshness window.
    still_fresh = set(later["popular"].tolist())
    assert [row for row in at_end["popular"].tolist() if row in still_fresh] == later["popular"].tolist()
    assert "carry no labels" not in caplog.text  # the store itself has no unlabelled impressions
