"""recsys.index: nearest-neighbour search over item embeddings, keyed by news id."""

from recsys.index.faiss_index import DEFAULT_PARAMS, KINDS, FaissIndex, Hits
from recsys.index.folder import IndexBusyError, IndexFormatError

__all__ = ["DEFAULT_PARAMS", "KINDS", "FaissIndex", "Hits", "IndexBusyError", "IndexFormatError"]
