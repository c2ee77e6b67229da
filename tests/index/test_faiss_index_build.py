"""FaissIndex.build: the auto rule, parameters, threads and input validation."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from index_data import news_ids, sphere_mixture

from recsys.errors import ConfigError
from recsys.index import DEFAULT_PARAMS, FaissIndex


@pytest.fixture
def world():
    items, _ = sphere_mixture(120, 8, cluster_size=20, seed=11)
    return news_ids(len(items)), items


def test_auto_is_flat_up_to_exact_max_items_and_hnsw_beyond(world):
    ids, items = world
    assert FaissIndex.build(ids, items, exact_max_items=120, num_threads=1).kind == "flat"
    beyond = FaissIndex.build(ids, items, exact_max_items=119, num_threads=1, target_recall=None)
    assert beyond.kind == "hnsw" and beyond.params == DEFAULT_PARAMS["hnsw"] and beyond.calibration is None
    assert isinstance(beyond._index, faiss.IndexHNSWFlat)


def test_auto_validates_approximate_params_even_when_it_picks_flat(world):
    ids, items = world
    small = FaissIndex.build(ids, items, params={"ef_search": 64}, num_threads=1)
    assert small.kind == "flat" and small.params == {}
    large = FaissIndex.build(ids, items, params={"ef_search": 64}, exact_max_items=10, num_threads=1)
    assert large.params["ef_search"] == 64
    with pytest.raises(ConfigError, match=r"index parameter 'efsearch' is unknown for kind 'hnsw', expected M, ef_construction, ef_search"):
        FaissIndex.build(ids, items, params={"efsearch": 64}, num_threads=1)


def test_explicit_kinds_and_their_params(world):
    ids, items = world
    hnsw = FaissIndex.build(ids, items, kind="hnsw", params={"M": 8, "ef_construction": 20, "ef_search": 30}, num_threads=1)
    assert hnsw._index.hnsw.efConstruction == 20 and hnsw.params == {"M": 8, "ef_construction": 20, "ef_search": 30}
    ivf = FaissIndex.build(ids, items, kind="ivf", params={"nlist": 3}, num_threads=1, target_recall=None)
    assert ivf.params == {"nlist": 3, "nprobe": 3} and ivf._index.nlist == 3
    assert FaissIndex.build(ids, items, kind="flat", num_threads=1).params == {}


@pytest.mark.parametrize(
    ("num_items", "nlist", "nprobe"),
    [(1, 1, 1), (120, 3, 3), (20_000, 512, 64), (65_000, 1024, 128), (1_000_000, 4096, 512)],
)
def test_ivf_default_lists_grow_with_the_square_root_of_n(num_items, nlist, nprobe):
    from recsys.index.faiss_index import _derive_params

    assert _derive_params("ivf", {}, num_items) == {"nlist": nlist, "nprobe": nprobe}


def test_bad_kind_and_params_are_config_errors(world):
    ids, items = world
    with pytest.raises(ConfigError, match=r"index kind 'annoy' is unknown, expected one of auto, flat, hnsw, ivf"):
        FaissIndex.build(ids, items, kind="annoy")
    with pytest.raises(ConfigError, match=r"index parameter 'M' is unknown for kind 'flat', expected none"):
        FaissIndex.build(ids, items, kind="flat", params={"M": 16})
    with pytest.raises(ConfigError, match=r"index parameter 'nprobe' is 0, expected an integer >= 1"):
        FaissIndex.build(ids, items, kind="ivf", params={"nprobe": 0})
    with pytest.raises(ConfigError, match=r"index parameter 'M' is '16', expected an integer >= 1"):
        FaissIndex.build(ids, items, kind="hnsw", params={"M": "16"})
    with pytest.raises(ConfigError, match=r"index parameter 'nlist' is 500, expected at most the 120 items"):
        FaissIndex.build(ids, items, kind="ivf", params={"nlist": 500})
    with pytest.raises(ConfigError, match=r"exact_max_items must be an integer >= 0, got -1"):
        FaissIndex.build(ids, items, exact_max_items=-1)
    with pytest.raises(ConfigError, match=r"num_threads must be an integer >= 1 or None, got 0"):
        FaissIndex.build(ids, items, num_threads=0)
    with pytest.raises(ConfigError, match=r"target_recall must be in \(0, 1\] or None, got 1.5"):
        FaissIndex.build(ids, items, target_recall=1.5)


def test_ivf_needs_training_vectors():
    with pytest.raises(ValueError, match=r"kind='ivf' needs at least one vector to train its coarse quantizer, got 0"):
        FaissIndex.build([], np.zeros((0, 8), np.float32), kind="ivf")


def test_set_search_params_changes_breadth_only(world):
    ids, items = world
    hnsw = FaissIndex.build(ids, items, kind="hnsw", num_threads=1)
    hnsw.set_search_params(ef_search=500)
    assert hnsw.params["ef_search"] == 500
    with pytest.raises(ConfigError, match=r"'M' is fixed at build time for kind 'hnsw', search-time parameters: ef_search"):
        hnsw.set_search_params(M=8)
    with pytest.raises(ConfigError, match=r"'nprobe' is unknown for kind 'hnsw'"):
        hnsw.set_search_params(nprobe=8)
    ivf = FaissIndex.build(ids, items, kind="ivf", num_threads=1)
    with pytest.raises(ConfigError, match=rf"'nprobe' is {ivf.params['nlist'] + 1}, expected at most nlist = {ivf.params['nlist']}"):
        ivf.set_search_params(nprobe=ivf.params["nlist"] + 1)  # capped at search time, without a word
    flat = FaissIndex.build(ids, items, kind="flat", num_threads=1)
    with pytest.raises(ConfigError, match=r"'ef_search' is unknown for kind 'flat', expected none"):
        flat.set_search_params(ef_search=8)


def test_num_threads_is_set_for_faiss(world):
    ids, items = world
    index = FaissIndex.build(ids, items, num_threads=1)
    assert faiss.omp_get_max_threads() == 1 and index.num_threads == 1
    faiss.omp_set_num_threads(2)  # someone else changes the process-wide count
    index.search(items[:2], 3)
    assert faiss.omp_get_max_threads() == 1


def test_ids_and_vectors_are_validated(world):
    ids, items = world
    with pytest.raises(ValueError, match=r"news ids must be unique, repeated: \['N1'\]"):
        FaissIndex.build(["N1", "N1"], items[:2])
    with pytest.raises(ValueError, match=r"news_ids must be strings, got dtype int64"):
        FaissIndex.build(np.arange(3), items[:3])
    with pytest.raises(ValueError, match=r"news_ids must be strings, got 7"):
        FaissIndex.build(np.array(["N1", 7], dtype=object), items[:2])
    with pytest.raises(ValueError, match=r"news_ids must not contain empty strings"):
        FaissIndex.build(["N1", ""], items[:2])
    with pytest.raises(ValueError, match=r"news_ids must be one-dimensional, got shape \(1, 2\)"):
        FaissIndex.build([["N1", "N2"]], items[:2])
    with pytest.raises(ValueError, match=r"vectors must have shape \(3, dim\), got \(2, 8\)"):
        FaissIndex.build(ids[:3], items[:2])
    with pytest.raises(ValueError, match=r"vectors must have shape \(0, dim\), got \(0,\)"):
        FaissIndex.build([], [])
    with pytest.raises(ValueError, match=r"vectors must have at least one dimension"):
        FaissIndex.build(ids[:2], np.zeros((2, 0), np.float32))
    with pytest.raises(ValueError, match=r"published must be datetime64 of shape \(3,\), got datetime64\[s\] of shape \(2,\)"):
        FaissIndex.build(ids[:3], items[:3], published=np.array(["2024-01-01", "2024-01-02"], dtype="datetime64[s]"))


def test_ids_from_object_arrays_and_times_in_other_units(world):
    ids, items = world
    published = np.array(["2024-01-01T10:00:00.123456"] * 3, dtype="datetime64[us]")
    index = FaissIndex.build(np.array(ids[:3], dtype=object), items[:3].astype(np.float64), published=published, num_threads=1)
    assert index.news_ids.tolist() == ["N0", "N1", "N2"] and index._published.dtype == np.dtype("datetime64[s]")
    assert repr(index) == "FaissIndex(kind='flat', dim=8, items=3, params={})"
    assert index.build_seconds >= 0 and index.built_at.endswith("+00:00") and index.exact_max_items == 100_000


def recall_at_100(index, exact, queries):
    found = index.search(queries, 100)
    truth = exact.search(queries, 100)
    return float(np.mean([len(np.intersect1d(f.news_ids, t.news_ids)) / 100 for f, t in zip(found, truth)]))


@pytest.mark.parametrize(("kind", "param"), [("hnsw", "ef_search"), ("ivf", "nprobe")])
def test_build_calibrates_the_breadth_to_the_target_recall(kind, param):
    items, queries = sphere_mixture(3000, 32, cluster_size=64, seed=13, num_queries=100)
    ids = news_ids(len(items))
    index = FaissIndex.build(ids, items, kind=kind, exact_max_items=0, num_threads=1)
    record = index.calibration
    assert record["param"] == param and record["value"] == index.params[param]
    assert record["recall"] >= 0.95 and record["k"] == 100 and record["num_queries"] == 256 and record["tuned"]
    # Independent check on queries the calibration never saw.
    exact = FaissIndex.build(ids, items, kind="flat", num_threads=1)
    assert recall_at_100(index, exact, queries) >= 0.93
    # The next smaller breadth of the ladder would not have reached the target on the sample.
    smaller = FaissIndex.build(ids, items, kind=kind, exact_max_items=0, num_threads=1,
                               params={param: max(1, record["value"] * 2 // 3 if kind == "hnsw" else record["value"] // 2)})
    assert smaller.calibration["recall"] < 0.95 or record["value"] == (32 if kind == "hnsw" else 1)


def test_explicit_breadth_is_measured_not_tuned(world):
    ids, items = world
    index = FaissIndex.build(ids, items, kind="hnsw", params={"ef_search": 40}, num_threads=1)
    assert index.params["ef_search"] == 40
    assert index.calibration["tuned"] is False and index.calibration["value"] == 40
    assert 0 <= index.calibration["recall"] <= 1


def test_calibrate_after_adds_and_for_flat(world):
    ids, items = world
    index = FaissIndex.build(ids[:60], items[:60], kind="ivf", num_threads=1, target_recall=None)
    index.add(ids[60:], items[60:])
    index.add(ids[:10], items[60:70])  # tombstones are left out of the measurement
    record = index.calibrate(target_recall=0.99)
    assert record["recall"] >= 0.99 and index.calibration == record
    assert FaissIndex.build(ids, items, kind="flat", num_threads=1).calibrate() is None
    with pytest.raises(ConfigError, match=r"target_recall must be in \(0, 1\] or None, got 0"):
        index.calibrate(target_recall=0)


def test_unreachable_target_keeps_the_widest_breadth_and_warns(world, monkeypatch, caplog):
    from recsys.index import faiss_index

    ids, items = world
    monkeypatch.setattr(faiss_index, "_EF_SEARCH_LADDER", (1,))
    index = FaissIndex.build(ids, items, kind="hnsw", params={"M": 2, "ef_construction": 2}, exact_max_items=0,
                             num_threads=1, target_recall=None)
    with caplog.at_level("WARNING", logger="recsys.index.faiss_index"):
        record = index.calibrate(target_recall=1.0)
    assert record["value"] == 1 and record["recall"] < 1.0
    assert "below the target 1.000" in caplog.text
