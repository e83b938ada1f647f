"""Writing bundles: a new bundle assembled beside its destination and renamed into place (:class:`BundleWriter`), and
every later rewrite of a manifest (:func:`update_manifest`, :func:`commit_manifest`): tune, validate and engine
builds call these; nothing else writes a manifest."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

from fine_infer._atomic import DIR_MODE, atomic_write_bytes, fsync_dir
from fine_infer.bundle.manifest import MANIFEST, Manifest
from fine_infer.bundle.reader import Bundle, read_manifest, sha256_file
from fine_infer.errors import BundleError


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


def update_manifest(path: str | Path, mutate: Callable[[Manifest], Iterable[str]], added: Sequence[str] = ()) -> Manifest:
    """Re-read ``path``'s manifest, apply ``mutate`` (which returns the file names it stopped listing), hash the
    ``added`` files into it, rewrite it atomically, then delete the files it no longer lists.

    Only ``manifest.json`` changes besides the added and dropped files, so every other sha256 stays valid. Not safe
    against two processes updating the same bundle at once (the later write wins)."""
    manifest = read_manifest(path)
    dropped = [n for n in mutate(manifest) if n]
    for name in dropped:
        manifest.files.pop(name, None)
    commit_manifest(path, manifest, added, stale=dropped)
    return manifest


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
