"""`recsys evaluate --baselines`: text-only and image-only versions trained like the evaluated one."""

from __future__ import annotations

import pytest

from recsys.config import load_config
from recsys.pipelines.evaluate import find_ablations, train_missing_ablations, training_settings
from recsys.pipelines.train import run_train
from recsys.versions import get_version
from tests.sample_store import ingested_sample

pytestmark = pytest.mark.slow

SMALL = {"model.epochs": 1, "model.embedding_dim": 16, "model.anchor_dim": 4}


def test_ablations_take_the_evaluated_versions_settings_not_todays_config(tmp_path):
    world, ws, engine = ingested_sample(tmp_path, num_users=60, num_news=150, num_impressions=200, seed=6)
    trained = {**SMALL, "model.seed": 3, "model.history_len": 20, "model.content_prior": False}
    # Exactly text+image: on a world this small a modality can measure as silent and be dropped.
    current = get_version(engine, run_train(engine, ws, load_config(None, trained), exact_modalities=True)["version"])
    assert current.manifest["model_config"]["seed"] == 3

    # Today's config differs in every one of these; the ablations must not read it.
    today = load_config(None, {**SMALL, "model.epochs": 2, "model.seed": 0, "model.history_len": 50, "model.embedding_dim": 32})
    assert find_ablations(engine, current) == {}
    found = train_missing_ablations(engine, ws, today, current, {})
    assert set(found) == {"text", "image"}
    for modalities, mv in found.items():
        assert mv.manifest["modalities"] == modalities
        assert {**training_settings(mv.manifest), "modalities": "text,image"} == training_settings(current.manifest)
        assert len(mv.manifest["history"]["loss"]) == 1  # the version's one epoch, not today's two
        assert mv.manifest["training_window"] == current.manifest["training_window"]
    assert {m: v.version for m, v in find_ablations(engine, current).items()} == {m: v.version for m, v in found.items()}
    # A text-only model is not its own ablation: it is compared with the image-only one alone.
    text_only = found["text"]
    assert {m: v.version for m, v in find_ablations(engine, text_only).items()} == {"image": found["image"].version}

    # Another seed on the same window is another experiment: its ablations are not these.
    other = get_version(engine, run_train(engine, ws, load_config(None, {**trained, "model.seed": 4}), exact_modalities=True)["version"])
    assert other.manifest["training_window"] == current.manifest["training_window"]
    assert find_ablations(engine, other) == {}
    engine.dispose()


def test_settings_of_a_manifest_from_before_model_config_was_recorded():
    old = {"modalities": "text,image", "fusion": "gated", "seed": 2, "embedding_dim": 64, "version": "v1", "metrics": {}}
    assert training_settings(old) == {"modalities": "text,image", "fusion": "gated", "seed": 2, "embedding_dim": 64}


def test_a_setting_added_since_reads_as_it_was_before_it_existed():
    """A version whose model_config predates a key was trained without it: an averaged model is
    not trained alike with one from before the average existed."""
    from recsys.config import ModelConfig
    from recsys.pipelines.evaluate import _trained_alike
    from dataclasses import asdict

    today = {"model_config": {**asdict(ModelConfig()), "weight_average": 0.5}}
    before = {"model_config": {k: v for k, v in asdict(ModelConfig()).items()
                               if k not in ("category_affinity", "affinity_clusters", "weight_average")}}
    settings = training_settings(before)
    assert (settings["category_affinity"], settings["affinity_clusters"], settings["weight_average"]) == (False, 0, 0.0)
    assert not _trained_alike(before, today)
    assert _trained_alike(before, {"model_config": {**asdict(ModelConfig()), "category_affinity": False,
                                                    "affinity_clusters": 0}})
