"""The saved ranking model: round trip, mismatch errors, cold start, missing image, consistency."""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import keras
import numpy as np
import pytest

from recsys.encoders.item_features import EncoderInfo
from recsys.errors import ModelMismatchError, NotFoundError
from recsys.models import bundle
from recsys.models.bundle import MODEL_FILES, RankingModel
from recsys.models.ctr import CTRModel
from recsys.data.interactions import InteractionLog, candidate_impression_rows, first_shown, select_impressions
from recsys.models.training import _BatchMaker


@pytest.fixture(scope="module")
def small(small_world):
    log = InteractionLog.from_impressions([small_world.train, small_world.valid], len(small_world.features))
    first = first_shown([small_world.train, small_world.valid, small_world.test], len(small_world.features))
    return small_world, log, first


@pytest.fixture(scope="module")
def model(small_world):
    f = small_world.features
    m = RankingModel.create(f.text_encoder, f.image_encoder, ["category0", "category1", "category2"],
                            embedding_dim=16, history_len=5, num_heads=2, seed=3)
    # Non-trivial weights everywhere (biases start at zero; calibration at identity).
    rng = np.random.default_rng(0)
    for block in (m.item_tower, m.user_encoder, m.scorer):
        block.set_weights([w + rng.normal(0, 0.05, np.shape(w)).astype(np.float32) for w in block.get_weights()])
    return m


def _predict(m: RankingModel, small):
    world, log, first = small
    emb = m.item_embeddings(world.features)
    users = m.user_vectors(world.test.history_offsets, world.test.history_items, emb)
    scores = m.score_impressions(world.test, emb, log, first)
    return emb, users, scores


def test_save_load_gives_identical_predictions(model, small, tmp_path):
    model.save(tmp_path / "bundle")
    loaded = RankingModel.load(tmp_path / "bundle")
    for a, b in zip(_predict(model, small), _predict(loaded, small)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert loaded.config == model.config
    # every part is a plain Keras file
    for name in MODEL_FILES:
        assert isinstance(keras.saving.load_model(tmp_path / "bundle" / name), keras.Model)
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert config["categories"] == ["category0", "category1", "category2"]
    assert config["history_len"] == 5 and config["embedding_dim"] == 16
    assert config["modalities"] == "text,image" and config["fusion"] == "gated"
    assert config["text_encoder"] == model.config.text_encoder.to_dict() and config["seed"] == 3
    assert set(config["side_features"]) == {"names", "window_hours", "mean", "std"}
    assert config["logged_clicks"] is False


@pytest.mark.parametrize("mask, mode", [(0o022, 0o755), (0o002, 0o775), (0o077, 0o700)], ids=["022", "002", "077"])
def test_a_saved_bundle_folder_follows_the_umask(model, tmp_path, mask, mode):
    # It was assembled in a mkdtemp folder (0700) and renamed into place: a model version the job
    # wrote could not be read from the data scientists' accounts whatever the umask.
    import os

    before = os.umask(mask)
    try:
        model.save(tmp_path / "bundle")
    finally:
        os.umask(before)
    assert (tmp_path / "bundle").stat().st_mode & 0o777 == mode
    assert all(path.stat().st_mode & 0o077 == mode & 0o066 for path in (tmp_path / "bundle").iterdir())


def test_the_versions_check_of_a_bundle_passes_a_saved_one(model, tmp_path):
    # `model use` and `model list` check the files without TensorFlow, by their own list of names.
    from recsys.versions import BUNDLE_MODEL_FILES, check_bundle_files

    assert BUNDLE_MODEL_FILES == MODEL_FILES
    model.save(tmp_path / "bundle")
    assert check_bundle_files(tmp_path / "bundle")["embedding_dim"] == 16


def test_logged_clicks_flag_survives_save_and_old_bundles_read_false(small_world, tmp_path):
    f = small_world.features
    m = RankingModel.create(f.text_encoder, f.image_encoder, ["c"], embedding_dim=16, history_len=5, num_heads=2,
                            logged_clicks=True)
    m.save(tmp_path / "bundle")
    assert RankingModel.load(tmp_path / "bundle").config.logged_clicks is True
    # A bundle saved before the flag existed was trained on History columns only.
    path = tmp_path / "bundle" / "config.json"
    config = json.loads(path.read_text())
    del config["logged_clicks"]
    path.write_text(json.dumps(config))
    assert RankingModel.load(tmp_path / "bundle").config.logged_clicks is False


def test_file_exposure_calibration_survives_save_and_old_bundles_have_none(model, tmp_path):
    from recsys.errors import DamagedFileError
    from recsys.models.exposure import ExposureCalibration

    cal = ExposureCalibration((0.4, 0.5, -0.7, 0.1, 0.2), -2.5, window_hours=23.75)
    with_cal = RankingModel(model.item_tower, model.user_encoder, model.scorer,
                            dataclasses.replace(model.config, file_exposure=cal))
    with_cal.save(tmp_path / "bundle")
    assert RankingModel.load(tmp_path / "bundle").config.file_exposure == cal
    path = tmp_path / "bundle" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "file_exposure": {**config["file_exposure"], "weights": [0.4, 0.5]}}))
    with pytest.raises(DamagedFileError, match=re.escape(f"{path}: the file is there but cannot be read (")):
        RankingModel.load(tmp_path / "bundle")
    del config["file_exposure"]  # saved before the calibration existed
    path.write_text(json.dumps(config))
    assert RankingModel.load(tmp_path / "bundle").config.file_exposure is None


def test_the_category_affinity_survives_save_and_old_bundles_have_none(model, tmp_path):
    from recsys.errors import DamagedFileError
    from recsys.models.affinity import FEATURES, AffinityCalibration

    aff = AffinityCalibration(tuple(np.linspace(-1.0, 1.5, len(FEATURES))), -1.25)
    with_aff = RankingModel(model.item_tower, model.user_encoder, model.scorer,
                            dataclasses.replace(model.config, category_affinity=aff))
    with_aff.save(tmp_path / "bundle")
    assert RankingModel.load(tmp_path / "bundle").config.category_affinity == aff
    path = tmp_path / "bundle" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "category_affinity": {**config["category_affinity"], "weights": [0.4]}}))
    with pytest.raises(DamagedFileError, match=re.escape(f"{path}: the file is there but cannot be read (")):
        RankingModel.load(tmp_path / "bundle")
    del config["category_affinity"]  # saved before the affinity existed
    path.write_text(json.dumps(config))
    assert RankingModel.load(tmp_path / "bundle").config.category_affinity is None


def test_calibrated_logits_are_what_score_applies_to_logits(model, small):
    world, log, first = small
    layer = model._scorer_layer
    layer.set_calibration(1.7, -0.4)
    try:
        emb = model.item_embeddings(world.features)
        logits = model.score_impressions(world.test, emb, log, first, logits=True)
        probabilities = model.score_impressions(world.test, emb, log, first)
        np.testing.assert_allclose(1 / (1 + np.exp(-model.calibrated_logits(logits))), probabilities, rtol=1e-5, atol=1e-6)
    finally:
        layer.set_calibration(1.0, 0.0)


def test_save_replaces_an_existing_bundle_and_failure_keeps_the_old(model, tmp_path, monkeypatch):
    target = tmp_path / "bundle"
    model.save(target)
    model.save(target)  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]

    def broken_dump(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        model.save(target)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temp dir left behind
    RankingModel.load(target)


@pytest.mark.parametrize("name", ["config.json", "item_tower.keras", "scorer.keras"])
def test_a_truncated_bundle_file_is_named_as_damaged(model, tmp_path, name):
    # Keras said "File not found" of a truncated scorer.keras, and a truncated config.json
    # gave a bare JSONDecodeError: both exit 2 as internal errors, one naming no file.
    from recsys.errors import DamagedFileError

    model.save(tmp_path / "bundle")
    path = tmp_path / "bundle" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DamagedFileError, match=re.escape(f"{path}: the file is there but cannot be read (")):
        RankingModel.load(tmp_path / "bundle")


def test_a_config_whose_embedding_dim_is_not_the_networks_is_named_as_damaged(model, tmp_path):
    # An edited embedding_dim loaded, then failed at the first batch: "could not broadcast input
    # array from shape (400,128) into shape (400,64)", an internal error (exit 2).
    from recsys.errors import DamagedFileError

    model.save(tmp_path / "bundle")
    path = tmp_path / "bundle" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "embedding_dim": 8}))
    with pytest.raises(DamagedFileError, match=re.escape(f"{path}: embedding_dim gives 8 dimensions, but item_tower.keras "
                                                         "embeds articles in 16; the bundle's files do not belong together")):
        RankingModel.load(tmp_path / "bundle")


def test_load_refuses_other_encoders_naming_the_field(model, small_world, tmp_path):
    model.save(tmp_path / "bundle")
    text = small_world.features.text_encoder
    image = small_world.features.image_encoder
    RankingModel.load(tmp_path / "bundle", text_encoder=text, image_encoder=image)
    with pytest.raises(ModelMismatchError, match=r"text_encoder.name: .*saved with 'synthetic-text', but 'minilm' was given"):
        RankingModel.load(tmp_path / "bundle", text_encoder=EncoderInfo("minilm", text.version, text.dim))
    with pytest.raises(ModelMismatchError, match=r"image_encoder.dim: .*saved with 32, but 1024 was given"):
        RankingModel.load(tmp_path / "bundle", image_encoder=EncoderInfo(image.name, image.version, 1024))
    with pytest.raises(ModelMismatchError, match=r"image_encoder.version: .*saved with '1', but '2' was given"):
        RankingModel.load(tmp_path / "bundle", image_encoder=EncoderInfo(image.name, "2", image.dim))


def test_features_from_other_encoders_or_dims_are_refused(model, small_world):
    f = small_world.features
    other = type(f)(f.news_ids, f.text, f.image, f.has_image, f.categories,
                    EncoderInfo("other-text", "1", f.text.shape[1]), f.image_encoder)
    with pytest.raises(ModelMismatchError, match="text_encoder.name: the model was saved with 'synthetic-text', but 'other-text'"):
        model.item_embeddings(other)
    narrow = type(f)(f.news_ids, f.text, f.image[:, :10], f.has_image, f.categories, f.text_encoder, f.image_encoder)
    with pytest.raises(ModelMismatchError, match="image dim: the model was saved with 32, but features have 10"):
        model.item_embeddings(narrow)
    with pytest.raises(ModelMismatchError, match=r"embedding_dim: the model serves 16 columns \(embedding_dim 16 \+ content prior 0\), but item embeddings have shape \(3, 8\)"):
        model.user_vectors(np.array([0, 1]), np.array([0]), np.zeros((3, 8), np.float32))


def test_missing_bundle_files_raise_not_found(model, tmp_path):
    with pytest.raises(NotFoundError, match="has no config.json, item_tower.keras"):
        RankingModel.load(tmp_path / "nowhere")
    model.save(tmp_path / "bundle")
    (tmp_path / "bundle" / "scorer.keras").unlink()
    with pytest.raises(NotFoundError, match="has no scorer.keras"):
        RankingModel.load(tmp_path / "bundle")


def test_cold_start_users_and_history_cap(model, small_world):
    emb = model.item_embeddings(small_world.features)
    # user 0: no history; user 1: 8 clicks (capped to the 5 most recent); user 2: its first 5
    offsets = np.array([0, 0, 8, 13])
    items = np.array([3, 4, 5, 6, 7, 100, 101, 102, 3, 4, 5, 6, 7])
    users = model.user_vectors(offsets, items, emb)
    assert np.all(np.isfinite(users))
    cold = np.asarray(model.user_encoder.get_layer("user_encoder").cold_start)
    np.testing.assert_allclose(users[0], cold, atol=1e-6)
    np.testing.assert_allclose(users[1], users[2], atol=1e-6)
    assert not np.allclose(users[1], cold)
    # all users cold at once, and batches smaller than the user count
    np.testing.assert_allclose(model.user_vectors(np.zeros(4, np.int64), np.zeros(0, np.int64), emb), np.tile(cold, (3, 1)), atol=1e-6)
    np.testing.assert_allclose(model.user_vectors(offsets, items, emb, batch_size=1), users, atol=1e-6)
    with pytest.raises(ValueError, match="history item row 999 is outside the 200 item embeddings"):
        model.user_vectors(np.array([0, 1]), np.array([999]), emb)


def test_item_without_image_ignores_its_image_columns(model, small_world):
    f = small_world.features
    rows = np.flatnonzero(~f.has_image)[:5]
    sub = f.take(rows)
    garbage = type(f)(sub.news_ids, sub.text, sub.image + 3.0, sub.has_image, sub.categories, f.text_encoder, f.image_encoder)
    np.testing.assert_allclose(model.item_embeddings(garbage), model.item_embeddings(sub), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(model.item_embeddings(sub), axis=1), 1.0, atol=1e-5)


def test_unknown_category_is_embedded(model, small_world):
    f = small_world.features.take(np.arange(4))
    renamed = type(f)(f.news_ids, f.text, f.image, f.has_image, np.array(["brand-new"] * 4, dtype=object),
                      f.text_encoder, f.image_encoder)
    assert np.all(np.isfinite(model.item_embeddings(renamed)))


def test_score_impressions_matches_the_building_blocks(model, small):
    world, log, first = small
    emb, users, scores = _predict(model, small)
    owner = candidate_impression_rows(world.test)
    items = world.test.candidate_items
    side = model.side_features(items, world.test.times[owner], log, first)
    np.testing.assert_allclose(scores, model.score(users[owner], emb[items], side), atol=1e-6)
    np.testing.assert_allclose(model.score(users[owner], emb[items], side, batch_size=7), scores, atol=1e-6)
    assert np.all((scores > 0) & (scores < 1))
    # as_of: every candidate gets the side features of that one time
    as_of = world.valid.times.max()
    late = model.score_impressions(world.test, emb, log, first, as_of=as_of)
    side_then = model.side_features(items, np.full(len(items), as_of), log, first)
    np.testing.assert_allclose(late, model.score(users[owner], emb[items], side_then), atol=1e-6)
    # popularity_until + age_until: impressions after it get its statistics, earlier ones keep their own
    until = np.sort(world.test.times)[len(world.test) // 2]
    capped = model.score_impressions(world.test, emb, log, first, popularity_until=until, age_until=until)
    times = world.test.times[owner]
    side_capped = model.side_features(items, np.minimum(times, until), log, first)
    np.testing.assert_allclose(capped, model.score(users[owner], emb[items], side_capped), atol=1e-6)
    np.testing.assert_array_equal(capped[times <= until], scores[times <= until])
    assert np.abs(capped - scores)[times > until].max() > 1e-4  # the cap changed the later ones
    # popularity_until alone: popularity columns of the capped reading, the age column of each impression's own
    pop_capped = model.score_impressions(world.test, emb, log, first, popularity_until=until)
    side_mixed = np.concatenate([side_capped[:, :2], side[:, 2:]], axis=1)  # log clicks, log shows | log age
    np.testing.assert_allclose(pop_capped, model.score(users[owner], emb[items], side_mixed), atol=1e-6)
    np.testing.assert_array_equal(pop_capped[times <= until], scores[times <= until])
    assert np.abs(pop_capped - capped)[times > until].max() > 1e-4  # the true age moved the later ones
    with pytest.raises(ValueError, match=r"score expects user_vectors \(3, 16\)"):
        model.score(users[:3], emb[:2], side[:3])


def test_each_distinct_history_gets_its_user_vector_once(model, small, monkeypatch):
    # A user shown several lists of one file had the same vector computed once per list.
    world, log, first = small
    emb = model.item_embeddings(world.features)
    lengths = np.diff(world.test.history_offsets)
    a, b = np.flatnonzero(lengths > 0)[:2]
    cold = int(np.flatnonzero(lengths == 0)[0]) if (lengths == 0).any() else None
    rows = [a, b, a, a, b] + ([cold, cold] if cold is not None else [])
    repeated = select_impressions(world.test, np.array(rows))
    computed = []
    real = model.user_vectors

    def counted(offsets, items, embeddings, **kwargs):
        computed.append(len(offsets) - 1)
        return real(offsets, items, embeddings, **kwargs)

    monkeypatch.setattr(model, "user_vectors", counted)
    scores = model.score_impressions(repeated, emb, log, first)
    assert computed == [len(set(rows))]
    owner = candidate_impression_rows(repeated)
    users = real(repeated.history_offsets, repeated.history_items, emb)
    side = model.side_features(repeated.candidate_items, repeated.times[owner], log, first)
    np.testing.assert_allclose(scores, model.score(users[owner], emb[repeated.candidate_items], side), atol=1e-6)


def test_score_impressions_a_chunk_of_impressions_at_a_time(model, small, monkeypatch):
    # Impressions are scored SCORE_IMPRESSIONS at a time; with 7 the test window's chunks end
    # mid-window, and every candidate must still get its own impression's user and time.
    world, log, first = small
    emb = model.item_embeddings(world.features)
    monkeypatch.setattr(bundle, "SCORE_IMPRESSIONS", 7)
    assert len(world.test) > 7
    chunked = model.score_impressions(world.test, emb, log, first)
    owner = candidate_impression_rows(world.test)
    users = model.user_vectors(world.test.history_offsets, world.test.history_items, emb)
    side = model.side_features(world.test.candidate_items, world.test.times[owner], log, first)
    np.testing.assert_allclose(chunked, model.score(users[owner], emb[world.test.candidate_items], side), atol=1e-6)
    # A bad row in the second chunk is named at its position among all candidates.
    n = len(emb)
    items = world.test.candidate_items.copy()
    items[items == n - 1] = 0
    position = int(world.test.candidate_offsets[7]) + 1
    items[position] = n - 1
    bad = dataclasses.replace(world.test, candidate_items=items)
    with pytest.raises(ValueError, match=f"item row {n - 1} at position {position} "):
        model.score_impressions(bad, emb, log, first[: n - 1])


def test_training_model_and_bundle_agree(model, small, tmp_path):
    """The CTRModel used in training computes exactly what the bundle serves."""
    world, log, first = small
    f = world.features
    imps = world.test
    owner = candidate_impression_rows(imps)
    side = model.side_features(imps.candidate_items, imps.times[owner], log, first)
    maker = _BatchMaker(imps, side, model.vocabulary.lookup(f.categories), f.has_image.astype(np.float32),
                        history_len=model.config.history_len, negatives=2, category_dropout=0.0)
    rows = np.arange(10)
    batch = maker.make(rows, np.random.default_rng(0), listwise=False)
    ctr = CTRModel(model.item_tower, model.user_encoder, model.scorer)
    inputs = {k: batch[k] for k in ("has_image", "category", "history_index", "history_mask", "candidate_index", "side")}
    inputs.update(text=f.text[batch["rows"]], image=f.image[batch["rows"]])
    logits = np.asarray(ctr(inputs, training=False))
    served = model.score_impressions(imps, model.item_embeddings(f), log, first, logits=True)
    counts = np.diff(imps.candidate_offsets)[rows]
    for b, row in enumerate(rows):
        lo = imps.candidate_offsets[row]
        np.testing.assert_allclose(logits[b, : counts[b]], served[lo : lo + counts[b]], atol=1e-5)

    clone = CTRModel.from_config(ctr.get_config())
    clone.item_tower.set_weights(model.item_tower.get_weights())
    clone.user_encoder.set_weights(model.user_encoder.get_weights())
    clone.scorer.set_weights(model.scorer.get_weights())
    np.testing.assert_allclose(np.asarray(clone(inputs, training=False)), logits, atol=1e-6)

    # A native .keras file round-trips with its weights, like the three blocks the bundle saves.
    path = tmp_path / "ctr.keras"
    ctr.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, CTRModel) and loaded.name == ctr.name
    np.testing.assert_allclose(np.asarray(loaded(inputs, training=False)), logits, atol=1e-6)


def test_create_validates_arguments(small_world):
    f = small_world.features
    with pytest.raises(ValueError, match="history_len is 0, expected a positive integer"):
        RankingModel.create(f.text_encoder, f.image_encoder, [], history_len=0)
    with pytest.raises(ValueError, match="fusion is 'max'"):
        RankingModel.create(f.text_encoder, f.image_encoder, [], fusion="max")


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_loading_several_models_does_not_warn_of_retracing(small_world):
    """Each model traces its functions once; TensorFlow must not call that retracing in a loop."""
    f = small_world.features
    collect = _Collect()
    tf_logger = logging.getLogger("tensorflow")
    tf_logger.addHandler(collect)
    try:
        for seed in range(8):
            m = RankingModel.create(f.text_encoder, f.image_encoder, ["a"], embedding_dim=16, history_len=5,
                                    num_heads=2, seed=seed)
            m.item_embeddings(f.take(np.arange(4)))
        # ...while the same warning about another function still reaches the log.
        tf_logger.warning("5 out of the last 5 calls to <function other at 0x1> triggered tf.function retracing.")
    finally:
        tf_logger.removeHandler(collect)
    retracing = [m for m in collect.messages if "retracing" in m]
    assert retracing == ["5 out of the last 5 calls to <function other at 0x1> triggered tf.function retracing."]


@pytest.fixture(scope="module")
def prior_model(small_world):
    """A model with fitted content anchors (2 per modality), non-trivial weights, a calibration."""
    f = small_world.features
    m = RankingModel.create(f.text_encoder, f.image_encoder, ["category0", "category1", "category2"],
                            embedding_dim=16, history_len=5, num_heads=2, seed=4)
    m.item_tower.get_layer("fusion").adapt(f.text, f.image, f.has_image)
    rng = np.random.default_rng(1)
    for block in (m.user_encoder, m.scorer):
        block.set_weights([w + rng.normal(0, 0.05, np.shape(w)).astype(np.float32) for w in block.get_weights()])
    m._scorer_layer.set_calibration(0.7, -0.3)
    return m


def test_content_anchors_are_the_principal_directions_of_the_features(prior_model, small_world):
    f = small_world.features
    anchors = prior_model.content_anchors(f)
    assert anchors.shape == (len(f), 4) and prior_model.anchor_columns == 4 and prior_model.anchor_blocks == 2
    # Independently: centre, RMS-scale, project on the top-2 right singular vectors. Directions
    # are defined up to a rotation within the top-2 subspace (near-equal singular values), so
    # the two must differ by an orthogonal 2 x 2 map.
    for block, x, rows in ((anchors[:, :2], f.text, np.arange(len(f))), (anchors[:, 2:], f.image, np.flatnonzero(f.has_image))):
        z = x.astype(np.float64) - x[rows].mean(axis=0)
        z /= np.sqrt(np.square(z).mean(axis=1, keepdims=True))
        _, _, vt = np.linalg.svd(z[rows], full_matrices=False)
        p = z[rows] @ vt[:2].T
        p /= np.linalg.norm(p, axis=1, keepdims=True)
        rotation = np.linalg.lstsq(block[rows], p, rcond=None)[0]
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(2), atol=1e-3)
        np.testing.assert_allclose(block[rows] @ rotation, p, atol=1e-3)
    assert np.all(anchors[~f.has_image, 2:] == 0)
    # They are the (scaled) anchor blocks of the item tower's own embedding.
    emb = prior_model.item_embeddings(f)
    for lo, hi in ((12, 14), (14, 16)):
        tower, fixed = emb[f.has_image, lo:hi], anchors[f.has_image, lo - 12:hi - 12]
        cosine = np.sum(tower * fixed, axis=1) / np.linalg.norm(tower, axis=1)
        np.testing.assert_allclose(cosine, 1.0, atol=1e-4)



@pytest.mark.parametrize("kind", ["networks", "content prior with second moment"])
def test_user_vectors_batched_by_length_come_back_in_user_order(request, small_world, kind):
    """Users are batched by history length; each vector (every column block) must land on its own user."""
    if kind == "networks":
        model = request.getfixturevalue("model")
    else:
        model = request.getfixturevalue("prior_model").with_content_prior((1.5, 0.5), (3.0, 1.0))
        assert model.config.prior_dim and model.config.moment_dim
    emb = model.item_embeddings(small_world.features)
    rng = np.random.default_rng(5)
    lengths = rng.permutation([0, 1, 7, 2, 5, 3, 0, 9, 4, 1, 6])  # longest first would be a different order
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = rng.integers(0, len(emb), size=offsets[-1])
    together = model.user_vectors(offsets, items, emb, batch_size=3)
    for u in range(len(lengths)):
        alone = model.user_vectors(np.array([0, lengths[u]]), items[offsets[u] : offsets[u + 1]], emb)
        np.testing.assert_allclose(together[u], alone[0], atol=1e-5, err_msg=f"user {u} (history {lengths[u]})")
    assert len({tuple(np.round(v, 4)) for v in together[lengths > 0]}) > 5  # distinct users, a real check


def test_content_prior_adds_its_weighted_similarity_before_calibration(prior_model, small):
    world, log, first = small
    f = world.features
    served = prior_model.with_content_prior(2.5)
    assert served.config.serving_dim == 20 and served.config.prior_dim == 4
    emb = served.item_embeddings(f)
    np.testing.assert_allclose(emb[:, :16], prior_model.item_embeddings(f), atol=1e-6)
    np.testing.assert_allclose(emb[:, 16:], prior_model.content_anchors(f), atol=1e-6)
    imps = world.test
    users = served.user_vectors(imps.history_offsets, imps.history_items, emb)
    base_users = prior_model.user_vectors(imps.history_offsets, imps.history_items, emb[:, :16])
    np.testing.assert_allclose(users[:, :16], base_users, atol=1e-6)
    owner = candidate_impression_rows(imps)
    side = served.side_features(imps.candidate_items, imps.times[owner], log, first)
    base = prior_model.logits(base_users[owner], emb[imps.candidate_items, :16], side)
    anchors = emb[:, 16:]
    expected = np.empty(len(owner))
    for i in range(len(imps)):  # a loop over impressions: mean anchor of the capped history
        hist = imps.history(i)[:5]
        mean = anchors[hist].mean(axis=0) if len(hist) else np.zeros(4)
        lo, hi = imps.candidate_offsets[i], imps.candidate_offsets[i + 1]
        expected[lo:hi] = base[lo:hi] + 2.5 * anchors[imps.candidates(i)] @ mean
    logits = served.score_impressions(imps, emb, log, first, logits=True)
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    probs = served.score_impressions(imps, emb, log, first)
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-(0.7 * expected - 0.3))), atol=1e-5)
    assert np.any(np.abs(expected - base) > 0.1)  # the prior moves scores
    with pytest.raises(ModelMismatchError, match=r"the model serves 20 columns \(embedding_dim 16 \+ content prior 4\)"):
        served.user_vectors(imps.history_offsets, imps.history_items, emb[:, :16])


@pytest.mark.parametrize("weights", [(0.0, 0.0), (1.5, 0.5)])
def test_content_prior_terms_add_their_weighted_similarities_per_modality(prior_model, small, weights):
    world, log, first = small
    f = world.features
    moments = (3.0, 1.0)
    served = prior_model.with_content_prior(weights, moments)
    # Items keep D + A columns (the index); users gain anchor_dim^2 per modality (2 x 2 x 2).
    assert (served.config.serving_dim, served.config.user_dim, served.config.moment_dim) == (20, 28, 8)
    emb = served.item_embeddings(f)
    assert emb.shape == (len(f), 20)
    imps = world.test
    users = served.user_vectors(imps.history_offsets, imps.history_items, emb)
    assert users.shape == (len(imps), 28)
    owner = candidate_impression_rows(imps)
    side = served.side_features(imps.candidate_items, imps.times[owner], log, first)
    base_users = prior_model.user_vectors(imps.history_offsets, imps.history_items, emb[:, :16])
    base = prior_model.logits(base_users[owner], emb[imps.candidate_items, :16], side)
    anchors = emb[:, 16:]
    expected = np.empty(len(owner))
    for i in range(len(imps)):  # a loop over impressions and modality blocks
        hist, cands = imps.history(i)[:5], imps.candidates(i)
        lo, hi = imps.candidate_offsets[i], imps.candidate_offsets[i + 1]
        expected[lo:hi] = base[lo:hi]
        for b, block in enumerate((slice(0, 2), slice(2, 4))):
            if len(hist):
                sims = anchors[cands, block] @ anchors[hist, block].T  # (candidates, history)
                expected[lo:hi] += weights[b] * sims.mean(axis=1) + moments[b] * (sims**2).mean(axis=1)
    np.testing.assert_allclose(served.score_impressions(imps, emb, log, first, logits=True), expected, atol=1e-4)
    # The retrieval query (first serving_dim columns) is the user vector without the moments:
    # the networks' part and weight x the mean anchors (zeros when only the moment term is on).
    mean_anchors = np.array([anchors[imps.history(i)[:5]].mean(axis=0) if len(imps.history(i)) else np.zeros(4)
                             for i in range(len(imps))])
    scale = np.repeat(weights, 2)
    np.testing.assert_allclose(users[:, :20], np.c_[base_users, scale * mean_anchors], atol=1e-5)
    with pytest.raises(ValueError, match=r"score expects user_vectors \(3, 28\)"):
        served.score(users[:3, :20], emb[:3], side[:3])


def test_content_prior_terms_are_each_terms_share_of_the_served_logit(prior_model, small, monkeypatch):
    import recsys.models.bundle as bundle_module

    world, log, first = small
    imps = world.test
    unit = prior_model.with_content_prior(1.0, 1.0)
    emb = unit.item_embeddings(world.features)
    terms = unit.content_prior_terms(imps, emb)
    assert terms.shape == (len(imps.candidate_items), 4)
    # By hand, impression by impression: mean and mean squared similarity per block, 0 for a cold user.
    anchors = emb[:, 16:].astype(np.float64)
    expected = np.zeros_like(terms)
    for i in range(len(imps)):
        hist, cands = imps.history(i)[:5], imps.candidates(i)
        lo, hi = imps.candidate_offsets[i], imps.candidate_offsets[i + 1]
        for b, block in enumerate((slice(0, 2), slice(2, 4))):
            if len(hist):
                sims = anchors[cands, block] @ anchors[hist, block].T
                expected[lo:hi, b], expected[lo:hi, 2 + b] = sims.mean(axis=1), (sims**2).mean(axis=1)
    assert (expected[:, 0] == 0).any() and (expected != 0).any()  # cold users and warm ones
    np.testing.assert_allclose(terms, expected, atol=1e-9)
    # Weighted and summed, they are what the served model adds to the networks' logit.
    weights, moments = (1.5, 0.5), (3.0, 1.0)
    served = prior_model.with_content_prior(weights, moments)
    base = prior_model.score_impressions(imps, emb[:, :16], log, first, logits=True)
    np.testing.assert_allclose(served.score_impressions(imps, emb, log, first, logits=True),
                               base + terms @ np.array(weights + moments), atol=1e-4)
    # In chunks of impressions (one user vector per distinct history within each) and batches
    # of their distinct histories, the same.
    monkeypatch.setattr(bundle_module, "SCORE_IMPRESSIONS", 7)
    monkeypatch.setattr(bundle_module, "PRIOR_TERM_USERS", 3)
    np.testing.assert_allclose(unit.content_prior_terms(imps, emb), terms, atol=1e-12)
    with pytest.raises(ValueError, match="prior_dim 0"):
        prior_model.content_prior_terms(imps, emb[:, :16])


def test_content_prior_survives_save_and_load(prior_model, small, tmp_path):
    served = prior_model.with_content_prior((1.25, 2.0), 0.5)
    served.save(tmp_path / "bundle")
    loaded = RankingModel.load(tmp_path / "bundle")
    assert loaded.config == served.config
    saved = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert (saved["serving_dim"], saved["user_dim"]) == (20, 28)
    assert (saved["prior_weights"], saved["moment_weights"]) == ([1.25, 2.0], [0.5, 0.5])
    for a, b in zip(_predict(served, small), _predict(loaded, small)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    off = served.with_content_prior(0.0)
    assert off.config.serving_dim == off.config.user_dim == 16 and off.config.prior_dim == off.config.moment_dim == 0
    assert off.config.prior_weights == off.config.moment_weights == ()


def test_bundle_saved_with_one_prior_weight_serves_it_for_every_modality(prior_model, small, tmp_path):
    # config.json before per-modality weights: one "prior_weight", no moment fields.
    prior_model.with_content_prior(1.5).save(tmp_path / "bundle")
    path = tmp_path / "bundle" / "config.json"
    config = json.loads(path.read_text())
    del config["prior_weights"], config["moment_weights"], config["moment_dim"], config["user_dim"]
    path.write_text(json.dumps({**config, "prior_weight": 1.5}))
    loaded = RankingModel.load(tmp_path / "bundle")
    assert loaded.config.prior_weights == (1.5, 1.5) and loaded.config.moment_weights == ()
    for a, b in zip(_predict(prior_model.with_content_prior(1.5), small), _predict(loaded, small)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_content_prior_rejects_bad_weights_and_inconsistent_bundles(prior_model, small_world, tmp_path):
    with pytest.raises(ValueError, match="content prior weight is -1.0, expected a finite number >= 0"):
        prior_model.with_content_prior(-1)
    with pytest.raises(ValueError, match="content prior weight is nan"):
        prior_model.with_content_prior(float("nan"))
    with pytest.raises(ValueError, match="content prior moment weight is -2.0, expected a finite number >= 0"):
        prior_model.with_content_prior(1.0, (1.0, -2))
    with pytest.raises(ValueError, match=r"content prior weights \[1.0, 2.0, 3.0\] have 3 entries, expected one per anchor block \(2\)"):
        prior_model.with_content_prior((1.0, 2.0, 3.0))
    f = small_world.features
    plain = RankingModel.create(f.text_encoder, f.image_encoder, ["c"], embedding_dim=16, num_heads=2, anchor_dim=0)
    with pytest.raises(ValueError, match="content prior needs content anchors, but the model has anchor_dim 0"):
        plain.with_content_prior(0.0, 1.0)
    prior_model.with_content_prior(1.0, 2.0).save(tmp_path / "bundle")
    path = tmp_path / "bundle" / "config.json"
    good = json.loads(path.read_text())
    for key, value, expected in (("prior_dim", 3, "prior_dim 3 and moment_dim 8"), ("moment_dim", 4, "prior_dim 4 and moment_dim 4"),
                                 ("moment_weights", [2.0], r"moment_weights \[2.0\] with prior_dim 4 and moment_dim 8")):
        path.write_text(json.dumps({**good, key: value}))
        with pytest.raises(ModelMismatchError, match=rf"{expected}, but the item tower has 2 anchor blocks of 2 "
                                                     r"\(expected one weight >= 0 per block, prior_dim 4, moment_dim 8\)"):
            RankingModel.load(tmp_path / "bundle")


def test_content_clusters_survive_save_and_must_read_the_served_anchor_blocks(model, small_world, tmp_path):
    """A bundle's content clusters read the anchor blocks of its served vectors: saved and loaded
    they code articles alike; clusters that do not fit those blocks are refused when the
    bundle is made or loaded, not in every nightly worker at scoring."""
    from recsys.errors import DamagedFileError, ModelMismatchError
    from recsys.models.affinity import AffinityCalibration, ContentClusters, design_features

    served = model.with_content_prior(1.0)
    a = served.anchor_columns // served.anchor_blocks
    anchors = served.content_anchors(small_world.features)
    clusters = ContentClusters.fit(anchors, ("text", "image"), np.arange(len(anchors)), 3, seed=2**32 - 1)
    keys = ("category", "subcategory", *clusters.keys)
    aff = AffinityCalibration(tuple(np.linspace(-1.0, 1.0, len(design_features(keys)))), 0.5, clusters)
    with_aff = RankingModel(served.item_tower, served.user_encoder, served.scorer,
                            dataclasses.replace(served.config, category_affinity=aff))
    with_aff.save(tmp_path / "bundle")
    loaded = RankingModel.load(tmp_path / "bundle")
    assert loaded.config.category_affinity == aff
    publisher = np.zeros((len(anchors), 2), dtype=np.int64)
    codes = loaded.affinity_item_codes(publisher, loaded.item_embeddings(small_world.features))
    np.testing.assert_array_equal(codes, with_aff.affinity_item_codes(publisher, with_aff.item_embeddings(small_world.features)))
    np.testing.assert_array_equal(codes[:, 2:], clusters.codes(anchors))

    for bad, config in (
        (clusters, model.config),  # the networks' vectors without the anchor columns
        (dataclasses.replace(clusters, offsets=(0, a + 1)), served.config),  # the image block read from the wrong column
    ):
        with pytest.raises(ModelMismatchError, match="content clusters of block"):
            RankingModel(served.item_tower, served.user_encoder, served.scorer,
                         dataclasses.replace(config, category_affinity=dataclasses.replace(aff, clusters=bad)))
    path = tmp_path / "bundle" / "config.json"
    saved = json.loads(path.read_text())
    saved["category_affinity"]["clusters"]["centres"][0] = [[1.0] * (a + 1)] * 3  # centres wider than a block
    path.write_text(json.dumps(saved))
    with pytest.raises((ModelMismatchError, DamagedFileError), match="content clusters of block 'text'"):
        RankingModel.load(tmp_path / "bundle")
