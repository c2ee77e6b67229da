"""Training helpers (metrics, batches, losses, argument checks) and short training runs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from recsys.models.ctr import listwise_loss, pointwise_loss
from recsys.data.interactions import (
    ClickLog, Impressions, InteractionLog, candidate_impression_rows, first_shown, select_impressions, with_logged_clicks,
)
from recsys.models import training
from recsys.models.training import (
    NoValidationAUCError, _BatchMaker, binary_log_loss, clock_floor, evaluate_impressions, mean_impression_auc, train_ctr,
)


def _random_impressions(seed: int = 0, m: int = 60):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 9, m)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    labels = (rng.random(offsets[-1]) < 0.3).astype(np.int8)
    labels[rng.random(offsets[-1]) < 0.05] = -1
    scores = np.round(rng.random(offsets[-1]), 1)  # many ties
    return offsets, labels, scores


@pytest.mark.parametrize("chunk", [None, 3])
def test_mean_impression_auc_matches_sklearn_with_ties_and_skips(chunk, monkeypatch):
    if chunk:  # impressions are scored AUC_IMPRESSIONS at a time
        monkeypatch.setattr(training, "AUC_IMPRESSIONS", chunk)
    offsets, labels, scores = _random_impressions()
    expected = []
    for i in range(len(offsets) - 1):
        y, s = labels[offsets[i]:offsets[i + 1]], scores[offsets[i]:offsets[i + 1]]
        y, s = y[y >= 0], s[y >= 0]
        if 0 < y.sum() < len(y):
            expected.append(roc_auc_score(y, s))
    auc, scored = mean_impression_auc(labels, scores, offsets)
    assert scored == len(expected)
    assert auc == pytest.approx(np.mean(expected), abs=1e-12)
    # an all-single-class set is NaN with nothing scored
    nan, none = mean_impression_auc(np.zeros(3, np.int8), np.arange(3.0), np.array([0, 3]))
    assert np.isnan(nan) and none == 0


def test_binary_log_loss_matches_sklearn():
    offsets, labels, scores = _random_impressions(1)
    keep = labels >= 0
    probs = np.clip(scores, 0.01, 0.99)
    assert binary_log_loss(labels, probs) == pytest.approx(log_loss(labels[keep], probs[keep]), rel=1e-9)


def test_losses_match_numpy():
    logits = np.array([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]], dtype=np.float32)
    labels = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)
    weights = np.array([[1, 1, 1], [1, 1, 0]], dtype=np.float32)
    p = 1 / (1 + np.exp(-logits))
    bce = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    assert float(pointwise_loss(logits, labels, weights)) == pytest.approx((bce * weights).sum() / 5, rel=1e-5)
    groups = np.array([[0, 1, 2], [4, 3, 3]], dtype=np.int32)
    flat = logits.ravel()
    expected = np.mean([np.log(np.exp(flat[g]).sum()) - flat[g[0]] for g in groups])
    assert float(listwise_loss(logits, groups)) == pytest.approx(expected, rel=1e-5)


def test_batches_index_unique_items_and_group_negatives_of_the_same_impression(world):
    imps = world.train
    side = np.random.default_rng(0).standard_normal((len(imps.candidate_items), 3)).astype(np.float32)
    maker = _BatchMaker(imps, side, np.arange(len(world.features)) % 5, world.features.has_image.astype(np.float32),
                        history_len=10, negatives=4, category_dropout=0.0)
    rows = np.array([5, 17, 3, 99])
    batch = maker.make(rows, np.random.default_rng(1), listwise=True)
    unique = batch["rows"]
    assert len(unique) == len(np.unique(unique))
    for b, row in enumerate(rows):
        hist = imps.history(row)[:10]
        np.testing.assert_array_equal(unique[batch["history_index"][b, : len(hist)]], hist)
        assert batch["history_mask"][b].sum() == len(hist)
        cands = imps.candidates(row)
        np.testing.assert_array_equal(unique[batch["candidate_index"][b, : len(cands)]], cands)
        np.testing.assert_array_equal(batch["labels"][b, : len(cands)], imps.candidate_labels(row))
        np.testing.assert_allclose(batch["side"][b, : len(cands)], side[imps.candidate_offsets[row]:imps.candidate_offsets[row + 1]])
        assert batch["weights"][b, len(cands):].sum() == 0
    width = batch["labels"].shape[1]
    groups = batch["groups"]
    assert len(groups) == sum(int(imps.candidate_labels(r).sum()) for r in rows
                              if 0 < imps.candidate_labels(r).sum() < len(imps.candidate_labels(r)))
    flat_labels = batch["labels"].ravel()
    assert np.all(flat_labels[groups[:, 0]] == 1)
    assert np.all(flat_labels[groups[:, 1:]] == 0)
    assert np.all(batch["weights"].ravel()[groups] == 1)  # never a padding slot
    assert np.all(groups[:, 1:] // width == (groups[:, :1] // width))  # same impression


def _hand_impressions(candidates: list[list[int]], labels: list[list[int]]) -> Impressions:
    """Impressions with these candidates and labels, each with a one-item history (item 0)."""
    m = len(candidates)
    return Impressions(
        impression_ids=np.arange(1, m + 1, dtype=np.int64), user_ids=np.array([f"U{i}" for i in range(m)], dtype=object),
        times=np.full(m, np.datetime64("2019-11-14T10:00:00", "s")),
        history_offsets=np.arange(m + 1, dtype=np.int64), history_items=np.zeros(m, dtype=np.int32),
        candidate_offsets=np.concatenate([[0], np.cumsum([len(c) for c in candidates])]).astype(np.int64),
        candidate_items=np.concatenate(candidates).astype(np.int32), labels=np.concatenate(labels).astype(np.int8),
    )


def _hand_maker(imps: Impressions, num_items: int, *, negatives: int = 4, category_dropout: float = 0.0) -> _BatchMaker:
    side = np.zeros((len(imps.candidate_items), 3), dtype=np.float32)
    return _BatchMaker(imps, side, 1 + np.arange(num_items) % 5, np.ones(num_items, np.float32), history_len=4,
                       negatives=negatives, category_dropout=category_dropout)


def test_an_impression_whose_candidates_are_all_clicked_makes_no_listwise_group():
    # Impression 0 has no non-click: its clicks have nothing to be ranked above in their own
    # impression, and must not borrow impression 1's negatives.
    imps = _hand_impressions([[1, 2], [3, 4, 5, 6]], [[1, 1], [1, 0, 0, 0]])
    batch = _hand_maker(imps, 7).make(np.array([0, 1]), np.random.default_rng(0), listwise=True)
    width = batch["labels"].shape[1]
    assert batch["groups"].shape == (1, 5)
    assert batch["groups"][0, 0] == width  # impression 1's click, slot 0
    assert set(batch["groups"][0, 1:].tolist()) <= {width + 1, width + 2, width + 3}


def test_listwise_negatives_are_drawn_from_every_non_click_of_the_impression():
    # One click and 3 non-clicks, 4 draws a batch, 50 batches: 200 uniform draws over 3 slots
    # (each slot missed by all of them with probability (2/3)**200).
    imps = _hand_impressions([[1, 2, 3, 4]], [[0, 1, 0, 0]])
    maker, rng = _hand_maker(imps, 5), np.random.default_rng(0)
    drawn = np.concatenate([maker.make(np.array([0]), rng, listwise=True)["groups"][:, 1:].ravel() for _ in range(50)])
    counts = np.bincount(drawn, minlength=4)
    assert counts[1] == 0 and counts.sum() == 200
    assert all(40 <= c <= 95 for c in counts[[0, 2, 3]])  # about 200/3 each


def test_category_dropout_replaces_that_share_of_the_batchs_categories_with_unknown():
    n = 1000
    imps = _hand_impressions([list(range(1, n + 1))], [[1] + [0] * (n - 1)])
    batch = _hand_maker(imps, n + 1, category_dropout=0.3).make(np.array([0]), np.random.default_rng(0), listwise=False)
    assert len(batch["rows"]) == n + 1 and np.all(batch["category"][batch["category"] != 0] == 1 + batch["rows"][batch["category"] != 0] % 5)
    assert 0.25 <= np.mean(batch["category"] == 0) <= 0.35  # every id is >= 1 before the dropout
    none = _hand_maker(imps, n + 1).make(np.array([0]), np.random.default_rng(0), listwise=False)
    assert np.all(none["category"] == 1 + none["rows"] % 5)


def test_platt_calibration_is_fitted_on_the_labelled_candidates_only():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=300)
    labels = (rng.random(300) < 1 / (1 + np.exp(-(1.5 * logits - 0.5)))).astype(np.int8)
    unknown = labels.copy()
    unknown[::7] = -1  # unlabelled candidates: left out of the fit
    keep = unknown >= 0
    # The unregularised maximum-likelihood fit on the labelled rows, by Newton's method.
    x, y, w = np.column_stack([logits[keep], np.ones(keep.sum())]), labels[keep].astype(np.float64), np.zeros(2)
    for _ in range(50):
        p = 1 / (1 + np.exp(-x @ w))
        w += np.linalg.solve(x.T @ (x * (p * (1 - p))[:, None]), x.T @ (y - p))
    slope, intercept = training._fit_platt(logits, unknown)
    assert slope == pytest.approx(w[0], abs=1e-3) and intercept == pytest.approx(w[1], abs=1e-3)
    # Labelled rows of one class only (the -1 rows are no second class): nothing to fit, identity.
    assert training._fit_platt(logits[:3], np.array([0, -1, 0], dtype=np.int8)) == (1.0, 0.0)


def test_train_ctr_rejects_bad_arguments(world, log):
    args = (world.features, world.train, world.valid, log)
    with pytest.raises(ValueError, match="loss is 'hinge', expected one of pointwise, listwise"):
        train_ctr(*args, loss="hinge")
    with pytest.raises(ValueError, match="epochs is 0, expected a positive integer"):
        train_ctr(*args, epochs=0)
    for rate in (-1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=f"learning_rate is {rate}, expected a finite number > 0"):
            train_ctr(*args, learning_rate=rate)
    bad = Impressions(**{**world.train.__dict__, "candidate_items": world.train.candidate_items + 10_000})
    with pytest.raises(ValueError, match=r"train.candidate_items has item row 1\d+, expected 0 <= row < 600"):
        train_ctr(world.features, bad, world.valid, log)
    with pytest.raises(ValueError, match="the interaction log covers 5 items, the feature table has 600"):
        train_ctr(*args[:3], InteractionLog.from_impressions([], 5))
    for horizon in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=f"weight_average is {horizon}, expected 0"):
            train_ctr(*args, weight_average=horizon)
    far = ClickLog.from_events(np.array(["U1"], dtype=object), world.train.times[:1], np.array([600]))
    with pytest.raises(ValueError, match="the click log names item row 600, the feature table has 600 rows"):
        train_ctr(*args, clicks=far)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ("none clicked", r"holds no click \(all \d+ labelled candidates are 0\)"),
        ("all clicked", r"holds only clicks \(all \d+ labelled candidates are 1\)"),
        ("all or none per impression", r"has no impression with both a click and a non-click \(\d+ clicks, \d+ non-clicks in all\)"),
    ],
)
def test_a_validation_window_without_an_auc_is_a_recsys_error(world, log, labels, message):
    # A ValueError before (exit code 2): the window is the user's input, not a bug.
    sizes = np.diff(world.valid.candidate_offsets)
    relabelled = {
        "none clicked": np.zeros(sizes.sum()),
        "all clicked": np.ones(sizes.sum()),
        "all or none per impression": np.repeat(np.arange(len(sizes)) % 2, sizes),
    }[labels]
    valid = dataclasses.replace(world.valid, labels=relabelled.astype(world.valid.labels.dtype))
    with pytest.raises(NoValidationAUCError, match=rf"^the validation impressions {message}: the per-impression AUC is undefined"):
        train_ctr(world.features, world.train, valid, log)


def test_a_diverged_training_stops_instead_of_publishing_nan_weights(world, log):
    from recsys.models.training import TrainingDivergedError

    text = world.features.text.copy()
    text[world.train.candidate_items[:50]] = np.nan  # articles whose features went bad
    broken = dataclasses.replace(world.features, text=text)
    train = select_impressions(world.train, np.arange(200))
    with pytest.raises(TrainingDivergedError, match="training diverged: the loss is nan at epoch 1"):
        train_ctr(broken, train, world.valid, log, epochs=2, batch_size=32, embedding_dim=16, history_len=10)
    # NaN scores have no AUC, whatever order the candidates come in.
    assert np.isnan(mean_impression_auc(np.array([1, 0]), np.array([np.nan, 0.5]), np.array([0, 2]))[0])


def test_clock_floor_moves_times_back_to_the_last_tick():
    t = np.array(["2019-11-14T13:45:10", "2019-11-14T00:00:00", "2019-11-13T23:59:59"], dtype="datetime64[s]")
    assert [str(x) for x in clock_floor(t, 24)] == ["2019-11-14T00:00:00", "2019-11-14T00:00:00", "2019-11-13T00:00:00"]
    assert [str(x) for x in clock_floor(t, 6)] == ["2019-11-14T12:00:00", "2019-11-14T00:00:00", "2019-11-13T18:00:00"]
    with pytest.raises(ValueError, match="clock period is 0 hours"):
        clock_floor(t, 0)


def test_train_ctr_with_a_feature_clock_trains_and_validates_at_the_ticks(world, log, monkeypatch):
    from recsys.models.side_features import SideFeatures

    seen = []
    compute = SideFeatures.compute

    def spy(self, item_rows, times, log_, first_seen, *, age_times=None):
        # training and validation read popularity and age at the same tick
        assert age_times is None or np.array_equal(age_times, times)
        seen.append(np.asarray(times).copy())
        return compute(self, item_rows, times, log_, first_seen, age_times=age_times)

    monkeypatch.setattr(SideFeatures, "compute", spy)
    train = select_impressions(world.train, np.arange(200))
    with pytest.raises(ValueError, match="feature_clock_hours is -1, expected >= 0"):
        train_ctr(world.features, train, world.valid, log, feature_clock_hours=-1)
    # (the file-exposure fit reads validation at its true times, as a later file is served: off here)
    train_ctr(world.features, train, world.valid, log, epochs=1, batch_size=32, embedding_dim=16, feature_clock_hours=24,
              file_exposure=False)
    owner = lambda imps: np.repeat(np.arange(len(imps)), np.diff(imps.candidate_offsets))  # noqa: E731
    expected_train = clock_floor(train.times[owner(train)], 24)
    expected_valid = clock_floor(world.valid.times[owner(world.valid)], 24)
    assert np.array_equal(seen[0], expected_train)  # the training samples
    assert any(len(x) == len(expected_valid) and np.array_equal(x, expected_valid) for x in seen[1:])  # validation
    assert not np.array_equal(expected_train, train.times[owner(train)])  # the clock moved them


def test_train_ctr_with_a_click_log_trains_and_validates_on_led_histories(world, log, monkeypatch):
    import recsys.models.training as training

    seen = []

    def spy(impressions, clicks, history_len):
        out = with_logged_clicks(impressions, clicks, history_len)
        seen.append((len(impressions), history_len, int(np.diff(out.history_offsets).sum() - np.diff(impressions.history_offsets).clip(max=history_len).sum())))
        return out

    monkeypatch.setattr(training, "with_logged_clicks", spy)
    clicks = ClickLog.from_impressions([world.train, world.valid])
    train = select_impressions(world.train, np.arange(200))
    model, _ = train_ctr(world.features, train, world.valid, log, epochs=1, batch_size=32, embedding_dim=16,
                         history_len=8, clicks=clicks)
    assert model.config.logged_clicks is True
    # Both windows were rebuilt with the model's cap, and the validation histories gained
    # items (its users clicked in training impressions); the validation window once more for
    # the file-exposure fit, led by the clicks before it only (tested with that fit).
    assert [s[:2] for s in seen] == [(200, 8), (len(world.valid), 8), (len(world.valid), 8)]
    assert seen[2][2] > 0
    plain, _ = train_ctr(world.features, train, world.valid, log, epochs=1, batch_size=32, embedding_dim=16, history_len=8)
    assert plain.config.logged_clicks is False and len(seen) == 3


@pytest.mark.slow
def test_same_seed_same_metrics(world, log):
    """Reproducibility: two runs with one seed agree to 3 decimals; another seed differs."""
    train = select_impressions(world.train, np.arange(600))
    kwargs = dict(epochs=2, batch_size=32, embedding_dim=32, history_len=20)
    _, first = train_ctr(world.features, train, world.valid, log, seed=7, **kwargs)
    _, second = train_ctr(world.features, train, world.valid, log, seed=7, **kwargs)
    _, other = train_ctr(world.features, train, world.valid, log, seed=8, **kwargs)
    np.testing.assert_allclose(first["val_auc"], second["val_auc"], atol=5e-4)
    np.testing.assert_allclose(first["loss"], second["loss"], atol=5e-4)
    np.testing.assert_allclose(first["val_log_loss"], second["val_log_loss"], atol=5e-4)
    assert not np.allclose(first["val_auc"], other["val_auc"], atol=5e-4)


def test_a_training_traces_its_step_once(world, log, monkeypatch):
    """The step's Python body runs only while TensorFlow traces it. An optimizer that creates its
    slots in the first call makes TensorFlow trace it twice (seconds per training)."""
    traces = []

    def counted(*args):
        traces.append(1)
        return pointwise_loss(*args)

    monkeypatch.setattr(training, "pointwise_loss", counted)
    train = select_impressions(world.train, np.arange(150))  # several batches, the last one shorter
    _, history = train_ctr(world.features, train, world.valid, log, epochs=2, batch_size=32, embedding_dim=16)
    assert len(history["loss"]) == 2 and all(np.isfinite(history["loss"]))
    assert len(traces) == 1


@pytest.mark.slow
def test_listwise_training_is_calibrated_afterwards(world, log):
    train = select_impressions(world.train, np.arange(700))
    first_seen = first_shown([train, world.valid], len(world.features))
    model, history = train_ctr(world.features, train, world.valid, log, loss="listwise", negatives=3, epochs=2,
                               batch_size=32, embedding_dim=32, first_seen=first_seen)
    calibration = history["calibration"]
    assert calibration != {"slope": 1.0, "intercept": 0.0}
    assert model.config.info["loss"] == "listwise" and model.config.info["calibration"] == calibration
    metrics = evaluate_impressions(model, world.features, world.valid, log, first_seen)
    # Platt scaling on the validation window: mean probability matches the click rate there.
    labelled = world.valid.labels >= 0
    assert metrics["scores"][labelled].mean() == pytest.approx(world.valid.labels[labelled].mean(), abs=0.02)


def test_content_prior_weights_are_the_best_on_validation(world, log):
    from recsys.models.training import MOMENT_WEIGHTS, PRIOR_WEIGHTS

    train = select_impressions(world.train, np.arange(300))
    first_seen = first_shown([train, world.valid], len(world.features))
    model, history = train_ctr(world.features, train, world.valid, log, epochs=1, batch_size=32, embedding_dim=32,
                               first_seen=first_seen, content_prior=True)
    weights, moments = tuple(history["prior_weights"]), tuple(history["moment_weights"])
    assert model.config.prior_weights == weights and list(weights) == model.config.info["prior_weights"]
    assert model.config.moment_weights == moments and list(moments) == model.config.info["moment_weights"]
    assert len(weights) == 2 and set(weights) <= set(PRIOR_WEIGHTS) and set(moments) <= set(MOMENT_WEIGHTS)
    # Recomputed from scratch: the served model's validation AUC is the one recorded, no
    # change of one block's weight to another grid value does better, and the networks alone
    # are the all-zero entry.
    served = evaluate_impressions(model, world.features, world.valid, log, first_seen)["auc"]
    assert served == pytest.approx(history["served_val_auc"], abs=1e-6)
    current = list(weights) + list(moments or (0.0, 0.0))
    neighbours = [(0.0, 0.0, 0.0, 0.0)]
    for k, grid in enumerate([PRIOR_WEIGHTS] * 2 + [MOMENT_WEIGHTS] * 2):
        neighbours += [tuple(current[:k] + [v] + current[k + 1:]) for v in grid]
    aucs = {n: evaluate_impressions(model.with_content_prior(n[:2], n[2:]), world.features, world.valid, log,
                                    first_seen)["auc"] for n in set(neighbours)}
    assert served >= max(aucs.values()) - 1e-6
    assert aucs[(0.0, 0.0, 0.0, 0.0)] == pytest.approx(history["best_val_auc"], abs=1e-6)
    # On this world (topics in the text, styles in the images) the prior helps.
    assert sum(current) > 0 and served > history["best_val_auc"]
    # Its weighted similarity shifts the logits, so the probabilities are re-calibrated (Platt)
    # on the validation window: their mean there matches the click rate.
    assert history["calibration"]["slope"] > 0 and history["calibration"] != {"slope": 1.0, "intercept": 0.0}
    served = evaluate_impressions(model, world.features, world.valid, log, first_seen)
    labelled = world.valid.labels >= 0
    assert served["scores"][labelled].mean() == pytest.approx(world.valid.labels[labelled].mean(), abs=0.02)
    # The recorded log loss is the served model's (it was the networks' before the prior and
    # the calibration), recomputed here by scikit-learn from the served probabilities.
    expected = log_loss(world.valid.labels[labelled], served["scores"][labelled].astype(np.float64))
    assert history["served_val_log_loss"] == pytest.approx(expected, rel=1e-4)
    assert history["served_val_log_loss"] < history["val_log_loss"][history["best_epoch"] - 1]


@pytest.mark.slow
def test_refit_trains_again_on_both_windows_and_keeps_what_validation_fitted(world, log, tmp_path):
    import dataclasses

    from recsys.models.bundle import RankingModel

    train = select_impressions(world.train, np.arange(300))
    # Articles shown only in the validation window get a category of their own: a vocabulary
    # fitted on the training window cannot know it, one fitted on both windows must.
    in_train = np.zeros(len(world.features), bool)
    in_train[np.concatenate([train.history_items, train.candidate_items])] = True
    only_valid = np.zeros(len(world.features), bool)
    only_valid[np.concatenate([world.valid.history_items, world.valid.candidate_items])] = True
    only_valid &= ~in_train
    assert only_valid.any()
    categories = np.where(only_valid, "late-breaking", world.features.categories).astype(object)
    features = dataclasses.replace(world.features, categories=categories)
    first_seen = first_shown([train, world.valid], len(features))
    kwargs = dict(epochs=2, patience=2, batch_size=32, embedding_dim=32, first_seen=first_seen, content_prior=True)
    plain, plain_history = train_ctr(features, train, world.valid, log, **kwargs)
    refit, history = train_ctr(features, train, world.valid, log, refit=True, **kwargs)
    again, _ = train_ctr(features, train, world.valid, log, refit=True, **kwargs)

    # The first training, the prior's weights and the calibration are those of the plain run.
    for key in ("val_auc", "loss", "best_epoch", "prior_weights", "moment_weights", "calibration"):
        assert history[key] == pytest.approx(plain_history[key], abs=1e-6), key
    assert refit.config.prior_weights == plain.config.prior_weights
    assert refit.config.moment_weights == plain.config.moment_weights
    # The second training ran the kept number of epochs over every impression of both windows.
    best = history["best_epoch"]
    labelled = lambda imps: int((imps.labels >= 0).sum())  # noqa: E731
    assert history["refit"]["epochs"] == best and len(history["refit"]["loss"]) == best
    assert history["refit"]["train_impressions"] == len(train) + len(world.valid)
    assert history["refit"]["train_samples"] == labelled(train) + labelled(world.valid)
    assert refit.config.info["refit"] == {k: history["refit"][k] for k in ("epochs", "train_impressions", "train_samples")}
    assert plain.config.info["refit"] is None
    assert "late-breaking" in refit.config.categories and "late-breaking" not in plain.config.categories

    def scores(model):
        return evaluate_impressions(model, features, world.test, log, first_seen)["scores"]

    served = scores(refit)
    assert not np.allclose(served, scores(plain), atol=1e-3)  # other networks
    np.testing.assert_allclose(served, scores(again), atol=1e-5)  # same seed, same refit
    refit.save(tmp_path / "model")
    loaded = RankingModel.load(tmp_path / "model")
    np.testing.assert_allclose(scores(loaded), served, atol=1e-6)
    assert loaded.config.info["refit"] == refit.config.info["refit"]


def test_anchor_blocks_start_strong_only_where_their_similarity_ranks_the_training_clicks(world, log):
    # Titles of random words: anchors at 4x the learned part's weight were 97% of the
    # embedding, and a small window's few hundred steps left the model at chance (AUC 0.52
    # where a category-and-popularity model reached 0.70).
    from recsys.models.fusion import ANCHOR_START_WEIGHT, WEAK_ANCHOR_START_WEIGHT
    from recsys.models.training import ANCHOR_SIGNAL_AUC, anchor_similarity_aucs

    train = world.train
    kwargs = dict(epochs=1, batch_size=32, embedding_dim=16, history_len=10, anchor_dim=4)
    _, informative = train_ctr(world.features, train, world.valid, log, **kwargs)
    # The world's text is its topic centroid plus noise: text similarity ranks its clicks.
    assert informative["anchor_similarity_auc"]["text"] > ANCHOR_SIGNAL_AUC
    assert informative["anchor_start_weights"][0] == pytest.approx(ANCHOR_START_WEIGHT)
    assert informative["silent_modalities"] == []

    # The same candidates and histories with every title replaced by noise.
    rng = np.random.default_rng(0)
    noise = dataclasses.replace(world.features, text=rng.standard_normal(world.features.text.shape).astype(np.float32))
    model, weak = train_ctr(noise, train, world.valid, log, **kwargs)
    assert abs(weak["anchor_similarity_auc"]["text"] - 0.5) < ANCHOR_SIGNAL_AUC - 0.5
    assert weak["anchor_start_weights"][0] == pytest.approx(WEAK_ANCHOR_START_WEIGHT)
    assert weak["silent_modalities"] == ["text"]
    # An independent reading of the text AUC: the mean similarity, by sklearn, impression by impression.
    fusion = model.item_tower.get_layer("fusion")
    anchors = fusion.content_anchors(noise.text, noise.image, noise.has_image)[:, :4]
    aucs = []
    for i in range(len(train)):
        hist, cand, y = train.history(i), train.candidates(i), train.candidate_labels(i)
        other = ~np.isin(cand, hist)  # a candidate in its own history is left out
        if len(hist) and 0 < y[other].sum() < other.sum():
            aucs.append(roc_auc_score(y[other], anchors[cand[other]] @ anchors[hist].mean(axis=0)))
    assert anchor_similarity_aucs(fusion, noise, train)["text"] == pytest.approx(np.mean(aucs), abs=1e-9)


def test_anchor_start_weights_are_set_and_checked():
    from recsys.models.fusion import MultimodalFusion

    layer = MultimodalFusion(16, num_categories=3, anchor_dim=2)
    layer.build({"text": (None, 8), "image": (None, 6), "has_image": (None,), "category": (None,)})
    layer.set_anchor_start_weights([0.25, 4.0])
    np.testing.assert_allclose(layer.anchor_start_weights(), [0.25, 4.0], rtol=1e-6)
    with pytest.raises(ValueError, match="expected one positive weight per anchor block"):
        layer.set_anchor_start_weights([1.0])


def test_train_ctr_reports_progress_within_each_epoch(world, log, monkeypatch, caplog):
    # It logged once per epoch: about an hour of silence an epoch on MIND-large.
    from types import SimpleNamespace

    import recsys.progress

    clock = iter(range(0, 10**9, 20))  # each reading 20 s after the last: every advance logs a line
    monkeypatch.setattr(recsys.progress, "time", SimpleNamespace(monotonic=lambda: float(next(clock))))
    # Log lines, not a bar, even when pytest -s runs on a terminal.
    monkeypatch.setattr(recsys.progress, "sys", SimpleNamespace(stderr=SimpleNamespace(isatty=lambda: False)))
    with caplog.at_level("INFO", logger="recsys"):
        _, history = train_ctr(world.features, world.train, world.valid, log, epochs=2, batch_size=32,
                               embedding_dim=16, history_len=8, patience=5)
    n = history["train_impressions"]
    steps = [f"{min(k, n)}/{n}" for k in range(32, n + 32, 32)]
    lines = [r.getMessage().split(" (")[0] for r in caplog.records if r.getMessage().startswith("training epoch")]
    assert lines == [f"training epoch {e}/2: {step}" for e in (1, 2) for step in steps]


def test_the_file_exposure_calibration_is_fitted_on_validation_read_as_a_later_file(world, log):
    """train_ctr fits it on the validation window as predict reads a file after the store: the
    store ending where the window begins (histories led by the clicks before it only), the
    window's own earlier shows as the file's exposure. Rebuilt here from a brute-force count
    and scikit-learn's fit."""
    from sklearn.linear_model import LogisticRegression

    from recsys.models.exposure import exposure_design

    train = select_impressions(world.train, np.arange(len(world.train) - 600, len(world.train)))  # the newest: valid shows some
    kwargs = dict(epochs=1, batch_size=32, embedding_dim=32, history_len=20)
    model, history = train_ctr(world.features, train, world.valid, log,
                               clicks=ClickLog.from_impressions([train, world.valid]), **kwargs)
    cal = model.config.file_exposure
    assert cal is not None and history["file_exposure"]["weights"] == list(cal.weights)
    assert model.config.info["file_exposure"] == history["file_exposure"]

    # served with the store's clicks only: those of the training window, before the validation one
    valid, n = with_logged_clicks(world.valid, ClickLog.from_impressions([train]), 20), len(world.features)
    first_seen = first_shown([train, valid], n)
    start = valid.times.min()
    seen = ~np.isnat(first_seen) & (first_seen < start)
    owner = candidate_impression_rows(valid)
    times = valid.times[owner]
    items = valid.candidate_items
    counts = np.array([np.sum((items == item) & (times < t)) for item, t in zip(items, times)])
    hours = np.array([(t - times[(items == item) & (times < t)].min()) / np.timedelta64(1, "h") if c else 0.0
                      for item, t, c in zip(items, times, counts)])
    fresh = ~seen[items]
    assert fresh.any() and (~fresh).any() and (counts > 0).any()  # every column of the design is exercised
    logits = model.score_impressions(valid, model.item_embeddings(world.features), log,
                                     np.where(seen, first_seen, np.datetime64("NaT")), popularity_until=start, logits=True)
    expected = LogisticRegression(C=1.0, max_iter=1000).fit(exposure_design(logits, counts, hours, fresh), valid.labels)
    np.testing.assert_allclose(cal.weights, expected.coef_[0], rtol=1e-4, atol=1e-5)
    assert cal.intercept == pytest.approx(expected.intercept_[0], rel=1e-4, abs=1e-5)
    # the window's span: a scored file is read within it (every show above is inside it)
    assert cal.window_hours == pytest.approx((times.max() - times.min()) / np.timedelta64(1, "h"))
    assert history["file_exposure"]["window_hours"] == cal.window_hours

    without, _ = train_ctr(world.features, train, world.valid, log, file_exposure=False, **kwargs)
    assert without.config.file_exposure is None and without.config.info["file_exposure"] is None


def test_the_category_affinity_is_fitted_on_validation_read_as_a_later_file_before_the_exposure(world, log):
    """train_ctr with the store's skips: the affinity is scikit-learn's fit of the validation
    labels on the later-file logits and each reader's category clicks and skips (counted here
    from the training impressions), and the file exposure is fitted on top of its logits."""
    from sklearn.linear_model import LogisticRegression

    from recsys.models.affinity import KeyVocabulary, SkippedArticles, affinity_design, affinity_inputs
    from recsys.models.exposure import exposure_design

    train = select_impressions(world.train, np.arange(len(world.train) - 600, len(world.train)))
    subcategories = np.array([f"s{i % 3}" for i in range(len(world.features))], dtype=object)
    vocabulary = KeyVocabulary.of(world.features.categories, subcategories)
    codes = vocabulary.codes(world.features.categories, subcategories)
    users = np.unique(train.user_ids)  # every skip of the training impressions, as the store holds them
    owner = candidate_impression_rows(train)
    skipped = train.labels == 0
    skips = SkippedArticles(users, np.searchsorted(users, train.user_ids[owner][skipped]), train.candidate_items[skipped])
    kwargs = dict(epochs=1, batch_size=32, embedding_dim=32, history_len=20)
    model, history = train_ctr(world.features, train, world.valid, log, clicks=ClickLog.from_impressions([train, world.valid]),
                               skips=skips, item_codes=codes, **kwargs)
    aff, cal = model.config.category_affinity, model.config.file_exposure
    assert aff is not None and history["category_affinity"]["weights"] == list(aff.weights)
    assert model.config.info["category_affinity"] == history["category_affinity"]

    valid, n = with_logged_clicks(world.valid, ClickLog.from_impressions([train]), 20), len(world.features)
    first_seen = first_shown([train, valid], n)
    start = valid.times.min()
    seen = ~np.isnat(first_seen) & (first_seen < start)
    logits = model.score_impressions(valid, model.item_embeddings(world.features), log,
                                     np.where(seen, first_seen, np.datetime64("NaT")), popularity_until=start,
                                     logits=True).astype(np.float64)
    inputs = affinity_inputs(valid, skips.counts(codes), codes, 20)
    assert (inputs[1] > 0).any() and (inputs[0] > 0).any()
    x = affinity_design(logits, *inputs)
    mean, scale = x.mean(0), x.std(0)
    expected = LogisticRegression(C=1.0, max_iter=2000).fit((x - mean) / scale, valid.labels)
    with_affinity = aff.logits(logits, *inputs)
    np.testing.assert_allclose(with_affinity, expected.decision_function((x - mean) / scale), rtol=1e-4, atol=1e-4)

    owner = candidate_impression_rows(valid)
    times, items = valid.times[owner], valid.candidate_items
    counts = np.array([np.sum((items == item) & (times < t)) for item, t in zip(items, times)])
    hours = np.array([(t - times[(items == item) & (times < t)].min()) / np.timedelta64(1, "h") if c else 0.0
                      for item, t, c in zip(items, times, counts)])
    on_top = LogisticRegression(C=1.0, max_iter=1000).fit(exposure_design(with_affinity, counts, hours, ~seen[items]),
                                                           valid.labels)
    np.testing.assert_allclose(cal.weights, on_top.coef_[0], rtol=1e-3, atol=1e-4)

    without, _ = train_ctr(world.features, train, world.valid, log, **kwargs)
    assert without.config.category_affinity is None and without.config.info["category_affinity"] is None


@pytest.mark.parametrize("refit", [False, True])
def test_the_affinity_keys_the_content_clusters_of_the_training_articles_anchors(world, log, refit):
    """With the content prior served, train_ctr clusters each modality's content anchors of the
    training window's articles (3 centres each) and fits the affinity over those keys after the
    publisher's: the weights are scikit-learn's fit of the validation labels on the four keys'
    design, the codes the stored centres' nearest. With ``refit`` the centres are those of the
    new networks' anchors, and the codes of most training articles are kept."""
    from sklearn.linear_model import LogisticRegression

    from recsys.models.affinity import KeyVocabulary, SkippedArticles, affinity_design, affinity_inputs

    train = select_impressions(world.train, np.arange(len(world.train) - 600, len(world.train)))
    subcategories = np.array([f"s{i % 3}" for i in range(len(world.features))], dtype=object)
    codes = KeyVocabulary.of(world.features.categories, subcategories).codes(world.features.categories, subcategories)
    users = np.unique(train.user_ids)
    owner = candidate_impression_rows(train)
    skipped = train.labels == 0
    skips = SkippedArticles(users, np.searchsorted(users, train.user_ids[owner][skipped]), train.candidate_items[skipped])
    first_seen = first_shown([train, world.valid], len(world.features))
    clicks = ClickLog.from_impressions([train, world.valid])
    model, history = train_ctr(world.features, train, world.valid, log, epochs=1, batch_size=32, embedding_dim=32,
                               history_len=20, first_seen=first_seen, content_prior=True, clicks=clicks, skips=skips,
                               item_codes=codes, affinity_clusters=3, file_exposure=False, refit=refit)
    assert model.config.prior_dim > 0, "the test needs a served content prior"
    aff = model.config.category_affinity
    assert aff.clusters.blocks == ("text", "image") and [len(t) for t in aff.clusters.centres] == [3, 3]
    assert len(aff.weights) == 23 and history["category_affinity"]["features"] == list(aff.features)
    embeddings = model.item_embeddings(world.features)
    all_codes = model.affinity_item_codes(codes, embeddings)
    anchors = embeddings[:, model.config.embedding_dim:]
    for b, (offset, table) in enumerate(zip(aff.clusters.offsets, aff.clusters.centres)):  # nearest centre, by a loop
        for row in range(0, len(anchors), 5):
            x = anchors[row, offset : offset + len(table[0])].astype(np.float64)
            assert all_codes[row, 2 + b] == (-1 if x @ x < 0.5 else int(np.argmax([x @ np.array(c) for c in table])))
    sizes = history["category_affinity"]["cluster_sizes"]
    assert set(sizes) == {"text_cluster", "image_cluster"} and all(len(v) == 3 and min(v) > 0 for v in sizes.values())
    if refit:  # the fit read the first networks' codes; the served ones keep most articles in their clusters
        # (the two bases are close here: test_category_affinity rotates one to check the re-centring)
        for b, key in enumerate(("text_cluster", "image_cluster")):
            served = np.bincount(all_codes[:, 2 + b][all_codes[:, 2 + b] >= 0], minlength=3)
            assert np.abs(served - sizes[key]).sum() <= 0.2 * sum(sizes[key]), (key, served, sizes[key])
        return
    np.testing.assert_array_equal(np.bincount(all_codes[:, 2], minlength=3), sizes["text_cluster"])

    valid = with_logged_clicks(world.valid, ClickLog.from_impressions([train]), 20)
    start = valid.times.min()
    seen = ~np.isnat(first_seen) & (first_seen < start)
    logits = model.score_impressions(valid, embeddings, log, np.where(seen, first_seen, np.datetime64("NaT")),
                                     popularity_until=start, logits=True).astype(np.float64)
    inputs = affinity_inputs(valid, skips.counts(all_codes), all_codes, 20)
    assert (inputs[0][:, 2:] > 0).any() and (inputs[1][:, 2:] > 0).any()
    x = affinity_design(logits, *inputs)
    mean, scale = x.mean(0), x.std(0)
    expected = LogisticRegression(C=1.0, max_iter=2000).fit((x - mean) / scale, valid.labels)
    np.testing.assert_allclose(aff.logits(logits, *inputs), expected.decision_function((x - mean) / scale),
                               rtol=1e-4, atol=1e-4)


def test_a_click_log_until_a_time_keeps_the_clicks_strictly_before_it():
    t = np.datetime64("2019-11-15T10:00:00", "s")
    clicks = ClickLog.from_events(np.array(["u1", "u2", "u1", "u3"], object),
                                  np.array([t - np.timedelta64(5, "s"), t, t + np.timedelta64(1, "s"), t - np.timedelta64(1, "h")]),
                                  np.array([1, 2, 3, 4]))
    kept = clicks.until(t)
    assert kept.user_ids.tolist() == ["u1", "u3"] and kept.items.tolist() == [1, 4]
    assert len(clicks.until(t - np.timedelta64(2, "h"))) == 0


def _scripted_validation(monkeypatch, aucs):
    """Replaces the per-epoch validation with ``aucs`` in turn; returns the list that receives a
    snapshot of the networks' weights at each validation (item tower, user encoder, scorer)."""
    script, snapshots = iter(aucs), []

    def scripted(model, features, impressions, log_, first_seen, **kwargs):
        snapshots.append([layer.get_weights() for layer in (model.item_tower, model.user_encoder, model.scorer)])
        return {"auc": next(script), "log_loss": 0.5, "num_scored": len(impressions), "scores": None}

    monkeypatch.setattr(training, "evaluate_impressions", scripted)
    return snapshots


def _same_weights(a, b) -> bool:
    return all(len(x) == len(y) and all(np.array_equal(u, v) for u, v in zip(x, y)) for x, y in zip(a, b))


_SCRIPTED_RUN = dict(batch_size=32, embedding_dim=16, history_len=8, calibrate=False, file_exposure=False)


def test_early_stopping_returns_the_best_epochs_weights_not_the_last(world, log, monkeypatch):
    snapshots = _scripted_validation(monkeypatch, [0.7, 0.5])
    train = select_impressions(world.train, np.arange(200))
    model, history = train_ctr(world.features, train, world.valid, log, epochs=2, patience=2, **_SCRIPTED_RUN)
    assert history["val_auc"] == [0.7, 0.5] and history["best_epoch"] == 1
    served = [layer.get_weights() for layer in (model.item_tower, model.user_encoder, model.scorer)]
    assert not _same_weights(snapshots[0], snapshots[1])  # epoch 2 moved the weights
    assert _same_weights(served, snapshots[0])


def test_early_stopping_stops_once_patience_epochs_pass_without_a_better_auc(world, log, monkeypatch):
    # patience=2: epochs 2 and 3 are not better than epoch 1, so epoch 4 (0.7) never runs.
    _scripted_validation(monkeypatch, [0.6, 0.5, 0.5, 0.7, 0.8])
    train = select_impressions(world.train, np.arange(200))
    _, history = train_ctr(world.features, train, world.valid, log, epochs=5, patience=2, **_SCRIPTED_RUN)
    assert len(history["loss"]) == 3 and history["val_auc"] == [0.6, 0.5, 0.5]
    assert history["best_epoch"] == 1 and history["best_val_auc"] == 0.6


@pytest.mark.slow
def test_a_weight_average_is_validated_kept_and_served_and_leaves_the_steps_alone(world, log, monkeypatch):
    train = select_impressions(world.train, np.arange(200))
    plain_snapshots = _scripted_validation(monkeypatch, [0.7, 0.5])
    _, plain_history = train_ctr(world.features, train, world.valid, log, epochs=2, patience=2, **_SCRIPTED_RUN)
    snapshots = _scripted_validation(monkeypatch, [0.7, 0.5])
    built = []

    class Recorded(training.WeightAverage):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(training, "WeightAverage", Recorded)
    model, history = train_ctr(world.features, train, world.valid, log, epochs=2, patience=2, weight_average=1.0,
                               **_SCRIPTED_RUN)
    served = [layer.get_weights() for layer in (model.item_tower, model.user_encoder, model.scorer)]
    assert history["best_epoch"] == 1
    # Every trainable weight of the three served blocks is averaged, no more.
    averaged = {id(v) for v in built[0].variables}
    assert averaged == {id(w) for block in (model.item_tower, model.user_encoder, model.scorer)
                        for w in block.trainable_weights}
    # A horizon of one epoch: as many steps as batches of 32 impressions.
    assert built[0].decay == pytest.approx(1 - 1 / -(-history["train_impressions"] // _SCRIPTED_RUN["batch_size"]))
    assert _same_weights(served, snapshots[0])  # what epoch 1 validated is what is served
    assert not _same_weights(snapshots[0], plain_snapshots[0])  # an average, not the last step's weights
    # The second epoch trained on from the last step's weights, not from the average swapped in
    # for the validation: its loss is the plain training's.
    np.testing.assert_allclose(history["loss"], plain_history["loss"], rtol=1e-5)


@pytest.mark.slow
def test_the_refit_serves_its_weight_average_at_its_end(world, log, monkeypatch):
    train = select_impressions(world.train, np.arange(200))
    blocks = lambda m: [layer.get_weights() for layer in (m.item_tower, m.user_encoder, m.scorer)]  # noqa: E731
    _scripted_validation(monkeypatch, [0.7])
    plain, plain_history = train_ctr(world.features, train, world.valid, log, epochs=1, refit=True, **_SCRIPTED_RUN)
    _scripted_validation(monkeypatch, [0.7])
    averaged, history = train_ctr(world.features, train, world.valid, log, epochs=1, refit=True, weight_average=1.0,
                                  **_SCRIPTED_RUN)
    assert history["refit"]["epochs"] == plain_history["refit"]["epochs"] == 1
    np.testing.assert_allclose(history["refit"]["loss"], plain_history["refit"]["loss"], rtol=1e-5)  # the same steps
    assert not _same_weights(blocks(averaged), blocks(plain))  # served: their average, not the last step's
