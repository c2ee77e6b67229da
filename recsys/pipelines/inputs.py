"""Checks of the paths a command is given, made before any work so that a wrong path is one
clear line (exit 1) rather than an internal error after the store and models are loaded."""

from __future__ import annotations

import os
from pathlib import Path

from recsys.errors import RecsysError


def check_file(option: str, path: Path | str) -> None:
    """Raises RecsysError unless ``path`` is a regular file (not a folder, pipe or device)."""
    path = Path(path)
    if not path.is_file():
        raise RecsysError(f"{option} {path}: " + ("not a regular file" if path.exists() else "no such file"))


def check_folder(option: str, path: Path | str) -> None:
    """Raises RecsysError unless ``path`` is a folder."""
    path = Path(path)
    if not path.is_dir():
        raise RecsysError(f"{option} {path}: " + ("not a folder" if path.exists() else "no such folder"))


def check_images_go_with_news(command: str, news: Path | str | None, images: Path | str | None) -> None:
    """Raises RecsysError for ``--images`` without ``--news``: covers are read only for the
    articles of a news.tsv, so the folder would be ignored without a word."""
    if images is not None and news is None:
        raise RecsysError(f"{command} --images {images} goes with --news: covers are read only for the articles of "
                          "a news.tsv, so without one they would be ignored")


def check_source_goes_with_behaviors(command: str, behaviors: Path | str | None, source: str | None) -> None:
    """Raises RecsysError for ``--source`` without ``--behaviors``: a source names the
    impressions of a behaviors file, so without one it would be ignored without a word."""
    if source is not None and behaviors is None:
        raise RecsysError(f"{command} --source {source!r} goes with --behaviors: it names the impressions of a "
                          "behaviors file, so without one it would be ignored")


def check_writable(option: str, value: Path | str, folder: Path) -> None:
    """Raises RecsysError when files cannot be created in ``folder`` (permissions, a read-only
    file system), which would otherwise surface only once everything is scored."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RecsysError(f"{option} {value}: folder {folder} is not writable")


def check_output_folder(option: str, path: Path | str) -> Path:
    """Raises RecsysError unless ``path`` is, or can be created as, a folder this process can
    write into; returns the nearest folder that exists (``path`` itself or an ancestor)."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():
            # An unmounted share behind a link: mkdir fails on it only after the night's ranking.
            raise RecsysError(f"{option} {path}: {existing} is a link to {os.readlink(existing)}, which does not exist")
        existing = existing.parent
    if not existing.is_dir():
        raise RecsysError(f"{option} {path}: {existing} is a file, expected a folder")
    check_writable(option, path, existing)
    return existing
