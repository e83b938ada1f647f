"""The manifest of a bundle (``manifest.json``): graphs with their signatures and variants, preprocessing, config,
a sha256 per file, tool versions and the validation report. Every file name it lists passes
:func:`fine_infer.bundle.paths.check_name` when it is parsed (:meth:`Manifest.from_dict`) and before it is written."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterator

from fine_infer.bundle.paths import check_name
from fine_infer.errors import BundleError
from fine_infer.specs import GraphSpec, ImagePreprocess, TextPreprocess

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "bundle.sig"  # written by `fine-infer sign`; never listed in the manifest (fine_infer.bundle.signing)


def tool_versions() -> dict[str, str]:
    """Versions of the tools that matter for reproducing an export (absent packages are left out)."""
    out = {"python": platform.python_version()}
    for pkg in ("fine-infer", "torch", "onnx", "onnxscript", "onnxruntime", "tokenizers", "numpy", "triton"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass
class GraphEntry:
    """One graph of a bundle: its spec and the file (relative to the bundle) holding it."""

    spec: GraphSpec
    file: str
    opset: int | None = None
    variants: dict[str, str] = field(default_factory=dict)  # e.g. {"fp16": "image.fp16.onnx"}

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "opset": self.opset, "variants": dict(self.variants), **self.spec.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GraphEntry":
        return cls(GraphSpec.from_dict(d), d["file"], d.get("opset"), dict(d.get("variants", {})))


@dataclass
class Manifest:
    """The parsed ``manifest.json``."""

    graphs: dict[str, GraphEntry]
    files: dict[str, str]
    arch: str | None = None
    preset: str | None = None
    config: dict[str, Any] | None = None
    source: str | None = None  # "zoo" or the user's "pkg.mod:factory"
    embed_dim: int | None = None
    image: ImagePreprocess | None = None
    text: TextPreprocess | None = None
    tokenizer: str | None = None
    weights: str | None = None
    class_labels: dict[str, list[str]] | None = None
    # zoo exports: {"kind": "random" | "shipped" | "checkpoint", "file": name}; None where unknown (older bundles)
    weights_origin: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "arch": self.arch,
            "preset": self.preset,
            "source": self.source,
            "config": self.config,
            "embed_dim": self.embed_dim,
            "preprocess": {
                "image": self.image.to_dict() if self.image else None,
                "text": self.text.to_dict() if self.text else None,
            },
            "tokenizer": self.tokenizer,
            "weights": self.weights,
            "class_labels": self.class_labels,
            **({"weights_origin": self.weights_origin} if self.weights_origin else {}),
            "graphs": {name: g.to_dict() for name, g in self.graphs.items()},
            "files": dict(sorted(self.files.items())),
            "versions": self.versions,
            "validation": self.validation,
        }

    def identity(self) -> str:
        """What makes two bundles' embeddings comparable: a sha256 over each graph's task and fp32 file digest, the
        tokenizer's digest and the preprocessing. It survives tune/validate/sign (they rewrite other parts of the
        manifest) and changes with any re-export that changes a graph, the tokenizer or the preprocessing; an index
        records it so a server can refuse an index built by another bundle."""
        import hashlib
        import json

        doc = {
            "graphs": {n: [g.spec.task, self.files.get(g.file)] for n, g in sorted(self.graphs.items())},
            "tokenizer": self.files.get(self.tokenizer) if self.tokenizer else None,
            "image": self.image.to_dict() if self.image else None,
            "text": self.text.to_dict() if self.text else None,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def named_files(self) -> Iterator[tuple[str, Any]]:
        """Every file name the manifest lists, as ``(field, name)``: ``files``, each graph's file and variants,
        tokenizer, weights, and the files the validation records name (tune result, TensorRT timing cache, engines)."""
        for name in self.files:
            yield "files", name
        for g, entry in self.graphs.items():
            yield f"graphs.{g}.file", entry.file
            for key, name in entry.variants.items():
                yield f"graphs.{g}.variants.{key}", name
        if self.tokenizer is not None:
            yield "tokenizer", self.tokenizer
        if self.weights is not None:
            yield "weights", self.weights
        v = self.validation if isinstance(self.validation, dict) else {}
        tune, trt, refs = v.get("tune"), v.get("tensorrt"), v.get("references")
        if isinstance(tune, dict) and tune.get("file") is not None:
            yield "validation.tune.file", tune["file"]
        if isinstance(refs, dict) and refs.get("file") is not None:
            yield "validation.references.file", refs["file"]
        if isinstance(trt, dict):
            if trt.get("timing_cache") is not None:
                yield "validation.tensorrt.timing_cache", trt["timing_cache"]
            for key, rec in (trt.get("engines") or {}).items():
                for f in ("engine", "onnx", "timing_cache"):
                    if isinstance(rec, dict) and rec.get(f) is not None:
                        yield f"validation.tensorrt.engines.{key}.{f}", rec[f]

    def check_names(self) -> "Manifest":
        """Refuse (:class:`BundleError` naming the field and the name) any listed file name that is not a plain
        relative path inside the bundle; looks at the names only, never at the file system."""
        for where, name in self.named_files():
            check_name(name, where)
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        """Read a manifest's JSON object; a field of the wrong type or out of range raises ValueError naming it
        (:func:`fine_infer.bundle.read_manifest` turns it into a :class:`BundleError`)."""
        if not isinstance(d, dict):
            raise ValueError(f"the manifest must be a JSON object, not {type(d).__name__}")
        version = d.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version!r} is not supported by this fine-infer (reads {FORMAT_VERSION}); "
                "re-export the bundle with this version"
            )
        pre = d.get("preprocess") or {}
        for key, value, kind in (("graphs", d["graphs"], dict), ("files", d["files"], dict), ("preprocess", pre, dict),
                                 ("config", d.get("config") or {}, dict), ("versions", d.get("versions", {}), dict),
                                 ("validation", d.get("validation", {}), dict),
                                 ("class_labels", d.get("class_labels") or {}, dict)):
            if not isinstance(value, kind):
                raise ValueError(f"{key} must be a JSON object, not {type(value).__name__}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in d["files"].items()):
            raise ValueError("files must map file names to sha256 strings")
        for key in ("arch", "preset", "source", "tokenizer", "weights"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise ValueError(f"{key} must be a string, not {type(d[key]).__name__}")
        if d.get("embed_dim") is not None and (type(d["embed_dim"]) is not int or not 0 < d["embed_dim"] < 1 << 20):
            raise ValueError(f"embed_dim must be a positive integer, not {d['embed_dim']!r}"[:200])
        return cls(
            graphs={name: GraphEntry.from_dict(g) for name, g in d["graphs"].items()},
            files=dict(d["files"]),
            arch=d.get("arch"),
            preset=d.get("preset"),
            config=d.get("config"),
            source=d.get("source"),
            embed_dim=d.get("embed_dim"),
            image=ImagePreprocess.from_dict(pre["image"]) if pre.get("image") else None,
            text=TextPreprocess.from_dict(pre["text"]) if pre.get("text") else None,
            tokenizer=d.get("tokenizer"),
            weights=d.get("weights"),
            class_labels=d.get("class_labels"),
            weights_origin=d.get("weights_origin"),
            versions=d.get("versions", {}),
            validation=d.get("validation", {}),
        ).check_names()
