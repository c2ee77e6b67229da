"""Scoring a behaviors file (predict / evaluate) serves each model the histories it trained on."""

from __future__ import annotations

import gc
import json
import re
import sqlite3
import warnings
from contextlib import closing
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from recsys.config import load_config
from recsys.data.mind import TIME_FORMAT, iter_behaviors, scan_behaviors
from recsys.errors import DiskError, RecsysError
from recsys.data.interactions import InteractionLog, candidate_impression_rows, with_logged_clicks
from recsys.pipelines.predict import run_predict
from recsys.pipelines.scoring import (
    FEATURES_AT, FeatureTimes, VersionScorer, feature_times, iter_behavior_chunks, load_scoring_catalogue, read_file_shows,
    scoring_span,
)
from recsys.pipelines.train import run_train
from recsys.versions import get_version
from tests.sample_store import ingested_sample
from tests.signals import swallowed_sigterm

pytestmark = pytest.mark.slow  # every test reads the module's two trained versions


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A sample world ingested, and two one-epoch models: with and without logged clicks (both
    without the category affinity, so that their scores are the networks' and the exposure's);
    ``versions["affinity"]``: with logged clicks and the category affinity (the default)."""
    world, ws, engine = ingested_sample(tmp_path_factory.mktemp("sample"), num_users=80, num_news=160, num_impressions=400, seed=5)
    versions = {}
    base = {"model.epochs": 1, "model.embedding_dim": 32, "model.anchor_dim": 4}
    versions["affinity"] = run_train(engine, ws, load_config(None, base), make_current=False)["version"]
    for flag in (False, True):
        config = load_config(None, {**base, "model.logged_clicks": flag, "model.category_affinity": False})
        versions[flag] = run_train(engine, ws, config, make_current=flag)["version"]
    yield world, ws, engine, config, versions
    engine.dispose()


def test_a_version_of_other_encoders_is_refused_before_anything_is_encoded(trained, tmp_path, monkeypatch):
    """predict, evaluate (with its ablations), index build and the nightly's refresh encoded the
    whole catalogue (minutes to hours at MIND size) and only then found the version's encoders
    were not the configured ones."""
    from recsys.encoders import pipeline
    from recsys.errors import ModelMismatchError
    from recsys.pipelines.evaluate import run_evaluate, train_missing_ablations
    from recsys.pipelines.index import run_index_build
    from recsys.pipelines.nightly import refresh_index

    world, ws, engine, config, versions = trained
    other = load_config(None, {"encoders.use_abstract": not config.encoders.use_abstract})

    def encoded(*args, **kwargs):
        raise AssertionError("the catalogue was encoded before the encoders were checked")

    monkeypatch.setattr(pipeline, "encode_items", encoded)
    mv = get_version(engine, versions[True])
    mismatch = rf"model version {mv.version} was built with text_encoder"
    calls = {
        "predict": lambda: run_predict(engine, ws, other, behaviors=world / "behaviors_test.tsv", out=tmp_path / "p.txt",
                                       version=mv.version),
        "evaluate": lambda: run_evaluate(engine, ws, other, behaviors=world / "behaviors_test.tsv", out=tmp_path / "e",
                                         versions=[mv.version]),
        "ablations": lambda: train_missing_ablations(engine, ws, other, mv, {}),
        "index build": lambda: run_index_build(engine, ws, other, version=mv.version),
        "refresh": lambda: refresh_index(engine, ws, other, mv),
    }
    for name, call in calls.items():
        with pytest.raises(ModelMismatchError, match=mismatch):
            call()
    assert not (tmp_path / "p.txt").exists()


def test_the_manifest_counts_the_validation_impressions_its_auc_averages(trained):
    """``data.valid_scoreable_impressions`` of a real training, counted from the behaviors file."""
    from datetime import datetime

    world, ws, engine, config, versions = trained
    for version in versions.values():
        manifest = get_version(engine, version).manifest
        start, until = (datetime.fromisoformat(manifest["training_window"][key]) for key in ("valid_start", "until"))
        rows = [row for row in iter_behaviors(world / "behaviors_train.tsv") if start <= row.time <= until]
        assert manifest["data"]["valid_impressions"] == len(rows) > 0
        assert manifest["data"]["valid_scoreable_impressions"] == sum(set(row.labels) == {0, 1} for row in rows)


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
    for flag in (False, True):
        mv = get_version(engine, versions[flag])
        assert mv.manifest["logged_clicks"] is flag
        scorer = VersionScorer(mv, catalogue)
        assert scorer.model.config.logged_clicks is flag
        led = with_logged_clicks(imps, catalogue.clicks, scorer.history_len)
        on_led = scorer.model.score_impressions(led, scorer.embeddings, catalogue.log, catalogue.first_seen)
        on_file = scorer.model.score_impressions(imps, scorer.embeddings, catalogue.log, catalogue.first_seen)
        # The test window follows training: its users' training clicks change their vectors.
        assert np.abs(on_led - on_file).max() > 1e-4
        np.testing.assert_allclose(scorer.score(imps), on_led if flag else on_file, rtol=1e-5, atol=1e-6)


def test_store_end_reads_later_impressions_with_the_stores_last_statistics(trained):
    world, ws, engine, config, versions = trained
    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    assert feature_times(catalogue, "impression") == FeatureTimes()
    end = feature_times(catalogue, "store-end").popularity_until
    last_show = max(np.datetime64(row.time, "s") for row in iter_behaviors(world / "behaviors_train.tsv"))
    assert end == last_show + np.timedelta64(1, "s")
    assert feature_times(catalogue, "store-end") == FeatureTimes(popularity_until=end, age_until=end)
    assert feature_times(catalogue, "popularity-at-end") == FeatureTimes(popularity_until=end)

    imps, _ = next(iter_behavior_chunks(Path(world / "behaviors_test.tsv"), catalogue, history_len=50))
    later = np.repeat(imps.times > end, np.diff(imps.candidate_offsets))
    assert later.all()  # the sample's test window follows the ingested training window
    mv = get_version(engine, versions[True])
    default = VersionScorer(mv, catalogue)
    at_impression = default.score(imps)
    at_end = VersionScorer(mv, catalogue, times=feature_times(catalogue, "store-end")).score(imps)
    popularity_at_end = VersionScorer(mv, catalogue, times=feature_times(catalogue, "popularity-at-end")).score(imps)
    # Every test impression is after the end, so each reads the statistics of the end itself:
    # the batch path that scores everything at one time (as_of) gives the same numbers.
    led = with_logged_clicks(imps, catalogue.clicks, default.history_len)
    model = default.model
    expected = model.score_impressions(led, default.embeddings, catalogue.log, catalogue.first_seen, as_of=end)
    np.testing.assert_allclose(at_end, expected, rtol=1e-5, atol=1e-6)
    # popularity-at-end: the end's popularity columns with each impression's own age column,
    # assembled from the parts (user vectors, side features, pair scorer)
    owner = candidate_impression_rows(led)
    items = led.candidate_items.astype(np.int64)
    side_end = model.side_features(items, np.full(len(items), end), catalogue.log, catalogue.first_seen)
    side_own = model.side_features(items, led.times[owner], catalogue.log, catalogue.first_seen)
    side = np.concatenate([side_end[:, :2], side_own[:, 2:]], axis=1)  # log clicks, log shows | log age
    users = model.user_vectors(led.history_offsets, led.history_items, default.embeddings)
    np.testing.assert_allclose(popularity_at_end, model.score(users[owner], default.embeddings[items], side),
                               rtol=1e-5, atol=1e-6)
    # A day or more past the end, impression-time windows are empty and articles are older: the scores differ.
    assert np.abs(at_end - at_impression).max() > 1e-4
    assert np.abs(popularity_at_end - at_end).max() > 1e-4
    assert np.abs(popularity_at_end - at_impression).max() > 1e-4


def test_a_files_span_reads_only_the_log_it_counts_and_scores_the_same(trained):
    """predict/evaluate read the popularity log only where the file's side features look
    (``ScoringSpan.log_window``): every reading scores as with the whole store's log."""
    world, ws, engine, config, versions = trained
    whole = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    assert whole.end == whole.log.end  # the store's end, read apart from the log
    mv = get_version(engine, versions[True])
    on_whole = VersionScorer(mv, whole)
    for name in ("behaviors_test.tsv", "behaviors_train.tsv"):
        path = world / name
        times = [row.time for row in iter_behaviors(path)]
        span = scoring_span(scan_behaviors(path), [mv])
        assert (span.first, span.last) == (min(times), max(times))
        assert span.window_hours == on_whole.model.config.side_features.window_hours
        part = load_scoring_catalogue(engine, ws, config, news=None, images=None, span=span)
        assert part.end == whole.end
        on_part = VersionScorer(mv, part)
        for mode in FEATURES_AT:
            on_whole.times, on_part.times = feature_times(whole, mode), feature_times(part, mode)
            assert on_part.times == on_whole.times
            for imps, _ in iter_behavior_chunks(path, whole, chunk_size=150, history_len=50):
                np.testing.assert_array_equal(on_part.score(imps), on_whole.score(imps), err_msg=f"{name} {mode}")
        if name == "behaviors_test.tsv":  # a later file reads the store's last window only
            assert 0 < len(part.log) < len(whole.log) / 2, (len(part.log), len(whole.log))


def test_every_reading_agrees_inside_the_stores_time_range(trained):
    """Impressions before the store's end read both features at their own time in every mode."""
    world, ws, engine, config, versions = trained
    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    imps, _ = next(iter_behavior_chunks(Path(world / "behaviors_train.tsv"), catalogue, history_len=50))
    assert (imps.times < catalogue.log.end).all()
    mv = get_version(engine, versions[True])
    scores = [VersionScorer(mv, catalogue, times=feature_times(catalogue, mode)).score(imps)
              for mode in ("impression", "store-end", "popularity-at-end")]
    np.testing.assert_array_equal(scores[0], scores[1])
    np.testing.assert_array_equal(scores[0], scores[2])


def test_store_end_without_a_logged_show_is_refused(trained):
    world, ws, engine, config, _ = trained
    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    empty = InteractionLog.from_events(np.array([], np.int64), np.array([], "datetime64[s]"), np.array([], np.int8),
                                       len(catalogue.features))
    catalogue.log, catalogue.end = empty, None
    with pytest.raises(RecsysError, match="store-end: the store holds no labelled impression"):
        feature_times(catalogue, "store-end")
    assert feature_times(catalogue, "impression") == FeatureTimes()
    # With nothing logged every popularity window is empty wherever it is read: the default reads at the impression.
    assert feature_times(catalogue, "popularity-at-end") == FeatureTimes()
    assert feature_times(catalogue, "popularity-at-end").describe() == "impression time"


def test_feature_times_describe_themselves():
    end = np.datetime64("2019-11-15T00:00:01", "s")
    assert FeatureTimes().describe() == "impression time"
    assert FeatureTimes(end, end).describe() == "impression time, at most the store's end 2019-11-15T00:00:01"
    assert FeatureTimes(popularity_until=end).describe() == (
        "popularity at impression time, at most the store's end 2019-11-15T00:00:01; age at impression time")


def test_unknown_features_at_is_refused_before_anything_is_written(trained, tmp_path):
    world, ws, engine, config, _ = trained
    out = tmp_path / "prediction.txt"
    with pytest.raises(RecsysError, match=r"--features-at is 'tomorrow', expected one of \['popularity-at-end', 'impression', 'store-end'\]"):
        run_predict(engine, ws, config, behaviors=world / "behaviors_test.tsv", out=out, features_at="tomorrow")
    assert not out.exists()


def test_a_refit_version_records_it_and_scores_a_behaviors_file(trained, tmp_path):
    """``model.refit``: the manifest says so and counts both windows; predict serves it as any version."""
    world, ws, engine, config, versions = trained
    refit_config = load_config(None, {"model.epochs": 1, "model.embedding_dim": 32, "model.anchor_dim": 4, "model.refit": True})
    summary = run_train(engine, ws, refit_config, make_current=False)
    mv = get_version(engine, summary["version"])
    data, metrics = mv.manifest["data"], mv.manifest["metrics"]
    assert mv.manifest["refit"] is True and get_version(engine, versions[True]).manifest["refit"] is False
    assert metrics["refit"] == {"epochs": metrics["best_epoch"],
                                "train_impressions": data["train_impressions"] + data["valid_impressions"],
                                "train_samples": data["train_samples"] + data["valid_samples"]}
    assert "refit" not in get_version(engine, versions[True]).manifest["metrics"]
    out = tmp_path / "prediction.txt"
    run_predict(engine, ws, refit_config, behaviors=world / "behaviors_test.tsv", out=out, version=summary["version"])
    lines = out.read_text().splitlines()
    assert len(lines) == sum(1 for _ in iter_behaviors(world / "behaviors_test.tsv"))


def test_predict_ranks_each_impressions_candidates_by_the_chosen_versions_scores(trained, tmp_path):
    """Each line is the impression id and, per candidate in file order, 1 + the number of its
    candidates scored higher (ties in candidate order), by the version and reading asked for:
    worked out here from the version's own scores, for the labelled file and its unlabelled copy."""
    world, ws, engine, config, versions = trained
    path = world / "behaviors_test.tsv"
    unlabelled = tmp_path / "unlabelled.tsv"
    unlabelled.write_text("".join("\t".join(line.split("\t")[:4] + [" ".join(c.rsplit("-", 1)[0] for c in line.split("\t")[4].split())])
                                  + "\n" for line in path.read_text().splitlines()))
    rows = list(iter_behaviors(path))
    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    mv = get_version(engine, versions[False])  # not the current version: predict must serve the one named
    scorer = VersionScorer(mv, catalogue, times=feature_times(catalogue, "impression"), shows=read_file_shows(path, catalogue))
    imps, _ = next(iter_behavior_chunks(path, catalogue, chunk_size=10**6, history_len=scorer.history_len))
    assert [catalogue.features.news_ids[i] for i in imps.candidate_items] == [n for r in rows for n in r.news_ids]
    scores, offsets = scorer.score(imps), imps.candidate_offsets
    expected = []
    for i, row in enumerate(rows):
        s = scores[offsets[i]:offsets[i + 1]].tolist()
        assert len(s) == len(row.news_ids)
        ranks = [1 + sum(x > y for x in s) + sum(x == y for x in s[:j]) for j, y in enumerate(s)]
        expected.append(f"{row.impression_id} [{','.join(map(str, ranks))}]")
    assert any(line.split()[1] != "[" + ",".join(map(str, range(1, line.count(",") + 2))) + "]" for line in expected)
    for name, behaviors in (("labelled", path), ("unlabelled", unlabelled)):
        out = tmp_path / f"{name}.txt"
        summary = run_predict(engine, ws, config, behaviors=behaviors, out=out, version=mv.version, features_at="impression")
        assert out.read_text().splitlines() == expected, name
        assert (summary["version"], summary["impressions"], summary["candidates"]) == (
            mv.version, len(rows), sum(len(r.news_ids) for r in rows))


def test_history_length_groups_count_the_clicks_the_model_reads(trained, tmp_path):
    """A user with an empty History column who clicked in the ingested window is not cold to a
    model that reads logged clicks; counted from the files alone."""
    from recsys.pipelines.evaluate import run_evaluate

    world, ws, engine, config, versions = trained
    clicked_at: dict[str, list] = {}
    for row in iter_behaviors(world / "behaviors_train.tsv"):
        if 1 in row.labels:
            clicked_at.setdefault(row.user_id, []).append(row.time)
    test_rows = list(iter_behaviors(world / "behaviors_test.tsv"))
    empty_column = [not row.history for row in test_rows]
    no_click_before = [not any(t < row.time for t in clicked_at.get(row.user_id, [])) for row in test_rows]
    expected = {False: sum(empty_column), True: sum(e and n for e, n in zip(empty_column, no_click_before))}
    assert expected[True] < expected[False], "the world should have users with clicks but an empty History column"
    for flag in (False, True):
        version = versions[flag]
        summary = run_evaluate(engine, ws, config, behaviors=world / "behaviors_test.tsv", out=tmp_path / str(flag),
                               versions=[version], num_resamples=10)
        groups = json.loads((tmp_path / str(flag) / "metrics.json").read_text())["models"]
        first = next(m for name, m in groups.items() if version in name)
        cold = first["breakdowns"]["history_length"].get("cold", {"num_impressions": 0})["num_impressions"]
        assert cold == expected[flag], (flag, summary)


def test_evaluate_writes_prediction_files_per_chunk_and_keeps_the_old_ones_on_failure(trained, tmp_path):
    from recsys.pipelines.evaluate import run_evaluate

    world, ws, engine, config, versions = trained
    version = versions[True]
    out = tmp_path / "report"
    run_evaluate(engine, ws, config, behaviors=world / "behaviors_test.tsv", out=out, versions=[version], num_resamples=10,
                 chunk_size=7)
    written = (out / f"prediction-{version}.txt").read_text()
    run_predict(engine, ws, config, behaviors=world / "behaviors_test.tsv", out=tmp_path / "predict.txt", version=version)
    assert written == (tmp_path / "predict.txt").read_text()  # same lines, written in chunks of 7

    # A bad line after several chunks: nothing replaces the earlier report's prediction file.
    lines = (world / "behaviors_test.tsv").read_text().splitlines()
    bad = tmp_path / "bad" / "behaviors_test.tsv"
    bad.parent.mkdir()
    bad.write_text("\n".join([*lines[:30], "99999\tU1\t11/15/2019 9:00:00 AM\t\tN_nowhere-1"]) + "\n")
    with pytest.raises(RecsysError, match="N_nowhere"):
        run_evaluate(engine, ws, config, behaviors=bad, out=out, versions=[version], num_resamples=10, chunk_size=7)
    assert (out / f"prediction-{version}.txt").read_text() == written
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    # Into a new folder: the failed run leaves no empty folders behind.
    with pytest.raises(RecsysError, match="N_nowhere"):
        run_evaluate(engine, ws, config, behaviors=bad, out=tmp_path / "new" / "report", versions=[version], num_resamples=10)
    assert not (tmp_path / "new").exists()


def test_the_baselines_are_the_same_in_any_chunking_and_candidate_order(trained, tmp_path):
    """The random and most-popular baselines drew from one generator in turn: their figures
    moved with the chunk size (most popular 0.5335 against 0.5319 on an audit's file), and
    the draws followed the candidates' positions."""
    from recsys.pipelines.evaluate import run_evaluate

    world, ws, engine, config, versions = trained
    lines = (world / "behaviors_test.tsv").read_text().splitlines()
    reversed_file = tmp_path / "reversed" / "behaviors_test.tsv"
    reversed_file.parent.mkdir()
    reversed_file.write_text("".join(
        "\t".join([*cols[:4], " ".join(cols[4].split()[::-1])]) + "\n" for cols in (line.split("\t") for line in lines)))
    runs = [
        run_evaluate(engine, ws, config, behaviors=path, out=tmp_path / name, versions=[versions[True]], num_resamples=10,
                     chunk_size=chunk)
        for name, path, chunk in (("whole", world / "behaviors_test.tsv", 20_000), ("chunks", world / "behaviors_test.tsv", 7),
                                  ("reversed", reversed_file, 20_000))
    ]
    baselines = [{k: run["impression_auc"][k] for k in ("random", "most popular")} for run in runs]
    assert baselines[0] == baselines[1] == baselines[2]
    assert 0.4 < baselines[0]["random"] < 0.6 and baselines[0]["most popular"] != baselines[0]["random"]


def test_fixed_uniform_numbers_are_uniform_and_independent_of_position():
    from recsys.pipelines.evaluate import fixed_uniform, news_id_keys

    rng = np.random.default_rng(3)
    ids = rng.integers(0, 10**18, 2000)
    offsets = np.arange(0, 2001 * 50, 50)
    items = news_id_keys([f"N{i}" for i in rng.integers(0, 60_000, 2000 * 50)])
    assert news_id_keys(["N1", "N2"]).tolist() == news_id_keys(["N0", "N2", "N1"])[[2, 1]].tolist()  # by id, not row
    u = fixed_uniform(ids, offsets, items, salt=1)
    assert u.shape == (100_000,) and u.min() >= 0.0 and u.max() < 1.0
    # Uniform: each tenth of [0, 1) holds a tenth of the numbers (binomial sd about 95).
    np.testing.assert_allclose(np.histogram(u, bins=10, range=(0, 1))[0], 10_000, atol=500)
    # Another salt gives unrelated numbers; an article keeps its number wherever it stands.
    assert abs(np.corrcoef(u, fixed_uniform(ids, offsets, items, salt=2))[0, 1]) < 0.02
    flipped = np.concatenate([items[offsets[i]:offsets[i + 1]][::-1] for i in range(2000)])
    np.testing.assert_array_equal(fixed_uniform(ids, offsets, flipped, salt=1),
                                  np.concatenate([u[offsets[i]:offsets[i + 1]][::-1] for i in range(2000)]))


def test_evaluate_warns_when_the_store_holds_the_files_impressions_with_their_clicks(trained, tmp_path):
    """A file ingested with its labels (a nightly flow that ingests MIND dev) feeds its own
    clicks to the popularity and histories the models read: an audit's figures rose (AUC
    0.7072 -> 0.7093) with no word in the report, which called them held-out."""
    from recsys.pipelines.evaluate import run_evaluate
    from recsys.pipelines.ingest import run_ingest
    from recsys.store.database import open_store

    world, ws, engine, config, versions = trained
    test_file = world / "behaviors_test.tsv"
    lines = test_file.read_text().splitlines()
    unlabelled = tmp_path / "unlabelled.tsv"
    unlabelled.write_text("".join(
        "\t".join([*cols[:4], " ".join(c.rsplit("-", 1)[0] for c in cols[4].split())]) + "\n"
        for cols in (line.split("\t") for line in lines)))
    clean = run_evaluate(engine, ws, config, behaviors=test_file, out=tmp_path / "clean", versions=[versions[True]],
                         num_resamples=10)
    assert clean["labelled_impressions_in_store"] == 0
    results = {}
    for name, path in (("labelled", test_file), ("unlabelled", unlabelled)):
        db = tmp_path / f"{name}.db"
        with closing(sqlite3.connect(engine.url.database)) as source, closing(sqlite3.connect(db)) as target:
            source.backup(target)
        copy = open_store(f"sqlite:///{db}")
        try:
            run_ingest(copy, ws, news=None, behaviors=path, images=None, source="dev")
            results[name] = run_evaluate(copy, ws, config, behaviors=test_file, out=tmp_path / name,
                                         versions=[versions[True]], num_resamples=10)
        finally:
            copy.dispose()
    assert results["unlabelled"]["labelled_impressions_in_store"] == 0
    assert results["labelled"]["labelled_impressions_in_store"] == len(lines)
    header = json.loads(Path(results["labelled"]["metrics_json"]).read_text())["header"]
    assert header["labelled_impressions_in_store"] == len(lines)
    assert any(f"the store holds {len(lines)} of its {len(lines)} impressions with their clicks" in w
               and "source 'dev'" in w and "not held-out" in w for w in header["warnings"])
    assert json.loads(Path(clean["metrics_json"]).read_text())["header"]["warnings"] == []


class _FullDisk:
    """A file whose writes fail: the disk is full."""

    def __init__(self, file):
        self._file = file

    def write(self, data):
        raise OSError(28, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._file, name)


def test_evaluate_whose_report_cannot_be_written_leaves_the_earlier_report_whole(trained, tmp_path, monkeypatch):
    # metrics.json was replaced before report.html was written: on a full disk a new
    # metrics.json sat beside the old page, and a new folder kept the prediction files alone.
    from contextlib import contextmanager

    import recsys.evaluation.report as report_module
    from recsys.pipelines.evaluate import run_evaluate

    world, ws, engine, config, versions = trained
    out = tmp_path / "report"
    run_evaluate(engine, ws, config, behaviors=world / "behaviors_test.tsv", out=out, versions=[versions[True]],
                 num_resamples=10)
    before = {name: (out / name).read_bytes() for name in ("metrics.json", "report.html")}
    real_open = report_module.atomic_open

    @contextmanager
    def page_on_a_full_disk(path, *args, **kwargs):
        with real_open(path, *args, **kwargs) as out_file:
            yield _FullDisk(out_file) if Path(path).name == "report.html" else out_file

    monkeypatch.setattr(report_module, "atomic_open", page_on_a_full_disk)
    both = [versions[True], versions[False]]
    with pytest.raises(DiskError, match=r"cannot write .*report\.html: no space left on device"):
        run_evaluate(engine, ws, config, behaviors=world / "behaviors_test.tsv", out=out, versions=both, num_resamples=10)
    assert {name: (out / name).read_bytes() for name in before} == before  # the earlier pair, whole
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    # Into a new folder: removed with the prediction files the failed run wrote into it.
    with pytest.raises(DiskError, match=r"cannot write .*report\.html: no space left on device"):
        run_evaluate(engine, ws, config, behaviors=world / "behaviors_test.tsv", out=tmp_path / "new" / "report",
                     versions=both, num_resamples=10)
    assert not (tmp_path / "new").exists()


def test_evaluate_into_an_earlier_reports_folder_leaves_one_evaluation(trained, tmp_path, caplog):
    # The earlier report's prediction files of other models stayed beside the new metrics.json.
    from recsys.pipelines.evaluate import run_evaluate

    world, ws, engine, config, versions = trained
    out = tmp_path / "report"
    first = run_evaluate(engine, ws, config, behaviors=world / "behaviors_test.tsv", out=out,
                         versions=[versions[True], versions[False]], num_resamples=10)
    assert first["removed_stale_predictions"] == []
    (out / "notes.txt").write_text("mine")  # not a prediction file: kept
    (out / "prediction-mine.txt").write_text("1 [1,2]\n")  # named like one, but no report wrote it: kept
    with caplog.at_level("WARNING", logger="recsys.evaluate"):
        second = run_evaluate(engine, ws, config, behaviors=world / "behaviors_test.tsv", out=out,
                              versions=[versions[True]], num_resamples=10)
    gone = out / f"prediction-{versions[False]}.txt"
    assert second["removed_stale_predictions"] == [str(gone)]
    assert f"removed {gone}: an earlier report's prediction file" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == sorted(["metrics.json", "report.html", "notes.txt",
                                                             "prediction-mine.txt", f"prediction-{versions[True]}.txt"])
    assert list(json.loads((out / "metrics.json").read_text())["header"]["model_versions"]) == [versions[True]]
    # A run interrupted after its prediction files were written left one that no metrics.json
    # lists: named after a version of the store, it is recsys's and goes too.
    (out / f"prediction-{versions[False]}.txt").write_text("1 [1,2]\n")
    (out / "metrics.json").unlink()
    third = run_evaluate(engine, ws, config, behaviors=world / "behaviors_test.tsv", out=out,
                         versions=[versions[True]], num_resamples=10)
    assert third["removed_stale_predictions"] == [str(gone)] and not gone.exists()
    assert (out / "prediction-mine.txt").exists()


def test_iter_scored_shares_a_reading_and_scores_each_model_as_alone(trained):
    from recsys.pipelines.scoring import iter_scored

    world, ws, engine, config, versions = trained
    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    scorers = {flag: VersionScorer(get_version(engine, v), catalogue) for flag, v in versions.items()}
    for order in ((True, False, True), (False, True), ("affinity", True, "affinity")):
        chosen = {f"{flag}-{i}": scorers[flag] for i, flag in enumerate(order)}
        for chunk in iter_scored(world / "behaviors_test.tsv", catalogue, chosen, chunk_size=50):
            for name, scorer in chosen.items():
                np.testing.assert_array_equal(chunk.scores[name], scorer.score(chunk.impressions))
            first = scorers[order[0]].read(chunk.impressions)
            np.testing.assert_array_equal(chunk.read.history_offsets, first.history_offsets)
            np.testing.assert_array_equal(chunk.read.history_items, first.history_items)


def test_popularity_baseline_counts_the_training_windows_clicks_in_the_file(trained):
    from datetime import datetime

    from recsys.pipelines.evaluate import _popularity

    world, ws, engine, config, versions = trained
    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    mv = get_version(engine, versions[True])
    window = mv.manifest["training_window"]
    since, until = datetime.fromisoformat(window["since"]), datetime.fromisoformat(window["until"])
    expected = np.zeros(len(catalogue.features))
    for row in iter_behaviors(world / "behaviors_train.tsv"):
        if since <= row.time < until:
            for n, label in zip(row.news_ids, row.labels):
                expected[catalogue.row_of[n]] += label
    assert expected.sum() > 0
    np.testing.assert_array_equal(_popularity(engine, catalogue, mv), expected)


def test_the_log_window_keeps_the_shows_on_its_boundary_seconds(engine, tmp_path):
    """``read_popularity_log``: shows exactly one window before the first counted time are read,
    shows at the file's last time are not needed; popularity agrees with the whole log at every
    second the file's side features can be read at (SQLite and PostgreSQL)."""
    from datetime import datetime, timedelta

    from recsys.pipelines.scoring import ScoringSpan, read_popularity_log
    from recsys.store.ingest import ingest
    from tests.store.mind_files import behavior_line, news_line, write_lines

    t0, hour, second = datetime(2019, 11, 9), timedelta(hours=1), timedelta(seconds=1)
    times = [t0 + k * hour for k in range(48)] + [t0 + 23 * hour + second]  # the last: end - 24 h exactly
    lines = [behavior_line(i + 1, f"U{i % 4}", t, [], [f"N{1 + i % 2}-{i % 3 == 0:d}", "N3-0"]) for i, t in enumerate(times)]
    ingest(engine, news_path=write_lines(tmp_path / "news.tsv", [news_line(f"N{i}") for i in (1, 2, 3)]),
           behaviors_path=write_lines(tmp_path / "behaviors.tsv", lines), quarantine_dir=tmp_path / "q")
    news_ids = np.array(["N1", "N2", "N3"], dtype=object)
    whole, end = read_popularity_log(engine, news_ids, None)
    assert end == t0 + 47 * hour + second and len(whole) == 2 * len(times)
    window = np.timedelta64(24 * 3600, "s")
    for first, last, since in (
        (t0 + 50 * hour, t0 + 52 * hour, t0 + 23 * hour + second),  # after the store: counted from its end
        (t0 + 30 * hour, t0 + 40 * hour, t0 + 6 * hour),  # inside it: from the file's own first time
    ):
        span = ScoringSpan(first, last, 24.0)
        assert span.log_window(end) == (since, last)
        part, part_end = read_popularity_log(engine, news_ids, span)
        assert part_end == end and part.times.min() == np.datetime64(since, "s") and part.times.max() < np.datetime64(last, "s")
        at = np.arange(np.datetime64(first, "s"), np.datetime64(last, "s") + 1, np.timedelta64(60, "s"))
        at = np.concatenate([at, np.minimum(at, np.datetime64(end, "s"))])
        for item in range(3):
            rows = np.full(len(at), item)
            np.testing.assert_array_equal(np.stack(part.window_counts(rows, at, window=window)),
                                          np.stack(whole.window_counts(rows, at, window=window)))
    empty, _ = read_popularity_log(engine, news_ids, ScoringSpan(None, None, 24.0))  # a file without times
    assert len(empty) == 0


def test_a_file_that_changes_after_its_scan_is_refused(trained, tmp_path):
    import dataclasses
    from datetime import timedelta

    from recsys.pipelines.scoring import ScoringSpan

    world, ws, engine, config, versions = trained
    path = world / "behaviors_test.tsv"
    scan = scan_behaviors(path)
    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    rows = list(iter_behaviors(path))
    last_line = max(rows, key=lambda r: r.time).line
    narrower = dataclasses.replace(catalogue, span=ScoringSpan(scan.first, scan.last - timedelta(seconds=1), 24.0))
    with pytest.raises(RecsysError, match=rf"behaviors_test.tsv line {last_line}: time .* is outside .* it changed while it was read"):
        list(iter_behavior_chunks(path, narrower, chunk_size=50))
    full = dataclasses.replace(catalogue, span=scoring_span(scan, [get_version(engine, versions[True])]))
    assert sum(len(imps) for imps, _ in iter_behavior_chunks(path, full, chunk_size=50)) == len(rows)


def test_an_empty_behaviors_file_reads_no_log_and_predicts_nothing(trained, tmp_path):
    world, ws, engine, config, versions = trained
    empty = tmp_path / "behaviors.tsv"
    empty.write_text("\n")
    span = scoring_span(scan_behaviors(empty), [get_version(engine, versions[True])])
    assert (span.first, span.last) == (None, None)
    assert len(load_scoring_catalogue(engine, ws, config, news=None, images=None, span=span).log) == 0
    summary = run_predict(engine, ws, config, behaviors=empty, out=tmp_path / "prediction.txt")
    assert summary["impressions"] == 0 and (tmp_path / "prediction.txt").read_text() == ""
    assert summary["warning"] == f"{empty} has no impression: the prediction file {tmp_path / 'prediction.txt'} is empty"


def test_a_sigterm_that_a_library_swallowed_still_stops_train_and_predict(trained, tmp_path):
    # An exception raised by the SIGTERM handler can be swallowed where it lands (Cython's
    # module set-up in `import ray` does): the command went on as if never terminated.
    from recsys.interrupts import Terminated, sigterm_unwinds
    from recsys.versions import list_versions

    world, ws, engine, config, versions = trained
    before = [v["version"] for v in list_versions(engine)]
    out = tmp_path / "prediction.txt"
    with sigterm_unwinds():
        swallowed_sigterm()
        with pytest.raises(Terminated):
            run_predict(engine, ws, config, behaviors=world / "behaviors_train.tsv", out=out)
        with pytest.raises(Terminated):
            run_train(engine, ws, config, make_current=False)
    assert not out.exists() and [v["version"] for v in list_versions(engine)] == before


def test_predict_and_evaluate_count_history_entries_naming_no_known_article(trained, tmp_path):
    # They were only logged, so a pipeline reading the JSON never learnt that histories were cut.
    from recsys.pipelines.evaluate import run_evaluate

    world, ws, engine, config, _ = trained
    lines = (world / "behaviors_test.tsv").read_text().splitlines(keepends=True)[:30]
    original, cut = tmp_path / "original.tsv", tmp_path / "cut.tsv"
    original.write_text("".join(lines))
    fields = lines[0].split("\t")
    fields[3] = " ".join([*fields[3].split(), "NZZ1", "NZZ2"])  # two ids no news.tsv has
    cut.write_text("\t".join(fields) + "".join(lines[1:]))
    base = run_predict(engine, ws, config, behaviors=original, out=tmp_path / "p0.txt")["ignored_history_entries"]
    assert run_predict(engine, ws, config, behaviors=cut, out=tmp_path / "p1.txt")["ignored_history_entries"] == base + 2
    result = run_evaluate(engine, ws, config, behaviors=cut, out=tmp_path / "r", num_resamples=10)
    assert result["ignored_history_entries"] == base + 2
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["header"]["ignored_history_entries"] == base + 2
    assert "History entries naming no known article" in (tmp_path / "r" / "report.html").read_text()


def test_evaluate_of_a_file_without_a_two_class_impression_warns(trained, tmp_path):
    from recsys.pipelines.evaluate import run_evaluate

    world, ws, engine, config, _ = trained
    rows = [line.split("\t") for line in (world / "behaviors_test.tsv").read_text().splitlines()[:3]]
    for row in rows:  # nothing clicked
        row[4] = " ".join(c.rsplit("-", 1)[0] + "-0" for c in row[4].split())
    path = tmp_path / "noclick.tsv"
    path.write_text("".join("\t".join(row) + "\n" for row in rows))
    result = run_evaluate(engine, ws, config, behaviors=path, out=tmp_path / "r", num_resamples=10)
    assert all(auc is None for auc in result["impression_auc"].values())
    assert result["warning"].startswith(f"{path}: none of its 3 labelled impressions has both a clicked and a skipped")
    # It said the MIND scorer leaves them out too; it prints NaN for them (docs/evaluation.md).
    assert result["warning"].endswith("recsys leaves them out of every mean; the MIND scorer prints NaN for them: "
                                      "docs/evaluation.md, Averaging)")


def test_a_score_that_is_not_finite_is_refused_naming_line_and_impression(trained, monkeypatch):
    from recsys.pipelines.scoring import iter_scored

    world, ws, engine, config, versions = trained
    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    scorer = VersionScorer(get_version(engine, versions[True]), catalogue)
    rows = list(iter_behaviors(world / "behaviors_test.tsv"))
    real = scorer.score_read

    def broken(read):  # the 3rd candidate of the file's 5th impression
        scores = real(read)
        scores[read.candidate_offsets[4] + 2] = np.nan
        return scores

    monkeypatch.setattr(scorer, "score_read", broken)
    pattern = (rf"behaviors_test.tsv line {rows[4].line}: model m scores candidate 3 of impression "
               rf"{rows[4].impression_id} as nan, expected a finite probability")
    with pytest.raises(RecsysError, match=pattern):
        list(iter_scored(world / "behaviors_test.tsv", catalogue, {"m": scorer}))


def test_predict_refuses_an_output_it_cannot_write_before_scoring(trained, tmp_path, monkeypatch):
    from recsys.pipelines import predict

    world, ws, engine, config, _ = trained
    monkeypatch.setattr(predict, "load_scoring_catalogue", lambda *a, **k: pytest.fail("read the store before checking --out"))
    with pytest.raises(RecsysError, match=rf"--out {tmp_path}: is a folder; give the prediction file's path"):
        run_predict(engine, ws, config, behaviors=world / "behaviors_test.tsv", out=tmp_path)
    missing = tmp_path / "no" / "such" / "prediction.txt"
    with pytest.raises(RecsysError, match=rf"--out {missing}: folder {missing.parent} does not exist"):
        run_predict(engine, ws, config, behaviors=world / "behaviors_test.tsv", out=missing)
    (tmp_path / "a-file").write_text("x")
    under_a_file = tmp_path / "a-file" / "prediction.txt"
    with pytest.raises(RecsysError, match=rf"--out {under_a_file}: folder {tmp_path / 'a-file'} is not a folder"):
        run_predict(engine, ws, config, behaviors=world / "behaviors_test.tsv", out=under_a_file)
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_predict_refuses_an_output_that_is_one_of_its_inputs_and_leaves_it_whole(trained, tmp_path, monkeypatch):
    # `--out dev/behaviors.tsv` (a typo) replaced the behaviors file with its own predictions.
    from recsys.pipelines import predict
    from recsys.store.database import sqlite_file

    world, ws, engine, config, _ = trained
    monkeypatch.setattr(predict, "load_scoring_catalogue", lambda *a, **k: pytest.fail("read the store before checking --out"))
    behaviors, news = tmp_path / "behaviors.tsv", tmp_path / "news.tsv"
    behaviors.write_bytes((world / "behaviors_test.tsv").read_bytes())
    news.write_bytes((world / "news.tsv").read_bytes())
    (tmp_path / "link.tsv").symlink_to(behaviors)
    cases = [(behaviors, f"is the --behaviors file {behaviors}"), (tmp_path / "link.tsv", f"is the --behaviors file {behaviors}"),
             (news, f"is the --news file {news}")]
    store = sqlite_file(engine.url)
    if store is not None:  # the PostgreSQL store has no file to protect
        cases.append((store, f"is the store file {store}"))
    before = {path: path.read_bytes() for path, _ in cases}
    for out, message in cases:
        with pytest.raises(RecsysError, match=re.escape(f"--out {out}: {message}; the prediction would replace it")):
            run_predict(engine, ws, config, behaviors=behaviors, news=news, out=out)
    assert {path: path.read_bytes() for path, _ in cases} == before


def test_evaluate_refuses_a_truth_file_that_is_not_there(trained, tmp_path):
    from recsys.pipelines.evaluate import run_evaluate

    world, ws, engine, config, _ = trained
    with pytest.raises(RecsysError, match=r"--truth .*truht.tsv: no such file \(a sample world's truth.tsv"):
        run_evaluate(engine, ws, config, behaviors=world / "behaviors_test.tsv", out=tmp_path / "r", truth=world / "truht.tsv")
    assert not (tmp_path / "r").exists()
    (tmp_path / "a-file").write_text("x")
    for out in (tmp_path / "a-file", tmp_path / "a-file" / "report"):
        with pytest.raises(RecsysError, match=rf"--out {out}: {tmp_path / 'a-file'} is a file, expected a folder"):
            run_evaluate(engine, ws, config, behaviors=world / "behaviors_test.tsv", out=out)
    with pytest.raises(RecsysError, match=r"--truth .*: is not a file \(a sample world's truth.tsv"):
        run_evaluate(engine, ws, config, behaviors=world / "behaviors_test.tsv", out=tmp_path / "r", truth=tmp_path)


def test_evaluate_refuses_a_damaged_truth_file_before_it_trains_or_encodes(trained, tmp_path, monkeypatch):
    from recsys.errors import SchemaError
    from recsys.pipelines import evaluate

    world, ws, engine, config, _ = trained
    lines = (world / "truth.tsv").read_text(encoding="utf-8").splitlines()
    damaged = tmp_path / "truth.tsv"
    damaged.write_text("\n".join([*lines[:3], "\t".join(lines[3].split("\t")[:-1]), *lines[4:]]) + "\n", encoding="utf-8")

    def refuse(*args, **kwargs):
        raise AssertionError("the truth file must be read before ablations are trained or articles encoded")

    monkeypatch.setattr(evaluate, "train_missing_ablations", refuse)
    monkeypatch.setattr(evaluate, "load_scoring_catalogue", refuse)
    with pytest.raises(SchemaError, match=r"truth.tsv.*line 4"):
        evaluate.run_evaluate(engine, ws, config, behaviors=world / "behaviors_test.tsv", out=tmp_path / "r", truth=damaged,
                              ablations=True)
    assert not (tmp_path / "r").exists()


def test_predict_and_evaluate_refuse_bad_paths_before_scoring(trained, tmp_path, monkeypatch):
    """Each is one clear RecsysError (exit 1) raised before the store or a model is read."""
    import os

    from recsys.pipelines import inputs
    from recsys.pipelines.evaluate import run_evaluate
    from recsys.pipelines.predict import run_predict

    world, ws, engine, config, _ = trained
    behaviors = world / "behaviors_test.tsv"
    (tmp_path / "a-file").write_text("x")
    cases = [
        ({"news": world / "news.tsv", "images": tmp_path / "nope"}, rf"--images {tmp_path / 'nope'}: no such folder"),
        ({"news": world / "news.tsv", "images": tmp_path / "a-file"}, rf"--images {tmp_path / 'a-file'}: not a folder"),
        ({"news": tmp_path / "nope.tsv"}, rf"--news {tmp_path / 'nope.tsv'}: no such file"),
        ({"news": tmp_path}, rf"--news {tmp_path}: not a regular file"),
    ]
    for kwargs, message in cases:
        with pytest.raises(RecsysError, match=message):
            run_predict(engine, ws, config, behaviors=behaviors, out=tmp_path / "p.txt", **kwargs)
        with pytest.raises(RecsysError, match=message):
            run_evaluate(engine, ws, config, behaviors=behaviors, out=tmp_path / "r", **kwargs)
    # A folder the process cannot write to (a read-only mount, say; root passes permission bits).
    real_access = os.access
    monkeypatch.setattr(inputs.os, "access", lambda path, mode: Path(path) != tmp_path and real_access(path, mode))
    with pytest.raises(RecsysError, match=rf"--out {tmp_path / 'p.txt'}: folder {tmp_path} is not writable"):
        run_predict(engine, ws, config, behaviors=behaviors, out=tmp_path / "p.txt")
    with pytest.raises(RecsysError, match=rf"--out {tmp_path / 'r' / 's'}: folder {tmp_path} is not writable"):
        run_evaluate(engine, ws, config, behaviors=behaviors, out=tmp_path / "r" / "s")
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_an_article_repeated_in_a_news_file_for_scoring_takes_its_last_line(tmp_path):
    from recsys.pipelines.scoring import news_from_file

    lines = ["NX1\tnews\tsub\tFirst title\t\thttps://x\t[]\t[]", "NX2\tnews\tsub\tOther\t\thttps://x\t[]\t[]",
             "NX1\tsports\tsub\tLast title\t\thttps://x\t[]\t[]", "N1\tnews\tsub\tKnown\t\thttps://x\t[]\t[]"]
    (tmp_path / "news.tsv").write_text("\n".join(lines) + "\n")
    df, bad = news_from_file(tmp_path / "news.tsv", None, known={"N1": ("news", "sub", "Known", "")})
    assert sorted(zip(df["news_id"], df["title"], df["category"])) == [("NX1", "Last title", "sports"), ("NX2", "Other", "news")]
    assert bad == {}


def test_the_unusable_covers_of_a_news_file_for_scoring_are_named_as_the_ingest_names_them(tmp_path, caplog, monkeypatch):
    # predict and evaluate scored new articles without their damaged covers and said nothing,
    # while the ingest names each file; many are named up to a limit, then counted by status.
    import io

    from PIL import Image

    from recsys.pipelines.scoring import news_from_file

    monkeypatch.setattr("recsys.store.ingest.NAMED_BAD_COVERS", 2)
    images = tmp_path / "images"
    images.mkdir()
    picture = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(picture, format="JPEG")
    (images / "NX1.jpg").write_bytes(picture.getvalue())
    (images / "NX2.jpg").write_bytes(b"")
    (images / "NX3.png").write_text("this is not a picture")
    (images / "NX4.jpg").write_bytes(b"")
    (images / "N1.jpg").write_bytes(b"")  # the store's article: scored as stored, its file not read
    ids = ["NX1", "NX2", "NX3", "NX4", "NX5", "N1"]
    (tmp_path / "news.tsv").write_text("".join(f"{n}\tnews\tsub\tTitle {n}\t\thttps://x\t[]\t[]\n" for n in ids))
    with caplog.at_level("WARNING", logger="recsys.scoring"):
        df, _ = news_from_file(tmp_path / "news.tsv", images, known={"N1": ("news", "sub", "Title N1", "")})
    assert dict(zip(df["news_id"], df["image_status"])) == {"NX1": "ok", "NX2": "empty", "NX3": "corrupt", "NX4": "empty", "NX5": "missing"}
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        f"cover of NX2 is empty ({images / 'NX2.jpg'}: 0 bytes): scored without a cover",
        f"cover of NX3 is corrupt ({images / 'NX3.png'}: not a JPEG, PNG or WebP image): scored without a cover",
        "more unusable cover files: counted below, not named",
        f"{tmp_path / 'news.tsv'}: 3 new articles have an unusable cover file in {images} (1 corrupt, 2 empty) and are scored without a cover",
    ]


def test_a_news_line_that_differs_from_the_stored_article_is_named(tmp_path, caplog):
    # The store's article is scored (as the nightly ranks it); the file's other title went unsaid.
    from recsys.pipelines.scoring import news_from_file

    lines = ["N1\tnews\tsub\tSame\tabs\thttps://x\t[]\t[]", "N2\tnews\tsub\tNew title\t\thttps://x\t[]\t[]",
             "N3\tsports\tsub\tSame\t\thttps://x\t[]\t[]"]
    (tmp_path / "news.tsv").write_text("\n".join(lines) + "\n")
    known = {"N1": ("news", "sub", "Same", "abs"), "N2": ("news", "sub", "Old title", ""), "N3": ("news", "sub", "Same", "")}
    df, _ = news_from_file(tmp_path / "news.tsv", None, known=known)
    assert len(df) == 0
    assert "news.tsv: 2 lines differ from the stored article of their id (first: line 2, N2) and are scored as stored" in caplog.text
    caplog.clear()
    news_from_file(tmp_path / "news.tsv", None, known={**known, "N2": ("news", "sub", "New title", ""), "N3": ("sports", "sub", "Same", "")})
    assert "differ" not in caplog.text


def test_a_malformed_line_of_a_news_file_for_scoring_is_left_out_and_named(tmp_path, caplog):
    # One damaged line among thousands stopped predict and evaluate, though no impression named it.
    from recsys.pipelines.scoring import news_from_file

    lines = ["NX1\tnews\tsub\tGood\t\thttps://x\t[]\t[]", "NX2\t\tsub\tNo category\t\thttps://x\t[]\t[]",
             "NX3\tnews\tsub\tBad entities\t\thttps://x\t[{\t[]", "N1\tnews\tsub\tKnown but damaged\t\thttps://x\tnot json\t[]",
             "NX4\tnews\tsub\tDamaged first\t\thttps://x\t{\t[]", "NX4\tnews\tsub\tThen good\t\thttps://x\t[]\t[]"]
    (tmp_path / "news.tsv").write_text("\n".join(lines) + "\n")
    df, bad = news_from_file(tmp_path / "news.tsv", None, known={"N1": ("news", "sub", "Known but damaged", "")})
    assert sorted(df["news_id"]) == ["NX1", "NX4"] and df.set_index("news_id").loc["NX4", "title"] == "Then good"
    # Only ids that no good line and not the store has: a candidate of those cannot be scored.
    assert {news_id: (row.line, row.field) for news_id, row in bad.items()} == {"NX2": (2, "category"), "NX3": (3, "title_entities")}
    assert "news.tsv: 4 malformed lines left out (first: " in caplog.text and "line 2: field 'category'" in caplog.text


def test_a_news_file_for_scoring_without_one_good_line_is_refused(tmp_path):
    # behaviors.tsv given as --news: every line is bad, and each candidate would be named unknown.
    from recsys.pipelines.scoring import news_from_file

    (tmp_path / "news.tsv").write_text("1\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-0 N2-1\n2\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1\n")
    with pytest.raises(RecsysError, match=r"--news .*news.tsv: every one of its 2 lines was bad \(first: .*line 1: .*is it the right file"):
        news_from_file(tmp_path / "news.tsv", None, known={})


def test_predict_scores_past_a_malformed_news_line_no_candidate_needs(trained, tmp_path, caplog):
    from recsys.store.repository import read_news as repo_news

    from recsys.pipelines.predict import run_predict

    world, ws, engine, config, _ = trained
    behaviors = tmp_path / "behaviors.tsv"
    behaviors.write_text("1\tU1\t11/20/2019 9:05:58 AM\t\tNF1-1 NF2-0\n2\tU2\t11/20/2019 9:05:59 AM\t\tNF3-0 NF1-1\n")
    news = tmp_path / "news.tsv"
    good = lambda n, title: f"{n}\tsports\tsub\t{title}\t\thttps://x\t[]\t[]"  # noqa: E731
    news.write_text("\n".join([good("NF1", "A new story"), "NF9\tsports\tsub\tDamaged\t\thttps://x\t[{\t[]",
                               good("NF2", "Another story"), good("NF3", "A third")]) + "\n")
    from recsys.errors import SchemaError

    run_predict(engine, ws, config, behaviors=behaviors, news=news, out=tmp_path / "p.txt")
    assert [line.split()[0] for line in (tmp_path / "p.txt").read_text().splitlines()] == ["1", "2"]
    # The ingested news.tsv agrees with the store line for line (empty abstracts included).
    caplog.clear()
    catalogue = load_scoring_catalogue(engine, ws, config, news=world / "news.tsv", images=None)
    assert len(catalogue.news) == len(repo_news(engine)) and "differ" not in caplog.text
    # A candidate that only the damaged line names: the error names both files' lines.
    behaviors.write_text("1\tU1\t11/20/2019 9:05:58 AM\t\tNF1-1 NF9-0\n")
    with pytest.raises(SchemaError, match=r"behaviors.tsv line 1: field 'impressions' has 'NF9', expected a news id present "
                                          r"in the store or in --news \(--news has it only on a malformed line: .*news.tsv line 2: "
                                          r"field 'title_entities'"):
        run_predict(engine, ws, config, behaviors=behaviors, news=news, out=tmp_path / "q.txt")


def test_a_truth_file_beside_a_file_of_another_name_is_skipped_with_a_warning(trained, tmp_path, caplog):
    """A file cut from a sample world's split sits beside its truth.tsv under another name:
    evaluated without the oracle row, where an explicit --truth for it is refused."""
    from recsys.pipelines.evaluate import run_evaluate

    world, ws, engine, config, _ = trained
    subset = world / "first_lines.tsv"
    subset.write_text("".join((world / "behaviors_test.tsv").read_text().splitlines(keepends=True)[:40]))
    try:
        result = run_evaluate(engine, ws, config, behaviors=subset, out=tmp_path / "r", num_resamples=10)
        assert result["num_impressions"] == 40 and not any("oracle" in name.lower() for name in result["impression_auc"])
        assert "no rows for split 'first_lines'" in caplog.text and "no oracle row" in caplog.text
        with pytest.raises(RecsysError, match="truth.tsv: no rows for split 'first_lines'"):
            run_evaluate(engine, ws, config, behaviors=subset, out=tmp_path / "r2", truth=world / "truth.tsv")
    finally:
        subset.unlink()


def test_a_truth_file_of_another_kind_beside_a_foreign_file_is_skipped_with_a_warning(trained, tmp_path, caplog):
    """A MIND scorer's truth.tsv kept beside behaviors.tsv stopped the evaluation (exit 1)
    though no --truth was given; given as --truth, it is still refused."""
    from recsys.pipelines.evaluate import run_evaluate

    world, ws, engine, config, _ = trained
    folder = tmp_path / "dev"
    folder.mkdir()
    lines = (world / "behaviors_test.tsv").read_text().splitlines(keepends=True)[:30]
    behaviors = folder / "behaviors.tsv"
    behaviors.write_text("".join(lines))
    # The MIND competition's truth file: impression id, then the labels as a list.
    (folder / "truth.tsv").write_text("".join(
        f"{line.split(chr(9))[0]} [{','.join(c[-1] for c in line.split(chr(9))[4].split())}]\n" for line in lines))
    result = run_evaluate(engine, ws, config, behaviors=behaviors, out=tmp_path / "r", num_resamples=10)
    assert result["num_impressions"] == 30 and not any("oracle" in name.lower() for name in result["impression_auc"])
    assert f"{folder / 'truth.tsv'} was found beside behaviors.tsv but is not a sample world's truth file" in caplog.text
    with pytest.raises(RecsysError, match=r"truth\.tsv line 1: field .columns."):
        run_evaluate(engine, ws, config, behaviors=behaviors, out=tmp_path / "r2", truth=folder / "truth.tsv")


def test_evaluate_of_an_unlabelled_file_warns_and_writes_the_predictions(trained, tmp_path, caplog):
    from recsys.pipelines.evaluate import run_evaluate

    world, ws, engine, config, versions = trained
    path = world / "behaviors_test_unlabelled.tsv"
    with caplog.at_level("WARNING", logger="recsys.evaluate"):
        summary = run_evaluate(engine, ws, config, behaviors=path, out=tmp_path / "r", versions=[versions[True]], num_resamples=10)
    assert summary["warning"].startswith(f"{path} has no labelled impression: every metric is n/a")
    assert "no labelled impression" in caplog.text
    assert summary["num_unlabelled"] == summary["num_impressions"] == len(list(iter_behaviors(path)))
    run_predict(engine, ws, config, behaviors=path, out=tmp_path / "p.txt", version=versions[True])
    assert (tmp_path / "r" / f"prediction-{versions[True]}.txt").read_text() == (tmp_path / "p.txt").read_text()


@pytest.mark.parametrize(("impressions", "message"), [
    ("N1-x N2-x", r"line 1: field 'impressions' has 'N1-x', expected label 0 or 1"),  # read as unlabelled ids
    ("N1 N2-2", "has 'N2-2', expected label 0 or 1"),
    ("N1 N3-x", "has 'N3-x', expected a news id present in the store or in --news"),  # N3 is not known either
])
def test_a_bad_label_on_a_known_article_is_named_as_a_bad_label(tmp_path, impressions, message):
    from types import SimpleNamespace

    from recsys.errors import SchemaError

    path = tmp_path / "behaviors.tsv"
    path.write_text(f"1\tU1\t11/11/2019 9:05:58 AM\tN1\t{impressions}\n")
    catalogue = SimpleNamespace(row_of={"N1": 0, "N2": 1}, span=None, bad_news={})
    with pytest.raises(SchemaError, match=message):
        list(iter_behavior_chunks(path, catalogue))


@pytest.mark.parametrize("chunk_size", [1, 2, 20_000])  # the repeat in a later chunk, and in the same one
def test_a_repeated_impression_id_is_refused_naming_both_lines(tmp_path, chunk_size):
    # Ingest quarantines such a line; predict wrote the id twice into the prediction file.
    from types import SimpleNamespace

    from recsys.errors import SchemaError

    path = tmp_path / "behaviors.tsv"
    path.write_text("".join(f"{i}\tU1\t11/11/2019 9:05:58 AM\tN1\tN1 N2\n" for i in (7, 8, 7)))
    catalogue = SimpleNamespace(row_of={"N1": 0, "N2": 1}, span=None, bad_news={})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SchemaError, match=r"line 3: field 'impression_id' has '7', expected an id unique within the file \(line 1 has it\)"):
            list(iter_behavior_chunks(path, catalogue, chunk_size=chunk_size))
        gc.collect()
    # The file is closed when the error stops the read, not left to the garbage collector.
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


@pytest.mark.parametrize(("order", "first"), [
    (("repeat", "unknown", "malformed"), "line 3: field 'impression_id' has '1'"),
    (("unknown", "malformed", "repeat"), "line 3: field 'impressions' has 'N9'"),
    (("malformed", "repeat", "unknown"), "line 3: field 'time' has '25:00:00 PM'"),
])
def test_the_first_bad_line_of_the_file_is_named_whatever_its_fault(tmp_path, order, first):
    # A malformed line was named before an earlier repeated id or unknown candidate, so each fix
    # revealed an earlier line.
    from types import SimpleNamespace

    from recsys.errors import SchemaError

    faults = {
        "repeat": "1\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-0 N2-1",
        "unknown": "5\tU1\t11/11/2019 9:05:58 AM\tN1\tN9-0 N2-1",
        "malformed": "6\tU1\t25:00:00 PM\tN1\tN1-0 N2-1",
    }
    lines = ["1\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-0 N2-1", "2\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1 N2-0"]
    lines += [faults[kind] for kind in order]
    path = tmp_path / "behaviors.tsv"
    path.write_text("\n".join(lines) + "\n")
    catalogue = SimpleNamespace(row_of={"N1": 0, "N2": 1}, span=None, bad_news={})
    with pytest.raises(SchemaError, match=re.escape(first)):
        list(iter_behavior_chunks(path, catalogue))


def test_history_entries_naming_no_known_article_are_counted(tmp_path):
    from types import SimpleNamespace

    path = tmp_path / "behaviors.tsv"
    path.write_text("1\tU1\t11/11/2019 9:05:58 AM\tN1 N7 N8\tN1-0 N2-1\n2\tU2\t11/11/2019 9:05:58 AM\tN9\tN1-1 N2-0\n"
                    "3\tU3\t11/11/2019 9:05:58 AM\t\tN1-1 N2-0\n")
    catalogue = SimpleNamespace(row_of={"N1": 0, "N2": 1}, span=None, bad_news={})
    tally = {}
    chunks = list(iter_behavior_chunks(path, catalogue, chunk_size=2, tally=tally))
    assert tally == {"ignored_history_entries": 3}
    assert [int(np.diff(imps.history_offsets).sum()) for imps, _ in chunks] == [1, 0]


def test_evaluate_says_when_the_file_lies_in_a_models_training_window(trained, tmp_path, caplog):
    # After the nightly flow ingests a dev file, `recsys train` validates on it; evaluating
    # that file then reads like a held-out figure.
    from recsys.pipelines.evaluate import run_evaluate

    world, ws, engine, config, versions = trained
    version = versions[True]
    rows = (world / "behaviors_train.tsv").read_text().splitlines(keepends=True)[-20:]
    seen = tmp_path / "seen.tsv"
    seen.write_text("".join(rows))
    result = run_evaluate(engine, ws, config, behaviors=seen, out=tmp_path / "r", versions=[version], num_resamples=10)
    assert result["trained_on_the_file"] == [version]
    assert f"lie in the training window of model version {version}" in caplog.text
    # The report says it too, not only the command's log and summary.
    header = json.loads((tmp_path / "r" / "metrics.json").read_text())["header"]
    assert header["trained_on_the_file"] == [version]
    assert any(f"training window of model version {version}" in w and w.endswith("not held-out") for w in header["warnings"])
    assert "these figures are not held-out" in (tmp_path / "r" / "report.html").read_text().split('id="header"')[0]
    caplog.clear()
    held_out = run_evaluate(engine, ws, config, behaviors=world / "behaviors_test.tsv", out=tmp_path / "t",
                            versions=[version], num_resamples=10)
    assert held_out["trained_on_the_file"] == [] and "training window" not in caplog.text



def test_a_file_touches_a_training_window_from_its_since_up_to_but_not_at_its_until():
    # The window is [since, until): until is one second after the last training impression.
    from datetime import datetime
    from types import SimpleNamespace

    from recsys.pipelines.evaluate import trained_on_the_file

    window = {"since": "2019-11-09T00:00:00", "until": "2019-11-14T00:00:00"}
    versions = [SimpleNamespace(version="v1", manifest={"training_window": window})]

    def scan(first, last):
        return SimpleNamespace(first=datetime.fromisoformat(first), last=datetime.fromisoformat(last))

    assert trained_on_the_file(scan("2019-11-14T00:00:00", "2019-11-15T00:00:00"), versions) == {}
    assert trained_on_the_file(scan("2019-11-13T23:59:59", "2019-11-15T00:00:00"), versions) == {"v1": window}
    assert trained_on_the_file(scan("2019-11-08T00:00:00", "2019-11-09T00:00:00"), versions) == {"v1": window}
    assert trained_on_the_file(scan("2019-11-08T00:00:00", "2019-11-08T23:59:59"), versions) == {}


def test_predict_and_evaluate_report_their_progress_through_the_file(trained, tmp_path, caplog, monkeypatch):
    # Both were silent while scoring: about 25 minutes on MIND-large's test file.
    from types import SimpleNamespace

    import recsys.progress
    from recsys.pipelines.evaluate import run_evaluate

    # Log lines, not a bar, even when pytest -s runs on a terminal.
    monkeypatch.setattr(recsys.progress, "sys", SimpleNamespace(stderr=SimpleNamespace(isatty=lambda: False)))

    world, ws, engine, config, _ = trained
    lines = (world / "behaviors_test.tsv").read_text().splitlines(keepends=True)[:25]
    path = tmp_path / "some.tsv"
    path.write_text("".join(lines))
    with caplog.at_level("INFO", logger="recsys"):
        run_predict(engine, ws, config, behaviors=path, out=tmp_path / "p.txt")
        run_evaluate(engine, ws, config, behaviors=path, out=tmp_path / "r", num_resamples=10, chunk_size=10)
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scoring impressions: done")]
    assert [m.split(" in ")[0] for m in done] == ["scoring impressions: done 25/25"] * 2, done
    assert "computing metrics and their intervals (10 bootstrap resamples of the users of 25 impressions)" in caplog.text


def _long_histories(src: Path, dst: Path, news_ids: list[str], extra: int) -> Path:
    """``src`` with ``extra`` more History ids a line (a rotating run of ``news_ids``, and an
    unknown id that ``IGNORED_HISTORY`` counts)."""
    out = []
    for i, line in enumerate(src.read_text(encoding="utf-8").splitlines()):
        cols = line.split("\t")
        more = [news_ids[(i + k) % len(news_ids)] for k in range(extra)] + ["N999999"]
        cols[3] = " ".join(cols[3].split() + more)
        out.append("\t".join(cols))
    dst.write_text("\n".join(out) + "\n", encoding="utf-8")
    return dst


def test_chunks_of_long_histories_are_cut_by_ids_and_read_the_same(tmp_path, monkeypatch):
    # 20,000 lines of 2,000 History ids made one chunk hold 3 GB of parsed ids.
    from types import SimpleNamespace

    from recsys.data import mind

    path = tmp_path / "behaviors.tsv"
    hist = lambda n: " ".join(f"N{k % 3 + 1}" for k in range(n))  # noqa: E731
    path.write_text("".join(f"{i}\tU{i}\t11/11/2019 9:05:58 AM\t{hist(i * 10)} N7\tN1-0 N2-1\n" for i in range(1, 9)))
    catalogue = SimpleNamespace(row_of={"N1": 0, "N2": 1, "N3": 2}, span=None, bad_news={})

    def read(budget):
        monkeypatch.setattr(mind, "MAX_BATCH_IDS", budget)
        tally = {}
        return list(iter_behavior_chunks(path, catalogue, chunk_size=3, history_len=50, tally=tally)), tally

    whole, whole_tally = read(10 ** 9)
    cut, cut_tally = read(60)  # a line holds 10 * i + 3 ids: 13, 23, 33, ..., 83 (over the budget alone)
    assert [lines.tolist() for _, lines in whole] == [[1, 2, 3], [4, 5, 6], [7, 8]]
    assert [lines.tolist() for _, lines in cut] == [[1, 2], [3], [4], [5], [6], [7], [8]]
    assert cut_tally == whole_tally == {"ignored_history_entries": 8}
    for field in ("impression_ids", "user_ids", "times", "history_items", "candidate_items", "labels"):
        np.testing.assert_array_equal(np.concatenate([getattr(imps, field) for imps, _ in cut]),
                                      np.concatenate([getattr(imps, field) for imps, _ in whole]))
    np.testing.assert_array_equal(np.concatenate([np.diff(imps.history_offsets) for imps, _ in cut]),
                                  np.concatenate([np.diff(imps.history_offsets) for imps, _ in whole]))


def test_predict_cuts_long_histories_by_ids_and_writes_the_same_file(trained, tmp_path, monkeypatch):
    from recsys.data import mind
    from recsys.pipelines.scoring import iter_scored

    world, ws, engine, config, versions = trained
    news_ids = [line.split("\t", 1)[0] for line in (world / "news.tsv").read_text(encoding="utf-8").splitlines()]
    path = _long_histories(world / "behaviors_test.tsv", tmp_path / "long.tsv", news_ids, 300)
    num_lines = len(path.read_text(encoding="utf-8").splitlines())
    summaries, predictions = {}, {}
    for budget in (10 ** 9, 3_000):
        monkeypatch.setattr(mind, "MAX_BATCH_IDS", budget)
        out = tmp_path / f"prediction-{budget}.txt"
        summary = run_predict(engine, ws, config, behaviors=path, out=out, version=versions[True])
        summary.pop("seconds"), summary.pop("out")
        summaries[budget], predictions[budget] = summary, out.read_text()
    assert summaries[3_000] == summaries[10 ** 9] and summaries[3_000]["ignored_history_entries"] >= num_lines
    assert predictions[3_000] == predictions[10 ** 9] and len(predictions[3_000].splitlines()) == num_lines

    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    scorers = {"v": VersionScorer(get_version(engine, versions[True]), catalogue)}
    sizes = [len(chunk.impressions) for chunk in iter_scored(path, catalogue, scorers)]
    # 300+ ids a line: 3,000 ids hold at most 9 lines, where 20,000 lines made one chunk
    assert sum(sizes) == num_lines and max(sizes) <= 9 and len(sizes) >= num_lines // 9


def _file_exposure_by_hand(path: Path, end: np.datetime64, stored_ids: set[str], window_hours: float | None = None):
    """Per candidate of ``path``, in file order: (news id, earlier shows in the file at or after
    ``end`` (within ``window_hours`` before it, if given), hours since the first of them, fresh),
    counted line by line from the file's text."""
    rows = list(iter_behaviors(path))
    shows = [(np.datetime64(r.time, "s"), n) for r in rows if np.datetime64(r.time, "s") >= end for n in r.news_ids]
    out = []
    for r in rows:
        t = np.datetime64(r.time, "s")
        since = t - np.timedelta64(int(round(window_hours * 3600)), "s") if window_hours else np.datetime64("1970-01-01", "s")
        for n in r.news_ids:
            before = [s for s, m in shows if m == n and since <= s < t] if t >= end else []
            hours = (t - min(before)) / np.timedelta64(1, "h") if before else 0.0
            out.append((n, len(before), hours, n not in stored_ids))
    return out


def test_file_exposure_scores_later_impressions_with_the_files_earlier_shows(trained):
    """The default of predict and evaluate: the version's calibration over its logit and the
    file's earlier shows within the span of the validation window it was fitted on (the file
    is longer), checked against a count from the file's text."""
    world, ws, engine, config, versions = trained
    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    path = world / "behaviors_test.tsv"
    mv = get_version(engine, versions[True])
    times = feature_times(catalogue, "popularity-at-end")
    served = VersionScorer(mv, catalogue, times=times, shows=read_file_shows(path, catalogue))
    plain = VersionScorer(mv, catalogue, times=times)
    cal = served.model.config.file_exposure
    assert cal is not None and served.uses_file_exposure and not plain.uses_file_exposure
    imps, _ = next(iter_behavior_chunks(path, catalogue, chunk_size=10**6, history_len=50))
    logits = plain.model.score_impressions(plain.read(imps), plain.embeddings, catalogue.log, catalogue.first_seen,
                                           popularity_until=times.popularity_until, logits=True).astype(np.float64)
    # "fresh": never shown or listed in the ingested behaviors (the store's first_seen_at)
    stored = {n for r in iter_behaviors(world / "behaviors_train.tsv") for n in (*r.news_ids, *r.history)}
    assert 20 < cal.window_hours <= 24  # the validation day's span
    by_hand = _file_exposure_by_hand(path, catalogue.end, stored, cal.window_hours)
    assert [catalogue.features.news_ids[i] for i in imps.candidate_items] == [n for n, *_ in by_hand]
    counts, hours, fresh = (np.array(column, dtype=float) for column in list(zip(*by_hand))[1:])
    assert fresh.any() and (fresh == 0).any() and (counts > 0).any()
    every = np.array([c for _, c, *_ in _file_exposure_by_hand(path, catalogue.end, stored)], dtype=float)
    assert (every > counts).any() and hours.max() <= cal.window_hours  # the window leaves shows out
    w = cal.weights
    z = (cal.intercept + w[0] * logits + w[1] * fresh * np.log1p(counts) + w[2] * fresh * np.log1p(hours) + w[3] * fresh
         + w[4] * (1 - fresh) * np.log1p(counts))
    np.testing.assert_allclose(served.score(imps), 1 / (1 + np.exp(-z)), rtol=1e-5, atol=1e-7)
    assert np.abs(served.score(imps) - plain.score(imps)).max() > 1e-3


def _cluster_keys_by_hand(scorer) -> dict:
    """news id -> the content-cluster code of each of the version's clustered anchor blocks (None
    where the block is zero: no cover), by a loop over the stored centres of the served vectors'
    anchor columns."""
    clusters = scorer.model.config.category_affinity.clusters
    assert clusters is not None and clusters.blocks
    anchors = scorer.embeddings[:, scorer.model.config.embedding_dim :]
    out = {}
    for row, news_id in enumerate(scorer.catalogue.features.news_ids):
        codes = []
        for offset, table in zip(clusters.offsets, clusters.centres):
            x = anchors[row, offset : offset + len(table[0])].astype(np.float64)
            codes.append(None if x @ x < 0.5 else int(np.argmax([x @ np.array(c) for c in table])))
        out[news_id] = tuple(codes)
    return out


def _affinity_by_hand(world: Path, read, news_ids: np.ndarray, skip_rows, clusters: dict) -> np.ndarray:
    """(c, 3 + 5 K - 1) design of the category affinity without its logit column for every
    candidate of ``read`` (the impressions with the histories the model reads), its skips counted
    from the text of ``skip_rows`` (the behaviors lines the store holds before the scored file):
    per user, the distinct articles of each category, (category, subcategory) and content
    cluster (``clusters``: news id -> codes, None for none) shown with label 0."""
    keys = {}
    for line in (world / "news.tsv").read_text(encoding="utf-8").splitlines():
        news_id, category, subcategory = line.split("\t")[:3]
        keys[news_id] = (category, (category, subcategory), *clusters[news_id])
    skipped: dict[str, set] = {}
    for row in skip_rows:
        skipped.setdefault(row.user_id, set()).update(n for n, label in zip(row.news_ids, row.labels) if label == 0)
    rows = []
    for i in range(len(read)):
        history = [keys[news_ids[h]] for h in read.history(i)]
        skips = [keys[n] for n in skipped.get(read.user_ids[i], ())]
        n, m = len(history), len(skips)
        for c in read.candidates(i):
            row = []
            for k, mine in enumerate(keys[news_ids[c]]):
                clicks = sum(1 for key in history if mine is not None and key[k] == mine)
                skip = sum(1 for key in skips if mine is not None and key[k] == mine)
                lift = np.log((clicks + 0.5) / (skip + 0.5)) - np.log((n + 0.5) / (m + 0.5))
                row += [np.log1p(clicks), np.log1p(skip), clicks / max(n, 1), skip / max(m, 1), lift]
            rows.append(row + [np.log1p(n), np.log1p(m)])
    return np.array(rows)


def test_the_category_affinity_reads_each_readers_category_clicks_and_skips_before_the_file(trained):
    """A version trained with the affinity (the default) scores with it, without and with the
    file's exposure on top, checked against counts from the files' text; one trained with
    ``model.category_affinity = false`` has none."""
    world, ws, engine, config, versions = trained
    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    path = world / "behaviors_test.tsv"
    mv = get_version(engine, versions["affinity"])
    times = feature_times(catalogue, "popularity-at-end")
    plain = VersionScorer(mv, catalogue, times=times)
    served = VersionScorer(mv, catalogue, times=times, shows=read_file_shows(path, catalogue))
    aff, exposure = plain.model.config.category_affinity, plain.model.config.file_exposure
    assert aff is not None and exposure is not None
    assert VersionScorer(get_version(engine, versions[True]), catalogue).model.config.category_affinity is None
    facts = mv.manifest["metrics"]["category_affinity"]
    assert facts == plain.model.config.info["category_affinity"] and facts["weights"] == list(aff.weights)
    assert "category_affinity" not in get_version(engine, versions[True]).manifest["metrics"]
    # The fit read the skips before the validation window only: the share of its impressions whose
    # reader had one then, counted from the file's text (a read of the window's own skips gives more).
    from datetime import datetime

    window = mv.manifest["training_window"]
    start, until = (datetime.fromisoformat(window[key]) for key in ("valid_start", "until"))
    rows = list(iter_behaviors(world / "behaviors_train.tsv"))
    skipped_before = {r.user_id for r in rows if r.time < start and 0 in r.labels}
    valid = [r for r in rows if start <= r.time <= until]
    share = sum(r.user_id in skipped_before for r in valid) / len(valid)
    assert 0 < share < 1 and facts["valid_impressions_with_skips"] == pytest.approx(share, abs=1e-6)

    imps, _ = next(iter_behavior_chunks(path, catalogue, chunk_size=10**6, history_len=50))
    read = plain.read(imps)
    logits = plain.model.score_impressions(read, plain.embeddings, catalogue.log, catalogue.first_seen,
                                           popularity_until=times.popularity_until, logits=True).astype(np.float64)
    design = _affinity_by_hand(world, read, catalogue.features.news_ids, iter_behaviors(world / "behaviors_train.tsv"),
                               _cluster_keys_by_hand(plain))
    assert (design[:, 2] > 0).any() and (design[:, 1] > 0).any()  # skips and clicks of the candidates' categories
    assert aff.keys == ("category", "subcategory", "text_cluster", "image_cluster")  # the default: 16 clusters each
    assert (design[:, [10, 11, 15, 16]] > 0).any(axis=0).all()  # and of their text and image clusters
    z = aff.intercept + logits * aff.weights[0] + design @ np.array(aff.weights[1:])
    np.testing.assert_allclose(plain.score(imps), 1 / (1 + np.exp(-z)), rtol=1e-5, atol=1e-7)
    # The file's exposure is fitted on top of the affinity, and so applied.
    stored = {n for r in iter_behaviors(world / "behaviors_train.tsv") for n in (*r.news_ids, *r.history)}
    by_hand = _file_exposure_by_hand(path, catalogue.end, stored, exposure.window_hours)
    counts, hours, fresh = (np.array(column, dtype=float) for column in list(zip(*by_hand))[1:])
    on_fresh = plain.model.score_impressions(read, plain.embeddings, catalogue.log, served.exposure_first_seen,
                                             popularity_until=times.popularity_until, logits=True).astype(np.float64)
    z_fresh = aff.intercept + on_fresh * aff.weights[0] + design @ np.array(aff.weights[1:])
    w = exposure.weights
    exposed = (exposure.intercept + w[0] * z_fresh + w[1] * fresh * np.log1p(counts) + w[2] * fresh * np.log1p(hours)
               + w[3] * fresh + w[4] * (1 - fresh) * np.log1p(counts))
    np.testing.assert_allclose(served.score(imps), 1 / (1 + np.exp(-exposed)), rtol=1e-5, atol=1e-7)


def test_the_category_affinity_reads_no_skip_of_the_scored_file_or_after_it(trained):
    """Scoring the training file itself (inside the store): the skips read are those before its
    first impression, none, and not the file's own."""
    world, ws, engine, config, versions = trained
    path = world / "behaviors_train.tsv"
    mv = get_version(engine, versions["affinity"])
    span = scoring_span(scan_behaviors(path), [mv])
    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None, span=span)
    scorer = VersionScorer(mv, catalogue)
    aff = scorer.model.config.category_affinity
    imps, _ = next(iter_behavior_chunks(path, catalogue, chunk_size=10**6, history_len=50))
    read = scorer.read(imps)
    logits = scorer.model.score_impressions(read, scorer.embeddings, catalogue.log, catalogue.first_seen,
                                            logits=True).astype(np.float64)
    design = _affinity_by_hand(world, read, catalogue.features.news_ids, [], _cluster_keys_by_hand(scorer))
    z = aff.intercept + logits * aff.weights[0] + design @ np.array(aff.weights[1:])
    np.testing.assert_allclose(scorer.score(imps), 1 / (1 + np.exp(-z)), rtol=1e-5, atol=1e-7)
    whole = load_scoring_catalogue(engine, ws, config, news=None, images=None)  # no span: every skip the store holds
    assert np.abs(VersionScorer(mv, whole).score(imps) - scorer.score(imps)).max() > 1e-3


def test_file_exposure_reads_no_label_and_no_later_impression(trained, tmp_path):
    """Predictions of a file are the same with its labels flipped, and an impression's are the
    same in a file cut after it: only earlier shows count."""
    world, ws, engine, config, _ = trained
    lines = (world / "behaviors_test.tsv").read_text().splitlines()
    flipped = tmp_path / "flipped.tsv"
    swap = {"-1": "-0", "-0": "-1"}
    flipped.write_text("".join("\t".join(line.split("\t")[:4] + [" ".join(c[:-2] + swap[c[-2:]] for c in line.split("\t")[4].split())]) + "\n"
                               for line in lines))
    rows = list(iter_behaviors(world / "behaviors_test.tsv"))
    cut_at = sorted(row.time for row in rows)[len(rows) // 2]
    kept = [line for line, row in zip(lines, rows, strict=True) if row.time <= cut_at]
    earlier = tmp_path / "earlier.tsv"
    earlier.write_text("".join(line + "\n" for line in kept))
    predicted = {}
    for name, path in (("all", world / "behaviors_test.tsv"), ("flipped", flipped), ("earlier", earlier)):
        out = tmp_path / f"{name}.txt"
        summary = run_predict(engine, ws, config, behaviors=path, out=out)
        assert summary["side_features_at"].endswith("; file exposure (earlier shows in the file) after the store's end")
        predicted[name] = out.read_text().splitlines()
    assert predicted["flipped"] == predicted["all"]
    assert 0 < len(predicted["earlier"]) < len(predicted["all"])
    by_id = dict(line.split(" ", 1) for line in predicted["all"])
    assert all(by_id[i] == ranks for i, ranks in (line.split(" ", 1) for line in predicted["earlier"]))
    off = tmp_path / "off.txt"
    assert run_predict(engine, ws, config, behaviors=world / "behaviors_test.tsv", out=off,
                       file_exposure=False)["side_features_at"].endswith("; file exposure off")
    assert off.read_text().splitlines() != predicted["all"]


def test_impressions_inside_the_stores_time_range_read_no_file_exposure(trained):
    world, ws, engine, config, versions = trained
    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    path = world / "behaviors_train.tsv"
    mv = get_version(engine, versions[True])
    shows = read_file_shows(path, catalogue)
    assert len(shows) == 0  # every show of the file is before the store's end
    imps, _ = next(iter_behavior_chunks(path, catalogue, history_len=50))
    np.testing.assert_array_equal(VersionScorer(mv, catalogue, shows=shows).score(imps), VersionScorer(mv, catalogue).score(imps))


def test_versions_without_a_calibration_are_named_and_scored_without_it(caplog):
    from types import SimpleNamespace

    from recsys.pipelines.scoring import describe_reading

    with_it, without = SimpleNamespace(uses_file_exposure=True), SimpleNamespace(uses_file_exposure=False)
    times = FeatureTimes()
    assert describe_reading(times, {"v1": with_it}, False) == "impression time; file exposure off"
    assert not caplog.records
    assert describe_reading(times, {"v1": with_it, "v0": without}, True) == (
        "impression time; file exposure (earlier shows in the file) after the store's end, not for v0 (no calibration)")
    assert describe_reading(times, {"v0": without}, True) == "impression time; file exposure: no version has a calibration"
    assert "model version v0 has no file-exposure calibration" in caplog.text


def test_with_the_file_exposure_a_fresh_article_is_read_as_new_whatever_the_store_dates_it(trained):
    """An unlabelled file ingested after the store dates its articles by their first show there
    (still fresh: the store's end counts labelled shows only). The calibration was fitted with
    fresh articles of age 0, their hours in the file its own column: scoring reads them so."""
    import dataclasses

    world, ws, engine, config, versions = trained
    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    path = world / "behaviors_test.tsv"
    shows = read_file_shows(path, catalogue)
    never = np.isnat(catalogue.first_seen)
    assert never.any()
    dated = dataclasses.replace(catalogue, first_seen=np.where(never, catalogue.end + np.timedelta64(3600, "s"),
                                                               catalogue.first_seen).astype(catalogue.first_seen.dtype))
    mv = get_version(engine, versions[True])
    imps, _ = next(iter_behavior_chunks(path, catalogue, chunk_size=10**6, history_len=50))
    on = [VersionScorer(mv, c, times=feature_times(c, "popularity-at-end"), shows=shows).score(imps) for c in (catalogue, dated)]
    np.testing.assert_array_equal(on[0], on[1])
    off = [VersionScorer(mv, c, times=feature_times(c, "popularity-at-end")).score(imps) for c in (catalogue, dated)]
    assert np.abs(off[0] - off[1]).max() > 1e-4  # without it the dated articles are older


def test_in_a_file_across_the_stores_end_the_earlier_impressions_score_as_without_the_exposure(trained, tmp_path,
                                                                                                 monkeypatch):
    world, ws, engine, config, versions = trained
    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    across = tmp_path / "across.tsv"
    train_lines = (world / "behaviors_train.tsv").read_text().splitlines()[-40:]
    test_lines = (world / "behaviors_test.tsv").read_text().splitlines()[:40]
    across.write_text("".join(line + "\n" for line in train_lines + test_lines))
    mv = get_version(engine, versions[True])
    imps, _ = next(iter_behavior_chunks(across, catalogue, chunk_size=10**6, history_len=50))
    before = np.repeat(imps.times < catalogue.end, np.diff(imps.candidate_offsets))
    assert before.any() and (~before).any()
    times = feature_times(catalogue, "popularity-at-end")
    scorer = VersionScorer(mv, catalogue, times=times, shows=read_file_shows(across, catalogue))
    scored = []  # each impression is scored once: the chunk's two parts apart, not the whole chunk twice
    real = scorer.model.score_impressions
    monkeypatch.setattr(scorer.model, "score_impressions", lambda read, *a, **k: scored.append(len(read)) or real(read, *a, **k))
    on = scorer.score(imps)
    assert sorted(scored) == sorted([int((imps.times < catalogue.end).sum()), int((imps.times >= catalogue.end).sum())])
    monkeypatch.undo()
    off = VersionScorer(mv, catalogue, times=times).score(imps)
    np.testing.assert_allclose(on[before], off[before], rtol=0, atol=1e-6)  # float rounding of the batches apart
    assert np.abs(on[~before] - off[~before]).max() > 1e-3


def test_an_impression_at_exactly_the_stores_end_reads_the_files_exposure_and_its_shows_count_later(trained, tmp_path):
    """The store's end is one second after its last labelled show: the store holds [first, end),
    so an impression at exactly ``end`` is the file's first past the store. It is scored with the
    file's exposure, and its shows count for later impressions; one a second earlier is neither."""
    world, ws, engine, config, versions = trained
    catalogue = load_scoring_catalogue(engine, ws, config, news=None, images=None)
    end = catalogue.end.astype("datetime64[s]").item()
    base = (world / "behaviors_test.tsv").read_text().splitlines()[0].split("\t")
    path = tmp_path / "at_end.tsv"
    # One line three times: a second before the end (A), at the end (B), an hour after it (C).
    path.write_text("".join("\t".join([str(i), base[1], when.strftime(TIME_FORMAT), *base[3:]]) + "\n" for i, when in
                            enumerate([end - timedelta(seconds=1), end, end + timedelta(hours=1)], start=1)))
    mv = get_version(engine, versions[True])
    times = feature_times(catalogue, "popularity-at-end")
    served = VersionScorer(mv, catalogue, times=times, shows=read_file_shows(path, catalogue))
    plain = VersionScorer(mv, catalogue, times=times)
    imps, _ = next(iter_behavior_chunks(path, catalogue, chunk_size=10**6, history_len=50))
    line = np.repeat(np.arange(3), np.diff(imps.candidate_offsets))
    on, off = served.score(imps), plain.score(imps)
    np.testing.assert_allclose(on[line == 0], off[line == 0], rtol=0, atol=1e-6)  # A: inside the store
    logits = plain.model.score_impressions(plain.read(imps), plain.embeddings, catalogue.log, catalogue.first_seen,
                                           popularity_until=times.popularity_until, logits=True).astype(np.float64)
    stored = {n for r in iter_behaviors(world / "behaviors_train.tsv") for n in (*r.news_ids, *r.history)}
    fresh = np.array([catalogue.features.news_ids[i] not in stored for i in imps.candidate_items], dtype=float)
    # B: no earlier show in the file counts (A's are the store's); C: B's one show, an hour before.
    counts = np.where(line == 2, 1.0, 0.0)
    hours = np.where(line == 2, 1.0, 0.0)
    cal = served.model.config.file_exposure
    w = cal.weights
    z = (cal.intercept + w[0] * logits + w[1] * fresh * np.log1p(counts) + w[2] * fresh * np.log1p(hours) + w[3] * fresh
         + w[4] * (1 - fresh) * np.log1p(counts))
    np.testing.assert_allclose(on[line > 0], (1 / (1 + np.exp(-z)))[line > 0], rtol=1e-5, atol=1e-7)


def test_evaluate_into_a_new_folder_whose_last_prediction_file_cannot_be_written_leaves_no_folder(
        trained, tmp_path, monkeypatch):
    # The prediction files are replaced one by one when scoring ends: with two versions one was
    # in place when the other met the full disk, and the folder the run created stayed behind
    # holding it.
    import os
    from contextlib import contextmanager

    import recsys.atomic as atomic_module
    from recsys.pipelines.evaluate import run_evaluate

    world, ws, engine, config, versions = trained
    real_open = atomic_module.atomic_open  # run_evaluate imports it when it runs
    opened, full_fd = [], []

    class FullAtSync:  # the first file takes its lines, then finds the disk full when synced
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def fsync(fd):
            if fd in full_fd:
                raise OSError(28, "No space left on device")
            os.fsync(fd)

    @contextmanager
    def first_full_at_its_sync(path, *args, **kwargs):
        opened.append(Path(path).name)
        with real_open(path, *args, **kwargs) as out_file:
            if len(opened) == 1:
                # Closed last (an ExitStack): the other version's file is already in place then.
                full_fd.append(out_file.fileno())
            yield out_file

    monkeypatch.setattr(atomic_module, "atomic_open", first_full_at_its_sync)
    monkeypatch.setattr(atomic_module, "os", FullAtSync())
    out = tmp_path / "new" / "report"
    with pytest.raises(DiskError, match=r"cannot write .*prediction-.*\.txt: no space left on device"):
        run_evaluate(engine, ws, config, behaviors=world / "behaviors_test.tsv", out=out,
                     versions=[versions[True], versions[False]], num_resamples=10)
    assert len(opened) == 2
    assert not (tmp_path / "new").exists()
