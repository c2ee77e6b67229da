"""recsys: multimodal news recommendation."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("recsys")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "unknown"
