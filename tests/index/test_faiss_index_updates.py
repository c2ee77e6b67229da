"""FaissIndex.add / compact: new articles without a rebuild, replaced ids, tombstones."""

from __future__ import annotations

import numpy as np
import pytest
from index_data import brute_force, news_ids, sphere_mixture

from recsys.errors import NotFoundError
from recsys.index import FaissIndex

ALL_KINDS = ("flat", "hnsw", "ivf")


@pytest.fixture
def world():
    items, queries = sphere_mixture(400, 16, cluster_size=40, seed=5, num_queries=10)
    return news_ids(len(items)), items, queries


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_add_appends_without_rebuilding_the_old_rows(world, kind):
    ids, items, queries = world
    index = FaissIndex.build(ids[:300], items[:300], kind=kind, exact_max_items=0, num_threads=1)
    faiss_index = index._index
    index.add(ids[300:], items[300:])
    # Same FAISS object, grown in place: old rows were neither re-encoded nor re-inserted.
    assert index._index is faiss_index and faiss_index.ntotal == 400
    assert len(index) == 400 and index.num_tombstones == 0
    np.testing.assert_array_equal(index.vectors(ids[[0, 299, 300, 399]]), items[[0, 299, 300, 399]])
    # A new article is found by its own vector.
    hits = index.search(items[350:351], 1)[0]
    assert hits.news_ids.tolist() == ["N350"]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_removed_articles_are_never_found_again(world, kind, tmp_path):
    ids, items, queries = world
    index = FaissIndex.build(ids, items, kind=kind, exact_max_items=0, num_threads=1)
    gone = ["N3", "N150", "N399"]
    assert index.remove([*gone, "N_UNKNOWN"]) == 3
    assert index.remove(gone) == 0  # already out
    kept = np.array([i for i in ids.tolist() if i not in gone], dtype=object)
    assert len(index) == 397 and index.news_ids.tolist() == kept.tolist()
    assert index.num_tombstones == (0 if kind == "flat" else 3)
    for name in gone:
        assert name not in index
    found = {n for hits in index.search(items[[3, 150, 399]], 400) for n in hits.news_ids.tolist()}
    assert not found & set(gone)
    if kind == "flat":  # exact: every other article comes back
        assert len(found) == 397
    np.testing.assert_array_equal(index.vectors(kept), items[[int(i[1:]) for i in kept]])
    index.save(tmp_path / "index")
    again = FaissIndex.load(tmp_path / "index", num_threads=1)
    assert again.news_ids.tolist() == kept.tolist() and "N150" not in again
    again.compact()
    assert again.num_tombstones == 0 and again.news_ids.tolist() == kept.tolist()


def test_flat_after_add_equals_a_flat_built_at_once(world):
    ids, items, queries = world
    grown = FaissIndex.build(ids[:250], items[:250], kind="flat", num_threads=1)
    grown.add(ids[250:], items[250:])
    for got, (want_ids, want_scores) in zip(grown.search(queries, 20), brute_force(items, ids, queries, 20)):
        np.testing.assert_array_equal(got.news_ids, want_ids)
        np.testing.assert_allclose(got.scores, want_scores, atol=1e-5)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_replacing_an_id_keeps_one_entry_with_the_new_vector(world, kind):
    ids, items, queries = world
    published = np.full(len(ids), np.datetime64("2024-01-01T00:00:00"), dtype="datetime64[s]")
    index = FaissIndex.build(ids, items, published=published, kind=kind, exact_max_items=0, num_threads=1)
    new_vector = -items[7:8]
    index.add(["N7"], new_vector, published=np.array(["2024-02-01T00:00:00"], dtype="datetime64[s]"))
    assert len(index) == 400
    assert index.num_tombstones == (0 if kind == "flat" else 1)
    np.testing.assert_array_equal(index.vector("N7"), new_vector[0])
    # Searching with the old vector must not return N7 (its old row is gone or a tombstone).
    old = index.search(items[7:8], 400)[0]
    assert old.news_ids.tolist().count("N7") == 1
    assert old.news_ids[-1] == "N7"  # now the opposite direction: the worst match
    np.testing.assert_allclose(old.scores[-1], float(new_vector[0] @ items[7]), atol=1e-5)
    assert index.search(new_vector, 1)[0].news_ids.tolist() == ["N7"]
    # Its publication time was replaced too.
    fresh = index.search(queries, 5, published_after=np.datetime64("2024-01-15"))
    assert all(h.news_ids.tolist() == ["N7"] for h in fresh)
    assert index.news_ids.tolist().count("N7") == 1 and len(index.news_ids) == 400


def test_flat_replacement_removes_the_row_and_shifts_the_rest(world):
    ids, items, _ = world
    index = FaissIndex.build(ids[:5], items[:5], kind="flat", num_threads=1)
    index.add(["N1", "N9"], items[[8, 9]])
    assert index.news_ids.tolist() == ["N0", "N2", "N3", "N4", "N1", "N9"]
    assert index._index.ntotal == 6
    np.testing.assert_array_equal(index.vectors(["N0", "N2", "N1", "N9"]), items[[0, 2, 8, 9]])


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_compact_drops_tombstones_and_keeps_results(world, kind):
    ids, items, queries = world
    index = FaissIndex.build(ids, items, kind=kind, exact_max_items=0, num_threads=1)
    index.add(ids[:50], items[50:100])
    assert index.num_tombstones == 50
    before = index.search(queries, 10)
    index.compact()
    assert index.num_tombstones == 0 and index._index.ntotal == 400 and len(index) == 400
    np.testing.assert_array_equal(index.vectors(ids[:50]), items[50:100])
    after = index.search(queries, 10)
    overlap = np.mean([len(set(a.news_ids) & set(b.news_ids)) / 10 for a, b in zip(before, after)])
    assert overlap >= 0.9  # a rebuilt graph may differ slightly, an IVF keeps its centroids
    index.compact()  # nothing to do
    assert index._index.ntotal == 400


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_compact_keeps_each_articles_latest_publication_time(world, kind, tmp_path):
    """Re-adding the first ids leaves tombstones at the front and the new rows at the end:
    compaction must carry every live row's own time with it, not the first len(live) times."""
    ids, items, _ = world
    day = np.datetime64("2019-11-10T00:00:00", "s")
    published = day + np.arange(len(ids)).astype("timedelta64[h]")  # N0 at day, N1 an hour later, ...
    index = FaissIndex.build(ids, items, published=published, kind=kind, exact_max_items=0, num_threads=1)
    later = day + np.timedelta64(30, "D") + np.arange(50).astype("timedelta64[h]")
    index.add(ids[:50], items[:50], published=later)  # rows 0-49 become tombstones
    assert index.num_tombstones == 50
    want = np.concatenate([later, published[50:]])
    index.compact()
    assert index.num_tombstones == 0
    np.testing.assert_array_equal(index.published(ids), want)
    # The filter reads the same times: from N350's time on, N350..N399 and the 50 re-added.
    cutoff = published[350]
    expected = {f"N{i}" for i in range(50)} | {f"N{i}" for i in range(350, 400)}
    hits = index.search(items[:1], 400, published_after=cutoff)[0]
    assert set(hits.news_ids.tolist()) == expected and len(hits) == 100
    index.save(tmp_path / "idx")
    loaded = FaissIndex.load(tmp_path / "idx", num_threads=1)
    np.testing.assert_array_equal(loaded.published(ids), want)
    assert set(loaded.search(items[:1], 400, published_after=cutoff)[0].news_ids.tolist()) == expected


def test_add_nothing_is_a_no_op(world):
    ids, items, _ = world
    index = FaissIndex.build(ids, items, num_threads=1)
    index.add([], np.zeros((0, 16), np.float32))
    assert len(index) == 400


def test_add_to_an_empty_index(world):
    ids, items, _ = world
    index = FaissIndex.build([], np.zeros((0, 16), np.float32), num_threads=1)
    index.add(ids[:3], items[:3])
    assert index.search(items[:1], 5)[0].news_ids.tolist()[0] == "N0"
    assert len(index.search(items[:1], 5)[0]) == 3


def test_add_rejects_bad_input_and_leaves_the_index_unchanged(world):
    ids, items, _ = world
    index = FaissIndex.build(ids[:10], items[:10], num_threads=1)
    with pytest.raises(ValueError, match=r"vectors must have shape \(2, 16\), got \(2, 8\)"):
        index.add(["N1", "N20"], items[:2, :8])
    with pytest.raises(ValueError, match=r"news ids must be unique, repeated: \['N20'\]"):
        index.add(["N20", "N20"], items[:2])
    with pytest.raises(ValueError, match=r"published must be datetime64 of shape \(1,\), got int64"):
        index.add(["N20"], items[:1], published=np.array([5]))
    with pytest.raises(ValueError, match=r"vectors row 0 holds NaN or infinity"):
        index.add(["N20"], np.full((1, 16), np.inf, np.float32))
    assert len(index) == 10 and index._index.ntotal == 10 and "N20" not in index


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_set_published_moves_times_in_place_and_persists(world, kind, tmp_path):
    ids, items, queries = world
    day = np.datetime64("2019-11-10T00:00:00", "s")
    published = day + np.arange(len(ids)).astype("timedelta64[h]")
    index = FaissIndex.build(ids, items, published=published, kind=kind, exact_max_items=0, num_threads=1)
    index.add(ids[:5], items[:5], published=published[:5])  # tombstones behind rows 0-4 (HNSW, IVF)
    np.testing.assert_array_equal(index.published(ids[[3, 0, 399]]), published[[3, 0, 399]])

    earlier = np.full(2, day - np.timedelta64(3, "D"))
    index.set_published(ids[[0, 200]], earlier)
    np.testing.assert_array_equal(index.published(ids[[0, 200, 1]]), [earlier[0], earlier[1], published[1]])
    np.testing.assert_array_equal(index.vectors(ids[[0, 200]]), items[[0, 200]])  # vectors stay
    # The freshness filter reads the new times: both moved rows drop out, nothing else does.
    hits = index.search(items[200:201], 400, published_after=day)[0]
    assert len(hits) == 398 and not {"N0", "N200"} & set(hits.news_ids.tolist())

    index.save(tmp_path / "idx")
    np.testing.assert_array_equal(FaissIndex.load(tmp_path / "idx").published(ids), np.concatenate([earlier[:1], published[1:200], earlier[1:], published[201:]]))


def test_set_published_refuses_bad_input_and_changes_nothing(world):
    ids, items, _ = world
    published = np.full(len(ids), np.datetime64("2019-11-10T00:00:00", "s"))
    index = FaissIndex.build(ids, items, published=published, kind="flat", num_threads=1)
    later = np.datetime64("2019-11-12T00:00:00", "s")
    with pytest.raises(NotFoundError, match="news id 'N_missing' not in the index"):
        index.set_published(np.array(["N1", "N_missing"]), np.full(2, later))
    with pytest.raises(ValueError, match="news ids must be unique"):
        index.set_published(np.array(["N1", "N1"]), np.full(2, later))
    with pytest.raises(ValueError, match=r"published must be datetime64 of shape \(2,\)"):
        index.set_published(np.array(["N1", "N2"]), np.array([1.0, 2.0]))
    with pytest.raises(NotFoundError, match="N_missing"):
        index.published(["N_missing"])
    np.testing.assert_array_equal(index.published(ids), published)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_the_nightly_refresh_compacts_tombstones_and_retunes_the_search(kind):
    """``pipelines.nightly.maintain_index``: compaction past COMPACT_TOMBSTONE_SHARE of the live
    rows, a new calibration after it and after RECALIBRATE_GROWTH; nothing otherwise."""
    from recsys.pipelines.nightly import COMPACT_TOMBSTONE_SHARE, RECALIBRATE_GROWTH, maintain_index

    items, queries = sphere_mixture(2600, 16, cluster_size=50, seed=11, num_queries=20)
    ids = news_ids(len(items))
    index = FaissIndex.build(ids[:2000], items[:2000], kind=kind, exact_max_items=0, num_threads=1)
    assert index.calibration["num_items"] == 2000
    assert maintain_index(index) == {}
    limit = int(COMPACT_TOMBSTONE_SHARE * 2000)
    rng = np.random.default_rng(0)
    moved = items + 0.05 * rng.standard_normal(items.shape).astype(np.float32)
    moved /= np.linalg.norm(moved, axis=1, keepdims=True)
    index.add(ids[:limit], moved[:limit])  # re-embedded articles: their old rows become tombstones
    assert index.num_tombstones == limit and maintain_index(index) == {}
    index.add(ids[limit:limit + 50], moved[limit:limit + 50])
    done = maintain_index(index)
    assert done["index_compacted"] == limit + 50 and index.num_tombstones == 0 and len(index) == 2000
    assert set(done["index_calibrated"]) == {index.calibration["param"], "recall"}
    current = np.concatenate([moved[:limit + 50], items[limit + 50:2000]])
    hits = index.search(queries, 10)
    exact = brute_force(current, ids[:2000], queries, 10)
    recall = np.mean([len(set(h.news_ids) & set(e[0])) / 10 for h, e in zip(hits, exact)])
    assert recall >= 0.9
    # Growth: re-tuned once the catalogue passes RECALIBRATE_GROWTH times the calibrated size.
    grown = int(RECALIBRATE_GROWTH * 2000)
    index.add(ids[2000:grown], items[2000:grown])
    assert maintain_index(index) == {}
    index.add(ids[grown:grown + 1], items[grown:grown + 1])
    done = maintain_index(index)
    assert "index_compacted" not in done and index.calibration["num_items"] == grown + 1

    flat = FaissIndex.build(ids[:100], items[:100], kind="flat", num_threads=1)
    flat.add(ids[:50], moved[:50])
    assert maintain_index(flat) == {}


def test_the_nightly_refresh_keeps_a_hand_set_breadth_and_the_target_recall():
    from recsys.pipelines.nightly import maintain_index

    items, _ = sphere_mixture(1000, 16, cluster_size=50, seed=12, num_queries=1)
    ids = news_ids(len(items))
    hand = FaissIndex.build(ids, items, kind="hnsw", exact_max_items=0, params={"ef_search": 40}, num_threads=1)
    strict = FaissIndex.build(ids, items, kind="hnsw", exact_max_items=0, target_recall=0.99, num_threads=1)
    for index in (hand, strict):
        before = index.calibration
        index.add(ids[:300], items[:300][::-1].copy())  # 30% tombstones: compacted, calibrated again
        done = maintain_index(index)
        assert done["index_compacted"] == 300
        after = index.calibration
        assert (after["target_recall"], after["tuned"]) == (before["target_recall"], before["tuned"])
    assert hand.params["ef_search"] == 40  # measured, not changed
    # A breadth set after the build (set_search_params, saved with the index) is kept too.
    for kind, name in (("hnsw", "ef_search"), ("ivf", "nprobe")):
        later = FaissIndex.build(ids, items, kind=kind, exact_max_items=0, num_threads=1)
        value = later.params[name] + 3  # not the tuned breadth
        assert later.calibration["tuned"]
        later.set_search_params(**{name: value})
        assert (later.calibration["value"], later.calibration["tuned"], later.calibration["recall"]) == (value, False, None)
        later.add(ids[:300], items[:300][::-1].copy())
        done = maintain_index(later)
        assert later.params[name] == value and done["index_calibrated"][name] == value  # measured, not changed
        assert later.calibration["tuned"] is False and 0 < later.calibration["recall"] <= 1
    off = FaissIndex.build(ids, items, kind="hnsw", exact_max_items=0, target_recall=None, num_threads=1)
    off.add(ids[:300], items[:300][::-1].copy())
    assert maintain_index(off) == {"index_compacted": 300} and off.calibration is None


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_the_content_fingerprint_follows_every_change_a_search_reads(world, kind, tmp_path):
    # The nightly's plan holds it: a re-embedded article (same id, new vector) left the plan as
    # it was, so a night resumed, or returned as done, a run ranked on the old content.
    ids, items, _ = world
    index = FaissIndex.build(ids, items, kind=kind, num_threads=1)
    before = index.content_fingerprint()
    assert len(before) == 16 and int(before, 16) >= 0
    index.save(tmp_path / "saved")
    assert FaissIndex.load(tmp_path / "saved").content_fingerprint() == before
    assert FaissIndex.build(ids, items, kind=kind, num_threads=1).content_fingerprint() == before

    changed = items[7] + np.float32(1e-3)
    index.add(ids[7:8], (changed / np.linalg.norm(changed))[None, :])
    assert index.news_ids.tolist().count(ids[7]) == 1 and index.content_fingerprint() != before
    steps = [index.content_fingerprint()]
    index.set_published(ids[:1], np.array(["2024-01-02T00:00:00"], dtype="datetime64[s]"))
    steps.append(index.content_fingerprint())
    if kind != "flat":
        index.compact()  # the same live rows, another structure
        steps.append(index.content_fingerprint())
        index.set_search_params(**{("ef_search" if kind == "hnsw" else "nprobe"): 3})
        steps.append(index.content_fingerprint())
    assert len({before, *steps}) == len(steps) + 1
