"""Opening a bundle: parse its manifest (whose file names must stay inside the bundle) and verify every file's sha256
before anything is loaded from it; files are reached only through :func:`fine_infer.bundle.paths.bundle_path`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fine_infer import _strict_json
from fine_infer._atomic import is_temp_name
from fine_infer.bundle.manifest import MANIFEST, SIGNATURE, GraphEntry, Manifest
from fine_infer.bundle.paths import bundle_path, walk_files
from fine_infer.errors import BundleError

MAX_MANIFEST_BYTES = 16 << 20  # a real manifest is a few kB (validation records included)
MANIFEST_DEPTH = 64


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    """A verified bundle on disk: its folder and manifest."""

    path: Path
    manifest: Manifest

    def file(self, name: str) -> Path:
        """Path of a file listed in the manifest (refused if it is, or lies in, a symlink)."""
        if name not in self.manifest.files:
            raise BundleError(f"bundle {self.path} lists no file {name!r}")
        return bundle_path(self.path, name)

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
    if mpath.is_symlink():
        raise BundleError(f"bundle {path}: {MANIFEST} is a symlink; a bundle holds plain files only (refusing it)")
    if not mpath.is_file():
        raise BundleError(f"{path} is not a bundle: it has no {MANIFEST} (export one with `fine-infer export`)")
    size = mpath.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mpath} is {size} bytes, more than a manifest can be ({MAX_MANIFEST_BYTES}); refusing it")
    try:
        data = _strict_json.loads(mpath.read_bytes().decode("utf-8"), MANIFEST_DEPTH)
        return Manifest.from_dict(data)
    except BundleError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BundleError(f"{mpath} is damaged ({type(exc).__name__}: {exc}); re-export the bundle") from None


def verify_files(path: str | Path, manifest: Manifest) -> None:
    """Check every listed file exists and matches its sha256, and that the folder holds nothing else; raise
    :class:`BundleError` naming the first problem. The names were checked when the manifest was parsed; a symlink or a
    special file anywhere in the folder is refused here. Why nothing else: a graph may name files beside it (ONNX
    external data), which ONNX Runtime and OpenVINO read by name; only listed files are checksummed."""
    path = Path(path)
    for name, digest in manifest.files.items():
        fpath = bundle_path(path, name)
        if not fpath.is_file():
            raise BundleError(f"bundle {path} is incomplete: {name} is missing")
        if sha256_file(fpath) != digest:
            raise BundleError(
                f"bundle {path}: {name} does not match its checksum (modified or truncated); re-export the bundle"
            )
    listed = {*manifest.files, MANIFEST, SIGNATURE}
    extra = [name for name in walk_files(path) if name not in listed]
    if extra:
        # a temp left by an interrupted write is refused too: a name of that form is no proof of what it holds
        temps = all(is_temp_name(Path(name).name) for name in extra)
        raise BundleError(f"bundle {path} holds files its manifest does not list ({', '.join(extra[:5])}"
                          f"{', …' if len(extra) > 5 else ''}): a graph could read them unchecked; "
                          + ("they are temp files of an interrupted write: delete them" if temps else
                             "remove them or re-export the bundle"))


def read_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle, verifying every file's checksum unless ``verify=False``."""
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    return Bundle(Path(path), manifest)
