"""FaissIndex.save / load: round trip, manifest, atomic writes, mismatch and corruption errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from index_data import news_ids, sphere_mixture

from recsys.errors import DiskError, ModelMismatchError, NotFoundError, RecsysError
from recsys.index import FaissIndex, IndexFormatError

ALL_KINDS = ("flat", "hnsw", "ivf")
ENCODERS = {"text": {"name": "all-MiniLM-L6-v2", "dim": 384}, "image": {"name": "mobilenet_v1", "dim": 1024}}


@pytest.fixture
def world():
    items, queries = sphere_mixture(500, 16, cluster_size=50, seed=7, num_queries=12)
    published = np.datetime64("2024-01-01T00:00:00") + np.arange(len(items)).astype("timedelta64[h]")
    return news_ids(len(items)), items, published, queries


@pytest.fixture
def saved(world, tmp_path):
    ids, items, published, _ = world
    index = FaissIndex.build(ids, items, published=published, kind="flat", num_threads=1)
    path = index.save(tmp_path / "index", manifest_extra={"encoders": ENCODERS, "model_version": "v3"})
    return index, path


def search_all(index, queries):
    plain = index.search(queries, 20)
    filtered = index.search(queries, 20, exclude=[{"N1", "N2"}] * len(queries),
                            published_after=np.datetime64("2024-01-10T00:00:00"))
    return [(h.news_ids.tolist(), h.scores.tolist()) for h in plain + filtered]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_round_trip_gives_identical_results(world, tmp_path, kind):
    ids, items, published, queries = world
    index = FaissIndex.build(ids, items, published=published, kind=kind, exact_max_items=0, num_threads=1)
    index.add(ids[:5], items[100:105], published[100:105])  # tombstones for hnsw / ivf
    index.save(tmp_path / "index")
    loaded = FaissIndex.load(tmp_path / "index", num_threads=1)
    assert search_all(loaded, queries) == search_all(index, queries)
    assert loaded.kind == kind and loaded.params == index.params and loaded.dim == 16
    assert loaded.num_tombstones == index.num_tombstones
    assert loaded.news_ids.tolist() == index.news_ids.tolist()
    np.testing.assert_array_equal(loaded.vectors(ids[:10]), index.vectors(ids[:10]))
    # A loaded index keeps working: adds and replacements.
    new = -items[200:202]
    loaded.add(["N-new", "N6"], new)
    assert loaded.search(new[:1], 1)[0].news_ids.tolist() == ["N-new"]
    np.testing.assert_array_equal(loaded.vector("N6"), new[1])


def test_manifest_records_the_index_and_the_callers_entries(saved):
    index, path = saved
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["index.faiss", "news_ids.npy", "published.npy", "alive.npy", "manifest.json"]
    )
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["kind"] == "flat" and manifest["dim"] == 16 and manifest["num_items"] == 500
    assert manifest["params"] == {} and manifest["metric"] == "inner_product"
    assert manifest["faiss_version"] == faiss.__version__
    assert manifest["built_at"].endswith("+00:00") and manifest["build_seconds"] >= 0
    assert manifest["encoders"] == ENCODERS and manifest["model_version"] == "v3"
    assert np.load(path / "published.npy").dtype == np.dtype("datetime64[s]")
    assert FaissIndex.load(path).manifest_extra == {"encoders": ENCODERS, "model_version": "v3"}


def test_resaving_a_loaded_index_keeps_the_callers_entries(saved, tmp_path):
    _, path = saved
    loaded = FaissIndex.load(path)
    loaded.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["model_version"] == "v3"


def test_load_checks_expected_entries(saved):
    _, path = saved
    loaded = FaissIndex.load(path, expected={"dim": 16, "encoders": ENCODERS, "kind": "flat"})
    assert len(loaded) == 500
    with pytest.raises(ModelMismatchError, match=r"manifest.json: key 'dim' is 16 in the saved index, expected 128"):
        FaissIndex.load(path, expected={"dim": 128})
    other = {**ENCODERS, "image": {"name": "efficientnet_b0", "dim": 1280}}
    with pytest.raises(ModelMismatchError, match=r"key 'encoders' is \{.*mobilenet_v1.*\} in the saved index, expected \{.*efficientnet_b0"):
        FaissIndex.load(path, expected={"encoders": other})
    with pytest.raises(ModelMismatchError, match=r"key 'fusion' is missing, expected 'gated'"):
        FaissIndex.load(path, expected={"fusion": "gated"})


def test_expected_values_compare_as_json(saved):
    index, tmp = saved
    index.save(tmp.parent / "tuple", manifest_extra={"dims": (384, 1024)})
    assert len(FaissIndex.load(tmp.parent / "tuple", expected={"dims": (384, 1024)})) == 500


def test_save_replaces_a_previous_index_atomically(saved, world):
    _, path = saved
    ids, items, _, queries = world
    smaller = FaissIndex.build(ids[:10], items[:10], num_threads=1)
    smaller.save(path)
    assert len(FaissIndex.load(path)) == 10
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_a_failed_save_leaves_the_previous_index_and_no_temporary_files(saved, monkeypatch):
    index, path = saved
    before = (path / "manifest.json").read_text()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        index.save(path, manifest_extra={"model_version": "v4"})
    assert (path / "manifest.json").read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["index"]


def test_save_refuses_to_replace_a_directory_that_is_not_an_index(saved, tmp_path):
    index, _ = saved
    version_dir = tmp_path / "v3"
    version_dir.mkdir()
    (version_dir / "model.keras").write_text("weights")
    with pytest.raises(RecsysError, match=r"refusing to replace .*v3: it is not an index directory"):
        index.save(version_dir)
    assert (version_dir / "model.keras").read_text() == "weights"
    empty = tmp_path / "empty"
    empty.mkdir()
    index.save(empty)
    assert len(FaissIndex.load(empty)) == 500


def test_manifest_extra_cannot_override_the_index_entries(saved, tmp_path):
    index, _ = saved
    with pytest.raises(ValueError, match=r"manifest_extra keys \['dim', 'kind'\] are reserved"):
        index.save(tmp_path / "x", manifest_extra={"dim": 3, "kind": "hnsw", "ok": 1})
    with pytest.raises(TypeError, match="not JSON serializable"):
        index.save(tmp_path / "x", manifest_extra={"when": object()})
    assert not (tmp_path / "x").exists()


def test_load_of_a_missing_directory_is_not_found(tmp_path):
    with pytest.raises(NotFoundError, match=r"no index directory at .*nowhere"):
        FaissIndex.load(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["index.faiss", "news_ids.npy", "published.npy", "alive.npy"])
def test_load_names_a_missing_file(saved, name):
    _, path = saved
    (path / name).unlink()
    with pytest.raises(IndexFormatError, match=rf"{name}: missing, the index directory is incomplete"):
        FaissIndex.load(path)


def test_load_rejects_a_missing_or_broken_manifest(saved):
    _, path = saved
    manifest = path / "manifest.json"
    text = manifest.read_text()
    manifest.write_text("{not json")
    with pytest.raises(IndexFormatError, match=r"manifest.json: unreadable"):
        FaissIndex.load(path)
    manifest.write_text(json.dumps({**json.loads(text), "format_version": 99}))
    with pytest.raises(IndexFormatError, match=r"field 'format_version' is 99, expected 1"):
        FaissIndex.load(path)
    manifest.write_text(json.dumps({"format": "something.else"}))
    with pytest.raises(IndexFormatError, match=r"field 'format' is not 'recsys.faiss_index'"):
        FaissIndex.load(path)
    incomplete = json.loads(text)
    del incomplete["params"]
    manifest.write_text(json.dumps(incomplete))
    with pytest.raises(IndexFormatError, match=r"fields \['params'\] are missing"):
        FaissIndex.load(path)
    manifest.unlink()
    with pytest.raises(IndexFormatError, match=r"manifest.json: missing, expected the index manifest"):
        FaissIndex.load(path)


def test_load_rejects_inconsistent_files(saved):
    _, path = saved
    np.save(path / "news_ids.npy", np.array(["N1", "N2"]))
    with pytest.raises(IndexFormatError, match=r"news_ids.npy: 2 rows, index.faiss holds 500"):
        FaissIndex.load(path)
    np.save(path / "news_ids.npy", np.arange(500))
    with pytest.raises(IndexFormatError, match=r"news_ids.npy: holds int64 of shape \(500,\), expected a 1-d 'U' array"):
        FaissIndex.load(path)


def test_load_rejects_a_corrupt_faiss_file_and_a_kind_mismatch(saved, world):
    _, path = saved
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "kind": "hnsw"}))
    with pytest.raises(IndexFormatError, match=r"index.faiss: holds a IndexFlatIP, manifest kind is 'hnsw'"):
        FaissIndex.load(path)
    (path / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(IndexFormatError, match=r"index.faiss: FAISS cannot read it"):
        FaissIndex.load(path)


def test_load_checks_expected_before_reading_the_index(saved):
    # A mismatch is reported even when the index file itself would not load.
    _, path = saved
    (path / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(ModelMismatchError, match=r"key 'dim' is 16 in the saved index, expected 64"):
        FaissIndex.load(path, expected={"dim": 64})


_KILL_SAVE = """
import os, sys
import numpy as np
from recsys.index import FaissIndex

path, renames_before_kill, during = sys.argv[1], int(sys.argv[2]), sys.argv[3]
index = FaissIndex.load(path)
real_replace, calls = os.replace, []

def replace(src, dst):  # the process dies as SIGKILL would: no handler, no cleanup
    calls.append(src)
    if len(calls) > renames_before_kill:
        os._exit(9)
    real_replace(src, dst)

if during == "write":
    real_save = np.save
    def save(*args, **kwargs):
        os._exit(9)
    np.save = save
os.replace = replace
smaller = FaissIndex.build(index.news_ids[:10], index.vectors(index.news_ids[:10]), num_threads=1)
smaller.save(path)
"""


@pytest.mark.parametrize("renames_before_kill, during", [(0, "write"), (1, "swap")])
def test_a_save_killed_midway_leaves_the_previous_index_for_the_next_load(saved, world, tmp_path, monkeypatch,
                                                                          renames_before_kill, during):
    from recsys.index import folder

    index, path = saved
    _, _, _, queries = world
    script = tmp_path / "kill_save.py"
    script.write_text(_KILL_SAVE)
    proc = subprocess.run([sys.executable, str(script), str(path), str(renames_before_kill), during], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    leftovers = sorted(p.name.split("-")[0] for p in path.parent.iterdir() if p.name.startswith("."))
    if during == "swap":  # killed between the renames: no index/ at all, the old one moved aside
        assert not path.exists() and leftovers == [".index.old", ".index.tmp"]
        # Just moved aside: it may be a save still between its renames, so it stays for now.
        assert not FaissIndex.exists(path)
        monkeypatch.setattr(folder, "RESTORE_GRACE_SECONDS", 0)  # as a minute later
        assert FaissIndex.exists(path)  # puts it back
    else:
        assert path.exists() and leftovers == [".index.tmp"]
    restored = FaissIndex.load(path)
    assert len(restored) == len(index)
    assert search_all(restored, queries) == search_all(index, queries)
    # The next save keeps young leftovers (a save may still be running) and removes stale ones.
    restored.save(path)
    young = sorted(p.name for p in path.parent.iterdir() if p.name.startswith("."))
    assert [n.split("-")[0] for n in young] == [".index.tmp"]
    monkeypatch.setattr(folder, "STALE_SAVE_SECONDS", 0)  # as an hour later
    restored.save(path)
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == [] and path.is_dir()


def test_only_a_complete_index_moved_aside_is_restored_the_latest_saved_first(saved, world, monkeypatch):
    from recsys.index import folder

    monkeypatch.setattr(folder, "RESTORE_GRACE_SECONDS", 0)
    index, path = saved
    ids, items, _, _ = world
    newer = FaissIndex.build(ids[:30], items[:30], num_threads=1)
    newer.save(path.parent / "newer")
    (path.parent / "newer").rename(path.parent / ".index.old-bbbb")
    path.rename(path.parent / ".index.old-aaaa")  # saved first
    half = path.parent / ".index.old-cccc"  # a cleanup killed half-way: newest folder, files missing
    half.mkdir()
    (half / "manifest.json").write_text((path.parent / ".index.old-bbbb" / "manifest.json").read_text())
    assert len(FaissIndex.load(path)) == 30  # the later save of the two complete ones
    path.rename(path.parent / ".index.old-dddd")
    (path.parent / ".index.old-aaaa" / "manifest.json").write_text("{broken")
    (path.parent / ".index.old-dddd" / "alive.npy").unlink()
    with pytest.raises(NotFoundError, match="no index directory"):
        FaissIndex.load(path)
    assert not FaissIndex.exists(path)


def linked_index(world, tmp_path, name: str) -> tuple[Path, Path]:
    """An index of 20 items saved on "another disk" (``disk2/<name>``) and a link to it from ``version/index``."""
    ids, items, _, _ = world
    target = tmp_path / "disk2" / name
    FaissIndex.build(ids[:20], items[:20], num_threads=1).save(target)
    link = tmp_path / "version" / "index"
    link.parent.mkdir()
    link.symlink_to(target, target_is_directory=True)
    return target, link


def test_a_symlinked_index_is_followed_and_the_link_stays(world, tmp_path, monkeypatch):
    """A workspace may keep its index on another disk behind a link: saves replace the folder
    the link points to, so the link keeps serving the newest index."""
    from recsys.index import folder

    ids, items, _, _ = world
    target, link = linked_index(world, tmp_path, "index-v1")
    assert FaissIndex.build(ids[:25], items[:25], num_threads=1).save(link) == link
    monkeypatch.setattr(folder, "STALE_SAVE_SECONDS", 0)
    FaissIndex.build(ids[:26], items[:26], num_threads=1).save(link)
    assert link.is_symlink() and Path(os.readlink(link)) == target
    assert len(FaissIndex.load(link)) == 26 and len(FaissIndex.load(target)) == 26
    assert [p.name for p in link.parent.iterdir()] == ["index"]
    assert [p.name for p in target.parent.iterdir()] == ["index-v1"]  # no leftovers beside it


def test_a_save_through_a_link_killed_between_its_renames_is_put_back(world, tmp_path, monkeypatch):
    from recsys.index import folder

    target, link = linked_index(world, tmp_path, "index")
    target.rename(target.parent / ".index.old-0123abcd")  # what a save killed between its renames leaves
    assert not link.exists()  # a dangling link
    monkeypatch.setattr(folder, "RESTORE_GRACE_SECONDS", 0)  # as a minute later
    assert FaissIndex.exists(link) and link.is_symlink()
    assert len(FaissIndex.load(link)) == 20


def test_a_link_to_a_missing_disk_is_refused_and_nothing_is_written(world, tmp_path):
    ids, items, _, _ = world
    link = tmp_path / "version" / "index"
    link.parent.mkdir()
    link.symlink_to(tmp_path / "unmounted" / "index", target_is_directory=True)
    with pytest.raises(RecsysError, match=r"links to .*unmounted/index, whose folder .*unmounted does not exist"):
        FaissIndex.build(ids[:5], items[:5], num_threads=1).save(link)
    assert not (tmp_path / "unmounted").exists()


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), OSError(30, "Read-only file system")])
def test_a_folder_it_cannot_write_beside_is_a_clear_error(world, tmp_path, monkeypatch, error):
    # A read-only mount raises a plain OSError (errno 30), which was an internal error (exit 2).
    ids, items, _, _ = world
    real_mkdir = Path.mkdir

    def refuse_temporaries(self, *args, **kwargs):  # root may write anywhere; refuse as a read-only folder would
        if ".tmp-" in self.name:
            raise error
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse_temporaries)
    target = tmp_path / "index"
    with pytest.raises(RecsysError, match=rf"cannot save the index {target}: .* so {tmp_path} must be writable \({error.strerror}\)"):
        FaissIndex.build(ids[:5], items[:5], num_threads=1).save(target)
    assert not target.exists()


def _faiss_full_disk(index, path):
    raise RuntimeError("Error in void faiss::write_index(const Index*, IOWriter*, int) at index_write.cpp:499: "
                       f"Error: 'ret == (size * 4)' failed: write error in {path}: 307155 != 570880 "
                       "(No space left on device)")


def _numpy_full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("where", ["faiss", "numpy", "mkdir"])
def test_a_full_disk_is_a_clear_error_naming_the_index_and_keeps_the_saved_one(world, tmp_path, monkeypatch, where):
    # FAISS raises RuntimeError("... (No space left on device)") and NumPy a bare OSError: both
    # were internal errors (exit 2), the first naming only the temporary file.
    ids, items, _, _ = world
    target = tmp_path / "index"
    FaissIndex.build(ids[:5], items[:5], num_threads=1).save(target)
    saved = {p.name: p.read_bytes() for p in target.iterdir()}
    if where == "faiss":
        monkeypatch.setattr(faiss, "write_index", _faiss_full_disk)
    elif where == "numpy":
        monkeypatch.setattr(np, "save", _numpy_full_disk)
    else:
        real_mkdir = Path.mkdir

        def full(self, *args, **kwargs):
            if ".tmp-" in self.name:
                raise OSError(28, "No space left on device")
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", full)
    with pytest.raises(DiskError, match=rf"^cannot save the index {target}: no space left on device$"):
        FaissIndex.build(ids[:6], items[:6], num_threads=1).save(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == saved
    assert [p.name for p in tmp_path.iterdir()] == ["index"]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_a_load_overlapped_by_a_save_reads_one_save_whole(world, tmp_path, monkeypatch, kind):
    # Read path by path, a load that a save overlapped took the FAISS index of one save and the
    # ids of the next: each article's vector under another article's id (a `recsys similar`
    # during the nightly's refresh printed wrong neighbours). The files must be of one save.
    ids, items, published, _ = world
    first = FaissIndex.build(ids, items, published=published, kind=kind, num_threads=1)
    order = np.arange(len(ids))[::-1]  # the same articles and vectors, rows in the other order
    second = FaissIndex.build(ids[order], items[order], published=published[order], kind=kind, num_threads=1)
    path = first.save(tmp_path / "index")
    real_load = np.load
    saves = []

    def load_then_save(*args, **kwargs):
        array = real_load(*args, **kwargs)
        if not saves:  # once, between two of the load's reads
            saves.append(second.save(path))
        return array

    monkeypatch.setattr(np, "load", load_then_save)
    loaded = FaissIndex.load(path)
    monkeypatch.setattr(np, "load", real_load)
    assert saves, "the save did not overlap the load"
    np.testing.assert_allclose(loaded.vectors(ids), items, atol=1e-6)
    np.testing.assert_array_equal(loaded.published(ids), published.astype("datetime64[s]"))


@pytest.mark.parametrize("damage", ["empty alive.npy", "header of news_ids.npy", "header of published.npy"])
def test_a_damaged_row_file_is_an_index_format_error(saved, damage):
    # np.load raises EOFError on an empty file and tokenize.TokenError or SyntaxError on a
    # damaged header: they escaped as "aborted" (click's reading of EOFError) or exit 2, and the
    # nightly, which rebuilds an index it cannot read, never saw an IndexFormatError.
    _, path = saved
    if damage == "empty alive.npy":
        (path / "alive.npy").write_bytes(b"")
    else:
        target = path / damage.split()[-1]
        data = bytearray(target.read_bytes())
        data[10] ^= 0xFF  # inside the header's dict literal
        target.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match=rf"{damage.split()[-1]}: unreadable"):
        FaissIndex.load(path)


def test_an_index_replaced_during_every_read_is_busy_not_damaged(saved, monkeypatch):
    # Reported as damaged, the nightly would have rebuilt it and `similar` said to rebuild it.
    from recsys.index import IndexBusyError
    from recsys.index import folder

    _, path = saved

    def replaced(self, name, parse=bytes):
        raise folder.FolderReplaced

    monkeypatch.setattr(folder.SavedFolder, "read", replaced)
    with pytest.raises(IndexBusyError, match="replaced by another save each of the 5 times it was read; run again"):
        FaissIndex.load(path)
    assert not issubclass(IndexBusyError, IndexFormatError)
