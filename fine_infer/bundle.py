"""The bundle: a directory of ONNX graphs, tokenizer, weights and ``manifest.json`` with a sha256 per file.

Export writes bundles with :class:`BundleWriter`; the runtime reads them with :func:`read_bundle`, which verifies
every checksum first, so a tampered or truncated file is a clear :class:`BundleError` and never a crash inside
ONNX Runtime. A bundle is assembled in a hidden temp directory beside its destination and renamed into place
at the end: an export that fails leaves nothing half-written, and an existing bundle is replaced only by a
complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Sequence

from fine_infer._atomic import DIR_MODE, atomic_write_bytes, fsync_dir
from fine_infer.errors import BundleError
from fine_infer.specs import GraphSpec, ImagePreprocess, TextPreprocess

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
            "graphs": {name: g.to_dict() for name, g in self.graphs.items()},
            "files": dict(sorted(self.files.items())),
            "versions": self.versions,
            "validation": self.validation,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version!r} is not supported by this fine-infer (reads {FORMAT_VERSION}); "
                "re-export the bundle with this version"
            )
        pre = d.get("preprocess") or {}
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
            versions=d.get("versions", {}),
            validation=d.get("validation", {}),
        )


@dataclass
class Bundle:
    """A verified bundle on disk: its folder and manifest."""

    path: Path
    manifest: Manifest

    def file(self, name: str) -> Path:
        """Absolute path of a file listed in the manifest."""
        if name not in self.manifest.files:
            raise BundleError(f"bundle {self.path} lists no file {name!r}")
        return self.path / name

    def graph(self, name: str) -> GraphEntry:
        """The entry of graph ``name``; unknown names list the bundle's graphs."""
        if name not in self.manifest.graphs:
            raise BundleError(f"bundle {self.path} has no graph {name!r}; it has: {', '.join(self.manifest.graphs)}")
        return self.manifest.graphs[name]

    def graph_for_task(self, task: str) -> GraphEntry:
        """The graph that performs ``task`` (``embed_image``, ``embed_text``, ``compose`` or ``classify``)."""
        for g in self.manifest.graphs.values():
            if g.spec.task == task:
                return g
        have = ", ".join(f"{n} ({g.spec.task})" for n, g in self.manifest.graphs.items())
        raise BundleError(f"bundle {self.path} ({self.manifest.arch or self.manifest.source}) cannot {task}; graphs: {have}")


def read_manifest(path: str | Path) -> Manifest:
    """Parse ``manifest.json`` of a bundle folder without verifying the other files."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"bundle {path} does not exist or is not a directory")
    if not mpath.is_file():
        raise BundleError(f"{path} is not a bundle: it has no {MANIFEST} (export one with `fine-infer export`)")
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
        return Manifest.from_dict(data)
    except BundleError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{mpath} is damaged ({type(exc).__name__}: {exc}); re-export the bundle") from None


def commit_manifest(path: str | Path, manifest: Manifest, added: Sequence[str] = (),
                    stale: Iterable[str] = ()) -> None:
    """Hash the ``added`` files into ``manifest``, rewrite the bundle's ``manifest.json`` atomically, then delete the
    ``stale`` files it no longer lists. Files are replaced under new names and the old ones deleted only after the
    manifest has moved on, so a failure at any point leaves a bundle whose manifest lists valid files."""
    folder = Path(path)
    for name in added:
        manifest.files[name] = sha256_file(folder / name)
    atomic_write_bytes(folder / MANIFEST, json.dumps(manifest.to_dict(), indent=2).encode() + b"\n")
    for name in stale:
        if name not in manifest.files and name != MANIFEST:
            (folder / name).unlink(missing_ok=True)


def verify_files(path: str | Path, manifest: Manifest) -> None:
    """Check every listed file exists and matches its sha256; raise :class:`BundleError` naming the first bad one."""
    path = Path(path)
    for name, digest in manifest.files.items():
        fpath = path / name
        if not fpath.is_file():
            raise BundleError(f"bundle {path} is incomplete: {name} is missing")
        if sha256_file(fpath) != digest:
            raise BundleError(
                f"bundle {path}: {name} does not match its checksum (modified or truncated); re-export the bundle"
            )


def read_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle, verifying every file's checksum unless ``verify=False``."""
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    return Bundle(Path(path), manifest)


class BundleWriter:
    """Assembles a bundle in a temp folder beside ``dest`` and moves it into place on :meth:`commit`.

    Use as a context manager: an exception inside the block removes the temp folder and leaves ``dest`` as it was.
    """

    def __init__(self, dest: str | Path, force: bool = False) -> None:
        self.dest = Path(dest)
        if self.dest.exists() and not force:
            raise BundleError(f"{self.dest} already exists; choose another --out or pass --force to replace it")
        if self.dest.exists() and not (self.dest / MANIFEST).is_file() and any(self.dest.iterdir()):
            raise BundleError(f"{self.dest} exists and is not a bundle; refusing to replace it even with --force")
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", suffix=".partial", dir=self.dest.parent))
        os.chmod(self.tmp, DIR_MODE)  # mkdtemp creates 0700
        self._committed = False
        self._manifest: Manifest | None = None

    def path(self, name: str) -> Path:
        """Where to write bundle file ``name`` inside the temp folder."""
        return self.tmp / name

    def seal(self, manifest: Manifest, rehash: bool = True) -> Bundle:
        """Hash every file (``rehash``) and write the manifest in the temp folder: a complete, verifiable bundle
        at :attr:`tmp` that is not in place yet (gates that need a loadable bundle run on it before :meth:`commit`)."""
        if rehash:
            manifest.files = {
                p.relative_to(self.tmp).as_posix(): sha256_file(p) for p in sorted(self.tmp.rglob("*")) if p.is_file()
            }
            manifest.files.pop(MANIFEST, None)
        atomic_write_bytes(self.tmp / MANIFEST, json.dumps(manifest.to_dict(), indent=2).encode() + b"\n")
        self._manifest = manifest
        return Bundle(self.tmp, manifest)

    def commit(self, manifest: Manifest | None = None) -> Bundle:
        """Seal with ``manifest`` (unless :meth:`seal` already ran), fsync, and rename the folder into place."""
        if manifest is not None:
            self.seal(manifest)
        elif self._manifest is None:
            raise BundleError("BundleWriter.commit needs a manifest (or a prior seal)")
        manifest = self._manifest
        for p in self.tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        if self.dest.exists():
            old = self.dest.with_name(f".{self.dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.dest, old)
            os.replace(self.tmp, self.dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.dest)
        fsync_dir(self.dest.parent)
        self._committed = True
        return Bundle(self.dest, manifest)

    def abort(self) -> None:
        """Remove the temp folder (idempotent)."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()
