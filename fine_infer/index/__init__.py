"""Search: ``fine_infer.index.Index``, exact inner-product top-k over float32 / float16 / int8 storage.

This is the public API of the package; the native core (``fine_infer._native``, built from ``cpp/``) is reached only
through :mod:`fine_infer.index._native_search`.
"""

from fine_infer.index._checks import MAX_K
from fine_infer.index._index import Index

__all__ = ["MAX_K", "Index"]
