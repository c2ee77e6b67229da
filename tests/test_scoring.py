"""Scoring a behaviors file (predict / evaluate) serves each model the histories it trained on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsys.config import Workspace, load_config
from recsys.data.mind import iter_behaviors
from recsys.models.samples import with_logged_clicks
from recsys.pipelines.ingest import run_ingest
from recsys.pipelines.scoring import VersionScorer, iter_behavior_chunks, load_scoring_catalogue
from recsys.pipelines.train import run_train
from recsys.store.database import open_store
from recsys.versions import get_version


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A sample world ingested, and two one-epoch models: with and without logged clicks."""
    from recsys.data.sample import generate_sample

    world = tmp_path_factory.mktemp("world") / "sample"
    generate_sample(world, num_users=80, num_news=160, num_impressions=400, seed=5)
    ws = Workspace(tmp_path_factory.mktemp("ws")).ensure()
    engine = open_store(ws.default_db_url)
    run_ingest(engine, ws, news=world / "news.tsv", behaviors=world / "behaviors_train.tsv", images=world / "images")
    versions = {}
    for flag in (False, True):
        config = load_config(None, {"model.epochs": 1, "model.logged_clicks": flag, "model.embedding_dim": 32, "model.anchor_dim": 4})
        versions[flag] = run_train(engine, ws, config, make_current=flag)["version"]
    yield world, ws, engine, config, versions
    engine.dispose()


def test_catalogue_clicks_are_the_clicks_of_the_ingested_file(trained):
    world, ws, engine, config, _ = trained
    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    expected = sorted((row.user_id, np.datetime64(row.time, "s"), n)
                      for row in iter_behaviors(world / "behaviors_train.tsv")
                      for n, label in zip(row.news_ids, row.labels) if label == 1)
    clicks = catalogue.clicks
    users = np.repeat(clicks.user_ids, np.diff(clicks.offsets))
    got = sorted(zip(users.tolist(), clicks.times.tolist(), catalogue.features.news_ids[clicks.items].tolist()))
    assert got == [(u, t.astype(object), n) for u, t, n in expected]


def test_each_model_is_served_the_histories_it_was_trained_on(trained):
    world, ws, engine, config, versions = trained
    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    imps, _ = next(iter_behavior_chunks(Path(world / "behaviors_test.tsv"), catalogue, history_len=50))
    for flag, version in versions.items():
        mv = get_version(engine, version)
        assert mv.manifest["logged_clicks"] is flag
        scorer = VersionScorer(mv, catalogue)
        assert scorer.model.config.logged_clicks is flag
        led = with_logged_clicks(imps, catalogue.clicks, scorer.history_len)
        on_led = scorer.model.score_impressions(led, scorer.embeddings, catalogue.log, catalogue.first_seen)
        on_file = scorer.model.score_impressions(imps, scorer.embeddings, catalogue.log, catalogue.first_seen)
        # The test window follows training: its users' training clicks change their vectors.
        assert np.abs(on_led - on_file).max() > 1e-4
        np.testing.assert_allclose(scorer.score(imps), on_led if flag else on_file, rtol=1e-5, atol=1e-6)
