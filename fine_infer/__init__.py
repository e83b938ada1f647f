"""fine-infer: inference for fine-grained fashion retrieval models.

This is the public API::

    import fine_infer
    session = fine_infer.load("bundle/")          # ONNX Runtime (no torch needed)
    vectors = session.embed_images(["a.jpg"])     # float32, unit rows
    index = fine_infer.Index(vectors.shape[1])    # exact inner-product top-k
"""

from __future__ import annotations

from typing import Any

from fine_infer.errors import (
    BackendUnavailableError,
    BundleError,
    CheckpointError,
    ConfigError,
    ExportError,
    FineInferError,
    IndexFileError,
    InputError,
)
from fine_infer.runtime import Session, load

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Index pulls in the native module; load it on first use so `import fine_infer` stays light.
    if name == "Index":
        from fine_infer.index import Index

        return Index
    raise AttributeError(f"module 'fine_infer' has no attribute {name!r}")


__all__ = [
    "BackendUnavailableError",
    "BundleError",
    "CheckpointError",
    "ConfigError",
    "ExportError",
    "FineInferError",
    "Index",
    "IndexFileError",
    "InputError",
    "Session",
    "__version__",
    "load",
]
