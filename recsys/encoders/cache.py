"""On-disk cache of frozen-encoder features, keyed by news id and content hash.

Layout (one folder per encoder pair, so vectors of one encoder are never read as another's)::

    <root_dir>/<text name>__<image name>__<sha256 of both infos, 12 hex>/
        manifest.json                      format, text_encoder and image_encoder infos
        shard-<time_ns, 20 digits>-<random>.npz   one per ``put``, never modified

A shard holds ``news_ids`` and ``content_hashes`` (unicode), ``text`` (n, text_dim) float32,
``image`` (n, image_dim) float16 and ``has_image`` (n,) bool. Shards are written to a
temporary name and renamed, so a killed run loses at most the batch it was writing. When an
article is stored again (its content changed), the newer shard wins; ``compact`` rewrites the
live entries into one shard. A shard found damaged (disk damage: renames make torn shards
impossible) is moved aside and its articles count as not cached, so they are encoded again.

A cache this user cannot write (a read-only workspace) still serves what it holds: the
first failed write is logged, and the articles it lacks are encoded without being stored for
the rest of the command. A write error that may pass (a full disk, an I/O error) loses only
that batch: it is logged once per kind of error and every later batch is tried again.

Housekeeping on every open: temporary files that killed writers left (``.*.tmp``) are
removed after an hour, and the folders of other encoder pairs after 30 days unused (opening a
cache marks its folder used), so changing encoder settings does not keep the old features
on disk for ever.

Image features are stored as float16: MobileNet's pooled activations lie in [0, 6], where
float16 keeps a relative error under 1e-3 (cosine to the float32 vector above 0.9999), and it
halves the disk and the memory of the largest column. Text vectors stay float32.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import tokenize
import uuid
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from recsys.atomic import remove_stale
from recsys.encoders.item_features import EncoderInfo
from recsys.errors import DamagedFileError, ModelMismatchError, NotFoundError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
MANIFEST_NAME = "manifest.json"
_SHARD_GLOB = "shard-*.npz"
_IMAGE_DTYPE = np.float16
_SHARD_KEYS = ("news_ids", "content_hashes", "text", "image", "has_image")
# Write errors that last the whole command: a cache this user can only read. Any other (a full
# disk that a cleanup frees, an I/O error) may pass, and a first MIND-large encode takes
# hours: giving up on the first one would store nothing that a later kill could keep.
_LASTING_WRITE_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
# What the parsers of a damaged .npz raise (zip structure, member CRC, compression, the .npy
# header read as a Python literal before the CRC check in large members): such a shard is moved
# aside. Any other error leaves it out for the command but in place.
# RuntimeError: zipfile's "is encrypted", a flipped flag bit.
_SHARD_DAMAGE = (zipfile.BadZipFile, zlib.error, ValueError, KeyError, EOFError, NotImplementedError, SyntaxError,
                 tokenize.TokenError, RuntimeError)
# After a full disk a write is tried again only when the disk has room for twice the shard: each
# try fills the disk to the last byte before it fails, and the store and the index share it.
# (Not EDQUOT: statvfs does not see a user's quota, so free space cannot tell when to retry.)
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC})
# A temporary file unchanged this long belongs to a killed writer (a live one writes a shard
# in seconds and keeps its mtime fresh).
STALE_TEMP_SECONDS = 3600
# Another encoder pair's folder unused this long is removed: only a model version trained on
# those encoders reads it, and it would encode its articles again (minutes), not fail.
UNUSED_FOLDER_SECONDS = 30 * 24 * 3600


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:48] or "encoder"


def cache_folder_name(text_info: EncoderInfo, image_info: EncoderInfo) -> str:
    """Folder name of an encoder pair: readable names plus a digest of both full infos."""
    both = json.dumps({"text": text_info.to_dict(), "image": image_info.to_dict()}, sort_keys=True)
    digest = hashlib.sha256(both.encode()).hexdigest()[:12]
    return f"{_slug(text_info.name)}__{_slug(image_info.name)}__{digest}"


def _shard_time(shard: Path) -> int | None:
    """The time_ns a shard's name carries (``shard-<time_ns>-<random>.npz``), None if another name."""
    match = re.fullmatch(r"shard-(\d{20})-[0-9a-f]+\.npz", shard.name)
    return int(match.group(1)) if match else None


def _write_atomically(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary sibling of ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class FeatureCache:
    """Append-only store of text and image features for one pair of encoders.

    A folder that cannot be created (a read-only workspace) gives an empty cache that
    stores nothing, with a warning naming it: the cache only saves encoding time.

    Args:
        root_dir: the cache root (the workspace's ``cache/features``); created if missing.
        text_info: the text encoder the vectors come from.
        image_info: the image encoder the vectors come from.

    Raises:
        ModelMismatchError: the folder's manifest records other encoders, or cannot be read.
    """

    def __init__(self, root_dir: str | Path, text_info: EncoderInfo, image_info: EncoderInfo) -> None:
        self.root_dir = Path(root_dir)
        self.text_info, self.image_info = text_info, image_info
        self.path = self.root_dir / cache_folder_name(text_info, image_info)
        # news id -> (shard index, row, content hash), the newest shard winning.
        self._index: dict[str, tuple[int, int, str]] = {}
        self._shards: list[Path] = []
        self._unreadable: set[Path] = set()  # left out for good by this process
        self._read_only: OSError | None = None  # set by a lasting write error: nothing more is stored
        self._warned_errnos: set[int | None] = set()
        self._disk_full = False  # the last write found the disk full
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # no folder: no write can succeed
            self._cannot_write(err, lasting=True)
            return
        self._check_manifest()
        self._housekeep()
        self._list_shards()

    def _list_shards(self) -> None:
        self._index, self._shards = {}, []
        for shard in sorted(self.path.glob(_SHARD_GLOB)):
            if shard not in self._unreadable:
                self._index_shard(shard)

    def _housekeep(self) -> None:
        """Mark this folder used; remove killed writers' temporary files and the folders of
        other encoder pairs unused for ``UNUSED_FOLDER_SECONDS`` (only folders with a cache
        manifest: nothing else under the root is touched)."""
        try:
            os.utime(self.path)
        except OSError as err:  # a read-only cache still serves; it only looks unused to others
            log.warning("could not mark feature cache %s used (%s)", self.path, err)
        remove_stale(self.path.glob(".*.tmp"), STALE_TEMP_SECONDS, why="left by a writer that did not finish")
        remove_stale(self._other_folders(), UNUSED_FOLDER_SECONDS, why="features of other encoders, unused for 30 days")

    def _other_folders(self) -> list[Path]:
        """Cache folders of other encoder pairs beside this one; a folder this user cannot read
        is passed over (it is someone else's to tidy), never an error."""
        others = []
        try:
            entries = list(self.root_dir.iterdir())
        except OSError as err:
            log.warning("could not list feature caches in %s (%s)", self.root_dir, err)
            return others
        for p in entries:
            try:
                if p.name != self.path.name and p.is_dir() and not p.is_symlink() and (p / MANIFEST_NAME).is_file():
                    others.append(p)
            except OSError:
                continue
        return others

    def _manifest(self) -> dict:
        return {
            "format": CACHE_FORMAT,
            "text_encoder": self.text_info.to_dict(),
            "image_encoder": self.image_info.to_dict(),
            "image_dtype": np.dtype(_IMAGE_DTYPE).name,
        }

    def _check_manifest(self) -> None:
        path = self.path / MANIFEST_NAME
        expected = self._manifest()
        if not path.exists():
            try:
                _write_atomically(path, lambda f: f.write(json.dumps(expected, indent=2, sort_keys=True).encode()))
            except OSError as err:  # the folder name alone (a digest of both infos) keeps encoders apart
                self._cannot_write(err)
            return
        try:
            found = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelMismatchError(f"feature cache manifest {path} cannot be read ({exc}); delete {self.path}") from exc
        for key in ("format", "text_encoder", "image_encoder", "image_dtype"):
            if found.get(key) != expected[key]:
                raise ModelMismatchError(
                    f"feature cache {self.path} holds {key} {found.get(key)!r}, but {expected[key]!r} was asked for; "
                    "features of one encoder are never read as another's"
                )

    def _index_shard(self, shard: Path) -> None:
        try:
            with np.load(shard, allow_pickle=False) as z:
                ids, hashes = z["news_ids"], z["content_hashes"]
        except FileNotFoundError:  # merged into a newer shard by another process's compact
            return
        except MemoryError:  # the machine's, not the file's
            raise
        except Exception as exc:
            # Every error leaves the shard out (re-encoding heals it): a list of types always
            # missed one. _leave_out moves aside only what damage explains (_SHARD_DAMAGE).
            self._leave_out(shard, exc)
            return
        number = len(self._shards)
        self._shards.append(shard)
        for row, (news_id, content_hash) in enumerate(zip(ids.tolist(), hashes.tolist())):
            self._index[news_id] = (number, row, content_hash)

    def _cannot_write(self, err: OSError, *, lasting: bool = False) -> None:
        """Note a failed write, warning once per errno (not once per batch). A lasting error (a
        cache this user can only read) stops all later writes; after any other, each later
        write is tried again."""
        lasting = lasting or err.errno in _LASTING_WRITE_ERRNOS
        if err.errno not in self._warned_errnos:
            self._warned_errnos.add(err.errno)
            if lasting:
                log.warning(
                    "feature cache %s cannot be written (%s); articles it lacks are encoded without being stored",
                    self.path, err,
                )
            else:
                log.warning(
                    "feature cache %s could not be written (%s); later writes are tried again, and articles "
                    "not stored are encoded again by the next command", self.path, err,
                )
        if lasting:
            self._read_only = err
        self._disk_full = err.errno in _NO_SPACE_ERRNOS

    def _room_for(self, num_bytes: int) -> bool:
        """After a full disk: whether it has room for ``num_bytes`` twice now."""
        if not self._disk_full:
            return True
        try:
            return shutil.disk_usage(self.path).free >= 2 * num_bytes
        except OSError:
            return False

    def _leave_out(self, shard: Path, exc: Exception) -> None:
        """Stop using an unreadable shard: its articles count as not cached (re-encoding heals it).

        A damaged one is moved aside under a temporary name, so that later commands neither
        warn again nor encode its articles again (housekeeping removes it after an hour, and
        compaction only deletes shards it could index). One that cannot be read for another
        reason (permissions, an I/O error that may pass, an error no damage explains) is left
        where it is.
        """
        self._unreadable.add(shard)
        if not isinstance(exc, _SHARD_DAMAGE):
            log.warning("feature cache shard %s is unreadable (%s: %s); its articles will be encoded again", shard,
                        type(exc).__name__, exc)
            return
        aside = shard.with_name(f".{shard.name}.unreadable.tmp")
        try:
            os.replace(shard, aside)
        except FileNotFoundError:  # another process moved it aside or compacted it first
            return
        except OSError as err:
            log.warning(
                "feature cache shard %s is unreadable (%s); its articles will be encoded again "
                "(it could not be moved aside: %s)", shard, exc, err,
            )
            return
        log.warning(
            "feature cache shard %s is unreadable (%s); moved it aside to %s and its articles will be encoded again",
            shard, exc, aside.name,
        )

    def __len__(self) -> int:
        """Number of articles with cached features."""
        return len(self._index)

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @property
    def num_left_out(self) -> int:
        """Shards this cache stopped using because they could not be read (damaged, or an I/O error)."""
        return len(self._unreadable)

    def lookup(self, news_ids: Sequence[str], content_hashes: Sequence[str]) -> np.ndarray:
        """Which articles are cached with exactly this content.

        Args:
            news_ids: n news ids.
            content_hashes: n content hashes, aligned with ``news_ids``.

        Returns:
            (n,) bool, True where the id is cached with the same content hash.
        """
        if len(news_ids) != len(content_hashes):
            raise ValueError(f"lookup got {len(news_ids)} news ids but {len(content_hashes)} content hashes")
        found = np.zeros(len(news_ids), dtype=bool)
        for i, (news_id, content_hash) in enumerate(zip(news_ids, content_hashes)):
            entry = self._index.get(str(news_id))
            found[i] = entry is not None and entry[2] == str(content_hash)
        return found

    def load(self, news_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cached features of articles, in the order asked.

        Args:
            news_ids: n news ids, all cached.

        Returns:
            text: (n, text_dim) float32.
            image: (n, image_dim) float32 (stored as float16); zeros where ``has_image`` is False.
            has_image: (n,) bool.

        Raises:
            NotFoundError: some ids are not cached.
            DamagedFileError: a shard holding some of them turned out to be unreadable; it is
                left out from now on (moved aside when damaged), so ``lookup`` no longer finds
                its articles: look them up again and encode those.
        """
        try:
            return self._load(news_ids)
        except FileNotFoundError:
            # Another process compacted the cache after this one listed it: list it again.
            self._list_shards()
            return self._load(news_ids)

    def _load(self, news_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        missing = [str(i) for i in news_ids if str(i) not in self._index]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise NotFoundError(f"feature cache {self.path} has no features for news ids {shown}")
        n = len(news_ids)
        text = np.empty((n, self.text_info.dim), dtype=np.float32)
        image = np.empty((n, self.image_info.dim), dtype=np.float32)
        has_image = np.empty(n, dtype=bool)
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for out_row, news_id in enumerate(news_ids):
            number, row, _ = self._index[str(news_id)]
            by_shard.setdefault(number, []).append((out_row, row))
        for number, pairs in by_shard.items():
            out_rows, rows = (np.array(x, dtype=np.int64) for x in zip(*pairs))
            shard = self._shards[number]
            try:
                with np.load(shard, allow_pickle=False) as z:
                    text[out_rows] = z["text"][rows]
                    image[out_rows] = z["image"][rows]
                    has_image[out_rows] = z["has_image"][rows]
            except FileNotFoundError:
                raise  # compacted by another process: the caller lists the cache again
            except MemoryError:
                raise
            except Exception as exc:  # any error, as in _index_shard
                # Indexing read only the ids and hashes; a damaged vector member shows up here.
                self._leave_out(shard, exc)
                self._list_shards()
                raise DamagedFileError(
                    f"feature cache shard {shard} is unreadable ({type(exc).__name__}: {exc}); "
                    "its articles are no longer cached and must be encoded again"
                ) from exc
        return text, image, has_image

    @staticmethod
    def as_stored(image: np.ndarray) -> np.ndarray:
        """Image features as ``load`` returns them once stored: float32 with float16 rounding."""
        return np.asarray(image, dtype=np.float32).astype(_IMAGE_DTYPE).astype(np.float32)

    def put(
        self,
        news_ids: Sequence[str],
        content_hashes: Sequence[str],
        text: np.ndarray,
        image: np.ndarray,
        has_image: np.ndarray,
    ) -> None:
        """Store the features of n articles as one new shard (atomically).

        When the cache cannot be written (read-only, disk full), nothing is stored, nothing is
        left half-written, and a warning names the folder the first time each kind of error
        occurs; the caller keeps the features it holds. ``lookup`` then does not find these
        articles. After an error that may pass (anything but a cache this user can only
        read: ``EROFS``, ``EACCES``, ``EPERM``) the next ``put`` tries again.

        Args:
            news_ids: n news ids, unique.
            content_hashes: n content hashes.
            text: (n, text_dim) float.
            image: (n, image_dim) float; rows where ``has_image`` is False are stored as zeros.
            has_image: (n,) bool.

        Raises:
            ModelMismatchError: a feature dimension differs from the cache's encoders.
            ValueError: the arrays are not row-aligned, or an id repeats.
        """
        ids = np.array([str(i) for i in news_ids], dtype=str)
        hashes = np.array([str(h) for h in content_hashes], dtype=str)
        text = np.asarray(text, dtype=np.float32)
        image = np.asarray(image, dtype=np.float32)
        has_image = np.asarray(has_image, dtype=bool)
        n = len(ids)
        for name, array in (("content_hashes", hashes), ("text", text), ("image", image), ("has_image", has_image)):
            if len(array) != n:
                raise ValueError(f"put got {n} news ids but {len(array)} rows of {name}")
        if n == 0:
            return
        if len(np.unique(ids)) != n:
            raise ValueError("put got repeated news ids in one batch")
        for name, array, info in (("text", text, self.text_info), ("image", image, self.image_info)):
            if array.ndim != 2 or array.shape[1] != info.dim:
                raise ModelMismatchError(
                    f"{name} features have shape {array.shape}, but encoder {info.name} of this cache has dim {info.dim}"
                )
        image = np.where(has_image[:, None], image, 0.0).astype(_IMAGE_DTYPE)
        self._store_shard(ids, hashes, text, image, has_image,
                          num_bytes=text.nbytes + image.nbytes + ids.nbytes + hashes.nbytes)

    def _store_shard(self, ids, hashes, text, image, has_image, *, num_bytes: int, time_ns: int | None = None) -> bool:
        """``_write_shard`` unless this cache cannot be written now (read-only, or a full disk
        without room for ``num_bytes`` twice); a failed write is noted (``_cannot_write``).
        Returns whether the shard was written."""
        if self._read_only is not None or not self._room_for(num_bytes):
            return False
        try:
            self._write_shard(ids, hashes, text, image, has_image, time_ns=time_ns)
        except OSError as err:
            self._cannot_write(err)
            return False
        self._disk_full = False
        return True

    def _write_shard(self, ids, hashes, text, image, has_image, *, time_ns: int | None = None) -> Path:
        stamp = time.time_ns() if time_ns is None else time_ns
        path = self.path / f"shard-{stamp:020d}-{uuid.uuid4().hex[:8]}.npz"
        arrays = dict(zip(_SHARD_KEYS, (ids, hashes, text, image, has_image)))
        _write_atomically(path, lambda f: np.savez(f, **arrays))
        self._index_shard(path)
        return path

    def compact(self) -> None:
        """Rewrite the live entries into one shard and delete the older shards.

        Safe against a crash at any point: the merged shard is in place before any old shard
        is removed, and it is the newest, so duplicates left behind are shadowed by it. A
        process that listed the old shards before (an evaluate beside the nightly job) finds
        one gone and lists the cache again (``load``). A cache this user can only read is left
        as it is; a merged shard that cannot be written leaves the old ones, with ``put``'s
        warning.
        """
        if len(self._shards) <= 1 or self._read_only is not None:
            return
        old = list(self._shards)
        try:
            size = sum(p.stat().st_size for p in old)
        except FileNotFoundError:  # another process compacted first
            self._list_shards()
            return
        if not self._room_for(size):  # after a full disk: the largest write of all would refill it
            return  # (checked before the whole cache is read into memory)
        ids = sorted(self._index)
        hashes = [self._index[i][2] for i in ids]
        try:
            text, image, has_image = self._load(ids)
        except FileNotFoundError:  # another process compacted first: its shard holds these entries
            self._list_shards()
            return
        except DamagedFileError:  # left out; the next compaction merges the readable shards
            return
        # Named just after the newest shard it merges, not "now": a shard another process wrote
        # meanwhile (an article encoded again) still sorts after it and wins.
        newest = max((_shard_time(p) for p in old), default=None)
        self._index, self._shards = {}, []
        if not self._store_shard(
            np.array(ids, dtype=str), np.array(hashes, dtype=str), text, image.astype(_IMAGE_DTYPE), has_image,
            num_bytes=size, time_ns=None if newest is None else newest + 1,
        ):  # nothing written: the old shards still hold every entry
            self._list_shards()
            return
        for shard in old:
            shard.unlink(missing_ok=True)
        self._list_shards()  # with any shard written meanwhile
