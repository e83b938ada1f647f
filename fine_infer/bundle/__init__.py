"""The bundle: a directory of ONNX graphs, tokenizer, weights and ``manifest.json`` with a sha256 per file.

This package owns the format. Export writes bundles with :class:`BundleWriter`; the runtime reads them with
:func:`read_bundle`, which verifies every checksum first, so a tampered or truncated file is a clear
:class:`~fine_infer.errors.BundleError` and never a crash inside ONNX Runtime. A bundle is assembled in a hidden temp
directory beside its destination and renamed into place at the end: an export that fails leaves nothing
half-written, and an existing bundle is replaced only by a complete one. Every later change of a manifest (tune,
validate, engine builds) goes through :func:`update_manifest`. Every file name a manifest lists stays inside the
bundle (:mod:`~fine_infer.bundle.paths`); :mod:`~fine_infer.bundle.signing` signs and verifies whole bundles with
release keys, the manifest included.

- :mod:`~fine_infer.bundle.manifest`: the manifest's fields; :mod:`~fine_infer.bundle.reader`: open and verify;
  :mod:`~fine_infer.bundle.writer`: write and rewrite; :mod:`~fine_infer.bundle.variants`: which file runs a graph.
"""

from fine_infer.bundle.manifest import FORMAT_VERSION, MANIFEST, SIGNATURE, GraphEntry, Manifest, tool_versions
from fine_infer.bundle.reader import Bundle, read_bundle, read_manifest, sha256_file, verify_files
from fine_infer.bundle.writer import BundleWriter, commit_manifest, update_manifest

__all__ = ["FORMAT_VERSION", "MANIFEST", "SIGNATURE", "Bundle", "BundleWriter", "GraphEntry", "Manifest",
           "commit_manifest", "read_bundle", "read_manifest", "sha256_file", "tool_versions", "update_manifest",
           "verify_files"]
