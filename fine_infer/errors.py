"""The exceptions fine-infer raises. Every message names the problem and what to do about it."""

from __future__ import annotations


class FineInferError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class ConfigError(FineInferError, ValueError):
    """An unknown arch, preset, graph or config field, or an option that does not fit."""


class CheckpointError(FineInferError):
    """A checkpoint that cannot be read or whose keys do not match the model."""


class BundleError(FineInferError):
    """A bundle that is missing, incomplete, tampered with or of an unknown format version."""


class InputError(FineInferError, ValueError):
    """Bad user input: a corrupt image, empty or over-long text, a wrong shape or dtype, NaN."""


class ExportError(FineInferError):
    """The export failed, or one of its gates (checker, parity, lint) did not pass."""


class BackendUnavailableError(FineInferError):
    """A backend (TensorRT, CUDA, Triton) is not installed or has no device here."""


class IndexFileError(FineInferError):
    """An index file that is truncated, altered or of an unknown format version."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``exc`` as one line for a user: the first line of its message (at most ``limit`` characters), or the name of its
    type when it has no message (quantisers and converters raise many types with multi-line texts)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
