"""recsys: multimodal news recommendation."""

import hashlib
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("recsys")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "unknown"

# Before anything imports TensorFlow: its start-up lines are filtered out of stderr (tensorflow_startup).
from recsys import tensorflow_startup  # noqa: E402

tensorflow_startup.install()


def source_fingerprint(package_dir: Path) -> str:
    """sha256 (hex) over the relative path and bytes of every ``.py`` file under ``package_dir``.

    Two trees with the same sources give the same value; caches (``__pycache__``), hidden
    names (an editor's ``.#cli.py`` lock, often a link to nothing) and links to nothing are
    not read: no import reads them either. A tree shipped without sources (compiled, the
    ``.py`` files removed) is read by its ``.pyc`` files instead, or every release would give
    the hash of nothing; the same hidden names and links to nothing are passed over there.
    """
    def code(pattern: str, *, skip: tuple[str, ...] = ()) -> list[Path]:
        return [p for p in package_dir.rglob(pattern) if p.is_file()
                and not any(part in skip or part.startswith(".") for part in p.relative_to(package_dir).parts)]

    digest = hashlib.sha256()
    for path in sorted(code("*.py", skip=("__pycache__",)) or code("*.pyc")):
        digest.update(path.relative_to(package_dir).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@cache
def _this_source() -> str:
    return source_fingerprint(Path(__file__).resolve().parent)[:16]


def release() -> str:
    """The running code: ``<version>+<source fingerprint>``.

    The package version alone stays the same across commits (an editable install, a release
    that forgot to bump it), so the nightly's plan could not tell an upgrade from a retry.
    """
    return f"{__version__}+{_this_source()}"
