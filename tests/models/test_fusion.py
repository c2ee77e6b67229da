"""The item tower: fusion modes, missing images, ablation modes, category vocabulary."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from recsys.models.fusion import (
    FUSION_MODES,
    CategoryVocabulary,
    MultimodalFusion,
    build_item_tower,
    parse_modalities,
)

TEXT_DIM, IMAGE_DIM, NUM_CATEGORIES = 12, 20, 3


def _inputs(n: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "text": rng.standard_normal((n, TEXT_DIM)).astype(np.float32),
        "image": np.abs(rng.standard_normal((n, IMAGE_DIM))).astype(np.float32),
        "has_image": np.array([1, 1, 0, 1, 0, 1][:n], dtype=np.float32),
        "category": np.array([0, 1, 2, 3, 1, 2][:n], dtype=np.int32),
    }


def _layer(**kwargs) -> MultimodalFusion:
    keras.utils.set_random_seed(0)
    layer = MultimodalFusion(16, num_categories=NUM_CATEGORIES, **kwargs)
    layer(_inputs())
    return layer


@pytest.mark.parametrize("fusion", FUSION_MODES)
@pytest.mark.parametrize("modalities", ["text", "image", "text,image"])
def test_get_config_round_trip_gives_same_outputs(fusion, modalities):
    layer = _layer(fusion=fusion, modalities=modalities)
    clone = MultimodalFusion.from_config(layer.get_config())
    clone(_inputs())
    clone.set_weights(layer.get_weights())
    assert clone.get_config() == layer.get_config()
    np.testing.assert_allclose(clone(_inputs()), layer(_inputs()), atol=1e-6)


def test_get_config_keeps_the_dropout_rate():
    # Dropout acts only in training, so equal outputs do not show it came back: the rate itself does.
    layer = _layer(dropout=0.2)
    assert layer.get_config()["dropout"] == 0.2
    assert MultimodalFusion.from_config(layer.get_config()).dropout == 0.2


@pytest.mark.parametrize("fusion", FUSION_MODES)
def test_output_is_unit_norm_and_finite(fusion):
    out = np.asarray(_layer(fusion=fusion)(_inputs()))
    assert out.shape == (6, 16)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("fusion", FUSION_MODES)
def test_missing_image_uses_placeholder_not_the_pixels(fusion):
    layer = _layer(fusion=fusion)
    x = _inputs()
    garbage = dict(x, image=x["image"] * 100.0 + 7.0)
    no_image = x["has_image"] == 0
    # Rows without an image ignore whatever the image columns hold ...
    np.testing.assert_allclose(np.asarray(layer(garbage))[no_image], np.asarray(layer(x))[no_image], atol=1e-6)
    # ... and a zero vector with has_image=1 (a black picture) is not the same as "no image".
    zeros = dict(x, image=np.zeros_like(x["image"]))
    as_picture = dict(zeros, has_image=np.ones_like(x["has_image"]))
    assert not np.allclose(np.asarray(layer(zeros)), np.asarray(layer(as_picture)), atol=1e-4)


@pytest.mark.parametrize("modalities,ignored", [("text", "image"), ("image", "text")])
def test_single_modality_ignores_the_other_input(modalities, ignored):
    layer = _layer(modalities=modalities)
    x = _inputs()
    changed = dict(x, **{ignored: x[ignored] + 5.0})
    np.testing.assert_allclose(np.asarray(layer(changed)), np.asarray(layer(x)), atol=1e-6)
    names = {w.name for w in layer.weights}
    assert f"{ignored}_kernel" not in names


def test_unknown_category_ids_behave_as_out_of_vocabulary():
    layer = _layer()
    x = _inputs()
    oov = dict(x, category=np.zeros(6, dtype=np.int32))
    beyond = dict(x, category=np.full(6, NUM_CATEGORIES + 5, dtype=np.int32))
    negative = dict(x, category=np.full(6, -1, dtype=np.int32))
    np.testing.assert_allclose(np.asarray(layer(beyond)), np.asarray(layer(oov)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(layer(negative)), np.asarray(layer(oov)), atol=1e-6)
    # Known ids run 1..NUM_CATEGORIES (0 is unknown): the last is known, the one after it is not.
    last = dict(x, category=np.full(6, NUM_CATEGORIES, dtype=np.int32))
    after = dict(x, category=np.full(6, NUM_CATEGORIES + 1, dtype=np.int32))
    assert not np.allclose(np.asarray(layer(last)), np.asarray(layer(oov)), atol=1e-4)
    np.testing.assert_allclose(np.asarray(layer(after)), np.asarray(layer(oov)), atol=1e-6)


def test_content_not_ids_identical_features_give_identical_embeddings():
    tower = build_item_tower(TEXT_DIM, IMAGE_DIM, NUM_CATEGORIES, embedding_dim=16)
    x = _inputs()
    twice = {k: np.concatenate([v[:3], v[:3]]) for k, v in x.items()}
    out = np.asarray(tower(twice))
    np.testing.assert_allclose(out[:3], out[3:], atol=1e-6)


def test_item_tower_saves_and_loads(tmp_path):
    tower = build_item_tower(TEXT_DIM, IMAGE_DIM, NUM_CATEGORIES, embedding_dim=16, fusion="weighted_sum")
    tower.save(tmp_path / "tower.keras")
    loaded = keras.saving.load_model(tmp_path / "tower.keras")
    np.testing.assert_allclose(np.asarray(loaded(_inputs())), np.asarray(tower(_inputs())), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(fusion="sum"), "fusion is 'sum', expected one of concat, weighted_sum, gated"),
        (dict(modalities="audio"), "modalities is 'audio', expected"),
        (dict(modalities="text,text"), "modalities is 'text,text'"),
        (dict(embedding_dim=0), "embedding_dim is 0, expected a positive integer"),
        (dict(dropout=1.0), "dropout is 1.0"),
        (dict(num_categories=-1), "num_categories is -1"),
    ],
)
def test_invalid_arguments_are_rejected(kwargs, message):
    args = dict(embedding_dim=16) | kwargs
    with pytest.raises(ValueError, match=message):
        MultimodalFusion(args.pop("embedding_dim"), **args)


def test_build_item_tower_rejects_bad_dims():
    with pytest.raises(ValueError, match="image_dim is 0, expected a positive integer"):
        build_item_tower(8, 0, 1)


def test_parse_modalities_is_canonical():
    assert parse_modalities(" image , text ") == ("text", "image")
    with pytest.raises(ValueError, match="modalities is ''"):
        parse_modalities("")


def test_category_vocabulary_maps_unknown_to_zero():
    vocab = CategoryVocabulary.fit(["sports", "news", "sports", "lifestyle"])
    assert vocab.categories == ("lifestyle", "news", "sports")
    ids = vocab.lookup(np.array(["news", "weather", "sports", "lifestyle", "aaa", "zzz"], dtype=object))
    np.testing.assert_array_equal(ids, [2, 0, 3, 1, 0, 0])
    np.testing.assert_array_equal(CategoryVocabulary(()).lookup(np.array(["x"])), [0])
    with pytest.raises(ValueError, match="must be sorted and unique"):
        CategoryVocabulary(("b", "a"))


def test_adapt_centres_the_inputs_on_training_means():
    layer = _layer()
    x = _inputs()
    layer.adapt(x["text"], x["image"], x["has_image"].astype(bool))
    np.testing.assert_allclose(np.asarray(layer.text_center), x["text"].mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(layer.image_center), x["image"][x["has_image"] == 1].mean(axis=0), atol=1e-6)
    # centring is what it says: the same as feeding centred features to an uncentred layer
    plain = _layer()
    centred = dict(x, text=x["text"] - x["text"].mean(axis=0),
                   image=x["image"] - x["image"][x["has_image"] == 1].mean(axis=0))
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(plain(centred)), atol=1e-5)
    assert {"text_center", "image_center"} <= {w.name for w in layer.non_trainable_weights}
    with pytest.raises(ValueError, match="adapt\\(\\) needs a built layer"):
        MultimodalFusion(8).adapt(x["text"], x["image"], x["has_image"])


# --- content anchors ------------------------------------------------------------------------


def _anchored(anchor_dim: int = 3, modalities: str = "text,image", n: int = 40, seed: int = 1):
    """A layer with anchors adapted on n random items; returns (layer, inputs)."""
    rng = np.random.default_rng(seed)
    x = {
        "text": rng.standard_normal((n, TEXT_DIM)).astype(np.float32),
        "image": np.abs(rng.standard_normal((n, IMAGE_DIM))).astype(np.float32),
        "has_image": (rng.random(n) < 0.8).astype(np.float32),
        "category": rng.integers(0, NUM_CATEGORIES + 1, n).astype(np.int32),
    }
    keras.utils.set_random_seed(0)
    layer = MultimodalFusion(16, num_categories=NUM_CATEGORIES, modalities=modalities, anchor_dim=anchor_dim, dropout=0.0)
    layer(x)
    layer.adapt(x["text"], x["image"], x["has_image"].astype(bool))
    return layer, x


def _rms(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt(np.mean(x**2, axis=1, keepdims=True) + 1e-6)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_anchor_bases_are_the_principal_components_sklearn_finds():
    from sklearn.decomposition import PCA

    layer, x = _anchored(anchor_dim=3)
    with_image = x["has_image"] == 1
    for name, rows in (("text", slice(None)), ("image", with_image)):
        data = _rms(x[name][rows] - x[name][rows].mean(axis=0))
        # The layer's covariance is uncentred over already-centred rows; rms-normalising
        # moves the mean slightly, so compare against an uncentred decomposition (SVD).
        _, _, vt = np.linalg.svd(data, full_matrices=False)
        basis = np.asarray(getattr(layer, f"{name}_basis"))
        for k in range(3):  # same directions up to sign
            assert abs(abs(float(basis[:, k] @ vt[k])) - 1.0) < 1e-4
        # and close to what sklearn's (centred) PCA gives on this nearly centred data
        pca = PCA(3).fit(data)
        assert np.all(np.abs(np.sum(basis.T * pca.components_, axis=1)) > 0.9)


def test_anchor_blocks_carry_the_cosine_in_the_principal_subspace():
    layer, x = _anchored(anchor_dim=3)
    out = np.asarray(layer(x))
    assert out.shape == (40, 16)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    learned_dim = layer.learned_dim
    assert learned_dim == 16 - 2 * 3
    text_block = out[:, learned_dim : learned_dim + 3]
    expected = _unit(_rms(x["text"] - np.asarray(layer.text_center)) @ np.asarray(layer.text_basis))
    # each block is the normalised projection times one common positive factor per row
    ratio = text_block / expected
    np.testing.assert_allclose(ratio, ratio[:, :1].repeat(3, axis=1), rtol=1e-3)
    assert np.all(ratio > 0)


def test_missing_image_has_a_zero_image_anchor():
    layer, x = _anchored(anchor_dim=3)
    out = np.asarray(layer(x))
    image_block = out[:, -3:]
    missing = x["has_image"] == 0
    assert missing.any() and (~missing).any()
    np.testing.assert_array_equal(image_block[missing], 0.0)
    assert np.all(np.linalg.norm(image_block[~missing], axis=1) > 0.1)


def test_anchors_are_deterministic_and_survive_save_and_load(tmp_path):
    layer, x = _anchored(anchor_dim=4)
    again, _ = _anchored(anchor_dim=4)
    np.testing.assert_array_equal(np.asarray(layer.text_basis), np.asarray(again.text_basis))
    tower = build_item_tower(TEXT_DIM, IMAGE_DIM, NUM_CATEGORIES, embedding_dim=16, anchor_dim=4)
    fusion = tower.get_layer("fusion")
    fusion.adapt(x["text"], x["image"], x["has_image"].astype(bool))
    assert {"text_basis", "image_basis"} <= {w.name for w in fusion.non_trainable_weights}
    tower.save(tmp_path / "tower.keras")
    loaded = keras.saving.load_model(tmp_path / "tower.keras")
    assert loaded.get_layer("fusion").anchor_dim == 4
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(tower(x)), atol=1e-6)


@pytest.mark.parametrize("modalities,blocks", [("text", 1), ("image", 1)])
def test_a_single_modality_has_only_its_own_anchor(modalities, blocks):
    layer, x = _anchored(anchor_dim=3, modalities=modalities)
    assert layer.learned_dim == 16 - 3 * blocks
    assert not hasattr(layer, "image_basis" if modalities == "text" else "text_basis")
    assert np.asarray(layer(x)).shape == (40, 16)


@pytest.mark.parametrize("anchor_dim", [-1, 8, 2.5])
def test_anchor_dim_must_leave_room_for_the_learned_part(anchor_dim):
    with pytest.raises(ValueError, match=f"anchor_dim is {anchor_dim!r}"):
        MultimodalFusion(16, anchor_dim=anchor_dim)
