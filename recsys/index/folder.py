"""The saved index folder: its files and manifest, replaced atomically, read consistently.

Layout of a saved index (``FaissIndex.save`` writes it): index.faiss, news_ids.npy (str),
published.npy (datetime64[s]), alive.npy (bool, False for tombstones), manifest.json.

A save writes a whole new folder beside the old one and renames it into place
(``swap_in``), so a reader finds either the previous complete index or the new one; a save
killed between its two renames leaves the old folder moved aside, which the next load, save or
existence check puts back (``restore_interrupted_save``). A read goes through one handle on
the folder (``SavedFolder``), so every file it reads is of one save.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from recsys.atomic import age_seconds, remove_stale
from recsys.errors import NotFoundError, RecsysError

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "news_ids.npy"
PUBLISHED_FILE = "published.npy"
ALIVE_FILE = "alive.npy"
MANIFEST_FILE = "manifest.json"
INDEX_FILES = (INDEX_FILE, IDS_FILE, PUBLISHED_FILE, ALIVE_FILE, MANIFEST_FILE)
FORMAT = "recsys.faiss_index"
FORMAT_VERSION = 1
MANIFEST_KEYS = (
    "format", "format_version", "kind", "params", "metric", "dim", "num_items", "num_rows",
    "num_tombstones", "exact_max_items", "built_at", "build_seconds", "saved_at", "faiss_version",
    "calibration",
)
# Written since the nightly began to follow "auto"; an index saved before lacks it.
OPTIONAL_MANIFEST_KEYS = ("requested_kind",)
# Leftovers of a save killed mid-way (``.<name>.tmp-*``, ``.<name>.old-*``) older than this are
# removed by the next save; a younger one may belong to a save still running.
STALE_SAVE_SECONDS = 3600
# A missing index is restored from a moved-aside one only after this long: a save still
# between its two renames (microseconds, normally) must not have its old index put back.
RESTORE_GRACE_SECONDS = 60
# Times a load reads the folder again when a save replaced it mid-read (each read is fast: a
# save landing during every one of them means saves without pause).
READ_ATTEMPTS = 5


class IndexFormatError(RecsysError):
    """A saved index directory is incomplete, corrupt or of an unknown format."""


class IndexBusyError(RecsysError):
    """Saves replaced the index folder while it was read, every time: nothing wrong with it."""


def read_published(directory: str | os.PathLike) -> tuple[np.ndarray, np.ndarray] | None:
    """``(news_ids, published)`` of the live articles of a saved index, read without loading
    the FAISS index; None when ``directory`` holds no complete saved index."""
    directory = Path(directory)
    if saved_at(directory) is None:
        return None
    try:
        ids, published, alive = read_saved(directory, read_rows)
    except NotFoundError:
        return None
    if not len(ids) == len(published) == len(alive):
        raise IndexFormatError(f"{directory}: {len(ids)} ids, {len(published)} publication times and {len(alive)} "
                               "flags, expected one of each per row")
    return ids[alive], published[alive]


def read_saved(directory: Path, read):
    """``read(folder)`` of the saved index in ``directory`` (a ``SavedFolder``), read again when
    a save replaced the folder meanwhile, or waited for when a save is between its two renames.

    Raises:
        NotFoundError: no index folder (and no save under way).
        IndexBusyError: saves replaced the folder during every attempt.
    """
    for attempt in range(READ_ATTEMPTS):
        try:
            with SavedFolder(directory) as folder:
                return read(folder)
        except FolderReplaced:
            continue  # a save swapped a new folder in while this one was read: read that one
        except NotFoundError:
            if attempt + 1 == READ_ATTEMPTS or not _saving_now(directory):
                raise
            time.sleep(0.01)  # a save between its two renames (microseconds): its folder comes
    raise IndexBusyError(f"{directory}: replaced by another save each of the {READ_ATTEMPTS} times it was read; "
                         "run again")


class FolderReplaced(Exception):
    """A file of the folder being read was gone because a save replaced the folder meanwhile."""


class SavedFolder:
    """One saved index folder, every file read through one handle on it.

    A save writes a whole new folder and renames it over the old one, then deletes the old one.
    Read path by path, a reader that overlapped a save mixed the files of two saves (another
    article's vector under an id, or a false "damaged"). Through the handle opened first, every
    file read is of one save; a file deleted with the replaced folder before it was opened
    raises ``FolderReplaced``, and the caller reads the new folder.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        try:
            self._fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError) as err:
            raise NotFoundError(f"no index directory at {directory}") from err

    def __enter__(self) -> SavedFolder:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self._fd)

    def read(self, name: str, parse=bytes):
        """``parse(file)`` of file ``name`` opened for reading (by default its bytes).

        Raises:
            IndexFormatError: the file is missing (and the folder was not replaced) or unreadable.
            FolderReplaced: the file went with a folder a save replaced.
        """
        try:
            with open(name, "rb", opener=lambda path, flags: os.open(path, flags, dir_fd=self._fd)) as file:
                return file.read() if parse is bytes else parse(file)
        except FileNotFoundError as err:
            if self._replaced():
                raise FolderReplaced from err
            what = "expected the index manifest" if name == MANIFEST_FILE else "the index directory is incomplete"
            raise IndexFormatError(f"{self.directory / name}: missing, {what}") from err
        except OSError as err:
            raise IndexFormatError(f"{self.directory / name}: unreadable ({err})") from err

    def _replaced(self) -> bool:
        try:
            now = os.stat(self.directory)
        except FileNotFoundError:
            return True  # between a save's two renames
        mine = os.fstat(self._fd)
        return (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino)


def parse_manifest(folder: SavedFolder) -> dict:
    """The folder's manifest, checked for format, version and keys."""
    manifest_path = folder.directory / MANIFEST_FILE
    try:
        manifest = json.loads(folder.read(MANIFEST_FILE).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IndexFormatError(f"{manifest_path}: unreadable ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{manifest_path}: field 'format' is not {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexFormatError(
            f"{manifest_path}: field 'format_version' is {manifest.get('format_version')!r}, "
            f"expected {FORMAT_VERSION}"
        )
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise IndexFormatError(f"{manifest_path}: fields {missing} are missing")
    return manifest


def read_rows(folder: SavedFolder) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-row arrays of a saved index: ids, publication times, live flags."""
    return (_read_npy(folder, IDS_FILE, "U"), _read_npy(folder, PUBLISHED_FILE, "M").astype("datetime64[s]"),
            _read_npy(folder, ALIVE_FILE, "b"))


def _read_npy(folder: SavedFolder, name: str, kind: str) -> np.ndarray:
    path = folder.directory / name
    data = folder.read(name)
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except MemoryError:
        raise
    except Exception as err:  # a damaged header raises EOFError, tokenize.TokenError, SyntaxError...
        raise IndexFormatError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    if array.ndim != 1 or array.dtype.kind != kind:
        raise IndexFormatError(f"{path}: holds {array.dtype} of shape {array.shape}, expected a 1-d {kind!r} array")
    return array


def is_index_directory(directory: Path) -> bool:
    if not directory.is_dir():
        return False
    # Only recsys's own file names: the guard is for a folder of someone else's files.
    return {p.name for p in directory.iterdir()} <= set(INDEX_FILES)


def swap_in(new: Path, directory: Path) -> None:
    """Rename a complete temporary directory to its final name, replacing an old index."""
    if not directory.exists():
        os.replace(new, directory)
    else:
        old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex}"
        os.replace(directory, old)
        try:
            os.replace(new, directory)
        except BaseException:
            os.replace(old, directory)
            raise
        try:
            shutil.rmtree(old)  # a real folder: a linked index is followed (followed)
        except OSError as err:  # the new index is in place; a later save removes the leftover
            log.warning("could not remove %s (%s)", old, err)
    fsync(directory.parent)


def followed(directory: Path) -> Path:
    """The folder a symlinked index directory points to (a workspace that keeps its index on
    another disk): saves replace that folder beside itself, so the link stays and keeps
    pointing at the current index; a save killed between its renames is put back there too."""
    return Path(os.path.realpath(directory)) if directory.is_symlink() else directory


def _saves_beside(directory: Path, kind: str) -> list[Path]:
    """``.<name>.<kind>-*`` siblings of ``directory`` (kind "tmp" or "old")."""
    if not directory.parent.is_dir():
        return []
    return [p for p in directory.parent.glob(f".{directory.name}.{kind}-*") if p.is_dir()]


def _moved_aside(directory: Path) -> list[tuple[Path, bool]]:
    """The ``.<name>.old-*`` folders saves moved aside, each with whether it is younger than
    ``RESTORE_GRACE_SECONDS``: a young one may belong to a save still between its two renames,
    an older one to a killed save. One removed meanwhile (its save finished) is left out."""
    found = []
    for old in _saves_beside(directory, "old"):
        try:
            found.append((old, age_seconds(old) < RESTORE_GRACE_SECONDS))
        except FileNotFoundError:
            continue
    return found


def _saving_now(directory: Path) -> bool:
    """Whether a save may be between its two renames (a folder moved aside just now)."""
    return any(young for _, young in _moved_aside(directory))


def saved_at(directory: Path) -> str | None:
    """The manifest's ``saved_at`` of a complete saved index (every file, a manifest that
    parses), else None."""
    if not all((directory / name).is_file() for name in INDEX_FILES):
        return None
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return str(manifest.get("saved_at", "")) if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def restore_interrupted_save(directory: Path) -> None:
    """Put back the index a save moved aside before it died (between ``swap_in``'s renames).

    The index as it was before that save comes back: the caller redoes its change (the nightly
    refresh adds whatever differs from the index). Only a complete index moved aside more than
    ``RESTORE_GRACE_SECONDS`` ago is taken (a younger one may belong to a save still between its
    renames), the most recently saved if there are several. A concurrent restore may win.
    """
    if directory.exists() or directory.is_symlink():
        return
    candidates = []
    for old, young in _moved_aside(directory):
        when = None if young else saved_at(old)
        if when is not None:
            candidates.append((when, old.name, old))
    if not candidates:
        return
    old = max(candidates)[2]
    try:
        os.replace(old, directory)
    except OSError:  # another process restored it first
        if directory.exists():
            return
        raise
    fsync(directory.parent)
    log.warning("%s was missing: restored the index a killed save had moved aside (%s)", directory, old.name)


def remove_stale_saves(directory: Path) -> None:
    """Remove the temporary and moved-aside folders that killed saves left beside ``directory``."""
    leftovers = _saves_beside(directory, "tmp") + _saves_beside(directory, "old")
    remove_stale(leftovers, STALE_SAVE_SECONDS, why="left by a save that did not finish")


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
